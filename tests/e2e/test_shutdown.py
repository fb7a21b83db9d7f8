"""Graceful shutdown of a real ``python -m app``: on SIGTERM it stops accepting, lets the
in-flight request finish (it sits in the batcher), drains, and exits 0."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import photo_bytes, queue_depth, wait_until, write_tiny_checkpoint
from tests.stress.server import Server


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    # the request is still waiting in the batcher when SIGTERM comes
    with Server(checkpoint, PHOTOTAG_MAX_BATCH_WAIT_MS="3000") as server:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post,
                f"{server.base}/v1/tags",
                files={"file": ("a.jpg", photo_bytes())},
                timeout=30,
            )
            wait_until(
                lambda: queue_depth(httpx.get(f"{server.base}/metrics").text) == 1,
                what="the request waiting in the batcher",
            )
            server.terminate()
            response = pending.result(timeout=30)
        assert server.process.wait(timeout=30) == 0
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["tags"]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base}/healthz", timeout=1)
        lines = [json.loads(line) for line in server.log.splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert "stopped: queue drained" in messages
    [access] = [line for line in lines if line.get("path") == "/v1/tags"]
    assert access["status"] == 200 and access["request_id"]
