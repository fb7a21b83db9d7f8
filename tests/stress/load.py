"""A small async load client shared by the stress scripts: N workers post photos for a bounded
time (and a bounded count), recording status, latency and the error code of every answer."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    status: int  # 0: transport error (refused, reset, timeout)
    seconds: float
    code: str = ""  # the JSON error code, or the exception's type for a transport error
    retry_after: str | None = None
    version: str = ""  # model version that answered a 200


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def statuses(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    def codes(self) -> Counter:
        return Counter((o.status, o.code) for o in self.outcomes if o.status != 200)

    def server_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status >= 500 or o.status == 0]

    def percentile(self, q: float, status: int = 200) -> float:
        times = sorted(o.seconds for o in self.outcomes if o.status == status)
        if not times:
            return float("nan")
        return times[min(len(times) - 1, int(q / 100 * len(times)))]

    def summary(self) -> str:
        ok = [o.seconds for o in self.outcomes if o.status == 200]
        mean = statistics.fmean(ok) * 1000 if ok else float("nan")
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"{self.sent} requests in {self.seconds:.1f} s ({rate:.0f}/s); statuses "
            f"{dict(sorted(self.statuses().items()))}; 200 latency mean {mean:.0f} ms, "
            f"p50 {self.percentile(50) * 1000:.0f} ms, p99 {self.percentile(99) * 1000:.0f} ms"
        )


async def post_photo(client: httpx.AsyncClient, url: str, photo: bytes) -> Outcome:
    started = time.perf_counter()
    try:
        r = await client.post(url, files={"file": ("load.jpg", photo, "image/jpeg")})
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - started, type(exc).__name__)
    seconds = time.perf_counter() - started
    outcome = Outcome(r.status_code, seconds, retry_after=r.headers.get("retry-after"))
    try:
        body = r.json()
    except ValueError:
        return outcome
    if r.status_code == 200:
        outcome.version = body["model"]["version"]
    elif isinstance(body, dict) and "error" in body:
        outcome.code = body["error"]["code"]
    return outcome


async def run_load(
    url: str,
    photo: bytes,
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int = 1_000_000,
    timeout_s: float = 60.0,
    stop: Callable[[], bool] = lambda: False,
) -> LoadReport:
    """``concurrency`` workers, each posting ``photo`` back to back until ``duration_s`` passes,
    ``max_requests`` were sent in all, or ``stop()`` is true; every loop is bounded."""
    report = LoadReport()
    deadline = time.monotonic() + duration_s
    budget = [max_requests]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline and budget[0] > 0 and not stop():
            budget[0] -= 1
            report.outcomes.append(await post_photo(client, url, photo))

    started = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    report.seconds = time.monotonic() - started
    return report


async def burst(url: str, photo: bytes, count: int, timeout_s: float = 60.0) -> LoadReport:
    """``count`` requests at once, each on its own connection: the overload shape."""
    report = LoadReport()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    started = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        report.outcomes = list(
            await asyncio.gather(*(post_photo(client, url, photo) for _ in range(count)))
        )
    report.seconds = time.monotonic() - started
    return report
