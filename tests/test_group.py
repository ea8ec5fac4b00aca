"""`coordexp-client group` (Stage-A): discovery, profiles, records, and whole runs on a generated
mission tree against the real served model (the session `server` fixture) and the torch reference."""
from __future__ import annotations

import json
import os

import pytest

from coordexp.client.cli import main as client_main
from coordexp.group import records as R
from coordexp.group.discover import discover, natural_key, sample_groups
from coordexp.group.profiles import ProfileError, load_profile
from coordexp.fixtures.group_tree import FAIL, MISSION_A, MISSION_B, PASS, QC, build_tree

MAX_NEW = "6"  # short answers: the tests check coverage and shapes, not the text


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("missions")
    return str(root), build_tree(str(root))


def group_cli(*args, capsys=None):
    rc = client_main(["group", "--no-progress", "--max-new-tokens", MAX_NEW, *args])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main_and_errors(out, mission):
    base = os.path.join(out, f"{mission}_stage_a")
    return lines(base + ".jsonl"), lines(base + ".errors.jsonl")


# ---------------------------------------------------------------- without a model

def test_discovery_order_ids_and_what_is_skipped(tree):
    root, expected = tree
    missions = discover(root)
    assert [m.name for m in missions] == sorted(expected)
    for m in missions:
        got = [(g.label, g.group_id, g.names) for g in [*m.groups, *m.empty_groups]]
        assert got == expected[m.name]
    a = next(m for m in missions if m.name == MISSION_A)
    # the same QC id under both label folders is two groups (a resubmission)
    assert [g.label for g in a.groups if g.group_id == QC] == ["fail", "pass"]
    assert [g.group_id for g in a.empty_groups] == ["empty_group"]
    assert sorted(os.path.basename(p) for p in a.unknown) == ["notes.txt", "其他"]
    assert sorted(["img10", "img2", "IMG1"], key=natural_key) == ["IMG1", "img2", "img10"]
    with pytest.raises(FileNotFoundError, match="mission folder not found: .*nope .*missions: "):
        discover(root, "nope")


def test_sampling_is_reproducible_and_per_label(tree):
    root, _ = tree
    picks = []
    for seed in (1, 1, 2):
        m = discover(root, MISSION_A)[0]
        sample_groups(m, 1, 1, seed)
        picks.append([(g.label, g.group_id) for g in m.groups])
        assert m.sampling == {"pass_total": 2, "pass_selected": 1, "fail_total": 2, "fail_selected": 1, "seed": seed}
        assert [g.group_id for g in m.empty_groups] == ["empty_group"]  # always reported
    assert picks[0] == picks[1] and sorted(lab for lab, _ in picks[0]) == ["fail", "pass"]


def test_profiles_are_data_files_with_the_mission_focus(tmp_path):
    p = load_profile("summary").for_mission("挡风板安装检查")
    assert "任务重点：关注BBU设备以及挡风板" in p.user and "{mission}" not in p.user + p.system
    assert p.served_user_text().startswith(p.system.strip()) and p.served_user_text().endswith(p.user.strip())
    assert load_profile("summary_en").for_mission("Mission X").user.strip().endswith("Focus: Mission X")
    custom = tmp_path / "mine.yaml"
    custom.write_text("system: S {mission}\nuser: 'U {类别: 1} {mission}'\nmissions:\n  m1:\n    focus: F1\n"
                      "    user: V {mission}\n", encoding="utf-8")
    prof = load_profile(str(custom))
    assert (prof.for_mission("m1").system, prof.for_mission("m1").user) == ("S F1", "V F1")
    assert prof.for_mission("m2").user == "U {类别: 1} m2"  # braces in the text stay
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: S\nuser: U\nmissons: {}\n")
    with pytest.raises(ProfileError, match=r"bad.yaml: unknown keys \['missons'\]"):
        load_profile(str(bad))
    bad.write_text("system: S\n")
    with pytest.raises(ProfileError, match="bad.yaml: 'user' must be a non-empty text"):
        load_profile(str(bad))
    with pytest.raises(ProfileError, match="not found.*summary_en"):
        load_profile("no-such-profile")


