"""Engine helpers shared by the torch and ONNX engines."""
from __future__ import annotations

from typing import Any, Sequence

from coordexp.generation import GenerationParams, GenerationResult


def results_from_ids(processor: Any, rows: Sequence[list[int]], prompt_len: int, params: GenerationParams,
                     guided: Any = None) -> list[GenerationResult]:
    """Generated ids per row -> results; `guided` (a guided-decoding adapter) adds its per-row
    facts such as `guided_closed_early`."""
    extras = guided.extras() if guided is not None else [{}] * len(rows)
    return [GenerationResult(text=processor.decode(ids), token_ids=list(ids), prompt_tokens=prompt_len,
                             finish_reason="length" if len(ids) >= params.max_new_tokens else "stop",
                             extra=dict(extra))
            for ids, extra in zip(rows, extras)]
