"""The batcher on its own, with fake models: batches form, stay apart per model, fail alone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from app.batcher import Batcher, ShuttingDown, forward_splitting_on_oom
from app.errors import InferenceFailed, InferenceTimeout, OutOfMemory, Overloaded


class FakeModel:
    """Probabilities = the photo's own fill value, so each photo's answer is recognisable. Records
    every batch size; can block (a slow GPU) or raise (OOM) on demand."""

    def __init__(self, oom_above: int | None = None, poison: float | None = None):
        self.sizes: list[int] = []
        self.started: list[float] = []  # time.monotonic() as each forward pass begins
        self.oom_above = oom_above
        self.poison = poison
        self.entered = threading.Event()  # a forward pass has begun (and may be held at the gate)
        self.gate = threading.Event()
        self.gate.set()

    def outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """What the batcher calls: a tensor splits per photo as Scores do (unbind)."""
        return self.probabilities(batch)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        self.started.append(time.monotonic())
        self.entered.set()
        self.gate.wait(5)
        self.sizes.append(len(batch))
        values = batch[:, 0, 0, 0]
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        if self.poison is not None and bool((values == self.poison).any()):
            raise torch.OutOfMemoryError("CUDA out of memory (fake, this photo)")
        return values[:, None].repeat(1, 3)


def photo(value: float) -> torch.Tensor:
    return torch.full((3, 4, 4), value)


def batcher(**overrides: float) -> Batcher:
    args = {"max_batch_size": 4, "max_wait_s": 0.05, "max_queue": 64, "timeout_s": 5.0}
    args.update(overrides)
    return Batcher(**args)


def run(coro):
    return asyncio.run(coro)


async def until(condition, timeout: float = 5.0) -> None:
    """Yield to the event loop until ``condition()`` holds: the tasks under test run meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the batcher never reached the state"
        await asyncio.sleep(0)


async def in_forward_pass(model: FakeModel) -> None:
    """Until the batcher's inference thread has entered ``model``'s forward pass."""
    assert await asyncio.to_thread(model.entered.wait, 5)


def test_concurrent_requests_share_batches_up_to_the_max_size():
    model = FakeModel()

    async def scenario():
        b = batcher(max_batch_size=4, max_wait_s=0.2)
        b.start()
        results = await asyncio.gather(*(b.infer(model, [photo(i)]) for i in range(10)))
        await b.close()
        return results

    results = run(scenario())
    assert sorted(model.sizes, reverse=True) == [4, 4, 2]
    assert [float(r[0][0]) for r in results] == list(range(10))  # each got its own answer


def test_a_lone_photo_waits_max_wait_for_company_then_runs_alone():
    model = FakeModel()

    async def scenario():
        b = batcher(max_wait_s=0.2)
        b.start()
        arrived = time.monotonic()
        await b.infer(model, [photo(1)])
        await b.close()
        return model.started[0] - arrived

    waited = run(scenario())
    assert 0.2 <= waited < 0.3  # never before max_wait, and at once after it
    assert model.sizes == [1]


def test_photos_of_different_models_never_share_a_batch():
    old, new = FakeModel(), FakeModel()

    async def scenario():
        b = batcher(max_batch_size=8, max_wait_s=0.1)
        b.start()
        calls = [b.infer(old if i % 2 else new, [photo(i)]) for i in range(6)]
        await asyncio.gather(*calls)
        await b.close()

    run(scenario())
    assert old.sizes == [3] and new.sizes == [3]


def test_a_full_queue_refuses_at_once_with_overloaded():
    model = FakeModel()
    model.gate.clear()  # the GPU is stuck on the first batch

    async def scenario():
        b = batcher(max_batch_size=1, max_wait_s=0, max_queue=2)
        b.start()
        first = asyncio.create_task(b.infer(model, [photo(0)]))
        await in_forward_pass(model)  # taken by the worker, now blocked in the forward pass
        queued = [asyncio.create_task(b.infer(model, [photo(i)])) for i in (1, 2)]
        await until(lambda: b.depth == 2)
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await b.infer(model, [photo(3)])
        refused_after = time.monotonic() - started
        model.gate.set()
        await asyncio.gather(first, *queued)
        await b.close()
        return refused.value, refused_after

    error, seconds = run(scenario())
    assert seconds < 0.05
    assert error.status == 503 and error.headers == {"Retry-After": "1"}


