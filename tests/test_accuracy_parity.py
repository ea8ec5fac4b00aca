"""Accuracy parity (issue 27): engines that are not bit-identical are judged by their metrics with
intervals. fp32 ONNX is equivalent to the torch reference, an engine cut at 40 tokens is different,
3 identical images are inconclusive, and the intervals are the ones `compare` draws."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from conftest import DEMO_MAX_NEW, REPO_ROOT

DEMO_CKPT = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")
DEMO_GT = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The torch reference's predictions for the first 20 demo val records, once for the module."""
    from coordexp.benchmarks.accuracy import EngineSpec, run_spec
    from coordexp.dataset import copy_records

    out = tmp_path_factory.mktemp("reference")
    data = str(out / "data.jsonl")
    copy_records(DEMO_GT, data, 20)
    pred = run_spec(EngineSpec.parse(f"torch:{DEMO_CKPT}"), data, str(out / "torch"), DEMO_MAX_NEW)
    return data, pred


def _parity(tmp_path, *argv: str) -> tuple[int, dict]:
    from coordexp.client.cli import main

    out = tmp_path / "report.json"
    code = main(["parity", "--accuracy", "--out", str(tmp_path / "runs"), "--json", str(out),
                 "--max-new-tokens", str(DEMO_MAX_NEW), *argv])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_fp32_onnx_is_equivalent_to_the_reference(reference, demo_repo, tmp_path, capsys):
    data, ref_pred = reference
    code, report = _parity(tmp_path, "--data", data, "--reference", ref_pred, "--candidate", f"onnx:{demo_repo}")
    (pair,) = report["pairs"]
    assert code == 0 and pair["verdict"] == "equivalent", capsys.readouterr().out
    assert pair["token_agreement"]["exact_answer_rate"] == 1.0 and pair["images"] == 20
    assert [m["name"] for m in pair["metrics"]] == ["f1ish@0.50_f1_full_micro", "bbox_AP50", "bbox_AP"]
    for m in pair["metrics"]:
        assert m["a"] == m["b"] and m["delta"] == 0 and m["ci95"] == [0, 0]
    assert "EQUIVALENT" in capsys.readouterr().out


def test_an_engine_cut_at_40_tokens_is_different(reference, demo_repo, tmp_path):
    data, ref_pred = reference
    code, report = _parity(tmp_path, "--data", data, "--reference", ref_pred,
                           "--candidate", f"onnx:{demo_repo},max_new_tokens=40")
    (pair,) = report["pairs"]
    assert code == 1 and pair["verdict"] == "different"
    f1 = pair["metrics"][0]
    assert f1["delta"] < -0.1 and f1["ci95"][1] < -0.02  # wholly outside the margin
    assert pair["image_flips"]["only_reference_right"] > pair["image_flips"]["only_candidate_right"]
    assert pair["token_agreement"]["exact_answer_rate"] < 1.0
    assert pair["token_agreement"]["first_divergence"]["min"] is not None


def test_three_identical_images_are_inconclusive(demo_repo, tmp_path):
    code, report = _parity(tmp_path, "--data", DEMO_GT, "--limit", "3", "--ckpt", DEMO_CKPT, "--repo", demo_repo)
    (pair,) = report["pairs"]
    assert code == 3 and pair["verdict"] == "inconclusive", pair["why"]
    assert pair["token_agreement"]["exact_answer_rate"] == 1.0  # identical, and still not enough
    assert pair["token_agreement"]["unit"] == "tokens"
    assert pair["images_needed"] == 11 and "too few images" in pair["why"]


