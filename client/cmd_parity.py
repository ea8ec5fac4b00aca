"""`coordexp-client parity`: torch reference vs in-process ONNX Runtime vs the served Triton ensemble.

    coordexp-client parity --ckpt CKPT --repo REPO --data in.jsonl [--url HOST:PORT]
        [--batch-sizes 1,4] [--max-new-tokens N] [--sample-seed S]

Runs the same input records through
- the torch reference (the checkpoint through HF `generate`) at every batch size,
- ONNX Runtime in process (the graphs of the repository, `OnnxEngine`) at every batch size,
- the served ensemble (a Triton started from --repo, or the server at --url) with as many requests
  in flight as the batch size, so Triton's dynamic batcher groups them,
and prints one row per engine pair: records compared, exact-match rate of the generated token ids
and of the parsed predictions, and the first divergence (record, token position, the two tokens).
Greedy by default (every pair against the torch reference at the first batch size, plus ONNX vs
served at each batch size). `--sample-seed S` samples at that seed instead: only ONNX Runtime and
the server share the sampler (numpy, one generator per row seeded with S), so only those pairs are
compared; torch samples with its own RNG and cannot match.

All engines use the repository's prompt variant (from its manifest). Exit status: 0 every pair
matches, 1 a mismatch (or a failed request), 2 bad arguments / nothing to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="torch vs onnx vs served: token-exact comparison",
                       description="Run the torch reference, in-process ONNX Runtime and the served Triton ensemble "
                                   "on the same records and compare generated token ids and parsed predictions.")
    p.add_argument("--ckpt", required=True, help="the Hugging Face checkpoint (torch reference)")
    p.add_argument("--repo", required=True, help="the Triton model repository exported from it")
    p.add_argument("--data", required=True, help="input JSONL (CoordExp format)")
    p.add_argument("--url", default=None, help="HOST:PORT of a running Triton (gRPC) serving --repo; default: start "
                                               "one from --repo on free loopback ports")
    p.add_argument("--model", default=None, help="served ensemble name (default: the repository's)")
    p.add_argument("--batch-sizes", default="1,4", help="comma separated (default 1,4)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the repository's limit, at most 64")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="sample at this seed (ONNX vs served only) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample-seed (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sample-seed (default 0.95)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the local engines")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    p.set_defaults(func=run)


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


# ---------------------------------------------------------------------------------------- runs
def _local_run(name: str, engine: Any, items: Sequence[Any], params: Any, batch: int) -> Run:
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


def _served_run(name: str, url: str, model: str, items: Sequence[Any], params: Any, concurrency: int) -> Run:
    """The served ensemble through the shipped client (`TritonEngine`), `concurrency` requests in flight."""
    from coordexp.engines.triton import ClientOptions, TritonEngine

    t0 = time.perf_counter()
    with TritonEngine.connect([url], ClientOptions(model=model, timeout=300.0, max_in_flight=concurrency)) as engine:
        out = engine.generate_batch([it.image_bytes for it in items], params)
    run = Run(name, seconds=time.perf_counter() - t0)
    for g in out:
        run.rows.append(g.error if g.error else (list(g.token_ids), g.served_preds))
    return run


def _batch_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: expected positive integers, e.g. 1,4")
    return sizes


def run(args: argparse.Namespace) -> int:
    from coordexp.dataset import iter_dataset
    from coordexp.generation import GenerationParams
    from coordexp.prompt import PromptSpec
    from coordexp.serving.common import read_manifest
    from coordexp.wire import ENSEMBLE

    try:
        sizes = _batch_sizes(args.batch_sizes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, what in ((args.ckpt, "checkpoint"), (args.repo, "repository")):
        if not os.path.isdir(path):
            print(f"error: {what} folder not found: {path}", file=sys.stderr)
            return 2
    if not os.path.isfile(args.data):
        print(f"error: input dataset not found: {args.data}", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(args.repo)
    except (OSError, ValueError) as e:
        print(f"error: {args.repo} has no readable manifest.json ({e}); is it a CoordExp repository?", file=sys.stderr)
        return 2
    prompt = PromptSpec.from_dict(manifest.get("prompt"))
    limit = int(manifest.get("max_new_tokens") or 256)
    max_new = args.max_new_tokens or min(limit, 64)
    if max_new > limit:
        print(f"error: --max-new-tokens {max_new} exceeds the repository's limit of {limit}", file=sys.stderr)
        return 2
    sampling = args.sample_seed is not None
    try:
        params = (GenerationParams(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                                   seed=args.sample_seed) if sampling
                  else GenerationParams(max_new_tokens=max_new))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sampling and params.greedy:
        print("error: --sample-seed needs --temperature > 0", file=sys.stderr)
        return 2
    model = args.model or manifest.get("name") or ENSEMBLE

    all_items = list(iter_dataset(args.data))
    items = [it for it in all_items if it.ok][: args.limit]
    skipped = [it for it in all_items if not it.ok]
    if not items:
        print(f"error: no usable record in {args.data} ({len(skipped)} with errors)", file=sys.stderr)
        return 2
    mode = (f"sampling (temperature {params.temperature}, top_p {params.top_p}, seed {params.seed})" if sampling
            else "greedy")
    print(f"parity: {len(items)} records ({len(skipped)} skipped for input errors), {mode}, max_new_tokens "
          f"{max_new}, batch sizes {sizes}, prompt {prompt.variant}", file=sys.stderr)

    from coordexp.engines.onnx_engine import OnnxEngine

    runs: dict[str, Run] = {}
    onnx = OnnxEngine(args.repo, prompt=prompt, threads=args.threads)
    tokenizer = onnx.processor.tokenizer
    if not sampling:
        from coordexp.engines.torch_engine import TorchEngine

        torch_engine = TorchEngine(args.ckpt, prompt=prompt, threads=args.threads)
        for b in sizes:
            runs[f"torch@{b}"] = _local_run(f"torch@{b}", torch_engine, items, params, b)
            print(f"  torch@{b}: {runs[f'torch@{b}'].seconds:.1f} s", file=sys.stderr)
        del torch_engine
    for b in sizes:
        runs[f"onnx@{b}"] = _local_run(f"onnx@{b}", onnx, items, params, b)
        print(f"  onnx@{b}: {runs[f'onnx@{b}'].seconds:.1f} s", file=sys.stderr)

    server = None
    url = args.url
    try:
        if not url:
            from coordexp.serving.server import TritonError, start_server

            print(f"  starting Triton from {args.repo} ...", file=sys.stderr)
            try:
                server = start_server(args.repo)
            except TritonError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            url = server.grpc_url
        for b in sizes:
            runs[f"served@c{b}"] = _served_run(f"served@c{b}", url, model, items, params, b)
            print(f"  served@c{b}: {runs[f'served@c{b}'].seconds:.1f} s", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()

    token_text = lambda t: tokenizer.decode([int(t)], skip_special_tokens=False)  # noqa: E731
    pairs: list[PairResult] = []
    if sampling:
        for b in sizes:
            pairs.append(compare(runs[f"onnx@{b}"], runs[f"served@c{b}"], items, token_text))
    else:
        ref = runs[f"torch@{sizes[0]}"]
        for name, r in runs.items():
            if r is not ref:
                pairs.append(compare(ref, r, items, token_text))
        for b in sizes:
            pairs.append(compare(runs[f"onnx@{b}"], runs[f"served@c{b}"], items, token_text))
    print(format_table(pairs))
    if sampling:
        print("note: sampling compares ONNX Runtime with the server only (same numpy sampler and seed); torch "
              "samples with its own RNG and cannot match them token for token.")
    ok = all(p.ok for p in pairs)
    print("result: " + ("all pairs match" if ok else "MISMATCH"))
    if args.json_out:
        report = {"ok": ok, "mode": mode, "params": params.to_dict(), "prompt": prompt.to_dict(),
                  "records": len(items), "skipped": len(skipped), "pairs": [p.to_dict() for p in pairs],
                  "seconds": {k: round(r.seconds, 3) for k, r in runs.items()}}
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1
