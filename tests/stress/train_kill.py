"""Training survives kill -9: ``python -m model.train`` on a tiny generated photo set is killed
with SIGKILL at random moments KILLS times, then resumed with ``--resume`` (or started again when
it died before its first complete epoch). Each kill comes after a random number of complete
epochs plus a random fraction of a second. After every kill, every ``*.safetensors`` in the run
folder must load with ``model.checkpoint.load`` (the server's loader): no half-written file is
ever where the server would read it. The run then completes with exactly EPOCHS epochs.

    .venv/bin/python -m tests.stress.train_kill --kills 10 --epochs 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from model.checkpoint import load
from tests.helpers import write_photo_folder
from tests.stress.common import report, workdir
from tests.stress.server import REPO

NET = {"input_size": 32, "widths": [4, 8], "hidden": [16]}
RUN_TIMEOUT_S = 300


def make_photos(root: Path, per_class: int = 20) -> Path:
    return write_photo_folder(root, per_class, size=(48, 40))


def command(photos: Path, run_dir: Path, epochs: int, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "model.train", "--resume", str(run_dir)]
    return [
        sys.executable, "-m", "model.train", "--data", str(photos), "--out", str(run_dir),
        "--arch", "seed_cnn", "--arch-args", json.dumps(NET), "--epochs", str(epochs),
        "--batch-size", "8", "--workers", "0", "--patience", "0", "--device", "cpu",
    ]  # fmt: skip


def start(photos: Path, run_dir: Path, epochs: int) -> subprocess.Popen:
    resume = (run_dir / "state.pt").is_file()
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        command(photos, run_dir, epochs, resume),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_checkpoints(run_dir: Path) -> int:
    """Every file the server could be pointed at loads; returns how many there are."""
    paths = sorted(run_dir.glob("*.safetensors"))
    for path in paths:
        load(path)  # raises CheckpointError on a half-written or corrupt file
    return len(paths)


def epochs_done(run_dir: Path) -> list[int]:
    history = run_dir / "history.csv"
    if not history.is_file():
        return []
    with history.open() as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def run(kills: int = 10, epochs: int = 30, seed: int = 0, max_delay_s: float = 0.5) -> dict:
    rng = random.Random(seed)
    root = workdir("train-kill")
    photos, run_dir = make_photos(root / "photos"), root / "run"
    killed_at_epoch, checked = [], 0
    for kill in range(kills):
        process = start(photos, run_dir, epochs)
        # A random moment: after a random number of further complete epochs (none: during start-up),
        # plus a random fraction of a second: in an epoch, a checkpoint write, or the final report.
        done = len(epochs_done(run_dir))
        # On average an equal share of the remaining epochs per remaining kill: spread out.
        target = min(epochs, done + rng.randint(0, 2 * (epochs - done) // (kills - kill)))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(epochs_done(run_dir)) < target and process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no epoch {target} within {RUN_TIMEOUT_S} s")
            time.sleep(0.02)
        time.sleep(rng.uniform(0, max_delay_s))
        if process.poll() is not None:  # finished before the kill
            break
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        killed_at_epoch.append(len(epochs_done(run_dir)))
        checked += check_checkpoints(run_dir)
    process = start(photos, run_dir, epochs)
    _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, stderr[-3000:]
    final = check_checkpoints(run_dir)
    figures = report(
        "train_kill",
        {
            "kills": len(killed_at_epoch),
            "killed_after_epochs": killed_at_epoch,
            "checkpoint_files_validated": checked + final,
            "epochs": epochs_done(run_dir)[-1],
            "history_rows": len(epochs_done(run_dir)),
        },
    )
    assert epochs_done(run_dir) == list(range(1, epochs + 1))
    assert final == 2  # best and last
    assert not list(run_dir.glob(".*.tmp")), "a temp file outlived the finished run"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-delay", type=float, default=0.5, help="most seconds after the chosen epoch"
    )
    args = parser.parse_args()
    run(args.kills, args.epochs, args.seed, args.max_delay)


if __name__ == "__main__":
    main()
