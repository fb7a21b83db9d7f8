"""``python -m app`` / ``phototag-serve``: check the checkpoint, then serve with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from app.settings import get_settings
from app.tagger import resolve_device
from model.checkpoint import CheckpointError, load


def main() -> int:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:  # refuse to start with one clear line, not a traceback, when the model is unusable
        resolve_device(settings.device)
        load(settings.checkpoint)
    except CheckpointError as exc:
        print(f"phototag: cannot start: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "app.main:app", host=settings.host, port=settings.port, log_level=settings.log_level
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
