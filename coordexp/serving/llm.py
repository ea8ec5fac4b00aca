"""The `llm` model: prompt ids + image embeddings -> generated ids (ONNX Runtime decode loop, KV cache).

Per request:
  input_ids INT32 [B, T] (left padded), attention_mask INT32 [B, T], input_lengths INT32 [B, 1],
  image_grid_thw INT64 [B, 3], image_embeds FP32 [B, N, H], deepstack_embeds FP32 [B, L, N, H],
  optional: request_output_len INT32, temperature FP32, runtime_top_p FP32, repetition_penalty FP32,
            random_seed UINT64, guided BOOL, ignore_eos BOOL (each [B, 1])
  -> output_ids INT32 [B, S] (stop token excluded, padded with the pad id), sequence_length INT32 [B, 1],
     guided_closed_early BOOL [B, 1] (guided decoding had to close the answer early to fit max_tokens)

Decoupled (`model_transaction_policy { decoupled: true }`, the `llm_stream` model of the streaming
ensemble): every request gets its responses through its response sender. With `stream` true, one
response per decoding step that advanced it, each carrying the ids generated so far (cumulative, so
the postprocess step parses every partial answer and the last response equals the unary answer);
the last one is flagged final. Without `stream`, one final response.

With the config parameter `batching` = "inflight" (`ServingOptions.llm_batching`), `execute()`
queues its requests to `coordexp.serving.inflight.InflightScheduler` and returns at once: rows join
the running batch at the next decoding step and leave when done (same answers, same responses).
Otherwise ("static", the baseline) batching is per `execute()`:

Triton's dynamic batcher hands `execute()` several requests at once; every row of every request
becomes one item, the items are grouped by their decoding parameters (same params -> one
left-padded batch, one `OnnxParts.generate` call, in arrival order) and the results are split back.
Decoding is exactly the in-process ONNX engine's (same `OnnxParts.generate`, same params), so a
served greedy answer equals the in-process one token for token.

The request handling (`run_unary`, `DecoupledRun`) depends only on the `Generator` interface: "these
rows of this request; generate these rows with their params, report each step". `LlmBatcher` is
the ONNX Runtime one (it wraps `OnnxParts`); `coordexp.trtllm.llm_model.TrtllmBatcher` the
TensorRT-LLM one (it wraps `tensorrt_llm.LLM`).
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from coordexp.generation import GenerationParams
from coordexp import wire
from coordexp.decoding.loop import closed_early
from coordexp.serving.common import (ONNX_SUBDIR, Generated, LlmItem, RequestError, TritonRequestView,
                                     decoupled_sender, error_response, int_param, model_args, open_quiet_sessions,
                                     outputs_of, prompt_batch, prompt_lengths, request_view, resolve, response, rows,
                                     wants_stream)
from coordexp.wire import (ATTENTION_MASK, DEEPSTACK_EMBEDS, GUIDED, IGNORE_EOS, IMAGE_EMBEDS, IMAGE_GRID_THW,
                           INPUT_IDS, INPUT_LENGTHS, RANDOM_SEED, REPETITION_PENALTY, REQUEST_OUTPUT_LEN, RUNTIME_TOP_P,
                           TEMPERATURE)
from coordexp.serving.vision_encoder import merge_size_of

LLM_INPUTS = wire.input_names(wire.LLM_STREAM)  # llm reads the same, less `stream`
# (item index -> ids so far, item indices that finished at this step)
ProgressCallback = Callable[[dict[int, list[int]], list[int]], None]
# The optional decoding inputs of the llm step, in params_for_row's argument order.
DECODING_OPTIONS = (REQUEST_OUTPUT_LEN, TEMPERATURE, RUNTIME_TOP_P, REPETITION_PENALTY, RANDOM_SEED, GUIDED,
                    IGNORE_EOS)


@runtime_checkable
class Generator(Protocol):
    """A back end of the llm step, all the request handling (`run_unary`, `DecoupledRun`) needs."""

    pad_token_id: int

    def items_of(self, view: TritonRequestView) -> list[Any]:
        """One request -> its rows (the back end's items, each with its GenerationParams);
        RequestError when the request is malformed."""
        ...

    def generate(self, items: Sequence[Any], on_progress: ProgressCallback | None = None
                 ) -> list[list[int] | Exception]:
        """Generate these rows with their params -> generated ids per row (or the exception of its
        batch), in input order. `on_progress(partial, finished)`: after every decoding step, item
        indices as in `items` (the decoupled model streams from it)."""
        ...


def row_params(view: TritonRequestView, batch: int, defaults: GenerationParams, limit: int
               ) -> Callable[[int], GenerationParams]:
    """Row index -> that row's GenerationParams (the request's optional decoding inputs, parsed now)."""
    opt = {name: rows(view.get(name), batch, name) for name in DECODING_OPTIONS}
    return lambda i: params_for_row(defaults, limit, *(opt[name][i] for name in DECODING_OPTIONS))


def params_for_row(defaults: GenerationParams, limit: int, max_tokens: Any = None, temperature: Any = None,
                   top_p: Any = None, repetition_penalty: Any = None, seed: Any = None, guided: Any = None,
                   ignore_eos: Any = None) -> GenerationParams:
    """A row's GenerationParams: the repository defaults overridden by the inputs that were sent."""
    kw: dict[str, Any] = {}

    def f(v: Any) -> float:
        # FP32 on the wire: 0.9 arrives as 0.89999998; take the shortest decimal that rounds to the
        # same float32 (what the client typed), so served decoding equals in-process decoding.
        return float(str(np.float32(v))) if isinstance(v, np.floating) and v.dtype == np.float32 else float(v)

    if max_tokens is not None:
        n = int(max_tokens)
        if n < 1:
            raise RequestError(f"max_tokens must be >= 1, got {n}")
        if n > limit:
            raise RequestError(f"max_tokens={n} exceeds this repository's limit of {limit} new tokens")
        kw["max_new_tokens"] = n
    if temperature is not None:
        kw["temperature"] = f(temperature)
    if top_p is not None:
        kw["top_p"] = f(top_p)
    if repetition_penalty is not None:
        kw["repetition_penalty"] = f(repetition_penalty)
    if seed is not None:
        kw["seed"] = int(seed)
    if guided is not None:
        kw["guided"] = bool(guided)
    if ignore_eos is not None:
        kw["ignore_eos"] = bool(ignore_eos)
    try:
        return replace(defaults, **kw)
    except ValueError as e:  # GenerationParams validation
        raise RequestError(str(e)) from None


