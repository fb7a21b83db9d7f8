"""Train seed_cnn from scratch on CIFAR-10's 50,000 training photos (10% held out for
validation) with airbench's recipe, and time it end to end.

    python bench/train_cifar10.py OUT [extra trainer flags]   (bench/train_cifar10.sh is the same)
      -> OUT/best.safetensors (calibrated, servable), val_evaluation.json, plots, wall.json

The recipe (bench/README.md measures each part; every technique is a flag of the trainer or an
argument of seed_cnn):

- network: a frozen 2x2 patch-whitening first conv fitted to the training photos; three
  blocks of conv-pool-BN-GELU, conv-BN-GELU, 64/256/256 wide; identity (dirac) init; BatchNorm
  scales frozen at 1, momentum 0.4; a global max-pool; logits scaled by 1/9;
- training: SGD nesterov 0.85, batch 512, one-cycle LR, 64x LR for the BatchNorm biases, the
  whitening bias frozen after 3 epochs, lookahead every 5 steps, label smoothing 0.2,
  alternating flips and 2 px shifts on batched uint8 tensors, bfloat16 and channels-last;
- served: with 6-view TTA (flips and 1 px shifts; the card's ``tta``, applied by the server),
  so the validation numbers are the server's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10" / "train"
EPOCHS = 10
NET = {
    "widths": [64, 256, 256],
    "convs_per_block": 2,
    "pool_first": True,
    "pool_before_norm": True,
    "batch_norm": True,
    "hidden": [],
    "dropout": 0,
    "whiten": 2,
    "activation": "gelu",
    "dirac": True,
    "bn_momentum": 0.4,
    "bn_eps": 1e-12,
    "bn_scale": False,
    "global_max_pool": True,
    "feature_scale": 1 / 9,
}
FLAGS = [
    "--arch", "seed_cnn", "--resize", "32", "--crop", "32", "--val-fraction", "0.1",
    "--batch-size", "512", "--optimizer", "sgd", "--lr", "0.75", "--momentum", "0.85",
    "--weight-decay", "0.0013", "--schedule", "onecycle", "--norm-lr-scale", "64",
    "--whiten-bias-epochs", "3", "--lookahead-every", "5", "--label-smoothing", "0.2",
    "--grad-clip", "0", "--patience", "0",
    "--no-random-resized-crop", "--color-jitter", "0", "--hflip", "--alternate-flip",
    "--translate", "0.0625",
    "--tta-flip", "--tta-shift", "--serve-tta", "--cpu-amp",
]  # fmt: skip


def command(
    data: Path,
    out: Path,
    epochs: int = EPOCHS,
    net: dict | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The trainer's command line for the recipe; ``net`` overrides seed_cnn arguments and
    ``extra`` flags override the recipe's (argparse keeps the last)."""
    arch_args = json.dumps(NET | (net or {}))
    warmup = str(0.2 * epochs)  # the LR peaks a fifth of the way in
    return [
        sys.executable, "-m", "model.train", "--data", str(data), "--out", str(out),
        "--arch-args", arch_args, "--epochs", str(epochs), "--warmup-epochs", warmup,
        *FLAGS, *(extra or []),
    ]  # fmt: skip


def run(argv: list[str], out: Path) -> float:
    """Run the trainer; return its wall time in seconds (decode, train, calibrate, write)."""
    # Shared cores: OpenMP threads that sleep instead of spinning while they wait for each
    # other keep two-thread torch from stalling when other processes hold a core.
    env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, check=True)
    seconds = time.perf_counter() - started
    (out / "wall.json").write_text(json.dumps({"wall_seconds": round(seconds, 1)}) + "\n")
    return seconds


def main(args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    data = Path(os.environ.get("DATA", DATA))
    if not data.is_dir():
        print(f"no photo set at {data} (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    out = Path(args[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = int(os.environ.get("EPOCHS", EPOCHS))
    seconds = run(command(data, out, epochs, extra=args[1:]), out)
    print(f"wall time: {seconds:.0f} s (photos decoded, trained, calibrated, written)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