def test_clean_text_and_the_record_rules():
    raw = "<|im_start|>assistant\n<think>\n\n</think>\n  两个  BBU设备，\t挡风板已安装 <|im_end|>\n\n"
    assert R.clean_text(raw) == "两个 BBU设备， 挡风板已安装"
    assert R.clean_text("<|im_end|>  \n") == ""
    good = {"group_id": "g", "mission": "m", "label": "pass", "images": ["a.jpg", "b.jpg"],
            "per_image": {"image_1": "x", "image_2": "y"}}
    assert R.validate_record(good).shape == "current"
    old = {**good, "images": ["/abs/a.jpg", "/abs/b.jpg"], "per_image": {"图片_1": "x", "图片_2": "y"},
           "timestamp": "2025-01-01T00:00:00Z"}
    rec = R.validate_record(old)
    assert (rec.shape, rec.images, rec.per_image) == ("legacy", ["a.jpg", "b.jpg"], good["per_image"])
    for change, msg in [({"per_image": {"image_1": "x"}}, r"keys must be exactly image_1 \.\. image_2"),
                        ({"per_image": {"image_1": "x", "image_2": " "}}, "per_image.image_2 must be a non-empty"),
                        ({"label": "ok"}, "'label' must be pass or fail"), ({"images": []}, "non-empty list"),
                        ({"group_id": None}, "'group_id' is required")]:
        with pytest.raises(R.RecordError, match=msg):
            R.validate_record({**good, **change}, "f.jsonl:3")


def test_answers_in_any_order_become_lines_in_group_order(tree):
    import io

    from coordexp.group.backends import ImageAnswer, ImageJob
    from coordexp.group.run import GroupWriter, judge

    assert judge(ImageAnswer(raw="<|im_end|>\n"), "summary")[2]["error"] == R.EMPTY_ANSWER
    assert judge(ImageAnswer(raw="not json at all"), "summary")[2] is None  # text mode: free text is fine
    assert judge(ImageAnswer(raw="not json at all"), "detect")[2]["error"] == R.PARSE_FAILED
    assert judge(ImageAnswer(error="generation_failed", message="server x: [INTERNAL] boom"), "summary")[2] == \
        {"error": "generation_failed", "message": "server x: [INTERNAL] boom"}
    root, _ = tree
    m = discover(root, MISSION_A)[0]
    groups = [*m.groups, *m.empty_groups]
    main, errors = io.StringIO(), io.StringIO()
    w = GroupWriter(groups, main, errors, "summary", legacy=False)
    jobs = [ImageJob(gi, ii, p) for gi, g in enumerate(groups) for ii, p in enumerate(g.images)]
    for job in reversed(jobs):  # the last image first: nothing may be written before group 0 is done
        raw = "" if (job.group, job.index) == (0, 1) else f"text {job.group}.{job.index}"
        w.add(job, ImageAnswer(raw=raw))
        assert (main.getvalue() + errors.getvalue() == "") == (job != jobs[0])
    out = [json.loads(x) for x in main.getvalue().splitlines()]
    err = [json.loads(x) for x in errors.getvalue().splitlines()]
    # the fail QC group had one empty answer (the corrupt image is only detected by the backends)
    assert [(r["label"], r["group_id"]) for r in out] == [("fail", "corrupt_group"), ("pass", QC), ("pass", "site_042")]
    assert [(e["group_id"], [x["error"] for x in e["errors"]]) for e in err] == \
        [(QC, [R.EMPTY_ANSWER]), ("empty_group", [R.EMPTY_GROUP])]
    assert err[0]["errors"] == [{"image": f"{QC}_2.jpg", "index": 2, "error": R.EMPTY_ANSWER,
                                 "message": "the answer is empty ('')"}]
    with pytest.raises(ValueError, match="two answers for image 1"):
        w.add(jobs[0], ImageAnswer(raw="again"))


# ---------------------------------------------------------------- served runs

