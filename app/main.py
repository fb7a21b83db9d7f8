"""The ASGI app: ``uvicorn app.main:app``, or ``create_app(settings)`` in tests and embeddings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app.errors import install_error_handlers
from app.limits import BodySizeLimitMiddleware
from app.routes import router
from app.settings import Settings, get_settings
from app.tagger import Tagger

log = logging.getLogger("phototag")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Tagger]]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        tagger = await run_in_threadpool(
            Tagger.from_file, str(settings.checkpoint), settings.device
        )
        await run_in_threadpool(tagger.warm_up)
        yield {"tagger": tagger}

    app = FastAPI(
        title="phototag",
        summary="Upload photos, get tags: per-class probabilities from a CNN.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(router)
    return app


app = create_app()
