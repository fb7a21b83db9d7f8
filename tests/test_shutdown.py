"""Graceful shutdown of a real ``python -m app``: on SIGTERM it stops accepting, lets the
in-flight request finish (it sits in the batcher), drains, and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import photo_bytes, write_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHOTOTAG_")}
    env |= {
        "PHOTOTAG_CHECKPOINT": str(checkpoint),
        "PHOTOTAG_HOST": "127.0.0.1",
        "PHOTOTAG_PORT": str(port),
        "PHOTOTAG_DEVICE": "cpu",
        "PHOTOTAG_MAX_BATCH_WAIT_MS": "3000",  # the request is still in flight at SIGTERM
        "PHOTOTAG_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{base}/v1/tags", files={"file": ("a.jpg", photo_bytes())}, timeout=30
            )
            time.sleep(1.0)  # the request is in, waiting in the batcher
            process.send_signal(signal.SIGTERM)
            response = pending.result(timeout=30)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["tags"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=1)
    lines = [
        json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")
    ]
    messages = [line["msg"] for line in lines]
    assert "stopped: queue drained" in messages
    [access] = [line for line in lines if line.get("path") == "/v1/tags"]
    assert access["status"] == 200 and access["request_id"]
