"""The one wire contract: the served models' names and every tensor they exchange, as one table.

The repository writer builds every `config.pbtxt` from these tables, the Triton Python models read
their inputs by these names, and the Triton client checks a served model's metadata and builds its
requests from them. Callers read the tables as `wire.ENSEMBLE_INPUTS` (not copies), so one change
here changes configs, models and client together.

Ensemble inputs and outputs are named like Triton's TensorRT-LLM ensembles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------- model names
ENSEMBLE = "coordexp"
PREPROCESS = "preprocess"
VISION_ENCODER = "vision_encoder"
LLM = "llm"
LLM_STREAM = "llm_stream"  # the same llm code, decoupled: the step of the streaming ensemble
POSTPROCESS = "postprocess"
STREAM_SUFFIX = "_stream"  # the streaming ensemble of ensemble NAME is NAME_stream
MODELS = (PREPROCESS, VISION_ENCODER, LLM, POSTPROCESS, ENSEMBLE)


def stream_ensemble_name(name: str) -> str:
    """The streaming ensemble of ensemble `name` (a streaming ensemble's name is kept)."""
    return name if name.endswith(STREAM_SUFFIX) else name + STREAM_SUFFIX


# ---------------------------------------------------------------------------- tensor names
IMAGE_BYTES_INPUT = "image_bytes_input"  # the encoded image file (never a path)
TEXT_INPUT = "text_input"  # optional: user prompt replacing PromptSpec.user_text
SYSTEM_TEXT_INPUT = "system_text_input"  # optional: system prompt replacing the served one
MESSAGE_LAYOUT_INPUT = "message_layout"  # optional: "image_first" | "text_first" (the image's place in the user turn)
MAX_TOKENS = "max_tokens"  # -> llm request_output_len
TEMPERATURE = "temperature"  # 0 = greedy
RUNTIME_TOP_P = "runtime_top_p"
REPETITION_PENALTY = "repetition_penalty"
RANDOM_SEED = "random_seed"
GUIDED = "guided"
IGNORE_EOS = "ignore_eos"
STREAM = "stream"  # streaming ensemble only: one response per decoding step
# Internal tensors between the steps.
INPUT_IDS = "input_ids"  # left padded within a request
ATTENTION_MASK = "attention_mask"
INPUT_LENGTHS = "input_lengths"
PIXEL_VALUES = "pixel_values"  # patches x patch dim, zero padded within a request
IMAGE_GRID_THW = "image_grid_thw"
IMAGE_EMBEDS = "image_embeds"  # image tokens x hidden, zero padded within a request
DEEPSTACK_EMBEDS = "deepstack_embeds"  # deepstack layers x image tokens x hidden
REQUEST_OUTPUT_LEN = "request_output_len"  # llm's name for max_tokens
# Outputs.
OUTPUT_IDS = "output_ids"  # generated ids (stop token excluded), padded with pad id
SEQUENCE_LENGTH = "sequence_length"  # number of generated ids
TEXT_OUTPUT = "text_output"  # the decoded model text (coord tokens kept)
PREDS_JSON = "preds_json"  # {"preds", "error", "error_message", "repairs"}
GUIDED_CLOSED_EARLY = "guided_closed_early"  # guided decoding closed the answer early (budget)
PROMPT_TOKENS = "prompt_tokens"  # tokens of the rendered prompt, image placeholders included (usage)


@dataclass(frozen=True)
class Tensor:
    """One tensor of a model config: name, Triton data type (config spelling, without TYPE_), dims
    (batch dim excluded), and for ensemble inputs the `GenerationParams` field it carries."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False
    param: str | None = None  # GenerationParams attribute (decoding inputs)
    client_required: bool = False  # a served model must declare it for the client to use it

    @property
    def wire_dtype(self) -> str:
        """The data type as model metadata and tritonclient spell it (STRING -> BYTES)."""
        return "BYTES" if self.dtype == "STRING" else self.dtype

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.wire_dtype]


NUMPY_DTYPES = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64,
                "FP32": np.float32}

# The ensemble's decoding inputs; llm reads them under the same names except max_tokens.
DECODING_TENSORS = (
    Tensor(MAX_TOKENS, "INT32", (1,), optional=True, param="max_new_tokens", client_required=True),
    Tensor(TEMPERATURE, "FP32", (1,), optional=True, param="temperature", client_required=True),
    Tensor(RUNTIME_TOP_P, "FP32", (1,), optional=True, param="top_p", client_required=True),
    Tensor(REPETITION_PENALTY, "FP32", (1,), optional=True, param="repetition_penalty", client_required=True),
    Tensor(RANDOM_SEED, "UINT64", (1,), optional=True, param="seed", client_required=True),
    Tensor(GUIDED, "BOOL", (1,), optional=True, param="guided"),
    Tensor(IGNORE_EOS, "BOOL", (1,), optional=True, param="ignore_eos"),
)
ENSEMBLE_TO_LLM = {MAX_TOKENS: REQUEST_OUTPUT_LEN}  # ensemble decoding input -> llm input, where renamed


def llm_name(ensemble_input: str) -> str:
    return ENSEMBLE_TO_LLM.get(ensemble_input, ensemble_input)


def decoding_inputs() -> dict[str, str]:
    """Ensemble decoding input -> the llm step's input name."""
    return {t.name: llm_name(t.name) for t in DECODING_TENSORS}


# The per-request prompt: each replaces one part of the served prompt (coordexp.prompt.PromptSpec)
PROMPT_TENSORS = (
    Tensor(TEXT_INPUT, "STRING", (1,), optional=True),
    Tensor(SYSTEM_TEXT_INPUT, "STRING", (1,), optional=True),
    Tensor(MESSAGE_LAYOUT_INPUT, "STRING", (1,), optional=True),
)
PROMPT_INPUTS = tuple(t.name for t in PROMPT_TENSORS)

ENSEMBLE_INPUTS = (
    Tensor(IMAGE_BYTES_INPUT, "STRING", (1,), client_required=True),
    *PROMPT_TENSORS,
    *DECODING_TENSORS,
)
STREAM_TENSOR = Tensor(STREAM, "BOOL", (1,), optional=True)  # streaming ensemble and llm_stream only
ENSEMBLE_OUTPUTS = (
    Tensor(TEXT_OUTPUT, "STRING", (1,), client_required=True),
    Tensor(PREDS_JSON, "STRING", (1,)),
    Tensor(OUTPUT_IDS, "INT32", (-1,)),
    Tensor(SEQUENCE_LENGTH, "INT32", (1,)),
    Tensor(GUIDED_CLOSED_EARLY, "BOOL", (1,)),
    Tensor(PROMPT_TOKENS, "INT32", (1,)),
)

# Each step model's (inputs, outputs).
_LLM_INPUTS = (
    Tensor(INPUT_IDS, "INT32", (-1,), ragged=True), Tensor(ATTENTION_MASK, "INT32", (-1,), ragged=True),
    Tensor(INPUT_LENGTHS, "INT32", (1,)), Tensor(IMAGE_GRID_THW, "INT64", (3,)),
    Tensor(IMAGE_EMBEDS, "FP32", (-1, -1), ragged=True), Tensor(DEEPSTACK_EMBEDS, "FP32", (-1, -1, -1), ragged=True),
    *(Tensor(llm_name(t.name), t.dtype, t.dims, optional=True) for t in DECODING_TENSORS),
)
_LLM_OUTPUTS = (Tensor(OUTPUT_IDS, "INT32", (-1,)), Tensor(SEQUENCE_LENGTH, "INT32", (1,)),
                Tensor(GUIDED_CLOSED_EARLY, "BOOL", (1,)), Tensor(PROMPT_TOKENS, "INT32", (1,)))
MODEL_TENSORS: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    PREPROCESS: (
        (Tensor(IMAGE_BYTES_INPUT, "STRING", (1,)), *PROMPT_TENSORS),
        (Tensor(INPUT_IDS, "INT32", (-1,)), Tensor(ATTENTION_MASK, "INT32", (-1,)), Tensor(INPUT_LENGTHS, "INT32", (1,)),
         Tensor(PIXEL_VALUES, "FP32", (-1, -1)), Tensor(IMAGE_GRID_THW, "INT64", (3,))),
    ),
    VISION_ENCODER: (
        (Tensor(PIXEL_VALUES, "FP32", (-1, -1), ragged=True), Tensor(IMAGE_GRID_THW, "INT64", (3,))),
        (Tensor(IMAGE_EMBEDS, "FP32", (-1, -1)), Tensor(DEEPSTACK_EMBEDS, "FP32", (-1, -1, -1))),
    ),
    LLM: (_LLM_INPUTS, _LLM_OUTPUTS),
    LLM_STREAM: ((*_LLM_INPUTS, STREAM_TENSOR), _LLM_OUTPUTS),
    POSTPROCESS: (
        (Tensor(OUTPUT_IDS, "INT32", (-1,), ragged=True), Tensor(SEQUENCE_LENGTH, "INT32", (1,))),
        (Tensor(TEXT_OUTPUT, "STRING", (1,)), Tensor(PREDS_JSON, "STRING", (1,))),
    ),
}


