"""``phototag tag`` on a folder of 12-megapixel JPEGs: against the decode + forward ceiling
(``serve_bench.ceiling``: one process, nothing else running, perfect overlap) and against a
plain script (torchvision ``ImageFolder``-style loading, a ``DataLoader``, the same network); then
memory over a large generated library (RSS sampled while it runs).

    .venv/bin/python bench/library_bench.py                     # figures into bench/out/
    .venv/bin/python bench/library_bench.py --memory-photos 100000

People tags are off in the throughput runs (``--people off``): the ceiling is decode + forward,
the server's definition; the face detector adds about 40 ms of CPU per photo to both. Prints a
table; exits 0 whatever the figures (they are for a person to read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import build_sets  # noqa: E402

PYTHON = sys.executable


def tag_command(library: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    """``phototag tag`` over ``library`` into a fresh ``out`` (its journal removed too)."""
    for path in (out, out.with_name(out.name + ".journal")):
        path.unlink(missing_ok=True)
    return [
        PYTHON, "-m", "app.cli", "tag", str(library), "--checkpoint", str(checkpoint),
        "--out", str(out), "--progress", "none", *extra,
    ]  # fmt: skip


def phototag_tag(library: Path, checkpoint: Path, out: Path, *extra: str) -> dict:
    """One run of ``phototag tag`` from a fresh process; photos/s as its summary says (from
    the listing to the last commit: the model's load is not counted, as in the ceiling)."""
    command = tag_command(library, checkpoint, out, *extra)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    summary = result.stderr.strip().splitlines()[-1]
    rate = float(re.search(r"([\d.]+) photos/s", summary).group(1))
    return {"photos_per_s": rate, "wall_s": time.perf_counter() - started, "summary": summary}


PLAIN = """
import sys, time, torch
from pathlib import Path
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import default_loader
from model.checkpoint import load
from model.preprocess import build_eval_transform

paths = [p for p in sorted(Path(sys.argv[1]).rglob("*")) if p.suffix.lower() == ".jpg"]
checkpoint = load(sys.argv[2])
net = checkpoint.build_model("cpu").eval()
transform = build_eval_transform(checkpoint.card.preprocess)

class Photos(Dataset):  # ImageFolder's loading: PIL open + convert("RGB"), then the transform
    def __len__(self): return len(paths)
    def __getitem__(self, i): return transform(default_loader(str(paths[i])))

loader = DataLoader(Photos(), batch_size=8, num_workers=2)
started, tagged = time.perf_counter(), 0
with torch.inference_mode():
    for batch in loader:
        tagged += len(net(batch).softmax(1).topk(5).indices)
print(tagged / (time.perf_counter() - started))
"""


def plain_script(library: Path, checkpoint: Path) -> dict:
    """The tutorial way, in a fresh process: photos/s from the first batch's request on."""
    result = subprocess.run(
        [PYTHON, "-c", PLAIN, str(library), str(checkpoint)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"photos_per_s": float(result.stdout.strip().splitlines()[-1])}


def phone_library(out: Path, count: int, copies: int) -> Path:
    """``count`` distinct phone photos, ``copies`` times each (hard links: distinct files)."""
    sets = build_sets(out / "photos", count)
    library = out / f"library-{count}x{copies}"
    if not library.is_dir():
        for copy in range(copies):
            folder = library / f"copy{copy}"
            folder.mkdir(parents=True)
            for photo in sets["phone"]:
                os.link(photo, folder / photo.name)
    return library


def memory_library(out: Path, count: int) -> Path:
    """``count`` small JPEGs (160x120), 1,000 per folder."""
    from tests.helpers import photo_bytes

    library = out / f"memory-{count}"
    marker = library / ".complete"
    if marker.exists():
        return library
    for i in range(count):
        folder = library / f"{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(photo_bytes((160, 120), seed=i % 997))
    marker.touch()
    return library


def memory_run(library: Path, checkpoint: Path, out: Path, count: int) -> dict:
    """RSS of ``phototag tag`` sampled every second over a large library (sidecars and all)."""
    for sidecar in library.rglob("*.xmp"):
        sidecar.unlink()
    command = tag_command(library, checkpoint, out / "memory.jsonl", "--people", "off")
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []  # (s, MB)
    started = time.monotonic()
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
            samples.append((time.monotonic() - started, rss))
        except (OSError, AttributeError):
            pass
        time.sleep(1.0)
    summary = process.stderr.read().strip().splitlines()[-1]
    tenths = [samples[min(len(samples) - 1, len(samples) * k // 10)] for k in range(1, 11)]
    return {
        "photos": count,
        "samples": samples,
        "at_tenths_mb": [round(m) for _, m in tenths],
        "peak_mb": max(m for _, m in samples),
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40, help="distinct phone photos")
    parser.add_argument("--copies", type=int, default=3, help="each photo this many times")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument(
        "--memory-photos",
        type=int,
        default=20_000,
        help="photos in the generated library for the memory run (0: skip)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    from serve_bench import ceiling

    checkpoint = args.out / "default.safetensors"
    if not checkpoint.exists():
        from model.pretrained import build_default_checkpoint

        build_default_checkpoint(checkpoint)
    library = phone_library(args.out, args.count, args.copies)
    photos = args.count * args.copies
    print(f"library: {photos} phone JPEGs (4032x3024) in {library}", flush=True)
    limit = ceiling({"phone": args.out / "photos" / "phone" / "list.txt"}, checkpoint)["phone"]
    out = args.out / "library.jsonl"
    ours = max(
        (
            phototag_tag(library, checkpoint, out, "--people", "off", "--xmp", "none")
            for _ in range(args.repeats)
        ),
        key=lambda r: r["photos_per_s"],
    )
    print(f"  phototag tag (--xmp none): {ours['photos_per_s']:.1f} photos/s", flush=True)
    sidecars = phototag_tag(library, checkpoint, out, "--people", "off")
    print(f"  phototag tag (sidecars): {sidecars['photos_per_s']:.1f} photos/s", flush=True)
    for sidecar in library.rglob("*.xmp"):
        sidecar.unlink()
    plain = max(
        (plain_script(library, checkpoint) for _ in range(args.repeats)),
        key=lambda r: r["photos_per_s"],
    )
    print(f"  plain ImageFolder + DataLoader: {plain['photos_per_s']:.1f} photos/s", flush=True)
    memory = None
    if args.memory_photos:
        from tests.helpers import write_tiny_checkpoint

        tiny = write_tiny_checkpoint(args.out / "tiny.safetensors")
        big = memory_library(args.out, args.memory_photos)
        memory = memory_run(big, tiny, args.out, args.memory_photos)
    rows = [
        "| what | photos/s | of the ceiling |",
        "| --- | ---: | ---: |",
        f"| ceiling: decode {limit['decode_ms']:.1f} ms + network {limit['network_ms']:.1f} ms "
        f"per photo on {limit['cores']} cores ({limit['backend']}) | "
        f"{limit['photos_per_s']:.1f} | 100% |",
    ]
    for name, r in (
        ("phototag tag --xmp none", ours),
        ("phototag tag (sidecars)", sidecars),
        ("plain ImageFolder + DataLoader, same network", plain),
    ):
        rows.append(
            f"| {name} | {r['photos_per_s']:.1f} | "
            f"{r['photos_per_s'] / limit['photos_per_s']:.0%} |"
        )
    rows.append("")
    rows.append(
        f"phototag tag vs the plain script: x{ours['photos_per_s'] / plain['photos_per_s']:.2f}"
    )
    if memory:
        rows.append(
            f"memory over {memory['photos']} photos (tiny network, sidecars written): RSS at each "
            f"tenth of the run {memory['at_tenths_mb']} MB, peak {memory['peak_mb']:.0f} MB; "
            f"{memory['summary']}"
        )
    text = "\n".join(rows)
    print("\n" + text)
    (args.out / "library_bench.md").write_text(text + "\n")
    (args.out / "library_bench.json").write_text(
        json.dumps(
            {
                "ceiling": limit,
                "phototag": ours,
                "sidecars": sidecars,
                "plain": plain,
                "memory": memory,
                "args": vars(args),
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
