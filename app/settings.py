"""Server settings, read from ``PHOTOTAG_*`` environment variables (and an optional ``.env``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model import regions
from model.labels import ENGLISH, Labels, LabelsError
from model.people.names import default_names_dir
from model.runtime import ConfigError, RuntimeChoice
from model.teach import default_store_dir

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
ENV_PREFIX = "PHOTOTAG_"
# (max batch size, max batch wait in ms) by device type, where the settings leave them unset: a
# GPU gains more from big batches than a CPU, whose forward pass already keeps every core busy.
DEFAULT_BATCHING = {"cpu": (8, 2.0), "cuda": (32, 5.0)}

# A comma-separated environment variable read as a list ("a, b" -> ["a", "b"]).
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every field is one environment variable: ``PHOTOTAG_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    # --- models
    checkpoint: Path = Field(
        Path("checkpoints/default.safetensors"),
        description="The checkpoint (.safetensors) to serve when models_dir is not set.",
    )
    models_dir: Path | None = Field(
        None,
        description="Serve every *.safetensors in this folder, each by its file name without "
        ".safetensors; checkpoint is then ignored.",
    )
    default_model: str | None = Field(
        None,
        description="The model a request without ?model= gets (a file name stem). Default: "
        "'default' when there is one, else the first name in alphabetical order.",
    )
    reload_interval_s: float = Field(
        2.0,
        ge=0,
        description="How often checkpoint files are checked for changes (hot reload); 0 = never.",
    )
    device: str = Field(
        "auto", description="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N."
    )
    autocast: Literal["auto", "off", "fp16", "bf16"] = Field(
        "auto",
        description="Reduced precision for inference: auto (CUDA: bf16 where the GPU has it, "
        "else fp16; CPU: float32), off (float32), fp16 (CUDA only) or bf16 (on a CPU: only "
        "where it has native bf16; faster, but probabilities move: see bench/README.md).",
    )
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What runs the network: auto (OpenVINO on a CPU where it is installed, "
        "else torch), torch, or openvino (CPU only; float32 as fast as torch's bf16).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Threads that run the network; 0: OpenVINO all cores (its threads sleep "
        "while they wait), torch on a CPU a quarter of the cores (at least one; the rest decode "
        "photos), torch's choice on a GPU.",
    )

    # --- custom tags (README: "Teach your own tags")
    custom_tags_dir: Path | None = Field(
        None,
        description="Where taught custom tags are kept, one folder per model; must be writable "
        "to teach. Default: custom-tags/ in models_dir, or beside checkpoint.",
    )
    max_custom_tags: int = Field(100, ge=1, description="Most custom tags per model (409 beyond).")
    max_tag_examples: int = Field(
        1000, ge=1, description="Most example photos per custom tag, positive and negative (409)."
    )

    # --- batching
    max_batch_size: int | None = Field(
        None, ge=1, description="Most photos in one forward pass. Default: 8 on CPU, 32 on GPU."
    )
    max_batch_wait_ms: float | None = Field(
        None,
        ge=0,
        description="How long the first photo of a batch waits for others. Default: 2 ms on "
        "CPU, 5 ms on GPU.",
    )
    max_queue: int = Field(
        256,
        ge=1,
        description="Most photos in the server at once (decoding, queued or in a forward pass); "
        "a request that would exceed it gets 503 at once, before decoding.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Longest a photo waits for inference (queue + forward), 503."
    )

    # --- explanations (POST /v1/explain)
    explain_concurrency: int = Field(
        1,
        ge=1,
        description="Explanations computed at once, each on its own thread with a torch copy of "
        "the network on the CPU, never on the inference thread.",
    )
    explain_queue: int = Field(
        4,
        ge=0,
        description="Explanations that may wait for a free thread; beyond them a request gets "
        "503 overloaded at once (Retry-After), before its photo is decoded.",
    )

    # --- uploads
    max_body_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond it)."
    )
    max_files: int = Field(32, ge=1, description="Most photos in one request.")
    max_pixels: int = Field(
        60_000_000, ge=1, description="Largest image, width x height, accepted (413 beyond it)."
    )
    max_decode_seconds: float = Field(
        10.0, gt=0, description="Longest one photo may take to decode (422 decode_timeout)."
    )
    decode_threads: int = Field(
        0, ge=0, description="Threads decoding photos; 0 = as many as CPU cores (at most 8)."
    )
    jpeg_reducing_gap: float = Field(
        2.0,
        ge=0,
        description="JPEGs decode at 1/2, 1/4 or 1/8 scale while both sides stay at least this "
        "many times the model's resize size (as Pillow's reducing_gap); 0 decodes in full. "
        "Larger is closer to a full decode, smaller is faster (bench/README.md has the "
        "figures); 0 is exact.",
    )
    people: Literal["on", "off"] = Field(
        "on",
        description="People tags (people/person, people/portrait, people/group) from a face "
        "detector run on each decoded photo: on or off.",
    )
    # --- names (README: "Name the people in your photos")
    names: Literal["on", "off"] = Field(
        "off",
        description="Name the faces of people taught through /v1/people (people/<name> tags, "
        "each photo's faces with their names): on or off. Needs people=on. Off, no face "
        "descriptor is computed or kept.",
    )
    names_dir: Path | None = Field(
        None,
        description="Where taught names are kept (one file of face descriptors per name); "
        "must be writable to teach. Default: names/ in models_dir, or beside checkpoint.",
    )
    regions: int = Field(
        regions.DEFAULT,
        description="Parts of each photo tagged beside the whole, in the same forward pass, so "
        "that several things get tags: 4 (its corners) or 0 (the whole photo alone: one forward "
        "pass per photo instead of five, for CPU servers where throughput matters most).",
    )
    default_top_k: int = Field(
        5, ge=1, description="Tags returned per photo when top_k is not given."
    )

    # --- languages (README: "Tags in your language")
    lang: str | None = Field(
        None,
        description="The language of the tags' labels when a request names none (no ?lang=, "
        "no Accept-Language that matches): en (the default) or a served language (de, fr, es, "
        "it, pt, nl, pl, ja, zh, ko, or one from labels_dir).",
    )
    labels_dir: Path | None = Field(
        None,
        description="A folder of label files (*.json, the format of "
        "model/vocabularies/imagenet.de.json) that change or add labels of a shipped language, "
        "or add a language; checked at start.",
    )

    # --- operations
    host: str = Field("0.0.0.0", description="Address the server listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the server listens on.")
    api_keys: CommaList = Field(
        default_factory=list,
        description="Comma-separated API keys; when set, requests need one (Authorization: "
        "Bearer KEY or X-API-Key: KEY).",
    )
    admin_keys: CommaList = Field(
        default_factory=list,
        description="Comma-separated keys that may also change what every client sees (teach, "
        "forget and correct tags). When api_keys or admin_keys is set, those routes need one of "
        "these (403 for another accepted key).",
    )
    open_paths: CommaList = Field(
        default_factory=lambda: ["/healthz", "/readyz", "/metrics"],
        description="Paths that need no API key even when api_keys is set.",
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (CORS); * for any.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning, error."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text (key=value pairs) or json (one JSON object per line)."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests get to finish."
    )

    # --- connections (python -m app / phototag-serve: app.connections)
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest request line plus headers, in bytes; beyond it the request is "
        "answered 431 and its connection closed.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a request's line and headers may take to arrive, from the "
        "connection's opening (or the request's first byte on a kept-alive connection); then "
        "the connection is closed (408 when part of a request had come).",
    )
    keepalive_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long an idle connection is kept open after a response, for the next "
        "request.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Most connections served at once; a request on a connection beyond it is "
        "answered 503 (Retry-After) and the connection closed.",
    )

    @field_validator("jpeg_reducing_gap")
    @classmethod
    def _gap_is_off_or_at_least_one(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("use 0 (decode in full) or a value of at least 1")
        return value

    @field_validator("regions")
    @classmethod
    def _regions_we_tag(cls, value: int) -> int:
        return regions.check(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_keys", "admin_keys", "open_paths", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def custom_tags_folder(self) -> Path:
        """custom_tags_dir, or custom-tags/ in the models folder (or beside the checkpoint)."""
        if self.custom_tags_dir is not None:
            return self.custom_tags_dir
        return default_store_dir(self.models_dir or self.checkpoint.parent)

    @property
    def names_folder(self) -> Path:
        """names_dir, or names/ in the models folder (or beside the checkpoint)."""
        if self.names_dir is not None:
            return self.names_dir
        return default_names_dir(self.models_dir or self.checkpoint.parent)

    def serving_plan(self) -> ServingPlan:
        """Every value the server derives from the settings and the machine, resolved in one
        place; raises :class:`ConfigError` (one line, naming the variable) when one cannot
        work here."""
        names = {
            "device": "PHOTOTAG_DEVICE",
            "backend": "PHOTOTAG_BACKEND",
            "autocast": "PHOTOTAG_AUTOCAST",
            "threads": "PHOTOTAG_TORCH_THREADS",
        }
        runtime = RuntimeChoice.resolve(
            self.device, self.backend, self.autocast, self.torch_threads, names
        )
        labels, language = self.languages()
        if self.names == "on" and self.people != "on":
            raise ConfigError(
                f"{ENV_PREFIX}NAMES=on names the faces the detector finds: set "
                f"{ENV_PREFIX}PEOPLE=on too (or {ENV_PREFIX}NAMES=off)"
            )
        size, wait_ms = DEFAULT_BATCHING[runtime.device.type]
        size = self.max_batch_size or size
        wait_ms = wait_ms if self.max_batch_wait_ms is None else self.max_batch_wait_ms
        return ServingPlan(
            runtime=runtime,
            max_batch_size=size,
            max_batch_wait_s=wait_ms / 1000,
            decode_threads=self.decode_threads or min(8, os.cpu_count() or 1),
            warm_up_sizes=tuple(sorted({1, size})),
            labels=labels,
            default_language=language,
        )

    def languages(self) -> tuple[Labels, str]:
        """The labels of every served language (the shipped ones, labels_dir's over them) and
        the default language; :class:`ConfigError` for a bad label file or an unknown lang."""
        try:
            labels = Labels.load(self.labels_dir)
        except LabelsError as exc:
            raise ConfigError(f"{ENV_PREFIX}LABELS_DIR={self.labels_dir}: {exc}") from None
        language = self.lang or ENGLISH
        if language not in labels:
            raise ConfigError(
                f"{ENV_PREFIX}LANG={self.lang}: not a served language; use one of "
                f"{', '.join(labels.languages)}"
            )
        return labels, language


@dataclass(frozen=True)
class ServingPlan:
    """What :meth:`Settings.serving_plan` resolved: the runtime of every model, batching, and
    the decode pool."""

    runtime: RuntimeChoice
    max_batch_size: int
    max_batch_wait_s: float
    decode_threads: int
    warm_up_sizes: tuple[int, ...]  # batch sizes each model runs once before it serves
    labels: Labels  # every served language's labels (model.labels)
    default_language: str  # PHOTOTAG_LANG, else en: what a request that names none gets


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment; a bad value raises :class:`ConfigError` whose message
    names the variable."""
    return settings_with({})


def settings_with(overrides: dict[str, object]) -> Settings:
    """The environment's settings with ``overrides`` (field name -> value) over them."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def describe(error: ValidationError) -> str:
    """A pydantic error on settings -> one line per bad variable: ``PHOTOTAG_X=value: why``."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        lines.append(f"{ENV_PREFIX}{field.upper()}={item.get('input')!s}: {item['msg']}")
    return "; ".join(lines)
