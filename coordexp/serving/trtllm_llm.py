"""The `llm` step on TensorRT-LLM (and the TensorRT `vision_encoder` step), behind the ONNX contract.

`TritonPythonModel` (the `llm` model of a `--backend trtllm` repository) takes the ONNX `llm`
step's tensors - input_ids INT32 [B, T] (left padded), attention_mask, input_lengths,
image_grid_thw INT64 [B, 3], image_embeds / deepstack_embeds, the optional decoding inputs - plus
an optional pixel_values FP32 [B, P, D], and returns the same output_ids INT32 [B, S] (stop token
excluded, pad-filled) and sequence_length INT32 [B, 1]. Preprocess, postprocess and the client
cannot tell it from the ONNX Runtime one.

Generation is TensorRT-LLM's LLM API on its PyTorch backend (`tensorrt_llm.LLM`, built from
`llm/1/model.yaml`, the same keyword arguments the official `llmapi` Triton model reads). The
Qwen-VL input processors of the LLM API take an image and a prompt text, so per row:

- the prompt is `input_ids` decoded with its special tokens, the run of `<|image_pad|>` collapsed
  back to the one placeholder the chat template writes (the HF processor inside TensorRT-LLM
  expands it again to the same count);
- vision "trtllm": the image is rebuilt from `pixel_values` - the exact inverse of the Qwen-VL
  image processor's rescale, normalise and patchify - at its resized size, so TensorRT-LLM's own
  processor leaves its size alone and produces the same patches;
- vision "tensorrt": the `vision_encoder` step's `image_embeds` go in as `multi_modal_embeddings`
  (TensorRT-LLM releases whose Qwen-VL input processor accepts external embeddings; such a
  processor guesses the patch grid from the token count, so rows whose grid is not that guess are
  refused instead of being decoded with wrong M-RoPE positions).

Streaming (`llm_stream`, decoupled): every row goes to `LLM.generate_async(..., streaming=True)`
on one background event loop, so rows of later requests join the running batch (TensorRT-LLM's
in-flight batching) and each new token is sent back through `DecoupledRun`, as on the ONNX path.

`tensorrt_llm`, `tensorrt` and `torch` are imported in `initialize()` only: the helpers here are
plain numpy and are tested without them.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from coordexp.generation import GenerationParams
from coordexp.serving.common import (PROCESSOR_SUBDIR, RequestError, TritonRequestView, decoupled_sender,
                                     error_response, int_param, model_args, request_view, resolve, response, rows)
from coordexp.wire import (ATTENTION_MASK, DEEPSTACK_EMBEDS, GUIDED, IGNORE_EOS, IMAGE_EMBEDS, IMAGE_GRID_THW,
                           INPUT_IDS, INPUT_LENGTHS, PIXEL_VALUES, RANDOM_SEED, REPETITION_PENALTY,
                           REQUEST_OUTPUT_LEN, RUNTIME_TOP_P, STREAM, TEMPERATURE)
from coordexp.serving.llm import (LLM_INPUTS, DecoupledRun, LlmBatcher, ProgressCallback, defaults_from_params,
                                  params_for_row)

TRTLLM_INPUTS = (*LLM_INPUTS, PIXEL_VALUES)
MODEL_YAML = "llm/1/model.yaml"
VISION_MODES = ("trtllm", "tensorrt")


# ---------------------------------------------------------------------------- image and prompt
def image_from_pixel_values(pixel_values: np.ndarray, grid: Sequence[int], patch_size: int, merge_size: int,
                            temporal_patch_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                            rescale_factor: float = 1 / 255) -> np.ndarray:
    """One image's flat patches [t*h*w, C*tps*p*p] -> the resized image, uint8 HWC.

    Inverts the Qwen-VL image processor: patchify (rows ordered (h/m, w/m, m, m), columns
    (C, tps, p, p)), normalize (mean/std) and rescale. Exact for images the processor resized in
    8 bits (the PIL path), up to the float32 rounding the final `round` absorbs."""
    t, h, w = (int(v) for v in grid)
    if t != 1:
        raise RequestError(f"{IMAGE_GRID_THW}={[t, h, w]}: only single images (t=1) are supported")
    if h % merge_size or w % merge_size:
        raise RequestError(f"{IMAGE_GRID_THW}={[t, h, w]} is not a multiple of the merge size {merge_size}")
    pv = np.asarray(pixel_values, dtype=np.float32)
    n = h * w
    channels = pv.shape[1] // (temporal_patch_size * patch_size * patch_size) if pv.ndim == 2 else 0
    if pv.ndim != 2 or pv.shape[0] < n or channels * temporal_patch_size * patch_size ** 2 != pv.shape[1]:
        raise RequestError(f"{PIXEL_VALUES} {list(pv.shape)} does not fit grid {[t, h, w]} with patch {patch_size}")
    m = merge_size
    x = pv[:n].reshape(h // m, w // m, m, m, channels, temporal_patch_size, patch_size, patch_size)[:, :, :, :, :, 0]
    # (gh, gw, mh, mw, C, ph, pw) -> (C, gh, mh, ph, gw, mw, pw) -> (C, H, W)
    x = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch_size, w * patch_size)
    mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
    x = (x * std + mean) / float(rescale_factor)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def collapse_image_pads(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Each run of image placeholder ids -> one placeholder (the prompt before expansion)."""
    out: list[int] = []
    for tok in ids:
        tok = int(tok)
        if tok == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(tok)
    return out


