"""The one Triton client: served CoordExp ensembles over gRPC (`tritonclient.grpc.aio`).

- `interface`: the served model's interface checked against `coordexp.wire`, its manifest, request
  tensors from decoding parameters, results from responses;
- `pool`: pre-flight, `ServerPool` (several servers, retries, failover, streaming);
- `engine`: `TritonEngine`, the `generate_batch` engine `coordexp.runner.run_dataset` drives.

`infer`, `group`, `bench`, `ask`, `parity`, `models` and `bench/` all use these.
"""
from coordexp.engines.triton.engine import ClientOptions, TritonEngine
from coordexp.engines.triton.connect import PreflightError
from coordexp.engines.triton.pool import AllServersDown, ServerPool

__all__ = ["AllServersDown", "ClientOptions", "PreflightError", "ServerPool", "TritonEngine"]
