"""`--backend torch`: validate, then write the repository (its step logic over the checkpoint the
repository copies answers the probe inputs as the PyTorch reference does), as the ONNX path does.

    export_torch(ckpt, repo, name, opts: TorchExportOptions, ...) -> {repo, validation, seconds}

The steps are the ones Triton runs (`coordexp.serving.torch_steps`: `VisionEncoder` and the
`LlmBatcher` `Generator` over `TorchParts`) with the repository's options, over the checkpoint
that is copied byte for byte to `<repo>/llm/1/hf`; the reference is `coordexp.engines.torch_engine.TorchEngine` (HF `generate`) on the
same device and dtype. fp32: any differing greedy token fails the export; bf16 / fp16: reported
as a warning (reduced precision may flip a near tie between batch shapes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from coordexp.generation import GenerationParams
from coordexp.prompt import PromptSpec
from coordexp.serving.torch_parts import DTYPES, TorchOptions

PROBE_SIZES = ((64, 48), (40, 72), (96, 96))


@dataclass(frozen=True)
class TorchExportOptions:
    """What only `--backend torch` takes."""

    parts: TorchOptions
    skip_validation: bool = False
    validation_steps: int = 16
    llm_batching: str = "inflight"  # the llm steps' scheduler: inflight (dynamic cache only) or static
    jump_forward: bool = True  # guided: grammar-forced tokens fed as one chunk (not with compile)
    prefix_cache: bool = True  # in flight: the shared prompt prefix's KV computed once (not for static batches)

    def serving(self, streaming: bool) -> Any:
        """The repository's ServingOptions."""
        from coordexp.export.repository import ServingOptions

        return ServingOptions(streaming=streaming, llm_batching=self.llm_batching, prefix_cache=self.prefix_cache,
                              jump_forward=self.jump_forward)


class TorchValidationError(RuntimeError):
    pass


def _step_outputs(hf_dir: str, opts: TorchOptions, batches: list[list[Any]], params: GenerationParams,
                  prompt: PromptSpec | None = None, batching: str = "static",
                  prefix_cache: bool = False) -> list[list[list[int]]]:
    """Greedy ids per probe through the repository's own vision + llm step logic (no server):
    `batching` "inflight": each row of a probe is its own request to the in-flight scheduler (they
    join one running batch, as concurrent requests do), else one static batch per probe. `prefix_cache`:
    the in-flight rows take the shared prompt prefix from the cache, as the served llm step does."""
    import numpy as np

    from coordexp.processor import CoordExpProcessor
    from coordexp.serving.llm import LlmItem
    from coordexp.serving.torch_parts import TorchParts
    from coordexp.serving.torch_steps import torch_batcher
    from coordexp.serving.vision_encoder import VisionEncoder

    parts = TorchParts(hf_dir, opts, prefix_cache=prefix_cache)  # read by TorchRows (in flight) only
    proc = CoordExpProcessor.from_pretrained(hf_dir)
    vision = VisionEncoder(parts, parts.merge)
    batcher = torch_batcher(parts, {"max_new_tokens": str(params.max_new_tokens)}, None)
    generate = batcher.generate if batching == "static" else _inflight_generate(parts, batcher)
    out = []
    for images in batches:
        enc = proc.encode(images, prompt)
        ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
        grid, pv = enc["image_grid_thw"].numpy(), enc["pixel_values"].numpy()
        counts = [int(np.prod(g)) for g in grid]
        cuts = np.cumsum(counts)[:-1]
        encoded = vision.encode(list(zip(np.split(pv, cuts), grid)))
        items = [LlmItem(ids[i][mask[i].astype(bool)], grid[i], e, d, params) for i, (e, d) in enumerate(encoded)]
        out.append([list(g) for g in generate(items)])
    return out


