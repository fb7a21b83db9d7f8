"""Tags on the photos people take: how many right tags the served pipeline gives real everyday
photos, judged against what is in them.

    .venv/bin/python bench/tags_bench.py                  # the server's defaults
    .venv/bin/python bench/tags_bench.py --regions 0      # the whole photo only
    .venv/bin/python bench/tags_bench.py --show           # every photo's tags, right or wrong

Photos: ``../shared/data/coco-dev`` (100 COCO photos with the names of the things in them and of
the stuff covering at least 5% of each; skipped with a message where absent). Each photo goes
through the server's own steps (decode, the face detector, the classifier, the vocabulary, the
people tags) with ``POST /v1/tags``' defaults. The judge is ``bench/coco_words.json``: a
returned tag is right when its label is listed for one of the photo's COCO names, when it is a
category above such a tag ("animal" above "dog"), or when it is a people tag on a photo with
people. Reported: tags per photo, right tags per photo, precision (right / returned), the share
of photos with a right tag and with no tag at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import regions  # noqa: E402
from model.people import PEOPLE  # noqa: E402
from model.vocabulary import Vocabulary  # noqa: E402

WORDS = REPO / "bench" / "coco_words.json"
COCO = REPO.parent / "shared" / "data" / "coco-dev"


@dataclass(frozen=True)
class Judged:
    file: str
    tags: list[tuple[str, tuple[str, ...], bool]]  # label, path, right

    @property
    def right(self) -> int:
        return sum(ok for *_, ok in self.tags)


class Judge:
    """Which tags are right for a coco-dev photo (see the module's docstring)."""

    def __init__(self, vocabulary: Vocabulary | None, words: Path = WORDS) -> None:
        data = json.loads(words.read_text())
        self.words = {**data["things"], **data["stuff"]}
        self.paths: dict[str, list[tuple[str, ...]]] = {}
        for tag in vocabulary.tags if vocabulary else []:
            self.paths.setdefault(tag.label, []).append(tuple(tag.path))

    def right_for(self, row: dict) -> tuple[set[str], set[tuple[str, ...]]]:
        """The right labels of a photo, and the categories above them (paths)."""
        labels = {w for name in row["things"] + row["stuff"] for w in self.words.get(name, [])}
        above = {
            path[:i]
            for label in labels
            for path in self.paths.get(label, [])
            for i in range(1, len(path))
        }
        return labels, above

    def judge(self, row: dict, tags: list) -> Judged:
        labels, above = self.right_for(row)
        verdicts = []
        for tag in tags:
            path = tuple(tag.path or (tag.label,))
            ok = tag.label in labels or path in above or (path[0] == PEOPLE and row["people"] > 0)
            verdicts.append((tag.label, path, ok))
        return Judged(row["file"], verdicts)


def coco_rows() -> list[dict] | None:
    manifest = COCO / "manifest.jsonl"
    if not manifest.is_file():
        return None
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def summary(judged: list[Judged]) -> dict[str, float]:
    photos = len(judged)
    returned = sum(len(j.tags) for j in judged)
    right = sum(j.right for j in judged)
    return {
        "photos": photos,
        "tags_per_photo": returned / photos,
        "right_per_photo": right / photos,
        "precision": right / returned if returned else float("nan"),
        "with_a_right_tag": sum(j.right > 0 for j in judged) / photos,
        "without_tags": sum(not j.tags for j in judged) / photos,
    }


def line(name: str, s: dict[str, float]) -> str:
    return (
        f"| {name} | {s['photos']} | {s['tags_per_photo']:.2f} | {s['right_per_photo']:.2f} | "
        f"{s['precision']:.3f} | {s['with_a_right_tag']:.0%} | {s['without_tags']:.0%} |"
    )


HEADER = (
    "| photos | n | tags per photo | right tags per photo | precision | with a right tag | "
    "without tags |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def main(argv: list[str] | None = None) -> int:
    from model.people import FaceDetector
    from model.runtime import RuntimeChoice
    from model.tagger import Tagger

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "bench" / "out" / "default.safetensors"
    )
    parser.add_argument("--regions", type=int, default=regions.DEFAULT, help="as served: 4 or 0")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--show", action="store_true", help="print every photo's tags")
    args = parser.parse_args(argv)
    rows = coco_rows()
    if rows is None:
        print(f"skipped: no coco-dev under {COCO}")
        return 0
    if not args.checkpoint.exists():
        from model.pretrained import build_default_checkpoint

        build_default_checkpoint(args.checkpoint)
    choice = RuntimeChoice.resolve()
    tagger = Tagger.load(args.checkpoint, choice, FaceDetector.load(choice), args.regions)
    judge = Judge(tagger.vocabulary)
    judged = []
    for row in rows:
        tags = tagger.tag((COCO / row["file"]).read_bytes(), args.top_k)
        judged.append(judge.judge(row, tags))
        if args.show:
            tags = judged[-1].tags
            shown = ", ".join(f"{label}{'' if ok else ' (wrong)'}" for label, _, ok in tags)
            print(f"{row['file']} {row['things'] + row['stuff']}: {shown or '(no tag)'}")
    wrong = Counter(label for j in judged for label, _, ok in j.tags if not ok)
    print(HEADER)
    print(line("coco-dev", summary(judged)))
    print(f"\nmost frequent wrong tags: {dict(wrong.most_common(12))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
