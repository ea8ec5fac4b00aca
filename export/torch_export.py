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


class TorchValidationError(RuntimeError):
    pass


def _step_outputs(hf_dir: str, opts: TorchOptions, batches: list[list[Any]], params: GenerationParams,
                  prompt: PromptSpec | None = None) -> list[list[list[int]]]:
    """Greedy ids per probe through the repository's own vision + llm step logic (no server)."""
    import numpy as np

    from coordexp.processor import CoordExpProcessor
    from coordexp.serving.llm import LlmItem
    from coordexp.serving.torch_parts import TorchParts
    from coordexp.serving.torch_steps import torch_batcher
    from coordexp.serving.vision_encoder import VisionEncoder

    parts = TorchParts(hf_dir, opts)
    proc = CoordExpProcessor.from_pretrained(hf_dir)
    vision = VisionEncoder(parts, parts.merge)
    batcher = torch_batcher(parts, {"max_new_tokens": str(params.max_new_tokens)}, None)
    out = []
    for images in batches:
        enc = proc.encode(images, prompt)
        ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
        grid, pv = enc["image_grid_thw"].numpy(), enc["pixel_values"].numpy()
        counts = [int(np.prod(g)) for g in grid]
        cuts = np.cumsum(counts)[:-1]
        encoded = vision.encode(list(zip(np.split(pv, cuts), grid)))
        items = [LlmItem(ids[i][mask[i].astype(bool)], grid[i], e, d, params) for i, (e, d) in enumerate(encoded)]
        out.append([list(g) for g in batcher.generate(items)])
    return out


def validate_torch(ckpt: str, opts: TorchOptions, steps: int = 16, log: Callable[[str], None] = print,
                   prompt: PromptSpec | None = None) -> dict[str, Any]:
    """Probe images at batch 1 and a padded batch 3, encoded with `prompt` (the one the repository
    serves): the repository's steps vs HF generate."""
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
    got = _step_outputs(ckpt, opts, batches, params, prompt)
    mismatches = [f"probe {p} row {r}: reference {e} served-step {g}"
                  for p, (eb, gb) in enumerate(zip(expected, got)) for r, (e, g) in enumerate(zip(eb, gb)) if e != g]
    compared = sum(len(r) for b in expected for r in b)
    report = {"reference": "torch (HF generate)", "device": opts.device, "dtype": opts.dtype,
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
    from coordexp.export.repository import ServingOptions, write_repository

    t0 = time.perf_counter()
    prompt = prompt or PromptSpec()
    validation = (None if opts.skip_validation
                  else validate_torch(ckpt, opts.parts, opts.validation_steps, log, prompt=prompt))
    path = write_repository(repo, name, None, ckpt, max_batch_size=max_batch_size, max_new_tokens=max_new_tokens,
                            prompt=prompt, backend="torch", torch=opts.parts,
                            options=ServingOptions(streaming=streaming), validation=validation,
                            replace_served=replace_served, decoding=decoding, prompt_source=prompt_source)
    return {"repo": path, "validation": validation, "seconds": round(time.perf_counter() - t0, 2)}
