"""HTTP only: read the uploads, call the pipeline, shape the response."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response

from app.auth import ApiKey
from app.batcher import Batcher
from app.errors import ApiError, ModelNotReady
from app.metrics import Metrics
from app.pipeline import Decoder, Outcome, tag_uploads
from app.registry import ModelRegistry
from app.schemas import (
    ErrorResponse,
    Health,
    ModelInfo,
    ModelList,
    ModelRef,
    ModelSummary,
    PhotoResult,
    Tag,
    TagResponse,
    VocabularyTag,
)
from app.settings import Settings
from app.uploads import read_uploads
from model.tagger import Tagger

STATIC = Path(__file__).parent / "static"

# Both guarded by the same rule (app.auth): a key where PHOTOTAG_API_KEYS is set, except on
# PHOTOTAG_OPEN_PATHS. The served contract declares the 401 and the security schemes per path.
api = APIRouter(dependencies=[ApiKey])
ops = APIRouter(dependencies=[ApiKey])
page = APIRouter()  # always open: it holds no data, and it is where a person enters a key


# Dependencies are ``async def``: FastAPI runs a plain ``def`` one on a worker thread, a thread
# hand-off per dependency per request for what is a dictionary lookup.


def _lifespan_state(request: Request, name: str) -> object:
    value = getattr(request.state, name, None)
    if value is None:  # the lifespan has not started (or has stopped) serving
        raise ModelNotReady()
    return value


async def get_registry(request: Request) -> ModelRegistry:
    return cast(ModelRegistry, _lifespan_state(request, "registry"))


async def get_batcher(request: Request) -> Batcher:
    return cast(Batcher, _lifespan_state(request, "batcher"))


async def get_decoder(request: Request) -> Decoder:
    return cast(Decoder, _lifespan_state(request, "decoder"))


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
DecoderDep = Annotated[Decoder, Depends(get_decoder)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


@dataclass
class Served:
    """The model a request asked for, held for the whole request (a reload cannot swap it)."""

    model_id: str
    tagger: Tagger
    default: bool

    def ref(self) -> ModelRef:
        return ModelRef(id=self.model_id, name=self.tagger.card_name, version=self.tagger.version)


async def get_served(
    registry: RegistryDep,
    model: Annotated[
        str | None,
        Query(
            description="The model to use, by id (see GET /v1/models); default: the server's "
            "default model.",
            examples=["pets"],
        ),
    ] = None,
) -> Served:
    model_id, tagger = registry.get(model)
    return Served(model_id, tagger, model_id == registry.default_id)


ServedDep = Annotated[Served, Depends(get_served)]

_UNKNOWN_MODEL = {"model": ErrorResponse, "description": "`?model=` names no served model "
                  "(unknown_model; the message lists the served ones)."}  # fmt: skip
_ERROR_TEXT = {
    400: "Nothing to tag, or a malformed body: empty_body, empty_file, no_file, not_a_file, "
    "bad_request (a broken multipart body, or more than PHOTOTAG_MAX_FILES photos).",
    404: _UNKNOWN_MODEL["description"],
    413: "The body is over PHOTOTAG_MAX_BODY_BYTES (payload_too_large), or the image is over "
    "PHOTOTAG_MAX_PIXELS (image_too_large).",
    415: "A Content-Type other than multipart/form-data, image/* or application/octet-stream, or "
    "bytes of no accepted image format (unsupported_media_type).",
    422: "A corrupt or truncated image (invalid_image), one slower to decode than "
    "PHOTOTAG_MAX_DECODE_SECONDS (decode_timeout), or a bad query parameter (invalid_parameter).",
    500: "The model failed on the photo's batch (inference_failed), or a bug (internal_error).",
    503: "Busy or not ready (model_not_ready, overloaded, timeout, out_of_memory, "
    "shutting_down; or the server holds PHOTOTAG_MAX_CONNECTIONS connections), with Retry-After.",
}
_ERRORS = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_TEXT.items()
}
# An empty photo is refused: 400 empty_body (raw) or empty_file (multipart; in a request with
# several photos, the error of that photo's result).
_PHOTO = {"type": "string", "format": "binary", "minLength": 1}
# The limits that depend on the settings (most photos, largest body) are added per server by
# app.contract.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "One or more photos: multipart fields named `file` (repeat the field for "
        "several photos), or one photo as the raw body with an `image/*` or "
        "`application/octet-stream` Content-Type. The format is read from the bytes: JPEG, PNG, "
        "WebP, GIF (first frame), BMP, TIFF, HEIC/HEIF; other bytes are refused (415), and so "
        "is any other Content-Type.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "array", "minItems": 1, "items": _PHOTO}},
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            "image/*": {"schema": _PHOTO},
            "application/octet-stream": {"schema": _PHOTO},
        },
    }
}


@api.post(
    "/v1/tags",
    response_model=TagResponse,
    response_model_exclude_unset=True,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
    summary="Tag photos",
    description="Per-class probabilities for each uploaded photo, top tags first. In a request "
    "with several photos, a photo that fails gets an `error` entry and the others are tagged.\n\n"
    "`curl -F file=@cat.jpg -F file=@dog.heic 'localhost:8000/v1/tags?model=pets'` or "
    "`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/tags`",
)
async def tag_photos(
    request: Request,
    served: ServedDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    batcher: BatcherDep,
    top_k: Annotated[
        int | None, Query(ge=1, description="Tags per photo (default 5).", examples=[3])
    ] = None,
    threshold: Annotated[
        float | None,
        Query(
            ge=0,
            le=1,
            description=(
                "Only tags at least this probable. Default: 0, or the model's per-class thresholds "
                "for a multi-label model."
            ),
        ),
    ] = None,
    all: Annotated[bool, Query(description="Also return every class's probability.")] = False,
    vocabulary: Annotated[
        Literal["tags", "classes"],
        Query(
            description="`tags` (default): the model's vocabulary, tags people write with their "
            "path and rolled-up probabilities; `classes`: the network's raw classes."
        ),
    ] = "tags",
) -> TagResponse:
    uploads = await read_uploads(request, settings)
    outcomes = await tag_uploads(uploads, served.tagger, served.model_id, decoder, batcher)
    choice = TagChoice(top_k or settings.default_top_k, threshold, vocabulary, all)
    photos = [
        shape_result(upload.filename, outcome, served.tagger, choice)
        for upload, outcome in zip(uploads, outcomes, strict=True)
    ]
    return TagResponse(model=served.ref(), results=photos)


@dataclass(frozen=True)
class TagChoice:
    """What a request asked for of each photo's tags."""

    top_k: int
    threshold: float | None
    view: Literal["tags", "classes"]
    include_all: bool


