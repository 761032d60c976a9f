#!/usr/bin/env python3
"""Plots a `cartscore-bench soak --json` report: resident memory, open
descriptors and threads, the store's pages in use and live sessions, and
each interval's p99 over TCP and HTTP, against the minutes of the run.

usage: bench/soak/plot.py SOAK.json OUT.png   (needs matplotlib)
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        report = json.load(f)
    samples = report["samples"]
    if not samples:
        sys.exit(f"{sys.argv[1]} holds no samples")
    minutes = [s["at_seconds"] / 60 for s in samples]
    col = lambda key, scale=1.0: [s[key] * scale for s in samples]

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    ax = axes[0][0]
    ax.plot(minutes, col("rss_kib", 1 / 1024), color="#c0392b")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("resident memory")

    ax = axes[0][1]
    ax.plot(minutes, col("open_fds"), label="open descriptors", color="#2980b9")
    ax.plot(minutes, col("threads"), label="threads", color="#27ae60")
    ax.set_ylim(bottom=0, top=max(col("open_fds")) * 1.5)
    ax.legend(fontsize=8)
    ax.set_title("descriptors and threads")

    ax = axes[1][0]
    ax.plot(minutes, col("store_used_bytes", 1 / 2**20), label="LMDB pages in use (MiB)", color="#8e44ad")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("MiB")
    twin = ax.twinx()
    twin.plot(minutes, col("live_sessions", 1 / 1000), label="live sessions (thousands)", color="#7f8c8d", linestyle="--")
    twin.set_ylim(bottom=0)
    twin.set_ylabel("live sessions (k)")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="lower right")
    ax.set_title("store and sessions (expiry holds them level)")
    ax.set_xlabel("minutes")

    ax = axes[1][1]
    ax.plot(minutes, col("tcp_p99_us", 1 / 1000), label="TCP", color="#c0392b")
    ax.plot(minutes, col("http_p99_us", 1 / 1000), label="HTTP", color="#2980b9")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("p99 (ms)")
    ax.legend(fontsize=8)
    ax.set_title("p99 per interval")
    ax.set_xlabel("minutes")

    status = "passed" if report.get("passed") else "FAILED"
    fig.suptitle(
        f"soak: {report['duration_seconds'] / 60:.0f} min, {report['tcp_requests']:,} TCP + "
        f"{report['http_requests']:,} HTTP scores, {report['failed_requests']} failed, "
        f"{report['events_sent']:,} events, {report['reloads']} reloads: {status}"
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