def _inflight_generate(parts: Any, batcher: Any) -> Callable[[list[Any]], list[list[int]]]:
    """items -> ids per item, each item one request to the in-flight scheduler over `TorchRows`."""
    import threading

    from coordexp import wire
    from coordexp.serving.inflight import scheduler_for
    from coordexp.serving.torch_parts import TorchRows

    def generate(items: list[Any]) -> list[list[int]]:
        scheduler = scheduler_for(TorchRows(parts, batcher.pad_token_id), parts.stop_ids, batcher, {})
        answers: dict[int, Any] = {}
        done = threading.Event()

        def sender(k: int) -> Callable[[Any, bool], None]:
            def send(res: Any, final: bool) -> None:
                if final:
                    answers[k] = res
                    if len(answers) == len(items):
                        done.set()
            return send

        try:
            with scheduler.cond:  # queued together: admitted in one prefill, then decoded side by side
                for k, it in enumerate(items):
                    scheduler.submit([it], sender(k), stream=False)
            if not done.wait(600):
                raise TorchValidationError("the in-flight scheduler did not answer the probes within 600 s")
        finally:
            scheduler.close()
        out = []
        for k in range(len(items)):
            res = answers[k]
            if isinstance(res, BaseException):
                raise TorchValidationError(f"the in-flight scheduler failed probe row {k}: {res}")
            out.append([int(t) for t in res[wire.OUTPUT_IDS][0][:int(res[wire.SEQUENCE_LENGTH][0, 0])]])
        return out

    return generate


def validate_torch(ckpt: str, opts: TorchOptions, steps: int = 16, log: Callable[[str], None] = print,
                   prompt: PromptSpec | None = None, batching: str = "static",
                   prefix_cache: bool = False) -> dict[str, Any]:
    """Probe images at batch 1 and a padded batch 3, encoded with `prompt` (the one the repository
    serves): the repository's steps (`batching`: its scheduler) vs HF generate."""
    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.export.validate import probe_images

    t0 = time.perf_counter()
    images = probe_images(PROBE_SIZES)
    batches = [[im] for im in images] + [images]
    params = GenerationParams(max_new_tokens=steps)
    prompt = prompt or PromptSpec()
    ref = TorchEngine(ckpt, prompt=prompt, device=opts.device, dtype=DTYPES[opts.dtype])
    expected = [ref.generate_ids(b, params)[0] for b in batches]
    del ref
    got = _step_outputs(ckpt, opts, batches, params, prompt, batching, prefix_cache)
    mismatches = [f"probe {p} row {r}: reference {e} served-step {g}"
                  for p, (eb, gb) in enumerate(zip(expected, got)) for r, (e, g) in enumerate(zip(eb, gb)) if e != g]
    compared = sum(len(r) for b in expected for r in b)
    report = {"reference": "torch (HF generate)", "device": opts.device, "dtype": opts.dtype, "batching": batching,
              "prefix_cache": prefix_cache and batching == "inflight",
              "probes": len(batches), "tokens_compared": compared, "mismatches": mismatches,
              "seconds": round(time.perf_counter() - t0, 2), "warnings": [], "prompt": prompt.to_dict()}
    if mismatches and opts.dtype == "fp32":
        raise TorchValidationError(f"{len(mismatches)} row(s) differ from the torch reference: {mismatches[0]}")
    if mismatches:
        report["warnings"].append(f"{len(mismatches)} row(s) differ in {opts.dtype} (reduced precision)")
    log(f"validation: {compared} greedy tokens compared over {len(batches)} probes, "
        f"{len(mismatches)} differing row(s)")
    return report


def export_torch(ckpt: str, repo: str, name: str, opts: TorchExportOptions, max_batch_size: int,
                 max_new_tokens: int, streaming: bool = True, log: Callable[[str], None] = print,
                 prompt: PromptSpec | None = None, replace_served: bool = False, decoding: Any = None,
                 prompt_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate (unless skipped) with `prompt`, then write the torch repository serving that prompt
    (`decoding`: the served defaults; `prompt_source`: where the prompt came from), with the validation
    in its manifest."""
    from coordexp.export.repository import write_repository

    t0 = time.perf_counter()
    prompt = prompt or PromptSpec()
    validation = (None if opts.skip_validation
                  else validate_torch(ckpt, opts.parts, opts.validation_steps, log, prompt=prompt,
                                      batching=opts.llm_batching, prefix_cache=opts.prefix_cache))
    path = write_repository(repo, name, None, ckpt, max_batch_size=max_batch_size, max_new_tokens=max_new_tokens,
                            prompt=prompt, backend="torch", torch=opts.parts,
                            options=opts.serving(streaming), validation=validation,
                            replace_served=replace_served, decoding=decoding, prompt_source=prompt_source)
    return {"repo": path, "validation": validation, "seconds": round(time.perf_counter() - t0, 2)}
