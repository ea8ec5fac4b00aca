"""The PyTorch reference engine: the checkpoint run through HF `generate`, as CoordExp users do."""
from __future__ import annotations

import os
from typing import Any, Sequence

from coordexp.engines.base import results_from_ids
from coordexp.generation import EngineDefaults, GenerationParams, GenerationResult, RequestPrompt
from coordexp.checkpoint import checkpoint_error
from coordexp.prompt import PromptSpec


class TorchEngine(EngineDefaults):
    name = "torch"

    def __init__(self, ckpt: str, prompt: PromptSpec | None = None, device: str = "cpu", dtype: str = "float32",
                 threads: int | None = None, image_max_pixels: int | None = None):
        import torch
        from transformers import AutoModelForImageTextToText

        from coordexp.processor import CoordExpProcessor

        err = checkpoint_error(ckpt)
        if err:
            raise FileNotFoundError(err)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.ckpt = ckpt
        self._sha256: str | None = None
        self.device = device
        self.dtype = dtype
        self.prompt = prompt or PromptSpec()
        self.processor = CoordExpProcessor.from_pretrained(ckpt, image_max_pixels=image_max_pixels)
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would mix into run output
        self.model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device).eval()

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        return {"engine": self.name, "checkpoint": os.path.abspath(self.ckpt), "device": self.device,
                "dtype": self.dtype, "torch": torch.__version__, "transformers": transformers.__version__}

    def checkpoint_sha256(self) -> str:
        from coordexp.checkpoint import checkpoint_digest

        if self._sha256 is None:
            self._sha256 = checkpoint_digest(self.ckpt).sha256
        return self._sha256

    def generate_ids(self, images: Sequence[Any], params: GenerationParams, prompt: RequestPrompt | None = None
                     ) -> tuple[list[list[int]], int]:
        """Greedy/sampled generated ids per image (stop token excluded) and the padded prompt length."""
        torch = self.torch
        spec = prompt.apply(self.prompt) if prompt is not None else self.prompt
        if params.guided:
            from coordexp.guided import guided_logits_processor  # optional dependency (xgrammar)

            self.guided = guided_logits_processor(self.processor, spec, params, batch=len(images))
            logits_processor = [self.guided]
        else:
            self.guided = logits_processor = None
        enc = self.processor.encode(list(images), spec)
        enc = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in enc.items()}
        stop_ids = list(self.processor.stop_token_ids)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=stop_ids,
            pad_token_id=self.processor.pad_token_id,
        )
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_new_tokens
        if logits_processor:
            kwargs["logits_processor"] = logits_processor
        torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        rows = []
        for row in out[:, prompt_len:].tolist():
            ids = []
            for t in row:
                if t in stop_ids and not params.ignore_eos:
                    break
                ids.append(t)
            rows.append(ids)
        return rows, prompt_len

    def generate_batch(self, images: Sequence[Any], params: GenerationParams, prompt: RequestPrompt | None = None
                       ) -> list[GenerationResult]:
        rows, prompt_len = self.generate_ids(images, params, prompt)
        return results_from_ids(self.processor, rows, prompt_len, params, self.guided)
