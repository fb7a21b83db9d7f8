"""Custom tags on real photos: how well a tag taught from k photos tags the others, how long
teaching takes, what 20 tags cost in serving, and how corrections of vocabulary tags behave.

    python bench/custom_tags_bench.py --checkpoint /tmp/default.safetensors [--cache F] [--quick]

Concepts (photos in ../shared/data): "ant" (an ImageNet class: the ants of ants-bees), "kitchen"
(not an ImageNet class: the indoor-multilabel photos with a tap, sink or countertop), "deer"
(not an ImageNet class: CIFAR-10's 32x32 deer, upscaled). A tag is taught from k positives
(k = 5, 10, 20) drawn at random and tested on every other photo: the concept's remaining
photos against the ants, bees, 100 photos of each CIFAR-10 class and the indoor photos that are
not the concept (test negatives never taught). Mean over --repeats draws. Variants:

- builtin: no negatives from the user, the built-in ones (the product's default), in the
  model's space (class probabilities and pooled features where the network gives the mean
  pooled feature: EfficientNet);
- builtin, probabilities: the same, on the class probabilities alone (the space before);
- user N: N negatives drawn from the test pool (and removed from it), plus the built-in ones;
- user N only: the same N, no built-in negatives;
- features+weights: the first design, rejected: a head on the L2-normalised pooled features
  with the classifier's weight rows as the built-in negatives;
- seen N: a design measured and not built: N photos "the server has already tagged" (drawn
  from every other photo, the concept's own remaining photos included, since nobody labelled
  them; removed from the test) as negatives, in the square-root probabilities and the centred,
  L2-normalised pooled features together.

Scenes (with ../shared/data/coco-dev): coco-dev's photos by their stuff labels and the indoor
photos in one pool, a tag taught from 10 of a scene's photos and tested on the rest; then what
the features allow at all: a head fitted on four fifths of the pool's labels.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.custom_tags import CustomTagStore, Examples, Space, _folds, _logistic, fit
from model.runtime import RuntimeChoice
from model.tagger import Tagger
from model.teach import examples_of, teach

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
KITCHEN = {"tap", "sink", "countertop"}


def photo_sets(per_cifar_class: int) -> dict[str, list[Path]]:
    sets = {
        "ants": sorted((DATA / "ants-bees/train/ants").iterdir()),
        "bees": sorted((DATA / "ants-bees/train/bees").iterdir()),
    }
    for name in CIFAR:
        sets[f"cifar-{name}"] = sorted((DATA / "cifar10/train" / name).iterdir())[:per_cifar_class]
    rows = [json.loads(line) for line in (DATA / "indoor-multilabel/manifest.jsonl").open()]
    root = DATA / "indoor-multilabel"
    sets["kitchen"] = [root / r["path"] for r in rows if KITCHEN & set(r["tags"])]
    sets["indoor-other"] = [root / r["path"] for r in rows if not KITCHEN & set(r["tags"])]
    if (DATA / "coco-dev/manifest.jsonl").is_file():
        sets["coco"] = [DATA / "coco-dev" / r["file"] for r in coco_rows()]
    return sets


def coco_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "coco-dev/manifest.jsonl").open()]


# Scenes: coco-dev's photos by their stuff labels (a background covering at least 5% of the
# photo) and things, and the indoor photos, in one pool: coco-dev, then kitchen, then
# indoor-other (the indoor photos are all indoors, none shows sky, tree, grass or a street).
SCENE_SETS = ("coco",)
INDOOR_STUFF = {"ceiling", "floor", "floor-wood", "wall", "wall-tile", "wall-brick", "cabinet",
                "counter", "rug", "curtain", "shelf"}  # fmt: skip
KITCHEN_THINGS = {"oven", "refrigerator", "sink", "microwave"}
SCENES = {
    "sky": lambda stuff, things: "sky" in stuff,
    "tree": lambda stuff, things: "tree" in stuff,
    "grass": lambda stuff, things: "grass" in stuff,
    "street": lambda stuff, things: bool(stuff & {"road", "pavement"}) and not stuff & INDOOR_STUFF,
    "indoors": lambda stuff, things: bool(stuff & INDOOR_STUFF) and "sky" not in stuff,
    "kitchen": lambda stuff, things: bool(things & KITCHEN_THINGS),
}
INDOOR_SCENES = {"indoors": ("kitchen", "indoor-other"), "kitchen": ("kitchen",)}


def scene_pool(encoded: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The scene pool's photos {p, f, m} and each scene's (N,) bool labels."""
    order = ["coco", "kitchen", "indoor-other"]
    pool = {n: torch.cat([encoded[name][n] for name in order]) for n in "pfm"}
    rows = coco_rows()
    labels = {}
    for scene, rule in SCENES.items():
        row_labels = [rule(set(r["stuff"]), set(r["things"])) for r in rows]
        for name in order[1:]:
            row_labels += [name in INDOOR_SCENES.get(scene, ())] * len(encoded[name]["p"])
        labels[scene] = torch.tensor(row_labels)
    return pool, labels


