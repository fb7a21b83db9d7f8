"""The default tagger's tags, as the server computes them (the whole photo and its regions),
with and without its vocabulary, on labelled real photos; and the fit of the thresholds.

    .venv/bin/python bench/vocabulary_bench.py                # measure (about 4 minutes)
    .venv/bin/python bench/vocabulary_bench.py --fit --cache /tmp/vcache.pt   # fit, measure

Photo sets (``../shared/data``; a set that is absent is skipped with a message): ants-bees
(ImageNet's own ant and bee), CIFAR-10 (``--cifar-per-class`` photos of each class, 32 px, so
hard for an ImageNet network), indoor-multilabel (rooms, several objects each, annotated only in
part) and coco-dev (real everyday photos, judged by bench/tags_bench.py's word list). For the
first three a returned tag is right when it gathers one of the classes of the photo's truth tags
(so "animal" is right for an ant photo, and "owl" for a CIFAR "bird", which names no species).

Reported per set: precision (right tags / returned tags), coverage (photos with a tag), tags per
photo, and whether the first tag is right; for the vocabulary (each tag's own threshold) and
for the raw classes as the API returned them before (top 5, threshold 0) and at 0.5.

``--fit`` fits every tag's threshold on every other photo of FIT_SETS, each set weighing its
share, to ``--precision`` (``--category-precision`` for a bare category), none below ``--floor``
(:func:`model.vocabulary.fit_rolled_thresholds`), once for what is served with regions and once
for the whole photo alone (``whole_threshold``), and writes them to
``tools/vocabulary/thresholds.json`` (``tools/vocabulary/build.py`` reads it) and into
``model/vocabularies/imagenet.json``. Every measurement is on the other photos of each set,
which the fit never sees; ``--splits`` cross-validates the fit over random halvings (what to
expect on new photos). ``--cache`` keeps the network's outputs, so a refit takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tags_bench import COCO, Judge, coco_rows  # noqa: E402

from model import regions  # noqa: E402
from model import vocabulary as vocab  # noqa: E402
from model.checkpoint import atomic_write_bytes  # noqa: E402
from model.tagger import Tagger  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
THRESHOLDS = REPO / "tools" / "vocabulary" / "thresholds.json"
SHIPPED = REPO / "model" / "vocabularies" / "imagenet.json"

CIFAR_TAGS = {
    "airplane": ["airplane"], "automobile": ["car"], "bird": ["bird"], "cat": ["cat"],
    "deer": ["antelope"], "dog": ["dog"], "frog": ["frog"], "horse": ["horse"],
    "ship": ["ship", "boat"], "truck": ["truck"],
}  # fmt: skip
INDOOR_TAGS = {
    "chair": ["chair"],
    "cabinetry": ["cabinet"],
    "diningtable": ["table"],
    "door": ["door"],
    "pottedplant": ["potted plant"],
    "pillow": ["pillow"],
    "sofa": ["sofa"],
    "cup": ["cup", "mug"],
    "coffeetable": ["table"],
    "tvmonitor": ["television", "screen"],
    "sink": ["sink"],
    "heater": ["heater"],
    "bowl": ["bowl"],
    "wastecontainer": ["trash can"],
    "vase": ["vase"],
    "bottle": ["bottle"],
    "doll": ["toy"],
    "remote": ["remote control"],
    "bed": ["bed"],
    "book": ["book"],
    "bookcase": ["bookshelf"],
    "backpack": ["backpack"],
    "shelf": ["bookshelf"],
    "windowblind": ["curtain"],
}  # fmt: skip  (annotations with no ImageNet class, e.g. countertop or tap, only add no truth)


def photo_sets(cifar_per_class: int) -> dict[str, list[tuple[Path, list[str]]]]:
    """Set name -> (photo, its truth tags); absent sets are skipped with a message."""
    sets: dict[str, list[tuple[Path, list[str]]]] = {}
    ants_bees = SHARED / "ants-bees" / "train"
    if ants_bees.is_dir():
        sets["ants-bees"] = [
            (p, [folder.rstrip("s")])
            for folder in ("ants", "bees")
            for p in sorted((ants_bees / folder).iterdir())
        ]
    cifar = SHARED / "cifar10" / "train"
    if cifar.is_dir():
        sets["cifar10"] = [
            (p, CIFAR_TAGS[name])
            for name in sorted(CIFAR_TAGS)
            for p in sorted((cifar / name).iterdir())[:cifar_per_class]
        ]
    indoor = SHARED / "indoor-multilabel"
    if indoor.is_dir():
        rows = [json.loads(line) for line in (indoor / "manifest.jsonl").read_text().splitlines()]
        sets["indoor"] = [
            (indoor / row["path"], [t for tag in row["tags"] for t in INDOOR_TAGS.get(tag, [])])
            for row in rows
        ]
    for name in ("ants-bees", "cifar10", "indoor"):
        if name not in sets:
            print(f"skipped {name}: not found under {SHARED}", flush=True)
    return sets


def served(tagger: Tagger, photos: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each photo through the server's own pipeline: (N, T) the tag probabilities it is served
    with (whole photo and regions, :meth:`Tagger.tag_probabilities`), and (N, C) the whole
    photo's class probabilities."""
    rolled, whole = [], []
    for start in range(0, len(photos), 16):
        views = [tagger.views(tagger.photo(p.read_bytes())) for p in photos[start : start + 16]]
        for scores in tagger.outputs(torch.stack(views)).unbind():
            rolled.append(tagger.tag_probabilities(scores))
            whole.append(scores.probabilities)
    return torch.stack(rolled), torch.stack(whole)


