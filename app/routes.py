"""HTTP only: read the uploads, call the pipeline, shape the response."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from app.auth import ApiKey
from app.deps import (
    BATCH_PHOTO,
    ERRORS,
    PHOTO,
    UNKNOWN_MODEL,
    BatcherDep,
    DecoderDep,
    MetricsDep,
    RegistryDep,
    ServedDep,
    SettingsDep,
)
from app.errors import ApiError, ModelNotReady
from app.language import Language, LanguageDep
from app.pipeline import Outcome, tag_uploads
from app.schemas import (
    ErrorResponse,
    Health,
    LanguageInfo,
    ModelInfo,
    ModelList,
    ModelSummary,
    NamedFaceBox,
    PhotoResult,
    Tag,
    TagResponse,
    VocabularyTag,
)
from app.uploads import read_uploads
from model.people.names import NamedFace
from model.tagger import Tagger

STATIC = Path(__file__).parent / "static"

# Both guarded by the same rule (app.auth): a key where PHOTOTAG_API_KEYS is set, except on
# PHOTOTAG_OPEN_PATHS. The served contract declares the 401 and the security schemes per path.
api = APIRouter(dependencies=[ApiKey])
ops = APIRouter(dependencies=[ApiKey])
page = APIRouter()  # always open: it holds no data, and it is where a person enters a key


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
                    "properties": {"file": {"type": "array", "minItems": 1, "items": BATCH_PHOTO}},
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            "image/*": {"schema": PHOTO},
            "application/octet-stream": {"schema": PHOTO},
        },
    }
}


@api.post(
    "/v1/tags",
    response_model=TagResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
    openapi_extra=_UPLOAD_BODY,
    summary="Tag photos",
    description="Per-class probabilities for each uploaded photo, top tags first. In a request "
    "with several photos, a photo that fails gets an `error` entry and the others are tagged.\n\n"
    "`curl -F file=@cat.jpg -F file=@dog.heic 'localhost:8000/v1/tags?model=pets'` or "
    "`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/tags`\n\n"
    "Labels in another language: `?lang=de` (or Accept-Language); `path` stays in English.",
)
async def tag_photos(
    request: Request,
    response: Response,
    served: ServedDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    batcher: BatcherDep,
    language: LanguageDep,
    top_k: Annotated[
        int | None,
        Query(
            ge=1,
            description="Tags per photo (default 5), besides the names of recognised people "
            "(people/<name>, PHOTOTAG_NAMES=on), which are always returned.",
            examples=[3],
        ),
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
    choice = TagChoice(top_k or settings.default_top_k, threshold, vocabulary, all, language)
    photos = [
        shape_result(upload.filename, outcome, served.tagger, choice)
        for upload, outcome in zip(uploads, outcomes, strict=True)
    ]
    language.stamp(response)
    return TagResponse(model=served.ref(), results=photos)


@dataclass(frozen=True)
class TagChoice:
    """What a request asked for of each photo's tags."""

    top_k: int
    threshold: float | None
    view: Literal["tags", "classes"]
    include_all: bool
    language: Language  # of the labels


def named_face(face: NamedFace) -> NamedFaceBox:
    left, top, right, bottom = face.box
    return NamedFaceBox(
        left=left,
        top=top,
        right=right,
        bottom=bottom,
        score=face.score,
        name=face.name,
        probability=face.probability,
    )


def shape_result(
    filename: str | None, outcome: Outcome, tagger: Tagger, choice: TagChoice
) -> PhotoResult:
    """One photo's outcome (probabilities and people tags, or an error) -> its result."""
    if isinstance(outcome, ApiError):
        error = {"code": outcome.code, "message": outcome.message}
        return PhotoResult(filename=filename, tags=[], error=error)
    scores = outcome.scores
    tags = [
        Tag(probability=t.probability, **choice.language.names(t.label, t.path))
        for t in tagger.tags(scores, choice.top_k, choice.threshold, choice.view, outcome.people)
    ]  # a raw class has no path: the field stays out of the response
    extra = {}
    if outcome.faces is not None:  # names on: each face with its name (never its descriptor)
        extra["faces"] = [named_face(f) for f in outcome.faces]
    if choice.include_all:
        extra["probabilities"] = dict(
            zip(tagger.classes, scores.probabilities.tolist(), strict=True)
        )
    return PhotoResult(filename=filename, tags=tags, **extra)


@api.get(
    "/v1/models",
    response_model=ModelList,
    responses={503: {"model": ErrorResponse}},
    summary="The served models: ids to pass as ?model=, versions, and the default",
)
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    summaries = [summary(*registry.get(i), registry.default_id) for i in registry.model_ids()]
    labels = request.app.state.labels
    return ModelList(
        default=registry.default_id,
        models=summaries,
        languages=[LanguageInfo(code=c, name=labels.name(c)) for c in labels.languages],
        default_language=request.app.state.default_language,
    )


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
    response_model_exclude_unset=True,  # path_labels: only in a language other than en
    responses={404: UNKNOWN_MODEL, 503: {"model": ErrorResponse}},
    summary="One served model in full: classes, preprocessing, metrics",
    description="With `?lang=` (or Accept-Language), the vocabulary's labels in that language "
    "and each tag's `path_labels`; paths stay in English.",
)
async def model_info(served: ServedDep, language: LanguageDep, response: Response) -> ModelInfo:
    card = served.tagger.card
    language.stamp(response)
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
        tta=card.tta,
        thresholds=card.thresholds,
        vocabulary=vocabulary_tags(served.tagger, language),
        metrics=card.metrics,
        description=card.description,
        created_at=card.created_at,
        device=str(served.tagger.device),
        backend=served.tagger.backend,
        precision=served.tagger.precision,
    )


def vocabulary_tags(tagger: Tagger, language: Language) -> list[VocabularyTag] | None:
    vocabulary = tagger.vocabulary
    if vocabulary is None:
        return None
    return [
        VocabularyTag(
            **language.names(tag.label, tag.path),
            threshold=tag.threshold_for(whole=not tagger.regions),
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
