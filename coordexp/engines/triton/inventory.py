"""What a Triton server holds: its models, their readiness, and for CoordExp ensembles (models whose
config carries the export manifest) the manifest summary. `coordexp-client models` prints it; the
viewer offers the ready CoordExp ensembles as its model choices."""
from __future__ import annotations

from typing import Any


async def server_models(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """{"url", "server": {name, version}, "models": [...]} for one server; raises on no server."""
    from coordexp.engines.triton.interface import ModelInterface, fetch_manifest, manifest_summary
    from coordexp.engines.triton.connect import error_message, new_client

    client = new_client(url)
    try:
        try:
            meta = await client.get_server_metadata(as_json=True, client_timeout=timeout)
        except Exception as e:
            raise ConnectionError(f"cannot reach a Triton gRPC server at {url}: {error_message(e)}") from None
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout)
        rows = []
        for m in sorted(index.get("models", []), key=lambda m: (m.get("name", ""), m.get("version", ""))):
            row: dict[str, Any] = {"name": m.get("name", ""), "version": m.get("version", ""),
                                   "state": m.get("state", "UNKNOWN") or "UNKNOWN", "reason": m.get("reason", "")}
            if row["state"] == "READY":
                try:
                    config = (await client.get_model_config(row["name"], as_json=True,
                                                            client_timeout=timeout)).get("config", {})
                    mmeta = await client.get_model_metadata(row["name"], as_json=True, client_timeout=timeout)
                    iface = ModelInterface.from_metadata(mmeta, config)
                    row["platform"] = config.get("platform") or config.get("backend") or ""
                    row["max_batch_size"] = iface.max_batch_size
                    row["decoupled"] = iface.decoupled
                    row["streams"] = iface.streams  # answers over the gRPC stream API (bench/ask --stream)
                    manifest = await fetch_manifest(client, row["name"], config)
                    row["coordexp"] = manifest is not None and not iface.problems()
                    if manifest is not None:
                        row["manifest"] = manifest_summary(manifest)
                except Exception as e:
                    row["reason"] = row["reason"] or f"cannot read config: {error_message(e)}"
            rows.append(row)
        return {"url": url, "server": {"name": meta.get("name"), "version": meta.get("version")}, "models": rows}
    finally:
        await client.close()


def coordexp_models(info: dict[str, Any]) -> list[str]:
    """The ready CoordExp ensembles of one `server_models` answer that answer unary calls, by name
    (a decoupled streaming twin serves the same export)."""
    return [m["name"] for m in info["models"]
            if m.get("state") == "READY" and m.get("coordexp") and not m.get("decoupled")]


STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


async def inference_statistics(url: str, timeout: float = 10.0) -> dict[str, dict[str, int]]:
    """Triton's cumulative statistics of every loaded model: {model: {inferences, executions,
    <part>_ns}} (queue, compute input / infer / output), over the one client."""
    from coordexp.engines.triton.connect import new_client, normalise_url

    client = new_client(normalise_url(url))
    try:
        stats = await client.get_inference_statistics(as_json=True, client_timeout=timeout)
    finally:
        await client.close()
    out = {}
    for st in stats.get("model_stats", []):
        inf = st.get("inference_stats") or {}
        out[st["name"]] = {"inferences": int(st.get("inference_count", 0)),
                           "executions": int(st.get("execution_count", 0)),
                           **{f"{k}_ns": int((inf.get(k) or {}).get("ns", 0)) for k in STAT_PARTS}}
    return out
