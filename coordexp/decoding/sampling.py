"""The token choice of every decode loop (ONNX Runtime and PyTorch, static and in-flight), in numpy,
with transformers' `generate` semantics:

- greedy (`temperature == 0`): argmax, ties to the lowest token id (like `torch.argmax`);
- `repetition_penalty` (HF `RepetitionPenaltyLogitsProcessor`): every id already in the row, prompt
  and padding included, has its logit divided by the penalty when positive, multiplied when
  negative; applied in greedy mode too;
- sampling: temperature, then top-p (HF `TopPLogitsWarper`, at least one token kept), then a draw
  from the softmax with the row's own numpy `Generator` (seeded with `params.seed`), so a row's
  output depends only on its own inputs and the seed, not on the batch it ran in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from coordexp.generation import GenerationParams


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def apply_repetition_penalty(logits: np.ndarray, seqs: Sequence[np.ndarray], penalty: float) -> np.ndarray:
    """HF `RepetitionPenaltyLogitsProcessor` on each row (on a copy)."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for i, seq in enumerate(seqs):
        ids = np.unique(np.asarray(seq, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < out.shape[1])]
        s = out[i, ids]
        out[i, ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return out


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """HF `TopPLogitsWarper` (min_tokens_to_keep=1): remove tokens whose ascending cumulative
    probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    out = logits.copy()
    for i in range(out.shape[0]):
        order = np.argsort(out[i], kind="stable")  # ascending
        probs = softmax(out[i, order][None])[0]
        remove = np.cumsum(probs) <= (1 - top_p)
        remove[-1] = False
        out[i, order[remove]] = -np.inf
    return out


def choose_tokens(logits: np.ndarray, seqs: Sequence[np.ndarray], params: GenerationParams,
                  rngs: Sequence[np.random.Generator | None]) -> np.ndarray:
    """The next token of each row `[n]` from its logits `[n, V]` (rows sharing `params`); `seqs`: each
    row's ids so far (read only with a repetition penalty); `rngs`: each row's generator (sampling)."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seqs, params.repetition_penalty)
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    scores = top_p_filter(logits / np.float32(params.temperature), params.top_p)
    probs = softmax(scores)
    out = np.empty(len(probs), dtype=np.int64)
    for i, p in enumerate(probs):
        cdf = np.cumsum(p)
        u = rngs[i].random() * cdf[-1]
        out[i] = min(int(np.searchsorted(cdf, u, side="right")), len(p) - 1)
    return out