def _renumbered(on_progress: ProgressCallback, chunk: list[int]) -> Callable[[list[list[int]], list[int]], None]:
    """A group's per-step callback (rows numbered within the group) -> `on_progress` (item indices)."""
    def step(generated: list[list[int]], finished: list[int]) -> None:
        on_progress({k: generated[i] for i, k in enumerate(chunk)}, [chunk[b] for b in finished])
    return step


def run_unary(generator: Generator, views: Sequence[TritonRequestView]) -> list[dict[str, np.ndarray] | Exception]:
    """Several requests (one dynamic batch) -> their outputs (or their error), one generate call."""
    per_request: list[list[Any] | Exception] = []
    for view in views:
        try:
            per_request.append(generator.items_of(view))
        except Exception as e:
            per_request.append(e)
    flat = [it for items in per_request if not isinstance(items, Exception) for it in items]
    generated = generator.generate(flat) if flat else []
    results: list[dict[str, np.ndarray] | Exception] = []
    pos = 0
    for items in per_request:
        if isinstance(items, Exception):
            results.append(items)
            continue
        mine = generated[pos:pos + len(items)]
        pos += len(items)
        err = next((g for g in mine if isinstance(g, Exception)), None)
        results.append(err if err is not None
                       else outputs_of(mine, generator.pad_token_id, prompt_lengths(items)))  # type: ignore[arg-type]
    return results