def test_a_photo_not_done_in_time_times_out_and_the_batcher_keeps_working():
    model = FakeModel()
    model.gate.clear()

    async def scenario():
        b = batcher(timeout_s=0.1, max_wait_s=0)
        b.start()
        with pytest.raises(InferenceTimeout):
            await b.infer(model, [photo(1)])
        model.gate.set()
        later = await b.infer(model, [photo(2)])
        await b.close()
        return later

    assert float(run(scenario())[0][0]) == 2


def test_oom_splits_the_batch_until_it_fits():
    model = FakeModel(oom_above=2)
    results = forward_splitting_on_oom(model.probabilities, [photo(i) for i in range(8)])
    assert [float(r[0]) for r in results] == list(range(8))
    assert model.sizes == [8, 4, 2, 2, 4, 2, 2]


def test_oom_fails_only_the_photo_that_does_not_fit_alone():
    model = FakeModel(poison=5.0)
    results = forward_splitting_on_oom(model.probabilities, [photo(i) for i in range(8)])
    assert isinstance(results[5], OutOfMemory)
    assert [float(r[0]) for i, r in enumerate(results) if i != 5] == [0, 1, 2, 3, 4, 6, 7]


def test_oom_through_the_batcher_fails_only_the_affected_request():
    model = FakeModel(poison=3.0)

    async def scenario():
        b = batcher(max_batch_size=8, max_wait_s=0.1)
        b.start()
        results = await asyncio.gather(*(b.infer(model, [photo(i)]) for i in range(6)))
        after = await b.infer(model, [photo(9)])  # still healthy
        await b.close()
        return results, after

    results, after = run(scenario())
    assert isinstance(results[3][0], OutOfMemory)
    assert all(isinstance(r[0], torch.Tensor) for i, r in enumerate(results) if i != 3)
    assert float(after[0][0]) == 9


def test_an_unexpected_model_error_fails_that_batch_only():
    class Broken(FakeModel):
        def probabilities(self, batch):
            raise RuntimeError("boom")

    async def scenario():
        b = batcher()
        b.start()
        failed = await b.infer(Broken(), [photo(1), photo(2)])
        fine = await b.infer(FakeModel(), [photo(3)])
        await b.close()
        return failed, fine

    failed, fine = run(scenario())
    assert all(isinstance(r, InferenceFailed) and "boom" in r.message for r in failed)
    assert float(fine[0][0]) == 3


def test_abandoned_photos_do_not_count_against_new_ones():
    model = FakeModel()
    model.gate.clear()  # the forward pass is stuck while requests time out

    async def scenario():
        b = batcher(max_batch_size=1, max_wait_s=0, max_queue=2, timeout_s=0.05)
        b.start()
        stuck = asyncio.create_task(b.infer(model, [photo(0)]))
        await in_forward_pass(model)  # taken by the worker, blocked
        with pytest.raises(InferenceTimeout):
            await b.infer(model, [photo(1), photo(2)])  # waits, times out: abandoned, still queued
        assert b.depth == 2 and b.live_depth == 0
        b.timeout_s = 5
        fresh = asyncio.create_task(b.infer(model, [photo(3), photo(4)]))  # not refused
        await until(lambda: b.live_depth == 2)
        model.gate.set()
        results = await fresh
        with contextlib.suppress(InferenceTimeout):
            await stuck
        await b.close()
        return results

    results = run(scenario())
    assert [float(r[0]) for r in results] == [3.0, 4.0]


def test_admission_reserves_room_before_decoding_and_frees_it_after():
    async def scenario():
        b = batcher(max_batch_size=4, max_wait_s=0, max_queue=3)
        with b.admit(2):
            # 2 + 2 > 3: refused before any decoding would start
            with pytest.raises(Overloaded), b.admit(2):
                pass
            with b.admit(1):
                pass
        with b.admit(3):  # the room came back
            pass
        with pytest.raises(RuntimeError), b.admit(3):
            raise RuntimeError("a decode failed")
        with b.admit(3):  # ... and it comes back after a failure too
            pass

    run(scenario())


def test_close_finishes_queued_photos_then_refuses_new_ones():
    model = FakeModel()

    async def scenario():
        b = batcher(max_batch_size=2, max_wait_s=10)  # would wait long without the drain
        b.start()
        pending = [asyncio.create_task(b.infer(model, [photo(i)])) for i in range(3)]
        await until(lambda: b.depth == 3)  # queued (two are then taken as one batch)
        started = time.monotonic()
        await b.close()
        done = await asyncio.gather(*pending)
        with pytest.raises(ShuttingDown):
            await b.infer(model, [photo(9)])
        return done, time.monotonic() - started

    done, seconds = run(scenario())
    assert [float(r[0][0]) for r in done] == [0, 1, 2]
    assert seconds < 2
