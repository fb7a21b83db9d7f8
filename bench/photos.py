"""Benchmark photo sets: phone-size (4032x3024 JPEG, q90, 2-3 MB) and app thumbnails (640x480).

Made from the real photos of ``../shared/data/ants-bees/train`` when it is there, else from the
photographs scikit-image ships. Phone photos are upscaled and given sensor-like noise, which is
what makes a real 12-megapixel JPEG weigh 2-3 MB (a smooth upscale would compress to a fraction).

    python bench/photos.py --out bench/out/photos --count 40
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
ANTS_BEES = REPO.parent / "shared" / "data" / "ants-bees" / "train"
SETS = {"phone": (4032, 3024), "thumb": (640, 480)}
NOISE_SIGMA = {"phone": 5.0, "thumb": 0.0}


def source_photos(count: int) -> Iterator[tuple[str, Image.Image]]:
    """``count`` distinct real photos, upright RGB, with a name each."""
    if ANTS_BEES.is_dir():
        paths = sorted(p for p in ANTS_BEES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        picked = [paths[i] for i in np.linspace(0, len(paths) - 1, count).astype(int)]
        for path in picked:
            with Image.open(path) as image:
                yield (
                    f"{path.parent.name}_{path.stem}",
                    ImageOps.exif_transpose(image).convert("RGB"),
                )
        return
    from skimage import data  # the [dev] extra's fallback: a handful of real photographs

    names = ["chelsea", "astronaut", "coffee", "rocket", "cat", "hubble_deep_field"]
    for i in range(count):
        name = names[i % len(names)]
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        yield f"{name}_{i}", ImageOps.mirror(image) if (i // len(names)) % 2 else image


def make_photo(image: Image.Image, size: tuple[int, int], sigma: float, seed: int) -> bytes:
    """Center-crop to the aspect of ``size``, resize, add Gaussian noise, encode JPEG q90."""
    photo = ImageOps.fit(image, size, Image.Resampling.BICUBIC)
    if sigma:
        rng = np.random.default_rng(seed)
        pixels = np.asarray(photo, dtype=np.float32)
        pixels += rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
        photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_sets(out: Path, count: int) -> dict[str, list[Path]]:
    """Write (or reuse) ``out/<set>/*.jpg`` and ``out/<set>/list.txt``; return the paths."""
    written: dict[str, list[Path]] = {}
    for set_name, size in SETS.items():
        folder = out / set_name
        listing = folder / "list.txt"
        if listing.exists() and len(listing.read_text().split()) == count:
            written[set_name] = [Path(p) for p in listing.read_text().split()]
            continue
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for seed, (name, image) in enumerate(source_photos(count)):
            path = folder / f"{name}.jpg"
            path.write_bytes(make_photo(image, size, NOISE_SIGMA[set_name], seed))
            paths.append(path.resolve())
        listing.write_text("\n".join(map(str, paths)) + "\n")
        written[set_name] = paths
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "photos")
    parser.add_argument("--count", type=int, default=40, help="photos per set")
    args = parser.parse_args()
    for name, paths in build_sets(args.out, args.count).items():
        sizes = [p.stat().st_size for p in paths]
        print(f"{name}: {len(paths)} photos, {min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