def measure_scene(pool: dict, truth: torch.Tensor, k: int, variant: str, users: int,
                  repeats: int, space: Space) -> list[float]:  # fmt: skip
    """A scene tag taught from k of its photos (and ``users`` negatives of the pool's others),
    tested on the rest of the pool."""
    results = []
    for seed in range(repeats):
        rng = random.Random(seed)
        positives = truth.nonzero().flatten().tolist()
        negatives = (~truth).nonzero().flatten().tolist()
        rng.shuffle(positives)
        rng.shuffle(negatives)
        take = lambda idx: {n: pool[n][torch.tensor(idx, dtype=torch.long)] for n in "pfm"}  # noqa: E731
        test = positives[k:] + negatives[users:]
        scores, threshold = scores_of(
            variant, take(positives[:k]), take(negatives[:users]), take(test), None, space
        )
        results.append(precision_recall_f1(scores >= threshold, truth[test]))
    return [statistics.mean(r[i] for r in results) for i in range(3)]


def scene_ceiling(
    pool: dict, truth: torch.Tensor, space: Space, folds: int = 5
) -> tuple[float, float]:
    """What the features allow a linear head with far more labels than a person gives: fitted on
    every labelled photo of four fifths of the pool (no built-in negatives, each class weighing
    half), scored on the fifth left out, in turn. -> F1 at 0.5, and at the best threshold in
    hindsight (an upper bound no tag can pick from its own examples)."""
    inputs = space.inputs(examples(pool))
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    labels = truth.float()
    scores = torch.empty(len(inputs))
    for held in (order[fold] for fold in _folds(len(inputs), folds)):
        keep = torch.ones(len(inputs), dtype=torch.bool)
        keep[held] = False
        y = labels[keep]
        weights = torch.where(y > 0, 1 / y.sum(), 1 / (1 - y).sum())
        w, b = _logistic(inputs[keep], y, weights)
        scores[held] = torch.sigmoid(inputs[held] @ w + b)
    at_half = precision_recall_f1(scores >= 0.5, truth)[2]
    best = max(precision_recall_f1(scores >= t, truth)[2] for t in torch.arange(0.05, 0.96, 0.01))
    return at_half, best


def encode(tagger: Tagger, sets: dict[str, list[Path]], cache: Path | None) -> dict:
    if cache and cache.exists():
        found = torch.load(cache, weights_only=True)
        if set(found) == set(sets) and all("m" in v for v in found.values()):
            return found
        print(f"  {cache} is of other sets or an older version: encoding again", file=sys.stderr)
    out = {}
    for name, paths in sets.items():
        parts = {"p": [], "f": [], "m": []}
        for i in range(0, len(paths), 16):
            pixels = torch.stack([tagger.pixels(p.read_bytes()) for p in paths[i : i + 16]])
            scores = tagger.outputs(pixels)
            for key, part in zip(
                "pfm", (scores.probabilities, scores.features, scores.mid), strict=True
            ):
                parts[key].append(part)
        out[name] = {key: torch.cat(part) for key, part in parts.items()}
        print(f"  encoded {name}: {len(paths)} photos", file=sys.stderr)
    if cache:
        torch.save(out, cache)
    return out


