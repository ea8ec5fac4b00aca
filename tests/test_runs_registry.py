"""The run registry: schema and migrations, concurrent registration, importing our run folders and
CoordExp's, the `runs` command and the infer/eval hooks (real SQLite, real eval)."""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3

import pytest

from coordexp.runs.folders import import_run_dir
from coordexp.runs.importers import ImportError_
from coordexp.runs.registry import MIGRATIONS, SCHEMA_VERSION, ImageRow, Registry, RegistryError, RunRecord

from runs_fixtures import DEMO_GT, drop_last_every, evaluate_dir, write_predictions


@pytest.fixture(autouse=True)
def _own_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("COORDEXP_REGISTRY", str(tmp_path / "default.sqlite"))


def test_a_new_registry_is_at_the_current_schema_in_wal_mode(tmp_path):
    with Registry(str(tmp_path / "r.sqlite")) as reg:
        assert reg.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in reg.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"runs", "images", "image_classes"} <= tables


def test_an_old_registry_is_migrated_and_keeps_its_runs(tmp_path):
    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO runs (kind, name, status, created_at) VALUES ('test', 'from v1', 'completed', 1.0)")
    db.commit()
    db.close()
    with Registry(path) as reg:
        assert reg.schema_version == SCHEMA_VERSION
        run = reg.get_run(1)
        assert run["name"] == "from v1" and run["vis_dir"] is None and run["timings"] == {}
        assert reg.add_run(RunRecord(kind="test", name="new", vis_dir="/v"), [ImageRow(0, "/a.png", 4, 4)]) == 2


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path):
    path = str(tmp_path / "new.sqlite")
    Registry(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RegistryError, match="schema version 99 is newer"):
        Registry(path)


def test_bad_records_are_refused_naming_the_run(tmp_path):
    with Registry(str(tmp_path / "r.sqlite")) as reg:
        with pytest.raises(RegistryError, match="run 'x': kind must be one of"):
            reg.add_run(RunRecord(kind="eval", name="x"))
        with pytest.raises(RegistryError, match="no run with id 7"):
            reg.get_run(7)


def _register_many(args: tuple[str, int, int]) -> list[int]:
    path, worker, n = args
    ids = []
    with Registry(path) as reg:
        for k in range(n):
            rows = [ImageRow(i, f"/img/{i}.png", 8, 8, gt=[{"desc": "a", "bbox": [0, 0, 1, 1], "match": 0}],
                             pred=[{"desc": "a", "bbox": [0, 0, 1, 1], "match": 0}], tp=1) for i in range(50)]
            ids.append(reg.add_run(RunRecord(kind="test", name=f"w{worker}-{k}"), rows))
    return ids


def test_processes_registering_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Registry(path).close()
    ctx = multiprocessing.get_context("spawn")  # separate interpreters, separate connections
    with ctx.Pool(4) as pool:
        ids = pool.map(_register_many, [(path, w, 15) for w in range(4)])
    flat = sorted(i for chunk in ids for i in chunk)
    assert flat == list(range(1, 61))
    with Registry(path) as reg:
        names = {r["name"] for r in reg.list_runs(limit=1000)}
        assert names == {f"w{w}-{k}" for w in range(4) for k in range(15)}
        assert reg.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 60 * 50


def test_our_run_folder_imports_with_eval_numbers_and_matches(tmp_path):
    run_dir = str(tmp_path / "a")
    write_predictions(run_dir, drop_last_every(5))
    evaluate_dir(run_dir)
    run, rows = import_run_dir(run_dir)
    m = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
    assert run.kind == "test" and run.status == "completed" and len(rows) == 50
    assert run.primary_metric_name == "bbox_AP" and run.primary_metric == pytest.approx(m["coco"]["bbox"]["AP"])
    assert run.metrics["f1ish@0.50_f1_full_micro"] == pytest.approx(m["f1ish"]["0.50"]["full"]["micro"]["f1"])
    assert run.dataset_path == os.path.abspath(DEMO_GT) and len(run.dataset_sha256) == 64
    assert run.checkpoint_sha256 == "ab" * 32 and run.params == {"max_new_tokens": 64}
    assert run.p50_ms == pytest.approx(10.0 + 24.5)  # latencies 10..59 ms
    # image 0 lost its last prediction: that GT object is missed, the others are matches
    r0 = rows[0]
    assert (r0.tp, r0.fp, r0.fn) == (len(r0.gt) - 1, 0, 1)
    assert r0.gt[-1]["match"] is None and all(o["match"] is not None for o in r0.pred)
    assert os.path.isfile(r0.path)
    assert sum(r.tp for r in rows) == m["f1ish"]["0.50"]["full"]["micro"]["tp"]
    assert {c["category"] for c in run.per_class} == set(m["categories"])


