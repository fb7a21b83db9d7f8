"""What one explanation (POST /v1/explain) costs on this machine, step by step, with the default
network: decode, crop, the explanation itself (forward + backward to the last feature map), and
the PNG overlay; for phone-size photos (4032x3024 JPEG) and thumbnails (640x480).

    python bench/explain_bench.py [--checkpoint checkpoints/default.safetensors] [--repeat 10]
    python bench/explain_bench.py --example docs/explain-cat-coffee.png   # the README's picture

Runs torch on the threads the server would give it (PHOTOTAG_TORCH_THREADS=0: a quarter of the
cores, at least one). Figures: bench/README.md, "Why this tag".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.photos import SETS, make_photo, source_photos  # noqa: E402
from model import explain  # noqa: E402
from model.runtime import RuntimeChoice  # noqa: E402
from model.tagger import Tagger  # noqa: E402


def default_checkpoint(path: Path | None) -> Path:
    if path is not None:
        return path
    shipped = REPO / "checkpoints" / "default.safetensors"
    if shipped.is_file():
        return shipped
    from model.pretrained import build_default_checkpoint

    return build_default_checkpoint(Path(tempfile.mkdtemp()) / "default.safetensors")


def timed(step, *args):
    started = time.perf_counter()
    result = step(*args)
    return result, (time.perf_counter() - started) * 1000


def bench(tagger: Tagger, repeat: int) -> None:
    started = time.perf_counter()
    tagger.explainer()
    print(
        f"first explanation builds the torch copy: {(time.perf_counter() - started) * 1000:.0f} ms"
    )
    sources = [image for _, image in source_photos(repeat)]
    header = " ".join(f"{step:>8}" for step in ("decode", "crop", "explain", "overlay", "total"))
    print(f"{'photos':8} {header}  (ms, median)")
    for name, size in SETS.items():
        steps: dict[str, list[float]] = {"decode": [], "crop": [], "explain": [], "overlay": []}
        for seed, source in enumerate(sources):
            data = make_photo(source, size, 5.0 if name == "phone" else 0.0, seed)
            image, ms = timed(tagger.photo, data)
            steps["decode"].append(ms)
            pixels, ms = timed(tagger.crop, image)
            steps["crop"].append(ms)
            heatmap, ms = timed(tagger.explain, pixels)
            steps["explain"].append(ms)
            _, ms = timed(explain.overlay_png, image, heatmap, tagger.card.preprocess, 1024)
            steps["overlay"].append(ms)
        medians = {k: statistics.median(v) for k, v in steps.items()}
        cells = " ".join(f"{medians[k]:8.1f}" for k in steps)
        print(f"{name:8} {cells} {sum(medians.values()):8.1f}")


def example(tagger: Tagger, out: Path) -> None:
    """The README's picture: a cat and a coffee cup side by side (the left/right test's canvas),
    the heatmap of "cat" and of "coffee", the band with the photos cut out of each."""
    from PIL import Image

    from tests.model.test_explain import cat_and_coffee

    canvas = cat_and_coffee()
    pixels = tagger.crop(canvas)
    band = (0, 84, 448, 364)
    panels = [
        explain.overlay(canvas, tagger.explain(pixels, tag), tagger.card.preprocess).crop(band)
        for tag in ("cat", "coffee")
    ]
    width, height = panels[0].size
    picture = Image.new("RGB", (2 * width + 8, height), "white")
    for i, panel in enumerate(panels):
        picture.paste(panel, (i * (width + 8), 0))
    picture = picture.quantize(
        colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    picture.save(out, format="PNG", optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--repeat", type=int, default=10, help="photos per set")
    parser.add_argument("--example", type=Path, help="write the README's example picture here")
    args = parser.parse_args()
    tagger = Tagger.load(default_checkpoint(args.checkpoint), RuntimeChoice.resolve("cpu"))
    if args.example:
        example(tagger, args.example)
        return
    bench(tagger, args.repeat)


if __name__ == "__main__":
    main()