def shape_result(
    filename: str | None, outcome: Outcome, tagger: Tagger, choice: TagChoice
) -> PhotoResult:
    """One photo's outcome (probabilities and people tags, or an error) -> its result."""
    if isinstance(outcome, ApiError):
        error = {"code": outcome.code, "message": outcome.message}
        return PhotoResult(filename=filename, tags=[], error=error)
    scores = outcome.scores
    tags = [
        Tag(label=t.label, probability=t.probability, **({"path": list(t.path)} if t.path else {}))
        for t in tagger.tags(scores, choice.top_k, choice.threshold, choice.view, outcome.people)
    ]  # a raw class has no path: the field stays out of the response
    if choice.include_all:
        everything = dict(zip(tagger.classes, scores.probabilities.tolist(), strict=True))
        return PhotoResult(filename=filename, tags=tags, probabilities=everything)
    return PhotoResult(filename=filename, tags=tags)


@api.get(
    "/v1/models",
    response_model=ModelList,
    responses={503: {"model": ErrorResponse}},
    summary="The served models: ids to pass as ?model=, versions, and the default",
)
async def list_models(registry: RegistryDep) -> ModelList:
    summaries = [summary(*registry.get(i), registry.default_id) for i in registry.model_ids()]
    return ModelList(default=registry.default_id, models=summaries)


def summary(model_id: str, tagger: Tagger, default_id: str) -> ModelSummary:
    card = tagger.card
    return ModelSummary(
        id=model_id,
        name=card.name,
        version=tagger.version,
        task=card.task,
        arch=card.arch,
        num_classes=len(card.classes),
        device=str(tagger.device),
        backend=tagger.backend,
        precision=tagger.precision,
        default=model_id == default_id,
    )


@api.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={404: _UNKNOWN_MODEL, 503: {"model": ErrorResponse}},
    summary="One served model in full: classes, preprocessing, metrics",
)
async def model_info(served: ServedDep) -> ModelInfo:
    card = served.tagger.card
    return ModelInfo(
        id=served.model_id,
        default=served.default,
        name=card.name,
        version=served.tagger.version,
        task=card.task,
        arch=card.arch,
        classes=card.classes,
        preprocessing=card.preprocess.to_dict(),
        temperature=card.temperature,
        thresholds=card.thresholds,
        vocabulary=vocabulary_tags(served.tagger),
        metrics=card.metrics,
        description=card.description,
        created_at=card.created_at,
        device=str(served.tagger.device),
        backend=served.tagger.backend,
        precision=served.tagger.precision,
    )


def vocabulary_tags(tagger: Tagger) -> list[VocabularyTag] | None:
    vocabulary = tagger.vocabulary
    if vocabulary is None:
        return None
    return [
        VocabularyTag(
            label=tag.label,
            path=list(tag.path),
            threshold=tag.threshold,
            classes=[vocabulary.classes[i] for i in members],
        )
        for tag, members in zip(vocabulary.tags, vocabulary.gathered, strict=True)
    ]


@ops.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@ops.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorResponse}},
    summary="Readiness: the default model is loaded and warmed up, the batcher runs",
)
async def readyz(registry: RegistryDep, batcher: BatcherDep) -> Health:
    if not (registry.ready and batcher.running):
        raise ModelNotReady()
    return Health(status="ready")


@ops.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        404: {"model": ErrorResponse, "description": "Metrics are off (PHOTOTAG_METRICS=false)."},
    },
)
async def metrics(metrics: MetricsDep, settings: SettingsDep) -> Response:
    if not settings.metrics:
        raise ApiError(404, "not_found", "metrics are turned off here (PHOTOTAG_METRICS=false)")
    return Response(metrics.render(), media_type=metrics.content_type)


@page.get("/", include_in_schema=False)
async def upload_page() -> FileResponse:
    return FileResponse(STATIC / "index.html")
