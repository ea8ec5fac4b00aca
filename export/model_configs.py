"""Triton model configs as the writers build them: ModelConfig protobufs (tritonclient's own
`model_config_pb2`, so a config Triton would refuse fails here first), Python-backend step configs and
the ensembles wired from the wire table (`coordexp.wire`), their text form, loading a repository's
configs back, and the check that an ensemble's wiring matches the wire contract. Used by the ONNX /
torch writer (`coordexp.export.repository`) and the TensorRT-LLM writer (`trtllm_repository`)."""
from __future__ import annotations

import json
import os
from typing import Any

from coordexp import wire

def config_protos():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2, text_format


def add_tensors(pb, container, tensors) -> None:
    for t in tensors:
        m = container.add()
        m.name = t.name
        m.data_type = pb.DataType.Value(f"TYPE_{t.dtype}")
        m.dims.extend(t.dims)
        if t.optional:
            m.optional = True
        if t.ragged:
            m.allow_ragged_batch = True


def _set_params(cfg, params: dict[str, Any]) -> None:
    for k, v in params.items():
        cfg.parameters[k].string_value = v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def python_model_config(name: str, max_batch_size: int, instances: int, params: dict[str, Any],
                        queue_delay_us: int | None = None, decoupled: bool = False):
    """The ModelConfig of one Python-backend step model."""
    pb, _ = config_protos()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.backend = "python"
    cfg.max_batch_size = max_batch_size
    inputs, outputs = wire.MODEL_TENSORS[name]
    add_tensors(pb, cfg.input, inputs)
    add_tensors(pb, cfg.output, outputs)
    group = cfg.instance_group.add()
    group.kind = pb.ModelInstanceGroup.KIND_CPU
    group.count = instances
    if queue_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = int(queue_delay_us)
    if decoupled:
        cfg.model_transaction_policy.decoupled = True
    _set_params(cfg, params)
    return cfg


def ensemble_config(name: str, max_batch_size: int, params: dict[str, Any], stream: bool = False):
    """The unary ensemble, or (`stream`) the streaming one: + the `stream` input, llm_stream."""
    pb, _ = config_protos()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.platform = "ensemble"
    cfg.max_batch_size = max_batch_size
    add_tensors(pb, cfg.input, wire.ENSEMBLE_INPUTS + ((wire.STREAM_TENSOR,) if stream else ()))
    add_tensors(pb, cfg.output, wire.ENSEMBLE_OUTPUTS)
    for model, inputs, outputs in (wire.stream_steps() if stream else wire.ENSEMBLE_STEPS):
        step = cfg.ensemble_scheduling.step.add()
        step.model_name = model
        step.model_version = -1
        for k, v in inputs.items():
            step.input_map[k] = v
        for k, v in outputs.items():
            step.output_map[k] = v
    _set_params(cfg, params)
    return cfg


def config_text(cfg) -> str:
    """ModelConfig -> config.pbtxt text, checked by parsing it back."""
    pb, text_format = config_protos()
    text = text_format.MessageToString(cfg)
    parsed = text_format.Parse(text, pb.ModelConfig())
    if parsed != cfg:
        raise ValueError(f"config of {cfg.name!r} does not survive a print/parse round trip")
    return text


def parse_config(text: str):
    pb, text_format = config_protos()
    return text_format.Parse(text, pb.ModelConfig())


def load_configs(repo: str) -> dict[str, Any]:
    """{model name: ModelConfig} of every model folder in a repository."""
    out = {}
    for entry in sorted(os.listdir(repo)):
        path = os.path.join(repo, entry, "config.pbtxt")
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                out[entry] = parse_config(f.read())
    return out


def check_wiring(configs: dict[str, Any], ensemble: str = wire.ENSEMBLE) -> list[str]:
    """Problems of an ensemble's wiring (empty list: consistent).

    Every step model exists; every mapped step tensor is a real tensor of that model; every
    ensemble tensor a step reads is an ensemble input or written by an earlier step with the same
    data type and dims; required step inputs are all mapped; every ensemble output is produced.
    """
    problems = []
    ens = configs.get(ensemble)
    if ens is None:
        return [f"no ensemble {ensemble!r}"]
    avail: dict[str, tuple[int, tuple[int, ...], bool]] = {
        t.name: (t.data_type, tuple(t.dims), t.optional) for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step {step.model_name!r}: no such model in the repository")
            continue
        if model.max_batch_size < ens.max_batch_size:
            problems.append(f"step {step.model_name!r}: max_batch_size {model.max_batch_size} < ensemble's "
                            f"{ens.max_batch_size}")
        m_in = {t.name: t for t in model.input}
        m_out = {t.name: t for t in model.output}
        for k, v in step.input_map.items():
            if k not in m_in:
                problems.append(f"step {step.model_name!r}: input_map key {k!r} is not an input of the model")
                continue
            if v not in avail:
                problems.append(f"step {step.model_name!r}: {k!r} reads {v!r}, which no earlier step produces")
                continue
            dtype, dims, optional = avail[v]
            if dtype != m_in[k].data_type or dims != tuple(m_in[k].dims):
                problems.append(f"step {step.model_name!r}: {k!r} is {m_in[k].data_type}{list(m_in[k].dims)} but "
                                f"{v!r} is {dtype}{list(dims)}")
            if optional and not m_in[k].optional:
                problems.append(f"step {step.model_name!r}: required input {k!r} is fed by optional {v!r}")
        for k, t in m_in.items():
            if k not in step.input_map and not t.optional:
                problems.append(f"step {step.model_name!r}: required input {k!r} is not mapped")
        for k, v in step.output_map.items():
            if k not in m_out:
                problems.append(f"step {step.model_name!r}: output_map key {k!r} is not an output of the model")
                continue
            avail[v] = (m_out[k].data_type, tuple(m_out[k].dims), False)
    for t in ens.output:
        if t.name not in avail:
            problems.append(f"ensemble output {t.name!r} is produced by no step")
        elif avail[t.name][:2] != (t.data_type, tuple(t.dims)):
            problems.append(f"ensemble output {t.name!r}: declared {t.data_type}{list(t.dims)}, produced "
                            f"{avail[t.name][0]}{list(avail[t.name][1])}")
    return problems
