"""Serving a checkpoint exactly as it was trained: the training run's record (`resolved_config.json`)
gives the prompt (texts verbatim, image first), its controls, the bbox format and the image budget;
a checkpoint without one is refused; centre-format boxes decode as the research code decodes them.

Every record here is written by the test in the research code's layout, with our own texts."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from coordexp.grid import decode_bbox, decode_bbox_exact, encode_bbox, to_pixels
from coordexp.parser import parse_model_output
from coordexp.prompt import PromptSpec, format_coordjson

SYSTEM = "You label toy shapes. Reply with one CoordJSON line, centre and size of each box. Nothing else."
USER = "Which shapes are in this picture? Give every one."


def upstream_record(system=SYSTEM, user=USER, *, variant="coco_80", field_order="desc_first", ordering="sorted",
                    coord_tokens=True, bbox_format="cxcy_logw_logh", max_pixels=None) -> dict:
    """A training run's resolved_config.json as the research code writes it (our own texts)."""
    custom = {"user_prompt": user, "object_field_order": field_order, "object_ordering": ordering,
              "coord_tokens": {"enabled": coord_tokens, "skip_bbox_norm": True}, "bbox_format": bbox_format,
              "emit_norm": "none", "json_format": "standard"}
    if variant is not None:
        custom["extra"] = {"prompt_variant": variant}
    template = {"template": "qwen3_vl", "system": system}
    if max_pixels is not None:
        template["max_pixels"] = max_pixels
    return {"schema_version": 1, "config_path": "configs/stage1/shapes.yaml", "base_config_path": "",
            "dataset_seed": 17, "resolved": {"template": template, "custom": custom,
                                             "prompts": {"system": system, "user": user, "output_variant": "dense"}}}


