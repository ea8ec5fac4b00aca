"""The TensorRT-LLM path without TensorRT-LLM: `build_engine --backend trtllm --dry-run` writes a
repository whose configs parse with Triton's protobuf and keep the ONNX repository's ensemble
contract; its commands are well-formed for the pinned CLIs (flag sets below, as data); the `llm`
step's glue (image and prompt rebuilt for the LLM API, sampling parameters, batching) runs against
a stand-in LLM. Nothing here imports tensorrt_llm or tensorrt: they cannot be installed here."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
from types import SimpleNamespace

import numpy as np
import pytest

from coordexp import wire
from coordexp.serving import common as C
from test_repository import fake_onnx_dir  # one placeholder export for both repository kinds

# ---------------------------------------------------------------------------- pinned CLI facts (data)
# TensorRT 10.x trtexec build flags (TensorRT "Command-Line Programs" reference, 10.x).
TRTEXEC_FLAGS = {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--shapes", "--fp16", "--bf16",
                 "--fp8", "--int8", "--best", "--stronglyTyped", "--noTF32", "--memPoolSize", "--timingCacheFile",
                 "--skipInference", "--builderOptimizationLevel", "--inputIOFormats", "--outputIOFormats", "--verbose"}
# Removed in TensorRT 10 ("Migrating trtexec usage from TensorRT 8.x to 10.x"): trtexec exits with an error.
TRTEXEC_REMOVED = {"--workspace", "--minTiming", "--explicitBatch", "--maxBatch", "--batch", "--deploy", "--model",
                   "--output", "--uff", "--uffInput", "--uffNHWC"}
TRITONSERVER_FLAGS = {"--model-repository", "--http-port", "--grpc-port", "--metrics-port", "--http-address",
                      "--grpc-address", "--metrics-address", "--exit-timeout-secs", "--strict-readiness",
                      "--log-verbose", "--model-control-mode", "--load-model", "--backend-directory",
                      "--backend-config", "--disable-auto-complete-config"}
# tensorrt_llm.LLM keyword arguments (TorchLlmArgs, TensorRT-LLM 1.x API reference; `backend` as in the
# official llmapi model.yaml) and KvCacheConfig fields used here.
TORCH_LLM_ARGS = {"model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "backend",
                  "tensor_parallel_size", "pipeline_parallel_size", "dtype", "revision", "max_batch_size",
                  "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width", "kv_cache_config",
                  "enable_chunked_prefill", "guided_decoding_backend", "cuda_graph_config"}
KV_CACHE_CONFIG = {"free_gpu_memory_fraction", "dtype", "enable_block_reuse", "max_tokens"}
SAMPLING_PARAMS = {"max_tokens", "end_id", "pad_id", "stop_token_ids", "stop", "ignore_eos", "repetition_penalty",
                   "detokenize", "temperature", "top_k", "top_p", "seed", "n", "best_of", "return_log_probs"}


def dry_run(argv: list[str]) -> tuple[int, str]:
    from coordexp.export.build_engine import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def qwen25_ckpt(tmp_path_factory) -> str:
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    out = tmp_path_factory.mktemp("ckpt25") / "tiny-qwen25vl"
    build_tiny_checkpoint(str(out), family="qwen2_5_vl", seed=0)
    return str(out)


@pytest.fixture(scope="module")
def repos(tiny_ckpt, qwen25_ckpt, tmp_path_factory) -> dict[str, str]:
    """The ONNX repository (placeholder graphs) and two dry-run repositories (both vision modes)."""
    from coordexp.export.repository import write_repository
    from coordexp.training_record import checkpoint_prompt

    base = tmp_path_factory.mktemp("trtllm")
    choice = checkpoint_prompt(tiny_ckpt)  # the prompt build_engine serves, every backend alike
    onnx = write_repository(str(base / "onnx"), "coordexp", fake_onnx_dir(base / "export"), tiny_ckpt,
                            max_batch_size=8, max_new_tokens=256, prompt=choice.prompt,
                            prompt_source=choice.to_manifest())
    rc, out = dry_run(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--dry-run", "--repo", str(base / "llmapi"),
                       "--name", "coordexp", "--max-new-tokens", "256"])
    assert rc == 0, out
    # the TensorRT vision path is refused for the pinned release; its dormant code is still checked,
    # as if a release took external embeddings
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("coordexp.trtllm.plan.EXTERNAL_EMBEDDINGS_SINCE", "future")
        rc2, out2 = dry_run(["--ckpt", qwen25_ckpt, "--backend", "trtllm", "--dry-run", "--repo", str(base / "trt"),
                             "--name", "coordexp", "--trtllm-vision", "tensorrt", "--dtype", "fp16", "--json",
                             "--max-new-tokens", "256"])
    assert rc2 == 0, out2
    return {"onnx": onnx, "llmapi": str(base / "llmapi"), "trt": str(base / "trt"), "out": out,
            "plan_trt": json.loads(out2)["plan"]}


def configs(repo: str) -> dict:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = {}
    for entry in sorted(os.listdir(repo)):
        path = os.path.join(repo, entry, "config.pbtxt")
        if os.path.isfile(path):
            out[entry] = text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())
    return out


def tensors(cfg, which: str) -> dict:
    return {t.name: (t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in getattr(cfg, which)}


# ---------------------------------------------------------------------------- repository
@pytest.mark.parametrize("kind", ["llmapi", "trt"])
def test_configs_parse_and_keep_the_ensemble_contract(repos, kind):
    from coordexp.export.model_configs import check_wiring

    onnx, trt = configs(repos["onnx"]), configs(repos[kind])
    for name in ("coordexp", "coordexp_stream"):  # the unary and the streaming ensemble
        assert check_wiring(trt, name) == []
        ens_o, ens_t = onnx[name], trt[name]
        assert ens_t.platform == "ensemble" and ens_t.max_batch_size == ens_o.max_batch_size
        assert tensors(ens_t, "input") == tensors(ens_o, "input")  # names, dtypes, dims, optional: identical
        assert tensors(ens_t, "output") == tensors(ens_o, "output")
    assert trt[wire.LLM_STREAM].model_transaction_policy.decoupled and not trt[wire.LLM].model_transaction_policy.decoupled
    assert tensors(trt[wire.LLM_STREAM], "input") == {**tensors(trt[wire.LLM], "input"),
                                                   **{wire.STREAM: tensors(onnx[wire.LLM_STREAM], "input")[wire.STREAM]}}
    ens_t = trt["coordexp"]
    for step in (wire.PREPROCESS, wire.POSTPROCESS):  # the very same step models
        assert trt[step] == onnx[step]
    llm_o, llm_t = onnx[wire.LLM], trt[wire.LLM]
    assert tensors(llm_t, "output") == tensors(llm_o, "output")
    ins_o, ins_t = tensors(llm_o, "input"), tensors(llm_t, "input")
    assert set(ins_t) - set(ins_o) == {wire.PIXEL_VALUES}
    assert all(ins_t[k][:2] == v[:2] for k, v in ins_o.items())
    assert ins_t[wire.PIXEL_VALUES][:2] == tensors(onnx[wire.PREPROCESS], "output")[wire.PIXEL_VALUES][:2]
    steps = [s.model_name for s in ens_t.ensemble_scheduling.step]
    if kind == "llmapi":
        assert steps == [wire.PREPROCESS, wire.LLM, wire.POSTPROCESS] and wire.VISION_ENCODER not in trt
    else:
        assert steps == [wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM, wire.POSTPROCESS]
        assert tensors(trt[wire.VISION_ENCODER], "input") == tensors(onnx[wire.VISION_ENCODER], "input")
        assert tensors(trt[wire.VISION_ENCODER], "output") == tensors(onnx[wire.VISION_ENCODER], "output")
        assert trt[wire.VISION_ENCODER].instance_group[0].kind == 1  # KIND_GPU
    assert json.loads(ens_t.parameters["manifest_json"].string_value)["backend"] == "trtllm"


def test_layout_model_yaml_and_manifest(repos):
    import yaml

    from coordexp.trtllm.plan import PINNED

    repo = repos["llmapi"]
    assert sorted(os.listdir(repo)) == sorted(["coordexp", wire.LLM, wire.PREPROCESS, wire.POSTPROCESS, C.MANIFEST,
                                               "coordexp_stream", wire.LLM_STREAM])
    assert os.path.isfile(os.path.join(repo, C.PROCESSOR_SUBDIR, "tokenizer.json"))
    assert not os.path.exists(os.path.join(repo, "llm", "1", "checkpoint"))  # weights: the real run's copy
    args = yaml.safe_load(open(os.path.join(repo, "llm", "1", "model.yaml")))
    assert set(args) <= TORCH_LLM_ARGS and set(args["kv_cache_config"]) <= KV_CACHE_CONFIG
    assert args["backend"] == "pytorch" and args["dtype"] == "bfloat16" and args["tensor_parallel_size"] == 1
    assert args["max_seq_len"] == args["max_input_len"] + 256 and args["max_num_tokens"] >= args["max_input_len"]
    # llm and llm_stream are two LLM API instances, each taking its fraction of the memory free when it
    # starts: 1 - sqrt(1 - 0.8) each, about 0.8 together (not "half each"); block reuse off (#14125)
    kv = args["kv_cache_config"]
    assert kv["free_gpu_memory_fraction"] == 0.5528 and args["model"] == "llm/1/checkpoint"
    assert kv["enable_block_reuse"] is False
    m = json.load(open(os.path.join(repo, C.MANIFEST)))
    note = m["trtllm"]["kv_cache_note"]
    assert m["models"]["stream_ensemble"] == "coordexp_stream" and "half" not in note and "own weights" in note
    assert m["backend"] == "trtllm" and m["trtllm"]["dry_run"] is True and m["trtllm"]["pinned"] == PINNED
    assert m["models"]["steps"] == [wire.PREPROCESS, wire.LLM, wire.POSTPROCESS] and m["max_new_tokens"] == 256
    # both families need TensorRT-LLM >= 1.2 (Qwen3-VL); no Triton image carries it: built on 25.12-py3-min
    assert PINNED["tensorrt_llm"] == "1.2.1" and PINNED["transformers"] == "4.57.3"
    assert PINNED["trtllm_base_image"].endswith("25.12-py3-min") and PINNED["triton_image"].endswith("25.12-py3")
    out = repos["out"]
    assert "dry run" in out and "tritonserver --model-repository=" in out and "trtexec" not in out


def test_shims_import_the_trtllm_models(repos):
    import runpy

    for model, cls in ((wire.LLM, "coordexp.trtllm.llm_model.TritonPythonModel"),
                       (wire.LLM_STREAM, "coordexp.trtllm.llm_model.TritonPythonModel"),
                       (wire.VISION_ENCODER, "coordexp.trtllm.vision.TrtVisionEncoderModel"),
                       (wire.PREPROCESS, "coordexp.serving.preprocess.TritonPythonModel")):
        code = open(os.path.join(repos["trt"], model, "1", "model.py")).read()
        assert "COORDEXP_SITE" in code
        got = runpy.run_path(os.path.join(repos["trt"], model, "1", "model.py"))["TritonPythonModel"]
        assert f"{got.__module__}.{got.__qualname__}" == cls  # imported without tensorrt_llm / tensorrt


# ---------------------------------------------------------------------------- commands
def flags(argv: list[str]) -> dict[str, str | None]:
    out = {}
    for a in argv[1:]:
        assert a.startswith("--"), a
        k, _, v = a.partition("=")
        out[k] = v or None
    return out


def parse_shapes(value: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in value.split(","):
        name, _, dims = item.rpartition(":")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def test_commands_are_well_formed_for_the_pinned_clis(repos):
    from coordexp.families import family_spec
    from coordexp.export.trtllm_export import build_parser

    plan = repos["plan_trt"]
    cmds = {c["step"]: c for c in plan["commands"]}
    assert list(cmds) == ["vision-onnx", "vision-engine", "checkpoint", "serve"]
    for c in plan["commands"]:
        assert shlex.split(c["shell"]) == c["argv"]
    onnx_cmd = cmds["vision-onnx"]["argv"]
    assert onnx_cmd[:3] == ["python", "-m", "coordexp.export.trtllm_export"]
    a = build_parser().parse_args(onnx_cmd[3:])
    assert a.cmd == "onnx" and os.path.isabs(a.out)

    trt = cmds["vision-engine"]["argv"]
    assert trt[0] == "trtexec"
    f = flags(trt)
    assert set(f) <= TRTEXEC_FLAGS and not set(f) & TRTEXEC_REMOVED
    assert f["--onnx"] == os.path.join(a.out, "vision.onnx") and f["--saveEngine"].endswith(".plan")
    assert "--fp16" in f and "--bf16" not in f and f["--memPoolSize"].startswith("workspace:")
    shapes = {k: parse_shapes(f[k]) for k in ("--minShapes", "--optShapes", "--maxShapes")}
    names = family_spec("qwen2_5_vl").vision_input_names
    patch_dim = 3 * 2 * 16 * 16
    prof = plan["profile"]
    for key, n in (("--minShapes", prof["min"]), ("--optShapes", prof["opt"]), ("--maxShapes", prof["max"])):
        s = shapes[key]
        assert list(s) == names
        assert s["pixel_values"] == (n, patch_dim) and s["vision_pos_ids"] == (n, 2)
        assert s["window_bias"] == s["full_bias"] == (n, n)
    assert prof["min"] <= prof["opt"] <= prof["max"] and prof["min"] % 4 == prof["max"] % 4 == 0
    assert flags(cmds["serve"]["argv"]).keys() <= TRITONSERVER_FLAGS
    assert cmds["checkpoint"]["argv"][:2] == ["cp", "-a"]


def test_precision_and_options(tiny_ckpt, tmp_path):
    from coordexp.trtllm.plan import DTYPES, TrtllmOptions, make_plan

    for dtype, flag in (("bf16", "--bf16"), ("fp16", "--fp16"), ("fp8", "--fp16")):
        assert DTYPES[dtype]["trtexec"] == flag
    plan = make_plan(tiny_ckpt, "coordexp", str(tmp_path / "r"),
                     TrtllmOptions(dtype="fp8", max_batch_size=4, max_input_len=400, max_new_tokens=64,
                                   kv_cache_fraction=0.5, tp_size=2, vision_max_patches=128, streaming=False))
    api = plan.llm_api
    assert api["kv_cache_config"] == {"free_gpu_memory_fraction": 0.5, "dtype": "fp8", "enable_block_reuse": False}
    assert api["dtype"] == "bfloat16"
    assert api["tensor_parallel_size"] == 2 and api["max_batch_size"] == 4
    assert api["max_input_len"] == 400 and api["max_seq_len"] == 464
    assert plan.profile["max"] == 128 and any("below the image processor's largest image" in w for w in plan.warnings)
    assert any("Model Optimizer" in n for n in plan.notes) and any("MPI workers" in n for n in plan.notes)


def test_no_stream_gives_one_llm_instance_with_the_whole_kv_share(tiny_ckpt, tmp_path):
    import yaml

    rc, out = dry_run(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--dry-run", "--repo", str(tmp_path / "r"),
                       "--no-stream"])
    assert rc == 0, out
    assert sorted(os.listdir(tmp_path / "r")) == sorted(["coordexp", wire.LLM, wire.PREPROCESS, wire.POSTPROCESS, C.MANIFEST])
    args = yaml.safe_load(open(tmp_path / "r" / "llm" / "1" / "model.yaml"))
    assert args["kv_cache_config"]["free_gpu_memory_fraction"] == 0.8
    assert "free_gpu_memory_fraction 0.8" in out and "llm_stream" not in out
    manifest = json.load(open(tmp_path / "r" / C.MANIFEST))
    assert manifest["models"]["stream_ensemble"] is None and "kv_cache_note" not in manifest["trtllm"]


def test_refusals_exit_2(tiny_ckpt, tmp_path, capsys):
    from importlib.util import find_spec

    from coordexp.export.build_engine import main
    from coordexp.trtllm.plan import PINNED

    # a separate vision engine: 1.2.1's Qwen-VL input processor has no external embeddings (one line)
    assert main(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--dry-run", "--trtllm-vision", "tensorrt",
                 "--repo", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot work with TensorRT-LLM 1.2.1" in err
    assert "NotImplementedError" in err and "--trtllm-vision trtllm" in err
    # and, even with a release that took them, Qwen3-VL's deepstack features have no LLM API input
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("coordexp.trtllm.plan.EXTERNAL_EMBEDDINGS_SINCE", "future")
        assert main(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--dry-run", "--trtllm-vision", "tensorrt",
                     "--repo", str(tmp_path / "a")]) == 2
    assert "deepstack" in capsys.readouterr().err
    assert main(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--dry-run", "--tp-size", "3",
                 "--repo", str(tmp_path / "b")]) == 2
    assert "--tp-size" in capsys.readouterr().err
    if find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is importable here")
    assert main(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--repo", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert PINNED["trtllm_image"] in err and "--dry-run" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------- the llm step's glue
def test_image_and_prompt_rebuilt_exactly(tiny_ckpt):
    from PIL import Image

    from coordexp.processor import CoordExpProcessor
    from coordexp.trtllm.inputs import PromptRebuilder, collapse_image_pads

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    rb = PromptRebuilder.from_dir(tiny_ckpt)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (203, 317, 3), dtype=np.uint8))
    enc = proc.encode([img], return_tensors="np")
    grid, ids = enc["image_grid_thw"][0], enc["input_ids"][0]
    rebuilt = rb.image(enc["pixel_values"], grid)
    assert rebuilt.dtype == np.uint8 and rebuilt.shape == (grid[1] * 16, grid[2] * 16, 3)
    text = rb.prompt(ids)
    assert text.count("<|image_pad|>") == 1 and text == proc.prompt_text()
    # what TensorRT-LLM's Qwen-VL input processor does with (prompt, image): the same ids and patches
    again = proc.encode([Image.fromarray(rebuilt)], texts=[text], return_tensors="np")
    assert again["input_ids"][0].tolist() == ids.tolist()
    assert np.array_equal(again["image_grid_thw"], enc["image_grid_thw"])
    assert np.array_equal(again["pixel_values"], enc["pixel_values"])
    assert collapse_image_pads([1, 7, 7, 7, 2, 7, 3], 7) == [1, 7, 2, 7, 3]


def test_small_helpers():
    from coordexp.generation import GenerationParams
    from coordexp.trtllm.inputs import accepted_kwargs, near_square_grid, sampling_kwargs, strip_stop

    assert strip_stop([5, 6, 9, 7], [9, 10]) == [5, 6] and strip_stop([5], [9]) == [5]
    assert near_square_grid(12, 2) == [1, 6, 8] and near_square_grid(7, 2) == [1, 2, 14]
    g = sampling_kwargs(GenerationParams(max_new_tokens=9), [9, 10], 0)
    s = sampling_kwargs(GenerationParams(temperature=0.7, top_p=0.9, seed=3), [9], 0)
    assert g["top_k"] == 1 and "temperature" not in g and g["max_tokens"] == 9 and g["detokenize"] is False
    assert s["temperature"] == 0.7 and s["seed"] == 3 and set(g) | set(s) <= SAMPLING_PARAMS

    @dataclasses.dataclass
    class Narrow:
        max_tokens: int = 1

    assert accepted_kwargs(Narrow, {"max_tokens": 2, "ignore_eos": True}) == ({"max_tokens": 2}, ["ignore_eos"])


class FakeLLM:
    """Stands in for tensorrt_llm.LLM: records what it is given, answers fixed ids."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        raise AssertionError("LLM.generate() blocks execute(): rows go to generate_async")

    def generate_async(self, prompt, sampling_params=None, streaming=False):
        """An async iterator: streamed, cumulative outputs one per token; else the final one."""
        self.calls.append(([prompt], [sampling_params]))
        answer = list(self.answer)

        async def outputs():
            for n in (range(1, len(answer) + 1) if streaming else [len(answer)]):
                if prompt.get("fail") and n == 2:
                    raise RuntimeError("engine error")
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=answer[:n])], finished=n == len(answer))
        return outputs()


