"""What the Triton Python models of a CoordExp repository share: the folder layout, config
parameters, request errors and small numpy helpers (model and tensor names: `coordexp.wire`).

Light imports only (numpy): the repository writer, the client and the tests import this too.
`triton_python_backend_utils` exists only inside the Python-backend stub, so the
`TritonPythonModel` classes import it in `initialize()` and nothing here does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from coordexp.generation import GenerationParams
from coordexp.wire import GUIDED_CLOSED_EARLY, OUTPUT_IDS, PROMPT_TOKENS, SEQUENCE_LENGTH, STREAM

# the repository's folder layout (coordexp.layout), for the models and the writer
from coordexp.layout import HF_SUBDIR, MANIFEST, ONNX_META, ONNX_SUBDIR, PROCESSOR_SUBDIR  # noqa: E402,F401


_WATCHING_PARENT = False


WATCHDOG_NAME = "coordexp-watchdog"
# every half second: while the server is alive and the stub too, wait; else SIGKILL the stub
_WATCHDOG = 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 0.5; done; kill -9 "$2" 2>/dev/null'


def die_with_parent() -> None:
    """In a Python-backend stub process: SIGKILL this process once its server (tritonserver) is gone.

    A stub whose server was killed (SIGKILL, the OOM killer, a process-group kill that missed it)
    is re-parented and can live on holding its memory (seen: a `preprocess` stub 73 minutes after its
    server, holding 450 MB; on a GPU it would hold device memory): Triton's own stub notices the dead
    parent but its interpreter teardown can hang. So the watcher is a separate tiny process (`sh`,
    named `coordexp-watchdog` in its command line), not a thread that needs this interpreter: it
    polls the server's pid (from the stub's own command line, so a server already dead is seen too)
    and the stub's, and kills the stub when the server is gone; it ends by itself when the stub does.
    The models call this first thing in `initialize`. A stub whose server dies before it reaches
    `initialize` runs none of our code: the process-group kill of whoever started tritonserver
    (`TritonServer.stop`, coordexp-server on its server's exit) reaps it. Once per process."""
    global _WATCHING_PARENT
    import subprocess

    if _WATCHING_PARENT:
        return
    _WATCHING_PARENT = True
    parent = _server_pid() or os.getppid()
    subprocess.Popen(["/bin/sh", "-c", _WATCHDOG, WATCHDOG_NAME, str(parent), str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True)


def _server_pid() -> int | None:
    """The tritonserver pid a Python-backend stub was started with (its 6th argument), else None."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if len(argv) > 5 and argv[0].endswith(b"triton_python_backend_stub") and argv[5].isdigit():
        return int(argv[5])
    return None


class RequestError(ValueError):
    """A problem with one request: it becomes that request's Triton error, the others go on."""


# ---------------------------------------------------------------------------- config helpers
def config_parameters(model_config: dict[str, Any] | str) -> dict[str, str]:
    """`parameters { key: "k" value { string_value: "v" } }` of a model config (as the stub's
    `args["model_config"]` JSON gives it) -> {k: v}."""
    cfg = json.loads(model_config) if isinstance(model_config, str) else model_config
    out = {}
    for key, val in (cfg.get("parameters") or {}).items():
        out[key] = val.get("string_value", "") if isinstance(val, dict) else str(val)
    return out


def model_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], str, bool]:
    """What a model's `initialize(args)` needs: (model config, its string parameters, repository root,
    whether the model is decoupled)."""
    config = json.loads(args["model_config"])
    decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled"))
    return config, config_parameters(config), repository_root(args), decoupled


def repository_root(args: dict[str, Any]) -> str:
    """The repository root from the stub's `args` (`model_repository` is the model's folder)."""
    return os.path.dirname(os.path.abspath(args["model_repository"]))


