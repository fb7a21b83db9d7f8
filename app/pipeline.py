"""One request's photos through the pipeline: decode and preprocess on a bounded thread pool (off
the event loop, each photo within its time limit), then probabilities from the batcher."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.batcher import Batcher, Result
from app.errors import ApiError, DecodeTimeout, photo_error
from app.metrics import Metrics
from model.imageio import PhotoError
from model.tagger import Tagger

log = logging.getLogger("phototag.pipeline")


@dataclass
class Upload:
    filename: str | None
    data: bytes


class Decoder:
    """Bytes -> the model's input tensor, on ``threads`` threads. A photo's time limit counts from
    the moment a thread takes it: a busy pool makes photos wait, it does not fail them. A decode
    that overruns is answered 422 at once; its thread finishes (Pillow cannot be interrupted) and
    only then takes the next photo, so slow images can never pile up more threads."""

    def __init__(
        self,
        threads: int,
        max_pixels: int,
        max_seconds: float,
        metrics: Metrics,
        reducing_gap: float,
    ):
        self.max_pixels = max_pixels
        self.reducing_gap = reducing_gap
        self.max_seconds = max_seconds
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="phototag-decode")
        self._free = asyncio.Semaphore(threads)

    async def tensor(self, data: bytes, tagger: Tagger) -> torch.Tensor:
        """(3, crop, crop) for ``tagger``; raises ApiError for a photo it cannot take."""
        loop = asyncio.get_running_loop()
        await self._free.acquire()
        context = contextvars.copy_context()  # the request id follows the photo into its thread
        future = self._executor.submit(context.run, self._decode, data, tagger)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free.release))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.max_seconds)
        except TimeoutError:
            self.metrics.decode_failures.labels("decode_timeout").inc()
            raise DecodeTimeout(self.max_seconds) from None
        except ApiError as error:
            self.metrics.decode_failures.labels(error.code).inc()
            raise

    def _decode(self, data: bytes, tagger: Tagger) -> torch.Tensor:
        started = time.perf_counter()
        try:
            tensor = tagger.pixels(data, max_pixels=self.max_pixels, reducing_gap=self.reducing_gap)
        except PhotoError as error:
            raise photo_error(error) from None
        self.metrics.decode.observe(time.perf_counter() - started)
        return tensor

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


async def probabilities_for(
    uploads: list[Upload], tagger: Tagger, model_id: str, decoder: Decoder, batcher: Batcher
) -> list[Result]:
    """Per upload, its :class:`model.tagger.Scores` or the ApiError that failed it; raises the
    first error when every photo failed, and Overloaded at once when the queue has no room."""
    with batcher.admit(len(uploads)):
        decoded = await asyncio.gather(*(_tensor_or_error(u, tagger, decoder) for u in uploads))
        good = [i for i, item in enumerate(decoded) if isinstance(item, torch.Tensor)]
        results: list[Result | torch.Tensor] = list(decoded)
        if good:
            probs = await batcher.infer(tagger, [decoded[i] for i in good], model_id)
            for i, result in zip(good, probs, strict=True):
                results[i] = result
    errors = [r for r in results if isinstance(r, ApiError)]
    if len(errors) == len(results):
        raise errors[0]
    return results  # type: ignore[return-value]  # every tensor replaced by its scores


async def _tensor_or_error(
    upload: Upload, tagger: Tagger, decoder: Decoder
) -> torch.Tensor | ApiError:
    try:
        return await decoder.tensor(upload.data, tagger)
    except ApiError as error:
        failure = error
    except Exception as exc:  # a decoder bug on one odd photo must not fail the others
        log.exception("unexpected error decoding a photo")
        failure = ApiError(422, "invalid_image", f"the photo could not be decoded: {exc}")
    if upload.filename:
        failure.message = f"{upload.filename}: {failure.message}"
    return failure
