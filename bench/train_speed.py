"""Training speed on the real ants-bees photos: `model.train` against a plain PyTorch loop, and
what the decoded-image cache buys.

    make bench-train          # = .venv/bin/python bench/train_speed.py (3 epochs per run)
    .venv/bin/python bench/train_speed.py --quick     # smoke run: 8 photos a class, 1 epoch

Every images/s figure counts training images only. The trainer's own per-epoch timing is used
(`Trainer.fit`, the loop `python -m model.train` runs; its closing calibration and plots are
skipped). Validation and checkpoint writing happen outside the timed epochs. Everything before
epoch 1 (scanning the folder, decoding photos into the cache, building the network) is "setup",
timed apart.

1. phototag against a plain loop, same network and data. The plain loop is what a tutorial
   writes: torchvision `ImageFolder` + `DataLoader`, `RandomResizedCrop(224)`,
   `RandomHorizontalFlip`, `ToTensor`, `Normalize`, on PIL photos decoded every epoch; the
   EfficientNet-Lite0 `TaggerNet` from the shipped ImageNet weights; AdamW at lr 1e-3 on every
   parameter; cross-entropy. Both loops get the same 196 training photos (phototag's seeded split;
   the plain loop takes those photos from `ImageFolder`), batch size, torch threads, loader
   workers and number of epochs. Both train the whole network from epoch 1: phototag runs with
   `--freeze-epochs 0` (its default head-only epochs are cheaper and would flatter it) and
   `--color-jitter 0` (the plain loop has no colour jitter). What still differs is phototag's
   recipe, kept as it is: the cache (on by default), random crops of at least 25% of the area
   (torchvision: 8%), the backbone at 0.1x the learning rate, cosine schedule, label smoothing and
   gradient clipping. Only the cache and the clipping (one pass over the gradients) cost or save
   time.

2. The decoded-image cache: each configuration with the cache on and with `--no-cache`, which
   decodes every photo every epoch. "Later epochs" are epochs 2..N taken together (epoch 1
   when there is only one). The ratio is later-epoch images/s with the cache over later-epoch
   images/s without it. With the cache, the decoding happens once in setup, so "epoch 1 incl.
   setup" shows what the first epoch costs:
   - `lite0`: the network of part 1 at 224 px. Compute-bound on a CPU (about 7-8 img/s on two
     cores): decoding is a small share of an epoch, so 3x is not expected here.
   - `seed_cnn`: a small from-scratch net (widths 16-32-64, batch norm) on 64 px crops of photos
     cached at 64 px, as `--arch seed_cnn` does by default. Little compute per photo.
   - `pipeline`: phototag's training input pipeline alone (`TrainBatches`, 224 px crops from the
     256 px working size, `--workers` loader processes), iterated for the same epochs with no
     network. This is the data-bound limit of the loader as `model.train` runs it. It includes
     a fixed cost per epoch: a new `DataLoader` starts its worker processes every epoch.
   - `pipeline-workers-0`: the same in the main process (`--workers 0`): no worker start-up and
     no batches passed between processes, so this ratio is decoding + augmenting a photo
     against augmenting it alone.
   The script reports the ratios it measures and says which reach 3x; it forces nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ants-bees" / "train"
# Shared cores: OpenMP threads that sleep instead of spinning while they wait for each other.
# Set before torch is imported; the other bench scripts export the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from model import architectures, data, train  # noqa: E402

SEED_CNN = {"widths": [16, 32, 64], "batch_norm": True, "hidden": [], "dropout": 0.1}
CACHE_CONFIGS = ("lite0", "seed_cnn", "pipeline", "pipeline-workers-0")
TARGET_RATIO = 3.0


@dataclass
class Run:
    """One timed run: setup before epoch 1, then (images, seconds) per training epoch."""

    name: str
    setup_seconds: float = 0.0
    epochs: list[dict] = field(default_factory=list)

    def add_epoch(self, images: int, seconds: float) -> None:
        self.epochs.append({"epoch": len(self.epochs) + 1, "images": images, "seconds": seconds})
        line = f"epoch {len(self.epochs)}: {images} photos, {seconds:.1f} s"
        print(f"  {self.name} {line}, {images / seconds:.1f} img/s", flush=True)

    def later(self) -> list[dict]:
        return self.epochs[1:] or self.epochs

    def summary(self) -> dict:
        first = self.epochs[0]
        return {
            "setup_seconds": self.setup_seconds,
            "epochs": [e | {"images_per_s": e["images"] / e["seconds"]} for e in self.epochs],
            "epoch1_images_per_s": first["images"] / first["seconds"],
            "epoch1_with_setup_images_per_s": first["images"]
            / (first["seconds"] + self.setup_seconds),
            "later_images_per_s": rate(self.later()),
            "later_epochs": f"2-{len(self.epochs)}" if len(self.epochs) > 1 else "1",
        }


def rate(epochs: list[dict]) -> float:
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs)


# --------------------------------------------------------------------------------------------
# The photos
# --------------------------------------------------------------------------------------------


def photo_source(folder: Path, per_class: int, out: Path) -> Path:
    """The folder itself, or a manifest of its first ``per_class`` photos of each class."""
    if per_class <= 0:
        return folder
    manifest = out / "photos.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "tags"])
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(class_dir.iterdir())[:per_class]:
                writer.writerow([path.resolve(), class_dir.name])
    return manifest


# --------------------------------------------------------------------------------------------
# phototag
# --------------------------------------------------------------------------------------------


def phototag_config(
    args: argparse.Namespace, source: Path, name: str, **overrides
) -> train.TrainConfig:
    """Part 1's settings: Lite0 from the shipped weights, whole network from epoch 1."""
    values = {
        "data": str(source),
        "out": str(args.out / "runs" / name),
        "pretrained": True,
        "freeze_epochs": 0,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "workers": args.workers,
        "patience": 0,
        "augment": data.Augment(color_jitter=0.0),
    }
    return train.TrainConfig(**(values | overrides))