def near_square_grid(num_tokens: int, merge_size: int) -> list[int]:
    """The grid a Qwen-VL input processor that receives only an embedding assumes for it:
    h = the largest divisor of the token count not above its square root."""
    h = int(math.isqrt(num_tokens))
    while h > 1 and num_tokens % h:
        h -= 1
    return [1, h * merge_size, (num_tokens // h) * merge_size]


def strip_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to (not including) the first stop id: the ONNX llm step's output."""
    stops = set(int(s) for s in stop_ids)
    out = []
    for t in ids:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


def sampling_kwargs(params: GenerationParams, stop_ids: Sequence[int], pad_id: int) -> dict[str, Any]:
    """GenerationParams -> keyword arguments of tensorrt_llm.SamplingParams."""
    kw: dict[str, Any] = {
        "max_tokens": int(params.max_new_tokens),
        "end_id": int(stop_ids[0]),
        "pad_id": int(pad_id),
        "stop_token_ids": [int(s) for s in stop_ids],
        "ignore_eos": bool(params.ignore_eos),
        "repetition_penalty": float(params.repetition_penalty),
        "detokenize": False,  # postprocess decodes; ids are the contract
    }
    if params.greedy:
        kw.update(top_k=1, top_p=1.0)
    else:
        kw.update(temperature=float(params.temperature), top_p=float(params.top_p), seed=int(params.seed))
    return kw


def accepted_kwargs(cls: Any, kw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`kw` restricted to what `cls` accepts (dataclass fields or signature), and the names dropped."""
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
    else:
        sig = inspect.signature(cls)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return dict(kw), []
        names = set(sig.parameters)
    return {k: v for k, v in kw.items() if k in names}, sorted(k for k in kw if k not in names)


@dataclass
class TrtllmItem:
    """One row: unpadded prompt ids, its image (rebuilt) or embedding, its decoding parameters."""

    ids: np.ndarray  # [T_i] int64
    grid: np.ndarray  # [3] int64
    params: GenerationParams
    image: np.ndarray | None = None  # uint8 HWC (vision "trtllm")
    embeds: np.ndarray | None = None  # [N_i, H] (vision "tensorrt")


class PromptRebuilder:
    """input_ids / pixel_values rows -> what the LLM API's Qwen-VL input processor takes.

    Needs only a tokenizer and the image processor's numbers (`from_dir` reads them with
    `AutoTokenizer` and preprocessor_config.json): the llm process runs TensorRT-LLM's own
    transformers (4.57.1 for TensorRT-LLM 1.1.0), not the one coordexp.processor needs."""

    def __init__(self, tokenizer: Any, image_token_id: int, patch_size: int, merge_size: int,
                 temporal_patch_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                 rescale_factor: float = 1 / 255):
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.rescale_factor = float(rescale_factor)

    @classmethod
    def from_dir(cls, folder: str, tokenizer: Any = None) -> "PromptRebuilder":
        from coordexp.tokens import IMAGE_PAD

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        with open(os.path.join(folder, "preprocessor_config.json"), "r", encoding="utf-8") as f:
            ip = json.load(f)
        vocab = tokenizer.get_vocab()
        if IMAGE_PAD not in vocab:
            raise ValueError(f"the tokenizer in {folder} has no {IMAGE_PAD} token")
        return cls(tokenizer, vocab[IMAGE_PAD], ip.get("patch_size", 14), ip.get("merge_size", 2),
                   ip.get("temporal_patch_size", 2), ip.get("image_mean", [0.5] * 3), ip.get("image_std", [0.5] * 3),
                   ip.get("rescale_factor", 1 / 255))

    def prompt(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(collapse_image_pads(ids, self.image_token_id), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def image(self, pixel_values: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        return image_from_pixel_values(pixel_values, grid, self.patch_size, self.merge_size, self.temporal_patch_size,
                                       self.image_mean, self.image_std, self.rescale_factor)


class TrtllmBatcher(LlmBatcher):
    """Rows of several requests -> one LLM API `generate` call (one SamplingParams per row)."""

    def __init__(self, llm: Any, sampling_cls: Any, rebuilder: PromptRebuilder, vision: str = "trtllm",
                 defaults: GenerationParams | None = None, max_new_tokens: int | None = None, pad_token_id: int = 0,
                 stop_token_ids: Sequence[int] = (), log: Any = None):
        if vision not in VISION_MODES:
            raise ValueError(f"vision must be one of {VISION_MODES}, got {vision!r}")
        super().__init__(parts=None, defaults=defaults, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                         merge_size=rebuilder.merge_size)
        self.llm = llm
        self.sampling_cls = sampling_cls
        self.rebuilder = rebuilder
        self.vision = vision
        self.stop_token_ids = [int(s) for s in stop_token_ids] or [int(pad_token_id)]
        self.log = log or (lambda msg: None)
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log(msg)

    # ------------------------------------------------------------------ requests -> items
    def items_of(self, view: TritonRequestView) -> list[TrtllmItem]:  # type: ignore[override]
        ids = np.asarray(view.need(INPUT_IDS))
        mask = np.asarray(view.need(ATTENTION_MASK))
        grid = np.asarray(view.need(IMAGE_GRID_THW), dtype=np.int64)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise RequestError(f"{INPUT_IDS} {list(ids.shape)} / {ATTENTION_MASK} {list(mask.shape)}: expected [B, T]")
        batch = ids.shape[0]
        if grid.shape != (batch, 3):
            raise RequestError(f"{IMAGE_GRID_THW} {list(grid.shape)}: expected [{batch}, 3]")
        if self.vision == "trtllm":
            pv = view.get(PIXEL_VALUES)
            if pv is None:
                raise RequestError(f"missing input tensor {PIXEL_VALUES!r} (this llm model rebuilds the image from it)")
            pv = np.asarray(pv, dtype=np.float32)
            if pv.ndim != 3 or pv.shape[0] != batch:
                raise RequestError(f"{PIXEL_VALUES} {list(pv.shape)}: expected [{batch}, P, D]")
        else:
            embeds = np.asarray(view.need(IMAGE_EMBEDS), dtype=np.float32)
            if embeds.ndim != 3 or embeds.shape[0] != batch:
                raise RequestError(f"{IMAGE_EMBEDS} {list(embeds.shape)}: expected [{batch}, N, H]")
            deep = view.get(DEEPSTACK_EMBEDS)
            if deep is not None and np.asarray(deep).ndim == 4 and np.asarray(deep).shape[1] > 0:
                raise RequestError("deepstack features cannot be handed to the LLM API; this repository cannot "
                                   "serve Qwen3-VL with a separate vision engine")
        lengths = view.get(INPUT_LENGTHS)
        opt = {name: rows(view.get(name), batch, name) for name in
               (REQUEST_OUTPUT_LEN, TEMPERATURE, RUNTIME_TOP_P, REPETITION_PENALTY, RANDOM_SEED, GUIDED, IGNORE_EOS)}
        items = []
        for i in range(batch):
            row = ids[i][mask[i].astype(bool)].astype(np.int64)
            if lengths is not None and int(np.asarray(lengths).reshape(batch, -1)[i, 0]) != row.shape[0]:
                raise RequestError(f"{INPUT_LENGTHS}[{i}] does not match {ATTENTION_MASK}[{i}]")
            params = params_for_row(self.defaults, self.limit, opt[REQUEST_OUTPUT_LEN][i], opt[TEMPERATURE][i],
                                    opt[RUNTIME_TOP_P][i], opt[REPETITION_PENALTY][i], opt[RANDOM_SEED][i],
                                    opt[GUIDED][i], opt[IGNORE_EOS][i])
            if params.guided:
                raise RequestError("guided decoding is not available in this llm model; send guided=false")
            n = int(np.prod(grid[i])) // (self.merge_size ** 2)
            if int((row == self.rebuilder.image_token_id).sum()) != n:
                raise RequestError(f"{INPUT_IDS}[{i}] has {int((row == self.rebuilder.image_token_id).sum())} image "
                                   f"placeholders, {IMAGE_GRID_THW}[{i}] needs {n}")
            if self.vision == "trtllm":
                items.append(TrtllmItem(row, grid[i], params, image=self.rebuilder.image(pv[i], grid[i])))
            else:
                if n > embeds.shape[1]:
                    raise RequestError(f"{IMAGE_GRID_THW}[{i}] needs {n} image tokens, got {embeds.shape[1]}")
                if near_square_grid(n, self.merge_size) != [int(v) for v in grid[i]]:
                    raise RequestError(f"image grid {grid[i].tolist()} is not the near-square grid the LLM API assumes "
                                       "for external embeddings; its M-RoPE positions would be wrong (serve this "
                                       "checkpoint with --trtllm-vision trtllm)")
                items.append(TrtllmItem(row, grid[i], params, embeds=embeds[i, :n]))
        return items

    # ------------------------------------------------------------------ generation
    def llm_input(self, item: TrtllmItem) -> dict[str, Any]:
        """The LLM API prompt dict of one row."""
        text = self.rebuilder.prompt(item.ids)
        if item.image is not None:
            from PIL import Image

            return {"prompt": text, "multi_modal_data": {"image": [Image.fromarray(item.image, "RGB")]}}
        import torch

        embeds = torch.from_numpy(np.ascontiguousarray(item.embeds))
        return {"prompt": text, "multi_modal_embeddings": {"image": [embeds]}}

    def sampling(self, params: GenerationParams) -> Any:
        kw, dropped = accepted_kwargs(self.sampling_cls, sampling_kwargs(params, self.stop_token_ids,
                                                                         self.pad_token_id))
        if dropped:
            self._warn_once("dropped:" + ",".join(dropped),
                            f"[coordexp.trtllm_llm] SamplingParams of this TensorRT-LLM has no {', '.join(dropped)}")
        return self.sampling_cls(**kw)

    def _event_loop(self) -> Any:
        """The one loop every streamed row runs on (a daemon thread), started on first use."""
        import asyncio
        import threading

        if getattr(self, "_loop", None) is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="trtllm-stream", daemon=True).start()
        return self._loop

    async def _stream_rows(self, items: Sequence[TrtllmItem], on_progress: ProgressCallback
                           ) -> list[list[int] | Exception]:
        import asyncio

        async def one(k: int, it: TrtllmItem) -> list[int]:
            ids: list[int] = []
            finished = False
            async for out in self.llm.generate_async(self.llm_input(it), self.sampling(it.params), streaming=True):
                ids = strip_stop(out.outputs[0].token_ids, self.stop_token_ids)  # cumulative in streaming mode
                finished = bool(getattr(out, "finished", False))
                on_progress({k: ids}, [k] if finished else [])
            if not finished:  # an iterator that ends without a finished output still ends the row
                on_progress({k: ids}, [k])
            return ids

        self.calls.append(len(items))
        got = await asyncio.gather(*(one(k, it) for k, it in enumerate(items)), return_exceptions=True)
        return [g if isinstance(g, (list, Exception)) else RuntimeError(str(g)) for g in got]

    def generate(self, items: Sequence[TrtllmItem],  # type: ignore[override]
                 on_progress: ProgressCallback | None = None) -> list[list[int] | Exception]:
        """All rows in one `LLM.generate` call: TensorRT-LLM batches them in flight. With
        `on_progress` (the decoupled model), per-row streaming on the background loop instead."""
        if not items:
            return []
        if on_progress is not None:
            import asyncio

            return asyncio.run_coroutine_threadsafe(self._stream_rows(items, on_progress),
                                                    self._event_loop()).result()
        try:
            prompts = [self.llm_input(it) for it in items]
            sampling = [self.sampling(it.params) for it in items]
            self.calls.append(len(items))
            outs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - the batch's error becomes each request's error
            return [e] * len(items)
        results: list[list[int] | Exception] = []
        for it, out in zip(items, outs):
            got = getattr(out, "prompt_token_ids", None)
            if got is not None and len(got) != len(it.ids):
                self._warn_once("prompt", f"[coordexp.trtllm_llm] TensorRT-LLM tokenized a rebuilt prompt to "
                                          f"{len(got)} ids, the preprocess step to {len(it.ids)}")
            results.append(strip_stop(out.outputs[0].token_ids, self.stop_token_ids))
        return results


# ---------------------------------------------------------------------------- Triton models
def read_llm_args(path: str, root: str) -> dict[str, Any]:
    """llm/1/model.yaml -> keyword arguments of tensorrt_llm.LLM (`model` resolved against the root)."""
    import yaml

    with open(path, "r", encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    cfg.pop("triton_config", None)
    if "model" not in cfg:
        raise ValueError(f"{path} has no `model`")
    cfg["model"] = resolve(root, str(cfg["model"]))
    return cfg


class TritonPythonModel:
    """Triton Python-backend model `llm` of a TensorRT-LLM repository."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config, params, root, self.decoupled = model_args(args)
        llm_args = read_llm_args(resolve(root, params.get("model_yaml") or MODEL_YAML), root)
        try:
            from tensorrt_llm import LLM, SamplingParams
        except ImportError as e:
            raise RuntimeError(f"tensorrt_llm is not importable ({e}): serve this repository in the TensorRT-LLM "
                               "container (docker/Dockerfile.gpu)") from None
        try:  # what the official llmapi model does: nested dicts -> the LLM API's config objects
            from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_dict

            llm_args = update_llm_args_with_extra_dict({}, llm_args)
        except ImportError:
            pass
        rebuilder = PromptRebuilder.from_dir(resolve(root, params.get("processor_dir") or PROCESSOR_SUBDIR))
        defaults = defaults_from_params(params)
        stops = json.loads(params["stop_token_ids"]) if params.get("stop_token_ids") else []
        self.llm = LLM(**llm_args)
        logger = getattr(pb_utils, "Logger", None)
        self.batcher = TrtllmBatcher(
            self.llm, SamplingParams, rebuilder, vision=params.get("vision") or "trtllm",
            defaults=defaults, max_new_tokens=int_param(params, "max_new_tokens", defaults.max_new_tokens),
            pad_token_id=int_param(params, "pad_token_id", 0), stop_token_ids=stops,
            log=(logger.log_warn if logger is not None else print))
        if self.decoupled:  # execute() returns at once; requests stream from these threads
            from concurrent.futures import ThreadPoolExecutor

            self.workers = ThreadPoolExecutor(max_workers=max(1, int(config.get("max_batch_size") or 1)))

    def execute(self, requests: list[Any]) -> list[Any] | None:
        views = [request_view(self.pb, r, (*TRTLLM_INPUTS, STREAM)) for r in requests]
        if self.decoupled:  # the responses go out from a worker thread; execute() returns at once
            self.workers.submit(DecoupledRun(self.batcher, decoupled_sender(self.pb, requests)).run, views)
            return None
        return [error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res)
                for res in self.batcher.run(views)]

    def finalize(self) -> None:
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.shutdown(wait=True)
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "shutdown"):
            llm.shutdown()