def resolve(root: str, path: str) -> str:
    """A config path parameter: absolute as given, else relative to the repository root."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def int_param(params: dict[str, str], key: str, default: int) -> int:
    v = params.get(key, "")
    return int(v) if v.strip() else default


def open_quiet_sessions(parts: Any, keys: Sequence[str], spin: bool = False) -> Any:
    """Open these ONNX Runtime sessions of `parts` (an OnnxParts made with no preload) with the
    intra-op thread pool's spin-waiting off unless `spin`: the step models share few cores, and a
    pool that spins after every call takes them from the other steps (vision, preprocess) for
    nothing."""
    opts = getattr(parts, "_session_options", None)
    if opts is not None and not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key in keys:
        parts.session(key)
    return parts


def read_manifest(repo: str) -> dict[str, Any]:
    with open(os.path.join(repo, MANIFEST), "r", encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------- numpy helpers
def as_str(value: Any) -> str:
    """One BYTES tensor element -> str."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="strict")
    return str(value)


def as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise RequestError(f"expected bytes, got {type(value).__name__}")


def rows(arr: np.ndarray | None, batch: int, name: str) -> list[Any]:
    """The per-row scalars of an optional [B, 1] (or [B]) input; None -> [None] * B."""
    if arr is None:
        return [None] * batch
    a = np.asarray(arr)
    flat = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
    if flat.shape[0] != batch:
        raise RequestError(f"{name}: {flat.shape[0]} rows for a batch of {batch}")
    if flat.shape[1] != 1:
        raise RequestError(f"{name}: expected one value per row, got shape {list(a.shape)}")
    return [flat[i, 0] for i in range(batch)]


def pad_stack(arrays: Sequence[np.ndarray], axis_len: int | None = None, value: float | int = 0,
              left: bool = False) -> np.ndarray:
    """Stack arrays that differ only in their first dimension, padding it to the longest."""
    n = max(a.shape[0] for a in arrays) if axis_len is None else axis_len
    first = arrays[0]
    out = np.full((len(arrays), n) + tuple(first.shape[1:]), value, dtype=first.dtype)
    for i, a in enumerate(arrays):
        if left:
            out[i, n - a.shape[0]:] = a
        else:
            out[i, :a.shape[0]] = a
    return out


def bytes_array(values: Iterable[str | bytes]) -> np.ndarray:
    """[B, 1] object array of bytes (a BYTES tensor)."""
    vals = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    arr = np.empty((len(vals), 1), dtype=object)
    for i, v in enumerate(vals):
        arr[i, 0] = v
    return arr


def error_text(exc: BaseException) -> str:
    """The message a client sees for a failed request."""
    if isinstance(exc, RequestError):
        return str(exc)
    code = getattr(exc, "code", None)
    if code is not None:  # ContractError
        return f"{code}: {getattr(exc, 'message', str(exc))}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class TritonRequestView:
    """What the serving logic needs of one Triton request: its named inputs as numpy (absent
    optional inputs are missing from the dict)."""

    inputs: dict[str, np.ndarray]

    def get(self, name: str) -> np.ndarray | None:
        return self.inputs.get(name)

    def need(self, name: str) -> np.ndarray:
        arr = self.inputs.get(name)
        if arr is None:
            raise RequestError(f"missing input tensor {name!r}")
        return arr

    @property
    def batch(self) -> int:
        for arr in self.inputs.values():
            return int(np.asarray(arr).shape[0]) if np.asarray(arr).ndim else 1
        return 0


def request_view(pb_utils: Any, request: Any, names: Iterable[str]) -> TritonRequestView:
    """Read the named inputs of a pb_utils.InferenceRequest (optional ones may be absent)."""
    inputs = {}
    for name in names:
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is not None:
            inputs[name] = t.as_numpy()
    return TritonRequestView(inputs)


