"""compare: the statistics against hand-computed cases, the GT check, flips, the command's reports."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coordexp.runs.compare import CompareError, CompareOptions, compare_runs
from coordexp.runs.folders import import_run_dir
from coordexp.runs.registry import ImageRow, Registry, RunRecord
from coordexp.runs.stats import STATISTICS, mcnemar_exact, paired_bootstrap

from runs_fixtures import drop_last_every, evaluate_dir, write_predictions


@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),
    (1, 0, 1.0),  # 2 * P(X <= 0), X ~ B(1, 1/2) = 2 * 1/2
    (8, 0, 2 / 256),
    (3, 7, 2 * (1 + 10 + 45 + 120) / 1024),  # 0.34375
    (7, 3, 0.34375),
    (5, 5, 1.0),
])
def test_exact_mcnemar_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_exact_mcnemar_matches_scipy_and_does_not_underflow():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert mcnemar_exact(40, 61) == pytest.approx(scipy_stats.binomtest(40, 101, 0.5).pvalue, rel=1e-9)
    assert 0 < mcnemar_exact(100, 3000) < 1e-300 or mcnemar_exact(100, 3000) == 0.0
    assert mcnemar_exact(20000, 20100) == pytest.approx(scipy_stats.binomtest(20000, 40100, 0.5).pvalue, rel=1e-6)


def _arrays(tp, fp, fn):
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 1.0)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": f1, "right": (f1 >= 1).astype(float)}


def test_paired_bootstrap_hand_cases_and_seed():
    n = 40
    a = _arrays([1] * n, [0] * n, [1] * n)  # every image: 1 of 2 found -> F1 2/3
    b = _arrays([2] * n, [0] * n, [0] * n)  # every image perfect
    iv = paired_bootstrap(a, b, STATISTICS, n_boot=300, seed=1)
    # the per-image difference is the same on every image: every resample gives exactly it
    assert iv["f1ish@0.50_f1_full_macro"].delta == pytest.approx(1 / 3)
    assert (iv["f1ish@0.50_f1_full_macro"].lo, iv["f1ish@0.50_f1_full_macro"].hi) == pytest.approx((1 / 3, 1 / 3))
    assert iv["f1ish@0.50_recall_full_micro"].delta == pytest.approx(0.5)
    assert iv["image_accuracy"].verdict == "better"
    same = paired_bootstrap(a, a, STATISTICS, n_boot=200, seed=0)
    assert all((v.delta, v.lo, v.hi) == (0.0, 0.0, 0.0) and v.verdict == "within noise" for v in same.values())
    # mixed: B better on half the images, worse on the other half -> an interval around 0
    rng = np.random.default_rng(0)
    tp_a = rng.integers(0, 3, 60)
    mix_b = _arrays(np.where(np.arange(60) % 2 == 0, np.minimum(tp_a + 1, 3), np.maximum(tp_a - 1, 0)), [0] * 60,
                    3 - np.where(np.arange(60) % 2 == 0, np.minimum(tp_a + 1, 3), np.maximum(tp_a - 1, 0)))
    mix_a = _arrays(tp_a, [0] * 60, 3 - tp_a)
    one = paired_bootstrap(mix_a, mix_b, STATISTICS, n_boot=500, seed=7)
    again = paired_bootstrap(mix_a, mix_b, STATISTICS, n_boot=500, seed=7)
    other = paired_bootstrap(mix_a, mix_b, STATISTICS, n_boot=500, seed=8)
    k = "f1ish@0.50_recall_full_micro"
    assert one[k] == again[k] and one[k] != other[k]
    assert one[k].lo < one[k].delta < one[k].hi
    assert one[k].delta == pytest.approx((mix_b["tp"].sum() - mix_a["tp"].sum()) / 180)


def _registered(tmp_path):
    reg = Registry(str(tmp_path / "r.sqlite"))
    ids = []
    for name, damage in (("a", None), ("b", drop_last_every(5))):
        d = str(tmp_path / name)
        write_predictions(d, damage)
        evaluate_dir(d)
        run, rows = import_run_dir(d)
        ids.append(reg.add_run(run, rows))
    return reg, ids


def test_compare_two_registered_runs(tmp_path):
    reg, (a, b) = _registered(tmp_path)
    rep = compare_runs(reg, [a, b], CompareOptions(bootstrap=400, seed=0, topk=3))
    c = rep["comparisons"][0]
    m = {x["metric"]: x for x in c["metrics"]}
    # A is the GT itself: every image right; B lost the last object of images 0, 5, ..., 45
    fl = c["image_flips"]
    assert (fl["both_right"], fl["only_a"], fl["only_b"], fl["both_wrong"]) == (40, 10, 0, 0)
    assert fl["only_a_images"] == list(range(0, 50, 5))
    assert fl["mcnemar_p"] == pytest.approx(2 / 1024)
    assert c["object_flips"]["only_a"] == 10 and c["object_flips"]["only_b"] == 0
    assert c["object_flips"]["mcnemar_p"] == pytest.approx(2 / 1024)
    assert m["image_accuracy"]["a"] == 1.0 and m["image_accuracy"]["b"] == 0.8
    assert m["image_accuracy"]["delta"] == pytest.approx(-0.2) and m["image_accuracy"]["verdict"] == "worse"
    assert m["f1ish@0.50_precision_full_micro"]["delta"] == 0.0  # nothing extra was predicted
    assert m["bbox_AP"]["ci95"] is None and m["bbox_AP"]["delta"] < 0
    assert c["images"]["top_degraded"][0]["delta_f1"] < 0 and c["images"]["top_improved"] == []
    assert c["classes"]["top_improved"] == [] and c["classes"]["top_degraded"]
    assert compare_runs(reg, [a, b], CompareOptions(bootstrap=400, seed=0)) == compare_runs(
        reg, [a, b], CompareOptions(bootstrap=400, seed=0))


def test_compare_refuses_runs_on_other_gt(tmp_path):
    reg, (a, b) = _registered(tmp_path)
    rows = reg.all_images(b)
    other = reg.add_run(RunRecord(kind="test", name="other", dataset_sha256="f" * 64),
                        [ImageRow(r["idx"], r["path"], 128, 128) for r in rows])
    with pytest.raises(CompareError, match="do not share the GT: dataset digests"):
        compare_runs(reg, [a, other])
    run = reg.get_run(a)
    shuffled = reg.add_run(RunRecord(kind="test", name="shuffled", dataset_sha256=run["dataset_sha256"]),
                           [ImageRow(k, rows[(k + 1) % len(rows)]["path"], 128, 128) for k in range(len(rows))])
    with pytest.raises(CompareError, match="same images in the same order .* first difference at position 0"):
        compare_runs(reg, [a, shuffled])
    job = reg.add_run(RunRecord(kind="infer", name="job", dataset_sha256=run["dataset_sha256"]))
    with pytest.raises(CompareError, match="inference job"):
        compare_runs(reg, [a, job])
    with pytest.raises(CompareError, match="at least two"):
        compare_runs(reg, [a])


def test_the_compare_command_writes_json_and_markdown(tmp_path, capsys):
    from coordexp.client.cli import main

    reg, (a, b) = _registered(tmp_path)
    md = tmp_path / "cmp.md"
    assert main(["compare", str(a), str(b), "--registry", reg.path, "--bootstrap", "200", "--json",
                 "--md", str(md)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["options"] == {"bootstrap": 200, "seed": 0, "right_f1": 1.0, "topk": 10}
    text = md.read_text()
    assert "| image_accuracy | 1.0000 | 0.8000 | -0.2000 |" in text and "| worse |" in text
    assert f"| images (50) | 40 | 10 | 0 | 0 | {2 / 1024:.4g} |" in text  # every McNemar row names what it counts
    # the default table is the headline metrics; --all every one; counts are per-image sums with intervals
    shown = [ln.split(" | ")[0].lstrip("| ") for ln in text.splitlines() if ln.startswith("| f1ish") or
             ln.startswith("| image_accuracy") or ln.startswith("| bbox_")]
    assert shown == ["f1ish@0.50_f1_full_micro", "f1ish@0.50_precision_full_micro", "f1ish@0.50_recall_full_micro",
                     "image_accuracy", "bbox_AP", "bbox_AP50"]
    fn = next(m for m in rep["comparisons"][0]["metrics"] if m["metric"] == "f1ish@0.50_fn_full")
    assert fn["ci95"] is not None and fn["delta"] > 0 and fn["verdict"] == "worse"  # more misses: worse
    loose = next(m for m in rep["comparisons"][0]["metrics"] if m["metric"].startswith("f1ish@0.30"))
    assert loose["verdict"] == "no interval (per-image counts are kept at IoU 0.50 only)"
    assert main(["compare", str(a), str(b), "--registry", reg.path, "--bootstrap", "200", "--all"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| f1ish")]) > 10
    assert main(["compare", str(a), "999", "--registry", reg.path]) == 2
    assert "no run with id 999" in capsys.readouterr().err
    assert not math.isnan(rep["comparisons"][0]["metrics"][0]["ci95"][0])
