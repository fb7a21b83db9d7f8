"""``phototag tag PATH...``: tag a photo library, keep the tags in XMP sidecars and a results file.

    phototag tag ~/Pictures                         sidecars beside the photos (new photos only)
    phototag tag ~/Pictures --out tags.parquet      ... and one row per photo in a file
    phototag tag ~/Pictures --mode all              retag every photo (another model, say)
    phototag tag ~/Pictures --mode remove           take the machine tags out again
    phototag tag ~/Pictures --server http://nas:8000    tag with a running phototag server
    phototag tag /mnt/photos --engine ray --address ray://head:10001   on a Ray cluster

Interrupted (Ctrl-C, kill -9, a crash)? Run the same command again: it continues where it
stopped. Exit status: 0 done (photos that could not be tagged are listed, and in --out), 1 the
run failed or was interrupted, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model import regions
from model.labels import ENGLISH, Labels, LabelsError
from model.library import xmp
from model.library.journal import Journal, JournalBusy
from model.library.tagging import (
    FAILED,
    NOT_A_PHOTO,
    REMOVED,
    TAGGED,
    TaggingOptions,
)
from model.library.walk import Candidate, walk
from model.tagger import DEFAULT_MAX_PIXELS, DEFAULT_REDUCING_GAP

log = logging.getLogger("phototag.library")

DEFAULT_CHECKPOINT = "checkpoints/default.safetensors"
LOG_EVERY_S = 10.0  # a plain progress line this often when stderr is no terminal


def env(name: str, default: str | None) -> str | None:
    """A ``PHOTOTAG_*`` variable the server reads too, so both tag alike by default."""
    return os.environ.get(f"PHOTOTAG_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phototag tag",
        description="Tag every photo under PATH (folders are walked recursively; photos are "
        "recognised by their bytes) and write the tags to XMP sidecars the photo apps read, "
        "and/or one row per photo to --out. Rerun the same command to resume.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="photo files or folders")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        type=Path,
        default=Path(env("CHECKPOINT", DEFAULT_CHECKPOINT)),
        help="the model to tag with (default: $PHOTOTAG_CHECKPOINT or %(default)s)",
    )
    source.add_argument(
        "--server", metavar="URL", help="tag with a running phototag server instead"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("PHOTOTAG_API_KEY"),
        help="the server's API key (default: $PHOTOTAG_API_KEY)",
    )
    out = p.add_argument_group("where the tags go")
    out.add_argument("--out", type=Path, help="results file: .jsonl (JSON Lines) or .parquet")
    out.add_argument(
        "--xmp",
        choices=["sidecar", "embed", "none"],
        default="sidecar",
        help="sidecar (default): photo.jpg.xmp beside each photo (an existing photo.xmp is "
        "updated instead); embed: into the JPEG/TIFF/PNG/WebP/HEIC file itself (the photo "
        "changes!); none: only --out",
    )
    out.add_argument(
        "--root",
        default=xmp.DEFAULT_ROOT,
        help="the keyword every machine tag sits under (default: %(default)s)",
    )
    out.add_argument(
        "--mode",
        choices=["new", "all", "remove"],
        default="new",
        help="new (default): photos not yet tagged this way, or changed since; all: every "
        "photo again; remove: take the machine tags out of the XMP",
    )
    out.add_argument(
        "--journal",
        type=Path,
        help="the resume journal (default: OUT.journal with --out, else "
        ".phototag-journal.jsonl in the first PATH)",
    )
    tags = p.add_argument_group("tags (as POST /v1/tags)")
    tags.add_argument("--top-k", type=int, default=int(env("DEFAULT_TOP_K", "5")))
    tags.add_argument("--threshold", type=float, help="default: each tag's own threshold")
    tags.add_argument(
        "--people",
        choices=["on", "off"],
        default=env("PEOPLE", "on"),
        help="people tags from the face detector (default: $PHOTOTAG_PEOPLE or on)",
    )
    tags.add_argument(
        "--names",
        choices=["on", "off"],
        default=env("NAMES", "off"),
        help="name the faces of people taught with phototag people add (people/<name> "
        "keywords, MWG face regions; needs --people on; default: $PHOTOTAG_NAMES or off)",
    )
    tags.add_argument(
        "--names-dir",
        type=Path,
        default=env("NAMES_DIR", None),
        help="the names folder (default: $PHOTOTAG_NAMES_DIR, else names/ beside the checkpoint)",
    )
    tags.add_argument(
        "--regions",
        type=int,
        choices=[0, 4],
        default=int(env("REGIONS", str(regions.DEFAULT))),
        help="parts of each photo tagged beside the whole: 4 or 0 (default: $PHOTOTAG_REGIONS "
        "or 4)",
    )
    tags.add_argument(
        "--custom-tags",
        type=Path,
        default=env("CUSTOM_TAGS_DIR", None),
        help="the custom tags taught with phototag teach to tag with too (default: "
        "$PHOTOTAG_CUSTOM_TAGS_DIR, else custom-tags/ beside the checkpoint, if it exists)",
    )
    tags.add_argument(
        "--lang",
        default=env("LANG", None),
        help="the language of the keywords and --out's labels: en, de, fr, es, it, pt, nl, pl, "
        "ja, zh, ko, or one from --labels-dir (default: $PHOTOTAG_LANG or en); tag paths stay "
        "in English in --out",
    )
    tags.add_argument(
        "--labels-dir",
        type=Path,
        default=env("LABELS_DIR", None),
        help="a folder of label files that change or add labels, as the server's (default: "
        "$PHOTOTAG_LABELS_DIR)",
    )
    tags.add_argument(
        "--explain",
        type=Path,
        metavar="DIR",
        help="also write each photo's top tag's heatmap over it into DIR, for a review",
    )
    run = p.add_argument_group("how it runs")
    run.add_argument("--engine", choices=["local", "ray"], default="local")
    run.add_argument("--address", help="Ray: the cluster (default: start a local Ray)")
    run.add_argument("--workers", type=int, default=1, help="Ray: tagging actors (default: 1)")
    run.add_argument(
        "--worker-cpus", type=float, default=1.0, help="Ray: CPUs each actor reserves (default: 1)"
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="photos per forward pass (default: 8 on a CPU, 32 on a GPU)",
    )
    run.add_argument(
        "--decode-threads",
        type=int,
        default=int(env("DECODE_THREADS", "0")),
        help="0: one per core, at most 8",
    )
    run.add_argument(
        "--max-pixels", type=int, default=int(env("MAX_PIXELS", str(DEFAULT_MAX_PIXELS)))
    )
    run.add_argument(
        "--jpeg-reducing-gap",
        type=float,
        default=float(env("JPEG_REDUCING_GAP", str(DEFAULT_REDUCING_GAP))),
    )
    run.add_argument("--device", default=env("DEVICE", "auto"))
    run.add_argument("--backend", default=env("BACKEND", "auto"))
    run.add_argument("--autocast", default=env("AUTOCAST", "auto"))
    run.add_argument("--torch-threads", type=int, default=int(env("TORCH_THREADS", "0")))
    run.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="auto (default): a bar on a terminal, a log line every 10 s otherwise",
    )
    return p


@dataclass
class Summary:
    tagged: int = 0
    failed: int = 0
    removed: int = 0
    not_photos: int = 0
    already: int = 0
    xmp_written: int = 0
    xmp_refused: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        done = self.tagged + self.failed + self.removed
        parts = [
            f"{self.tagged} tagged",
            f"{self.failed} could not be tagged" + (" (listed above)" if self.failed else ""),
            f"{self.not_photos} files not photos",
            f"{self.already} already done",
        ]
        if self.removed:
            parts.insert(0, f"{self.removed} untagged")
        if self.xmp_written or self.xmp_refused:
            parts.append(f"{self.xmp_written} XMP written")
            parts.append(f"{self.xmp_refused} XMP left untouched (listed above)")
        rate = done / seconds if seconds > 0 else 0.0
        return f"{', '.join(parts)}; {seconds:.1f} s, {rate:.1f} photos/s"


class Progress:
    """A bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, style: str) -> None:
        if style == "auto":
            style = "bar" if sys.stderr.isatty() else "log"
        self.style, self.total, self.done = style, total, 0
        self.started = self.logged = time.monotonic()
        self.bar = None
        if style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="file", dynamic_ncols=True, smoothing=0.1)

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.style == "log" and time.monotonic() - self.logged >= LOG_EVERY_S:
            self.logged = time.monotonic()
            rate = self.done / (self.logged - self.started)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info(
                "%d/%d files, %.1f files/s, ETA %s", self.done, self.total, rate, _duration(eta)
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


class Committer:
    """Writes each finished photo's XMP, then records the batch in the journal: a photo counts
    as done only once both are on disk. Every engine's rows come with English labels; here they
    get the run's language (``--lang``): each tag's ``label`` in it and its ``path_labels``,
    which the keywords are written with (its ``path`` stays the English id)."""

    def __init__(
        self, args: argparse.Namespace, journal: Journal, task: str, labels: Labels
    ) -> None:
        self.args, self.journal, self.task, self.labels = args, journal, task, labels
        self.summary = Summary()

    def commit(self, rows: list[dict]) -> int:
        record = []
        for row in rows:
            if row["status"] == NOT_A_PHOTO:
                self.summary.not_photos += 1
                continue
            if row["status"] == FAILED:
                self.summary.failed += 1
                log.warning(
                    "%s: %s: %s", row["path"], row["error"]["code"], row["error"]["message"]
                )
            else:
                row["tags"] = self._in_language(row["tags"])
                if self.args.xmp != "none":
                    self._write_xmp(row)
            self.summary.tagged += row["status"] == TAGGED
            self.summary.removed += row["status"] == REMOVED
            record.append(row)
        self.journal.record(record, self.task)
        return len(rows)

    def _in_language(self, tags: list[dict]) -> list[dict]:
        """Every row has ``path_labels`` (in English: the path), so the file has one schema."""
        language = self.args.lang or ENGLISH
        return [
            t
            | {
                "label": self.labels.label(t["path"], language),
                "path_labels": self.labels.path_labels(t["path"], language),
            }
            for t in tags
        ]

    def _write_xmp(self, row: dict) -> None:
        tags = None
        if row["status"] == TAGGED:
            model = f"{row['model']['name']} {row['model']['version']}"
            paths = (t.get("path_labels") or t["path"] for t in row["tags"])
            regions, dimensions = _regions(row)
            tags = xmp.machine_tags(paths, self.args.root, model, regions, dimensions)
        update = xmp.update_embedded if self.args.xmp == "embed" else xmp.update_sidecar
        try:
            row["xmp"] = update(row["path"], tags, self.args.root)
            self.summary.xmp_written += row["xmp"]["action"] != "none"
        except xmp.XmpError as exc:
            row["xmp"] = {"error": {"code": exc.code, "message": exc.message}}
            self.summary.xmp_refused += 1
            log.warning("%s: %s: %s", row["path"], exc.code, exc.message)


def _regions(row: dict) -> tuple[list[xmp.FaceRegion], tuple[int, int] | None]:
    """A row's named faces as MWG regions, and the photo's dimensions (none without names)."""
    if not row.get("faces") or not row.get("dimensions"):
        return [], None
    size = tuple(row["dimensions"])
    named = [f for f in row["faces"] if f.get("name")]
    return [xmp.FaceRegion.of(f["name"], f["box"], size) for f in named], size


def default_journal(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out.with_name(args.out.name + ".journal")
    first = Path(args.paths[0])
    return (first if first.is_dir() else first.parent) / ".phototag-journal.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return _run(args)
    except ConfigurationError as exc:
        print(f"phototag tag: {exc}", file=sys.stderr)
        return 2
    except (JournalBusy, OSError, RuntimeError) as exc:
        log.error("failed: %s", exc)
        return 1


class ConfigurationError(ValueError):
    pass


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a caller may have replaced it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """``phototag tag: ...`` lines on stderr."""
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("phototag tag: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _run(args: argparse.Namespace) -> int:
    labels = _labels(args)
    engine, model = _engine(args)
    task = _task(args, model, labels)
    journal = Journal(args.journal or default_journal(args))
    key = hashlib.sha256(
        json.dumps([args.mode, sorted(map(os.path.abspath, args.paths)), task]).encode()
    ).hexdigest()[:16]
    if journal.begin(key, args.mode):
        log.info("resuming the interrupted run recorded in %s", journal.path)
    committer = Committer(args, journal, task, labels)
    todo = _listing(args, journal, task, committer.summary)
    progress = Progress(len(todo), args.progress)
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for rows in engine(todo):
            progress.advance(committer.commit(rows))
        journal.end(key)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        if args.out is not None:
            from model.library.results import write_rows

            count = write_rows(journal.rows(), args.out)
            log.info("%d rows in %s", count, args.out)
        journal.close()
    log.info("%s", committer.summary.line())
    if interrupted:
        log.info("interrupted: run the same command again to continue")
        return 1
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _listing(args: argparse.Namespace, journal: Journal, task: str, summary: Summary) -> list:
    todo: list[Candidate] = []
    skip = {os.path.abspath(p) for p in (args.out,) if p is not None}
    stale: list[str] = []
    for candidate in walk(args.paths, stale):
        if candidate.path in skip:
            continue
        if journal.done(candidate, args.mode, task):
            summary.already += 1
        else:
            todo.append(candidate)
    for path in stale:  # this run holds the journal: no other phototag tag is writing them
        Path(path).unlink(missing_ok=True)
    return todo


def _task(args: argparse.Namespace, model: dict | None, labels: Labels) -> str:
    """What a finished row was made for: a change of any of these makes a photo new again (the
    language and its labels too; English, as before languages, adds nothing)."""
    if args.mode == "remove":
        return json.dumps(["remove", args.xmp, args.root])
    people = None if args.server else args.people
    custom = None if args.server else _custom_tag_names(args, model["id"])
    task = [model["version"], args.top_k, args.threshold, people, args.xmp, args.root, custom]
    if not args.server and args.names == "on":  # a newly taught face makes every photo new
        task.append(["names", _names_taught(args)])
    if not args.server and args.regions != 0:  # 0 was the only way before regions
        task.append(["regions", args.regions])
    language = args.lang or ENGLISH
    if language != ENGLISH:
        task.append([language, labels.digest(language)])
    return json.dumps(task)


def _labels(args: argparse.Namespace) -> Labels:
    """Every language's labels (the shipped ones, --labels-dir's over them), once --lang is
    known to be one of them."""
    try:
        labels = Labels.load(args.labels_dir)
    except LabelsError as exc:
        raise ConfigurationError(f"--labels-dir: {exc}") from None
    if args.lang is not None and args.lang not in labels:
        raise ConfigurationError(
            f"--lang {args.lang}: no labels in that language; use one of "
            f"{', '.join(labels.languages)}"
        )
    return labels


def _names_folder(args: argparse.Namespace) -> Path:
    from model.people.names import default_names_dir

    return args.names_dir or default_names_dir(args.checkpoint.resolve().parent)


def _names_taught(args: argparse.Namespace) -> dict[str, int]:
    from model.people.names import NameStore

    return NameStore(_names_folder(args)).counts()


def _custom_tag_names(args: argparse.Namespace, model_id: str) -> list[str]:
    """The custom tags a run tags with: a newly taught one makes every photo new again."""
    from model.custom_tags import CustomTagStore

    folder = _custom_tags(args)
    return CustomTagStore(folder).names(model_id) if folder else []


def _engine(args: argparse.Namespace):
    """The engine as a function of the candidates, and the model it tags with."""
    from model.library.engines import run_local, run_ray

    _check(args)
    batch_size = args.batch_size or 8
    threads = args.decode_threads or min(8, os.cpu_count() or 1)
    if args.mode == "remove":
        from model.library.tagging import Remover

        return (lambda todo: run_local(Remover(), todo, 64, threads)), None
    if args.server:
        from model.library.remote import RemoteTagger

        remote = RemoteTagger(args.server, args.top_k, args.threshold, args.api_key)
        return (lambda todo: run_local(remote, todo, batch_size, threads)), remote.model()
    options = _options(args)
    if args.engine == "ray":
        from model.checkpoint import load

        model = _model_ref(args.checkpoint, load(args.checkpoint))
        return (
            lambda todo: run_ray(
                asdict(options), todo, batch_size, args.address, args.workers, args.worker_cpus
            )
        ), model
    tagger = _load_tagger(options)
    if not args.batch_size and tagger.tagger.device.type == "cuda":
        batch_size = 32
    return (lambda todo: run_local(tagger, todo, batch_size, threads)), tagger.model


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 0 or args.decode_threads < 0 or args.workers < 1:
        raise ConfigurationError("--batch-size, --decode-threads: 0 or more; --workers: 1 or more")
    if args.xmp == "none" and args.out is None and args.mode != "remove":
        raise ConfigurationError("--xmp none needs --out: the tags must go somewhere")
    if args.mode != "remove" and not args.server and not args.checkpoint.is_file():
        raise ConfigurationError(
            f"checkpoint not found: {args.checkpoint} (build the default one with "
            f"`python -m model.pretrained --out {args.checkpoint}`)"
        )
    if args.xmp != "none":
        try:
            xmp.available()
        except RuntimeError as exc:
            raise ConfigurationError(str(exc)) from None
    if args.engine == "ray" and args.server:
        raise ConfigurationError("--engine ray tags with a checkpoint, not --server")
    if args.explain and args.server:
        raise ConfigurationError("--explain draws with a checkpoint's network, not --server")
    if args.names == "on" and (args.people != "on" or args.server):
        raise ConfigurationError(
            "--names on names the faces the detector finds on this machine: it needs --people "
            "on and no --server"
        )


def _custom_tags(args: argparse.Namespace) -> str | None:
    """The custom-tag store the server would read for this checkpoint, when there is one."""
    from model.teach import default_store_dir

    folder = args.custom_tags or default_store_dir(args.checkpoint.resolve().parent)
    return str(folder) if Path(folder).is_dir() else None


def _options(args: argparse.Namespace) -> TaggingOptions:
    try:
        return TaggingOptions(
            checkpoint=str(args.checkpoint.resolve()),
            top_k=args.top_k,
            threshold=args.threshold,
            people=args.people == "on",
            regions=args.regions,
            custom_tags=_custom_tags(args),
            names=str(_names_folder(args)) if args.names == "on" else None,
            explain=str(args.explain.resolve()) if args.explain else None,
            max_pixels=args.max_pixels,
            reducing_gap=args.jpeg_reducing_gap,
            device=args.device,
            backend=args.backend,
            autocast=args.autocast,
            torch_threads=args.torch_threads,
            decode_threads=args.decode_threads,
        )
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _load_tagger(options: TaggingOptions):
    from model.checkpoint import CheckpointError
    from model.library.tagging import BatchTagger
    from model.runtime import ConfigError

    try:
        return BatchTagger(options)
    except (ConfigError, CheckpointError) as exc:
        raise ConfigurationError(str(exc)) from None


def _model_ref(path: Path, checkpoint) -> dict:
    from model.library.tagging import model_ref

    return model_ref(path, checkpoint.card.name, checkpoint.version)


def rows_of(path: str | Path) -> Iterator[dict]:
    """The rows of a ``--out`` file (JSON Lines or Parquet)."""
    from model.library.results import out_format

    if out_format(path) == "parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


if __name__ == "__main__":
    sys.exit(main())