def error_response(pb_utils: Any, exc: BaseException) -> Any:
    """A failed response: INVALID_ARG for a bad request (the client's fault), INTERNAL otherwise."""
    bad_input = isinstance(exc, (RequestError, ValueError)) and not isinstance(exc, UnicodeError)
    try:
        code = pb_utils.TritonError.INVALID_ARG if bad_input else pb_utils.TritonError.INTERNAL
        err = pb_utils.TritonError(error_text(exc), code)
    except (AttributeError, TypeError):  # Python backends older than 23.xx: message only
        err = pb_utils.TritonError(error_text(exc))
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def response(pb_utils: Any, outputs: dict[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def decoupled_sender(pb_utils: Any, requests: Sequence[Any]):
    """`send(i, outputs_or_error, final)` for the requests of a decoupled model's `execute()`:
    through request i's response sender, flagged final on its last response."""
    senders = [r.get_response_sender() for r in requests]
    final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def send(i: int, res: dict[str, np.ndarray] | BaseException, final: bool) -> None:
        msg = error_response(pb_utils, res) if isinstance(res, BaseException) else response(pb_utils, res)
        senders[i].send(msg, flags=final_flag if final else 0)

    return send


# ---------------------------------------------------------------------------- the llm step's rows
# (shared by coordexp.serving.llm and its in-flight scheduler coordexp.serving.inflight)
@dataclass
class LlmItem:
    """One row: unpadded prompt ids, its image features and its decoding parameters."""

    ids: np.ndarray  # [T_i] int64
    grid: np.ndarray  # [3] int64
    embeds: np.ndarray  # [N_i, H]
    deepstack: np.ndarray  # [L, N_i, H]
    params: GenerationParams


class Generated(list):
    """A row's generated ids, plus what guided decoding says of them."""

    closed_early: bool = False

    @classmethod
    def of(cls, ids: Sequence[int], closed_early: bool = False) -> "Generated":
        g = cls(int(t) for t in ids)
        g.closed_early = bool(closed_early)
        return g


def prompt_batch(items: Sequence[LlmItem], pad_token_id: int) -> tuple[np.ndarray, ...]:
    """Rows joining the batch as one LEFT padded prefill: (input_ids, attention_mask, image_grid_thw,
    image_embeds, deepstack)."""
    input_ids = pad_stack([it.ids for it in items], value=pad_token_id, left=True)
    prompt_mask = pad_stack([np.ones_like(it.ids) for it in items], value=0, left=True)
    grid = np.stack([it.grid for it in items]).astype(np.int64)
    embeds = np.concatenate([it.embeds for it in items], axis=0)
    deep = np.concatenate([it.deepstack for it in items], axis=1)
    return input_ids, prompt_mask, grid, embeds, deep


def prompt_lengths(items: Sequence[LlmItem]) -> list[int]:
    return [int(len(it.ids)) for it in items]


def outputs_of(generated: Sequence[list[int]], pad_token_id: int,
               prompt_tokens: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """One request's rows -> output_ids [B, S] (pad-filled), sequence_length [B, 1], guided_closed_early,
    prompt_tokens [B, 1] (each row's prompt length; 0 where not given)."""
    longest = max(1, max(len(g) for g in generated))
    ids = np.full((len(generated), longest), int(pad_token_id), dtype=np.int32)
    for i, g in enumerate(generated):
        ids[i, :len(g)] = g
    lengths = np.asarray([[len(g)] for g in generated], dtype=np.int32)
    closed = np.asarray([[bool(getattr(g, "closed_early", False))] for g in generated], dtype=np.bool_)
    prompt = np.asarray([[int(n)] for n in (prompt_tokens or [0] * len(generated))], dtype=np.int32)
    return {OUTPUT_IDS: ids, SEQUENCE_LENGTH: lengths, GUIDED_CLOSED_EARLY: closed,
            PROMPT_TOKENS: prompt.reshape(len(generated), 1)}


def wants_stream(view: "TritonRequestView") -> bool:
    """A request's optional `stream` input (any row true -> streamed)."""
    flag = view.get(STREAM)
    return flag is not None and bool(np.asarray(flag).astype(bool).any())
