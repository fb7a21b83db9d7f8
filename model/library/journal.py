"""What a run finished, recorded as it goes: the resume journal.

One JSON object per line, appended and fsync'd once per committed batch, never rewritten:

    {"begin": {"key": "...", "mode": "all", "at": "..."}}   a run starts (or resumes)
    {"task": "...", "row": {...}}                             one photo finished: its result row
    {"end": "..."}                                            the run of that key finished

A photo is recorded only after its sidecar is written (temp + rename), so a kill at any point
leaves either nothing (the photo is redone; rewriting its sidecar gives the same file) or both.
A line cut short by a kill is dropped when the journal is next opened. The ``--out`` file is
written from the journal (the latest row of each path), so it has exactly one row per photo.

Modes: ``new`` skips a photo whose latest row has its size, mtime and task (model version, XMP
target) and finished (tagged, or failed to decode); ``all`` and ``remove`` redo every photo, and
resume a run of the same key that did not reach its ``end``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model.library.tagging import FAILED, TAGGED
from model.library.walk import Candidate

log = logging.getLogger("phototag.library")


class JournalBusy(RuntimeError):
    """Another ``phototag tag`` holds this journal."""


@dataclass(frozen=True)
class Entry:
    offset: int  # of its line in the journal
    size: int
    mtime_ns: int
    task: str
    finished: bool  # tagged or failed to decode, sidecar written: nothing left to do


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalBusy(f"another phototag tag is writing {self.path}") from None
        self.latest: dict[str, Entry] = {}  # path -> its latest row
        self._open_run: tuple[str, set[tuple[str, int, int]]] | None = None  # key, done keys
        self._load()

    def _load(self) -> None:
        self._drop_cut_line()
        runs: dict[str, set[tuple[str, int, int]]] = {}
        current: str | None = None
        offset = 0
        with open(self.path, "rb") as f:
            for line in f:
                record = _parse(line, self.path)
                if record is not None and "begin" in record:
                    current = record["begin"]["key"]
                    runs.setdefault(current, set())
                elif record is not None and "end" in record:
                    runs.pop(record["end"], None)
                    current = None
                elif record is not None and "row" in record:
                    row = record["row"]
                    self.latest[row["path"]] = Entry(
                        offset,
                        row["size"],
                        row["mtime_ns"],
                        record.get("task", ""),
                        _finished(row),
                    )
                    if current is not None:
                        runs[current].add((row["path"], row["size"], row["mtime_ns"]))
                offset += len(line)
        if current is not None:
            self._open_run = (current, runs[current])

    def _drop_cut_line(self) -> None:
        """A kill mid-write leaves a last line without its newline: cut it off."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a line cut short by an interrupted run", self.path)
        os.ftruncate(self._fd, keep)

    # ---- what is left to do

    def begin(self, key: str, mode: str) -> bool:
        """Start the run ``key``, or resume it when the journal's last run was this one and
        did not end; returns whether it resumed."""
        if self._open_run is not None and self._open_run[0] == key:
            return True
        self._open_run = (key, set())
        self._append([{"begin": {"key": key, "mode": mode, "at": _now()}}])
        return False

    def done(self, candidate: Candidate, mode: str, task: str) -> bool:
        if mode == "new":
            entry = self.latest.get(candidate.path)
            return (
                entry is not None
                and entry.finished
                and (entry.size, entry.mtime_ns, entry.task)
                == (candidate.size, candidate.mtime_ns, task)
            )
        return self._open_run is not None and candidate.key in self._open_run[1]

    # ---- recording

    def record(self, rows: Iterable[dict], task: str) -> None:
        """Append finished rows, durably (one fsync for all)."""
        offset = os.fstat(self._fd).st_size
        lines = []
        for row in rows:
            line = json.dumps({"task": task, "row": row}, ensure_ascii=False) + "\n"
            self.latest[row["path"]] = Entry(
                offset, row["size"], row["mtime_ns"], task, _finished(row)
            )
            if self._open_run is not None:
                self._open_run[1].add((row["path"], row["size"], row["mtime_ns"]))
            offset += len(line.encode())
            lines.append(line)
        self._write("".join(lines))

    def end(self, key: str) -> None:
        self._append([{"end": key}])
        self._open_run = None

    def _append(self, records: list[dict]) -> None:
        self._write("".join(json.dumps(r) + "\n" for r in records))

    def _write(self, text: str) -> None:
        if not text:
            return
        data = text.encode()
        while data:
            data = data[os.write(self._fd, data) :]
        os.fsync(self._fd)

    # ---- reading back

    def rows(self) -> Iterator[dict]:
        """The latest row of every photo, in path order (one read per row: memory stays that of
        the index, not of the rows)."""
        with open(self.path, "rb") as f:
            for path in sorted(self.latest):
                f.seek(self.latest[path].offset)
                yield json.loads(f.readline())["row"]

    def close(self) -> None:
        os.close(self._fd)


def _finished(row: dict) -> bool:
    xmp = row.get("xmp") or {}
    return row["status"] in (TAGGED, FAILED) and "error" not in xmp


def _parse(line: bytes, path: Path) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        log.warning("%s: skipping an unreadable line", path)
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
