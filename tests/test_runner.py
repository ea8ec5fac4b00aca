"""Dataset runs keep the contract: one line per input line, in order, errors per line, resumable."""
import json
import os

import pytest

from coordexp.dataset import iter_dataset
from coordexp.generation import EngineDefaults, GenerationParams, GenerationResult
from coordexp.prompt import PromptSpec
from coordexp.run_output import PredictionWriter
from coordexp.runner import run_dataset
from coordexp.schema import PredictionRecord

MAX_PIXELS = 50_000  # big.png (300x200) is over it, the samples (<= 224x224) are not


def _rec(i):
    return PredictionRecord(image_id=i, images=[f"{i}.png"], width=1, height=1, raw_output=str(i))


def test_writer_orders_out_of_order_results(tmp_path):
    out = tmp_path / "p.jsonl"
    with PredictionWriter(str(out)) as w:
        assert w.submit(_rec(2)) == 0 and w.submit(_rec(1)) == 0
        assert w.submit(_rec(0)) == 3
        with pytest.raises(ValueError, match="duplicate"):
            w.submit(_rec(1))
    assert [json.loads(line)["image_id"] for line in out.read_text().splitlines()] == [0, 1, 2]


def test_writer_refuses_to_close_with_a_gap(tmp_path):
    w = PredictionWriter(str(tmp_path / "p.jsonl"))
    w.submit(_rec(1))
    with pytest.raises(RuntimeError, match="gap"):
        w.close()


def test_resume_drops_a_torn_line_and_continues(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text(_rec(0).to_json() + "\n" + _rec(1).to_json() + "\n" + '{"image_id": 2, "ima')
    w = PredictionWriter(str(out), resume=True)
    assert w.next_index == 2 and w.resumed_from == 2
    w.submit(_rec(2))
    w.close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image_id"] for r in rows] == [0, 1, 2]


def test_resume_refuses_a_foreign_file(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text(_rec(5).to_json() + "\n")
    with pytest.raises(ValueError, match="cannot resume"):
        PredictionWriter(str(out), resume=True)


def test_every_bad_input_gets_its_own_error(bad_dataset):
    path, expected = bad_dataset
    items = list(iter_dataset(path, max_pixels=MAX_PIXELS))
    assert [it.error.value if it.error else None for it in items] == expected
    for it in items:
        if it.error:
            assert f"line {it.line_no}" in it.error_message  # the message names the record


class EchoEngine(EngineDefaults):
    """Answers with the image size in CoordJSON: lets the runner be tested without a model."""

    name = "echo"
    prompt = PromptSpec()

    def __init__(self):
        self.batches = []

    def generate_batch(self, images, params):
        self.batches.append(len(images))
        if any(im.size == (128, 128) for im in images):
            raise RuntimeError("engine exploded")
        return [GenerationResult(text='{"objects": [{"desc": "w%d", "bbox_2d": [0, 0, 9, 9]}]}' % im.size[0],
                                 token_ids=[1, 2, 3]) for im in images]

    def describe(self):
        return {"engine": self.name}


def test_run_writes_one_line_per_input_line(bad_dataset, tmp_path):
    path, expected = bad_dataset
    out = tmp_path / "run" / "predictions.jsonl"
    engine = EchoEngine()
    run_dataset(path, str(out), engine, GenerationParams(), batch_size=4, max_pixels=MAX_PIXELS,
                progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image_id"] for r in rows] == list(range(len(expected)))
    # The last record is 128x128: its batch fails in the engine -> generation_failed, run goes on.
    got = [r.get("error") for r in rows]
    assert got[:-1] == expected[:-1] and got[-1] == "generation_failed"
    assert rows[0]["preds"] == [{"type": "bbox_2d", "points": [0, 0, 9, 9], "desc": "w96", "score": 1.0}]
    assert rows[0]["coord_mode"] == "norm1000" and rows[0]["prompt_variant"] == PromptSpec().variant
    assert all(r["preds"] == [] for r in rows[1:])
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["records_written"] == len(expected)
    assert sum(s["errors"].values()) == sum(1 for c in got if c)
    assert s["errors"]["image_load_failed"] == 3


def test_run_resume_after_partial_output(bad_dataset, tmp_path):
    path, expected = bad_dataset
    out = tmp_path / "predictions.jsonl"
    run_dataset(path, str(out), EchoEngine(), GenerationParams(), max_pixels=MAX_PIXELS, progress=False)
    full = out.read_text().splitlines()
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:17])  # killed while writing line 6
    engine = EchoEngine()
    summary = run_dataset(path, str(out), engine, GenerationParams(), resume=True, max_pixels=MAX_PIXELS,
                          progress=False)
    assert out.read_text().splitlines() == full
    assert summary.resumed_from == 5 and summary.records_written == len(expected)
    assert engine.batches == [1]  # only lines 6.. were run: of those, just the last record is good


def _sample_copy(tmp_path, n, name="data.jsonl"):
    """The first n sample records beside their images (a dataset of our own)."""
    import os
    import shutil

    from conftest import SAMPLE_DIR

    lines = open(os.path.join(SAMPLE_DIR, "sample.jsonl")).read().splitlines()[:n]
    if not (tmp_path / "images").exists():
        shutil.copytree(os.path.join(SAMPLE_DIR, "images"), tmp_path / "images")
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def test_resume_refuses_another_dataset_a_longer_file_and_other_parameters(tmp_path):
    """(issue 19) --resume checks the file it continues: images line by line, length, parameters."""
    a = _sample_copy(tmp_path, 6, "a.jsonl")
    out = tmp_path / "run" / "p.jsonl"
    run_dataset(a, str(out), EchoEngine(), GenerationParams(), progress=False)
    lines = out.read_text().splitlines()
    import os

    recs = [json.loads(x) for x in open(a).read().splitlines()]
    b = tmp_path / "b.jsonl"  # same images, another order: line 1 is another image
    b.write_text("\n".join(json.dumps(r) for r in [recs[1], recs[0], *recs[2:]]) + "\n")
    out.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ValueError, match="line 1 of .* is for .* another dataset"):
        run_dataset(str(b), str(out), EchoEngine(), GenerationParams(), resume=True, progress=False)
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps(r) for r in recs[:2]) + "\n")
    with pytest.raises(ValueError, match="has 3 lines but .* has only 2"):
        run_dataset(str(short), str(out), EchoEngine(), GenerationParams(), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"other decoding parameters .*max_new_tokens 256 -> 8"):
        run_dataset(a, str(out), EchoEngine(), GenerationParams(max_new_tokens=8), resume=True, progress=False)
    assert os.path.getsize(out) == len("\n".join(lines[:3]) + "\n")  # a refused resume touches nothing
    s = run_dataset(a, str(out), EchoEngine(), GenerationParams(), resume=True, progress=False)
    assert out.read_text().splitlines() == lines and s.resumed_from == 3


