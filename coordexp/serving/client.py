"""Client-side helpers for the CoordExp ensemble (tests, `coordexp-client parity`, bench/).

- `ensemble_arrays` / `infer_inputs`: request tensors for one request of B images;
- `ensemble_outputs`: a response -> per row {text, token_ids, preds};
- `infer_many`: many one-image requests with N in flight (threads, one gRPC client each), results
  in input order, a failed request gives its exception in its slot;
- `start_server`: a started `coordexp.server.TritonServer` for a repository.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from coordexp.serving.common import as_str, bytes_array
from coordexp.wire import (ENSEMBLE, GUIDED, GUIDED_CLOSED_EARLY, IGNORE_EOS, IMAGE_BYTES_INPUT, MAX_TOKENS,
                           OUTPUT_IDS, PREDS_JSON, RANDOM_SEED, REPETITION_PENALTY, RUNTIME_TOP_P, SEQUENCE_LENGTH,
                           TEMPERATURE, TEXT_INPUT, TEXT_OUTPUT)

WIRE_DTYPES = {IMAGE_BYTES_INPUT: "BYTES", TEXT_INPUT: "BYTES", MAX_TOKENS: "INT32", TEMPERATURE: "FP32",
               RUNTIME_TOP_P: "FP32", REPETITION_PENALTY: "FP32", RANDOM_SEED: "UINT64", GUIDED: "BOOL",
               IGNORE_EOS: "BOOL"}
_NP = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}


def ensemble_arrays(image_bytes: Sequence[bytes], params: Any = None, text: str | None = None) -> dict[str, np.ndarray]:
    """Request tensors ([B, 1] each): the images, the user text when given, and every decoding
    input of `params` (a GenerationParams; None sends none: the repository's defaults apply)."""
    n = len(image_bytes)
    out = {IMAGE_BYTES_INPUT: bytes_array(image_bytes)}
    if text is not None:
        out[TEXT_INPUT] = bytes_array([text] * n)
    if params is not None:
        vals = {MAX_TOKENS: params.max_new_tokens, TEMPERATURE: params.temperature, RUNTIME_TOP_P: params.top_p,
                REPETITION_PENALTY: params.repetition_penalty, RANDOM_SEED: params.seed, GUIDED: params.guided,
                IGNORE_EOS: params.ignore_eos}
        for name, v in vals.items():
            out[name] = np.full((n, 1), v, dtype=_NP[WIRE_DTYPES[name]])
    return out


def infer_inputs(client_module: Any, arrays: dict[str, np.ndarray]) -> list[Any]:
    """tritonclient InferInputs (module tritonclient.grpc, .grpc.aio or .http) for `arrays`."""
    inputs = []
    for name, arr in arrays.items():
        t = client_module.InferInput(name, list(arr.shape), WIRE_DTYPES[name])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def ensemble_outputs(result: Any) -> list[dict[str, Any]]:
    """One response of the ensemble -> per row {"text", "token_ids", "preds" (the preds_json dict)}."""
    texts = np.asarray(result.as_numpy(TEXT_OUTPUT))
    b = texts.shape[0]
    texts = texts.reshape(b, -1)
    preds = np.asarray(result.as_numpy(PREDS_JSON)).reshape(b, -1)
    ids = np.asarray(result.as_numpy(OUTPUT_IDS)).reshape(b, -1)
    lengths = np.asarray(result.as_numpy(SEQUENCE_LENGTH)).reshape(b, -1)
    closed = result.as_numpy(GUIDED_CLOSED_EARLY)
    closed = np.asarray(closed).reshape(b, -1) if closed is not None else np.zeros((b, 1), bool)
    return [{"text": as_str(texts[i, 0]), "token_ids": [int(t) for t in ids[i, :int(lengths[i, 0])]],
             "preds": json.loads(as_str(preds[i, 0])), "guided_closed_early": bool(closed[i, 0])} for i in range(b)]


def infer_many(url: str, images: Sequence[bytes], params: Any = None, concurrency: int = 1,
               model: str = ENSEMBLE, text: str | None = None, timeout: float = 300.0,
               ) -> tuple[list[dict[str, Any] | Exception], list[float]]:
    """One request per image, `concurrency` in flight. Returns (per image: its row dict or the
    exception, per image: seconds from send to answer)."""
    import tritonclient.grpc as grpcclient

    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def client():
        if not hasattr(local, "c"):
            local.c = grpcclient.InferenceServerClient(url)
            with lock:
                clients.append(local.c)
        return local.c

    def one(k: int) -> tuple[dict[str, Any] | Exception, float]:
        t0 = time.perf_counter()
        try:
            res = client().infer(model, infer_inputs(grpcclient, ensemble_arrays([images[k]], params, text)),
                                 client_timeout=timeout)
            return ensemble_outputs(res)[0], time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - the caller decides what a failure means
            return e, time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            done = list(pool.map(one, range(len(images))))
    finally:
        for c in clients:
            c.close()
    return [d[0] for d in done], [d[1] for d in done]


def model_stats(url: str, model: str) -> dict[str, int]:
    """{inference_count, execution_count} of a served model (execution < inference: batched)."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    try:
        st = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        c.close()
    return {"inference_count": int(st.get("inference_count", 0)), "execution_count": int(st.get("execution_count", 0))}


def start_server(repo: str, **kwargs: Any):
    """A started `coordexp.server.TritonServer` for `repo` (stop it with `.stop()`)."""
    from coordexp.server import TritonServer

    kwargs.setdefault("ready_timeout", 300.0)
    return TritonServer(repo, **kwargs).start()