class LlmBatcher:
    """The ONNX Runtime `Generator` (wraps `OnnxParts`): rows of several requests -> one generate
    call per distinct set of decoding parameters."""

    def __init__(self, parts: Any, defaults: GenerationParams | None = None, max_new_tokens: int | None = None,
                 pad_token_id: int = 0, merge_size: int | None = None, max_batch_size: int | None = None,
                 guided_hook: Callable[[GenerationParams, int], Any] | None = None):
        self.parts = parts
        self.guided_hook = guided_hook  # (params, batch) -> OnnxParts logits hook
        self.defaults = defaults or GenerationParams()
        self.limit = int(max_new_tokens or self.defaults.max_new_tokens)
        self.pad_token_id = int(pad_token_id)
        self.merge_size = int(merge_size or merge_size_of(getattr(parts, "meta", {}) or {}))
        self.max_batch_size = max_batch_size
        self.calls: list[int] = []  # batch size of every generate call (tests, stats)

    # ------------------------------------------------------------------ requests -> items
    def items_of(self, view: TritonRequestView) -> list[LlmItem]:
        ids = np.asarray(view.need(INPUT_IDS))
        mask = np.asarray(view.need(ATTENTION_MASK))
        grid = np.asarray(view.need(IMAGE_GRID_THW), dtype=np.int64)
        embeds = np.asarray(view.need(IMAGE_EMBEDS), dtype=np.float32)
        deep = np.asarray(view.need(DEEPSTACK_EMBEDS), dtype=np.float32)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise RequestError(f"{INPUT_IDS} {list(ids.shape)} / {ATTENTION_MASK} {list(mask.shape)}: expected [B, T]")
        batch = ids.shape[0]
        if grid.shape != (batch, 3) or embeds.ndim != 3 or embeds.shape[0] != batch or deep.ndim != 4 \
                or deep.shape[0] != batch:
            raise RequestError(f"inconsistent image tensors for a batch of {batch}: {IMAGE_GRID_THW} "
                               f"{list(grid.shape)}, {IMAGE_EMBEDS} {list(embeds.shape)}, {DEEPSTACK_EMBEDS} "
                               f"{list(deep.shape)}")
        lengths = view.get(INPUT_LENGTHS)
        params_of = row_params(view, batch, self.defaults, self.limit)
        items = []
        for i in range(batch):
            keep = mask[i].astype(bool)
            row = ids[i][keep].astype(np.int64)
            if lengths is not None and int(np.asarray(lengths).reshape(batch, -1)[i, 0]) != row.shape[0]:
                raise RequestError(f"{INPUT_LENGTHS}[{i}] does not match {ATTENTION_MASK}[{i}]")
            n = int(np.prod(grid[i])) // (self.merge_size ** 2)
            if n > embeds.shape[1] or n > deep.shape[2]:
                raise RequestError(f"{IMAGE_GRID_THW}[{i}] needs {n} image tokens, got {embeds.shape[1]}")
            params = params_of(i)
            max_pos = int((getattr(self.parts, "meta", None) or {}).get("max_position_embeddings") or 0)
            if max_pos and row.shape[0] + params.max_new_tokens > max_pos:
                raise RequestError(f"prompt_too_long: the prompt is {row.shape[0]} tokens; with max_tokens "
                                   f"{params.max_new_tokens} that exceeds the model's {max_pos} positions")
            items.append(LlmItem(row, grid[i], embeds[i, :n], deep[i, :, :n], params))
        return items

    # ------------------------------------------------------------------ generation
    def generate_group(self, items: Sequence[LlmItem],
                       on_step: Callable[[list[list[int]], list[int]], None] | None = None) -> list[list[int]]:
        """Items sharing their params -> one left-padded batch -> generated ids per item
        (`on_step`: see `OnnxParts.generate`, rows numbered within this group)."""
        params = items[0].params
        input_ids, attention_mask, grid, embeds, deep = prompt_batch(items, self.pad_token_id)
        hook = None
        if params.guided:
            if self.guided_hook is None:
                raise RequestError("guided decoding is not available in this llm model; send guided=false")
            hook = self.guided_hook(params, len(items))
        self.calls.append(len(items))
        kw = {}
        if on_step is not None:
            ended: dict[int, Generated] = {}

            def flagged(generated: list[list[int]], finished: list[int]) -> None:
                # a finished row's ids carry its guided flag, final from then on
                for b in finished:
                    ended[b] = Generated.of(generated[b], closed_early(hook, b))
                on_step([ended.get(b, g) for b, g in enumerate(generated)], finished)
            kw["on_step"] = flagged
        out = self.parts.generate(input_ids, attention_mask, grid, embeds, deep, params, logits_hook=hook, **kw)
        if len(out) != len(items):
            raise RuntimeError(f"generate returned {len(out)} rows for {len(items)}")
        return [Generated.of(row, closed_early(hook, b)) for b, row in enumerate(out)]

    def generate(self, items: Sequence[LlmItem], on_progress: ProgressCallback | None = None
                 ) -> list[list[int] | Exception]:
        """All items -> generated ids (or the exception of their group), in input order.
        `on_progress(partial, finished)`: after every decoding step, item indices as in `items`."""
        groups: dict[str, list[int]] = {}
        for k, it in enumerate(items):
            groups.setdefault(json.dumps(it.params.to_dict(), sort_keys=True), []).append(k)
        results: list[list[int] | Exception] = [RuntimeError("not run")] * len(items)
        for idx in groups.values():
            size = self.max_batch_size or len(idx)
            for start in range(0, len(idx), size):
                chunk = idx[start:start + size]
                step_cb = _renumbered(on_progress, chunk) if on_progress is not None else None
                try:
                    outs = self.generate_group([items[k] for k in chunk], step_cb)
                except Exception as e:  # one failing group must not fail the others
                    outs = [e] * len(chunk)
                for k, o in zip(chunk, outs):
                    results[k] = o
        return results

    def outputs(self, generated: Sequence[list[int]]) -> dict[str, np.ndarray]:
        """One request's rows -> its output tensors (`outputs_of`)."""
        return outputs_of(generated, self.pad_token_id)

    def run(self, views: Sequence[TritonRequestView]) -> list[dict[str, np.ndarray] | Exception]:
        """Several requests (one dynamic batch) -> their outputs (or their error): `run_unary`."""
        return run_unary(self, views)