def _coordexp_dir(root, with_eval: bool = True) -> str:
    """A CoordExp run folder in its own formats (integer pixels, flat metrics, pred_idx/gt_idx)."""
    d = root / "coordexp_run"
    (d / "eval").mkdir(parents=True)
    recs = [{"image": "images/val_00000.png", "width": 128, "height": 128, "mode": "coord", "coord_mode": "pixel",
             "gt": [{"type": "bbox_2d", "points": [10, 10, 50, 50], "desc": "cat"},
                    {"type": "bbox_2d", "points": [60, 60, 100, 100], "desc": "dog"}],
             "pred": [{"type": "bbox_2d", "points": [11, 10, 50, 51], "desc": "cat"}], "errors": []},
            {"image": "images/val_00001.png", "width": 128, "height": 128, "mode": "coord", "coord_mode": "pixel",
             "gt": [{"type": "bbox_2d", "points": [0, 0, 20, 20], "desc": "cat"}],
             "pred": [{"type": "bbox_2d", "points": [0, 0, 20, 20], "desc": "dog"},
                      {"type": "poly", "points": [90, 90, 120, 90, 120, 120], "desc": "bird"}],
             "errors": ["invalid_geometry"]}]
    (d / "gt_vs_pred.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text(json.dumps({
        "mode": "coord", "backend": {"type": "hf", "model_checkpoint": "/ckpts/ablation-7"},
        "generation": {"temperature": 0.0, "max_new_tokens": 1024, "seed": 42},
        "infer": {"gt_jsonl": DEMO_GT, "prompt_variant": "coco_80"}}))
    (d / "resolved_config.json").write_text(json.dumps({"run": {"name": "ablation-7"}}))
    if with_eval:
        (d / "eval" / "metrics.json").write_text(json.dumps(
            {"metrics": {"bbox_AP": 0.25, "f1ish@0.50_f1_full_micro": 0.4}, "counters": {"images": 2}}))
        (d / "eval" / "matches.jsonl").write_text(
            json.dumps({"image_id": 0, "matches": [{"pred_idx": 0, "gt_idx": 0, "iou": 0.95, "sem_ok": True}],
                        "unmatched_gt_indices": [1]}) + "\n"
            + json.dumps({"image_id": 1, "matches": [{"pred_idx": 0, "gt_idx": 0, "iou": 1.0, "sem_ok": False}]})
            + "\n")
        (d / "eval" / "per_class.csv").write_text("category,AP\ncat,0.5\ndog,0.0\n")
    return str(d)


def test_a_coordexp_run_folder_imports(tmp_path):
    run, rows = import_run_dir(_coordexp_dir(tmp_path))
    assert run.kind == "test" and run.engine == "coordexp:hf" and run.checkpoint_path == "/ckpts/ablation-7"
    assert run.metrics == {"bbox_AP": 0.25, "f1ish@0.50_f1_full_micro": 0.4} and run.primary_metric == 0.25
    assert run.params["max_new_tokens"] == 1024 and run.params["resolved_config"]["run"]["name"] == "ablation-7"
    assert run.per_class == [{"category": "cat", "AP": 0.5}, {"category": "dog", "AP": 0.0}]
    # image paths resolve beside the GT JSONL its summary names
    assert rows[0].path == os.path.join(os.path.dirname(DEMO_GT), "images", "val_00000.png")
    assert (rows[0].tp, rows[0].fp, rows[0].fn) == (1, 0, 1)
    # a box in the right place with the wrong label: an FP and an FN; the polygon is an FP too
    assert (rows[1].tp, rows[1].fp, rows[1].fn) == (0, 2, 1) and rows[1].error == "invalid_geometry"
    assert rows[1].pred[1]["bbox"] == [90.0, 90.0, 120.0, 120.0]


def test_a_coordexp_folder_without_eval_is_matched_by_our_matcher(tmp_path):
    run, rows = import_run_dir(_coordexp_dir(tmp_path, with_eval=False))
    assert run.kind == "test" and (rows[0].tp, rows[0].fn) == (1, 1) and rows[1].tp == 0
    assert run.metrics["f1ish@0.50_recall_full_micro"] == pytest.approx(1 / 3)


