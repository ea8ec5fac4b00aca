"""Records you can trust (issue 25): a registry entry's metrics always belong to its predictions, ids stay
put, interrupts never hang, truncation is visible, served runs name their checkpoint, GT and prediction
images match by the files they reach, `group` never replaces an earlier run silently."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from coordexp.generation import EngineDefaults, GenerationParams, GenerationResult
from coordexp.prompt import PromptSpec

from conftest import REPO_ROOT, SAMPLE_DIR


class BoxEngine(EngineDefaults):
    """Answers every image with one box, cut at the token limit when `cut` (finish_reason length)."""

    name = "box"
    prompt = PromptSpec()

    def __init__(self, cut: bool = False):
        self.cut = cut

    def generate_batch(self, images, params):
        text = '{"objects": [{"desc": "red square", "bbox_2d": [100, 100, 600, 600]}]}'
        n = params.max_new_tokens if self.cut else 5
        return [GenerationResult(text=text, token_ids=[1] * n, finish_reason="length" if self.cut else "stop")
                for _ in images]

    def describe(self):
        return {"engine": self.name}


def _data(tmp_path, n=6) -> str:
    lines = open(os.path.join(SAMPLE_DIR, "sample.jsonl")).read().splitlines()[:n]
    if not (tmp_path / "images").exists():
        shutil.copytree(os.path.join(SAMPLE_DIR, "images"), tmp_path / "images")
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data.jsonl")


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordexp.client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


# ============================================================================ metrics tied to predictions
def test_a_rerun_into_an_evaluated_folder_is_refused_and_force_archives_the_eval(tmp_path):
    from coordexp.eval import evaluate
    from coordexp.run_output import OutputExists
    from coordexp.runner import run_dataset
    from coordexp.runs.register import RegisterOptions, register_run
    from coordexp.runs.registry import Registry

    data = _data(tmp_path)
    out = tmp_path / "run_b" / "predictions.jsonl"
    reg = RegisterOptions(registry=str(tmp_path / "r.sqlite"))
    run_dataset(data, str(out), BoxEngine(), GenerationParams(max_new_tokens=48), progress=False)
    evaluate(str(out), data, str(tmp_path / "run_b" / "eval"), metrics="f1ish", semantic=False, plots=False)
    run_id = register_run(str(out), reg, gt_path=data, eval_dir=str(tmp_path / "run_b" / "eval"), quiet=True)
    with Registry(reg.registry) as r:
        assert r.get_run(run_id)["kind"] == "test" and r.get_run(run_id)["metrics"]
    # the reported case: a new run into that folder, no --resume: refused, nothing replaced
    with pytest.raises(OutputExists, match="already holds 6 prediction lines of an earlier run and its evaluation"):
        run_dataset(data, str(out), BoxEngine(cut=True), GenerationParams(max_new_tokens=256), progress=False)
    assert "finish_reason" in out.read_text() and os.path.isdir(tmp_path / "run_b" / "eval")
    # --force replaces it: the old evaluation is archived, the entry (same id) holds no metrics of it
    run_dataset(data, str(out), BoxEngine(cut=True), GenerationParams(max_new_tokens=256), progress=False, force=True)
    archived = [p for p in os.listdir(tmp_path / "run_b") if p.startswith("eval.replaced-")]
    assert len(archived) == 1 and not os.path.exists(tmp_path / "run_b" / "eval")
    assert register_run(str(out), reg, gt_path=data, quiet=True) == run_id
    with Registry(reg.registry) as r:
        e = r.get_run(run_id)
        assert e["kind"] == "infer" and e["metrics"] == {} and e["params"]["max_new_tokens"] == 256
        assert [h["after"]["kind"] for h in r.history(run_id)] == ["infer"]


def test_metrics_of_changed_predictions_are_never_shown(tmp_path):
    """The eval names the digest of the predictions it scored: changed lines (a resume that added some,
    an edit) leave its metrics out of the entry, with a note saying why."""
    from coordexp.eval import evaluate
    from coordexp.runner import run_dataset
    from coordexp.runs.register import RegisterOptions, register_run
    from coordexp.runs.registry import Registry

    data = _data(tmp_path)
    out = tmp_path / "run" / "predictions.jsonl"
    reg = RegisterOptions(registry=str(tmp_path / "r.sqlite"))
    run_dataset(data, str(out), BoxEngine(), GenerationParams(), progress=False)
    m = evaluate(str(out), data, str(tmp_path / "run" / "eval"), metrics="f1ish", semantic=False, plots=False)
    assert len(m["inputs"]["pred_sha256"]) == 64
    run_id = register_run(str(out), reg, gt_path=data, quiet=True)
    with out.open("a") as f:  # the predictions change after their evaluation
        f.write("")
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1] + [lines[-1].replace("red square", "blue circle")]) + "\n")
    assert register_run(str(out), reg, gt_path=data, quiet=True) == run_id
    with Registry(reg.registry) as r:
        e = r.get_run(run_id)
    assert e["kind"] == "infer" and e["metrics"] == {} and "computed from other predictions" in e["note"]


# ============================================================================ stable ids
def test_ids_stay_across_re_registration_and_a_no_op_resume(tmp_path):
    from coordexp.client.cli import main
    from coordexp.runs.registry import Registry

    data = _data(tmp_path, 4)
    ckpt = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")
    reg = str(tmp_path / "r.sqlite")
    out = str(tmp_path / "run" / "predictions.jsonl")
    argv = ["infer", "--local", ckpt, "--data", data, "--out", out, "--max-new-tokens", "8", "--no-progress",
            "--registry", reg]
    assert main(argv) == 0
    before = json.loads((tmp_path / "run" / "summary.json").read_text())
    with Registry(reg) as r:
        (entry,) = r.list_runs()
    assert main(["runs", "import", str(tmp_path / "run"), "--registry", reg]) == 0
    assert main(argv + ["--resume"]) == 0  # complete already: nothing to do, nothing changes
    after = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert after == before and after["images_per_s"] > 0
    with Registry(reg) as r:
        assert [x["id"] for x in r.list_runs()] == [entry["id"]] and r.history(entry["id"]) == []


# ============================================================================ interrupts
def test_a_batch_cancelled_before_it_started_does_not_hang_the_clean_up():
    # the pool's shutdown cancels batches not yet started; concurrent.futures.wait() never reports such a
    # future, and the clean-up after an interrupt waited for it forever (a hang in CI, 1 run in ~40)
    import concurrent.futures
    import threading

    from coordexp.runner import _Loop

    written = []
    loop = _Loop(BoxEngine(), GenerationParams(), writer=None, bar=None, line_extra={})
    loop.write = lambda batch, results: written.append(batch)
    never_started = concurrent.futures.Future()
    assert never_started.cancel()
    loop.in_flight[never_started] = ["batch"]
    t = threading.Thread(target=loop.reap, args=(True,), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive() and not loop.in_flight and written == []  # dropped (redone on --resume), not written


def test_the_first_signal_is_acted_on_at_a_safe_point_and_a_second_one_at_once():
    # raised where it lands, KeyboardInterrupt can leave a lock taken (wait() takes its futures' locks one by one)
    from coordexp.runner import deferred_interrupts

    line_done = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts() as d:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(200):  # the handler runs in here; nothing is raised where it lands
                time.sleep(0.001)
            assert d.pending == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                d.raise_pending()  # the run loop's check
            with d.critical():  # a line being written: even a second signal waits for it
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                line_done = True
            raise AssertionError("the second signal is raised right after the line")
    assert line_done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def _interrupt_once(url: str, data: str, out: str, concurrency: int, rng: random.Random) -> tuple[float, int]:
    """One infer over gRPC interrupted at a random moment: (seconds from the signal to the exit, rc)."""
    p = subprocess.Popen([sys.executable, "-m", "coordexp.client.cli", "infer", "--url", url, "--data", data, "--out",
                          out, "--concurrency", str(concurrency), "--no-progress", "--no-register", "--force"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT)
    # some interrupts land while the lines are flowing, some at start-up, some late
    deadline = time.monotonic() + rng.uniform(1.0, 5.0)
    while time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    sig = rng.choice([signal.SIGINT, signal.SIGTERM])
    t0 = time.monotonic()
    if p.poll() is None:
        p.send_signal(sig)
    try:
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    return time.monotonic() - t0, rc


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("concurrency", [4, 8])
def test_twenty_random_interrupts_each_stop_within_ten_seconds_with_a_valid_prefix(server, tmp_path, concurrency):
    lines = open(os.path.join(SAMPLE_DIR, "sample.jsonl")).read().splitlines()
    data = tmp_path / "many.jsonl"
    data.write_text("\n".join(lines * (1200 // len(lines) + 1)) + "\n")  # longer than any interrupt's moment
    shutil.copytree(os.path.join(SAMPLE_DIR, "images"), tmp_path / "images")
    rng = random.Random(concurrency)
    for k in range(20):
        out = tmp_path / f"i{k}" / "predictions.jsonl"
        seconds, rc = _interrupt_once(server.grpc_url, str(data), str(out), concurrency, rng)
        assert seconds < 10, (k, seconds)
        if rc in (-signal.SIGINT, -signal.SIGTERM):  # the signal came while Python started up or shut down
            done = out.exists() and json.loads((out.parent / "summary.json").read_text())["status"] == "complete"
            assert not out.exists() or done, (k, rc)
            continue
        assert rc in (0, 130), (k, rc)
        if not out.exists():  # interrupted before the run opened its output
            continue
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["image_id"] for r in rows] == list(range(len(rows)))  # a valid prefix
        s = json.loads((out.parent / "summary.json").read_text())
        assert s["records_written"] == len(rows)
        if rc == 130:
            assert s["status"] == "interrupted" and s["interrupted"] is True and s["seconds"] < 60


# ============================================================================ truncation
def test_answers_cut_at_the_limit_are_counted_warned_and_can_be_left_out(tmp_path, capsys):
    from coordexp.client.cmd_infer import report
    from coordexp.eval import evaluate
    from coordexp.runner import run_dataset

    data = _data(tmp_path)
    out = tmp_path / "run" / "predictions.jsonl"
    s = run_dataset(data, str(out), BoxEngine(cut=True), GenerationParams(max_new_tokens=48), progress=False)
    d = s.to_dict()
    assert d["finish_reasons"] == {"stop": 0, "length": 6, "error": 0}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finish_reasons"]["length"] == 6
    assert report(d, str(out)) == 0
    got = capsys.readouterr()
    assert "0 complete, 6 cut at the token limit" in got.out
    assert "warning: 6 of 6 answers hit the token limit (max_new_tokens 48)" in got.err
    m = evaluate(str(out), data, None, metrics="f1ish", semantic=False)
    assert m["truncated"] == {"answers": 6, "left_out": False}
    assert "6 of 6 answers were cut at the token limit" in capsys.readouterr().err
    m = evaluate(str(out), data, None, metrics="f1ish", semantic=False, complete_only=True)
    assert m["truncated"]["left_out"] and m["counts"]["images"] == 0


# ============================================================================ served runs name their checkpoint
@pytest.mark.slow
@pytest.mark.triton
def test_a_served_run_records_its_checkpoint_and_the_filter_finds_it(server, exported, tmp_path):
    from coordexp.client.cli import main
    from coordexp.runs.registry import Registry

    data = _data(tmp_path, 3)
    reg = str(tmp_path / "r.sqlite")
    r = _cli("infer", "--url", server.grpc_url, "--data", data, "--out", str(tmp_path / "s" / "predictions.jsonl"),
             "--no-progress", "--registry", reg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "complete"  # the summary on stdout
    with Registry(reg) as rr:
        (e,) = rr.list_runs()
    ckpt = exported[0]
    assert e["checkpoint_path"] == ckpt and e["checkpoint_sha256"]
    for needle in (os.path.basename(ckpt), ckpt, e["checkpoint_sha256"][:10]):
        with Registry(reg) as rr:
            assert [x["id"] for x in rr.list_runs(checkpoint=needle)] == [e["id"]], needle
    assert main(["runs", "show", str(e["id"]), "--registry", reg]) == 0


# ============================================================================ image paths
def test_gt_with_absolute_paths_matches_predictions_with_relative_ones(tmp_path):
    from coordexp.eval import evaluate
    from coordexp.runner import run_dataset

    data = _data(tmp_path)
    out = tmp_path / "run" / "predictions.jsonl"
    run_dataset(data, str(out), BoxEngine(), GenerationParams(), progress=False)
    absolute = tmp_path / "abs.jsonl"
    rows = [json.loads(x) for x in open(data).read().splitlines()]
    for d in rows:
        d["images"] = [str(tmp_path / d["images"][0])]
    absolute.write_text("".join(json.dumps(d) + "\n" for d in rows))
    assert evaluate(str(out), str(absolute), None, metrics="f1ish", semantic=False)["counts"]["images"] == 6
    other = tmp_path / "other.jsonl"  # the same spelling would not do: other files are refused
    rows[1]["images"] = [str(tmp_path / "images" / "sample_00000.png")]
    other.write_text("".join(json.dumps(d) + "\n" for d in rows))
    with pytest.raises(ValueError, match="disagree with the GT's"):
        evaluate(str(out), str(other), None, metrics="f1ish", semantic=False)


# ============================================================================ group
def test_group_refuses_an_existing_output_without_resume_or_force(tmp_path):
    from coordexp.group.run import GroupRunOptions, run_group_missions
    from coordexp.fixtures.group_tree import MISSION_A, build_tree

    root = str(tmp_path / "tree")
    build_tree(root)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{MISSION_A}_stage_a.jsonl").write_text('{"group_id": "g"}\n')
    with pytest.raises(FileExistsError, match="already holds an earlier run's records"):
        run_group_missions(GroupRunOptions(input_dir=root, output_dir=str(out), mission=MISSION_A), backend=None)
    assert (out / f"{MISSION_A}_stage_a.jsonl").read_text() == '{"group_id": "g"}\n'
