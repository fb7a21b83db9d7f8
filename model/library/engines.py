"""Engines: what turns a stream of candidate files into batches of result rows.

Both call the same tagging class (:class:`model.library.tagging.BatchTagger`, or
:class:`model.library.remote.RemoteTagger` for ``--server``); the listing, resume and commit
logic stay in :mod:`model.library.cli`, whatever the engine.

- ``local``: files are read and decoded on a pool of threads while the forward pass of the
  previous batch runs on this thread, as the server overlaps them. At most ``ahead`` files are in
  flight, so memory stays flat however large the library.
- ``ray``: the same class as a Ray Data actor (checkpoint loaded once per worker) over a
  dataset of the candidates' paths; rows stream back to this process, which commits them.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from model.library.tagging import Item
from model.library.walk import Candidate


class Tagging(Protocol):
    def prepare(self, candidate: Candidate) -> Item: ...

    def tag(self, items: list[Item]) -> list[dict]: ...


def run_local(
    tagger: Tagging,
    candidates: Iterable[Candidate],
    batch_size: int,
    threads: int,
    ahead: int | None = None,
) -> Iterator[list[dict]]:
    """Batches of rows, in the candidates' order. ``threads`` decode; this thread runs the
    forward passes (and whatever the caller does with each batch) meanwhile."""
    ahead = ahead or 2 * (batch_size + threads)
    source = iter(candidates)
    pending: deque[Future[Item]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="phototag-decode") as pool:

        def fill() -> None:
            while len(pending) < ahead and (candidate := next(source, None)) is not None:
                pending.append(pool.submit(tagger.prepare, candidate))

        try:
            fill()
            batch: list[Item] = []
            photos = 0
            while pending:
                item = pending.popleft().result()
                fill()
                batch.append(item)
                photos += item.prepared is not None
                if photos == batch_size or len(batch) >= 4 * batch_size or not pending:
                    yield tagger.tag(batch)
                    batch, photos = [], 0
        finally:  # interrupted: drop what was not started
            for future in pending:
                future.cancel()


def run_ray(
    options: dict,
    candidates: Iterable[Candidate],
    batch_size: int,
    address: str | None,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
) -> Iterator[list[dict]]:
    """The same tagging class on Ray Data: ``workers`` actors, each loading the checkpoint
    once; the rows come back here in batches. ``address`` None starts a local Ray."""
    import ray

    from model.library.tagging import BatchTagger

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # local: workers import this checkout's phototag, as this process does
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=False)
    items = [{"path": c.path, "size": c.size, "mtime_ns": c.mtime_ns} for c in candidates]
    if not items:
        return
    dataset = ray.data.from_items(items).map_batches(
        BatchTagger,
        fn_constructor_kwargs={"options": options},
        batch_size=batch_size,
        concurrency=workers,
        num_cpus=cpus_per_worker,
    )
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield [json.loads(row) for row in batch["row"]]
