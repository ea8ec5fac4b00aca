"""The export's low-memory save (weights streamed to `<graph>.data`) gives the same graphs as the
inline save: same initializers, same outputs, the same greedy tokens as torch. The memory itself is
measured in bench/bench_export_memory.py, not here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from coordexp.generation import GenerationParams

THREADS = 1


@pytest.fixture(scope="module")
def streamed_dir(tiny_ckpt, tmp_path_factory) -> str:
    """The tiny checkpoint exported with every graph's weights in external data (limit 0 bytes)."""
    from coordexp.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("streamed") / "onnx"
    export_onnx(tiny_ckpt, str(out), external_data_bytes=0)
    return str(out)


@pytest.fixture(scope="module")
def inline_dir(exported) -> str:
    """The session's default export (tiny graphs: inline, one file each)."""
    from coordexp.engines.onnx_engine import find_onnx_dir

    return str(find_onnx_dir(exported[1]))


def _initializers(path: str) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)  # external data loaded from `<graph>.data` when there is one
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.slow
def test_streamed_export_writes_external_data_with_the_same_weights(streamed_dir, inline_dir):
    meta = json.loads(open(os.path.join(streamed_dir, "onnx_meta.json")).read())
    graphs = ("vision.onnx", "embed.onnx", "decoder.onnx")
    assert meta["files"] == sorted(graphs + tuple(g + ".data" for g in graphs))
    for g in graphs:
        assert os.path.getsize(os.path.join(streamed_dir, g + ".data")) > 0
        assert not os.path.exists(os.path.join(inline_dir, g + ".data"))  # tiny graphs stay one file by default
        want, got = _initializers(os.path.join(inline_dir, g)), _initializers(os.path.join(streamed_dir, g))
        assert sorted(got) == sorted(want), g
        for name, arr in want.items():
            assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), (g, name)
    # the dims keep their readable names in the small proto that references the data file
    import onnx

    dec = onnx.load(os.path.join(streamed_dir, "decoder.onnx"), load_external_data=False)
    dims = [d.dim_param for d in dec.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "seq"]


@pytest.mark.slow
def test_streamed_export_generates_like_the_inline_one_and_torch(streamed_dir, inline_dir, tiny_ckpt):
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.export.validate import probe_images, validate_export

    images = probe_images([(64, 64), (144, 96), (96, 160)], seed=3)
    params = GenerationParams(max_new_tokens=12)
    streamed, inline = OnnxEngine(streamed_dir, threads=THREADS), OnnxEngine(inline_dir, threads=THREADS)
    enc = streamed.processor.encode(images, streamed.prompt, return_tensors="np")
    e1, d1 = streamed.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
    e2, d2 = inline.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
    assert np.array_equal(e1, e2) and np.array_equal(d1, d2)
    assert streamed.generate_ids(images, params)[0] == inline.generate_ids(images, params)[0]
    report = validate_export(streamed_dir, tiny_ckpt, sizes=((64, 64),), batch_sizes=(1,), steps=6, threads=THREADS)
    assert report["ok"] and report["greedy_tokens_match"]
