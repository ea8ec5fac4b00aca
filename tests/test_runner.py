"""Dataset runs keep the contract: one line per input line, in order, errors per line, resumable."""
import json

import pytest

from coordexp.dataset import iter_dataset
from coordexp.generation import GenerationParams, GenerationResult
from coordexp.prompt import PromptSpec
from coordexp.runner import PredictionWriter, run_dataset
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


class EchoEngine:
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
