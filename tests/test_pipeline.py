"""`coordexp-client pipeline`: one YAML -> infer -> eval || vis; bad configs fail before any work."""
from __future__ import annotations

import json
import os
import re

import pytest

from coordexp.client.cli import main as cli_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO_ROOT, "data", "sample", "sample.jsonl")


def _gt_rows() -> list[dict]:
    with open(SAMPLE) as f:
        return [json.loads(line) for line in f]


def _write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _predictions(path) -> str:
    """The GT as predictions, with image 0's first object dropped and image 2 a parse failure."""
    with open(path, "w") as f:
        for i, r in enumerate(_gt_rows()):
            preds = [{"type": "poly" if "poly" in o else "bbox_2d", "points": o.get("poly") or o["bbox_2d"],
                      "desc": o["desc"], "score": 1.0} for o in r["objects"]]
            rec = {"image_id": i, "images": r["images"], "width": r["width"], "height": r["height"],
                   "coord_mode": "norm1000", "raw_output": "", "preds": preds[1:] if i == 0 else preds}
            if i == 2:
                rec.update(preds=[], error="parse_failed")
            f.write(json.dumps(rec) + "\n")
    return str(path)


def _lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_local_torch_engine(tmp_path, tiny_ckpt, capsys):
    cfg = _write(tmp_path / "pipeline.yaml", f"""
name: tiny-e2e
output_dir: runs
data: {SAMPLE}
stages: {{infer: true, eval: true, vis: true}}
infer:
  engine: {{kind: torch, checkpoint: {tiny_ckpt}, threads: 1}}
  batch_size: 4
  progress: false
  decoding: {{max_new_tokens: 16}}
eval: {{semantic: false, plots: false}}
vis: {{limit: 5}}
""")
    assert cli_main(["pipeline", "--config", cfg]) == 0
    run = tmp_path / "runs" / "tiny-e2e"
    for name in ("predictions.jsonl", "gt_vs_pred.jsonl", "summary.json", "resolved_config.json",
                 "eval/metrics.json", "eval/matches.jsonl", "eval/per_image.json", "vis/index.html",
                 "vis/index.json"):
        assert (run / name).is_file(), name
    n = len(_gt_rows())
    preds = _lines(run / "predictions.jsonl")
    assert [p["image_id"] for p in preds] == list(range(n))
    assert all(p["engine"] == "torch" and "raw_output" in p for p in preds)
    gvp = _lines(run / "gt_vs_pred.jsonl")
    assert len(gvp) == n and gvp[0]["coord_mode"] == "pixel"
    g0, r0 = gvp[0]["gt"][0], _gt_rows()[0]
    assert g0["points"][2] == pytest.approx(r0["objects"][0]["bbox_2d"][2] / 999 * (r0["width"] - 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["records_read"] == summary["records_written"] == n
    assert sum(summary["errors"].values()) == sum(1 for p in preds if p.get("error"))
    assert summary["params"]["max_new_tokens"] == 16
    assert {k: v["status"] for k, v in summary["pipeline"]["stages"].items()} == \
        {"infer": "ok", "eval": "ok", "vis": "ok"}
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["schema_version"] == "coordexp.pipeline.v1"
    assert resolved["stages"] == {"infer": True, "eval": True, "vis": True}
    assert resolved["run_dir"] == str(run) and os.path.isabs(resolved["output_dir"])
    assert resolved["infer"]["decoding"]["max_new_tokens"] == 16
    assert resolved["infer"]["engine"] == {"kind": "torch", "checkpoint": tiny_ckpt, "device": "cpu",
                                           "dtype": "float32", "threads": 1}
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["counts"]["images"] == n
    vis = json.loads((run / "vis" / "index.json").read_text())
    assert vis["counts"]["rendered"] == 5 and len(os.listdir(run / "vis" / "overlays")) == 5


def test_eval_and_vis_only_with_secrets_redacted(tmp_path, capsys):
    pred = _predictions(tmp_path / "given.jsonl")
    cfg = _write(tmp_path / "p.yaml", f"""
name: ev
output_dir: out
data: {SAMPLE}
predictions: given.jsonl         # relative to this file
stages: [eval, vis]
eval: {{semantic: false, plots: false, iou_thrs: [0.5]}}
vis: {{only_errors: true}}
metadata:
  owner: me
  api_key: sk-123456
  tracking: {{hf_token: hf_abcdef, password: hunter2, endpoint: "https://bob:s3cret@example.com/x"}}
""")
    assert cli_main(["pipeline", "--config", cfg]) == 0
    run = tmp_path / "out" / "ev"
    assert _lines(run / "predictions.jsonl") == _lines(pred)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["records_read"] == len(_gt_rows()) and summary["errors"] == {"parse_failed": 1}
    assert summary["pipeline"]["stages"]["infer"]["status"] == "off"
    assert summary["pipeline"]["stages"]["eval"]["status"] == "ok"
    assert summary["pipeline"]["stages"]["vis"]["status"] == "ok"
    pids = {summary["pipeline"]["stages"][s]["pid"] for s in ("eval", "vis")}
    assert len(pids) == 2 and os.getpid() not in pids  # eval and vis ran in two processes of their own
    vis = json.loads((run / "vis" / "index.json").read_text())
    assert sorted(r["image_id"] for r in vis["rows"]) == [0, 2]  # --only-errors
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["f1ish"]["0.50"]["full"]["micro"]["fn"] == 1 + len(_gt_rows()[2]["objects"])
    text = (run / "resolved_config.json").read_text()
    for secret in ("sk-123456", "hf_abcdef", "hunter2", "s3cret"):
        assert secret not in text
    resolved = json.loads(text)
    assert resolved["metadata"]["owner"] == "me"
    assert resolved["metadata"]["api_key"] == resolved["metadata"]["tracking"]["password"] == "***REDACTED***"
    assert resolved["infer"] is None and resolved["stages"]["infer"] is False
    assert resolved["predictions"] == str(tmp_path / "given.jsonl")
    # --dry-run: the same resolved config on stdout, nothing run
    capsys.readouterr()
    cfg2 = _write(tmp_path / "p2.yaml", open(cfg).read().replace("name: ev", "name: dry"))
    assert cli_main(["pipeline", "--config", cfg2, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["name"] == "dry" and "hunter2" not in out
    assert not (tmp_path / "out" / "dry").exists()


BASE = """
name: bad
output_dir: out
data: {data}
predictions: {pred}
stages: {{infer: false, eval: true, vis: true}}
"""


@pytest.mark.parametrize("extra,key,words", [
    ("eval: {metric: coco}\n", "eval.metric", "unknown key"),
    ("vis: {limit: many}\n", "vis.limit", "expected an integer"),
    ("vis: {only_errors: 1}\n", "vis.only_errors", "expected true or false"),
    ("eval: {iou_thrs: 0.5}\n", "eval.iou_thrs", "expected a list"),
    ("stages: {infer: false, eval: true, train: true}\n", "stages.train", "unknown stage"),
    ("tags: [a]\n", "tags", "unknown key"),
    ("vis: {iou: '${eval.iou}'}\n", "vis.iou", "interpolation"),
    ("MISSING_DATA", "data", "file not found"),
    ("MISSING_PRED", "predictions", "file not found"),
    ("stages: {infer: true}\ninfer: {engine: {kind: tensorrt}}\n", "infer.engine.kind",
     "expected one of torch, onnx, triton, got 'tensorrt'"),
    ("stages: {infer: true}\ninfer: {engine: {kind: torch, checkpoint: no/such/ckpt}}\n",
     "infer.engine.checkpoint", "not found"),
    ("stages: {infer: true}\ninfer: {engine: {kind: triton, urls: [h:1], device: cuda}}\n",
     "infer.engine.device", "does not apply"),
    ("stages: {infer: true}\ninfer: {engine: {kind: torch}, decoding: {max_new_tokens: 0}}\n",
     "infer.decoding.max_new_tokens", "must be >= 1"),
])
def test_bad_config_fails_before_any_work(tmp_path, capsys, extra, key, words):
    pred = _predictions(tmp_path / "given.jsonl")
    data, pred_s = SAMPLE, pred
    if extra == "MISSING_DATA":
        data, extra = str(tmp_path / "nope.jsonl"), ""
    elif extra == "MISSING_PRED":
        pred_s, extra = str(tmp_path / "nope.jsonl"), ""
    text = BASE.format(data=data, pred=pred_s)
    if extra.startswith("stages:"):  # replace the stages line (duplicate keys are an error)
        text = re.sub(r"stages: .*\n", "", text)
        if "infer: true" in extra:
            text = text.replace(f"predictions: {pred_s}\n", "")
    cfg = _write(tmp_path / "bad.yaml", text + extra)
    assert cli_main(["pipeline", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"(^|\s){re.escape(key)}: [^\n]*{re.escape(words)}", err), err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_yaml_inheritance_and_duplicates_rejected(tmp_path, capsys):
    pred = _predictions(tmp_path / "given.jsonl")
    base = BASE.format(data=SAMPLE, pred=pred)
    cfg = _write(tmp_path / "dup.yaml", base + "name: again\n")
    assert cli_main(["pipeline", "--config", cfg]) == 2
    assert "duplicate key 'name'" in capsys.readouterr().err
    cfg = _write(tmp_path / "merge.yaml", base + "vis: &v {iou: 0.5}\neval:\n  <<: *v\n")
    assert cli_main(["pipeline", "--config", cfg]) == 2
    assert "merge keys" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_triton_engine_keys_as_the_pipeline_reads_them(tmp_path):
    """The Triton keys `_infer_triton` reads, typed and defaulted; max_new_tokens null stays null (the
    client then takes the served export's default) and resolved() keeps only the keys of the kind."""
    from coordexp.client.pipeline_config import validate

    cfg = validate({"name": "t", "output_dir": "o", "data": SAMPLE, "stages": ["infer"],
                    "infer": {"engine": {"kind": "triton", "urls": ["a:1", "b:2"], "timeout_s": 5},
                              "prompt": {"user_text": "find cats"}, "decoding": {"max_new_tokens": 8}}},
                   str(tmp_path))
    eng = cfg.infer.engine
    assert (eng.urls, eng.model, eng.concurrency, eng.retries) == (["a:1", "b:2"], "coordexp", 8, 5)
    assert (eng.timeout_s, eng.wait_for_server_s) == (5.0, 60.0) and isinstance(eng.timeout_s, float)
    assert cfg.infer.prompt.user_text == "find cats" and cfg.infer.prompt.coord_format is None
    assert cfg.generation_params().max_new_tokens == 8
    cfg = validate({"name": "t", "output_dir": "o", "data": SAMPLE, "stages": ["infer"],
                    "infer": {"engine": {"kind": "triton", "urls": ["a:1"]}}}, str(tmp_path))
    assert cfg.infer.decoding.max_new_tokens is None
    resolved = cfg.resolved()["infer"]
    assert resolved["decoding"]["max_new_tokens"] is None and "batch_size" not in resolved
    assert list(resolved["engine"]) == ["kind", "urls", "model", "concurrency", "timeout_s", "retries",
                                        "wait_for_server_s"]


def test_triton_engine_gets_every_setting_of_the_config(tmp_path, monkeypatch):
    """The pipeline's triton engine runs `infer_remote` (the `infer --url` path) with the config's
    servers, client options, prompt and decoding; no max_new_tokens -> the export's default."""
    from coordexp.client import cmd_infer, cmd_pipeline
    from coordexp.client.pipeline_config import validate

    calls = []
    monkeypatch.setattr(cmd_infer, "infer_remote", lambda *a, **kw: calls.append((a, kw)) or 2)
    cfg = validate({"name": "t", "output_dir": "o", "data": SAMPLE, "stages": ["infer"],
                    "infer": {"engine": {"kind": "triton", "urls": ["a:1", "b:2"], "timeout_s": 5},
                              "prompt": {"user_text": "find cats"}, "decoding": {"max_new_tokens": 8}}},
                   str(tmp_path))
    assert cmd_pipeline._infer_triton(cfg, str(tmp_path / "predictions.jsonl"))["rc"] == 2
    (urls, data, out, params, client), kw = calls[-1]
    assert urls == ["a:1", "b:2"] and client.timeout == 5.0 and kw["user_text"] == "find cats"
    assert params.max_new_tokens == 8 and kw["explicit_max_new_tokens"] is True
    cfg = validate({"name": "t", "output_dir": "o", "data": SAMPLE, "stages": ["infer"],
                    "infer": {"engine": {"kind": "triton", "urls": ["a:1"]}}}, str(tmp_path))
    cmd_pipeline._infer_triton(cfg, "p.jsonl")
    assert calls[-1][1]["explicit_max_new_tokens"] is False  # the client then takes the export's default


def test_every_problem_at_once_in_file_order(tmp_path):
    """Each key's own problems in the order of the schema (a section's unknown keys first), then the
    rules between keys; a value only out of range still takes part in those rules."""
    from coordexp.client.pipeline_config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate({"name": "a/b", "output_dir": "o", "data": "nope.jsonl", "stages": ["infer", "train"],
                  "infer": {"engine": {"kind": "tensorrt"}, "decoding": {"top_p": 0, "seed": "1"}},
                  "eval": {"metric": "coco", "iou_thrs": [0.5, "${t}"]}, "vis": {"min_size": 10, "max_size": 8}},
                 str(tmp_path))
    assert e.value.errors == [
        f"data: file not found: {tmp_path / 'nope.jsonl'} (relative paths are relative to the config file's folder)",
        "stages: unknown stage 'train' (expected infer, eval, vis)",
        "infer.engine.kind: expected one of torch, onnx, triton, got 'tensorrt'",
        "infer.decoding.top_p: must be > 0, got 0.0",
        "infer.decoding.seed: expected an integer, got str '1' (write it without quotes)",
        "eval.metric: unknown key; did you mean 'metrics'?",
        "eval.iou_thrs[1]: interpolation (${...}) is not supported: write the value itself",
        "vis.min_size: must be >= 16, got 10",
        "vis.max_size: must be >= 16, got 8",
        "name: must be a plain folder name (no '/', not '.' or '..'), got 'a/b'",
        "vis.max_size: must be >= vis.min_size (10), got 8",
    ]
    assert str(e.value).startswith("11 problems:\n  data: file not found")


def test_a_failing_stage_is_reported_and_exits_1(tmp_path, capsys):
    """Predictions of another dataset: eval and vis both fail (in their own processes), the run ends
    with status 1 and summary.json says why."""
    pred = _predictions(tmp_path / "given.jsonl")
    rows = _lines(pred)
    rows[1]["images"] = ["images/elsewhere.png"]
    _write(tmp_path / "given.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = _write(tmp_path / "p.yaml", BASE.format(data=SAMPLE, pred=pred) + "eval: {semantic: false, plots: false}\n")
    assert cli_main(["pipeline", "--config", cfg]) == 1
    summary = json.loads((tmp_path / "out" / "bad" / "summary.json").read_text())
    stages = summary["pipeline"]["stages"]
    assert stages["eval"]["status"] == stages["vis"]["status"] == "failed"
    assert "disagree" in stages["eval"]["error"] and "disagree" in stages["vis"]["error"]
    assert summary["pipeline"]["exit_status"] == 1 and "gt_vs_pred_error" in summary
    assert "FAILED" in capsys.readouterr().err


def test_the_shipped_config_validates_and_points_at_the_demo_val_set():
    """(issue 19) configs/pipeline.yaml is valid and runs the demo model on its own distribution."""
    from coordexp.client.pipeline_config import load_config

    from conftest import REPO_ROOT

    cfg = load_config(os.path.join(REPO_ROOT, "configs", "pipeline.yaml"))
    assert cfg.data == os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")
