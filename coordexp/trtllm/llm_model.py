"""The `llm` step on TensorRT-LLM, behind the ONNX contract: `TritonPythonModel` and `TrtllmBatcher`.

`TritonPythonModel` (the `llm` model of a `--backend trtllm` repository) takes the ONNX `llm`
step's tensors - input_ids INT32 [B, T] (left padded), attention_mask, input_lengths,
image_grid_thw INT64 [B, 3], image_embeds / deepstack_embeds, the optional decoding inputs - plus
an optional pixel_values FP32 [B, P, D], and returns the same output_ids INT32 [B, S] (stop token
excluded, pad-filled) and sequence_length INT32 [B, 1]. Preprocess, postprocess and the client
cannot tell it from the ONNX Runtime one.

Generation is TensorRT-LLM's LLM API on its PyTorch backend (`tensorrt_llm.LLM`, built from
`llm/1/model.yaml`, the same keyword arguments the official `llmapi` Triton model reads).
`TrtllmBatcher` is the `coordexp.serving.llm.Generator` that wraps it: each row becomes the LLM
API's prompt dict (`coordexp.trtllm.inputs`: the prompt text and, vision "trtllm", the image
rebuilt from `pixel_values`; vision "tensorrt", the `vision_encoder` step's `image_embeds` as
`multi_modal_embeddings`, refused for rows whose grid is not the near-square one such a
processor guesses), and the request handling is the ONNX step's (`run_unary`, `DecoupledRun`).

Streaming (`llm_stream`, decoupled): every row goes to `LLM.generate_async(..., streaming=True)`
on one background event loop, so rows of later requests join the running batch (TensorRT-LLM's
in-flight batching) and each new token is sent back through `DecoupledRun`, as on the ONNX path.

`tensorrt_llm` and `torch` are imported in `initialize()` / when used only: the batcher is tested
against a stand-in LLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from coordexp.generation import GenerationParams
from coordexp.serving.common import (PROCESSOR_SUBDIR, RequestError, TritonRequestView, decoupled_sender,
                                     error_response, int_param, model_args, request_view, resolve, response)
from coordexp.serving.llm import (LLM_INPUTS, DecoupledRun, ProgressCallback, defaults_from_params, row_params,
                                  run_unary)
from coordexp.trtllm.inputs import PromptRebuilder, accepted_kwargs, near_square_grid, sampling_kwargs, strip_stop
from coordexp.trtllm.plan import MODEL_YAML, VISION_MODES
from coordexp.wire import (ATTENTION_MASK, DEEPSTACK_EMBEDS, IMAGE_EMBEDS, IMAGE_GRID_THW, INPUT_IDS, INPUT_LENGTHS,
                           PIXEL_VALUES, STREAM)

TRTLLM_INPUTS = (*LLM_INPUTS, PIXEL_VALUES)
LOG_PREFIX = "[coordexp.trtllm.llm_model]"


@dataclass
class TrtllmItem:
    """One row: unpadded prompt ids, its image (rebuilt) or embedding, its decoding parameters."""

    ids: np.ndarray  # [T_i] int64
    grid: np.ndarray  # [3] int64
    params: GenerationParams
    image: np.ndarray | None = None  # uint8 HWC (vision "trtllm")
    embeds: np.ndarray | None = None  # [N_i, H] (vision "tensorrt")


class TrtllmBatcher:
    """The TensorRT-LLM `Generator` (wraps `tensorrt_llm.LLM`): rows of several requests -> one LLM
    API `generate` call (one SamplingParams per row), or per-row streaming with `on_progress`."""

    def __init__(self, llm: Any, sampling_cls: Any, rebuilder: PromptRebuilder, vision: str = "trtllm",
                 defaults: GenerationParams | None = None, max_new_tokens: int | None = None, pad_token_id: int = 0,
                 stop_token_ids: Sequence[int] = (), log: Any = None):
        if vision not in VISION_MODES:
            raise ValueError(f"vision must be one of {VISION_MODES}, got {vision!r}")
        self.llm = llm
        self.sampling_cls = sampling_cls
        self.rebuilder = rebuilder
        self.vision = vision
        self.defaults = defaults or GenerationParams()
        self.limit = int(max_new_tokens or self.defaults.max_new_tokens)
        self.pad_token_id = int(pad_token_id)
        self.merge_size = int(rebuilder.merge_size)
        self.stop_token_ids = [int(s) for s in stop_token_ids] or [int(pad_token_id)]
        self.log = log or (lambda msg: None)
        self.calls: list[int] = []  # rows of every LLM API call (tests, stats)
        self._warned: set[str] = set()
        self._loop: Any = None

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log(msg)

    def run(self, views: Sequence[TritonRequestView]) -> list[dict[str, np.ndarray] | Exception]:
        """Several requests (one dynamic batch) -> their outputs (or their error): `run_unary`."""
        return run_unary(self, views)

    # ------------------------------------------------------------------ requests -> items
    def _vision_inputs(self, view: TritonRequestView, batch: int) -> np.ndarray:
        """pixel_values [B, P, D] (vision "trtllm") or image_embeds [B, N, H] (vision "tensorrt")."""
        if self.vision == "trtllm":
            pv = view.get(PIXEL_VALUES)
            if pv is None:
                raise RequestError(f"missing input tensor {PIXEL_VALUES!r} (this llm model rebuilds the image from it)")
            pv = np.asarray(pv, dtype=np.float32)
            if pv.ndim != 3 or pv.shape[0] != batch:
                raise RequestError(f"{PIXEL_VALUES} {list(pv.shape)}: expected [{batch}, P, D]")
            return pv
        embeds = np.asarray(view.need(IMAGE_EMBEDS), dtype=np.float32)
        if embeds.ndim != 3 or embeds.shape[0] != batch:
            raise RequestError(f"{IMAGE_EMBEDS} {list(embeds.shape)}: expected [{batch}, N, H]")
        deep = view.get(DEEPSTACK_EMBEDS)
        if deep is not None and np.asarray(deep).ndim == 4 and np.asarray(deep).shape[1] > 0:
            raise RequestError("deepstack features cannot be handed to the LLM API; this repository cannot "
                               "serve Qwen3-VL with a separate vision engine")
        return embeds

    def _item(self, i: int, row: np.ndarray, grid: np.ndarray, params: GenerationParams,
              vision: np.ndarray) -> TrtllmItem:
        if params.guided:
            raise RequestError("guided decoding is not available in this llm model; send guided=false")
        n = int(np.prod(grid)) // (self.merge_size ** 2)
        placeholders = int((row == self.rebuilder.image_token_id).sum())
        if placeholders != n:
            raise RequestError(f"{INPUT_IDS}[{i}] has {placeholders} image placeholders, {IMAGE_GRID_THW}[{i}] "
                               f"needs {n}")
        if self.vision == "trtllm":
            return TrtllmItem(row, grid, params, image=self.rebuilder.image(vision[i], grid))
        if n > vision.shape[1]:
            raise RequestError(f"{IMAGE_GRID_THW}[{i}] needs {n} image tokens, got {vision.shape[1]}")
        if near_square_grid(n, self.merge_size) != [int(v) for v in grid]:
            raise RequestError(f"image grid {grid.tolist()} is not the near-square grid the LLM API assumes "
                               "for external embeddings; its M-RoPE positions would be wrong (serve this "
                               "checkpoint with --trtllm-vision trtllm)")
        return TrtllmItem(row, grid, params, embeds=vision[i, :n])

    def items_of(self, view: TritonRequestView) -> list[TrtllmItem]:
        ids = np.asarray(view.need(INPUT_IDS))
        mask = np.asarray(view.need(ATTENTION_MASK))
        grid = np.asarray(view.need(IMAGE_GRID_THW), dtype=np.int64)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise RequestError(f"{INPUT_IDS} {list(ids.shape)} / {ATTENTION_MASK} {list(mask.shape)}: expected [B, T]")
        batch = ids.shape[0]
        if grid.shape != (batch, 3):
            raise RequestError(f"{IMAGE_GRID_THW} {list(grid.shape)}: expected [{batch}, 3]")
        vision = self._vision_inputs(view, batch)
        lengths = view.get(INPUT_LENGTHS)
        params_of = row_params(view, batch, self.defaults, self.limit)
        items = []
        for i in range(batch):
            row = ids[i][mask[i].astype(bool)].astype(np.int64)
            if lengths is not None and int(np.asarray(lengths).reshape(batch, -1)[i, 0]) != row.shape[0]:
                raise RequestError(f"{INPUT_LENGTHS}[{i}] does not match {ATTENTION_MASK}[{i}]")
            items.append(self._item(i, row, grid[i], params_of(i), vision))
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
                            f"{LOG_PREFIX} SamplingParams of this TensorRT-LLM has no {', '.join(dropped)}")
        return self.sampling_cls(**kw)

    def _event_loop(self) -> Any:
        """The one loop every row runs on (a daemon thread), started on first use."""
        import asyncio
        import threading

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="trtllm-stream", daemon=True).start()
        return self._loop

    async def _rows(self, items: Sequence[TrtllmItem], on_progress: ProgressCallback | None
                    ) -> list[list[int] | Exception]:
        """Every row through `LLM.generate_async` at once (as the official llmapi model schedules),
        so the rows join TensorRT-LLM's in-flight batch; `on_progress`: streamed, one call per token."""
        import asyncio

        async def one(k: int, it: TrtllmItem) -> list[int]:
            ids: list[int] = []
            finished = False
            async for out in self.llm.generate_async(self.llm_input(it), self.sampling(it.params),
                                                     streaming=on_progress is not None):
                ids = strip_stop(out.outputs[0].token_ids, self.stop_token_ids)  # cumulative in streaming mode
                finished = bool(getattr(out, "finished", False))
                if on_progress is not None:
                    on_progress({k: ids}, [k] if finished else [])
                got = getattr(out, "prompt_token_ids", None)
                if got is not None and len(got) != len(it.ids):
                    self._warn_once("prompt", f"{LOG_PREFIX} TensorRT-LLM tokenized a rebuilt prompt to "
                                              f"{len(got)} ids, the preprocess step to {len(it.ids)}")
            if on_progress is not None and not finished:  # an iterator that ends unfinished still ends the row
                on_progress({k: ids}, [k])
            return ids

        self.calls.append(len(items))
        got = await asyncio.gather(*(one(k, it) for k, it in enumerate(items)), return_exceptions=True)
        return [g if isinstance(g, (list, Exception)) else RuntimeError(str(g)) for g in got]

    def generate(self, items: Sequence[TrtllmItem], on_progress: ProgressCallback | None = None
                 ) -> list[list[int] | Exception]:
        """All rows scheduled with `LLM.generate_async` on the batcher's loop (never the blocking
        `LLM.generate()`); with `on_progress` (the decoupled model) streamed per token."""
        import asyncio

        if not items:
            return []
        return asyncio.run_coroutine_threadsafe(self._rows(items, on_progress), self._event_loop()).result()


