"""`coordexp-client pipeline --config pipeline.yaml`: infer -> (eval || vis) from one YAML file.

The config is validated completely before anything runs (coordexp.client.pipeline_config); `--dry-run`
prints the resolved config and stops. The run folder `<output_dir>/<name>/` gets:

    resolved_config.json   the resolved config (schema-versioned, absolute paths, secrets redacted)
    predictions.jsonl      the prediction artifact (written by infer, or copied from `predictions`)
    gt_vs_pred.jsonl       per image: GT and predictions side by side, pixel coordinates
    summary.json           counts read/written, per-error counters, stage status and timings
    eval/                  coordexp.eval artifacts (metrics.json, matches.jsonl, ...)
    vis/                   coordexp.vis overlays + index.html

Infer runs first (a local torch/onnx engine in this process, or Triton servers through the same
client as `infer --url`). Eval and vis then run in parallel in two worker processes (spawned, so
neither inherits the model or the GIL), each from the prediction artifact alone.

Exit status: 0 all stages done; 1 a stage failed (the others still ran; see summary.json);
2 bad config or nothing could start; 3 the Triton servers went away during infer.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from typing import Any

EXIT_OK, EXIT_STAGE_FAILED, EXIT_CONFIG = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("pipeline", help="infer -> eval + vis from one YAML config",
                       description="Run the stages named in a YAML config (infer, eval, vis) into "
                                   "<output_dir>/<name>/. The whole config is checked before any work. "
                                   "Example: configs/pipeline.yaml; every key: configs/README.md.")
    p.add_argument("--config", required=True, help="pipeline YAML file")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; run nothing")
    from coordexp.client.cmd_runs import add_register_args

    add_register_args(p)
    p.set_defaults(func=run)
    return p


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from coordexp.client.pipeline_config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"pipeline: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(json.dumps(cfg.resolved(), indent=2, ensure_ascii=False))
        return EXIT_OK
    rc = run_pipeline(cfg)
    _register(cfg, args, rc)
    return rc


def _register(cfg, args: argparse.Namespace, rc: int) -> None:
    """Record the run folder in the registry: a test run when eval ran, else an inference job."""
    from coordexp.client.cmd_runs import register_options
    from coordexp.runs.register import register_run

    pred = os.path.join(cfg.run_dir, "predictions.jsonl")
    ev = os.path.join(cfg.run_dir, "eval")
    if os.path.isfile(pred):
        register_run(pred, register_options(args), gt_path=cfg.data,
                     eval_dir=ev if os.path.isfile(os.path.join(ev, "metrics.json")) else None,
                     failed=None if rc == EXIT_OK else f"pipeline exited with status {rc}")


# -- stages -----------------------------------------------------------------------------------------

def _infer_local(cfg, out_path: str) -> dict[str, Any]:
    from coordexp.engines import load_engine
    from coordexp.runner import run_dataset

    eng = cfg.infer.engine
    kwargs: dict[str, Any] = {"threads": eng.threads}
    if eng.kind == "torch":
        kwargs.update(device=eng.device, dtype=eng.dtype)
    engine = load_engine(eng.kind, eng.checkpoint, prompt_flags=cfg.prompt_flags(), **kwargs)
    summary = run_dataset(cfg.data, out_path, engine, cfg.generation_params(), batch_size=cfg.infer.batch_size,
                          resume=cfg.infer.resume, max_pixels=cfg.infer.max_pixels, progress=cfg.infer.progress,
                          force=cfg.infer.force)
    return {"rc": 0, "summary": summary.to_dict()}


def _infer_triton(cfg, out_path: str) -> dict[str, Any]:
    from coordexp.client.cmd_infer import infer_remote
    from coordexp.engines.triton import ClientOptions

    eng, pr = cfg.infer.engine, cfg.infer.prompt
    rc = infer_remote(list(eng.urls), cfg.data, out_path, cfg.generation_params(),
                      ClientOptions(model=eng.model, timeout=eng.timeout_s, retries=eng.retries,
                                    wait_for_server=eng.wait_for_server_s),
                      concurrency=eng.concurrency, resume=cfg.infer.resume, force=cfg.infer.force,
                      max_pixels=cfg.infer.max_pixels,
                      progress=False if cfg.infer.progress is False else None, user_text=pr.user_text,
                      prompt_overrides={"coord_format": pr.coord_format, "field_order": pr.field_order,
                                        "object_order": pr.object_order, "system_prompt": pr.system_text,
                                        "bbox_format": pr.bbox_format, "layout": pr.layout},
                      explicit_max_new_tokens=cfg.infer.decoding.max_new_tokens is not None,
                      explicit_repetition_penalty=cfg.infer.decoding.repetition_penalty is not None)
    summary_path = os.path.join(os.path.dirname(out_path), "summary.json")
    summary = _read_json(summary_path) if rc in (0, 3) and os.path.exists(summary_path) else None
    return {"rc": rc, "summary": summary}


def artifact_counts(pred_path: str) -> dict[str, Any]:
    """summary.json counts of an artifact not written by this run (stages.infer off)."""
    errors: Counter = Counter()
    n = 0
    with open(pred_path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            n += 1
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                errors["unreadable_line"] += 1
                continue
            if isinstance(d, dict) and d.get("error"):
                errors[str(d["error"])] += 1
    return {"records_read": n, "records_written": n, "errors": dict(sorted(errors.items()))}


def scored_artifact_fields(pair: Any) -> dict[str, Any]:
    """The fields of CoordExp's `gt_vs_pred_scored.jsonl` that its evaluator requires for COCO/LVIS:
    `image`, `errors` and the score provenance (our scores are the constant 1.0 of the contract)."""
    from coordexp.eval.upstream import SCORE_SOURCE, SCORE_VERSION

    return {"image": pair.images[0] if pair.images else "", "errors": [pair.error] if pair.error else [],
            "pred_score_source": SCORE_SOURCE, "pred_score_version": SCORE_VERSION}


def write_gt_vs_pred(pred_path: str, gt_path: str, out_path: str, gt_coord_mode: str | None = None) -> int:
    """gt_vs_pred.jsonl: one line per GT image, GT and predictions in pixel coordinates."""
    from coordexp.eval import load_pairs

    pairs = load_pairs(pred_path, gt_path, gt_coord_mode=gt_coord_mode)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            row: dict[str, Any] = {"image_id": p.image_id, "images": p.images, "width": p.width,
                                   "height": p.height, "coord_mode": "pixel",
                                   "gt": [o.to_dict() for o in p.gts], "pred": [o.to_dict() for o in p.preds],
                                   **scored_artifact_fields(p)}  # what CoordExp's evaluator needs for COCO
            if p.error:
                row["error"] = p.error
                if p.error_message:
                    row["error_message"] = p.error_message
            if p.missing:
                row["missing_prediction"] = True
            if p.preds_invalid:
                row["preds_invalid"] = p.preds_invalid
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return len(pairs)


def eval_stage(pred_path: str, gt_path: str, out_dir: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Worker: coordexp.eval on the artifact. Never raises (the error goes into the result)."""
    t0 = time.perf_counter()
    try:
        from coordexp.eval import evaluate, format_summary

        m = evaluate(pred_path, gt_path, out_dir, metrics=opts["metrics"], iou_thrs=opts["iou_thrs"],
                     reparse=opts["reparse"], semantic=opts["semantic"], semantic_thr=opts["semantic_thr"],
                     coco_backend=opts["coco_backend"], gt_coord_mode=opts["gt_coord_mode"], plots=opts["plots"],
                     desc_match=opts["desc_match"], allow_partial=opts["allow_partial"])
        return {"status": "ok", "seconds": round(time.perf_counter() - t0, 3), "headline": _eval_headline(m),
                "report": format_summary(m)}
    except Exception as e:  # noqa: BLE001 - reported in summary.json
        return {"status": "failed", "seconds": round(time.perf_counter() - t0, 3),
                "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}


def vis_stage(pred_path: str, gt_path: str, out_dir: str, opts: dict[str, Any], title: str | None = None,
              gt_coord_mode: str | None = None) -> dict[str, Any]:
    """Worker: coordexp.vis on the artifact. Never raises."""
    t0 = time.perf_counter()
    try:
        from coordexp.vis import visualize

        idx = visualize(pred_path, gt_path, out_dir, iou=opts["iou"], limit=opts["limit"],
                        only_errors=opts["only_errors"], image_root=opts["image_root"],
                        desc_match="semantic" if opts["semantic"] else opts["desc_match"],
                        min_size=opts["min_size"], max_size=opts["max_size"], gt_coord_mode=gt_coord_mode,
                        title=title)
        return {"status": "ok", "seconds": round(time.perf_counter() - t0, 3),
                "headline": {"images": idx["counts"]["images"], "rendered": idx["counts"]["rendered"],
                             "micro_f1": idx["micro"]["f1"], "gallery": os.path.join(out_dir, "index.html")}}
    except Exception as e:  # noqa: BLE001
        return {"status": "failed", "seconds": round(time.perf_counter() - t0, 3),
                "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}


def _eval_headline(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bbox = (m.get("coco") or {}).get("bbox") or {}
    for k in ("AP", "AP50", "AP75"):
        if k in bbox:
            out[f"bbox_{k}"] = bbox[k]
    prim = m.get("f1ish_primary")
    f1 = ((m.get("f1ish") or {}).get(prim) or {}) if prim else {}
    for mode in ("full", "full_exact", "full_semantic", "loc"):
        micro = (f1.get(mode) or {}).get("micro") or {}
        if "f1" in micro:
            out[f"f1ish@{prim}_{mode}_micro_f1"] = micro["f1"]
    return out


def _read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _stage_worker(conn, fn, args: tuple) -> None:
    """Body of a stage process: run `fn(*args)` and send its result dict back."""
    try:
        res = fn(*args)
    except BaseException as e:  # noqa: BLE001 - the stage functions catch their own errors already
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    res["pid"] = os.getpid()
    conn.send(res)
    conn.close()


def _run_parallel(jobs: dict[str, tuple]) -> dict[str, dict[str, Any]]:
    """Run {name: (fn, *args)} at once, one spawned process each (no fork of a process holding a
    model and its threads; no shared GIL); results by name, logged as each one finishes."""
    import multiprocessing
    import multiprocessing.connection

    ctx = multiprocessing.get_context("spawn")
    procs: dict[str, Any] = {}
    pending: dict[Any, str] = {}
    for name, (fn, *a) in jobs.items():
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_stage_worker, args=(send, fn, tuple(a)), name=f"coordexp-{name}", daemon=True)
        p.start()
        send.close()
        procs[name] = p
        pending[recv] = name
    results: dict[str, dict[str, Any]] = {}
    try:
        while pending:
            for conn in multiprocessing.connection.wait(list(pending)):
                name = pending.pop(conn)
                try:
                    results[name] = conn.recv()
                except EOFError:  # the process died without a result (killed, out of memory)
                    procs[name].join(5)
                    results[name] = {"status": "failed",
                                     "error": f"{name} process exited with code {procs[name].exitcode}"}
                conn.close()
                _log_stage(name, results[name])
    finally:
        for p in procs.values():
            p.join(5)
            if p.is_alive():  # only after an interrupt: do not leave our workers behind
                p.terminate()
                p.join(5)
    return results


def _log_stage(name: str, res: dict[str, Any]) -> None:
    if res.get("status") == "ok":
        _log(f"{name}: done in {res.get('seconds', 0):.1f}s {json.dumps(res.get('headline', {}))}")
    else:
        _log(f"{name}: FAILED: {res.get('error')}")


def _write_summary(cfg, base: dict[str, Any], stages: dict[str, dict[str, Any]], code: int, started: float,
                   t0: float) -> int:
    from coordexp.client.pipeline_config import PIPELINE_SCHEMA_VERSION

    run_dir = cfg.run_dir
    summary_path = os.path.join(run_dir, "summary.json")
    summary = {"schema_version": base.get("schema_version", "coordexp.v1"), **base}
    summary["pipeline"] = {
        "schema_version": PIPELINE_SCHEMA_VERSION, "name": cfg.name, "run_dir": run_dir,
        "config_file": cfg.config_path, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.perf_counter() - t0, 3), "exit_status": code,
        "stages": {k: {kk: vv for kk, vv in v.items() if kk not in ("report", "traceback")}
                   for k, v in stages.items()},
        "artifacts": sorted(f for f in ("predictions.jsonl", "gt_vs_pred.jsonl", "summary.json",
                                        "resolved_config.json", "eval", "vis")
                            if f == "summary.json" or os.path.exists(os.path.join(run_dir, f))),
    }
    _write_json(summary_path, summary)
    _log(f"{'done' if code == 0 else 'finished with errors'} in {time.perf_counter() - t0:.1f}s; "
         f"summary: {summary_path}")
    return code


def _infer_stage(cfg, pred_path: str, stages: dict[str, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Run (or skip) inference; (its exit status, the summary fields it gives the run)."""
    if not cfg.stages.infer:
        if os.path.abspath(cfg.predictions) != os.path.abspath(pred_path):
            shutil.copyfile(cfg.predictions, pred_path)
        stages["infer"] = {"status": "off", "predictions_from": cfg.predictions}
        return EXIT_OK, {"schema_version": "coordexp.v1", **artifact_counts(pred_path),
                         "predictions_from": cfg.predictions}
    eng = cfg.infer.engine
    _log(f"infer: {eng.kind} engine on {cfg.data}")
    t = time.perf_counter()
    try:
        res = _infer_triton(cfg, pred_path) if eng.kind == "triton" else _infer_local(cfg, pred_path)
    except Exception as e:  # noqa: BLE001 - engine load failures and the like
        res = {"rc": EXIT_CONFIG, "summary": None, "error": f"{type(e).__name__}: {e}"}
    stages["infer"] = {"status": "ok" if res["rc"] == 0 else "failed", "seconds": round(time.perf_counter() - t, 3),
                       "engine": eng.kind}
    if res.get("error"):
        stages["infer"]["error"] = res["error"]
    elif res["rc"] != 0:
        stages["infer"]["error"] = f"infer exited with status {res['rc']} (see the messages above)"
    base = dict(res.get("summary") or {})
    _log_stage("infer", {**stages["infer"], "headline": {k: base.get(k) for k in ("records_written", "errors")}})
    return res["rc"], base


def _eval_and_vis(cfg, pred_path: str, stages: dict[str, dict[str, Any]]) -> int:
    """eval and vis, each in its own process, in parallel; the exit status."""
    rc = EXIT_OK
    jobs: dict[str, tuple] = {}
    if cfg.stages.eval:
        jobs["eval"] = (eval_stage, pred_path, cfg.data, os.path.join(cfg.run_dir, "eval"), _asdict(cfg.eval))
    if cfg.stages.vis:
        jobs["vis"] = (vis_stage, pred_path, cfg.data, os.path.join(cfg.run_dir, "vis"), _asdict(cfg.vis),
                       f"{cfg.name}: predictions vs ground truth", cfg.eval.gt_coord_mode)
    if not jobs:
        return rc
    _log(f"{' + '.join(jobs)}: running{' in parallel' if len(jobs) > 1 else ''}")
    if len(jobs) == 1:
        name, (fn, *a) = next(iter(jobs.items()))
        results = {name: fn(*a)}
        _log_stage(name, results[name])
    else:
        results = _run_parallel(jobs)
    for name, res in results.items():
        stages[name] = res
        if res.get("status") != "ok":
            rc = EXIT_STAGE_FAILED
    if results.get("eval", {}).get("report"):
        print(results["eval"]["report"])
    return rc


def run_pipeline(cfg) -> int:
    """Run the stages of a validated PipelineConfig; returns the exit status."""
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "resolved_config.json"), cfg.resolved())
    pred_path = os.path.join(run_dir, "predictions.jsonl")
    started, t0 = time.time(), time.perf_counter()
    stages: dict[str, dict[str, Any]] = {s: {"status": "off"} for s in ("infer", "eval", "vis")}
    _log(f"run {cfg.name!r} -> {run_dir} (stages: {', '.join(cfg.stages_on)})")
    rc, base = _infer_stage(cfg, pred_path, stages)
    if rc != EXIT_OK:
        for s in ("eval", "vis"):
            if getattr(cfg.stages, s):
                stages[s] = {"status": "skipped", "error": "infer failed"}
        return _write_summary(cfg, base, stages, rc if rc in (2, 3) else EXIT_STAGE_FAILED, started, t0)
    try:
        n = write_gt_vs_pred(pred_path, cfg.data, os.path.join(run_dir, "gt_vs_pred.jsonl"), cfg.eval.gt_coord_mode)
        _log(f"gt_vs_pred.jsonl: {n} images")
    except Exception as e:  # noqa: BLE001 - e.g. predictions that do not belong to this data
        base["gt_vs_pred_error"] = f"{type(e).__name__}: {e}"
        _log(f"gt_vs_pred.jsonl not written: {e}")
        rc = EXIT_STAGE_FAILED
    rc = max(rc, _eval_and_vis(cfg, pred_path, stages))
    return _write_summary(cfg, base, stages, rc, started, t0)


def _asdict(obj) -> dict[str, Any]:
    return obj.model_dump()
