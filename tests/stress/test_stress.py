"""Short CI versions of the load and fault scripts in tests/stress/ (issue 6). Each script's
docstring gives the command of its long run; the figures are printed (pytest -s shows them)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import httpx
import pytest
import torch

from tests.stress import overload, reload, sigterm, soak
from tests.stress.common import tiny_checkpoint
from tests.stress.server import REPO, Server

pytestmark = pytest.mark.slow


def test_soak_short_has_no_5xx_and_flat_rss():
    figures = soak.run(concurrency=16, duration_s=8, warmup_s=3)
    assert figures["failures"] == 0 and figures["requests"] > 0


def test_overload_refuses_the_excess_at_once_and_serves_the_rest():
    overload.run(burst_size=64, queue=8, rounds=2)


def test_reload_under_load_loses_no_request_and_survives_a_corrupt_file():
    reload.run(reloads=3, concurrency=8)


def test_sigterm_under_load_finishes_in_flight_and_exits_0():
    sigterm.run(concurrency=16, before_s=3)


# --------------------------------------------------------------------------------------------
# Checkpoints are never unpickled on the serving path
# --------------------------------------------------------------------------------------------


class Exploit:
    """Unpickling this creates MARKER: the proof that something unpickled it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_exploits(folder, marker) -> list:
    Exploit.marker = str(marker)
    pickled = folder / "evil.safetensors"
    pickled.write_bytes(pickle.dumps({"weight": Exploit()}))
    torch_file = folder / "evil_torch.safetensors"  # torch.save's zip format, a pickle inside
    torch.save({"weight": Exploit()}, torch_file)
    return [pickled, torch_file]


def test_a_pickle_named_safetensors_is_refused_as_the_checkpoint(tmp_path):
    marker = tmp_path / "UNPICKLED"
    for evil in write_exploits(tmp_path, marker):
        server = Server(evil)
        run = subprocess.run(
            [sys.executable, "-m", "app"],
            cwd=tmp_path,
            env=server.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("phototag: cannot start:"), run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_pickle_in_the_models_folder_is_refused_and_the_others_serve(tmp_path):
    models, marker = tmp_path / "models", tmp_path / "UNPICKLED"
    models.mkdir()
    tiny_checkpoint(models / "default.safetensors")
    write_exploits(models, marker)
    with Server(PHOTOTAG_MODELS_DIR=str(models), cwd=REPO) as server:
        ids = [m["id"] for m in httpx.get(f"{server.base}/v1/models").json()["models"]]
        evil = httpx.post(f"{server.base}/v1/tags?model=evil", files={"file": ("a.jpg", b"x")})
        metrics = httpx.get(f"{server.base}/metrics").text
        log = server.log
    assert ids == ["default"]
    assert evil.status_code == 404 and evil.json()["error"]["code"] == "unknown_model"
    assert "refused checkpoint evil " in log and "refused checkpoint evil_torch " in log
    assert 'phototag_model_loads_total{model="evil",result="failed"} 1.0' in metrics
    assert not marker.exists()
