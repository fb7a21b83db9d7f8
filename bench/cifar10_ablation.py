"""What each technique of bench/train_cifar10.py buys on this machine: the recipe with one
technique taken out at a time, on a CIFAR-10 subset with a short budget, over several seeds.

    python bench/cifar10_ablation.py OUT [--per-class 2000] [--epochs 4] [--seeds 0 1]
                                         [--only NAME ...]

Each variant trains on the first ``--per-class`` photos of each class (10% of them held out for
validation, the split drawn with the seed), so a run takes minutes rather than the full recipe's
twenty. Reported per variant: validation accuracy without TTA (the last epoch's, as the trainer
measured it), with the 6-view TTA (the served number), and the wall time, as mean and spread
(min-max) over the seeds. Results land in OUT/results.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_cifar10 import DATA, command, run

# name -> (seed_cnn arguments, trainer flags) that take one technique out of the recipe
VARIANTS: dict[str, tuple[dict, list[str]]] = {
    "full recipe": ({}, []),
    "no patch whitening (a learned first conv)": ({"whiten": 0}, []),
    "no identity (dirac) init": ({"dirac": False}, []),
    "BatchNorm biases at the base LR (not 64x)": ({}, ["--norm-lr-scale", "1"]),
    "no lookahead": ({}, ["--lookahead-every", "0"]),
    "random flips (not alternating)": ({}, ["--no-alternate-flip"]),
    "no label smoothing": ({}, ["--label-smoothing", "0"]),
    "float32 (no bfloat16 autocast)": ({}, ["--no-cpu-amp"]),
}


def subset(data: Path, per_class: int, folder: Path) -> Path:
    """A class-folder photo set of links to the first ``per_class`` photos of each class."""
    for klass in sorted(p for p in data.iterdir() if p.is_dir()):
        target = folder / klass.name
        target.mkdir(parents=True, exist_ok=True)
        for photo in sorted(klass.iterdir())[:per_class]:
            link = target / photo.name
            if not link.exists():
                link.symlink_to(photo.resolve())
    return folder


def measure(run_dir: Path) -> dict[str, float]:
    history = (run_dir / "history.csv").read_text().splitlines()
    header, last = history[0].split(","), history[-1].split(",")
    served = json.loads((run_dir / "val_evaluation.json").read_text())
    wall = json.loads((run_dir / "wall.json").read_text())
    return {
        "val_acc": float(last[header.index("val_acc")]),
        "val_acc_tta": served["accuracy"],
        "minutes": wall["wall_seconds"] / 60,
    }


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.mean(values) * scale
    low, high = min(values) * scale, max(values) * scale
    return f"{mean:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no photo set at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 1
    photos = subset(args.data, args.per_class, args.out / "photos")
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:  # seeds outermost: a cut-short ablation still covers every variant
        for name in args.only:
            key = f"{name} / seed {seed}"
            if key in results:
                continue
            net, flags = VARIANTS[name]
            run_dir = args.out / f"{list(VARIANTS).index(name)}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            extra = [*flags, "--seed", str(seed)]
            run(command(photos, run_dir, args.epochs, net, extra), run_dir)
            results[key] = measure(run_dir) | {"variant": name, "seed": seed}
            results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{args.per_class} photos per class, {args.epochs} epochs, seeds {args.seeds}\n")
    print("| variant | val accuracy % | with TTA (served) % | minutes |")
    print("|---|---:|---:|---:|")
    for name in args.only:
        rows = [r for r in results.values() if r["variant"] == name and r["seed"] in args.seeds]
        if rows:
            accs = [r["val_acc"] for r in rows]
            ttas = [r["val_acc_tta"] for r in rows]
            minutes = [r["minutes"] for r in rows]
            print(
                f"| {name} | {spread(accs, 100)} | {spread(ttas, 100)} | "
                f"{spread(minutes, digits=2)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
