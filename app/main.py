"""The ASGI app: ``uvicorn app.main:app``, or ``create_app(settings)`` in tests and embeddings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.access import RequestContextMiddleware
from app.batcher import Batcher, default_batching
from app.errors import install_error_handlers
from app.limits import BodySizeLimitMiddleware
from app.metrics import Metrics
from app.pipeline import Decoder
from app.registry import ModelRegistry
from app.routes import STATIC, api, ops, page
from app.settings import Settings, get_settings
from app.tagger import resolve_device

log = logging.getLogger("phototag")

_DESCRIPTION = """Upload photos, get tags: per-class probabilities from a CNN.

Photos come as multipart `file` fields or as one raw `image/*` body. Every error is JSON
`{"error": {"code", "message"}}` with a stable `code`. When the server sets `PHOTOTAG_API_KEYS`,
the `/v1` routes need `Authorization: Bearer KEY` or `X-API-Key: KEY`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with serving(settings, metrics) as state:
            yield state

    app = FastAPI(
        title="phototag",
        summary="Upload photos, get tags: per-class probabilities from a CNN.",
        description=_DESCRIPTION,
        version="0.2.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    # Added innermost first: the request id and metrics see every answer, the 413s included.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(ops)
    app.include_router(page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def serving(settings: Settings, metrics: Metrics) -> AsyncIterator[dict[str, Any]]:
    """Start: models loaded and warmed up, batcher and reload watcher running. Stop (after
    uvicorn has let in-flight requests finish): watcher stopped, queued photos drained."""
    if threads := inference_threads(settings):
        torch.set_num_threads(threads)
    max_batch, max_wait = batching(settings)
    registry = ModelRegistry(settings, metrics, warm_up_sizes=tuple(sorted({1, max_batch})))
    await registry.start()
    batcher = Batcher(
        max_batch_size=max_batch,
        max_wait_s=max_wait,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        observer=metrics,
    )
    batcher.start()
    threads = settings.decode_threads or min(8, os.cpu_count() or 1)
    decoder = Decoder(
        threads,
        settings.max_pixels,
        settings.max_decode_seconds,
        metrics,
        settings.jpeg_reducing_gap,
    )
    watcher = None
    if settings.reload_interval_s > 0:
        watcher = asyncio.get_running_loop().create_task(registry.watch(), name="reload")
    log.info("batching up to %d photos, waiting at most %.1f ms", max_batch, max_wait * 1000)
    try:
        yield {"registry": registry, "batcher": batcher, "decoder": decoder}
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await batcher.close()
        decoder.close()
        log.info("stopped: queue drained")


def inference_threads(settings: Settings) -> int | None:
    """torch intra-op threads for the network: the setting; else, on a CPU, a quarter of the
    cores, at least one, the rest being for the decode threads; else (GPU) torch's choice.
    OpenMP threads that share their cores with busy decoders spin in barriers and lose more
    than they add: on 2 cores, 1 inference thread + 2 decoders tag phone photos fastest."""
    if settings.torch_threads:
        return settings.torch_threads
    if resolve_device(settings.device).type == "cpu":
        return max(1, len(os.sched_getaffinity(0)) // 4)
    return None


def batching(settings: Settings) -> tuple[int, float]:
    size, wait = default_batching(resolve_device(settings.device))
    if settings.max_batch_size is not None:
        size = settings.max_batch_size
    if settings.max_batch_wait_ms is not None:
        wait = settings.max_batch_wait_ms / 1000
    return size, wait


app = create_app()