class TensorRTSession:
    """A TensorRT engine behind the two calls `OnnxParts.encode_images` makes on an onnxruntime
    session: `get_outputs()` and `run(output_names, feeds)` (numpy in, numpy out)."""

    def __init__(self, plan_path: str, device: int = 0):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        with open(plan_path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: not a TensorRT engine of this TensorRT version (rebuild it with trtexec "
                               "in this container)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64,
                       trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}

    def get_outputs(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self.output_names]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(
                self.device, self.dtypes[self.engine.get_tensor_dtype(name)])
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        result = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            result[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [result[n].float().cpu().numpy() for n in outputs]


def tensorrt_vision_parts(plan_path: str, meta_path: str, device: int = 0, max_patches: int | None = None) -> Any:
    """An `OnnxParts` whose vision graph is the TensorRT engine: the host-side inputs (rotary
    positions, interpolation, window order, attention biases) are `OnnxParts.vision_feeds`', the
    grouping `OnnxParts.encode_images`'; only the session differs. No ONNX graph is opened."""
    from coordexp.engines.onnx_engine import OnnxParts

    with open(meta_path, "r", encoding="utf-8") as f:
        meta = json.load(f)
    parts = OnnxParts.__new__(OnnxParts)
    parts.meta = meta
    parts.family = str(meta.get("family", "qwen3_vl"))
    parts.merge = int(meta["spatial_merge_size"])
    parts.np_dtype = np.float32
    parts.max_vision_patches = int(max_patches or 1024)
    parts.sessions = {"vision": TensorRTSession(plan_path, device)}
    return parts


class TrtVisionEncoderModel:
    """Triton Python-backend model `vision_encoder` running the TensorRT engine built by trtexec
    (vision_encoder/1/model.plan) with the ONNX step's batching and splitting (VisionEncoder)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from coordexp.serving.vision_encoder import VisionEncoder

        self.pb = pb_utils
        _, params, root, _ = model_args(args)
        folder = os.path.join(root, "vision_encoder", "1")
        device = int(args.get("model_instance_device_id") or 0)
        parts = tensorrt_vision_parts(resolve(root, params.get("plan") or "vision_encoder/1/model.plan"),
                                      resolve(root, params.get("onnx_meta") or os.path.join(folder, "onnx_meta.json")),
                                      device, int_param(params, "max_patches", 0) or None)
        self.encoder = VisionEncoder(parts, int_param(params, "merge_size", 0) or None)

    def execute(self, requests: list[Any]) -> list[Any]:
        from coordexp.wire import PIXEL_VALUES as PV

        views = [request_view(self.pb, r, (PV, IMAGE_GRID_THW)) for r in requests]
        return [error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res)
                for res in self.encoder.run(views)]
