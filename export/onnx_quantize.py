"""Reduced-precision weights for an ONNX export (`build_engine --weights int8|int4`).

ONNX Runtime's own weight-only quantizer (`MatMulNBitsQuantizer`) rewrites every MatMul of the
decoder graph whose weight is a constant into a `MatMulNBits` node: weights stored in 8 or 4 bits
in blocks of `block_size` along the input dimension, symmetric, one float scale per block,
activations left in float32 (accuracy level 4: int8 dot products on CPUs that have them). No
calibration data is needed, and it takes seconds. The vision and embedding graphs stay float32
(the embedding is a table lookup; the vision encoder runs once per image and was not measured to
pay back). The answers are no longer bit-identical to the reference, so such an export is
validated by accuracy parity on labelled data (`coordexp.runs.equivalence`), not token parity.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

WEIGHTS = ("fp32", "int8", "int4")
QUANTIZED_GRAPHS = ("decoder",)
BLOCK_SIZE = 32  # small blocks: more scales, closer to float; both layouts ONNX Runtime accepts


def quantize_export(onnx_dir: str, weights: str, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Quantize the export's decoder graph(s) in place and record it in onnx_meta.json. Returns what
    was done (graphs, bytes before / after, seconds)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    meta_path = os.path.join(onnx_dir, "onnx_meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if weights == "fp32":
        meta["weights"] = "fp32"
        _write(meta_path, meta)
        return {"weights": "fp32"}
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 8 if weights == "int8" else 4
    t0 = time.perf_counter()
    done = {}
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the quantizer logs every node at INFO on the root logger
    try:
        for graph in QUANTIZED_GRAPHS:
            path = os.path.join(onnx_dir, f"{graph}.onnx")
            before = _graph_bytes(path)
            model = onnx.load(path)
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4)
            q.process()
            data = f"{graph}.onnx.data"
            if os.path.exists(os.path.join(onnx_dir, data)):
                os.remove(os.path.join(onnx_dir, data))
            large = before > 1_800_000_000  # protobuf's 2 GB limit: keep the weights beside the graph
            q.model.save_model_to_file(path, use_external_data_format=large)
            done[graph] = {"bytes_before": before, "bytes_after": _graph_bytes(path),
                           "matmul_nbits": sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)}
            log(f"  {graph}.onnx: {weights} weights ({done[graph]['matmul_nbits']} MatMulNBits), "
                f"{before / 1e6:.1f} -> {done[graph]['bytes_after'] / 1e6:.1f} MB")
    finally:
        quiet.setLevel(level)
    meta["weights"] = weights
    meta["quantization"] = {"tool": "onnxruntime MatMulNBitsQuantizer", "bits": bits, "block_size": BLOCK_SIZE,
                            "symmetric": True, "accuracy_level": 4, "graphs": list(done)}
    _write(meta_path, meta)
    return {"weights": weights, "graphs": done, "seconds": round(time.perf_counter() - t0, 2)}


def _graph_bytes(path: str) -> int:
    folder, name = os.path.split(path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f == name or (f.startswith(name) and f.endswith(".data")))


def _write(path: str, meta: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
