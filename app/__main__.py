"""``python -m app`` / ``phototag-serve``: check the models, then serve with uvicorn.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets in-flight requests finish (at
most ``PHOTOTAG_SHUTDOWN_TIMEOUT_S``), then the lifespan drains the batcher; the exit status is 0.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn

from app.logs import configure_logging
from app.registry import SUFFIX, discover
from app.settings import Settings, get_settings
from app.tagger import resolve_device
from model.checkpoint import CheckpointError, load


def check_models(settings: Settings) -> None:
    """Raise CheckpointError, with a reason for a person, when there is nothing usable to serve."""
    resolve_device(settings.device)
    if settings.models_dir is None:
        load(settings.checkpoint)
        return
    if not settings.models_dir.is_dir():
        raise CheckpointError(f"PHOTOTAG_MODELS_DIR={settings.models_dir} is not a folder")
    sources = discover(settings)
    if not sources:
        raise CheckpointError(f"no *{SUFFIX} checkpoint in {settings.models_dir}")
    if settings.default_model and settings.default_model not in sources:
        raise CheckpointError(
            f"PHOTOTAG_DEFAULT_MODEL={settings.default_model} but there is no "
            f"{settings.default_model}{SUFFIX} in {settings.models_dir}"
        )


def main() -> int:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:  # refuse to start with one clear line, not a traceback, when the model is unusable
        check_models(settings)
    except CheckpointError as exc:
        print(f"phototag: cannot start: {exc}", file=sys.stderr)
        return 2
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly; answering that with
    # a plain exit makes a graceful stop exit 0 (orchestrators read 143 as a crash).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's structured lines for uvicorn's loggers too
        access_log=False,  # app.access writes one line per request, with its id
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return 0


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
