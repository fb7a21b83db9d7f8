"""bench/train_speed.py's smoke mode on a few real ants-bees photos: it runs and its JSON holds
every figure, each a positive number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, shared_data

SCRIPT = REPO / "bench" / "train_speed.py"
RUN_KEYS = {
    "setup_seconds",
    "epochs",
    "epoch1_images_per_s",
    "epoch1_with_setup_images_per_s",
    "later_images_per_s",
}


def check_run(run: dict) -> None:
    assert set(run) >= RUN_KEYS
    assert run["setup_seconds"] >= 0
    assert run["epoch1_images_per_s"] > 0 and run["later_images_per_s"] > 0
    assert run["epoch1_with_setup_images_per_s"] > 0
    assert len(run["epochs"]) == 1  # --quick: one epoch
    assert run["epochs"][0]["images"] > 0 and run["epochs"][0]["seconds"] > 0


@pytest.mark.slow
def test_quick_mode_writes_every_figure(tmp_path: Path) -> None:
    photos = shared_data("ants-bees/train")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    command = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--data",
        str(photos),
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "train_speed.json").read_text())
    assert results["train_photos"] == 12  # 8 photos a class, 2 of each held out
    comparison = results["comparison"]
    check_run(comparison["plain"])
    check_run(comparison["phototag"])
    assert comparison["ratio_later"] > 0
    assert set(results["cache"]) == {"lite0", "seed_cnn", "pipeline", "pipeline-workers-0"}
    for pair in results["cache"].values():
        check_run(pair["on"])
        check_run(pair["off"])
        assert pair["ratio_later"] > 0
        assert isinstance(pair["reaches_3x"], bool)
    table = (tmp_path / "train_speed.md").read_text()
    assert "| plain PyTorch loop |" in table and "| phototag `model.train` |" in table


def test_missing_photo_set_is_a_clear_error(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "absent"), "--quick"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no photo set at" in done.stderr
