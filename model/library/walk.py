"""Folders -> the files to look at, in a stable order.

Directories are followed through symlinks, each real directory once (by device and inode), so
a link back up the tree cannot loop. Hidden names (``.thumbnails``, ``.phototag-journal``,
an atomic writer's ``.photo.jpg.xmp.123.tmp``) and XMP sidecars are never candidates. Whether a
file is a photo is decided later, by its bytes (:func:`model.imageio.sniff_format`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("phototag.library")

SIDECAR_SUFFIX = ".xmp"


@dataclass(frozen=True)
class Candidate:
    """A file to look at, as the walk saw it: what the journal keys a finished photo on."""

    path: str  # absolute, as reached (symlinks kept in the name)
    size: int  # bytes
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


def is_stale_temp(name: str) -> bool:
    """A sidecar's temp file (``.photo.jpg.xmp.k3j2.tmp``) that a killed run left behind."""
    return name.startswith(".") and name.endswith(".tmp") and SIDECAR_SUFFIX + "." in name


def walk(roots: Iterable[str | Path], stale: list[str] | None = None) -> Iterator[Candidate]:
    """Every regular, non-hidden, non-sidecar file under ``roots`` (files or folders), each
    folder's entries in name order. Unreadable folders are logged and passed over. Sidecar temp
    files a killed run left are added to ``stale``."""
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        path = os.path.abspath(root)
        try:
            info = os.stat(path)
        except OSError as exc:
            log.warning("%s: cannot read (%s)", path, exc.strerror or exc)
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk_dir(path, info, seen_dirs, stale)
        elif stat.S_ISREG(info.st_mode):
            yield Candidate(path, info.st_size, info.st_mtime_ns)


def _walk_dir(
    top: str, info: os.stat_result, seen: set[tuple[int, int]], stale: list[str] | None
) -> Iterator[Candidate]:
    stack = [(top, info)]
    while stack:
        folder, folder_info = stack.pop()
        identity = (folder_info.st_dev, folder_info.st_ino)
        if identity in seen:
            continue  # a symlink loop, or a folder reached twice
        seen.add(identity)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("%s: cannot list (%s)", folder, exc.strerror or exc)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name.lower().endswith(SIDECAR_SUFFIX):
                if stale is not None and is_stale_temp(entry.name):
                    stale.append(entry.path)
                continue
            try:
                entry_info = entry.stat()  # follows symlinks
            except OSError:
                continue  # a dangling link
            if stat.S_ISDIR(entry_info.st_mode):
                subfolders.append((entry.path, entry_info))
            elif stat.S_ISREG(entry_info.st_mode):
                yield Candidate(entry.path, entry_info.st_size, entry_info.st_mtime_ns)
        stack.extend(reversed(subfolders))  # depth first, in name order
