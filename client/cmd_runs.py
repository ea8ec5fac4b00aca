"""`coordexp-client runs list|show|import|delete|export`: the run registry (SQLite).

Also `add_register_args` / `register_options`: the `--registry` / `--no-register` flags that
`infer`, `eval` and `pipeline` share.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from coordexp.runs.register import RegisterOptions


def add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None,
                   help="registry SQLite file (default: $COORDEXP_REGISTRY, else ~/.local/share/coordexp/registry.sqlite)")


def add_register_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run registry")
    g.add_argument("--no-register", action="store_true", help="do not record this run in the registry")
    g.add_argument("--run-name", default=None, help="name of the run in the registry (default: its folder's name)")
    add_registry_arg(g)


def register_options(args: argparse.Namespace) -> RegisterOptions:
    return RegisterOptions(enabled=not getattr(args, "no_register", False), registry=getattr(args, "registry", None),
                           name=getattr(args, "run_name", None))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list, show, import, delete or export registered runs",
                       description="The run registry: test runs (labelled data -> metrics) and inference jobs.")
    rs = p.add_subparsers(dest="runs_command", metavar="ACTION")
    ls = rs.add_parser("list", help="registered runs, newest first")
    ls.add_argument("--kind", choices=["test", "infer"])
    ls.add_argument("--status", choices=["pending", "running", "completed", "failed"])
    ls.add_argument("--checkpoint", help="the checkpoint's name, a substring of its path, or a digest prefix")
    ls.add_argument("--dataset", help="substring of the dataset path or a digest prefix")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    sh = rs.add_parser("show", help="one run: metrics, settings, where its files are")
    sh.add_argument("run_id", type=int)
    im = rs.add_parser("import", help="register a run folder (ours or CoordExp's gt_vs_pred.jsonl folder)")
    im.add_argument("run_dir")
    im.add_argument("--gt", help="the GT JSONL (default: what the folder's eval or summary names)")
    im.add_argument("--name")
    de = rs.add_parser("delete", help="remove runs from the registry (their files stay)")
    de.add_argument("run_id", type=int, nargs="+")
    ex = rs.add_parser("export", help="a run as csv (per image), json (everything) or coco (GT + detections)")
    ex.add_argument("run_id", type=int)
    ex.add_argument("--format", choices=["csv", "json", "coco"], default="csv")
    ex.add_argument("--out", help="file to write (default: stdout)")
    for q in (ls, sh, im, de, ex):
        add_registry_arg(q)
    p.set_defaults(func=run)


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def run(args: argparse.Namespace) -> int:
    from coordexp.runs.importers import ImportError_
    from coordexp.runs.registry import Registry, RegistryError

    if not getattr(args, "runs_command", None):
        print("error: give an action: list, show, import, delete or export", file=sys.stderr)
        return 2
    try:
        with Registry(args.registry) as reg:
            return ACTIONS[args.runs_command](reg, args)
    except (RegistryError, ImportError_, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _list(reg, args) -> int:
    runs = reg.list_runs(kind=args.kind, status=args.status, checkpoint=args.checkpoint, dataset=args.dataset,
                         limit=args.limit)
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    print(f"{'id':>4}  {'kind':5} {'status':9} {'created':16} {'images':>6}  {'primary':>18}  name")
    for r in runs:
        prim = "-" if r["primary_metric"] is None else f"{r['primary_metric_name']}={r['primary_metric']:.3f}"
        print(f"{r['id']:>4}  {r['kind']:5} {r['status']:9} {_when(r['created_at']):16} {r['num_images']:>6}  "
              f"{prim:>18}  {r['name']}")
    return 0


def _show(reg, args) -> int:
    r = reg.get_run(args.run_id)
    r.pop("per_class", None)
    for key in ("created_at", "started_at", "completed_at"):  # readable times (the epoch stays in --json)
        if isinstance(r.get(key), (int, float)):
            r[key] = dt.datetime.fromtimestamp(r[key]).astimezone().isoformat(timespec="seconds")
    r["history"] = [{**h, "changed_at": dt.datetime.fromtimestamp(h["changed_at"]).astimezone()
                     .isoformat(timespec="seconds")} for h in reg.history(args.run_id)]
    print(json.dumps(r, indent=1, ensure_ascii=False))
    return 0


def _import(reg, args) -> int:
    from coordexp.runs.folders import import_run_dir

    run, rows = import_run_dir(args.run_dir, gt_path=args.gt, name=args.name)
    run_id = reg.add_run(run, rows, replace=True)
    prim = "" if run.primary_metric is None else f", {run.primary_metric_name} {run.primary_metric:.4f}"
    print(f"registered {run.kind} run {run_id}: {len(rows)} images{prim}")
    return 0


def _delete(reg, args) -> int:
    for i in args.run_id:
        reg.delete_run(i)
        print(f"deleted run {i}")
    return 0


def _export(reg, args) -> int:
    from coordexp.runs.report import export_run

    text = export_run(reg, args.run_id, args.format)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


ACTIONS = {"list": _list, "show": _show, "import": _import, "delete": _delete, "export": _export}