def test_broken_run_folders_name_the_file_and_line(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    with pytest.raises(ImportError_, match="neither predictions.jsonl"):
        import_run_dir(str(d))
    (d / "gt_vs_pred.jsonl").write_text('{"image": "a.png", "width": 4, "height": 4, "gt": [], "pred": []}\n'
                                        '{"image": "b.png", "gt": []}\n')
    with pytest.raises(ImportError_, match=r"gt_vs_pred.jsonl line 2: needs image \(path\), width and height"):
        import_run_dir(str(d))


def test_the_runs_command_lists_shows_exports_and_deletes(tmp_path, capsys):
    from coordexp.client.cli import main

    reg = str(tmp_path / "r.sqlite")
    run_dir = str(tmp_path / "a")
    write_predictions(run_dir, n=10, gt=DEMO_GT)
    assert main(["runs", "import", run_dir, "--registry", reg]) == 0
    assert "registered infer run 1: 10 images" in capsys.readouterr().out
    assert main(["runs", "import", _coordexp_dir(tmp_path), "--registry", reg]) == 0
    assert main(["runs", "list", "--registry", reg, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [r["id"] for r in runs] == [2, 1]
    assert main(["runs", "list", "--registry", reg, "--kind", "test"]) == 0
    out = capsys.readouterr().out
    assert "bbox_AP=0.250" in out and "coordexp_run" in out and "\n   1 " not in out
    assert main(["runs", "show", "1", "--registry", reg]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 10
    assert main(["runs", "export", "2", "--format", "csv", "--registry", reg]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("idx,path") and len(lines) == 3
    out = str(tmp_path / "coco.json")
    assert main(["runs", "export", "2", "--format", "coco", "--out", out, "--registry", reg]) == 0
    coco = json.load(open(out))
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "bird"] and len(coco["annotations"]) == 3
    assert coco["annotations"][0]["bbox"] == [10.0, 10.0, 40.0, 40.0] and len(coco["detections"]) == 3
    assert main(["runs", "delete", "1", "--registry", reg]) == 0
    assert main(["runs", "show", "1", "--registry", reg]) == 2
    assert "no run with id 1" in capsys.readouterr().err


def test_eval_registers_a_test_run_replacing_the_inference_job(tmp_path, capsys):
    from coordexp.client.cli import main

    reg = str(tmp_path / "hooks.sqlite")
    run_dir = str(tmp_path / "b")
    pred = write_predictions(run_dir, n=8)
    from coordexp.runs.register import RegisterOptions, register_run

    assert register_run(pred, RegisterOptions(registry=reg), gt_path=DEMO_GT, quiet=True) == 1
    argv = ["eval", "--pred", pred, "--gt", DEMO_GT, "--out", os.path.join(run_dir, "eval"), "--no-semantic",
            "--no-plots", "--registry", reg]
    assert main(argv) == 0
    assert "registered test run 1 (50 images)" in capsys.readouterr().err  # the GT has 50: 42 missing
    with Registry(reg) as r:
        # the folder's job became a test run, its id kept, the change in its history
        assert [(x["id"], x["kind"]) for x in r.list_runs()] == [(1, "test")]
        (change,) = r.history(1)
        assert change["before"]["kind"] == "infer" and change["after"]["kind"] == "test"
    assert main(argv[:-2] + ["--no-register", "--quiet"]) == 0
    with Registry(reg) as r:
        assert len(r.list_runs()) == 1


def test_the_pipeline_registers_its_run_folder_as_a_test_run(tmp_path, capsys):
    from coordexp.client.cli import main

    reg = str(tmp_path / "pipe.sqlite")
    given = write_predictions(str(tmp_path / "given"), drop_last_every(10))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: reg\noutput_dir: out\ndata: {DEMO_GT}\npredictions: {given}\nstages: [eval]\n"
                   "eval: {semantic: false, plots: false, iou_thrs: [0.5]}\n")
    assert main(["pipeline", "--config", str(cfg), "--registry", reg, "--run-name", "ablation-1"]) == 0
    with Registry(reg) as r:
        (run,) = r.list_runs()
        assert (run["kind"], run["name"], run["status"], run["num_images"]) == ("test", "ablation-1", "completed", 50)
        assert run["run_dir"] == str(tmp_path / "out" / "reg") and run["primary_metric_name"] == "bbox_AP"
        assert [im["idx"] for im in r.all_images(run["id"]) if im["fn"]] == [0, 10, 20, 30, 40]
    assert main(["pipeline", "--config", str(cfg), "--registry", reg, "--no-register"]) == 0
    with Registry(reg) as r:
        assert len(r.list_runs()) == 1
