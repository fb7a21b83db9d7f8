"""One request's photos through the pipeline: decode and preprocess on a bounded thread pool (off
the event loop, each photo within its time limit), then probabilities from the batcher."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from app.batcher import Batcher
from app.errors import ApiError, DecodeTimeout, photo_error
from app.metrics import Metrics
from model.imageio import PhotoError
from model.people.names import NamedFace
from model.tagger import Prepared, Scores, Tag, Tagger

log = logging.getLogger("phototag.pipeline")

T = TypeVar("T")


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

    async def prepare(self, data: bytes, tagger: Tagger) -> Prepared:
        """The photo prepared for ``tagger`` (:meth:`model.tagger.Tagger.prepare`: its pixels
        and people tags); raises ApiError for a photo it cannot take."""
        return await self._submit(self._decode, data, tagger)

    async def image(self, data: bytes, tagger: Tagger) -> Image.Image:
        """The upright RGB photo as ``tagger`` reads it (an explanation draws on it), decoded
        under the same limits; raises ApiError for a photo it cannot take."""
        return await self._submit(self._decode_image, data, tagger)

    async def _submit(self, decode: Callable[[bytes, Tagger], T], data: bytes, tagger: Tagger) -> T:
        loop = asyncio.get_running_loop()
        await self._free.acquire()
        context = contextvars.copy_context()  # the request id follows the photo into its thread
        future = self._executor.submit(context.run, decode, data, tagger)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free.release))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.max_seconds)
        except TimeoutError:
            self.metrics.decode_failures.labels("decode_timeout").inc()
            raise DecodeTimeout(self.max_seconds) from None
        except ApiError as error:
            self.metrics.decode_failures.labels(error.code).inc()
            raise

    def _decode(self, data: bytes, tagger: Tagger) -> Prepared:
        started = time.perf_counter()
        try:
            prepared = tagger.prepare(
                data, max_pixels=self.max_pixels, reducing_gap=self.reducing_gap
            )
        except PhotoError as error:
            raise photo_error(error) from None
        self.metrics.decode.observe(time.perf_counter() - started)
        return prepared

    def _decode_image(self, data: bytes, tagger: Tagger) -> Image.Image:
        try:
            return tagger.photo(data, max_pixels=self.max_pixels, reducing_gap=self.reducing_gap)
        except PhotoError as error:
            raise photo_error(error) from None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class Tagged:
    """One photo's outcome: what the forward pass gave for it and its people tags."""

    scores: Scores
    people: tuple[Tag, ...]
    faces: tuple[NamedFace, ...] | None = None  # with names on (Prepared.faces)


Outcome = Tagged | ApiError


async def tag_uploads(
    uploads: list[Upload], tagger: Tagger, model_id: str, decoder: Decoder, batcher: Batcher
) -> list[Outcome]:
    """Per upload, what it was tagged with or the ApiError that failed it; raises the first
    error when every photo failed, and Overloaded at once when the queue has no room."""
    with batcher.admit(len(uploads)):
        decoded = await asyncio.gather(*(_prepared_or_error(u, tagger, decoder) for u in uploads))
        good = [(i, item) for i, item in enumerate(decoded) if isinstance(item, Prepared)]
        outcomes: list = list(decoded)  # the prepared ones become outcomes below
        if good:
            pixels = [prepared.pixels for _, prepared in good]
            results = await batcher.infer(tagger, pixels, model_id)
            for (i, prepared), result in zip(good, results, strict=True):
                failed = isinstance(result, ApiError)
                outcomes[i] = result if failed else Tagged(result, prepared.people, prepared.faces)
    errors = [o for o in outcomes if isinstance(o, ApiError)]
    if len(errors) == len(outcomes):
        raise errors[0]
    return outcomes


async def _prepared_or_error(
    upload: Upload, tagger: Tagger, decoder: Decoder
) -> Prepared | ApiError:
    try:
        return await decoder.prepare(upload.data, tagger)
    except ApiError as error:
        failure = error
    except Exception as exc:  # a decoder bug on one odd photo must not fail the others
        log.exception("unexpected error decoding a photo")
        failure = ApiError(422, "invalid_image", f"the photo could not be decoded: {exc}")
    if upload.filename:
        failure.message = f"{upload.filename}: {failure.message}"
    return failure
