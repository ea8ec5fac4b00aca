"""The Triton repository writer: generated configs parse, the ensemble wiring is consistent, the
manifest records what was exported. No server and no real ONNX graphs here (see test_serving.py)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from coordexp.export.model_configs import check_wiring, load_configs, parse_config
from coordexp.export.repository import ServingOptions, find_onnx_dir, write_repository
from coordexp.prompt import PromptSpec
from coordexp import wire
from coordexp.serving import common as C

PROMPT = PromptSpec(field_order="geometry_first")


def fake_onnx_dir(path) -> str:
    """An export folder as onnx_export writes it, with placeholder graph files."""
    os.makedirs(path, exist_ok=True)
    graphs = {}
    for key in ("vision", "embed", "decoder"):
        (path / f"{key}.onnx").write_bytes(b"placeholder")
        graphs[key] = {"file": f"{key}.onnx"}
    (path / C.ONNX_META).write_text(json.dumps({"format": "coordexp.onnx.v1", "graphs": graphs}))
    return str(path)


@pytest.fixture(scope="module")
def repo(tiny_ckpt, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("repo")
    onnx = fake_onnx_dir(base / "export")
    return write_repository(str(base / "model_repository"), "coordexp", onnx, tiny_ckpt, max_batch_size=4,
                            max_new_tokens=64, prompt=PROMPT, validation={"passed": True, "records": 3})


def test_layout_and_thin_shims(repo):
    assert sorted(os.listdir(repo)) == sorted([*wire.MODELS, wire.LLM_STREAM, "coordexp_stream", C.MANIFEST])
    assert os.path.isfile(os.path.join(repo, C.ONNX_SUBDIR, C.ONNX_META))
    assert os.path.isfile(os.path.join(repo, C.PROCESSOR_SUBDIR, "tokenizer.json"))
    assert not [f for f in os.listdir(os.path.join(repo, C.PROCESSOR_SUBDIR)) if f.endswith(".safetensors")]
    assert os.path.isdir(os.path.join(repo, wire.ENSEMBLE, "1"))  # ensembles need a version folder
    for model in (wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM, wire.POSTPROCESS):
        code = open(os.path.join(repo, model, "1", "model.py")).read()
        lines = [ln for ln in code.splitlines() if ln.strip() and not ln.startswith(('"""', "#"))]
        assert lines == [f"from coordexp.serving.{model} import TritonPythonModel  # noqa: F401"]
        mod = __import__(f"coordexp.serving.{model}", fromlist=["TritonPythonModel"])
        assert hasattr(mod.TritonPythonModel, "execute")


