"""bench/train_cifar10.py and bench/cifar10_ablation.py: the recipe's command line is a valid
training config, each ablation variant takes out exactly its technique, and a tiny ablation on
generated 32x32 photos runs end to end and reports every variant."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from model.training.cli import parse_args
from tests.helpers import REPO, write_photo_folder

sys.path.insert(0, str(REPO / "bench"))

import cifar10_ablation
import train_cifar10


def config(argv: list[str]):
    cfg, _ = parse_args(argv[3:])  # after "python -m model.train"
    return cfg


def test_the_recipe_is_a_valid_config_with_every_technique_on():
    cfg = config(train_cifar10.command(Path("photos"), Path("out")))
    assert cfg.arch == "seed_cnn" and cfg.epochs == train_cifar10.EPOCHS
    assert cfg.arch_args["whiten"] == 2 and cfg.arch_args["dirac"]
    assert cfg.lookahead_every == 5 and cfg.norm_lr_scale == 64 and cfg.whiten_bias_epochs == 3
    assert cfg.augment.alternate_flip and cfg.cpu_amp and cfg.serve_tta and cfg.tta_shift
    assert cfg.warmup_epochs == pytest.approx(0.2 * cfg.epochs)


@pytest.mark.parametrize("name", [n for n in cifar10_ablation.VARIANTS if n != "full recipe"])
def test_each_ablation_variant_changes_only_its_technique(name):
    full = asdict(config(train_cifar10.command(Path("p"), Path("o"))))
    net, flags = cifar10_ablation.VARIANTS[name]
    changed = asdict(config(train_cifar10.command(Path("p"), Path("o"), net=net, extra=flags)))
    differences = {k for k in full if full[k] != changed[k]}
    if net:
        assert differences == {"arch_args"}
        assert {
            k for k in full["arch_args"] if full["arch_args"][k] != changed["arch_args"][k]
        } == set(net)
    else:
        assert len(differences) == 1, differences  # one flag, one field (augment is one field)


@pytest.mark.slow
def test_a_tiny_ablation_runs_and_reports_every_variant(tmp_path: Path):
    photos = write_photo_folder(tmp_path / "photos", 10, size=(32, 32))
    only = ["full recipe", "no lookahead"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cifar10_ablation.py"), str(tmp_path / "out"),
         "--data", str(photos), "--per-class", "10", "--epochs", "1", "--seeds", "0",
         "--only", *only],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "%" not in line
    ]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == only
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["variant"] for r in results.values()} == set(only)
    assert all(0 <= r["val_acc_tta"] <= 1 and r["minutes"] > 0 for r in results.values())