CACHE_KEY = "_served_by"


def cache_key(tagger: Tagger, regions_count: int) -> dict[str, str | int]:
    """What the cached tag probabilities depend on: the network's probabilities, the regions
    and the rule that merges them (its source)."""
    rule = hashlib.sha256(inspect.getsource(regions.merge).encode()).hexdigest()[:12]
    return {"probabilities": tagger.probabilities_version, "regions": regions_count, "merge": rule}


def cached_sets(cache: Path | None, key: dict, sets: dict, compute: Callable) -> dict:
    """Set name -> ``compute(its photos' paths)``, read from ``cache`` where it was kept under
    the same ``key`` (what the values depend on) for as many photos, else computed and kept."""
    key = {**key, "photos": {name: len(rows) for name, rows in sets.items()}}
    cached = torch.load(cache) if cache and cache.exists() else {}
    if cached.get(CACHE_KEY) != key:  # another network, setting, rule or photo set
        cached = {CACHE_KEY: key}
    for name, rows in sets.items():
        if name not in cached:
            cached[name] = compute([p for p, _ in rows])
        print(f"{name}: {len(rows)} photos", flush=True)
    if cache:
        torch.save(cached, cache)
    return cached


def truths(v: vocab.Vocabulary, tags: list[list[str]]) -> list[set[int]]:
    """Truth tags -> the class indices they gather."""
    index = {tag.label: t for t, tag in enumerate(v.tags)}
    return [{c for label in labels for c in v.gathered[index[label]]} for labels in tags]


def raw_report(probs: torch.Tensor, truth: list[set[int]], threshold: float) -> dict:
    """The raw classes as the API returns them with ``?vocabulary=classes``: top 5 at least
    ``threshold`` probable."""
    verdicts = []
    for row, true in zip(probs, truth, strict=True):
        values, indices = row.topk(5)
        chosen = [int(i) for v, i in zip(values, indices, strict=True) if v >= threshold]
        verdicts.append([i in true for i in chosen])
    return vocab.summarise(verdicts)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def line(name: str, how: str, r: dict) -> str:
    return (
        f"| {name} | {how} | {fmt(r['precision'])} | {fmt(r['coverage'])} | "
        f"{r['tags_per_photo']:.2f} | {fmt(r['right_first'])} |"
    )


def coco_dev() -> list[tuple[Path, dict]]:
    """coco-dev's photos with their manifest rows (judged by bench/tags_bench.py's word list)."""
    rows = coco_rows()
    if rows is None:
        print(f"skipped coco-dev: not found under {SHARED}", flush=True)
        return []
    return [(COCO / row["file"], row) for row in rows]


def rights(v: vocab.Vocabulary, labels: list) -> torch.Tensor:
    """(N, T) whether each tag is right on each photo: for truth tags, where the tag gathers one
    of their classes; for a coco-dev row, where the judge says so."""
    if labels and isinstance(labels[0], dict):
        judge = Judge(v)
        verdicts = []
        for row in labels:
            words, above = judge.right_for(row)
            verdicts.append([t.label in words or tuple(t.path) in above for t in v.tags])
        return torch.tensor(verdicts)
    truth = truths(v, labels)
    return torch.tensor([[bool(set(m) & true) for m in v.gathered] for true in truth])


def report(
    v: vocab.Vocabulary, rolled: torch.Tensor, right: torch.Tensor, whole: bool = False
) -> dict:
    """The vocabulary's tags (each at its own threshold) on served tag probabilities (``whole``:
    of the whole photo alone, at its thresholds for that)."""
    return vocab.summarise(verdicts(v, rolled, right, whole))


