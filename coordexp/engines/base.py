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


def append_tokens(rows: Sequence[int], tokens: Sequence[int], generated: list[list[int]],
                  seqs: list[list[int]] | None, stop: Any, params: GenerationParams) -> tuple[list[int], list[int]]:
    """One decoding step's bookkeeping for the rows still running: a stop token ends its row (unless
    `ignore_eos`), any other is appended (to `seqs` too, the repetition-penalty history) and the row
    ends at `max_new_tokens`. Returns (rows that finished, positions in `rows` that go on)."""
    finished, keep = [], []
    for k, (b, tok) in enumerate(zip(rows, tokens)):
        if tok in stop and not params.ignore_eos:
            finished.append(b)
            continue
        generated[b].append(int(tok))
        if seqs is not None:
            seqs[b].append(int(tok))
        if len(generated[b]) < params.max_new_tokens:
            keep.append(k)
        else:
            finished.append(b)
    return finished, keep