def seed_cnn_config(
    args: argparse.Namespace, source: Path, name: str, **overrides
) -> train.TrainConfig:
    return phototag_config(
        args, source, name, arch="seed_cnn", arch_args=SEED_CNN, pretrained=False,
        resize=args.small_size, crop=args.small_size, **overrides,
    )  # fmt: skip


def run_phototag(cfg: train.TrainConfig) -> Run:
    """``model.train``'s Trainer: setup (data, cache, network), then ``fit`` with its timing."""
    run, ddp = Run(Path(cfg.out).name), train.Dist()
    print(f"{run.name}: model.train, {cfg.arch}", flush=True)
    started = time.perf_counter()
    trainer = train.Trainer(cfg, ddp, train.Log(ddp))
    run.setup_seconds = time.perf_counter() - started
    trainer.fit()
    for row in trainer.progress.history:
        run.add_epoch(round(row["images_per_s"] * row["seconds"]), row["seconds"])
    return run


def run_pipeline(cfg: train.TrainConfig) -> Run:
    """phototag's training batches for ``cfg.epochs`` epochs, with no network."""
    run, ddp = Run(Path(cfg.out).name), train.Dist()
    print(f"{run.name}: input pipeline alone, {cfg.workers} loader workers", flush=True)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    spec, cache = train.prepare_data(cfg, train.Log(ddp))
    batches = train.TrainBatches(spec, cache, cfg, ddp)
    run.setup_seconds = time.perf_counter() - started
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        images = sum(len(targets) for _, targets in batches.epoch(epoch))
        run.add_epoch(images, time.perf_counter() - started)
    return run


# --------------------------------------------------------------------------------------------
# The plain PyTorch loop, as a tutorial writes it
# --------------------------------------------------------------------------------------------


def run_plain_loop(args: argparse.Namespace, train_paths: set[Path]) -> Run:
    print("plain: ImageFolder + DataLoader, photos decoded every epoch", flush=True)
    run, started = Run("plain"), time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    folder = datasets.ImageFolder(args.data, transform)
    keep = [i for i, (path, _) in enumerate(folder.samples) if Path(path).resolve() in train_paths]
    # drop_last: a last batch of one photo would break batch norm (phototag drops it too)
    loader = DataLoader(
        Subset(folder, keep), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, drop_last=len(keep) % args.batch_size == 1,
    )  # fmt: skip
    net = architectures.build("efficientnet_lite0", len(folder.classes))
    architectures.load_backbone_weights(net, architectures.load_shipped_lite0())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    run.setup_seconds = time.perf_counter() - started
    for _ in range(args.epochs):
        net.train()
        seen, started = 0, time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        run.add_epoch(seen, time.perf_counter() - started)
    return run


