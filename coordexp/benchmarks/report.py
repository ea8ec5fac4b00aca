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


def plot(report: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [m["concurrency"] for m in levels]
    base = (report.get("baseline") or {}).get("metrics")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax1.plot(xs, [m["request_throughput"]["avg"] for m in levels], "o-", color="tab:blue", label="served (Triton)")
    if base:
        ax1.axhline(base["request_throughput"]["avg"], color="tab:gray", ls="--",
                    label=f"in-process {report['baseline']['engine']} (batch 1)")
    ax1.set_title("Throughput")
    ax1.set_xlabel("concurrency (requests in flight)")
    ax1.set_ylabel("images / s (= requests / s)")
    ax1.set_ylim(bottom=0)
    ax1b = ax1.twinx()
    ax1b.plot(xs, [m["output_token_throughput"]["avg"] for m in levels], "s:", color="tab:green", alpha=0.7,
              label="output tokens / s")
    ax1b.set_ylabel("output tokens / s", color="tab:green")
    ax1b.set_ylim(bottom=0)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    for key, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s-")):
        ax2.plot(xs, [m["request_latency"][key] for m in levels], style, label=f"served {key}")
    if base and base["request_latency"]["p99"] is not None:
        ax2.axhline(base["request_latency"]["p99"], color="tab:gray", ls="--", label="in-process p99")
    if any(m.get("time_to_first_token") for m in levels):
        ax2.plot(xs, [(m.get("time_to_first_token") or {}).get("p50") for m in levels], "D--", color="tab:purple",
                 label="time to first token p50")
    ax2.set_title("Request latency" + (" (streamed)" if report.get("streaming") else ""))
    ax2.set_xlabel("concurrency (requests in flight)")
    ax2.set_ylabel("ms")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        if len(xs) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
    man = report["server"]["manifest"]
    fig.suptitle(f"{report['server']['model']} ({man.get('prompt_variant') or '?'}), {report['inputs']['count']} "
                 f"inputs, max_new_tokens={report['params']['max_new_tokens']}"
                 f"{' ignore_eos' if report['params']['ignore_eos'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