def upstream_hash(rec: dict) -> str:
    """The research code's prompt_template_hash, computed here from the record's own values."""
    r = rec["resolved"]
    c = r["custom"]
    payload = {"ordering": c["object_ordering"], "coord_mode": "coord_tokens" if c["coord_tokens"]["enabled"]
               else "norm1000_text", "prompt_variant": (c.get("extra") or {}).get("prompt_variant", "default"),
               "object_field_order": c["object_field_order"], "bbox_format": c["bbox_format"],
               "system_prompt": r["prompts"]["system"], "user_prompt": r["prompts"]["user"], "do_resize": False}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def run_folder(tiny_ckpt, tmp_path_factory):
    """A training run folder: resolved_config.json at the top, the checkpoint in checkpoint-40/ (no
    record of its own), as CoordExp lays them out."""
    run = tmp_path_factory.mktemp("run") / "stage1-shapes"
    ckpt = run / "checkpoint-40"
    shutil.copytree(tiny_ckpt, ckpt)
    os.remove(ckpt / "resolved_config.json")
    rec = upstream_record(max_pixels=48 * 48)
    (run / "resolved_config.json").write_text(json.dumps(rec, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(ckpt), rec


def _build(argv, capsys=None):
    from coordexp.export.build_engine import main

    rc = main(argv)
    return rc, (capsys.readouterr() if capsys else None)


# ============================================================================ the box codec
@pytest.mark.parametrize("fmt", ["cxcy_logw_logh", "cxcywh"])
def test_the_research_codes_unit_values_round_trip(fmt):
    slots = encode_bbox([100, 200, 400, 700], fmt)
    exact = decode_bbox_exact(slots, fmt)
    assert max(abs(a - b) for a, b in zip(exact, [100, 200, 400, 700])) <= 2.5
    res = parse_model_output('{"objects": [{"desc": "car", "bbox_2d": [%s]}]}'
                             % ", ".join(f"<|coord_{k}|>" for k in slots), bbox_format=fmt, width=999, height=999)
    (pred,) = res.preds
    assert pred.slots == slots and res.error is None and not res.repairs
    assert [round(v) for v in to_pixels(pred.points, 999, 999)] == [100, 200, 400, 699]


def test_centre_slots_decode_as_centre_and_size():
    assert encode_bbox([100, 200, 400, 700], "cxcywh") == [250, 450, 300, 500]
    assert encode_bbox([100, 200, 400, 700], "cxcy_logw_logh") == [250, 450, 826, 899]
    # a size slot of 999 is the whole image, 0 the floor of 1/1024; the centre stays put
    x1, y1, x2, y2 = decode_bbox_exact([500, 500, 999, 999], "cxcy_logw_logh")
    assert (x2 - x1, y2 - y1) == (pytest.approx(999), pytest.approx(999))
    assert decode_bbox([500, 500, 999, 999], "cxcy_logw_logh") == [1, 1, 999, 999]  # re-quantised, clamped
    x1, _, x2, _ = decode_bbox_exact([500, 500, 0, 0], "cxcy_logw_logh")
    assert x2 - x1 == pytest.approx(999 / 1024)
    # read as xyxy, the same answer is a different (here inverted) box: the bug this guards against
    xyxy = parse_model_output('[{"desc": "a", "bbox_2d": [600, 700, 100, 200]}]').preds[0]
    centre = parse_model_output('[{"desc": "a", "bbox_2d": [600, 700, 100, 200]}]', bbox_format="cxcywh").preds[0]
    assert xyxy.points == [600, 700, 100, 200] and centre.points == [550, 600, 650, 800]


@pytest.mark.parametrize("fmt", ["cxcy_logw_logh", "cxcywh"])
def test_a_perfect_centre_format_answer_set_scores_ap_1_and_misread_as_xyxy_it_does_not(fmt, tmp_path):
    from coordexp.dataset import iter_dataset
    from coordexp.eval import evaluate
    from coordexp.generation import GenerationResult
    from coordexp.runner import prediction_from_generation

    data = os.path.join(os.path.dirname(__file__), "..", "data", "demo_val", "val.jsonl")
    spec = PromptSpec(bbox_format=fmt)
    lines = {"decoded": [], "misread": []}
    for item in iter_dataset(data, 10**8):
        answer = format_coordjson([{"desc": o.desc, o.type: [int(v) for v in o.points]} for o in item.record.objects],
                                  spec)
        gen = GenerationResult(text=answer, token_ids=[1])
        lines["decoded"].append(prediction_from_generation(item, gen, bbox_format=fmt).to_json())
        lines["misread"].append(prediction_from_generation(item, gen).to_json())
    scores = {}
    for kind, rows in lines.items():
        pred = tmp_path / f"{kind}.jsonl"
        pred.write_text("\n".join(rows) + "\n")
        m = evaluate(str(pred), data, None, metrics="coco", semantic=False)
        scores[kind] = m["coco"]["bbox"]["AP"]
    assert scores["decoded"] == pytest.approx(1.0, abs=1e-9)
    assert scores["misread"] < 0.2
    # eval reads a line that does not say its format (its boxes the slots as written) with --bbox-format,
    # and refuses a contradiction
    bare = tmp_path / "bare.jsonl"
    raw = [json.loads(r) for r in lines["decoded"]]
    for d in raw:
        d.pop("bbox_format")
        for p in d["preds"]:
            p["points"] = p.pop("slots")
    bare.write_text("\n".join(json.dumps(d) for d in raw) + "\n")
    m = evaluate(str(bare), data, None, metrics="coco", semantic=False, bbox_format=fmt)
    assert m["coco"]["bbox"]["AP"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="the line says bbox_format 'xyxy', --bbox-format says"):
        evaluate(str(tmp_path / "misread.jsonl"), data, None, metrics="coco", semantic=False, bbox_format=fmt)


def test_parse_honours_the_records_format_and_size(tmp_path, capsys):
    """`parse --field raw_output` gives what infer wrote: the line's bbox_format, width and height."""
    from coordexp.client.cli import main

    answer = '{"objects": [{"desc": "a", "bbox_2d": [<|coord_430|>, <|coord_500|>, <|coord_300|>, <|coord_900|>]}]}'
    line = {"image_id": 0, "images": ["x.png"], "width": 8, "height": 8, "bbox_format": "cxcy_logw_logh",
            "raw_output": answer}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert main(["parse", str(path), "--field", "raw_output"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the width slot 300 is 1024 ** -0.7 (0.8 %) of 8 pixels: no area at that size, dropped as infer drops it
    assert got["bbox_format"] == "cxcy_logw_logh" and got["error"] == "invalid_geometry"
    assert main(["parse", str(path), "--field", "raw_output", "--width", "2000", "--height", "2000"]) == 0
    (pred,) = json.loads(capsys.readouterr().out)["preds"]
    assert pred["slots"] == [430, 500, 300, 900] and pred["points"] == decode_bbox([430, 500, 300, 900], "cxcy_logw_logh")


# ============================================================================ guided decoding
def _teacher_forced_masks(proc, vocab, spec, text) -> list[bool]:
    """Feed `text`'s tokens through the guided hook one by one: whether each was allowed."""
    from coordexp.generation import GenerationParams
    from coordexp.guided import guided_logits_hook

    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    hook = guided_logits_hook(proc, spec, GenerationParams(max_new_tokens=400, guided=True), batch=1)
    gen: list[list[int]] = [[]]
    allowed = []
    for step, t in enumerate(ids):
        logits = np.zeros((1, vocab), np.float32)
        logits[0, t] = 10.0
        out = hook(step, gen, logits)
        allowed.append(bool(np.isfinite(out[0, t])) and out[0, t] > -1e9)
        gen[0].append(t)
    return allowed


@pytest.mark.parametrize("fmt", ["cxcy_logw_logh", "cxcywh"])
def test_guided_decoding_never_masks_a_valid_centre_format_answer(tiny_ckpt, fmt):
    from coordexp.processor import CoordExpProcessor

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    vocab = int(json.load(open(os.path.join(tiny_ckpt, "config.json")))["text_config"]["vocab_size"])
    # sizes below the centre (w' < cx): an inverted box if it were xyxy
    objs = [{"desc": "red square", "bbox_2d": decode_bbox([700, 650, 120, 90], fmt)},
            {"desc": "blue circle", "bbox_2d": decode_bbox([300, 800, 60, 40], fmt)}]
    spec = PromptSpec(bbox_format=fmt)
    text = format_coordjson(objs, spec)
    assert all(_teacher_forced_masks(proc, vocab, spec, text))
    # the xyxy guide masks the same answer (the order rule): the check above can fail
    assert not all(_teacher_forced_masks(proc, vocab, PromptSpec(), text))


# ============================================================================ the exporter
def test_the_training_record_is_served_verbatim_image_first_with_its_hash(run_folder, tmp_path, capsys):
    from coordexp.serving.preprocess import Preprocessor

    ckpt, rec = run_folder
    repo = tmp_path / "repo"
    rc, out = _build(["--ckpt", ckpt, "--repo", str(repo), "--backend", "torch", "--device", "cpu", "--dtype", "fp32",
                      "--skip-validation"], capsys)
    assert rc == 0, out.err
    manifest = json.loads((repo / "manifest.json").read_text())
    prompt = PromptSpec.from_dict(manifest["prompt"])
    assert (prompt.system_text, prompt.user_text, prompt.layout) == (SYSTEM, USER, "image_first")
    assert (prompt.bbox_format, prompt.coord_format, prompt.run_variant) == ("cxcy_logw_logh", "tokens", "coco_80")
    want = upstream_hash(rec)
    assert manifest["prompt_template_hash"] == want == manifest["prompt_source"]["prompt_template_hash"]
    assert manifest["prompt_source"]["source"] == "training_record"
    assert manifest["prompt_source"]["record"] == os.path.join(os.path.dirname(ckpt), "resolved_config.json")
    assert manifest["max_new_tokens"] == 2048 and manifest["decoding_defaults"]["max_new_tokens"] == 2048
    assert f"hash     : {want}" in out.out
    # the prompt token ids the served preprocess step makes == the chat template over the recorded texts,
    # image first, built here independently of PromptSpec.messages
    from transformers import AutoTokenizer

    proc_dir = repo / "preprocess" / "1" / "processor"
    pre = Preprocessor.from_dir(str(proc_dir), prompt)
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 120), (30, 140, 200)).save(buf, "PNG")
    enc = pre.encode([buf.getvalue()])
    tok = AutoTokenizer.from_pretrained(str(proc_dir))
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER}]}]
    text = tok.apply_chat_template(messages, chat_template=(proc_dir / "chat_template.jinja").read_text(),
                                   tokenize=False, add_generation_prompt=True)
    assert text.index("<|vision_start|>") < text.index(USER)  # image first, as trained
    t, h, w = (int(v) for v in enc["image_grid_thw"][0])
    n_image = t * h * w // 4
    want_ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n_image))["input_ids"]
    assert enc["input_ids"][0].tolist() == want_ids
    # the image budget of the record (template.max_pixels) is the served processor's
    assert json.loads((proc_dir / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 48 * 48
    assert h * w * 64 <= 48 * 48  # patch 8: the 200x120 image was resized within the budget


def test_the_tensorrt_llm_repository_serves_the_recorded_prompt_too(run_folder, tmp_path, capsys):
    ckpt, rec = run_folder
    repo = tmp_path / "trt"
    rc, out = _build(["--ckpt", ckpt, "--repo", str(repo), "--backend", "trtllm", "--dry-run"], capsys)
    assert rc == 0, out.err
    manifest = json.loads((repo / "manifest.json").read_text())
    prompt = PromptSpec.from_dict(manifest["prompt"])
    assert (prompt.system_text, prompt.user_text, prompt.bbox_format) == (SYSTEM, USER, "cxcy_logw_logh")
    assert manifest["prompt_template_hash"] == upstream_hash(rec)
    pre = (repo / "preprocess" / "config.pbtxt").read_text()
    post = (repo / "postprocess" / "config.pbtxt").read_text()
    assert "Which shapes are in this picture?" in pre and "cxcy_logw_logh" in post


def test_text_first_layout_and_flags_over_the_record_are_named(run_folder, tmp_path, capsys):
    ckpt, rec = run_folder
    rc, out = _build(["--ckpt", ckpt, "--dry-run", "--json", "--message-layout", "text_first"], capsys)
    assert rc == 0, out.err
    assert json.loads(out.out)["prompt"] == "run:coco_80/tokens/desc_first/sorted/cxcy_logw_logh+text_first"
    assert "--message-layout replaces the training record's value" in out.err
    msgs = PromptSpec(user_text=USER, layout="text_first").messages()
    assert [p["type"] for p in msgs[1]["content"]] == ["text", "image"]


def test_expect_prompt_hash_accepts_the_runs_hash_and_refuses_another(run_folder, tmp_path, capsys):
    ckpt, rec = run_folder
    want = upstream_hash(rec)
    infer_run = tmp_path / "infer_run"
    infer_run.mkdir()  # a CoordExp inference run's record: it names the hash it ran with
    (infer_run / "resolved_config.json").write_text(json.dumps(
        {"schema_version": 1, "stages": {}, "artifacts": {}, "infer": {"prompt_template_hash": want}}))
    assert _build(["--ckpt", ckpt, "--dry-run", "--expect-prompt-hash", want])[0] == 0
    assert _build(["--ckpt", ckpt, "--dry-run", "--expect-prompt-hash", str(infer_run)])[0] == 0
    capsys.readouterr()
    rc, out = _build(["--ckpt", ckpt, "--dry-run", "--expect-prompt-hash", "0" * 64], capsys)
    assert rc == 2 and f"has prompt_template_hash {want}, expected {'0' * 64}" in out.err
    # the inference run's record is not a training record
    rc, out = _build(["--ckpt", ckpt, "--dry-run", "--run-config", str(infer_run / "resolved_config.json")], capsys)
    assert rc == 2 and "is a CoordExp inference run's record" in out.err


def test_a_checkpoint_without_a_training_record_is_refused_unless_asked(tiny_ckpt, tmp_path, capsys):
    bare = tmp_path / "bare-ckpt"
    shutil.copytree(tiny_ckpt, bare)
    os.remove(bare / "resolved_config.json")
    rc, out = _build(["--ckpt", str(bare), "--repo", str(tmp_path / "r"), "--dry-run"], capsys)
    assert rc == 2
    assert f"{bare} has no training-run record: looked for resolved_config.json in {bare}" in out.err
    assert "--run-config" in out.err and "--builtin-prompt" in out.err
    rc, out = _build(["--ckpt", str(bare), "--dry-run", "--json", "--builtin-prompt"], capsys)
    assert rc == 0 and json.loads(out.out)["prompt"] == "coordexp/tokens/desc_first/sorted/v1"
    rc, out = _build(["--ckpt", str(bare), "--dry-run", "--json", "--system-prompt", "S", "--prompt", "U"], capsys)
    assert rc == 0 and json.loads(out.out)["prompt"] == "coordexp/tokens/desc_first/sorted/v1+custom"
    # the local engines refuse it the same way (one rule)
    from coordexp.engines import load_engine
    from coordexp.training_record import TrainingRecordError

    with pytest.raises(TrainingRecordError, match="has no training-run record"):
        load_engine("torch", str(bare))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["resolved"]["custom"].update(bbox_format="polar"), "resolved.custom.bbox_format: unknown bbox_format"),
    (lambda r: r["resolved"]["custom"].pop("object_field_order"), "resolved.custom.object_field_order is missing"),
    (lambda r: [r["resolved"]["template"].pop("system"), r["resolved"]["prompts"].pop("system")],
     "no system prompt (looked for resolved.template.system and resolved.prompts.system)"),
    (lambda r: r["resolved"]["custom"].update(object_ordering="by_size"), "resolved.custom.object_ordering is 'by_size'"),
    (lambda r: r["resolved"]["template"].update(max_pixels="a lot"), "resolved.template.max_pixels must be"),
])
def test_a_broken_record_is_refused_naming_the_file_and_key(tmp_path, edit, message):
    from coordexp.training_record import TrainingRecordError, read_training_record

    rec = upstream_record()
    edit(rec)
    path = tmp_path / "resolved_config.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(TrainingRecordError) as e:
        read_training_record(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_numeric_records_and_the_demo_record_read_back():
    from coordexp.training_record import checkpoint_prompt

    demo = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "coordexp-demo-shapes")
    choice = checkpoint_prompt(demo)
    # the demo was trained on the built-in prompt: its record holds exactly those texts
    assert (choice.prompt.system(), choice.prompt.user_text) == (PromptSpec().system(), PromptSpec().user_text)
    assert choice.max_pixels == 65536 and choice.source == "training_record"


