"""The dependencies and OpenAPI pieces every router shares: typed ``Annotated`` dependencies on
the lifespan's objects (registry, batcher, decoder), the settings and metrics, the served model a
request asked for, and the error responses and photo field the routes declare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Query, Request

from app.batcher import Batcher
from app.errors import ModelNotReady
from app.metrics import Metrics
from app.pipeline import Decoder
from app.registry import ModelRegistry
from app.schemas import ErrorResponse, ModelRef
from app.settings import Settings
from model.tagger import Tagger

# Dependencies are ``async def``: FastAPI runs a plain ``def`` one on a worker thread, a thread
# hand-off per dependency per request for what is a dictionary lookup.


def lifespan_state(request: Request, name: str) -> object:
    value = getattr(request.state, name, None)
    if value is None:  # the lifespan has not started (or has stopped) serving
        raise ModelNotReady()
    return value


async def get_registry(request: Request) -> ModelRegistry:
    return cast(ModelRegistry, lifespan_state(request, "registry"))


async def get_batcher(request: Request) -> Batcher:
    return cast(Batcher, lifespan_state(request, "batcher"))


async def get_decoder(request: Request) -> Decoder:
    return cast(Decoder, lifespan_state(request, "decoder"))


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

UNKNOWN_MODEL = {"model": ErrorResponse, "description": "`?model=` names no served model "
                  "(unknown_model; the message lists the served ones)."}  # fmt: skip
_ERROR_TEXT = {
    400: "Nothing to tag, or a malformed body: empty_body, no_file, not_a_file, "
    "bad_request (a broken multipart body, or more than PHOTOTAG_MAX_FILES photos).",
    404: UNKNOWN_MODEL["description"],
    413: "The body is over PHOTOTAG_MAX_BODY_BYTES (payload_too_large), or the image is over "
    "PHOTOTAG_MAX_PIXELS (image_too_large).",
    415: "A Content-Type other than multipart/form-data, image/* or application/octet-stream, or "
    "bytes of no accepted image format (unsupported_media_type).",
    422: "An empty photo (empty_file), a corrupt or truncated one (invalid_image), one slower "
    "to decode than "
    "PHOTOTAG_MAX_DECODE_SECONDS (decode_timeout), or a bad query parameter (invalid_parameter).",
    500: "The model failed on the photo's batch (inference_failed), or a bug (internal_error).",
    503: "Busy or not ready (model_not_ready, overloaded, timeout, out_of_memory, "
    "shutting_down; or the server holds PHOTOTAG_MAX_CONNECTIONS connections), with Retry-After.",
}
ERRORS = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_TEXT.items()
}  # every status a route that takes photos can answer, with what it means
# An empty photo is refused: 400 empty_body (raw), 422 empty_file where a route takes one photo.
PHOTO = {"type": "string", "format": "binary", "minLength": 1}
# A photo of a batch (several `file` parts): an empty one is allowed by the contract, and it is
# that photo's result that says so (error empty_file), while the other photos are tagged.
BATCH_PHOTO = {
    "type": "string",
    "format": "binary",
    "description": "A photo. An empty part is not refused with the request: its result carries "
    "`error: {code: empty_file}` and the other photos are tagged.",
}
