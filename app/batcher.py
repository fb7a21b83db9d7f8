"""Dynamic micro-batching: photos from concurrent requests share forward passes.

Requests put preprocessed photos in one bounded queue and await their futures. One worker task takes
the oldest photo, waits at most ``max_wait_s`` (counted from that photo's arrival) for others of the
same tagger, and runs up to ``max_batch_size`` of them as one forward pass on the single inference
thread. A full queue refuses at once (503 + Retry-After), a photo not done within ``timeout_s`` is
abandoned (503), and a CUDA out-of-memory error splits the batch in halves until the photos that
still fail are alone: only they fail. A photo carries its tagger, so a hot-reloaded model never
mixes with the old one in a batch and in-flight photos finish on the tagger they started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.errors import (
    ApiError,
    InferenceFailed,
    InferenceTimeout,
    OutOfMemory,
    Overloaded,
)
from model.tagger import Scores

log = logging.getLogger("phototag.batcher")

Result = Scores | ApiError


class Tagger(Protocol):
    """What the batcher needs of a :class:`model.tagger.Tagger`."""

    def outputs(self, batch: torch.Tensor) -> Scores:
        """(B, 3, H, W) -> the batch's scores; ``.unbind(0)`` splits them per photo."""
        ...


class BatchObserver(Protocol):
    def observe_batch(self, model_id: str, size: int, seconds: float) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


class ShuttingDown(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"})


@dataclass(eq=False)
class _Item:
    tagger: Tagger
    model_id: str
    tensor: torch.Tensor  # (3, H, W)
    future: asyncio.Future[Result]
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        timeout_s: float,
        observer: BatchObserver | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.observer = observer
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._admitted = 0  # photos of requests between admit() and their answer
        # One inference thread: a forward pass already uses every core (or the whole GPU).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="phototag-infer")

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def live_depth(self) -> int:
        """Queued photos still wanted: abandoned ones (timed out, client gone) stay in the deque
        until the worker reaches them, but must not count against new requests."""
        return sum(not item.future.done() for item in self._queue)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    @contextlib.contextmanager
    def admit(self, photos: int) -> Iterator[None]:
        """Reserve queue room for a request's photos before they are decoded, so an overloaded
        server refuses at once instead of after decoding (the event loop is single-threaded:
        no lock needed)."""
        if self._closing:
            raise ShuttingDown()
        if self._admitted + photos > self.max_queue:
            raise Overloaded(self._admitted, self.max_queue)
        self._admitted += photos
        try:
            yield
        finally:
            self._admitted -= photos

    async def infer(
        self, tagger: Tagger, tensors: list[torch.Tensor], model_id: str = ""
    ) -> list[Result]:
        """Per photo, its :class:`Scores` or the ApiError that failed it."""
        if self._closing:
            raise ShuttingDown()
        waiting = self.live_depth
        if waiting + len(tensors) > self.max_queue:
            raise Overloaded(waiting, self.max_queue)
        loop = asyncio.get_running_loop()
        items = [_Item(tagger, model_id, t, loop.create_future()) for t in tensors]
        self._queue.extend(items)
        self._queue_changed()
        futures = [item.future for item in items]
        try:
            async with asyncio.timeout(self.timeout_s):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise InferenceTimeout(self.timeout_s) from None
        finally:  # timed out or the client went away: the worker skips what is cancelled
            for future in futures:
                future.cancel()

    async def close(self) -> None:
        """Refuse new photos, finish every queued one, stop the worker and its thread."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def _work(self) -> None:
        while True:
            while not self._live_queue():
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            first = self._queue[0]
            await self._gather_more(first)
            batch = self._take(first.tagger)
            if batch:
                await self._run(batch)

    def _live_queue(self) -> bool:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # abandoned (timed out or cancelled) before its turn
        return bool(self._queue)

    async def _gather_more(self, first: _Item) -> None:
        """Wait until a full batch of ``first``'s tagger is queued, or ``first`` waited enough."""
        deadline = first.arrived + self.max_wait_s
        while not self._closing and self._count(first.tagger) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _count(self, tagger: Tagger) -> int:
        return sum(1 for item in self._queue if item.tagger is tagger and not item.future.done())

    def _take(self, tagger: Tagger) -> list[_Item]:
        batch: list[_Item] = []
        rest: deque[_Item] = deque()
        for item in self._queue:
            if item.future.done():
                continue
            if item.tagger is tagger and len(batch) < self.max_batch_size:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        self._queue_changed()
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        tagger, started = batch[0].tagger, time.perf_counter()
        tensors = [item.tensor for item in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, forward_splitting_on_oom, tagger.outputs, tensors
            )
        except Exception as exc:  # the server stays up; only this batch's photos fail
            log.exception("inference failed on a batch of %d", len(batch))
            results = [InferenceFailed(f"{type(exc).__name__}: {exc}")] * len(batch)
        if self.observer is not None:
            self.observer.observe_batch(
                batch[0].model_id, len(batch), time.perf_counter() - started
            )
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _queue_changed(self) -> None:
        self._arrived.set()
        if self.observer is not None:
            self.observer.set_queue_depth(len(self._queue))


def forward_splitting_on_oom(
    forward: Callable[[torch.Tensor], Scores], tensors: list[torch.Tensor]
) -> list[Result]:
    """Scores per photo (``forward``'s result split by its ``unbind(0)``); on out-of-memory
    retry each half, down to single photos, so only
    the photos that cannot run even alone fail (with :class:`OutOfMemory`)."""
    try:
        return list(forward(torch.stack(tensors)).unbind(0))
    except torch.OutOfMemoryError:
        _release_cuda_cache()
        if len(tensors) == 1:
            log.warning("out of memory on a single photo; failing it")
            return [OutOfMemory()]
        half = len(tensors) // 2
        log.warning("out of memory on a batch of %d; retrying in halves", len(tensors))
        first = forward_splitting_on_oom(forward, tensors[:half])
        return first + forward_splitting_on_oom(forward, tensors[half:])


def _release_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
