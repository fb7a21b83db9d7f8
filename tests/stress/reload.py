"""Hot reload under load: traffic runs while the checkpoint is replaced RELOADS times by atomic
renames (each new version waited for), then by a corrupt file, then by a good one again. Zero
failed requests; the corrupt file is refused, reported in the log and in /metrics, and the old
model keeps serving.

    .venv/bin/python -m tests.stress.reload --reloads 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading

import httpx

from model.checkpoint import load
from tests.stress.common import PHOTO, report, tiny_checkpoint, wait_until, workdir
from tests.stress.load import run_load
from tests.stress.server import Server

RELOAD_WAIT_S = 30  # for the server to pick up one replacement


def publish(path, make) -> str:
    """Write a new file beside ``path`` under a hidden name, then rename it over ``path``."""
    temp = path.with_name(f".{path.name}.next")
    make(temp)
    os.replace(temp, path)


def served_version(base: str) -> str:
    return httpx.get(f"{base}/v1/model", timeout=10).json()["version"]


def replace_many(server: Server, path, reloads: int, done: threading.Event, log: dict) -> None:
    try:
        for seed in range(1, reloads + 1):
            publish(path, lambda p, s=seed: tiny_checkpoint(p, seed=s))
            version = load(path).version
            wait_until(lambda v=version: served_version(server.base) == v, RELOAD_WAIT_S, "reload")
            log["versions"].append(version)
        old = log["versions"][-1]
        publish(path, lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt"))
        wait_until(lambda: "refused checkpoint" in server.log, RELOAD_WAIT_S, "the refusal")
        log["served_after_corrupt"] = served_version(server.base) == old
        publish(path, lambda p: tiny_checkpoint(p, seed=reloads + 1))
        version = load(path).version
        wait_until(lambda: served_version(server.base) == version, RELOAD_WAIT_S, "recovery")
        log["versions"].append(version)
    except BaseException as exc:  # reported by run(), after the traffic stops
        log["error"] = exc
    finally:
        done.set()


def run(reloads: int = 10, concurrency: int = 16, max_s: float = 300) -> dict:
    path = tiny_checkpoint(workdir("reload") / "tiny.safetensors", seed=0)
    with Server(path, PHOTOTAG_RELOAD_INTERVAL_S="0.2") as server:
        log: dict = {"versions": [served_version(server.base)]}
        done = threading.Event()
        swapper = threading.Thread(
            target=replace_many, args=(server, path, reloads, done, log), daemon=True
        )
        swapper.start()
        traffic = asyncio.run(
            run_load(
                f"{server.base}/v1/tags",
                PHOTO,
                concurrency=concurrency,
                duration_s=max_s,
                stop=done.is_set,
            )
        )
        swapper.join(10)
        metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
        server_log = server.log
    if "error" in log:
        raise log["error"]
    answered = {o.version for o in traffic.outcomes if o.status == 200}
    figures = report(
        "reload",
        {
            "reloads": len(log["versions"]) - 1,
            "corrupt_refused": "refused checkpoint" in server_log,
            "old_model_served_after_corrupt": log["served_after_corrupt"],
            "requests": traffic.sent,
            "failures": traffic.sent - traffic.statuses()[200],
            "versions_answered": len(answered),
        },
    )
    assert figures["failures"] == 0, traffic.codes()
    assert (
        figures["reloads"] == reloads + 1
    )  # the good ones, and the recovery after the corrupt one
    assert log["served_after_corrupt"]
    assert 'phototag_model_loads_total{model="tiny",result="failed"} 1.0' in metrics
    assert answered <= set(log["versions"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    run(args.reloads, args.concurrency)


if __name__ == "__main__":
    main()