@pytest.fixture(scope="module")
def served_run(tree, server, tmp_path_factory):
    root, expected = tree
    out = str(tmp_path_factory.mktemp("group_served"))
    rc = client_main(["group", "--no-progress", "--max-new-tokens", MAX_NEW, "--input-dir", root,
                      "--output-dir", out, "--url", server.grpc_url, "--concurrency", "8"])
    return rc, out, expected


def test_served_run_accounts_for_every_group_in_order(served_run):
    rc, out, expected = served_run
    assert rc == 0
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["accounted"] and summary["status"] == "complete"
    for mission, groups in expected.items():
        main, errors = main_and_errors(out, mission)
        assert len(main) + len(errors) == len(groups)  # nothing lost
        s = summary["missions"][mission]
        assert (s["groups_in"], s["lines_main"], s["lines_errors"]) == (len(groups), len(main), len(errors))
        for label in ("pass", "fail"):
            b = s["by_label"][label]
            assert b["accounted"] and b["groups"] == sum(g[0] == label for g in groups)
        # discovery order is kept within each file
        order = [(g[0], g[1], g[2]) for g in groups]
        for rows in (main, errors):
            keys = [(r["label"], r["group_id"], r["images"]) for r in rows]
            assert keys == [k for k in order if k in keys]
        for r in main:  # every main line passes the group-level stage's rules
            rec = R.validate_record(r)
            assert rec.shape == "current" and len(r["raw_texts"]) == len(r["clean_texts"]) == len(r["images"])
            assert [r["per_image"][f"image_{i}"] for i in range(1, len(r["images"]) + 1)] == r["clean_texts"]
            assert r["clean_texts"] == [R.clean_text(t) for t in r["raw_texts"]]
        for r in errors:
            assert r["errors"] and all(e["error"] and e["message"] for e in r["errors"])
    _, errors_a = main_and_errors(out, MISSION_A)
    by_id = {r["group_id"]: r for r in errors_a}
    corrupt = by_id["corrupt_group"]["errors"]
    assert [(e["image"], e["index"], e["error"]) for e in corrupt if e["image"] == "bad.jpg"] == \
        [("bad.jpg", 1, "image_load_failed")]
    assert by_id["empty_group"]["errors"][0]["error"] == "empty_group"
    assert summary["missions"][MISSION_A]["empty_groups"] == [f"{MISSION_A}/{PASS}/empty_group"]
    assert any(p.endswith("其他") for p in summary["missions"][MISSION_A]["unknown_paths"])
    # the served model answered text for the healthy groups (at least one record per mission)
    assert all(main_and_errors(out, m)[0] for m in expected)


