"""HTTP only: read the uploads, call the tagger, shape the response."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import UploadFile

from app import images
from app.errors import ApiError
from app.schemas import ErrorResponse, Health, ModelInfo, ModelRef, PhotoResult, Tag, TagResponse
from app.settings import Settings
from app.tagger import Tagger

router = APIRouter()


def get_tagger(request: Request) -> Tagger:
    tagger: Tagger | None = getattr(request.state, "tagger", None)
    if tagger is None or not tagger.ready:
        raise ApiError(
            503,
            "model_not_ready",
            "the model is still loading; try again shortly",
            headers={"Retry-After": "1"},
        )
    return tagger


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


TaggerDep = Annotated[Tagger, Depends(get_tagger)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 503)}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "One or more photos: multipart fields named `file` (repeat the field for "
        "several photos), or one photo as the raw body with an `image/*` Content-Type.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass
class Upload:
    filename: str | None
    data: bytes


@router.post(
    "/v1/tags",
    response_model=TagResponse,
    response_model_exclude_unset=True,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
    summary="Tag photos",
    description="Per-class probabilities for each uploaded photo, top tags first.\n\n"
    "`curl -F file=@cat.jpg localhost:8000/v1/tags` or "
    "`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/tags`",
)
async def tag_photos(
    request: Request,
    tagger: TaggerDep,
    settings: SettingsDep,
    top_k: Annotated[int | None, Query(ge=1, description="Tags per photo (default 5).")] = None,
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
) -> TagResponse:
    uploads = await read_uploads(request, settings)
    decoded = await asyncio.gather(*(_decode(u, tagger, settings) for u in uploads))
    photos = [image for image in decoded if isinstance(image, Image.Image)]
    if not photos:
        raise decoded[0]  # every photo failed: answer with the (first) reason
    probabilities = iter(await run_in_threadpool(tagger.tag, photos))
    results = []
    for upload, image in zip(uploads, decoded, strict=True):
        if isinstance(image, ApiError):
            results.append(
                PhotoResult(
                    filename=upload.filename,
                    tags=[],
                    error={"code": image.code, "message": image.message},
                )
            )
        else:
            k = top_k or settings.default_top_k
            results.append(
                shape_result(upload.filename, next(probabilities), tagger, k, threshold, all)
            )
    return TagResponse(model=ModelRef(name=tagger.name, version=tagger.version), results=results)


async def _decode(upload: Upload, tagger: Tagger, settings: Settings) -> Image.Image | ApiError:
    try:
        return await run_in_threadpool(
            images.decode, upload.data, max_pixels=settings.max_pixels, draft_size=tagger.draft_size
        )
    except ApiError as error:
        if upload.filename:
            error.message = f"{upload.filename}: {error.message}"
        return error


def shape_result(
    filename: str | None,
    probs: torch.Tensor,
    tagger: Tagger,
    top_k: int,
    threshold: float | None,
    include_all: bool,
) -> PhotoResult:
    """One photo's probabilities (num_classes,) -> its top tags above the threshold."""
    classes = tagger.classes
    if threshold is not None:
        keep = probs >= threshold
    elif tagger.card.thresholds is not None:
        keep = probs >= torch.tensor(tagger.card.thresholds)
    else:
        keep = torch.ones_like(probs, dtype=torch.bool)
    values, indices = probs.topk(min(top_k, len(classes)))
    tags = [
        Tag(label=classes[i], probability=float(p))
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        if keep[i]
    ]
    if include_all:
        everything = dict(zip(classes, probs.tolist(), strict=True))
        return PhotoResult(filename=filename, tags=tags, probabilities=everything)
    return PhotoResult(filename=filename, tags=tags)


async def read_uploads(request: Request, settings: Settings) -> list[Upload]:
    """The photos of a multipart request (fields named ``file``) or of a raw ``image/*`` body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request, settings)
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        body = await request.body()
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty; send the photo's bytes")
        return [Upload(None, body)]
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media_type or '(none)'} is not accepted: send multipart/form-data with "
        "`file` fields (curl -F file=@photo.jpg) or the raw photo with an image/* Content-Type "
        "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg')",
    )


async def _read_multipart(request: Request, settings: Settings) -> list[Upload]:
    async with request.form(
        max_files=settings.max_files, max_fields=settings.max_files + 16
    ) as form:
        fields = form.multi_items()
        files = [value for name, value in fields if name == "file"]
        if not files:
            other = sorted({name for name, value in fields if isinstance(value, UploadFile)})
            hint = f" (got file fields named {', '.join(other)})" if other else ""
            raise ApiError(
                400,
                "no_file",
                "no photo in the request: send each photo in a multipart "
                f"field named `file`, e.g. curl -F file=@photo.jpg{hint}",
            )
        if not all(isinstance(f, UploadFile) for f in files):
            raise ApiError(
                400,
                "not_a_file",
                "the `file` field must be a file upload (curl -F file=@photo.jpg, with the @)",
            )
        return [Upload(f.filename, await f.read()) for f in files]


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: {"model": ErrorResponse}},
    summary="The served model: classes, preprocessing, metrics",
)
async def model_info(tagger: TaggerDep) -> ModelInfo:
    card = tagger.card
    return ModelInfo(
        name=card.name,
        version=tagger.version,
        task=card.task,
        arch=card.arch,
        classes=card.classes,
        preprocessing=card.preprocess.to_dict(),
        temperature=card.temperature,
        thresholds=card.thresholds,
        metrics=card.metrics,
        description=card.description,
        created_at=card.created_at,
        device=str(tagger.device),
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorResponse}},
    summary="Readiness: a model is loaded and warmed up",
)
async def readyz(tagger: TaggerDep) -> Health:
    return Health(status="ready")