# ---------------------------------------------------------------------------- the Triton model
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


def load_llm(llm_args: dict[str, Any]) -> tuple[Any, Any]:
    """(tensorrt_llm.LLM(**llm_args), tensorrt_llm.SamplingParams); a clear error outside the container."""
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
    return LLM(**llm_args), SamplingParams


class TritonPythonModel:
    """Triton Python-backend model `llm` (and `llm_stream`, decoupled) of a TensorRT-LLM repository."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config, params, root, self.decoupled = model_args(args)
        llm_args = read_llm_args(resolve(root, params.get("model_yaml") or MODEL_YAML), root)
        rebuilder = PromptRebuilder.from_dir(resolve(root, params.get("processor_dir") or PROCESSOR_SUBDIR))
        defaults = defaults_from_params(params)
        stops = json.loads(params["stop_token_ids"]) if params.get("stop_token_ids") else []
        self.llm, sampling_cls = load_llm(llm_args)
        logger = getattr(pb_utils, "Logger", None)
        self.batcher = TrtllmBatcher(
            self.llm, sampling_cls, rebuilder, vision=params.get("vision") or "trtllm",
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
                for res in run_unary(self.batcher, views)]

    def finalize(self) -> None:
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.shutdown(wait=True)
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "shutdown"):
            llm.shutdown()