# concept -> (photo set, classes hidden from the classifier). "class hidden" stands in for a
# concept the network was never taught, at a real photo's resolution: the class's probability is
# removed from every photo and the rest renormalised, which is the softmax of a classifier
# without that class, and its built-in negative goes (the backbone's features still saw it in
# training, so it flatters a little).
CONCEPTS = {
    "ant": ("ants", ()),
    "ant, class hidden": ("ants", ("ant",)),
    "bee, class hidden": ("bees", ("bee",)),
    "kitchen": ("kitchen", ()),
    "deer": ("cifar-deer", ()),
}


def concept_view(encoded: dict, concept: str, classes: list[str], space: Space):
    """The concept's photo set, the encoded photos and the space as its tag sees them (hidden
    classes out)."""
    key, hidden = CONCEPTS[concept]
    if not hidden:
        return key, encoded, space
    keep = torch.tensor([c not in hidden for c in classes])
    view = {}
    for name, v in encoded.items():
        p = v["p"][:, keep]
        view[name] = {"p": p / p.sum(1, keepdim=True), "f": v["f"], "m": v["m"]}
    if space.directions is not None:
        space = Space(space.center, space.directions[keep], space.mid_center)
    return key, view, space


def examples(photos: dict) -> Examples:
    return Examples(photos["p"], photos["f"], photos["m"])


def scores_of(variant: str, pos, neg, test, head_weight: torch.Tensor, space: Space):
    """Positives, user negatives and test photos as dicts {p, f} -> test scores, threshold."""
    if variant == "features+weights":
        inputs = [F.normalize(pos["f"], dim=1), F.normalize(head_weight, dim=1)]
        labels = [torch.ones(len(pos["f"])), torch.zeros(len(head_weight))]
        weights = [torch.full((len(x),), 1 / len(x)) for x in inputs]
        w, b = _logistic(torch.cat(inputs), torch.cat(labels), torch.cat(weights))
        return torch.sigmoid(F.normalize(test["f"], dim=1) @ w + b), 0.5
    builtin = not variant.endswith("only")
    if variant.endswith("probabilities"):
        space = Space()
    if variant.endswith("without mid"):
        space = Space(space.center, space.directions)
    result = fit(examples(pos), examples(neg), space, builtin=builtin)
    weight = space.weight_of(result.weight, result.space)  # the head as served
    score = torch.sigmoid(space.inputs(examples(test)) @ weight + result.bias)
    return score, result.threshold


SCENE_VARIANTS = [("builtin", 0), ("builtin, without mid", 0), ("builtin, probabilities", 0),
                  ("user 10", 10), ("user 10, without mid", 10)]  # fmt: skip