def test_every_config_parses_with_tritons_protobuf(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for model in (*wire.MODELS, wire.LLM_STREAM, "coordexp_stream"):
        text = open(os.path.join(repo, model, "config.pbtxt")).read()
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert cfg.name == model
        assert cfg.max_batch_size == 4
        if model in (wire.ENSEMBLE, "coordexp_stream"):
            assert cfg.platform == "ensemble"
        else:
            assert cfg.backend == "python"
            assert [g.count for g in cfg.instance_group] == [1]


def test_ensemble_wiring_is_consistent(repo):
    configs = load_configs(repo)
    ens = configs[wire.ENSEMBLE]
    # tensors the ensemble can read at each step: (data_type, dims)
    avail = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
    steps = [s.model_name for s in ens.ensemble_scheduling.step]
    assert steps == [wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM, wire.POSTPROCESS]
    for step in ens.ensemble_scheduling.step:
        model = configs[step.model_name]
        m_in = {t.name: t for t in model.input}
        m_out = {t.name: t for t in model.output}
        for key, ens_tensor in step.input_map.items():
            assert key in m_in, (step.model_name, key)
            assert ens_tensor in avail, (step.model_name, ens_tensor)
            assert avail[ens_tensor] == (m_in[key].data_type, list(m_in[key].dims)), (step.model_name, key)
        required = {n for n, t in m_in.items() if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        for key, ens_tensor in step.output_map.items():
            assert key in m_out, (step.model_name, key)
            avail[ens_tensor] = (m_out[key].data_type, list(m_out[key].dims))
    for t in ens.output:
        assert avail[t.name] == (t.data_type, list(t.dims)), t.name
    assert check_wiring(configs) == []


def test_tensor_names_and_optional_inputs(repo):
    configs = load_configs(repo)
    ens = configs[wire.ENSEMBLE]
    inputs = {t.name: t for t in ens.input}
    assert list(inputs) == ["image_bytes_input", "text_input", "system_text_input", "message_layout", "max_tokens",
                            "temperature", "runtime_top_p", "repetition_penalty", "random_seed", "guided",
                            "ignore_eos"]
    assert not inputs["image_bytes_input"].optional
    assert all(inputs[n].optional for n in list(inputs)[1:])
    dtype = {t.name: model_dtype(t.data_type) for t in ens.input}
    assert dtype == {"image_bytes_input": "TYPE_STRING", "text_input": "TYPE_STRING", "system_text_input": "TYPE_STRING",
                     "message_layout": "TYPE_STRING", "max_tokens": "TYPE_INT32",
                     "temperature": "TYPE_FP32", "runtime_top_p": "TYPE_FP32", "repetition_penalty": "TYPE_FP32",
                     "random_seed": "TYPE_UINT64", "guided": "TYPE_BOOL", "ignore_eos": "TYPE_BOOL"}
    assert [t.name for t in ens.output] == ["text_output", "preds_json", "output_ids", "sequence_length",
                                           "guided_closed_early", "prompt_tokens"]
    llm = configs[wire.LLM]
    assert llm.dynamic_batching.max_queue_delay_microseconds == ServingOptions().llm_queue_delay_us
    assert {t.name for t in llm.input if t.allow_ragged_batch} == {"input_ids", "attention_mask", "image_embeds",
                                                                   "deepstack_embeds"}
    assert llm.parameters["intra_op_threads"].string_value == "2"
    assert llm.parameters["onnx_dir"].string_value == C.ONNX_SUBDIR
    assert configs[wire.VISION_ENCODER].parameters["onnx_dir"].string_value == C.ONNX_SUBDIR
    assert json.loads(llm.parameters["decoding_defaults"].string_value)["max_new_tokens"] == 64
    assert json.loads(configs[wire.PREPROCESS].parameters["prompt_json"].string_value) == PROMPT.to_dict()


def model_dtype(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def test_manifest(repo, tiny_ckpt):
    manifest = json.load(open(os.path.join(repo, C.MANIFEST)))
    weights = os.path.join(tiny_ckpt, "model.safetensors")
    sha = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert manifest["checkpoint"]["path"] == os.path.realpath(tiny_ckpt)
    assert manifest["checkpoint"]["weight_files"] == {"model.safetensors": sha}
    assert len(manifest["checkpoint"]["weights_sha256"]) == 64
    assert manifest["created"][:2] == "20"
    for lib in ("torch", "transformers", "onnx", "onnxruntime", "coordexp"):
        assert manifest["versions"][lib], lib
    assert manifest["decoding_defaults"]["max_new_tokens"] == 64
    assert manifest["decoding_defaults"]["temperature"] == 0.0
    assert manifest["max_batch_size"] == 4 and manifest["max_new_tokens"] == 64
    assert manifest["prompt"] == PROMPT.to_dict() and manifest["prompt"]["variant"] == PROMPT.variant
    assert manifest["backend"] == "onnx"
    assert manifest["validation"] == {"passed": True, "records": 3}
    assert manifest["layout"]["onnx_dir"] == C.ONNX_SUBDIR
    # the client reads it from the ensemble's config (`coordexp-client models`)
    ens = load_configs(repo)[wire.ENSEMBLE]
    assert json.loads(ens.parameters["manifest_json"].string_value) == manifest
    assert ens.parameters["prompt_variant"].string_value == PROMPT.variant


def test_graphs_are_found_from_the_repository(repo):
    onnx = os.path.join(repo, C.ONNX_SUBDIR)
    assert find_onnx_dir(repo) == onnx
    assert find_onnx_dir(onnx) == onnx
    assert find_onnx_dir(os.path.join(repo, wire.LLM, "1")) == onnx
    assert find_onnx_dir(os.path.join(repo, wire.PREPROCESS)) is None


def test_check_wiring_reports_broken_steps(repo):
    configs = load_configs(repo)
    ens = configs[wire.ENSEMBLE]
    step = ens.ensemble_scheduling.step[2]  # llm
    step.input_map["image_embeds"] = "deepstack_embeds"  # dims mismatch
    step.input_map["no_such_input"] = "input_ids"
    del configs[wire.POSTPROCESS]
    problems = "\n".join(check_wiring(configs))
    assert "'image_embeds'" in problems and "no_such_input" in problems and "'postprocess'" in problems
    assert "ensemble output 'text_output' is produced by no step" in problems
    assert [s[0] for s in wire.ENSEMBLE_STEPS] == [wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM, wire.POSTPROCESS]


def test_failed_write_keeps_the_previous_repository(repo, tiny_ckpt, tmp_path):
    before = sorted(os.listdir(repo))
    with pytest.raises(FileNotFoundError, match="onnx_meta.json"):
        write_repository(repo, "coordexp", str(tmp_path), tiny_ckpt)
    missing = fake_onnx_dir(tmp_path / "partial")
    os.remove(os.path.join(missing, "decoder.onnx"))
    with pytest.raises(FileNotFoundError, match="decoder.onnx"):
        write_repository(repo, "coordexp", missing, tiny_ckpt)
    with pytest.raises(ValueError, match="invalid ensemble name"):
        write_repository(repo, "llm", fake_onnx_dir(tmp_path / "ok"), tiny_ckpt)
    assert sorted(os.listdir(repo)) == before
    assert not [f for f in os.listdir(os.path.dirname(repo)) if ".tmp-" in f or ".old-" in f]


def test_rewrite_replaces_the_repository(tiny_ckpt, tmp_path):
    onnx = fake_onnx_dir(tmp_path / "export")
    out = str(tmp_path / "repo")
    write_repository(out, "coordexp", onnx, tiny_ckpt, max_batch_size=2)
    open(os.path.join(out, "stale.txt"), "w").write("x")
    write_repository(out, "cx", onnx, tiny_ckpt, max_batch_size=3, options=ServingOptions(streaming=False))
    assert sorted(os.listdir(out)) == sorted(["cx", wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM, wire.POSTPROCESS,
                                              C.MANIFEST])
    assert json.load(open(os.path.join(out, C.MANIFEST)))["models"]["stream_ensemble"] is None
    assert parse_config(open(os.path.join(out, "cx", "config.pbtxt")).read()).max_batch_size == 3


def test_streaming_ensemble_is_the_same_pipeline_with_a_decoupled_llm(repo):
    configs = load_configs(repo)
    unary, stream = configs[wire.ENSEMBLE], configs["coordexp_stream"]
    assert check_wiring(configs, "coordexp_stream") == []
    assert configs[wire.LLM_STREAM].model_transaction_policy.decoupled
    assert not configs[wire.LLM].model_transaction_policy.decoupled  # unary calls need a unary pipeline

    def names(cfg, kind):
        return [(t.name, t.data_type, list(t.dims), getattr(t, "optional", False)) for t in getattr(cfg, kind)]

    assert names(stream, "input") == names(unary, "input") + [(wire.STREAM, names(stream, "input")[-1][1], [1], True)]
    assert names(stream, "output") == names(unary, "output")
    steps = lambda cfg: [s.model_name for s in cfg.ensemble_scheduling.step]  # noqa: E731
    assert steps(stream) == [wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM_STREAM, wire.POSTPROCESS]
    assert steps(unary) == [wire.PREPROCESS, wire.VISION_ENCODER, wire.LLM, wire.POSTPROCESS]
    llm_s, llm_u = configs[wire.LLM_STREAM], configs[wire.LLM]
    assert names(llm_s, "input") == names(llm_u, "input") + [names(llm_s, "input")[-1]]
    assert dict(llm_s.parameters) == dict(llm_u.parameters)  # the same graphs, limits, defaults and scheduler
    manifest = json.load(open(os.path.join(repo, C.MANIFEST)))
    assert manifest["models"]["stream_ensemble"] == "coordexp_stream"


def test_repository_current_compares_checkpoint_options_prompt_and_files(repo, tiny_ckpt, tmp_path):
    import shutil

    from coordexp.export.repository import build_record, repository_current

    want = build_record("coordexp", "onnx", 4, 64, PROMPT, ServingOptions())
    current, why = repository_current(repo, tiny_ckpt, want, validated=True)
    assert current and why.startswith("same checkpoint (sha256 ")
    assert repository_current(repo, tiny_ckpt, {**want, "max_new_tokens": 32}) == (
        False, "max_new_tokens 64 in the repository, 32 requested")
    assert repository_current(repo, tiny_ckpt, build_record("coordexp", "onnx", 4, 64, PromptSpec(), ServingOptions())
                              )[1].startswith('prompt.field_order "geometry_first" in the repository, "desc_first"')
    # other weights: the one checkpoint digest differs
    other = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, other)
    with open(other / "model.safetensors", "ab") as f:
        f.write(b"\0")
    current, why = repository_current(repo, str(other), want)
    assert not current and why.startswith("exported from other weights (sha256 ")
    # an incomplete copy, a folder that is no repository
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    os.remove(copy / wire.LLM_STREAM / "config.pbtxt")
    assert repository_current(str(copy), tiny_ckpt, want) == (False, "incomplete repository: llm_stream/config.pbtxt")
    assert repository_current(str(tmp_path), tiny_ckpt, want) == (False, f"no {C.MANIFEST} in {tmp_path}")


def test_the_validation_written_must_be_of_the_prompt_written(tiny_ckpt, tmp_path):
    onnx = fake_onnx_dir(tmp_path / "export")
    with pytest.raises(ValueError, match=r"validated with prompt 'coordexp/tokens/desc_first/sorted/v1', not with the "
                                         r"one being written \('coordexp/tokens/geometry_first/sorted/v1'\)"):
        write_repository(str(tmp_path / "r"), "coordexp", onnx, tiny_ckpt, prompt=PROMPT,
                         validation={"prompt": PromptSpec().to_dict()})
    assert not (tmp_path / "r").exists()
