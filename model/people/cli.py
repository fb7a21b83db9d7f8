"""``phototag people``: the names a server (or ``phototag tag``) gives faces, taught offline.

    phototag people add Alice photos/alice1.jpg photos/alice2.jpg
    phototag people add Alice group.jpg --box 170,52,282,188   # her face among several
    phototag people list
    phototag people remove Alice      # deletes her file, every face descriptor in it
    phototag people suggest results.jsonl   # faces nobody named yet, grouped by person

The names live in ``names/`` beside the checkpoint (the server's default too:
PHOTOTAG_NAMES_DIR); a running server on the folder sees a name taught or removed here at its
next photo with a face.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from model.imageio import open_rgb
from model.people.names import Embedder, Namer, NamesError, NameStore, default_names_dir

DEFAULT_CHECKPOINT = Path("checkpoints/default.safetensors")


def store_dir(names_dir: Path | None, checkpoint: Path) -> Path:
    """--names-dir, else $PHOTOTAG_NAMES_DIR, else names/ beside the checkpoint (the server's
    rule)."""
    if names_dir is not None:
        return names_dir
    if os.environ.get("PHOTOTAG_NAMES_DIR"):
        return Path(os.environ["PHOTOTAG_NAMES_DIR"])
    return default_names_dir(checkpoint.parent)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: x0,y0,x1,y1 in the photo's pixels") from None
    if not (x0 < x1 and y0 < y1):
        raise argparse.ArgumentTypeError(f"{text!r}: x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def add(store: NameStore, name: str, photos: Sequence[Path], box, device: str) -> int:
    """Teach ``name`` from every photo (each showing one face, or ``box`` picking it); nothing
    is added unless every photo gives a face."""
    from model.people.detector import FaceDetector
    from model.runtime import RuntimeChoice

    choice = RuntimeChoice.resolve(device)
    detector = FaceDetector.load(choice)
    namer = Namer(Embedder.load(choice), store)
    descriptors = []
    for photo in photos:
        try:
            descriptors.append(namer.example(detector, open_rgb(str(photo)), box))
        except NamesError as exc:
            print(f"phototag people: {photo}: {exc.message}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"phototag people: {photo}: cannot read it ({exc})", file=sys.stderr)
            return 1
    count = store.add(name, torch.cat(descriptors))
    print(f"{name}: {count} example faces -> {store.path(name)}")
    return 0


def unnamed_faces(rows) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(photo path, box) of every face a ``phototag tag --names on`` run left unnamed."""
    return [
        (row["path"], tuple(face["box"]))
        for row in rows
        for face in row.get("faces") or ()
        if face.get("name") is None
    ]


def suggest(results: Path, min_size: int, samples: int, device: str) -> int:
    """Group the unnamed faces of a results file and print each group with sample photos and
    the command that names it. The faces' descriptors are computed again from the photos here
    (results files hold none) and kept nowhere."""
    from model.library.cli import rows_of
    from model.people.detector import FaceDetector
    from model.people.names import group, nameable, overlap
    from model.runtime import RuntimeChoice

    faces = unnamed_faces(rows_of(results))
    choice = RuntimeChoice.resolve(device)
    detector, embedder = FaceDetector.load(choice), Embedder.load(choice)
    found, descriptors = [], []
    for path, box in faces:
        try:
            image = open_rgb(path)
        except OSError as exc:
            print(f"phototag people: skipped {path}: {exc}", file=sys.stderr)
            continue
        best = max(detector.detect(image), key=lambda f: overlap(f.box, box), default=None)
        if best is None or overlap(best.box, box) < 0.5:  # the photo changed since the run
            continue
        if not nameable(best):  # what `people add` would refuse to learn from
            continue
        found.append((path, box))
        descriptors.append(embedder.embed(image, [best]))
    if not descriptors:
        print("no unnamed faces")
        return 0
    groups = [g for g in group(torch.cat(descriptors)) if len(g) >= min_size]
    for number, members in enumerate(groups, 1):
        print(f"group {number}: {len(members)} faces")
        for i in members[:samples]:
            print(f"  {found[i][0]}")
        path, box = found[members[0]]
        where = ",".join(f"{v:.0f}" for v in box)
        print(f"  name them: phototag people add NAME '{path}' --box {where}")
    if not groups:
        print(f"no group of {min_size} or more faces of one person")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phototag people",
        description="Teach, list and forget the names given to faces (PHOTOTAG_NAMES=on).",
    )
    p.add_argument("--names-dir", type=Path, help="the names folder (default: "
                   "$PHOTOTAG_NAMES_DIR, else names/ beside --checkpoint)")  # fmt: skip
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    commands = p.add_subparsers(dest="command", required=True)
    teach = commands.add_parser("add", help="teach a name from photos of the person's face")
    teach.add_argument("name", help="letters, digits, - and _ (e.g. Alice)")
    teach.add_argument("photos", nargs="+", type=Path, help="photos, each showing one face")
    teach.add_argument("--box", type=parse_box, help="x0,y0,x1,y1: the face, in one photo")
    teach.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    commands.add_parser("list", help="the names taught, with their example counts")
    forget = commands.add_parser("remove", help="forget a name: its file is deleted")
    forget.add_argument("name")
    hint = commands.add_parser(
        "suggest", help="group the faces a phototag tag --names on run left unnamed"
    )
    hint.add_argument("results", type=Path, help="the run's --out file (.jsonl or .parquet)")
    hint.add_argument("--min-size", type=int, default=2, help="smallest group listed")
    hint.add_argument("--samples", type=int, default=3, help="photos listed per group")
    hint.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = NameStore(store_dir(args.names_dir, args.checkpoint))
    try:
        if args.command == "add":
            if args.box is not None and len(args.photos) > 1:
                print("phototag people: --box picks a face in one photo", file=sys.stderr)
                return 2
            return add(store, args.name, args.photos, args.box, args.device)
        if args.command == "suggest":
            return suggest(args.results, args.min_size, args.samples, args.device)
        if args.command == "list":
            for name, count in store.counts().items():
                print(f"{name}\t{count}")
            return 0
        store.remove(args.name)
        print(f"forgot {args.name}: deleted {store.path(args.name)}")
        return 0
    except NamesError as exc:
        print(f"phototag people: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "invalid_name" else 1


if __name__ == "__main__":
    sys.exit(main())