# --------------------------------------------------------------------------------------------
# The runs and the report
# --------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, source: Path) -> dict:
    spec = data.load_dataset(source)  # the same seeded split the trainer makes
    warm_page_cache(spec)
    plain = run_plain_loop(args, {s.path.resolve() for s in spec.train})
    configs = [c for c in CACHE_CONFIGS if c != "pipeline-workers-0" or args.workers > 0]
    runs: dict[str, dict[str, Run]] = {}
    for config in configs:  # on, then off, side by side: the machine's load drifts
        runs[config] = {key: cache_run(config, args, source, key == "on") for key in ("on", "off")}
    ours, theirs = runs["lite0"]["on"].summary(), plain.summary()
    results = {
        "train_photos": len(spec.train),
        "val_photos": len(spec.val),
        "comparison": {
            "plain": theirs,
            "phototag": ours,
            "ratio_later": ours["later_images_per_s"] / theirs["later_images_per_s"],
        },
        "cache": {},
    }
    for config, pair in runs.items():
        on, off = pair["on"].summary(), pair["off"].summary()
        ratio = on["later_images_per_s"] / off["later_images_per_s"]
        results["cache"][config] = {
            "on": on, "off": off, "ratio_later": ratio, "reaches_3x": ratio >= TARGET_RATIO,
        }  # fmt: skip
    return results


def cache_run(config: str, args: argparse.Namespace, source: Path, cache: bool) -> Run:
    name = f"{config}-cache-{'on' if cache else 'off'}"
    if config == "lite0":
        return run_phototag(phototag_config(args, source, name, cache=cache))
    if config == "seed_cnn":
        return run_phototag(seed_cnn_config(args, source, name, cache=cache))
    workers = 0 if config == "pipeline-workers-0" else args.workers
    return run_pipeline(phototag_config(args, source, name, cache=cache, workers=workers))


def warm_page_cache(spec: data.DatasetSpec) -> None:
    """Read every file once, so no run pays for the disk and decoding is what is measured."""
    for sample in spec.train + spec.val:
        sample.path.read_bytes()


def report(results: dict, args: argparse.Namespace) -> str:
    comparison, cache = results["comparison"], results["cache"]
    lines = [
        f"{results['train_photos']} training photos, batch {args.batch_size}, "
        f"{args.threads} torch threads, {args.workers} loader workers, "
        f"{args.epochs} epoch(s) per run; training images only.",
        "",
        "phototag against a plain PyTorch loop (EfficientNet-Lite0, whole network, 224 px):",
        "",
        "| loop | setup s | img/s per epoch | later epochs img/s |",
        "| --- | ---: | --- | ---: |",
        run_row("plain PyTorch loop", comparison["plain"]),
        run_row("phototag `model.train`", comparison["phototag"]),
        "",
        f"phototag / plain loop, later epochs: x{comparison['ratio_later']:.2f}",
        "",
        "The decoded-image cache: later epochs with it against decoding every epoch:",
        "",
        "| configuration | cache | setup s | img/s per epoch | epoch 1 incl. setup img/s "
        "| later epochs img/s |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for config, pair in cache.items():
        for key in ("on", "off"):
            r = pair[key]
            lines.append(
                f"| {config} | {key} | {r['setup_seconds']:.2f} | {per_epoch(r)} | "
                f"{r['epoch1_with_setup_images_per_s']:.1f} | {r['later_images_per_s']:.1f} |"
            )
    lines.append("")
    for config, pair in cache.items():
        verdict = "reaches" if pair["reaches_3x"] else "does not reach"
        lines.append(f"{config}: cache / no cache x{pair['ratio_later']:.2f}, {verdict} 3x")
    return "\n".join(lines)


def run_row(label: str, r: dict) -> str:
    return (
        f"| {label} | {r['setup_seconds']:.2f} | {per_epoch(r)} | {r['later_images_per_s']:.1f} |"
    )


def per_epoch(r: dict) -> str:
    return ", ".join(f"{e['images_per_s']:.1f}" for e in r["epochs"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ants-bees/train folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "train_speed")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (as phototag)")
    parser.add_argument("--photos", type=int, default=0, help="photos per class (0: all)")
    parser.add_argument("--small-size", type=int, default=64, help="seed_cnn's crop, px")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 photos a class, 1 epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.photos, args.epochs = args.photos or 8, 1
    args.threads = args.threads or torch.get_num_threads()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"no photo set at {args.data} (see ../shared/data/README.md); pass --data")
    source = photo_source(args.data, args.photos, args.out)
    started = time.perf_counter()
    results = measure(args, source)
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["machine"] = {
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    text = report(results, args)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(results, indent=2))
    (args.out / "train_speed.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