@dataclasses.dataclass
class FakeSampling:
    max_tokens: int = 32
    end_id: int = -1
    pad_id: int = -1
    stop_token_ids: list = dataclasses.field(default_factory=list)
    repetition_penalty: float = 1.0
    detokenize: bool = True
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    ignore_eos: bool = False


def test_batcher_runs_requests_through_the_llm_api(tiny_ckpt):
    from PIL import Image

    from coordexp.processor import CoordExpProcessor
    from coordexp.trtllm.inputs import PromptRebuilder
    from coordexp.trtllm.llm_model import TrtllmBatcher

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in ((120, 200, 3), (64, 64, 3))]
    enc = proc.encode(imgs, return_tensors="np")
    n = [int(np.prod(g)) for g in enc["image_grid_thw"]]
    pv = np.zeros((2, max(n), enc["pixel_values"].shape[1]), np.float32)
    pv[0, :n[0]], pv[1, :n[1]] = enc["pixel_values"][:n[0]], enc["pixel_values"][n[0]:]
    stop = proc.stop_token_ids
    good = C.TritonRequestView({
        wire.INPUT_IDS: enc["input_ids"].astype(np.int32), wire.ATTENTION_MASK: enc["attention_mask"].astype(np.int32),
        wire.INPUT_LENGTHS: enc["attention_mask"].sum(1, keepdims=True).astype(np.int32),
        wire.IMAGE_GRID_THW: enc["image_grid_thw"], wire.PIXEL_VALUES: pv,
        wire.REQUEST_OUTPUT_LEN: np.array([[7], [7]], np.int32)})
    guided = C.TritonRequestView({**{k: v[:1] for k, v in good.inputs.items()}, wire.GUIDED: np.array([[True]])})
    llm = FakeLLM([11, 12, stop[0], 13])
    batcher = TrtllmBatcher(llm, FakeSampling, PromptRebuilder.from_dir(tiny_ckpt), vision="trtllm",
                            max_new_tokens=64, pad_token_id=proc.pad_token_id, stop_token_ids=stop)
    res = batcher.run([good, guided])
    assert isinstance(res[1], C.RequestError) and "guided" in str(res[1])
    out = res[0]
    assert out[wire.OUTPUT_IDS].tolist() == [[11, 12], [11, 12]] and out[wire.SEQUENCE_LENGTH].tolist() == [[2], [2]]
    # one generate_async per row, all in flight together (rows join the running batch)
    prompts, sampling = [c[0][0] for c in llm.calls], [c[1][0] for c in llm.calls]
    assert batcher.calls == [2] and len(prompts) == 2 and all(p["prompt"] == proc.prompt_text() for p in prompts)
    sizes = [p["multi_modal_data"]["image"][0].size for p in prompts]
    assert sizes == [(int(g[2]) * 16, int(g[1]) * 16) for g in enc["image_grid_thw"]]
    assert sampling[0].max_tokens == 7 and sampling[0].top_k == 1 and sampling[0].end_id == stop[0]
    # no pixel_values -> that request fails, clearly
    bare = C.TritonRequestView({k: v for k, v in good.inputs.items() if k != wire.PIXEL_VALUES})
    assert "pixel_values" in str(batcher.run([bare])[0])