def input_names(model: str) -> tuple[str, ...]:
    """The input tensor names a step model reads."""
    return tuple(t.name for t in MODEL_TENSORS[model][0])


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


# The ensemble's wiring, in one place: step -> (input_map {step tensor: ensemble tensor},
# output_map {step tensor: ensemble tensor}). Internal ensemble tensors keep the step tensors' names.
ENSEMBLE_STEPS: tuple[tuple[str, dict[str, str], dict[str, str]], ...] = (
    (PREPROCESS, _same(IMAGE_BYTES_INPUT, *PROMPT_INPUTS),
     _same(INPUT_IDS, ATTENTION_MASK, INPUT_LENGTHS, PIXEL_VALUES, IMAGE_GRID_THW)),
    (VISION_ENCODER, _same(PIXEL_VALUES, IMAGE_GRID_THW), _same(IMAGE_EMBEDS, DEEPSTACK_EMBEDS)),
    (LLM, {**_same(INPUT_IDS, ATTENTION_MASK, INPUT_LENGTHS, IMAGE_GRID_THW, IMAGE_EMBEDS, DEEPSTACK_EMBEDS),
           **{llm: ens for ens, llm in decoding_inputs().items()}},
     _same(OUTPUT_IDS, SEQUENCE_LENGTH, GUIDED_CLOSED_EARLY, PROMPT_TOKENS)),
    (POSTPROCESS, _same(OUTPUT_IDS, SEQUENCE_LENGTH), _same(TEXT_OUTPUT, PREDS_JSON)),
)


def stream_steps(steps=None):
    """The streaming ensemble's steps: the same, with llm_stream (fed `stream`) in place of llm."""
    out = []
    for model, inputs, outputs in (ENSEMBLE_STEPS if steps is None else steps):
        if model == LLM:
            model, inputs = LLM_STREAM, {**inputs, STREAM: STREAM}
        out.append((model, inputs, outputs))
    return out
