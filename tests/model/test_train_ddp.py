"""torchrun with two CPU processes (gloo): the same run folder, in form, as one process."""

from __future__ import annotations

import json
import subprocess
import sys

from model import checkpoint, train
from tests.helpers import REPO
from tests.model.test_train import TINY_NET, make_photos, tiny_config


def test_two_process_gloo_run_matches_a_single_process_run_in_form(tmp_path):
    photos = make_photos(tmp_path / "photos", per_class=6)
    single = tmp_path / "single"
    train.train(tiny_config(photos, single, epochs=2))
    ddp = tmp_path / "ddp"
    args = ["--data", str(photos), "--out", str(ddp), "--arch", "seed_cnn", "--resize", "36"]
    args += ["--arch-args", json.dumps(TINY_NET), "--epochs", "2", "--batch-size", "8"]
    args += ["--lr", "3e-3", "--workers", "0", "--threads", "1", "--crop-scale-min", "0.5"]
    args += ["--translate", "0.1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "model.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    one, two = (checkpoint.load(run / "best.safetensors").card for run in (single, ddp))
    assert (two.classes, two.task, two.arch_args, two.preprocess) == (
        one.classes,
        one.task,
        one.arch_args,
        one.preprocess,
    )
    assert set(two.metrics) == set(one.metrics) and two.data_fingerprint == one.data_fingerprint
    assert two.training.keys() == one.training.keys()
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2 and metrics["training"]["epochs_run"] == 2
