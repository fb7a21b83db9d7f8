"""Ways to serve tags from the network's views of a photo, compared as the shipped one is chosen:
each fitted to the same precision targets and cross-validated over the same random halvings
(bench/vocabulary_bench.py's fit and ``cross_validate``), so their figures compare directly.

    .venv/bin/python bench/tag_rules_bench.py --cache /tmp/views.pt
    .venv/bin/python bench/tag_rules_bench.py --cache /tmp/views.pt --rules served mirrored

The views of each photo (ants-bees, indoor-multilabel and coco-dev, the sets the fit reads):
the whole photo and its four regions as served (:meth:`model.tagger.Tagger.views`), the same
five mirrored left to right, and the whole photo squeezed to the network's square instead of
centre-cropped. A rule turns one photo's views into its tag probabilities; ``served`` is what
the server does (:func:`model.regions.merge`). Reported per set: precision, right tags per
photo and the share of photos without a tag, on the halves each fit did not see.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import vocabulary_bench as bench  # noqa: E402

from model import regions  # noqa: E402
from model import vocabulary as vocab  # noqa: E402
from model.preprocess import INTERPOLATIONS, Preprocess, center_crop  # noqa: E402
from model.tagger import Tagger  # noqa: E402

# one photo's views, in this order: the whole photo, its regions, the same mirrored, squeezed
WHOLE, REGIONS = 0, slice(1, 5)
MIRRORED_WHOLE, MIRRORED_REGIONS = 5, slice(6, 10)
SQUEEZED = 10


def views(tagger: Tagger, image: Image.Image) -> torch.Tensor:
    """(11, 3, crop, crop) uint8: the served views of ``image``, their mirror images, and the
    whole photo squeezed (see the module's docstring)."""
    served = tagger.views(image)  # (5, 3, crop, crop)
    squeezed = squeeze(image, tagger.card.preprocess)
    return torch.cat([served, served.flip(-1), squeezed[None]])


def squeeze(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The whole photo resized to the network's square, its shape not kept (nothing cropped)."""
    square = image.convert("RGB").resize(
        (pre.crop, pre.crop), INTERPOLATIONS[pre.interpolation].pil
    )
    return center_crop(square, pre)  # already the crop's size: only made pixels


def class_probabilities(tagger: Tagger, photos: list[Path]) -> torch.Tensor:
    """(N, 11, C) each photo's class probabilities per view."""
    found = []
    for path in photos:
        image = tagger.photo(path.read_bytes())  # upright, decoded as the server does
        scores = tagger.outputs(views(tagger, image)[None])
        found.append(torch.cat([scores.probabilities, scores.regions[0]]))
    return torch.stack(found)


Rule = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def served(p: torch.Tensor, roll: Callable) -> torch.Tensor:
    return regions.merge(roll(p[WHOLE]), roll(p[REGIONS]))


def mirrored(p: torch.Tensor, roll: Callable) -> torch.Tensor:
    """Each view's probabilities averaged with its mirror image's (ten forward passes)."""
    whole = (p[WHOLE] + p[MIRRORED_WHOLE]) / 2
    return regions.merge(roll(whole), roll((p[REGIONS] + p[MIRRORED_REGIONS]) / 2))


def mirrored_whole(p: torch.Tensor, roll: Callable) -> torch.Tensor:
    """The whole photo's averaged with its mirror image's; the regions as served (six)."""
    return regions.merge(roll((p[WHOLE] + p[MIRRORED_WHOLE]) / 2), roll(p[REGIONS]))


def squeezed(p: torch.Tensor, roll: Callable) -> torch.Tensor:
    """The whole photo squeezed instead of centre-cropped (nothing of it left out)."""
    return regions.merge(roll(p[SQUEEZED]), roll(p[REGIONS]))


def tail_cut(p: torch.Tensor, roll: Callable, floor: float = 0.005) -> torch.Tensor:
    """Classes under ``floor`` left out of the sums: a broad category made of hundreds of
    classes at a tenth of a percent each is noise, not evidence."""
    kept = torch.where(p >= floor, p, torch.zeros_like(p))
    return served(kept, roll)


def three_witnesses(p: torch.Tensor, roll: Callable) -> torch.Tensor:
    """The centre crop, the squeezed photo and the likeliest region as three witnesses."""
    return 1 - (1 - served(p, roll)) * (1 - roll(p[SQUEEZED]))


RULES: dict[str, Rule] = {
    "served": served,
    "mirrored": mirrored,
    "mirrored-whole": mirrored_whole,
    "squeezed": squeezed,
    "tail-cut": tail_cut,
    "three-witnesses": three_witnesses,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES))
    parser.add_argument("--cache", type=Path, help="keep the views' probabilities here")
    bench.add_fit_arguments(parser)
    args = bench.parse(parser)
    sets = {**bench.photo_sets(0), "coco-dev": bench.coco_dev()}
    sets = {name: rows for name, rows in sets.items() if rows and name in bench.FIT_SETS}
    if not sets:
        sys.exit(f"no labelled photo set under {bench.SHARED}: nothing to measure")
    tagger = Tagger.load(args.checkpoint, regions=regions.DEFAULT)
    v = vocab.Vocabulary.from_dict(vocab.shipped(), tagger.classes)
    views_code = "".join(inspect.getsource(f) for f in (views, squeeze, regions.crop))
    key = {
        "probabilities": tagger.probabilities_version,
        "views": hashlib.sha256(views_code.encode()).hexdigest()[:12],
    }
    cached = bench.cached_sets(
        args.cache, key, sets, lambda paths: class_probabilities(tagger, paths)
    )
    compare(v, tagger.card.task, sets, cached, args)


def compare(
    v: vocab.Vocabulary, task: str, sets: dict, cached: dict, args: argparse.Namespace
) -> None:
    """Print each of ``args.rules``' cross-validated figures on every set, one row a rule."""

    def roll(p: torch.Tensor) -> torch.Tensor:
        return v.roll_up(p, task)

    print(f"\nCross-validated over {args.splits} random halvings, fitted to {args.precision}:")
    names = list(sets)
    print("\n| rule | " + " | ".join(f"{n} precision | right | without tags" for n in names) + " |")
    print("| --- |" + " ---: | ---: | ---: |" * len(names))
    for rule in args.rules:
        measured = {
            n: (
                torch.stack([RULES[rule](p, roll) for p in cached[n]]),
                bench.rights(v, [t for _, t in rows]),
            )
            for n, rows in sets.items()
        }
        found = bench.cross_validate(v, measured, args)
        cells = []
        for n in names:
            s = bench.cv_summary(found[n])
            cells += [
                f"{s['precision']:.3f}",
                f"{s['right_per_photo']:.2f}",
                f"{s['without_tags']:.0%}",
            ]
        print(f"| {rule} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