FakeStreamingLLM = FakeLLM


def test_streaming_batcher_sends_every_token_then_the_unary_answer(tiny_ckpt):
    from coordexp.processor import CoordExpProcessor
    from coordexp.serving.llm import DecoupledRun
    from coordexp.trtllm.inputs import PromptRebuilder
    from coordexp.trtllm.llm_model import TrtllmBatcher

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    enc = proc.encode([np.zeros((64, 64, 3), np.uint8)], return_tensors="np")
    view = {wire.INPUT_IDS: enc["input_ids"].astype(np.int32), wire.ATTENTION_MASK: enc["attention_mask"].astype(np.int32),
            wire.IMAGE_GRID_THW: enc["image_grid_thw"], wire.PIXEL_VALUES: enc["pixel_values"][None].astype(np.float32)}
    stop = proc.stop_token_ids
    llm = FakeStreamingLLM([21, 22, 23, stop[0]])
    batcher = TrtllmBatcher(llm, FakeSampling, PromptRebuilder.from_dir(tiny_ckpt), max_new_tokens=64,
                            pad_token_id=proc.pad_token_id, stop_token_ids=stop)
    unary = batcher.run([C.TritonRequestView(view)])[0]
    sent = []
    views = [C.TritonRequestView({**view, wire.STREAM: np.array([[True]])}), C.TritonRequestView(view)]
    DecoupledRun(batcher, lambda r, res, final: sent.append((r, res, final))).run(views)
    streamed = [(res[wire.SEQUENCE_LENGTH][0, 0], final) for r, res, final in sent if r == 0]
    assert streamed == [(1, False), (2, False), (3, False), (3, True)]  # the stop id is stripped, then final
    assert [final for r, _, final in sent if r == 1] == [True]  # not streamed: one response
    for r in (0, 1):
        last = [res for q, res, _ in sent if q == r][-1]
        assert last[wire.OUTPUT_IDS].tolist() == unary[wire.OUTPUT_IDS].tolist() == [[21, 22, 23]]
    # an engine error mid-stream ends that request with the error, once
    batcher.llm_input = lambda it: {"prompt": "x", "fail": True}
    sent.clear()
    DecoupledRun(batcher, lambda r, res, final: sent.append((r, res, final))).run(views[:1])
    assert [f for _, _, f in sent] == [False, True] and isinstance(sent[-1][1], RuntimeError)


