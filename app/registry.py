"""The served models, by name, and their hot reload.

A model's name is its file name without ``.safetensors`` (``models/pets.safetensors`` -> ``pets``):
what the operator sees in the folder, unique by construction, and stable when a retrain changes
the card. The files are polled (mtime, size, inode) every ``reload_interval_s``: a changed file is
loaded and warmed up off the request path, then swapped in with one dict assignment, so a request
gets either the old model or the new one, whole. A file that fails to load is refused with a logged
reason and the old model keeps serving; it is tried again when the file changes again. In a models
folder, a new file starts being served and a deleted one stops being served, except the default
model, which keeps serving from memory (a request without ``?model=`` must keep working).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi.concurrency import run_in_threadpool

from app.errors import ModelNotReady, UnknownModel
from app.metrics import Metrics
from app.settings import Settings
from app.tagger import Tagger
from model.checkpoint import CheckpointError

log = logging.getLogger("phototag.registry")

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class FileSignature:
    mtime_ns: int
    size: int
    inode: int


def file_signature(path: Path) -> FileSignature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileSignature(st.st_mtime_ns, st.st_size, st.st_ino)


def discover(settings: Settings) -> dict[str, Path]:
    """Name -> file of every checkpoint to serve. Hidden files are skipped: they are the temp
    files of a write in progress (``.pets.safetensors.1234.tmp``)."""
    if settings.models_dir is None:
        return {settings.checkpoint.stem: settings.checkpoint}
    paths = sorted(settings.models_dir.glob(f"*{SUFFIX}"))
    return {p.stem: p for p in paths if not p.name.startswith(".") and p.is_file()}


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, warm_up_sizes: tuple[int, ...]):
        self.settings = settings
        self.metrics = metrics
        self.warm_up_sizes = warm_up_sizes
        self.default_name = ""
        self._models: dict[str, Tagger] = {}
        self._tried: dict[str, FileSignature | None] = {}  # file state last loaded or refused

    # --- serving

    def get(self, name: str | None = None) -> tuple[str, Tagger]:
        name = name or self.default_name
        tagger = self._models.get(name)
        if tagger is None:
            if not self._models:
                raise ModelNotReady()
            raise UnknownModel(name, self.names())
        return name, tagger

    def names(self) -> list[str]:
        return sorted(self._models)

    @property
    def ready(self) -> bool:
        return self.default_name in self._models

    # --- loading

    async def start(self) -> None:
        """Load every checkpoint; raise CheckpointError when the default one cannot be served."""
        sources = discover(self.settings)
        if not sources:
            raise CheckpointError(f"no *{SUFFIX} checkpoint in {self.settings.models_dir}")
        errors = {name: await self._load(name, path) for name, path in sources.items()}
        self.default_name = self._choose_default(sources)
        if self.default_name not in self._models:
            error = errors[self.default_name]
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the default model {self.default_name!r}: {error}")
        log.info("serving models: %s (default: %s)", ", ".join(self.names()), self.default_name)

    def _choose_default(self, sources: dict[str, Path]) -> str:
        wanted = self.settings.default_model
        if wanted:
            if wanted not in sources:
                raise CheckpointError(
                    f"PHOTOTAG_DEFAULT_MODEL={wanted} but there is no {wanted}{SUFFIX}; "
                    f"found {', '.join(sources) or 'none'}"
                )
            return wanted
        loaded = self.names() or sorted(sources)
        return "default" if "default" in loaded else loaded[0]

    async def watch(self) -> None:
        """Poll the files forever (a lifespan task, cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.poll()
            except Exception:  # a poll must never kill the watcher
                log.exception("checking the checkpoint files failed")

    async def poll(self) -> None:
        """One pass: reload changed files, load new ones, drop deleted ones."""
        sources = discover(self.settings)
        for name in list(self._models):
            if name not in sources or file_signature(sources[name]) is None:
                self._file_gone(name)
        for name, path in sources.items():
            signature = file_signature(path)
            if signature is not None and signature != self._tried.get(name):
                await self._load(name, path)

    async def _load(self, name: str, path: Path) -> Exception | None:
        """Load, warm up and swap in one checkpoint; on failure keep what is served, return why."""
        self._tried[name] = file_signature(path)
        old = self._models.get(name)
        try:
            tagger = await run_in_threadpool(self._build, path)
        except Exception as exc:  # CheckpointError, or anything the file's contents provoke
            self.metrics.model_refused(name)
            still = f"; still serving version {old.version}" if old else ""
            log.warning("refused checkpoint %s (%s): %s%s", name, path, exc, still)
            return exc
        if old is not None and old.version == tagger.version:
            return None  # touched, not changed
        self._models[name] = tagger  # the atomic swap: requests hold the tagger they started with
        self.metrics.model_loaded(name, tagger.name, tagger.version, str(tagger.device))
        if old is not None:
            self.metrics.model_unloaded(name, old.name, old.version, str(old.device))
            log.info("reloaded %s: version %s -> %s", name, old.version, tagger.version)
        else:
            log.info("loaded %s version %s from %s", name, tagger.version, path)
        return None

    def _build(self, path: Path) -> Tagger:
        s = self.settings
        tagger = Tagger.from_file(str(path), s.device, s.autocast, s.backend, s.torch_threads)
        tagger.warm_up(self.warm_up_sizes)
        return tagger

    def _file_gone(self, name: str) -> None:
        if name in self._tried and self._tried[name] is None:
            return  # already noted
        self._tried[name] = None
        if name == self.default_name or self.settings.models_dir is None:
            log.warning("the checkpoint of %s is gone; still serving it from memory", name)
            return
        tagger = self._models.pop(name)
        self.metrics.model_unloaded(name, tagger.name, tagger.version, str(tagger.device))
        log.info("stopped serving %s: its checkpoint was removed", name)
