"""``phototag serve`` (also ``python -m app``, ``phototag-serve``): load the models, then serve
with uvicorn. Every setting is a ``PHOTOTAG_*`` environment variable; the flags set the few a
person types most, over the environment.

The connections are bounded (app.connections): header size and time, keep-alive, a cap on their
number. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets in-flight requests finish
(at most ``PHOTOTAG_SHUTDOWN_TIMEOUT_S``), then the lifespan drains the batcher; the exit status
is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from app.connections import Bounds, bounded_protocol, ensure_open_files
from app.logs import configure_logging
from app.main import create_app
from app.settings import Settings, get_settings, settings_with
from model.checkpoint import CheckpointError
from model.runtime import ConfigError


def parse_args(argv: Sequence[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        prog="phototag serve",
        description="Serve the REST API and the upload page.",
        epilog="Every setting is a PHOTOTAG_* environment variable (or a line of a .env file); "
        "README.md, Configuration, lists them. The flags override the environment.",
    )
    parser.add_argument("--host", help="address to listen on (PHOTOTAG_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (PHOTOTAG_PORT)")
    parser.add_argument("--checkpoint", help="the checkpoint to serve (PHOTOTAG_CHECKPOINT)")
    parser.add_argument(
        "--models-dir", help="serve every checkpoint in this folder (PHOTOTAG_MODELS_DIR)"
    )
    given = vars(parser.parse_args(argv))
    return {name: value for name, value in given.items() if value is not None}


def main(argv: Sequence[str] | None = None) -> int:
    overrides = parse_args(argv)
    # Refuse to start with one clear line, not a traceback, when a setting or the default model
    # is unusable. The models load here, once, before the server listens.
    try:
        settings: Settings = settings_with(overrides) if overrides else get_settings()
        configure_logging(settings.log_level, settings.log_format)
        app = create_app(settings)
        asyncio.run(app.state.registry.start())
    except (ConfigError, CheckpointError) as exc:
        print(f"phototag: cannot start: {exc}", file=sys.stderr)
        return 2
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly; answering that with
    # a plain exit makes a graceful stop exit 0 (orchestrators read 143 as a crash).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    ensure_open_files(settings.max_connections)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's structured lines for uvicorn's loggers too
        access_log=False,  # app.access writes one line per request, with its id
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        # httptools with the header size and time bounds and the connection cap (app.connections)
        http=bounded_protocol(Bounds.from_settings(settings)),
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]  # a float works
    )
    return 0


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