def test_legacy_keys_and_resume(served_run, tree, server, tmp_path):
    _, full_out, _ = served_run
    root, _ = tree
    full_main, full_errors = main_and_errors(full_out, MISSION_A)
    url = ["--input-dir", root, "--url", server.grpc_url, "--mission", MISSION_A]
    # interrupted: the first main line kept, a torn second one, no errors file
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    main_path = os.path.join(out, f"{MISSION_A}_stage_a.jsonl")
    with open(main_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(full_main[0], ensure_ascii=False) + "\n" + '{"group_id": "QC-')
    rc, _ = group_cli(*url, "--output-dir", out, "--resume")
    assert rc == 0
    main, errors = main_and_errors(out, MISSION_A)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "timestamp"} for r in rows]  # noqa: E731
    assert main == full_main and strip(errors) == strip(full_errors)  # no group twice, none lost
    rc = client_main(["group", "--no-progress", *url, "--output-dir", out, "--resume", "--legacy-keys"])
    assert rc == 2 and main_and_errors(out, MISSION_A)[0] == full_main  # refused: one shape per file

    # --legacy-keys: 图片_N keys and a timestamp; and resume continues an old tool's file in its shape
    legacy_out = str(tmp_path / "legacy")
    rc, _ = group_cli(*url, "--output-dir", legacy_out, "--legacy-keys")
    legacy, _ = main_and_errors(legacy_out, MISSION_A)
    assert rc == 0 and len(legacy) == len(full_main)
    for r, cur in zip(legacy, full_main):
        assert sorted(r["per_image"]) == sorted(f"图片_{i}" for i in range(1, len(r["images"]) + 1))
        assert r["timestamp"].endswith("Z") and R.validate_record(r).per_image == cur["per_image"]
    old_out = str(tmp_path / "old_tool")
    os.makedirs(old_out)
    first = legacy[0]
    old_line = {"group_id": first["group_id"], "mission": MISSION_A, "label": first["label"],
                "images": [os.path.join(root, MISSION_A, FAIL, first["group_id"], n) for n in first["images"]],
                "per_image": {k: "旧工具的摘要" for k in first["per_image"]}, "timestamp": "2025-01-01T00:00:00Z"}
    with open(os.path.join(old_out, f"{MISSION_A}_stage_a.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(old_line, ensure_ascii=False) + "\n")
    rc = client_main(["group", "--no-progress", "--max-new-tokens", MAX_NEW, *url, "--output-dir", old_out,
                      "--resume"])
    resumed, _ = main_and_errors(old_out, MISSION_A)
    assert rc == 0 and resumed[0] == old_line and len(resumed) == len(full_main)
    assert all(R.validate_record(r).shape == "legacy" for r in resumed)


def test_local_torch_gives_the_served_records(served_run, tree, exported, tmp_path):
    _, served_out, _ = served_run
    root, _ = tree
    out = str(tmp_path / "local")
    rc = client_main(["group", "--no-progress", "--max-new-tokens", MAX_NEW, "--input-dir", root,
                      "--output-dir", out, "--mission", MISSION_B, "--local", exported[0],
                      "--prompt-layout", "served", "--batch-size", "1"])
    assert rc == 0
    local, local_err = main_and_errors(out, MISSION_B)
    served, served_err = main_and_errors(served_out, MISSION_B)
    assert local == served and local_err == served_err


def test_detect_task_with_the_demo_model(tree, tmp_path):
    from conftest import DEMO_CKPT

    root, expected = tree
    out = str(tmp_path / "detect")
    rc = client_main(["group", "--no-progress", "--max-new-tokens", "48", "--input-dir", root, "--output-dir", out,
                      "--mission", MISSION_B, "--local", DEMO_CKPT, "--task", "detect", "--batch-size", "8"])
    main, errors = main_and_errors(out, MISSION_B)
    assert rc == 0 and len(main) + len(errors) == len(expected[MISSION_B])
    assert main, "the demo model answers CoordJSON"
    for r in main:
        assert len(r["preds"]) == len(r["images"])
        assert all(isinstance(p, list) for p in r["preds"]) and any(r["preds"])
        assert all(set(o) >= {"desc"} for p in r["preds"] for o in p)


def test_bad_input_exits_2_with_one_clear_line(tree, tmp_path, capsys):
    root, _ = tree
    rc, err = group_cli("--input-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"),
                        "--local", "x", capsys=capsys)
    assert rc == 2 and "cannot load torch engine from x: checkpoint folder not found: x" in err
    rc, err = group_cli("--input-dir", root, "--output-dir", str(tmp_path / "o"), capsys=capsys)
    assert rc == 2 and "give either --local CKPT or --url" in err
    rc, err = group_cli("--input-dir", root, "--output-dir", str(tmp_path / "o"), "--url", "127.0.0.1:9",
                        "--timeout", "2", capsys=capsys)
    assert rc == 2 and "cannot reach a Triton gRPC server at 127.0.0.1:9" in err
    out = tmp_path / "broken"
    out.mkdir()
    (out / f"{MISSION_B}_stage_a.jsonl").write_text('{"group_id": 1}\n{"x": 2}\n', encoding="utf-8")
    from conftest import DEMO_CKPT

    rc, err = group_cli("--input-dir", root, "--output-dir", str(out), "--mission", MISSION_B, "--resume",
                        "--local", DEMO_CKPT, capsys=capsys)
    assert rc == 2 and f"{MISSION_B}_stage_a.jsonl:1: 'group_id' must be a str" in err
