"""A real ``python -m app`` on a free loopback port, for the wire-level tests and stress scripts.

Only 127.0.0.1 is ever used. Every wait here is bounded; ``stop()`` escalates SIGTERM -> SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """``with Server(checkpoint, PHOTOTAG_X=...) as server:`` -> ready on ``server.base``."""

    def __init__(self, checkpoint: Path | None = None, *, cwd: Path | None = None, **env: str):
        self.port = free_port()
        self.base = f"http://{LOOPBACK}:{self.port}"
        # stderr goes to a file, not a pipe: a chatty server must never block on a full pipe.
        self.log_path = Path(tempfile.mkstemp(prefix="phototag-server-", suffix=".log")[1])
        self.cwd = cwd or self.log_path.parent  # no stray .env from the repo is read
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PHOTOTAG_")}
        clean["PYTHONPATH"] = str(REPO)
        self.env = clean | {
            "PHOTOTAG_HOST": LOOPBACK,
            "PHOTOTAG_PORT": str(self.port),
            "PHOTOTAG_DEVICE": "cpu",
            "PHOTOTAG_LOG_FORMAT": "json",
            "PHOTOTAG_TORCH_THREADS": "1",
        }
        if checkpoint is not None:
            self.env["PHOTOTAG_CHECKPOINT"] = str(checkpoint)
        self.env |= {k: str(v) for k, v in env.items()}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> Server:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early ({self.process.returncode}):\n{self.log}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.log}")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def terminate(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
        if self.process is None:
            return None
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
