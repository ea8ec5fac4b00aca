"""Bench reports: the table rows printed per level and `bench.png`."""
from __future__ import annotations

from typing import Any


def level_row(m: dict[str, Any], label: str | None = None) -> str:
    lat = m["request_latency"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    ttft = (m.get("time_to_first_token") or {}).get("p50")
    itl = (m.get("inter_token_latency") or {}).get("avg")
    return (f"{label or str(m['concurrency']):>11}  {m['request_throughput']['avg']:8.2f}  "
            f"{m['output_token_throughput']['avg']:10.1f}  {f(lat['p50']):>8}  {f(lat['p90']):>8}  "
            f"{f(lat['p99']):>8}  {f(ttft):>9}  {f(itl):>7}  {m['errors']:>6}")


HEADER = (f"{'concurrency':>11}  {'img/s':>8}  {'out tok/s':>10}  {'p50 ms':>8}  {'p90 ms':>8}  {'p99 ms':>8}  "
          f"{'TTFT p50':>9}  {'ITL ms':>7}  {'errors':>6}")


def _log2_axis(ax, xs) -> None:
    if len(xs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def plot(report: dict[str, Any], path: str) -> str:
    """bench.png: four panels (images/s, output tokens/s, request latency p50/p90/p99, streamed time to
    first token and inter-token latency), each on its own axis so no line hides another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [m["concurrency"] for m in levels]
    base = (report.get("baseline") or {}).get("metrics")
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    ax1.plot(xs, [m["request_throughput"]["avg"] for m in levels], "o-", color="tab:blue", label="served (Triton)")
    if base:
        ax1.axhline(base["request_throughput"]["avg"], color="tab:gray", ls="--",
                    label=f"in-process {report['baseline']['engine']} (batch 1)")
    ax1.set_title("Throughput")
    ax1.set_ylabel("images / s (= requests / s)")
    ax1.legend(fontsize=8)
    ax2.plot(xs, [m["output_token_throughput"]["avg"] for m in levels], "s-", color="tab:green")
    ax2.set_title("Output tokens / s")
    ax2.set_ylabel("tokens / s")
    # p90 and p99 are often close: distinct markers, line styles and a slight x offset keep both visible
    for (key, style, shift) in (("p50", "o-", 1.0), ("p90", "v--", 0.97), ("p99", "^:", 1.03)):
        ax3.plot([x * shift for x in xs], [m["request_latency"][key] for m in levels], style, label=f"{key}")
    if base and base["request_latency"]["p99"] is not None:
        ax3.axhline(base["request_latency"]["p99"], color="tab:gray", ls="--", label="in-process p99")
    ax3.set_title("Request latency" + (" (streamed)" if report.get("streaming") else ""))
    ax3.set_ylabel("ms")
    ax3.legend(fontsize=8)
    if any(m.get("time_to_first_token") for m in levels):  # streamed
        ax4.plot(xs, [(m.get("time_to_first_token") or {}).get("p50") for m in levels], "D-", color="tab:purple",
                 label="time to first token p50")
        ax4.plot(xs, [(m.get("inter_token_latency") or {}).get("avg") for m in levels], "x--", color="tab:brown",
                 label="inter-token latency (mean)")
        ax4.legend(fontsize=8)
    else:
        ax4.text(0.5, 0.5, "unary requests: no first token to time\n(bench --stream measures TTFT and ITL)",
                 ha="center", va="center", transform=ax4.transAxes, fontsize=9, color="tab:gray")
    ax4.set_title("Streaming")
    ax4.set_ylabel("ms")
    streamed = any(m.get("time_to_first_token") for m in levels)
    for ax in (ax1, ax2, ax3, ax4) if streamed else (ax1, ax2, ax3):
        _log2_axis(ax, xs)
    if not streamed:
        ax4.set_xticks([])
        ax4.set_yticks([])
    man = report["server"]["manifest"]
    fig.suptitle(f"{report['server']['model']} ({man.get('prompt_variant') or '?'}), {report['inputs']['count']} "
                 f"inputs, max_new_tokens={report['params']['max_new_tokens']}"
                 f"{' ignore_eos' if report['params']['ignore_eos'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