class DecoupledRun:
    """One `execute()` of the decoupled llm: requests -> responses through `send(request_index,
    outputs_or_error, final)`, streamed per decoding step for the requests that asked for it.
    Any `Generator` (ONNX Runtime or TensorRT-LLM) drives it."""

    def __init__(self, generator: Generator, send: Callable[[int, dict[str, np.ndarray] | Exception, bool], None]):
        self.generator = generator
        self.send = send

    def run(self, views: Sequence[TritonRequestView]) -> None:
        owner: list[int] = []  # item index -> request index
        first: dict[int, int] = {}  # request index -> its first item index
        count: dict[int, int] = {}
        flat: list[LlmItem] = []
        streams: dict[int, bool] = {}
        for r, view in enumerate(views):
            try:
                items = self.generator.items_of(view)
                streams[r] = wants_stream(view)
            except Exception as e:
                self.send(r, e, True)
                continue
            first[r], count[r] = len(flat), len(items)
            flat.extend(items)
            owner.extend([r] * len(items))
        if not flat:
            return
        lengths = prompt_lengths(flat)
        prompt_of = (lambda r: lengths[first[r]:first[r] + count[r]])  # noqa: E731
        partial: list[list[int]] = [[] for _ in flat]
        remaining = dict(count)
        done: set[int] = set()  # requests whose final response went out

        def on_progress(ids: dict[int, list[int]], finished: list[int]) -> None:
            touched = {owner[k] for k in ids}
            for k, g in ids.items():
                partial[k] = g
            for k in finished:
                remaining[owner[k]] -= 1
            for r in sorted(touched):
                if r in done:
                    continue
                final = remaining[r] == 0
                if final or streams[r]:
                    self.send(r, outputs_of(partial[first[r]:first[r] + count[r]], self.generator.pad_token_id,
                                            prompt_of(r)), final)
                    if final:
                        done.add(r)

        results = self.generator.generate(flat, on_progress)
        for r in first:
            if r in done:
                continue
            mine = results[first[r]:first[r] + count[r]]
            err = next((g for g in mine if isinstance(g, Exception)), None)
            self.send(r, err if err is not None
                      else outputs_of(mine, self.generator.pad_token_id, prompt_of(r)),  # type: ignore[arg-type]
                      True)
            done.add(r)


