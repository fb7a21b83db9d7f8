"""The served models, by model id, and their hot reload.

A model id is its file name without ``.safetensors`` (``models/pets.safetensors`` -> ``pets``):
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
from app.settings import ServingPlan, Settings
from model.checkpoint import CheckpointError
from model.custom_tags import CustomTagStore
from model.people import FaceDetector
from model.people.names import Embedder, Namer, NameStore
from model.pretrained import outdated_vocabulary
from model.tagger import Tagger
from model.teach import serve_tags

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
    """Model id -> file of every checkpoint to serve. Hidden files are skipped: they are the temp
    files of a write in progress (``.pets.safetensors.1234.tmp``)."""
    if settings.models_dir is None:
        return {settings.checkpoint.stem: settings.checkpoint}
    paths = sorted(settings.models_dir.glob(f"*{SUFFIX}"))
    return {p.stem: p for p in paths if not p.name.startswith(".") and p.is_file()}


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        plan: ServingPlan,
        metrics: Metrics,
        custom_tags: CustomTagStore | None = None,
    ):
        self.settings = settings
        self.custom_tags = custom_tags  # each loaded model gets its stored custom tags
        self.plan = plan
        self.metrics = metrics
        self.default_id = ""
        self.started = False
        # one face detector for every served model (its weights are the package's, not a
        # model's), on the models' runtime
        self.people = FaceDetector.load(plan.runtime) if settings.people == "on" else None
        # taught names for those faces (PHOTOTAG_NAMES), shared by every model and app.people
        self.names = None
        if settings.names == "on":
            self.names = Namer(Embedder.load(plan.runtime), NameStore(settings.names_folder))
        self._taggers: dict[str, Tagger] = {}
        self._tried: dict[str, FileSignature | None] = {}  # file state last loaded or refused

    # --- serving

    def get(self, model_id: str | None = None) -> tuple[str, Tagger]:
        model_id = model_id or self.default_id
        tagger = self._taggers.get(model_id)
        if tagger is None:
            if not self._taggers:
                raise ModelNotReady()
            raise UnknownModel(model_id, self.model_ids())
        return model_id, tagger

    def model_ids(self) -> list[str]:
        return sorted(self._taggers)

    @property
    def ready(self) -> bool:
        return self.default_id in self._taggers

    # --- loading

    async def start(self) -> None:
        """Load every checkpoint; raise CheckpointError when the default one cannot be served."""
        if self.settings.models_dir is not None and not self.settings.models_dir.is_dir():
            raise CheckpointError(f"PHOTOTAG_MODELS_DIR={self.settings.models_dir} is not a folder")
        sources = discover(self.settings)
        if not sources:
            raise CheckpointError(f"no *{SUFFIX} checkpoint in {self.settings.models_dir}")
        errors = {model_id: await self._load(model_id, path) for model_id, path in sources.items()}
        self.default_id = self._choose_default(sources)
        if self.default_id not in self._taggers:  # the caller says why, once
            error = errors[self.default_id]
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the default model {self.default_id!r}: {error}")
        for model_id, error in errors.items():
            if error is not None:
                log.warning("refused checkpoint %s (%s): %s", model_id, sources[model_id], error)
        self.started = True
        log.info("serving models: %s (default: %s)", ", ".join(self.model_ids()), self.default_id)

    def _choose_default(self, sources: dict[str, Path]) -> str:
        wanted = self.settings.default_model
        if wanted:
            if wanted not in sources:
                raise CheckpointError(
                    f"PHOTOTAG_DEFAULT_MODEL={wanted} but there is no {wanted}{SUFFIX}; "
                    f"found {', '.join(sources) or 'none'}"
                )
            return wanted
        loaded = self.model_ids() or sorted(sources)
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
        for model_id in list(self._taggers):
            if model_id not in sources or file_signature(sources[model_id]) is None:
                self._file_gone(model_id)
        for model_id, path in sources.items():
            signature = file_signature(path)
            if signature is not None and signature != self._tried.get(model_id):
                old = self._taggers.get(model_id)
                error = await self._load(model_id, path)
                if error is not None:
                    still = f"; still serving version {old.version}" if old else ""
                    log.warning("refused checkpoint %s (%s): %s%s", model_id, path, error, still)

    async def _load(self, model_id: str, path: Path) -> Exception | None:
        """Load, warm up and swap in one checkpoint; on failure keep what is served and return
        why (the caller logs it)."""
        self._tried[model_id] = file_signature(path)
        old = self._taggers.get(model_id)
        try:
            tagger = await run_in_threadpool(self._build, model_id, path)
        except Exception as exc:  # CheckpointError, or anything the file's contents provoke
            self.metrics.model_refused(model_id)
            return exc
        if old is not None and old.file_digest == tagger.file_digest:
            return None  # touched, not changed
        # A changed file is swapped in even when its version is the same (only its card's
        # provenance changed): what is served is always what the file says.
        self._taggers[model_id] = tagger  # the atomic swap: requests keep the tagger they got
        if old is not None:  # first: the old and new labels are equal when the version is
            self.metrics.model_unloaded(model_id, old.card_name, old.version, str(old.device))
        self.metrics.model_loaded(model_id, tagger.card_name, tagger.version, str(tagger.device))
        if old is None:
            log.info("loaded %s version %s from %s", model_id, tagger.version, path)
        elif old.version == tagger.version:
            log.info("reloaded %s: version %s unchanged (a new card)", model_id, old.version)
        else:
            log.info("reloaded %s: version %s -> %s", model_id, old.version, tagger.version)
        return None

    def _build(self, model_id: str, path: Path) -> Tagger:
        tagger = Tagger.load(
            path, self.plan.runtime, self.people, self.settings.regions, self.names
        )
        if outdated_vocabulary(tagger.card):
            log.warning(
                "%s (%s) carries an earlier build of the ImageNet vocabulary, its thresholds "
                "fitted for an earlier phototag: rebuild it with `python -m model.pretrained "
                "--out %s` for the current one",
                model_id, path, path,
            )  # fmt: skip
        if self.custom_tags is not None:
            tags = serve_tags(self.custom_tags, model_id, tagger)
            stale = [t.name for t in tags if t.stale(tagger.probabilities_version)]
            if tags:
                log.info("%s: %d custom tags (%d stale: %s)", model_id, len(tags), len(stale),
                         ", ".join(stale) or "none")  # fmt: skip
        tagger.warm_up(self.plan.warm_up_sizes)
        return tagger

    def _file_gone(self, model_id: str) -> None:
        if model_id in self._tried and self._tried[model_id] is None:
            return  # already noted
        self._tried[model_id] = None
        if model_id == self.default_id or self.settings.models_dir is None:
            log.warning("the checkpoint of %s is gone; still serving it from memory", model_id)
            return
        tagger = self._taggers.pop(model_id)
        self.metrics.model_unloaded(model_id, tagger.card_name, tagger.version, str(tagger.device))
        log.info("stopped serving %s: its checkpoint was removed", model_id)
