"""Server settings, read from ``PHOTOTAG_*`` environment variables (and an optional ``.env``)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class Settings(BaseSettings):
    """Every field is one environment variable: ``PHOTOTAG_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="PHOTOTAG_", env_file=".env", extra="ignore")

    checkpoint: Path = Field(
        Path("checkpoints/default.safetensors"),
        description="The checkpoint (.safetensors) to serve.",
    )
    device: str = Field(
        "auto", description="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N."
    )
    host: str = Field("0.0.0.0", description="Address the server listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the server listens on.")
    max_body_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond it)."
    )
    max_files: int = Field(32, ge=1, description="Most photos in one request.")
    max_pixels: int = Field(
        60_000_000, ge=1, description="Largest image, width x height, accepted (413 beyond it)."
    )
    default_top_k: int = Field(
        5, ge=1, description="Tags returned per photo when top_k is not given."
    )
    torch_threads: int = Field(
        0, ge=0, description="CPU threads for inference; 0 lets torch choose (one per core)."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