def test_a_second_run_in_the_same_folder_is_refused_and_summaries_say_what_ran(tmp_path):
    """(issue 19) two outputs in one folder would overwrite each other's summary.json; a local run's
    summary carries its status and the checkpoint digest (when the engine knows it)."""
    data = _sample_copy(tmp_path, 2)
    run_dataset(data, str(tmp_path / "out" / "a.jsonl"), EchoEngine(), GenerationParams(), progress=False)
    with pytest.raises(ValueError, match="belongs to another run"):
        run_dataset(data, str(tmp_path / "out" / "b.jsonl"), EchoEngine(), GenerationParams(), progress=False)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "complete" and s["out"].endswith("a.jsonl") and "checkpoint_sha256" in s


def test_a_jsonl_away_from_its_images_names_the_path_and_exits_non_zero(tmp_path):
    """(issue 19) copied to another folder, every line is image_load_failed: the message shows where
    it looked, `infer` exits 1 with a hint, and --image-root fixes it."""
    import subprocess
    import sys

    from conftest import REPO_ROOT, SAMPLE_DIR

    data = tmp_path / "elsewhere" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("".join(open(f"{SAMPLE_DIR}/sample.jsonl").readlines()[:2]))
    rows = list(iter_dataset(str(data)))
    assert all(r.error.value == "image_load_failed" for r in rows)
    assert str(tmp_path / "elsewhere" / "images") in rows[0].error_message
    assert [r.ok for r in iter_dataset(str(data), image_root=SAMPLE_DIR)] == [True, True]
    from coordexp.client.cmd_infer import report

    d = {"status": "complete", "records_written": 2, "records_total": 2, "errors": {"image_load_failed": 2},
         "seconds": 0.1, "images_per_s": 0, "failed_share": 1.0}
    assert report(d, "p.jsonl", ("records_written",)) == 1
    r = subprocess.run([sys.executable, "-m", "coordexp.client.cli", "infer", "--help"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert "--image-root" in r.stdout


def test_ctrl_c_keeps_a_valid_prefix_writes_the_summary_and_says_how_to_resume(tmp_path, capsys):
    """(issue 19) Ctrl-C behaves as the "server went away" path: count, --resume hint, summary.json."""
    from coordexp.client.cmd_infer import report
    from coordexp.runner import RunInterrupted

    data = _sample_copy(tmp_path, 6)

    class Interrupting(EchoEngine):
        def generate_batch(self, images, params):
            if len(self.batches) == 3:
                raise KeyboardInterrupt
            return super().generate_batch(images, params)

    out = tmp_path / "run" / "p.jsonl"
    with pytest.raises(RunInterrupted) as e:
        run_dataset(data, str(out), Interrupting(), GenerationParams(), progress=False)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["records_written"] == len(out.read_text().splitlines()) == 3
    assert report(e.value.summary.to_dict(), str(out), ()) == 130
    assert "wrote 3 of 6 lines" in capsys.readouterr().err
    s = run_dataset(data, str(out), EchoEngine(), GenerationParams(), resume=True, progress=False)
    assert s.records_written == 6 and s.extra["status"] == "complete"


def test_hostile_dataset_lines_each_get_their_own_error(tmp_path):
    """(issue 17) a 50 MB line, NUL bytes, invalid UTF-8, a lone CR inside a line, a path climbing out
    of the image root, a NUL in a path, a directory where an image should be: one line each, in
    order, with a clear message; good lines around them still run."""
    import shutil

    from conftest import SAMPLE_DIR

    shutil.copytree(os.path.join(SAMPLE_DIR, "images"), tmp_path / "images")
    (tmp_path / "images" / "a_dir.png").mkdir()
    good = open(os.path.join(SAMPLE_DIR, "sample.jsonl")).readline().strip()
    g = json.loads(good)
    lines = [
        good.encode(),
        b'{"images": ["' + b"x" * (50 << 20) + b'"], "width": 1, "height": 1}',
        b'{"images": ["images/a.png"], "width": 1,\x00 "height": 1}',
        b'{"images": ["images/\xff\xfe.png"], "width": 1, "height": 1}',
        json.dumps({**g, "images": ["../outside.png"]}).encode(),
        json.dumps({**g, "images": ["images/x\u0000.png"]}).encode(),
        json.dumps({**g, "images": ["images/a_dir.png"]}).encode(),
        good.encode().replace(b'"width"', b'"wi\rdth"', 1),  # a lone CR is not a line break here
        good.encode(),
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(iter_dataset(str(path)))
    assert len(items) == len(lines) and [it.line_no for it in items] == list(range(1, len(lines) + 1))
    msgs = [it.error_message or "" for it in items]
    assert items[0].ok and items[-1].ok
    assert "MiB long, the limit is 16 MiB" in msgs[1]
    assert "contains a NUL byte" in msgs[2]
    assert "not valid UTF-8 (byte 0xff" in msgs[3]
    assert "leaves the image root" in msgs[4] and items[4].error.value == "image_load_failed"
    assert "contains a NUL character" in msgs[5]
    assert "Is a directory" in msgs[6]
    assert items[7].error.value == "invalid_input"  # "wi\rdth": the record misses its width
    out = tmp_path / "run" / "p.jsonl"
    run_dataset(str(path), str(out), EchoEngine(), GenerationParams(), progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["image_id"] for r in rows] == list(range(len(lines)))
    assert [bool(r.get("error")) for r in rows] == [False] + [True] * 7 + [False]


def test_a_full_disk_is_a_clear_error_and_the_file_so_far_stays_valid(tmp_path):
    """(issue 17) a file size limit (RLIMIT_FSIZE) stands in for a full disk: `infer` ends with one
    clear sentence, no traceback, the lines on disk are complete, and --resume (with room) finishes."""
    import resource
    import subprocess
    import sys

    from conftest import REPO_ROOT

    data = _sample_copy(tmp_path, 12)
    out = tmp_path / "run" / "p.jsonl"
    script = ("import sys, json; sys.path.insert(0, 'tests'); from test_runner import EchoEngine; "
              "from coordexp.generation import GenerationParams; from coordexp.run_output import OutputWriteError; "
              "from coordexp.runner import run_dataset\ntry:\n    run_dataset(sys.argv[1], sys.argv[2], EchoEngine(), GenerationParams(), "
              "progress=False)\nexcept OutputWriteError as e:\n    print('error:', e, file=sys.stderr); sys.exit(1)")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    r = subprocess.run([sys.executable, "-c", script, data, str(out)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120, preexec_fn=limit)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "disk full or a file size limit" in r.stderr and "--resume" in r.stderr
    raw = out.read_bytes()
    assert 0 < len(raw) <= 1500 and raw.endswith(b"\n")
    kept = [json.loads(x) for x in raw.decode().splitlines()]
    assert [k["image_id"] for k in kept] == list(range(len(kept))) and len(kept) < 12
    s = run_dataset(data, str(out), EchoEngine(), GenerationParams(), resume=True, progress=False)
    assert s.records_written == 12 and s.resumed_from == len(kept)
