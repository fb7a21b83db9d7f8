"""Teaching custom tags, for every caller: the server's routes and ``phototag teach``.

    phototag teach shrek --positive photos/shrek/ [--negative photos/not-shrek/]
    phototag teach --list
    phototag teach --forget shrek
    phototag teach --refit          # re-teach the stale tags from their photos' paths (and
                                    # those kept without the features the model now reads)

The tags of a checkpoint ``X.safetensors`` live in ``custom-tags/X/`` beside it (the server's
default too: PHOTOTAG_CUSTOM_TAGS_DIR), so a tag taught here is served after the next restart,
and ``phototag tag`` (library tagging, through :class:`model.tagger.Tagger`) writes it too.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.custom_tags import (
    CustomHeads,
    CustomTag,
    CustomTagError,
    CustomTagStore,
    Examples,
    Space,
    check_name,
)
from model.imageio import PhotoError

STORE_FOLDER = "custom-tags"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic"}
BATCH = 16


def default_store_dir(models_folder: Path) -> Path:
    """Where the tags of the models in ``models_folder`` are kept by default."""
    return Path(models_folder) / STORE_FOLDER


@dataclass(frozen=True)
class Limits:
    max_examples: int = 1000  # per tag, positive and negative
    max_tags: int = 100  # per model


def teach(
    store: CustomTagStore,
    model_id: str,
    backbone: str,
    space: Space,
    name: str,
    positives: Examples,
    negatives: Examples,
    *,
    limits: Limits = Limits(),
    positive_sources: Sequence[str | None] = (),
    negative_sources: Sequence[str | None] = (),
) -> CustomTag:
    """Add examples to tag ``name`` of a model, creating it, re-fit it in ``space`` and write
    it; return it. Raises :class:`CustomTagError` (``stale_tag``, ``limit_reached``,
    ``no_positives``, ``invalid_tag_name``) and leaves the file as it was."""
    check_name(name)
    some = positives if len(positives) else negatives
    if store.exists(model_id, name):
        tag = store.load(model_id, name)
        if tag.stale(backbone):
            raise CustomTagError(
                "stale_tag",
                f"custom tag {name!r} was taught on another version of the model ({tag.backbone}; "
                f"now {backbone}): its examples must be read again. Delete it and teach it "
                f"again from its photos (phototag teach --refit re-reads the photos it taught)",
            )
    else:
        if len(store.names(model_id)) >= limits.max_tags:
            raise CustomTagError(
                "limit_reached",
                f"model {model_id!r} has {limits.max_tags} custom tags already "
                "(PHOTOTAG_MAX_CUSTOM_TAGS); delete one first",
            )
        widths = (some.probabilities.shape[1], some.features.shape[1], some.mid.shape[1])
        tag = CustomTag.new(name, backbone, *widths)
    total = len(tag.positives) + len(tag.negatives) + len(positives) + len(negatives)
    if total > limits.max_examples:
        raise CustomTagError(
            "limit_reached",
            f"custom tag {name!r} would have {total} examples; at most {limits.max_examples} "
            "(PHOTOTAG_MAX_TAG_EXAMPLES)",
        )
    tag.add(
        positives,
        negatives,
        positive_sources=positive_sources,
        negative_sources=negative_sources,
    )
    tag.refit(space)
    store.save(model_id, tag)
    return tag


def serve_tags(store: CustomTagStore, model_id: str, tagger) -> list[CustomTag]:
    """Put a model's stored tags (those of its current backbone) and corrections on
    ``tagger``; return every stored tag, stale ones included."""
    tags = store.load_all(model_id)
    backbone = tagger.probabilities_version
    tagger.custom_heads = CustomHeads.of([t for t in tags if not t.stale(backbone)], tagger.space)
    tagger.suppressions = store.load_suppressions(model_id, backbone)
    return tags


# ---- offline: photos on disk


def photo_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CustomTagError("not_a_folder", f"{folder} is not a folder of photos")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()
    )


def examples_of(tagger, paths: Iterable[Path]) -> tuple[Examples, list[str], list[str]]:
    """Photos on disk -> their :class:`Examples`, the paths read and those skipped
    (unreadable, with why)."""
    scores, read, skipped = [], [], []
    batch: list[torch.Tensor] = []
    names: list[str] = []

    def flush() -> None:
        if batch:
            scores.append(tagger.outputs(torch.stack(batch)))
            read.extend(names)
            batch.clear()
            names.clear()

    for path in paths:
        try:
            batch.append(tagger.pixels(path.read_bytes()))
            names.append(str(path.resolve()))
        except (PhotoError, OSError) as exc:
            skipped.append(f"{path}: {getattr(exc, 'message', exc)}")
        if len(batch) == BATCH:
            flush()
    flush()
    found = Examples.of(scores) if scores else Examples.empty(len(tagger.classes))
    return found, read, skipped


def _describe(tag: CustomTag, backbone: str) -> str:
    info = tag.info(backbone)
    estimate = info["estimate"]
    precision = estimate["precision"]
    precision_text = "n/a (needs 2 negatives)" if precision is None else f"{precision:.2f}"
    recall = "n/a" if estimate["recall"] is None else f"{estimate['recall']:.2f}"
    state = " STALE (phototag teach --refit)" if info["stale"] else ""
    return (
        f"{tag.name}: {info['positives']} positives, {info['negatives']} negatives, threshold "
        f"{tag.threshold:.2f}, estimated precision {precision_text}, recall {recall}, reads "
        f"{tag.space}{state}"
    )


def _refit(store: CustomTagStore, model_id: str, tagger, names: list[str]) -> int:
    """Read again the photos of each tag (of ``names``, or all) that is not current: stale, or
    kept without the features the model's heads read. The new tag replaces the old in one
    atomic write once it is fitted; a served tag whose photos cannot all be read is left as it
    is. Returns how many could not be read again."""
    failed = 0
    version, space = tagger.probabilities_version, tagger.space
    for tag in store.load_all(model_id):
        if names and tag.name not in names:
            continue
        if tag.current(version, space):
            print(f"{tag.name}: up to date")
            continue
        stale = tag.stale(version)
        if None in tag.sources or len(tag.sources) != len(tag.positives) + len(tag.negatives):
            why = "some of its photos came by upload and were not kept; teach it again from them"
            if stale:
                print(f"{tag.name}: {why}", file=sys.stderr)
                failed += 1
            else:
                print(f"{tag.name}: served in its space, {tag.space} ({why})")
            continue
        pos_paths = [Path(p) for p in tag.sources[: len(tag.positives)]]
        neg_paths = [Path(p) for p in tag.sources[len(tag.positives) :]]
        positives, pos_read, skipped = examples_of(tagger, pos_paths)
        negatives, neg_read, more = examples_of(tagger, neg_paths)
        for line in skipped + more:
            print(f"skipped {line}", file=sys.stderr)
        fresh = CustomTag.new(tag.name, version, len(tagger.classes))
        fresh.created_at = tag.created_at
        fresh.add(positives, negatives, positive_sources=pos_read, negative_sources=neg_read)
        problem = f"{len(skipped + more)} photos unreadable" if not stale and skipped + more else ""
        if not problem:
            try:
                fresh.refit(space)
            except CustomTagError as exc:
                problem = exc.message
        if problem:
            print(f"{tag.name}: left as it is: {problem}", file=sys.stderr)
            failed += 1
            continue
        store.save(model_id, fresh)
        print(_describe(fresh, version))
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phototag teach",
        description="Teach a custom tag from example photos (or list, forget, re-fit them). "
        "The tag is served by the server for the same model, and written by library tagging.",
    )
    parser.add_argument("name", nargs="?", help="the tag: lower-case letters, digits, - and _")
    parser.add_argument("--positive", type=Path, help="a folder of photos that have the tag")
    parser.add_argument("--negative", type=Path, help="a folder of photos that do not")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("checkpoints/default.safetensors"),
        help="the model whose tag it is (default: %(default)s)",
    )
    parser.add_argument(
        "--tags-dir",
        type=Path,
        help="the custom tags folder (default: custom-tags/ beside the checkpoint, as the "
        "server's PHOTOTAG_CUSTOM_TAGS_DIR)",
    )
    parser.add_argument("--model-id", help="the model's id (default: the checkpoint's file stem)")
    parser.add_argument("--list", action="store_true", help="list the model's custom tags")
    parser.add_argument("--forget", action="store_true", help="delete the tag NAME")
    parser.add_argument(
        "--refit",
        action="store_true",
        help="re-read the photos of stale tags (NAME, or all) after the model changed, and of "
        "tags kept without the pooled features the model's heads now read",
    )
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    args = parser.parse_args(argv)
    store = CustomTagStore(args.tags_dir or default_store_dir(args.checkpoint.parent))
    model_id = args.model_id or args.checkpoint.stem
    try:
        if args.name is not None:
            check_name(args.name)
        if args.forget:
            if not args.name:
                parser.error("--forget needs the tag's NAME")
            store.delete(model_id, args.name)
            print(f"forgot {args.name}")
            return 0
        from model.checkpoint import CheckpointError
        from model.runtime import ConfigError, RuntimeChoice
        from model.tagger import Tagger

        try:
            tagger = Tagger.load(args.checkpoint, RuntimeChoice.resolve(args.device))
        except (CheckpointError, ConfigError) as exc:
            print(f"phototag teach: {exc}", file=sys.stderr)
            return 2
        backbone = tagger.probabilities_version
        if args.list:
            for tag in store.load_all(model_id):
                print(_describe(tag, backbone))
            return 0
        if args.refit:
            return 1 if _refit(store, model_id, tagger, [args.name] if args.name else []) else 0
        if not args.name or not (args.positive or args.negative):
            parser.error("give the tag's NAME and --positive DIR (and/or --negative DIR)")
        started = time.perf_counter()
        pos_files = photo_files(args.positive) if args.positive else []
        neg_files = photo_files(args.negative) if args.negative else []
        positives, pos_read, skipped = examples_of(tagger, pos_files)
        negatives, neg_read, more = examples_of(tagger, neg_files)
        for line in skipped + more:
            print(f"skipped {line}", file=sys.stderr)
        tag = teach(
            store, model_id, backbone, tagger.space, args.name, positives, negatives,
            positive_sources=pos_read, negative_sources=neg_read,
        )  # fmt: skip
        print(_describe(tag, backbone))
        print(
            f"taught from {len(pos_read)} + {len(neg_read)} photos in "
            f"{time.perf_counter() - started:.1f} s -> {store.path(model_id, tag.name)}"
        )
        return 0
    except CustomTagError as exc:
        print(f"phototag teach: {exc.message}", file=sys.stderr)
        return 2 if exc.code in ("invalid_tag_name", "not_a_folder", "unknown_tag") else 1


if __name__ == "__main__":
    sys.exit(main())
