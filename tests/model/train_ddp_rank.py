"""One rank of the torchrun job in test_train_ddp.py: train the config in CONFIG_JSON, then save
this rank's final weights as WEIGHTS_DIR/rank<RANK>.pt for the test to compare.

    torchrun --nproc-per-node 2 -m tests.model.train_ddp_rank CONFIG_JSON WEIGHTS_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from model.train import TrainConfig, train


def main(config_json: str, weights_dir: str) -> None:
    trainer = train(TrainConfig.from_dict(json.loads(Path(config_json).read_text())))
    torch.save(trainer.net.state_dict(), Path(weights_dir) / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