def test_batcher_external_embeddings_refuse_grids_the_llm_api_would_guess_wrong(tiny_ckpt):
    from coordexp.trtllm.inputs import PromptRebuilder
    from coordexp.trtllm.llm_model import TrtllmBatcher

    rb = PromptRebuilder.from_dir(tiny_ckpt)
    batcher = TrtllmBatcher(FakeLLM([1]), FakeSampling, rb, vision="tensorrt", stop_token_ids=[0])

    def view(grid):
        n = int(np.prod(grid)) // 4
        ids = np.array([[3] + [rb.image_token_id] * n + [4]], np.int32)
        return C.TritonRequestView({wire.INPUT_IDS: ids, wire.ATTENTION_MASK: np.ones_like(ids),
                                    wire.IMAGE_GRID_THW: np.array([grid], np.int64),
                                    wire.IMAGE_EMBEDS: np.zeros((1, n, 8), np.float32),
                                    wire.DEEPSTACK_EMBEDS: np.zeros((1, 0, n, 8), np.float32)})

    square, wide = batcher.run([view([1, 4, 6]), view([1, 2, 12])])
    assert isinstance(wide, C.RequestError) and "near-square" in str(wide)
    assert not isinstance(square, Exception)


@pytest.mark.slow
def test_vision_onnx_inputs_match_the_exporter(qwen25_ckpt, tmp_path):
    """The trtexec profile names and ranks are those of the real vision.onnx (exports the tiny model)."""
    import onnx

    from coordexp.families import family_spec
    from coordexp.export.trtllm_export import export_vision_onnx

    meta = export_vision_onnx(qwen25_ckpt, str(tmp_path / "onnx"))
    assert meta["graphs"]["vision"]["inputs"] == family_spec("qwen2_5_vl").vision_input_names
    graph = onnx.load(str(tmp_path / "onnx" / "vision.onnx"), load_external_data=False).graph
    assert all(len(i.type.tensor_type.shape.dim) == 2 for i in graph.input)