# ============================================================================ served, unary and streamed
@pytest.fixture(scope="module")
def centre_server(demo_repo, tmp_path_factory):
    """The demo's ONNX graphs re-served as if its training record said `bbox_format: cxcy_logw_logh` (the
    graphs do not depend on the prompt; the demo model writes boxes, which are then read as centre +
    size), on its own real Triton server."""
    import dataclasses

    from coordexp.export.repository import find_onnx_dir, write_repository
    from coordexp.serving.server import start_server
    from coordexp.training_record import checkpoint_prompt

    from conftest import DEMO_CKPT

    demo = checkpoint_prompt(DEMO_CKPT)
    choice = dataclasses.replace(demo, prompt=dataclasses.replace(demo.prompt, bbox_format="cxcy_logw_logh"))
    out = write_repository(str(tmp_path_factory.mktemp("centre") / "repo"), onnx_dir=find_onnx_dir(demo_repo),
                           ckpt=DEMO_CKPT, max_new_tokens=96, prompt=choice.prompt, prompt_source=choice.to_manifest())
    srv = start_server(out)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.triton
def test_served_centre_format_answers_are_decoded_unary_and_streamed(centre_server, sample_data, tmp_path):
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.engines.triton.pool import ServerPool
    from coordexp.generation import GenerationParams
    from coordexp.runner import run_dataset

    params = GenerationParams(max_new_tokens=96, guided=True)
    out = tmp_path / "predictions.jsonl"
    with TritonEngine.connect([centre_server.grpc_url], ClientOptions(timeout=120.0)) as engine:
        assert engine.prompt.bbox_format == "cxcy_logw_logh"  # from the served manifest
        run_dataset(sample_data, str(out), engine, params, concurrency=2)
    boxes = 0
    for d in (json.loads(x) for x in out.read_text().splitlines()):
        assert d["bbox_format"] == "cxcy_logw_logh"
        for p in d["preds"]:
            if p["type"] == "bbox_2d":
                boxes += 1
                assert p["points"] == decode_bbox(p["slots"], "cxcy_logw_logh")
    assert boxes > 0

    first = json.loads(open(sample_data).readline())
    image = open(os.path.join(os.path.dirname(sample_data), first["images"][0]), "rb").read()

    async def ask(model):
        pool, _ = await ServerPool.connect([centre_server.grpc_url], model)
        try:
            return (await pool.generate(image, params))[0]
        finally:
            await pool.close()

    unary, streamed = asyncio.run(ask("coordexp")), asyncio.run(ask("coordexp_stream"))
    assert unary.text == streamed.text
    for gen in (unary, streamed):  # the postprocess step decodes with the served format
        assert gen.served_preds["bbox_format"] == "cxcy_logw_logh"
        local = parse_model_output(gen.text, bbox_format="cxcy_logw_logh")
        assert gen.served_preds["preds"] == [p.to_dict() for p in local.preds]
        assert any(p.slots is not None for p in local.preds)