def precision_recall_f1(hits: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """Of (N,) bool tags given and (N,) bool concept photos; precision 1 when nothing is tagged."""
    tp, fp = int((hits & truth).sum()), int((hits & ~truth).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / int(truth.sum())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def seen_space(photos: dict, center: torch.Tensor) -> torch.Tensor:
    """The "seen N" head's inputs: sqrt-probabilities and centred, normalised features."""
    return torch.cat([photos["p"].sqrt(), F.normalize(photos["f"] - center, dim=1)], 1)


def measure_seen(encoded, key: str, k: int, seen: int, repeats: int) -> list[float]:
    """Precision, recall and F1 of a tag taught from k positives of the set ``key`` against
    ``seen`` unlabelled photos, each group weighing half (L2 1e-2, threshold 0.5), tested on the
    rest."""
    results = []
    for seed in range(repeats):
        rng = random.Random(seed)
        order = list(range(len(encoded[key]["p"])))
        rng.shuffle(order)
        others = [v for name, v in encoded.items() if name != key and name not in SCENE_SETS]
        rest = {n: torch.cat([encoded[key][n][order[k:]], *(v[n] for v in others)]) for n in "pf"}
        is_concept = torch.zeros(len(rest["p"]), dtype=torch.bool)
        is_concept[: len(order) - k] = True
        shuffled = list(range(len(rest["p"])))
        rng.shuffle(shuffled)
        seen_idx, test_idx = torch.tensor(shuffled[:seen]), torch.tensor(shuffled[seen:])
        pos = {n: encoded[key][n][order[:k]] for n in "pf"}
        unlabelled = {n: rest[n][seen_idx] for n in "pf"}
        center = unlabelled["f"].mean(0)
        inputs = torch.cat([seen_space(pos, center), seen_space(unlabelled, center)])
        labels = torch.cat([torch.ones(k), torch.zeros(seen)])
        weights = torch.cat([torch.full((k,), 1 / k), torch.full((seen,), 1 / seen)])
        w, b = _logistic(inputs, labels, weights, l2=1e-2)
        test = {n: rest[n][test_idx] for n in "pf"}
        hits = torch.sigmoid(seen_space(test, center) @ w + b) >= 0.5
        results.append(precision_recall_f1(hits, is_concept[test_idx]))
    return [statistics.mean(r[i] for r in results) for i in range(3)]


def measure(encoded, key, k: int, variant: str, users: int, repeats: int, head_weight, space):
    results = []
    for seed in range(repeats):
        rng = random.Random(seed)
        order = list(range(len(encoded[key]["p"])))
        rng.shuffle(order)
        take = lambda d, idx: {n: d[n][idx] for n in "pfm"}  # noqa: E731
        pos = take(encoded[key], torch.tensor(order[:k]))
        test_pos = take(encoded[key], torch.tensor(order[k:]))
        others = [v for name, v in encoded.items() if name != key and name not in SCENE_SETS]
        pool = {n: torch.cat([v[n] for v in others]) for n in "pfm"}
        others = list(range(len(pool["p"])))
        rng.shuffle(others)
        neg = take(pool, torch.tensor(others[:users], dtype=torch.long))
        test_neg = take(pool, torch.tensor(others[users:]))
        test = {n: torch.cat([test_pos[n], test_neg[n]]) for n in "pfm"}
        scores, threshold = scores_of(variant, pos, neg, test, head_weight, space)
        truth = torch.arange(len(scores)) < len(test_pos["p"])  # the positives come first
        results.append(precision_recall_f1(scores >= threshold, truth))
    return [statistics.mean(r[i] for r in results) for i in range(3)]


def teaching_time(tagger: Tagger, paths: list[Path], negatives: list[Path], repeats: int) -> float:
    """Seconds for phototag teach's path: decode, one forward pass per 16 photos, fit, write."""
    times = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            pos, *_ = examples_of(tagger, paths)
            neg, *_ = examples_of(tagger, negatives)
            store = CustomTagStore(folder)
            teach(store, "bench", tagger.probabilities_version, tagger.space, f"t{i}", pos, neg)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def serving_cost(tagger: Tagger, encoded, batch: int, rounds: int) -> dict[str, float]:
    """Photos per second through Tagger.outputs (normalize, forward pass, custom heads) on a
    fixed batch, with 0 and with 20 custom tags."""
    crop = tagger.card.preprocess.crop
    pixels = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8)
    store = CustomTagStore(tempfile.mkdtemp())
    from model.custom_tags import CustomHeads

    tags = []
    version, space = tagger.probabilities_version, tagger.space
    for i in range(20):
        pos = examples(encoded["ants"])[i : i + 5]
        tags.append(teach(store, "m", version, space, f"tag-{i}", pos, pos[:0]))
    rates = {}
    for count in (0, 20, 0, 20):  # interleaved: drift on shared cores hits both alike
        tagger.custom_heads = CustomHeads.of(tags[:count], space)
        tagger.outputs(pixels)
        started = time.perf_counter()
        for _ in range(rounds):
            tagger.outputs(pixels)
        rate = batch * rounds / (time.perf_counter() - started)
        rates[count] = max(rates.get(count, 0.0), rate)
    tagger.custom_heads = CustomHeads(space)
    return {"0 tags": rates[0], "20 tags": rates[20]}


NEAR_COPIES = {"JPEG q50": (1.0, 50), "half size": (0.5, 90), "half size, q50": (0.5, 50)}


def suppression(tagger: Tagger, paths: list[Path], encoded) -> dict[str, float]:
    """A vocabulary tag marked wrong on a photo: on what share of its near copies is it
    suppressed (pooled features at least SUPPRESSION_SIMILARITY cosine-similar), and on what
    share of the other photos of the benchmark (every other one)?"""
    import io

    from PIL import Image

    from model.custom_tags import SUPPRESSION_SIMILARITY

    hits = {name: [] for name in NEAR_COPIES}
    others = []
    everything = F.normalize(torch.cat([v["f"] for v in encoded.values()]), dim=1)
    for path in paths:
        image = Image.open(path).convert("RGB")
        copies = []
        for scale, quality in NEAR_COPIES.values():
            buffer = io.BytesIO()
            size = (int(image.width * scale), int(image.height * scale))
            image.resize(size).save(buffer, "JPEG", quality=quality)
            copies.append(tagger.pixels(buffer.getvalue()))
        pixels = torch.stack([tagger.pixels(path.read_bytes()), *copies])
        features = F.normalize(tagger.outputs(pixels).features, dim=1)
        for name, copy in zip(NEAR_COPIES, features[1:], strict=True):
            hits[name].append(float(features[0] @ copy) >= SUPPRESSION_SIMILARITY)
        similar = (everything @ features[0] >= SUPPRESSION_SIMILARITY).sum() - 1  # not itself
        others.append(int(similar) / (len(everything) - 1))
    result = {name: statistics.mean(v) for name, v in hits.items()}
    result["other photos"] = statistics.mean(others)
    return result


def heads_cost(tagger: Tagger, batch: int, rounds: int = 2000) -> float:
    """Milliseconds of 20 custom heads on a batch: the inputs, the (B, D) @ (D, 20) multiply and
    the sigmoid."""
    from model.custom_tags import CustomHeads, CustomTag

    space = tagger.space
    widths = space.widths(len(tagger.classes))  # classes, then the features' parts it has
    tags = [CustomTag.new(f"t{i}", "v", len(tagger.classes)) for i in range(20)]
    for tag in tags:
        tag.weight, tag.space = torch.randn(sum(widths)), space.name
    heads = CustomHeads.of(tags, space)
    assert len(heads) == 20
    num_features, num_mid = [*widths[1:], 0, 0][:2]  # 0: a part this space does not have
    probabilities = torch.softmax(torch.randn(batch, widths[0]), 1)
    photos = Examples(probabilities, torch.rand(batch, num_features), torch.rand(batch, num_mid))
    started = time.perf_counter()
    for _ in range(rounds):
        heads.probabilities(photos)
    return (time.perf_counter() - started) / rounds * 1000


def report_scenes(encoded: dict, space: Space, repeats: int) -> None:
    if "coco" not in encoded:
        print("\nscenes: skipped (needs ../shared/data/coco-dev)")
        return
    pool, labels = scene_pool(encoded)
    print("\n| scene | photos | k | negatives | precision | recall | F1 |")
    print("|---|---|---|---|---|---|---|")
    for scene, truth in labels.items():
        for variant, users in SCENE_VARIANTS:
            p, r, f = measure_scene(pool, truth, 10, variant, users, repeats, space)
            row = f"| {scene} | {int(truth.sum())} | 10 | {variant} | {p:.3f} | {r:.3f} | {f:.3f} |"
            print(row, flush=True)
    print("\nwhat the features allow: a head on four fifths of the pool's labels, 5 folds")
    print(
        "| scene | photos | F1 at 0.5 | F1 at the best threshold in hindsight |\n|---|---|---|---|"
    )
    for scene, truth in labels.items():
        at_half, best = scene_ceiling(pool, truth, space)
        print(f"| {scene} | {int(truth.sum())} | {at_half:.3f} | {best:.3f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--cache", type=Path, help="keep the encoded photos in this file")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cifar-per-class", type=int, default=100)
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--quality-only", action="store_true", help="the precision/recall table, no timings"
    )
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"needs the photo sets in {DATA}", file=sys.stderr)
        return 2
    if not args.checkpoint.exists():
        from model.pretrained import build_default_checkpoint

        build_default_checkpoint(args.checkpoint)
    tagger = Tagger.load(args.checkpoint, RuntimeChoice.resolve("cpu", args.backend))
    sets = photo_sets(args.cifar_per_class)
    encoded = encode(tagger, sets, args.cache)
    from model.checkpoint import load

    head_weight = load(args.checkpoint).state_dict["head.1.weight"]
    print(
        f"backend {tagger.backend}; test pool: "
        + ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    )
    print("\n| concept | k | negatives | precision | recall | F1 |\n|---|---|---|---|---|---|")
    variants = [("builtin", 0), ("builtin, without mid", 0), ("builtin, probabilities", 0)]
    variants += [("user 10", 10), ("user 10, without mid", 10), ("user 20", 20)]
    variants += [("user 20 only", 20), ("features+weights", 0)]
    for concept in CONCEPTS:
        key, view, space = concept_view(encoded, concept, tagger.classes, tagger.space)
        for k in (5, 10, 20):
            if len(view[key]["p"]) - k < 5:
                continue  # too few photos left to test on
            for variant, users in variants:
                p, r, f = measure(view, key, k, variant, users, args.repeats, head_weight, space)
                print(f"| {concept} | {k} | {variant} | {p:.3f} | {r:.3f} | {f:.3f} |", flush=True)
            for seen in (300, 600):
                p, r, f = measure_seen(view, key, k, seen, args.repeats)
                row = f"| {concept} | {k} | seen {seen} | {p:.3f} | {r:.3f} | {f:.3f} |"
                print(row, flush=True)
    report_scenes(encoded, tagger.space, args.repeats)
    if args.quality_only:
        return 0
    ants = sets["ants"]
    for k in (5, 10, 20):
        seconds = teaching_time(tagger, ants[:k], [], 3)
        print(f"\nteaching from {k} photos (decode + forward + fit + write): {seconds:.2f} s")
    seconds = teaching_time(tagger, ants[:10], sets["bees"][:10], 3)
    print(f"teaching from 10 positives + 10 negatives: {seconds:.2f} s")
    cost = serving_cost(tagger, encoded, batch=8, rounds=30)
    print(
        f"\nTagger.outputs, batches of 8: {cost['0 tags']:.1f} photos/s with 0 custom tags, "
        f"{cost['20 tags']:.1f} with 20 ({100 * (1 - cost['20 tags'] / cost['0 tags']):+.1f}% cost)"
    )
    print(f"20 custom heads alone, batch of 8: {heads_cost(tagger, 8):.3f} ms")
    result = suppression(tagger, ants[:40] + sets["kitchen"][:10], encoded)
    print("\ncorrections (a tag marked wrong on a photo is suppressed on):")
    for name, share in result.items():
        print(f"  {name}: {100 * share:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