# ---------------------------------------------------------------------------- structure
def test_both_llm_back_ends_are_generators_without_sharing_a_class(tiny_ckpt):
    from coordexp.serving.llm import Generator, LlmBatcher
    from coordexp.trtllm.inputs import PromptRebuilder
    from coordexp.trtllm.llm_model import TrtllmBatcher

    assert not issubclass(TrtllmBatcher, LlmBatcher) and not issubclass(LlmBatcher, TrtllmBatcher)
    trt = TrtllmBatcher(FakeLLM([1]), FakeSampling, PromptRebuilder.from_dir(tiny_ckpt), stop_token_ids=[0])
    onnx = LlmBatcher(SimpleNamespace(meta={"spatial_merge_size": 2}))
    assert isinstance(trt, Generator) and isinstance(onnx, Generator)


class FakeVisionSession:
    """Stands in for the TensorRT engine (an onnxruntime-like session): records its feeds, returns one
    embedding row per merged patch numbered in input order."""

    def __init__(self):
        self.feeds = []

    def get_outputs(self):
        return [SimpleNamespace(name="image_embeds")]

    def run(self, names, feeds):
        self.feeds.append(feeds)
        n = feeds["pixel_values"].shape[0] // 4
        return [np.arange(n, dtype=np.float32)[:, None].repeat(3, axis=1)]


