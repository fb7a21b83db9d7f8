"""Custom tags on a CUDA GPU: a tag taught on the CPU, served by the CPU, CUDA float32 and CUDA
float16 runtimes of the same checkpoint, gives the same probabilities and tags; one taught from
the GPU's examples gives the same head; and the network's throughput there.

    python bench/custom_tags_cuda.py CHECKPOINT [CHECKPOINT ...] [--photos DIR]

DIR holds ``ants/`` and ``bees/`` (default: ../shared/data/ants-bees/train); the first 24 of
each are used: 10 ants teach the tag (no negatives), the rest are tagged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.custom_tags import CustomTagStore
from model.runtime import RuntimeChoice
from model.tagger import Tagger
from model.teach import examples_of, serve_tags, teach

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ants-bees" / "train"
RUNTIMES = {
    "cpu": ("cpu", "torch", "off"),
    "cuda float32": ("cuda", "torch", "off"),
    "cuda float16": ("cuda", "auto", "fp16"),
}


def check(checkpoint: Path, ants: list[Path], bees: list[Path]) -> None:
    taggers = {k: Tagger.load(checkpoint, RuntimeChoice.resolve(*v)) for k, v in RUNTIMES.items()}
    print(f"\n{checkpoint.name}: heads read {taggers['cpu'].space.name}")
    store = CustomTagStore(tempfile.mkdtemp())
    taught = {}
    for key, tagger in taggers.items():
        positives, *_ = examples_of(tagger, ants[:10])
        model_id = key.replace(" ", "-")
        version, space = tagger.probabilities_version, tagger.space
        taught[key] = teach(store, model_id, version, space, "ant-like", positives, positives[:0])
    served = {}
    for key, tagger in taggers.items():
        serve_tags(store, "cpu", tagger)  # the tag taught on the CPU, on every runtime
        pixels = torch.stack([tagger.pixels(p.read_bytes()) for p in ants[10:] + bees])
        served[key] = tagger.outputs(pixels).custom[:, 0]
        hits = served[key] >= taught["cpu"].threshold
        found, wrong = int(hits[: len(ants) - 10].sum()), int(hits[len(ants) - 10 :].sum())
        print(f"  {key}: {found}/{len(ants) - 10} ants tagged, {wrong}/{len(bees)} bees")
    for key in list(RUNTIMES)[1:]:
        gap = float((served[key] - served["cpu"]).abs().max())
        cosine = float(F.cosine_similarity(taught[key].weight, taught["cpu"].weight, 0))
        thresholds = f"{taught[key].threshold:.3f} ({taught['cpu'].threshold:.3f})"
        print(
            f"  {key} against cpu: probabilities within {gap:.4f}; head taught there: cosine "
            f"{cosine:.6f}, threshold {thresholds}"
        )
    fast = taggers["cuda float16"]
    crop = fast.card.preprocess.crop
    batch = torch.randint(0, 256, (64, 3, crop, crop), dtype=torch.uint8)
    for _ in range(3):
        fast.outputs(batch)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        fast.outputs(batch)
    torch.cuda.synchronize()
    rate = 64 * 20 / (time.perf_counter() - started)
    print(f"  cuda float16, Tagger.outputs, batches of 64 uint8 photos: {rate:.0f} photos/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: nothing to measure here", file=sys.stderr)
        return 2
    if not (args.photos / "ants").is_dir():
        print(f"needs ants/ and bees/ photos in {args.photos}", file=sys.stderr)
        return 2
    ants = sorted((args.photos / "ants").iterdir())[:24]
    bees = sorted((args.photos / "bees").iterdir())[:24]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    for checkpoint in args.checkpoints:
        check(checkpoint, ants, bees)
    return 0


if __name__ == "__main__":
    sys.exit(main())