def defaults_from_params(params: dict[str, str]) -> GenerationParams:
    """The decoding defaults the repository writer stored in the llm config (`decoding_defaults`)."""
    raw = params.get("decoding_defaults")
    return GenerationParams(**json.loads(raw)) if raw else GenerationParams()


def guided_hook_factory(parts: Any, prompt_json: str | None) -> Callable[[GenerationParams, int], Any]:
    """Guided decoding as the in-process OnnxEngine does it (`coordexp.guided.guided_logits_hook`),
    loaded on the first guided request; a clear per-request error when it is not installed."""
    from coordexp.prompt import PromptSpec

    prompt = PromptSpec.from_dict(json.loads(prompt_json)) if prompt_json else PromptSpec()
    state: dict[str, Any] = {}

    def make(params: GenerationParams, batch: int) -> Any:
        try:
            from coordexp.guided import guided_logits_hook
        except ImportError as e:
            raise RequestError(f"guided decoding is not available on this server ({e}); send guided=false") from None
        if "processor" not in state:
            from coordexp.processor import CoordExpProcessor

            state["processor"] = CoordExpProcessor.from_pretrained(str(parts.onnx_dir))
        return guided_logits_hook(state["processor"], prompt, params, batch=batch)

    return make


class TritonPythonModel:
    """Triton Python-backend model `llm` / `llm_stream` over ONNX Runtime. The step is the same for
    every runtime: `coordexp.serving.torch_steps.TorchLlmModel` overrides `load` and `decode_rows`."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config, params, root, self.decoupled = model_args(args)
        parts, self.batcher = self.load(config, params, root)
        self.scheduler = None
        # in-flight batching (coordexp.serving.inflight): the decoupled llm_stream, and the unary llm
        # too when its config asks (its requests then get their one response through the sender)
        if params.get("batching") == "inflight":
            from coordexp.serving.inflight import scheduler_for

            self.scheduler = scheduler_for(self.decode_rows(parts), parts.stop_ids, self.batcher, config)

    def load(self, config: dict[str, Any], params: dict[str, str], root: str) -> tuple[Any, "LlmBatcher"]:
        """The model runtime (`OnnxParts`) and the static batcher over it."""
        from coordexp.engines.onnx_engine import OnnxParts

        parts = OnnxParts(resolve(root, params.get("onnx_dir") or ONNX_SUBDIR),
                          threads=int_param(params, "intra_op_threads", 0) or None,
                          prefix_cache=params.get("prefix_cache") == "true",
                          jump_forward=params.get("jump_forward") == "true")
        open_quiet_sessions(parts, ("embed", "decoder"), spin=params.get("ort_spin") == "true")
        defaults = defaults_from_params(params)
        return parts, LlmBatcher(parts, defaults, int_param(params, "max_new_tokens", defaults.max_new_tokens),
                                 pad_token_id=int_param(params, "pad_token_id", 0),
                                 merge_size=int_param(params, "merge_size", 0) or None,
                                 max_batch_size=int(config.get("max_batch_size") or 0) or None,
                                 guided_hook=guided_hook_factory(parts, params.get("prompt_json")))

    def decode_rows(self, parts: Any) -> Any:
        """The in-flight scheduler's `DecodeRows` over the runtime."""
        from coordexp.engines.onnx_engine import OnnxRows

        return OnnxRows(parts, self.batcher.pad_token_id)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.scheduler is not None:
            from coordexp.serving.inflight import submit_requests

            submit_requests(self.pb, self.scheduler, self.batcher, requests, LLM_INPUTS)
            return None
        views = [request_view(self.pb, r, LLM_INPUTS) for r in requests]
        if self.decoupled:
            DecoupledRun(self.batcher, decoupled_sender(self.pb, requests)).run(views)
            return None
        out = []
        for res in run_unary(self.batcher, views):
            out.append(error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res))
        return out

    def finalize(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()
