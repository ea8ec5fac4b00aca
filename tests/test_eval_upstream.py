"""CoordExp's own artifacts both ways (issue 14): eval/vis read upstream's gt_vs_pred.jsonl alone, a
`pred`-only line is never scored as "no predictions", our gt_vs_pred.jsonl is a scored artifact, and
metrics.json carries upstream's flat metric names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp.client.cmd_pipeline import write_gt_vs_pred
from coordexp.eval import evaluate
from coordexp.client import cmd_eval as eval_cli
from coordexp.eval.upstream import SCORE_SOURCE, is_gt_vs_pred

DATA = Path(__file__).resolve().parent / "data" / "eval"
PRED = DATA / "predictions.jsonl"
GT_NORM = DATA / "gt.norm.jsonl"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _upstream_rows() -> list[dict]:
    """Lines as upstream's inference writes them (docs/eval/README.md): `image`, no image_id, `gt` and
    `pred` in integer pixels, `errors`, the scored file's provenance fields."""
    def b(desc, pts, score=None):
        o = {"type": "bbox_2d", "points": pts, "desc": desc}
        return o if score is None else {**o, "score": score}
    common = {"coord_mode": "pixel", "mode": "coord", "pred_score_source": "confidence_postop", "pred_score_version": 2}
    return [
        {"image": "images/a.jpg", "width": 100, "height": 80, **common,
         "gt": [b("cat", [10, 10, 50, 50]), b("dog", [60, 40, 90, 75])],
         "pred": [b("cat", [11, 10, 50, 49], 0.9), b("dog", [0, 0, 20, 20], 0.4)],
         "raw_output_json": {"objects": []}, "errors": []},
        {"image": "images/b.jpg", "width": 64, "height": 64, **common,
         "gt": [{"type": "poly", "points": [5, 5, 40, 5, 40, 40, 5, 40], "desc": "person"}],
         "pred": [], "errors": ["empty_pred"]},
        {"image": "images/c.jpg", "width": 50, "height": 50, **common,
         "gt": [b("cat", [0, 0, 25, 25])], "pred": [b("cat", [0, 0, 25, 25], 0.8)], "errors": ["invalid_geometry"]},
    ]


def test_eval_reads_upstreams_gt_vs_pred_alone(tmp_path):
    f = _write(tmp_path / "gt_vs_pred_scored.jsonl", _upstream_rows())
    assert is_gt_vs_pred(str(f)) and not is_gt_vs_pred(str(PRED))
    m = evaluate(str(f), None, str(tmp_path / "out"), semantic=False, plots=False)
    assert m["inputs"]["gt_format"] == "gt_vs_pred"
    assert m["counts"]["images"] == 3 and m["counts"]["gt_objects"] == 4 and m["counts"]["pred_objects"] == 3
    assert m["errors"] == {"empty_pred": 1}  # upstream's list on a line left without preds
    assert m["errors_listed"] == {"empty_pred": 1, "invalid_geometry": 1}  # also where preds survived
    f1 = m["f1ish"]["0.50"]["full"]["micro"]
    assert (f1["tp"], f1["fp"], f1["fn"]) == (2, 1, 2)  # cat + cat matched, the far dog box is an FP
    assert m["coco"]["bbox"]["AP"] > 0  # scores from pred[*].score were read (not silently AP 0)
    flat = m["coordexp"]
    assert flat["bbox_AP"] == m["coco"]["bbox"]["AP"] and flat["f1ish@0.50_tp_full"] == 2
    assert flat["f1ish@0.50_pred_eval"] == 3 and flat["f1ish@0.50_pred_ignored"] == 0
    assert flat["f1ish@0.30_f1_full_micro"] == m["f1ish"]["0.30"]["full"]["micro"]["f1"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["coordexp"] == flat


def test_cli_eval_without_gt(tmp_path, capsys):
    f = _write(tmp_path / "gt_vs_pred.jsonl", _upstream_rows())
    assert eval_cli.main(["--pred", str(f), "--out", str(tmp_path / "o"), "--no-semantic", "--no-plots",
                          "--quiet"]) == 0
    assert eval_cli.main(["--pred", str(PRED), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no GT inside" in capsys.readouterr().err


def test_pred_without_preds_is_refused_loudly(tmp_path, capsys):
    """The old silent answer: upstream's `pred` ignored, the line re-parsed from a missing raw_output, AP 0."""
    rows = [json.loads(x) for x in PRED.read_text().splitlines()]
    rows[0]["pred"] = rows[0].pop("preds")
    f = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 1: has upstream's `pred` list but no `preds`"):
        evaluate(str(f), str(GT_NORM), None, semantic=False)
    assert eval_cli.main(["--pred", str(f), "--gt", str(GT_NORM), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "without --gt" in capsys.readouterr().err


def test_bad_upstream_line_names_the_line(tmp_path):
    rows = _upstream_rows()
    del rows[1]["pred"]
    f = _write(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError, match=r"g.jsonl line 2: neither `pred` nor `preds` is a list"):
        evaluate(str(f), None, None, semantic=False)
    rows = _upstream_rows()
    rows[2]["width"] = "50"
    with pytest.raises(ValueError, match=r"line 3: 'width' must be a positive integer"):
        evaluate(str(_write(tmp_path / "h.jsonl", rows)), None, None, semantic=False)


def test_our_gt_vs_pred_is_a_scored_artifact_and_round_trips(tmp_path):
    """Our pipeline's gt_vs_pred.jsonl carries what upstream's evaluator demands for COCO (non-empty
    `pred_score_source`, integer `pred_score_version`, pred[*].score in [0, 1], `image`), and our eval
    on it alone gives the numbers of predictions.jsonl + GT."""
    out = tmp_path / "gt_vs_pred.jsonl"
    assert write_gt_vs_pred(str(PRED), str(GT_NORM), str(out)) == 4
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r in rows:
        assert r["pred_score_source"] == SCORE_SOURCE and isinstance(r["pred_score_version"], int)
        assert isinstance(r["image"], str) and r["image"] and isinstance(r["errors"], list)
        assert all(0.0 <= p["score"] <= 1.0 for p in r["pred"]) and "preds" not in r
    assert rows[3]["errors"] == ["generation_failed"]
    a = evaluate(str(PRED), str(GT_NORM), None, semantic=False)
    b = evaluate(str(out), None, None, semantic=False)
    assert a["coco"]["bbox"]["AP"] == pytest.approx(b["coco"]["bbox"]["AP"], abs=1e-12)
    assert a["coordexp"] == pytest.approx(b["coordexp"], abs=1e-12)


def test_vis_reads_gt_vs_pred_alone(tmp_path):
    from PIL import Image

    from coordexp.vis import visualize

    (tmp_path / "images").mkdir()
    rows = _upstream_rows()
    for r in rows:
        Image.new("RGB", (r["width"], r["height"]), "white").save(tmp_path / r["image"])
    f = _write(tmp_path / "gt_vs_pred.jsonl", rows)
    index = visualize(str(f), None, str(tmp_path / "vis"))
    assert index["counts"]["images"] == 3 and index["counts"]["rendered"] == 3
    assert (tmp_path / "vis" / "index.html").is_file()
