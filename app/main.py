"""The ASGI app: ``uvicorn app.main:app``, or ``create_app(settings)`` in tests and embeddings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.access import RequestContextMiddleware
from app.batcher import Batcher
from app.contract import install_contract
from app.custom_tags import CustomTags
from app.custom_tags import router as custom_tags_router
from app.errors import install_error_handlers
from app.explain import ExplainPool, explain_api
from app.limits import BodySizeLimitMiddleware
from app.metrics import Metrics
from app.people import router as people_router
from app.pipeline import Decoder
from app.registry import ModelRegistry
from app.routes import STATIC, api, ops, page
from app.settings import ServingPlan, Settings, get_settings

log = logging.getLogger("phototag")

_DESCRIPTION = """Upload photos, get tags: per-class probabilities from a CNN.

Photos come as multipart `file` fields or as one raw `image/*` body. Every error is JSON
`{"error": {"code", "message"}}` with a stable `code`. When the server sets `PHOTOTAG_API_KEYS`,
the `/v1` routes need `Authorization: Bearer KEY` or `X-API-Key: KEY`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings`` (default: the environment's). Raises ConfigError when a setting
    cannot work here. Its models load in the lifespan, unless ``app.state.registry`` was started
    before (``python -m app`` does, to refuse a bad checkpoint before it listens)."""
    settings = settings or get_settings()
    plan = settings.serving_plan()
    metrics = Metrics()
    custom_tags = CustomTags(settings)
    registry = ModelRegistry(settings, plan, metrics, custom_tags.store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        custom_tags.start()
        try:
            async with serving(settings, plan, metrics, registry) as state:
                yield {**state, "custom_tags": custom_tags}
        finally:
            custom_tags.close()

    app = FastAPI(
        title="phototag",
        summary="Upload photos, get tags: per-class probabilities from a CNN.",
        description=_DESCRIPTION,
        version=version("phototag"),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.labels = plan.labels  # every served language's labels (app.language)
    app.state.default_language = plan.default_language
    # Added innermost first: the request id and metrics see every answer, the 413s included.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-Tag",
                "X-Tag-Probability",
                "X-Faces",
                "X-Via",
            ],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(explain_api)
    app.include_router(custom_tags_router)
    app.include_router(people_router)
    app.include_router(ops)
    app.include_router(page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    install_contract(app, settings, plan.labels.languages)
    return app


@asynccontextmanager
async def serving(
    settings: Settings, plan: ServingPlan, metrics: Metrics, registry: ModelRegistry
) -> AsyncIterator[dict[str, Any]]:
    """Start: models loaded and warmed up (unless they already are), batcher and reload watcher
    running. Stop (after uvicorn has let in-flight requests finish): watcher stopped, queued
    photos drained."""
    if not registry.started:
        await registry.start()
    batcher = Batcher(
        max_batch_size=plan.max_batch_size,
        max_wait_s=plan.max_batch_wait_s,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        observer=metrics,
    )
    batcher.start()
    decoder = Decoder(
        plan.decode_threads,
        settings.max_pixels,
        settings.max_decode_seconds,
        metrics,
        settings.jpeg_reducing_gap,
    )
    explainer = ExplainPool(
        settings.explain_concurrency, settings.explain_queue, settings.request_timeout_s
    )
    watcher = None
    if settings.reload_interval_s > 0:
        watcher = asyncio.get_running_loop().create_task(registry.watch(), name="reload")
    log.info(
        "batching up to %d photos, waiting at most %.1f ms",
        plan.max_batch_size,
        plan.max_batch_wait_s * 1000,
    )
    try:
        yield {
            "registry": registry,
            "batcher": batcher,
            "decoder": decoder,
            "explainer": explainer,
        }
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await batcher.close()
        await asyncio.get_running_loop().run_in_executor(None, explainer.close)
        decoder.close()
        log.info("stopped: queue drained")


@functools.cache
def _environment_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    """``app``, built on first use (``uvicorn app.main:app``), so importing this module reads
    no settings."""
    if name == "app":
        return _environment_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
