"""torchrun with two CPU processes (gloo) trains one model: both ranks end with the same weights,
and those are the weights one process reaches with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from model import train
from model.data import Augment
from tests.helpers import REPO, write_photo_folder
from tests.model.test_train import TINY_NET, tiny_config

# DDP averages the ranks' gradients of their half batches. That equals one process's gradient
# of the whole batch only when nothing else differs between the ranks: no batch norm (each rank
# would normalise its half with its own statistics); no dropout and no augmentation, not even
# the random crop that a working size larger than the crop allows, so square photos resized to
# the crop (each rank draws its own random numbers); and a training split that divides evenly
# (24 photos, 8 a step, 4 a rank), so the DistributedSampler pads nothing and each step's 8
# photos are the same 8. Then only the order of float additions differs: a tolerance.
SAME_STEPS = {
    "arch_args": TINY_NET | {"batch_norm": False, "dropout": 0.0},
    "augment": Augment(random_resized_crop=False, hflip=False, color_jitter=0.0),
    "resize": 32,
    "crop": 32,
    "epochs": 2,
    "device": "cpu",
}


def test_two_gloo_processes_train_the_model_one_process_trains(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", per_class=10, size=(40, 40))
    single = train.train(tiny_config(photos, tmp_path / "single", **SAME_STEPS))
    assert len(single.spec.train) == 24
    ddp = tmp_path / "ddp"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(photos, ddp, **SAME_STEPS).to_dict()))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    rank_script = ["-m", "tests.model.train_ddp_rank", str(config), str(tmp_path)]
    result = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", *rank_script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    expected = single.net.state_dict()
    assert ranks[0].keys() == ranks[1].keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
    facts = json.loads((ddp / "report.json").read_text())["training"]
    assert facts["world_size"] == 2 and facts["epochs_run"] == 2
