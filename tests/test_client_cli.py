"""`coordexp-client ask`, `models`, `bench` and `infer --url` against the REAL served ensemble.

Fast tests cover the pure parts (turn parsing, the answer table and pixel boxes, bench metrics and
plot). The slow ones reuse the serving tests' fixtures (`exported`: the tiny checkpoint exported to
ONNX and written as a Triton repository; `server`: Triton serving it), one server for the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from coordexp.benchmarks import report as bench_report
from coordexp.benchmarks import serve as bench_serve
from coordexp.client import cmd_ask
from coordexp.generation import GenerationParams, GenerationResult

from conftest import SERVED_MAX_NEW as MAX_NEW  # the served tiny checkpoint's limit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO_ROOT, "data", "sample", "sample.jsonl")
SAMPLE_IMAGE = os.path.join(REPO_ROOT, "data", "sample", "images", "sample_00002.png")  # 160x120
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_client(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordexp.client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, **kw)


# ============================================================================ fast: no server


def test_interactive_turns():
    img = SAMPLE_IMAGE
    assert cmd_ask.parse_turn(f"{img} | find the red circle", None) == (img, "find the red circle")
    assert cmd_ask.parse_turn(f"  {img}  ", None) == (img, None)  # an existing file: default prompt
    assert cmd_ask.parse_turn("find the blue square", img) == (img, "find the blue square")  # last image
    assert cmd_ask.parse_turn("| only a prompt", img) == (img, "only a prompt")
    assert cmd_ask.parse_turn("find it", None) == (None, "find it")  # no image yet: nothing to run
    assert cmd_ask.parse_turn("   ", img) == (None, None)


class StubSource:
    default_text = "Detect all objects in the image."
    bbox_format = "xyxy"

    def __init__(self, text, error=None):
        self.text, self.error, self.seen = text, error, []

    def generate(self, image_bytes, image, params, user_text):
        self.seen.append((image.size, user_text))
        return GenerationResult(text=self.text, token_ids=[1, 2, 3], error=self.error)


def test_answer_has_grid_and_pixel_geometry_and_a_readable_table(tmp_path):
    text = ('{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_0|>, <|coord_0|>, <|coord_999|>, '
            '<|coord_500|>]}, {"desc": "tri", "poly": [<|coord_0|>, <|coord_999|>, <|coord_999|>, <|coord_999|>, '
            '<|coord_500|>, <|coord_0|>]}]}')
    src = StubSource(text)
    ans, img = cmd_ask.answer(src, SAMPLE_IMAGE, None, GenerationParams(), 10**8)
    assert src.seen == [((160, 120), None)]
    assert ans["prompt"] == StubSource.default_text and ans["raw_output"] == text and "error" not in ans
    box, poly = ans["preds"]
    assert box["points"] == [0, 0, 999, 500] and box["pixel_box"] == [0.0, 0.0, 159.0, round(500 / 999 * 119, 2)]
    assert poly["type"] == "poly" and poly["pixel_box"] == [0.0, 0.0, 159.0, 119.0]
    assert poly["pixel_points"][:2] == [0.0, 119.0]
    table = cmd_ask.format_table(ans)
    assert "objects: 2" in table and "red circle  bbox_2d  [0, 0, 999, 500]" in table
    assert "[0.0, 0.0, 159.0, 59.6]" in table
    out = cmd_ask.draw(img, ans["preds"], str(tmp_path / "drawn.png"))
    assert open(out, "rb").read(8) == PNG_MAGIC


def test_draw_marks_the_objects_with_the_vis_annotators(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (100, 80), "white")
    preds = [{"desc": "box", "type": "bbox_2d", "points": [], "pixel_points": [10, 10, 60, 50],
              "pixel_box": [10, 10, 60, 50]},
             {"desc": "tri", "type": "poly", "points": [], "pixel_points": [70, 70, 95, 70, 80, 40],
              "pixel_box": [70, 40, 95, 70]}]
    drawn = [cmd_ask.draw(img, preds, str(tmp_path / "vis.png"))]
    for path in drawn:
        out = Image.open(path).convert("RGB")
        k = out.size[0] / 100  # upscaled like the vis overlays (issue 19: labels no longer cover objects)
        assert min(out.size) >= 384 and out.size[1] == round(80 * k)
        assert out.getpixel((round(10 * k), round(35 * k))) != (255, 255, 255)  # the box's left edge
        assert out.getpixel((round(35 * k), round(35 * k))) == (255, 255, 255)  # inside the box: untouched
    assert img.getpixel((10, 30)) == (255, 255, 255)  # the caller's image is not drawn on


def test_answer_reports_parse_errors_and_refuses_bad_images(tmp_path):
    ans, _ = cmd_ask.answer(StubSource("no json here"), SAMPLE_IMAGE, "x", GenerationParams(), 10**8)
    assert ans["preds"] == [] and ans["error"] == "empty_pred" and "error:  empty_pred" in cmd_ask.format_table(ans)
    with pytest.raises(cmd_ask.TurnError, match="generation_failed: boom"):
        cmd_ask.answer(StubSource("", error="boom"), SAMPLE_IMAGE, None, GenerationParams(), 10**8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(PNG_MAGIC + b"garbage")
    with pytest.raises(cmd_ask.TurnError, match="^image_load_failed"):
        cmd_ask.answer(StubSource(""), str(bad), None, GenerationParams(), 10**8)
    with pytest.raises(cmd_ask.TurnError, match="^image_too_large"):
        cmd_ask.answer(StubSource(""), SAMPLE_IMAGE, None, GenerationParams(), 1000)


def test_bench_metrics_use_genai_perf_names():
    m = bench_serve.level_metrics(4, [0.1, 0.2, 0.3, 0.4], [10, 10, 12, 8], errors=1, wall=2.0)
    assert m["request_throughput"] == {"unit": "requests/sec", "avg": 2.0} and m["images_per_s"] == 2.0
    assert m["output_token_throughput"] == {"unit": "tokens/sec", "avg": 20.0}
    lat = m["request_latency"]
    assert lat["unit"] == "ms" and lat["p50"] == 250.0 and lat["min"] == 100.0 and lat["max"] == 400.0
    assert lat["p90"] == pytest.approx(370.0) and lat["p99"] == pytest.approx(397.0)
    assert m["output_sequence_length"] == {"unit": "tokens", "avg": 10.0, "min": 8, "max": 12}
    assert m["time_to_first_token"] is None and m["inter_token_latency"] is None and m["errors"] == 1
    assert bench_serve.parse_levels("8, 1,2,2") == [1, 2, 8]
    with pytest.raises(ValueError):
        bench_serve.parse_levels("1,x")
    with pytest.raises(ValueError):
        bench_serve.parse_levels("0")


def test_bench_plot_is_a_png(tmp_path):
    levels = [bench_serve.level_metrics(c, [0.1 * c] * 4, [5] * 4, 0, 0.2) for c in (1, 2, 4)]
    base = bench_serve.level_metrics(1, [0.2] * 4, [5] * 4, 0, 0.8)
    report = {"levels": levels, "baseline": {"engine": "onnx", "metrics": base}, "inputs": {"count": 4},
              "server": {"model": "coordexp", "manifest": {"prompt_variant": "v"}},
              "params": GenerationParams(max_new_tokens=5, ignore_eos=True).to_dict()}
    path = bench_report.plot(report, str(tmp_path / "bench.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC and os.path.getsize(path) > 10_000


def test_synthetic_inputs_are_reproducible_pngs():
    a = bench_serve.synthetic_inputs(2, 64, seed=3)
    assert a == bench_serve.synthetic_inputs(2, 64, seed=3) and a[0] != a[1]
    assert all(b.startswith(PNG_MAGIC) for b in a)


# ============================================================================ slow: the served ensemble


def _args_common(server):
    return ["--url", server.grpc_url, "--max-new-tokens", str(MAX_NEW)]


@pytest.mark.slow
@pytest.mark.triton
def test_infer_in_order_at_concurrency_8_matches_the_in_process_engine(server, exported, tmp_path):
    from coordexp.engines import load_engine
    from coordexp.runner import run_dataset

    out = tmp_path / "served" / "predictions.jsonl"
    r = run_client("infer", "--data", SAMPLE, "--out", str(out), "--concurrency", "8", "--no-progress",
                   *_args_common(server))
    assert r.returncode == 0, r.stderr
    served = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(open(SAMPLE).read().splitlines())
    assert [row["image_id"] for row in served] == list(range(n))
    # The same data through the in-process ONNX engine of the same export: identical lines,
    # apart from which engine wrote them.
    local = tmp_path / "local" / "predictions.jsonl"
    engine = load_engine("onnx", exported[1], threads=1)
    run_dataset(SAMPLE, str(local), engine, GenerationParams(max_new_tokens=MAX_NEW), progress=False)
    expected = [json.loads(line) for line in local.read_text().splitlines()]
    for a, b in zip(served, expected):
        assert a.pop("engine") == "triton"
        b.pop("engine")
        assert a == b
    s = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert s["records_written"] == n and s["status"] == "complete"
    assert s["servers"][server.grpc_url]["succeeded"] == n and s["generated_tokens"] > 0


@pytest.mark.slow
@pytest.mark.triton
def test_infer_bad_inputs_each_get_their_line(server, bad_dataset, tmp_path):
    path, expected = bad_dataset
    out = tmp_path / "p.jsonl"
    r = run_client("infer", "--data", path, "--out", str(out), "--concurrency", "4", "--max-pixels", "50000",
                   "--no-progress", *_args_common(server))
    # 11 of the 13 lines are bad inputs: every line is written, and the run says it mostly failed
    assert r.returncode == 1 and "of the lines failed" in r.stderr, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["image_id"] for row in rows] == list(range(len(expected)))
    for row, code in zip(rows, expected):
        if code:  # the record's own error, never sent
            assert row["error"] == code and row["raw_output"] == "" and row["error_message"].startswith("line ")
        else:  # answered by the model (whose text may or may not parse: a tiny random model)
            assert row["num_tokens"] > 0 and row.get("error") in (None, "empty_pred", "parse_failed", "invalid_coord",
                                                              "invalid_geometry")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["servers"][server.grpc_url]["requests"] == expected.count(None)


@pytest.mark.slow
@pytest.mark.triton
def test_ask_single_shot_served_and_local_give_the_same_answer(server, exported, tmp_path):
    common = ["ask", "--image", SAMPLE_IMAGE, "--json", "--max-new-tokens", str(MAX_NEW)]
    served = run_client(*common, "--url", server.grpc_url, "--draw", str(tmp_path / "boxes.png"))
    assert served.returncode == 0, served.stderr
    a = json.loads(served.stdout)
    assert a["image"] == SAMPLE_IMAGE and (a["width"], a["height"]) == (160, 120)
    assert a["prompt"] == "Detect all objects in the image." and a["raw_output"] and a["num_tokens"] > 0
    assert open(a.pop("drawn"), "rb").read(8) == PNG_MAGIC
    local = run_client(*common, "--local", exported[0], "--engine", "torch", input="")
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout) == a  # torch reference == served ensemble, same output format
    # the prompt from stdin, table output
    r = run_client("ask", "--image", SAMPLE_IMAGE, "--prompt", "-", "--url", server.grpc_url, "--max-new-tokens",
                   "4", "--ignore-eos", input="find the red circle\n")
    assert r.returncode == 0, r.stderr
    assert "prompt: find the red circle" in r.stdout and "raw:" in r.stdout
    # streamed: the same answer on stdout, the text on stderr as it was generated
    streamed = run_client(*common, "--url", server.grpc_url, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    b = json.loads(streamed.stdout)
    assert {k: v for k, v in b.items() if k != "drawn"} == a
    assert a["raw_output"] in streamed.stderr
    r = run_client(*common, "--local", exported[0], "--stream")
    assert r.returncode == 2 and "--stream needs --url" in r.stderr


@pytest.mark.slow
@pytest.mark.triton
def test_ask_interactive_keeps_going_until_quit(server, tmp_path):
    turns = (f"{SAMPLE_IMAGE} | find the red circle\n"
             "find the blue square\n"
             f"{tmp_path / 'missing.png'} | anything\n"
             "quit\n"
             f"{SAMPLE_IMAGE}\n")  # after quit: never run
    r = run_client("ask", "--interactive", "--json", "--url", server.grpc_url, "--max-new-tokens", "6",
                   "--ignore-eos", input=turns)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["image"], x["prompt"], x["num_tokens"]) for x in answers] == [
        (SAMPLE_IMAGE, "find the red circle", 6), (SAMPLE_IMAGE, "find the blue square", 6)]
    assert "image_load_failed" in r.stderr and "missing.png" in r.stderr
    # end of input without quit ends cleanly too
    r = run_client("ask", "--interactive", "--url", server.grpc_url, "--max-new-tokens", "4", input=f"{SAMPLE_IMAGE}\n")
    assert r.returncode == 0 and "objects:" in r.stdout and "raw:" in r.stdout


@pytest.mark.slow
@pytest.mark.triton
def test_models_lists_readiness_and_the_export_manifest(server, exported):
    from coordexp.checkpoint import checkpoint_digest

    r = run_client("models", "--url", server.grpc_url, "--json")
    assert r.returncode == 0, r.stderr
    (srv,) = json.loads(r.stdout)["servers"]
    models = {m["name"]: m for m in srv["models"]}
    assert set(models) == {"coordexp", "preprocess", "vision_encoder", "llm", "postprocess", "coordexp_stream",
                           "llm_stream"}
    assert all(m["state"] == "READY" for m in models.values())
    ens = models["coordexp"]
    assert ens["coordexp"] is True and ens["max_batch_size"] == 8 and ens["decoupled"] is False
    assert ens["streams"] is False and models["coordexp_stream"]["streams"] is True
    assert models["llm_stream"]["decoupled"] is True and models["coordexp_stream"]["coordexp"] is True
    man = ens["manifest"]
    assert man["hash"] == checkpoint_digest(exported[0]).sha256
    assert man["prompt_variant"] == "coordexp/tokens/desc_first/sorted/v1" and man["export_date"]
    assert man["versions"]["onnxruntime"] and man["max_new_tokens"] == MAX_NEW
    assert "manifest" not in models["llm"]
    table = run_client("models", "--url", server.grpc_url)
    assert table.returncode == 0 and "manifest of coordexp, coordexp_stream:" in table.stdout
    assert table.stdout.count(man["hash"]) == 1  # (issue 19) one block per export, not one per ensemble
    from coordexp.serving.server import free_port

    r = run_client("models", "--url", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot reach a Triton gRPC server")


@pytest.mark.slow
@pytest.mark.triton
def test_bench_short_sweep_with_in_process_baseline(server, exported, tmp_path):
    out = tmp_path / "bench"
    r = run_client("bench", "--url", server.grpc_url, "--synthetic", "3", "--size", "64", "--concurrency", "1,2",
                   "--requests", "4", "--warmup", "1", "--max-new-tokens", "6", "--ignore-eos",
                   "--baseline", "onnx", "--ckpt", exported[1], "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "bench.json").read_text())
    assert {"server", "inputs", "params", "levels", "baseline", "ratios", "notes", "streaming"} <= set(rep)
    assert [lv["concurrency"] for lv in rep["levels"]] == [1, 2]
    for lv in rep["levels"]:
        assert lv["requests"] == 4 and lv["errors"] == 0
        assert lv["request_throughput"]["avg"] > 0 and lv["output_token_throughput"]["avg"] > 0
        assert set(lv["request_latency"]) >= {"p50", "p90", "p99"}
        assert lv["output_sequence_length"]["min"] == lv["output_sequence_length"]["max"] == 6  # ignore_eos
        assert lv["time_to_first_token"] is None and lv["inter_token_latency"] is None
    assert rep["streaming"] is False and "pass --stream" in rep["notes"][0]
    assert rep["baseline"]["engine"] == "onnx" and rep["baseline"]["metrics"]["requests"] == 4
    assert rep["baseline"]["same_text_fraction"] == 1.0  # served == in-process, token for token
    assert [x["concurrency"] for x in rep["ratios"]] == [1, 2] and all(x["request_throughput_ratio"] > 0
                                                                      for x in rep["ratios"])
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert "served / in-process throughput" in r.stdout


@pytest.mark.slow
@pytest.mark.triton
def test_bench_stream_measures_time_to_first_token(server, tmp_path):
    out = tmp_path / "bench"
    r = run_client("bench", "--url", server.grpc_url, "--synthetic", "2", "--size", "64", "--concurrency", "1,2",
                   "--requests", "3", "--warmup", "1", "--max-new-tokens", "6", "--ignore-eos", "--stream",
                   "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "bench.json").read_text())
    assert rep["streaming"] is True and rep["notes"] == [] and rep["server"]["model"] == "coordexp_stream"
    for lv in rep["levels"]:
        assert lv["requests"] == 3 and lv["errors"] == 0
        assert lv["output_sequence_length"]["min"] == 6
        ttft, itl, lat = lv["time_to_first_token"], lv["inter_token_latency"], lv["request_latency"]
        assert ttft["unit"] == itl["unit"] == "ms" and 0 < ttft["min"] and 0 < itl["min"]
        assert ttft["max"] <= lat["max"]  # the first token arrives before the answer is complete
    assert "TTFT p50" in r.stdout


@pytest.mark.slow
@pytest.mark.triton
def test_bench_stream_without_a_streaming_ensemble_is_a_clear_error(server, tmp_path):
    r = run_client("bench", "--url", server.grpc_url, "--synthetic", "1", "--concurrency", "1", "--stream",
                   "--model", "nope", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "nope_stream" in r.stderr and "--no-stream" in r.stderr, r.stderr


def test_ask_shows_what_guided_decoding_did():
    """(issue 19) `ask --guided` keeps guided_closed_early, in --json and in the table."""
    class Guided(StubSource):
        def generate(self, image_bytes, image, params, user_text):
            g = super().generate(image_bytes, image, params, user_text)
            g.extra = {"guided": True, "guided_closed_early": True}
            return g

    ans, _ = cmd_ask.answer(Guided('{"objects": []}'), SAMPLE_IMAGE, None, GenerationParams(), 10**8)
    assert ans["guided"] is True and ans["guided_closed_early"] is True
    assert "guided: closed early" in cmd_ask.format_table(ans)


@pytest.mark.slow
@pytest.mark.triton
def test_ask_into_a_closed_pipe_ends_quietly(server):
    """(issue 19) `ask ... | head -c 1` ends without a BrokenPipeError traceback."""
    r = subprocess.run(f"{sys.executable} -m coordexp.client.cli ask --url {server.grpc_url} --image {SAMPLE_IMAGE} "
                       f"--max-new-tokens 4 | head -c 1", shell=True, cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert len(r.stdout) == 1


def test_model_loading_bars_stay_out_of_the_output(tiny_ckpt, tmp_path):
    """(issue 19) transformers' "Loading weights" bars do not leak into `infer --local` (and eval's
    embedder loads the same way)."""
    data = tmp_path / "one.jsonl"
    data.write_text(open(SAMPLE).readline())
    os.symlink(os.path.join(REPO_ROOT, "data", "sample", "images"), tmp_path / "images")
    r = run_client("infer", "--local", tiny_ckpt, "--data", str(data), "--out", str(tmp_path / "o" / "p.jsonl"),
                   "--max-new-tokens", "2", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr + r.stdout