def test_the_intervals_are_the_ones_compare_draws(reference, demo_repo, tmp_path):
    """Both runs registered and compared: compare's F1 interval and AP deltas are parity's."""
    from coordexp.benchmarks.accuracy import EngineSpec, run_spec
    from coordexp.eval import evaluate
    from coordexp.runs.compare import CompareOptions, compare_runs
    from coordexp.runs.equivalence import ParityOptions, compare_accuracy, score_run
    from coordexp.runs.register import RegisterOptions, register_run
    from coordexp.runs.registry import Registry

    data, ref_pred = reference
    cut = run_spec(EngineSpec.parse(f"onnx:{demo_repo},max_new_tokens=40"), data, str(tmp_path / "cut"))
    ids = []
    for pred in (ref_pred, cut):
        ev = os.path.join(os.path.dirname(pred), "eval")
        evaluate(pred, data, ev, metrics="both", semantic=False, plots=False)
        ids.append(register_run(pred, RegisterOptions(registry=str(tmp_path / "r.sqlite")), gt_path=data,
                                eval_dir=ev, quiet=True))
    with Registry(str(tmp_path / "r.sqlite")) as reg:
        cmp = compare_runs(reg, ids, CompareOptions(bootstrap=1000, seed=0))["comparisons"][0]
    ours = compare_accuracy(score_run("ref", ref_pred, data), score_run("cut", cut, data),
                            ParityOptions(bootstrap=1000, seed=0))
    theirs = {m["metric"]: m for m in cmp["metrics"]}
    mine = {m["name"]: m for m in ours["metrics"]}
    f1 = "f1ish@0.50_f1_full_micro"
    assert mine[f1]["ci95"] == pytest.approx(theirs[f1]["ci95"], abs=1e-12)
    assert mine[f1]["delta"] == pytest.approx(theirs[f1]["delta"], abs=1e-12)
    for name in ("bbox_AP", "bbox_AP50"):  # compare has point deltas for AP; ours add the interval
        assert mine[name]["delta"] == pytest.approx(theirs[name]["delta"], abs=1e-9)
        assert mine[name]["ci95"][0] <= mine[name]["delta"] <= mine[name]["ci95"][1]
    assert ours["image_flips"]["mcnemar_p"] == pytest.approx(cmp["image_flips"]["mcnemar_p"])


def test_resampled_ap_is_cocos_ap_of_the_resampled_image_list(reference, demo_repo, tmp_path):
    """A resample's AP equals a real COCO evaluation of the image list with those copies (ties too)."""
    from coordexp.benchmarks.accuracy import EngineSpec, run_spec
    from coordexp.eval import evaluate
    from coordexp.eval.coco import run_cocoeval
    from coordexp.runs.equivalence import WeightedCocoAP

    data, ref_pred = reference
    cut = run_spec(EngineSpec.parse(f"onnx:{demo_repo},max_new_tokens=40"), data, str(tmp_path / "cut"))
    rng = np.random.default_rng(7)
    for pred in (ref_pred, cut):
        det: dict = {}
        evaluate(pred, data, None, metrics="both", semantic=False, details=det)
        gt, dets = det["coco_gt"], det["coco_dets"]
        weighted = WeightedCocoAP(gt, dets)
        for _ in range(6):
            w = np.bincount(rng.integers(0, 20, 20), minlength=20)
            images, anns, out = [], [], []
            for im, copies in zip(gt["images"], w):
                for _ in range(int(copies)):
                    new = len(images) + 1
                    images.append({**im, "id": new})
                    for a in gt["annotations"]:  # each copy's GT with ids of its own
                        if a["image_id"] == im["id"]:
                            anns.append({**a, "id": len(anns) + 1, "image_id": new})
                    out += [{**d, "image_id": new} for d in dets if d["image_id"] == im["id"]]
            coco = run_cocoeval({**gt, "images": images, "annotations": anns}, out).stats
            ap, ap50 = weighted.ap(w[None].astype(float))
            assert ap[0] == pytest.approx(coco["AP"], abs=1e-12) and ap50[0] == pytest.approx(coco["AP50"], abs=1e-12)


def test_the_exact_bound_and_the_images_it_needs():
    from coordexp.runs.equivalence import images_for_bound, upper_bound

    for n in (3, 11, 20, 50):
        assert upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-9)  # closed form at d = 0
    try:  # Clopper-Pearson, one-sided 95 %: the beta quantile, where scipy is at hand
        from scipy.stats import beta

        expected = beta.ppf(0.95, 10, 41)
    except ImportError:
        expected = 0.293091  # scipy.stats.beta.ppf(0.95, 10, 41)
    assert upper_bound(9, 50) == pytest.approx(expected, abs=1e-6)
    assert images_for_bound(0, 3, 0.25) == 11 == math.ceil(math.log(0.05) / math.log(0.75))
    assert images_for_bound(30, 100, 0.25) is None  # 30 % differ: no number of images bounds it by 25 %


@pytest.mark.parametrize("spec, message", [
    ("vllm:foo", "expected a prediction .jsonl"),
    ("onnx:/nonexistent", "not found"),
    ("torch:" + DEMO_CKPT + ",precision=int8", "torch takes"),
    ("/nonexistent.jsonl", "no such prediction file"),
])
def test_bad_engine_specs_are_named(tmp_path, capsys, spec, message):
    from coordexp.client.cli import main

    assert main(["parity", "--accuracy", "--data", DEMO_GT, "--ckpt", DEMO_CKPT, "--candidate", spec,
                 "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
