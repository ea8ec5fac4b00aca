"""Parity across engines: the torch reference, in-process ONNX Runtime and the served ensemble (through
the shipped client) on the same records, compared token for token and by parsed predictions.
`coordexp-client parity` is the command over it."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class PairResult:
    a: str
    b: str
    records: int = 0
    ids_match: int = 0
    preds_match: int = 0
    first_divergence: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.records > 0 and self.ids_match == self.records and self.preds_match == self.records

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Run:
    """One engine at one batch size: per record (token ids, preds payload) or an error string."""

    name: str
    rows: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _preds_key(payload: dict[str, Any]) -> Any:
    return {"preds": payload.get("preds"), "error": payload.get("error")}


def compare(a: Run, b: Run, records: Sequence[Any], token_text=None) -> PairResult:
    """Compare two runs record by record (`records[k].index` / `.line_no` name them)."""
    res = PairResult(a.name, b.name)
    for k, (ra, rb) in enumerate(zip(a.rows, b.rows)):
        res.records += 1
        if isinstance(ra, str) or isinstance(rb, str):  # a failed request / batch
            if res.first_divergence is None:
                res.first_divergence = {"record": records[k].index, "line": records[k].line_no, "position": None,
                                        a.name: ra if isinstance(ra, str) else "ok",
                                        b.name: rb if isinstance(rb, str) else "ok"}
            continue
        (ids_a, pa), (ids_b, pb) = ra, rb
        pos = first_difference(ids_a, ids_b)
        if pos is None:
            res.ids_match += 1
        elif res.first_divergence is None:
            def tok(ids: Sequence[int]) -> Any:
                if pos >= len(ids):
                    return "<end>"
                return {"id": ids[pos], "text": token_text(ids[pos])} if token_text else ids[pos]

            res.first_divergence = {"record": records[k].index, "line": records[k].line_no, "position": pos,
                                    a.name: tok(ids_a), b.name: tok(ids_b)}
        if _preds_key(pa) == _preds_key(pb):
            res.preds_match += 1
    return res


def _fmt_div(d: dict[str, Any] | None, a: str, b: str) -> str:
    if d is None:
        return "-"
    if d.get("position") is None:
        return f"record {d['record']} (line {d['line']}): {a}={d[a]!s:.60} {b}={d[b]!s:.60}"

    def t(v: Any) -> str:
        return f"{v['id']} {v['text']!r}" if isinstance(v, dict) else str(v)

    return f"record {d['record']} (line {d['line']}) token {d['position']}: {a}={t(d[a])} vs {b}={t(d[b])}"


def format_table(pairs: Sequence[PairResult]) -> str:
    head = ("engine pair", "records", "ids exact", "preds exact", "first divergence")
    rows = [(f"{p.a} vs {p.b}", str(p.records), f"{p.ids_match / p.records:.1%}" if p.records else "-",
             f"{p.preds_match / p.records:.1%}" if p.records else "-", _fmt_div(p.first_divergence, p.a, p.b))
            for p in pairs]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def local_run(name: str, engine: Any, items: Sequence[Any], params: Any, batch: int) -> Run:
    from coordexp.serving.postprocess import preds_payload

    run = Run(name)
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        try:
            gens = engine.generate_batch([it.pil_image() for it in chunk], params)
            run.rows += [(list(g.token_ids), preds_payload(g.text)) for g in gens]
        except Exception as e:  # noqa: BLE001 - reported in the table
            run.rows += [f"{type(e).__name__}: {e}"] * len(chunk)
    run.seconds = time.perf_counter() - t0
    return run


def served_run(name: str, url: str, model: str, items: Sequence[Any], params: Any, concurrency: int) -> Run:
    """The served ensemble through the shipped client (`TritonEngine`), `concurrency` requests in flight."""
    from coordexp.engines.triton import ClientOptions, TritonEngine

    t0 = time.perf_counter()
    with TritonEngine.connect([url], ClientOptions(model=model, timeout=300.0, max_in_flight=concurrency)) as engine:
        out = engine.generate_batch([it.image_bytes for it in items], params)
    run = Run(name, seconds=time.perf_counter() - t0)
    for g in out:
        run.rows.append(g.error if g.error else (list(g.token_ids), g.served_preds))
    return run


def run_engines(ckpt: str, repo: str, url: str, model: str, items: Sequence[Any], params: Any, prompt: Any,
                sizes: Sequence[int], threads: int | None = None, log=lambda s: print(s, file=sys.stderr)
                ) -> tuple[dict[str, Run], Any]:
    """Every engine at every batch size (torch only when greedy: it samples with its own RNG).
    Returns (runs by name, the tokenizer to name tokens with)."""
    from coordexp.engines.onnx_engine import OnnxEngine

    runs: dict[str, Run] = {}
    onnx = OnnxEngine(repo, prompt=prompt, threads=threads)
    if params.greedy:
        from coordexp.engines.torch_engine import TorchEngine

        torch_engine = TorchEngine(ckpt, prompt=prompt, threads=threads)
        for b in sizes:
            runs[f"torch@{b}"] = local_run(f"torch@{b}", torch_engine, items, params, b)
            log(f"  torch@{b}: {runs[f'torch@{b}'].seconds:.1f} s")
        del torch_engine
    for b in sizes:
        runs[f"onnx@{b}"] = local_run(f"onnx@{b}", onnx, items, params, b)
        log(f"  onnx@{b}: {runs[f'onnx@{b}'].seconds:.1f} s")
    for b in sizes:
        runs[f"served@c{b}"] = served_run(f"served@c{b}", url, model, items, params, b)
        log(f"  served@c{b}: {runs[f'served@c{b}'].seconds:.1f} s")
    return runs, onnx.processor.tokenizer


def pair_up(runs: dict[str, Run], items: Sequence[Any], sizes: Sequence[int], sampling: bool,
            tokenizer: Any) -> list[PairResult]:
    """Greedy: every run against torch at the first batch size, plus ONNX vs served per size.
    Sampling: ONNX vs served per size only (they share the numpy sampler and seed)."""
    token_text = lambda t: tokenizer.decode([int(t)], skip_special_tokens=False)  # noqa: E731
    pairs: list[PairResult] = []
    if not sampling:
        ref = runs[f"torch@{sizes[0]}"]
        pairs += [compare(ref, r, items, token_text) for r in runs.values() if r is not ref]
    pairs += [compare(runs[f"onnx@{b}"], runs[f"served@c{b}"], items, token_text) for b in sizes]
    return pairs
