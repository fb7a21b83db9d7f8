"""SIGTERM under load: clients post photos (a new connection each, as from many hosts), each
photo held ~BATCH_WAIT_MS in the batcher so some are always in flight; SIGTERM arrives mid-way.
Every request sent well before it completes 200; later ones are refused cleanly (connection
refused, or 503 shutting_down with Retry-After); never a 5xx; the process exits 0.

    .venv/bin/python -m tests.stress.sigterm --concurrency 32 --before 10
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from tests.stress.common import PHOTO, report, tiny_checkpoint, workdir
from tests.stress.server import Server

BATCH_WAIT_MS = 300
# A request sent this long before SIGTERM has reached the server: it must be answered 200.
IN_FLIGHT_MARGIN_S = 0.1
CLOSED_UNANSWERED = {"ReadError", "RemoteProtocolError"}


async def client_loop(base: str, deadline: float, outcomes: list) -> None:
    limits = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                r = await client.post("/v1/tags", files={"file": ("a.jpg", PHOTO)})
                code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
                outcomes.append((sent, r.status_code, code, r.headers.get("retry-after")))
            except httpx.ConnectError:
                outcomes.append((sent, 0, "refused", None))
                await asyncio.sleep(0.05)
            except httpx.HTTPError as exc:
                outcomes.append((sent, -1, type(exc).__name__, None))


async def load_with_sigterm(server: Server, concurrency: int, before_s: float) -> tuple:
    outcomes: list = []
    deadline = time.monotonic() + before_s + 3.0  # keep knocking for 3 s after SIGTERM
    clients = [
        asyncio.create_task(client_loop(server.base, deadline, outcomes))
        for _ in range(concurrency)
    ]
    await asyncio.sleep(before_s)
    signalled = time.monotonic()
    server.terminate()
    await asyncio.gather(*clients)
    return outcomes, signalled


def run(concurrency: int = 32, before_s: float = 10) -> dict:
    checkpoint = tiny_checkpoint(workdir("sigterm") / "tiny.safetensors")
    server = Server(checkpoint, PHOTOTAG_MAX_BATCH_WAIT_MS=str(BATCH_WAIT_MS)).start()
    try:
        outcomes, signalled = asyncio.run(load_with_sigterm(server, concurrency, before_s))
        exit_code = server.process.wait(60)
    finally:
        server.stop()
    log = server.log
    early = [o for o in outcomes if o[0] < signalled - IN_FLIGHT_MARGIN_S]
    late = [o for o in outcomes if o[0] >= signalled - IN_FLIGHT_MARGIN_S]
    in_flight = sum(1 for o in early if o[0] > signalled - BATCH_WAIT_MS / 1000 * 2)
    figures = report(
        "sigterm",
        {
            "requests": len(outcomes),
            "before_sigterm": len(early),
            "in_flight_at_sigterm": in_flight,
            "before_ok": sum(1 for o in early if o[1] == 200),
            "after": len(late),
            "after_outcomes": sorted({(o[1], o[2]) for o in late}),
            "exit_code": exit_code,
        },
    )
    assert exit_code == 0, log[-2000:]
    assert all(o[1] == 200 for o in early), [o for o in early if o[1] != 200][:5]
    assert in_flight > 0, "nothing was in flight at SIGTERM"
    for _, status, code, retry_after in late:
        # 0: connection refused (the listener is closed); -1 with no answer at all: accepted
        # in the moment of SIGTERM and closed by uvicorn before the app saw the request.
        assert status in (200, 0, 503) or code in CLOSED_UNANSWERED, (status, code)
        assert status != 503 or (code == "shutting_down" and retry_after), (code, retry_after)
    assert '"status": 5' not in log.replace('"status": 503', "")
    assert "stopped: queue drained" in log
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--before", type=float, default=10, help="seconds of load before SIGTERM")
    args = parser.parse_args()
    run(args.concurrency, args.before)


if __name__ == "__main__":
    main()