def verdicts(
    v: vocab.Vocabulary, rolled: torch.Tensor, right: torch.Tensor, whole: bool = False
) -> list[list[bool]]:
    """Per photo, whether each tag the vocabulary gives it (top 5) is right."""
    index = {tag.label: t for t, tag in enumerate(v.tags)}
    return [
        [bool(ok[index[s.label]]) for s in v.select(probabilities, 5, whole=whole)]
        for probabilities, ok in zip(rolled, right, strict=True)
    ]


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The fit's settings and the checkpoint, for this script and bench/tag_rules_bench.py."""
    parser.add_argument("--precision", type=float, default=0.9, help="the fit's target")
    parser.add_argument("--floor", type=float, default=0.3, help="no threshold below it")
    parser.add_argument("--minimum", type=int, default=10, help="right examples for a tag's own")
    parser.add_argument("--category-precision", type=float, default=0.92)
    parser.add_argument(
        "--splits", type=int, default=12, help="random halvings to cross-validate the fit (0: no)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "bench" / "out" / "default.safetensors"
    )


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with the checkpoint built first where it is missing (the default's)."""
    args = parser.parse_args()
    if not args.checkpoint.exists():
        from model.pretrained import build_default_checkpoint

        build_default_checkpoint(args.checkpoint)
    torch.set_num_threads(2)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="fit the thresholds first")
    parser.add_argument("--cifar-per-class", type=int, default=200)
    parser.add_argument("--regions", type=int, default=regions.DEFAULT, help="as served")
    parser.add_argument(
        "--cache", type=Path, help="keep the served probabilities here, to fit again quickly"
    )
    add_fit_arguments(parser)
    args = parse(parser)
    sets = {**photo_sets(args.cifar_per_class), "coco-dev": coco_dev()}
    sets = {name: rows for name, rows in sets.items() if rows}
    if not sets:
        sys.exit(f"no labelled photo set under {SHARED}: nothing to measure")
    tagger = Tagger.load(args.checkpoint, regions=args.regions)
    v = vocab.Vocabulary.from_dict(vocab.shipped(), tagger.classes)
    started = time.perf_counter()
    # the network's probabilities; thresholds apply afterwards
    cached = cached_sets(
        args.cache, cache_key(tagger, args.regions), sets, lambda paths: served(tagger, paths)
    )
    measured = {}
    for name, rows in sets.items():
        labels = [t for _, t in rows]
        alone = v.roll_up(cached[name][1], tagger.card.task)  # the whole photo's tags alone
        measured[name] = (cached[name][0], rights(v, labels), cached[name][1], labels, alone)
    print(f"network: {time.perf_counter() - started:.0f} s (regions: {args.regions})", flush=True)
    if args.fit:
        fitted = {n: m for n, m in measured.items() if n in FIT_SETS}
        halves = {n: (m[0][0::2], m[1][0::2]) for n, m in fitted.items()}
        fit(v, halves, {n: (m[4][0::2], m[1][0::2]) for n, m in fitted.items()}, args)
        v = vocab.Vocabulary.from_dict(vocab.shipped(), tagger.classes)
    print("\n| set | tags | precision | coverage | tags per photo | first tag right |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, (rolled, right, whole, labels, alone) in measured.items():
        held = f"{name} (held out)"
        print(line(held, "vocabulary", report(v, rolled[1::2], right[1::2])))
        alone_report = report(v, alone[1::2], right[1::2], whole=True)
        print(line(held, "vocabulary, whole photo alone", alone_report))
        if name != "coco-dev":
            truth = truths(v, labels[1::2])
            print(line(held, "classes, top 5", raw_report(whole[1::2], truth, 0.0)))
            print(line(held, "classes >= 0.5", raw_report(whole[1::2], truth, 0.5)))
    if args.splits:
        cross_validated(v, {n: m[:2] for n, m in measured.items()}, args)


# The fit: the photos people take (coco-dev) weigh half, the ImageNet-style sets a quarter each.
# CIFAR-10's 32 px thumbnails are measured, not fitted: no camera takes them, and upscaled they
# confuse a cat with a dog as no photo does (they held "dog" at 0.92, where real dogs reach 0.7).
FIT_SETS = {"coco-dev": 0.5, "ants-bees": 0.25, "indoor": 0.25}
NEVER_ALONE = "scene"  # tools/vocabulary/build.py's SCENE: a category of places only


def fit(v: vocab.Vocabulary, halves: dict, alone: dict, args: argparse.Namespace) -> None:
    """Fit the thresholds on ``halves`` (set -> served tag probabilities, rights), and those
    for the whole photo read alone on ``alone`` (the same of the whole photo's probabilities),
    and ship them (:func:`fitted_thresholds`)."""
    fitted = fitted_thresholds(v, halves, args)
    fitted["whole"] = fitted_thresholds(v, alone, args)
    shares = ", ".join(f"{name} {share:.0%}" for name, share in FIT_SETS.items())
    fitted["source"] = (
        f"fitted by bench/vocabulary_bench.py --fit on what is served (the whole photo and "
        f"{args.regions} regions) to precision {args.precision} ({args.category_precision} for "
        f"a category), none below {args.floor}, on every other photo of each set ({shares}); a "
        f"tag's own from {args.minimum} right photos, else its depth's; whole_threshold: the same "
        f"fit on the whole photo's probabilities alone (regions off)"
    )
    fitted["default"] = 0.5
    atomic_write_bytes(THRESHOLDS, (json.dumps(fitted, indent=1, sort_keys=True) + "\n").encode())
    data = json.loads(SHIPPED.read_text())
    vocab.apply_thresholds(data, fitted, default=0.5)
    data["thresholds"] = fitted["source"]
    atomic_write_bytes(SHIPPED, (json.dumps(data, indent=1) + "\n").encode())
    print(f"fitted: {json.dumps(fitted['depth'])} by depth, own: {fitted['tags']}", flush=True)


def fitted_thresholds(v: vocab.Vocabulary, halves: dict, args: argparse.Namespace) -> dict:
    """Thresholds fitted on ``halves`` (set -> served tag probabilities, rights), each set
    weighing its share of FIT_SETS, categories to ``--category-precision``."""
    rolled = torch.cat([r for r, _ in halves.values()])
    right = torch.cat([ok for _, ok in halves.values()])
    weights = torch.cat(
        [torch.full((len(r),), FIT_SETS[name] / len(r)) for name, (r, _) in halves.items()]
    )
    fitted = vocab.fit_rolled_thresholds(
        v, rolled, right, args.precision, args.minimum, args.floor, weights,
        args.category_precision,
    )  # fmt: skip
    # "scene" alone names no place: only its tags (kitchen, street, ...) are worth returning
    fitted["tags"][NEVER_ALONE] = 1.0
    return fitted


def cross_validated(v: vocab.Vocabulary, measured: dict, args: argparse.Namespace) -> None:
    """Print what the fit gives on photos it has not seen (:func:`cross_validate`)."""
    found = cross_validate(v, measured, args)
    print(f"\nCross-validated over {args.splits} random halvings (fitted on one half, measured "
          "on the other, both ways):")  # fmt: skip
    print("\n| set | precision | right tags per photo | tags per photo | without tags |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in found.items():
        s = cv_summary(rows)
        print(
            f"| {name} | {s['precision']:.3f} | {s['right_per_photo']:.2f} | "
            f"{s['tags_per_photo']:.2f} | {s['without_tags']:.0%} |"
        )


def cross_validate(
    v: vocab.Vocabulary, measured: dict, args: argparse.Namespace
) -> dict[str, list[list[bool]]]:
    """What the fit gives on photos it has not seen, over ``--splits`` random halvings of every
    set: fitted on one half, measured on the other, and the other way round (the shipped fit is
    one such half; with sets this small, which half moves its figures by several points).
    ``measured``: set -> (served tag probabilities, rights). Returns set -> per photo, whether
    each tag given is right (every photo once per halving)."""
    found: dict[str, list[list[bool]]] = {name: [] for name in measured}
    for seed in range(args.splits):  # each set's halving its own: the same whichever sets exist
        order = {
            n: torch.randperm(len(m[0]), generator=torch.Generator().manual_seed(seed))
            for n, m in measured.items()
        }
        for half in (0, 1):
            fit_on = {n: o[half::2] for n, o in order.items()}
            halves = {n: (m[0][fit_on[n]], m[1][fit_on[n]]) for n, m in measured.items()}
            fitted = fitted_thresholds(v, {n: h for n, h in halves.items() if n in FIT_SETS}, args)
            data = vocab.shipped()
            vocab.apply_thresholds(data, fitted, default=0.5)
            refit = vocab.Vocabulary.from_dict(data, v.classes)
            for name, (rolled, right) in measured.items():
                test = order[name][1 - half :: 2]
                found[name] += verdicts(refit, rolled[test], right[test])
    return found


def cv_summary(rows: list[list[bool]]) -> dict[str, float]:
    """Precision, right tags per photo, tags per photo and the share without tags of
    :func:`cross_validate`'s verdicts for one set."""
    s = vocab.summarise(rows)
    return {
        "precision": s["precision"] or 0.0,
        "right_per_photo": sum(map(sum, rows)) / len(rows),
        "tags_per_photo": s["tags_per_photo"],
        "without_tags": 1 - s["coverage"],
    }


if __name__ == "__main__":
    main()