def test_tensorrt_vision_uses_the_family_feeds_and_the_onnx_grouping(tmp_path):
    from coordexp.families import family_spec
    from coordexp.serving.vision_encoder import VisionEncoder
    from coordexp.trtllm.vision import TensorRTVision

    meta = {"family": "qwen2_5_vl", "spatial_merge_size": 2, "patch_size": 16, "window_size": 128}
    session = FakeVisionSession()
    vision = TensorRTVision(meta, session, max_patches=64)
    grid = np.array([[1, 8, 8], [1, 4, 4], [1, 2, 2]], np.int64)
    pix = np.zeros((int(np.prod(grid, axis=1).sum()), 3 * 2 * 16 * 16), np.float32)
    embeds, deep = vision.encode_images(pix, grid)
    assert [list(f) for f in session.feeds] == [family_spec("qwen2_5_vl").vision_input_names] * 2  # 64 + 20 patches
    assert embeds.shape == (16 + 4 + 1, 3) and deep.shape == (0, 21, 3)
    assert VisionEncoder(vision).merge_size == 2  # what the vision_encoder step wraps
    with pytest.raises(NotImplementedError, match="'llava'"):
        TensorRTVision({**meta, "family": "llava"}, session)


def test_repository_carries_transformers4_readable_config_and_tokenizer(repos, tiny_ckpt, qwen25_ckpt, tmp_path):
    """TensorRT-LLM <= 1.2 reads the checkpoint with transformers 4.x: the written copies follow its
    rules (no `extra_special_tokens` list, `rope_scaling` of type mrope instead of `rope_parameters`)."""
    from coordexp.export.trtllm_compat import TRANSFORMERS4_SUBDIR, transformers4_problems, write_transformers4_copies

    for ckpt in (tiny_ckpt, qwen25_ckpt):
        orig_cfg = json.load(open(os.path.join(ckpt, "config.json")))
        orig_tc = json.load(open(os.path.join(ckpt, "tokenizer_config.json")))
        assert transformers4_problems(orig_cfg, orig_tc)  # the transformers-5 files break the 4.x rules
        out = tmp_path / os.path.basename(ckpt)
        assert write_transformers4_copies(ckpt, str(out)) == ["config.json", "tokenizer_config.json"]
        cfg, tc = json.load(open(out / "config.json")), json.load(open(out / "tokenizer_config.json"))
        assert transformers4_problems(cfg, tc) == []
        text = orig_cfg.get("text_config", orig_cfg)
        section = text["rope_parameters"]["mrope_section"]
        assert cfg["rope_scaling"]["mrope_section"] == section and cfg["rope_scaling"]["type"] == "mrope"
        assert cfg["text_config"]["rope_theta"] == text["rope_parameters"]["rope_theta"]
        assert tc["additional_special_tokens"][-len(orig_tc["extra_special_tokens"]):] == orig_tc["extra_special_tokens"]
    repo = repos["llmapi"]
    assert sorted(os.listdir(os.path.join(repo, TRANSFORMERS4_SUBDIR))) == ["config.json", "tokenizer_config.json"]

