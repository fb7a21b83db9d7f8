"""Soak: CONCURRENCY clients post photos back to back for DURATION seconds against a real server
on loopback. Zero 5xx (or transport errors), p99 reported, RSS growth after warm-up under 10%.

    .venv/bin/python -m tests.stress.soak --concurrency 64 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio

from tests.stress.common import PHOTO, report, tiny_checkpoint, workdir
from tests.stress.load import run_load
from tests.stress.server import Server

MAX_RSS_GROWTH = 0.10


def run(concurrency: int = 64, duration_s: float = 60, warmup_s: float = 10) -> dict:
    checkpoint = tiny_checkpoint(workdir("soak") / "tiny.safetensors")
    with Server(checkpoint) as server:
        url = f"{server.base}/v1/tags"
        warm = asyncio.run(run_load(url, PHOTO, concurrency=concurrency, duration_s=warmup_s))
        rss_before = server.rss_mb()
        load = asyncio.run(run_load(url, PHOTO, concurrency=concurrency, duration_s=duration_s))
        rss_after = server.rss_mb()
        ready = server.ready()
    growth = (rss_after - rss_before) / rss_before
    figures = report(
        "soak",
        {
            "concurrency": concurrency,
            "seconds": round(load.seconds, 1),
            "requests": load.sent,
            "warmup_requests": warm.sent,
            "statuses": dict(load.statuses()),
            "failures": len(load.server_errors()) + len(warm.server_errors()),
            "p50_ms": round(load.percentile(50) * 1000),
            "p99_ms": round(load.percentile(99) * 1000),
            "rss_mb_before": round(rss_before),
            "rss_mb_after": round(rss_after),
            "rss_growth_pct": round(100 * growth, 1),
        },
    )
    assert figures["failures"] == 0, load.codes()
    assert set(load.statuses()) == {200}, load.codes()
    assert growth < MAX_RSS_GROWTH, f"RSS grew {100 * growth:.1f}% after warm-up"
    assert ready
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60, help="seconds, after warm-up")
    parser.add_argument("--warmup", type=float, default=10, help="seconds")
    args = parser.parse_args()
    run(args.concurrency, args.duration, args.warmup)


if __name__ == "__main__":
    main()
