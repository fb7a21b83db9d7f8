"""Custom tags over HTTP: teach, list, forget, correct (README: "Teach your own tags").

The photos of a teaching request are decoded by the server's Decoder and go through the
batcher like any upload (one forward pass gives their class probabilities and pooled
features); the fit then runs
on this module's own thread, never the batcher's inference thread, under a lock per tag so
that concurrent teaching of one tag never loses an example. The fitted heads are swapped into
the served :class:`model.tagger.Tagger` whole (one attribute assignment on the event loop): a
batch reads the old heads or the new.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal, cast

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile

from app.auth import AdminKey, ApiKey
from app.batcher import Batcher
from app.deps import (
    ERRORS,
    PHOTO,
    BatcherDep,
    DecoderDep,
    RegistryDep,
    ServedDep,
    SettingsDep,
    lifespan_state,
)
from app.errors import ApiError, ModelNotReady, coded_error
from app.pipeline import Decoder, Tagged, Upload, tag_uploads
from app.registry import ModelRegistry
from app.schemas import ErrorResponse, ModelRef
from app.settings import Settings
from app.uploads import _parse_form
from model.custom_tags import (
    NAME_PATTERN,
    CustomTag,
    CustomTagError,
    CustomTagStore,
    Examples,
    check_name,
)
from model.tagger import CUSTOM, Scores, Tagger
from model.teach import Limits, teach

router = APIRouter(dependencies=[ApiKey])

# model-side codes -> HTTP statuses
_STATUS = {
    "invalid_tag_name": 422,
    "unknown_tag": 404,
    "no_positives": 422,
    "limit_reached": 409,
    "stale_tag": 409,
    "invalid_tag_file": 409,
}


def api_error(error: CustomTagError) -> ApiError:
    return coded_error(error, _STATUS)


class Estimate(BaseModel):
    precision: float | None = Field(
        description="Of the photos the tag would be returned for, the share that have it: "
        "estimated by cross-validation on the examples; null without negative examples."
    )
    recall: float | None = Field(
        description="Of the photos that have the tag, the share it would be returned for "
        "(cross-validated); null with a single positive example."
    )
    folds: int = Field(description="Cross-validation folds; 0: too few examples to estimate.")


class CustomTagInfo(BaseModel):
    name: str = Field(examples=["shrek"])
    path: list[str] = Field(
        description="The tag's path in responses.", examples=[["custom", "shrek"]]
    )
    positives: int = Field(description="Positive example photos.")
    negatives: int = Field(description="Negative example photos.")
    builtin_negatives: int = Field(
        description="Built-in negatives it was fitted against: one per class of the model's "
        "classifier, minus the classes its positives look like."
    )
    threshold: float = Field(description="The probability from which the tag is returned.")
    estimate: Estimate
    stale: bool = Field(
        description="Taught on another version of the model: not served until taught again."
    )
    backbone: str = Field(description="The model version its examples were computed with.")
    space: str = Field(
        description="What its head reads: sqrt_probabilities+features+mid (the class "
        "probabilities, the pooled and the mid-level features: EfficientNet-Lite), "
        "sqrt_probabilities+features (other EfficientNets) or sqrt_probabilities (other "
        "networks). A tag kept before its model's heads read all that is served as it was; "
        "phototag teach --refit reads its photos again.",
        examples=["sqrt_probabilities+features+mid"],
    )
    created_at: str
    updated_at: str


class CustomTagList(BaseModel):
    model: ModelRef
    tags: list[CustomTagInfo]


class FeedbackResult(BaseModel):
    tag: str = Field(description="The tag the verdict was about.")
    verdict: Literal["right", "wrong"]
    effect: Literal["positive_example", "negative_example", "suppressed", "unsuppressed"] = Field(
        description="What the verdict did: a custom tag got an example (and was re-fitted); a "
        "vocabulary tag marked wrong is no longer returned for this photo and near copies of "
        "it; marked right, such marks near this photo are lifted."
    )
    custom_tag: CustomTagInfo | None = Field(None, description="The custom tag, re-fitted.")


def info(tag: CustomTag, backbone: str) -> CustomTagInfo:
    return CustomTagInfo(path=[CUSTOM, tag.name], **tag.info(backbone))


class CustomTags:
    """The store, the fitting thread and the locks of a server."""

    def __init__(self, settings: Settings) -> None:
        self.store = CustomTagStore(settings.custom_tags_folder)
        self.limits = Limits(settings.max_tag_examples, settings.max_custom_tags)
        self._executor: ThreadPoolExecutor | None = None  # the lifespan starts it
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="phototag-teach")

    def lock(self, model_id: str, name: str) -> asyncio.Lock:
        return self._locks[(model_id, name)]

    async def run(self, function, *args):
        """``function(*args)`` on the fitting thread; CustomTagError -> its ApiError, an
        unusable folder -> 503 naming the setting."""
        loop = asyncio.get_running_loop()
        if self._executor is None:
            raise ModelNotReady()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except CustomTagError as exc:
            raise api_error(exc) from None
        except OSError as exc:  # read-only (a k8s models volume), not a folder, disk full
            raise ApiError(
                503,
                "custom_tags_unavailable",
                f"the custom tags folder cannot be used ({exc.strerror}: {exc.filename}); "
                "give the server a writable PHOTOTAG_CUSTOM_TAGS_DIR",
                {"Retry-After": "60"},
            ) from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


async def get_custom_tags(request: Request) -> CustomTags:
    return cast(CustomTags, lifespan_state(request, "custom_tags"))


CustomTagsDep = Annotated[CustomTags, Depends(get_custom_tags)]
TagName = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        max_length=48,
        description="The tag: 1 to 48 lower-case letters, digits, '-' or '_', starting with a "
        "letter or digit.",
        examples=["shrek"],
    ),
]

_ADMIN = {"x-phototag-admin": True}  # app.contract declares the admin keys' 401 and 403
_TAGERRORS = {
    404: {
        "model": ErrorResponse,
        "description": "No such model (unknown_model) or custom tag (unknown_tag).",
    },
    409: {
        "model": ErrorResponse,
        "description": "A limit (limit_reached: PHOTOTAG_MAX_CUSTOM_TAGS, "
        "PHOTOTAG_MAX_TAG_EXAMPLES), or the tag was taught on another version of the model "
        "(stale_tag: delete it and teach it again).",
    },
}
_TEACH_BODY = {
    "requestBody": {
        "required": True,
        "description": "Example photos as multipart fields: `positive` (photos that have the "
        "tag) and/or `negative` (photos that do not), each repeated as needed, at most "
        "PHOTOTAG_MAX_FILES of each. All photos are "
        "read before anything is added: one that cannot be read refuses the request.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "positive": {"type": "array", "minItems": 1, "items": PHOTO},
                        "negative": {"type": "array", "minItems": 1, "items": PHOTO},
                    },
                    "anyOf": [{"required": ["positive"]}, {"required": ["negative"]}],
                },
                "encoding": {
                    "positive": {"contentType": "image/*"},
                    "negative": {"contentType": "image/*"},
                },
            }
        },
    },
    **_ADMIN,
}
_FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "description": "`file`: the photo; `tag`: the tag as returned, its path joined by `/` "
        "(`custom/shrek`, `animal/cat`) or its label; `verdict`: `right` or `wrong`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "tag", "verdict"],
                    "properties": {
                        "file": PHOTO,
                        "tag": {"type": "string", "minLength": 1, "maxLength": 200},
                        "verdict": {"type": "string", "enum": ["right", "wrong"]},
                    },
                },
                "encoding": {"file": {"contentType": "image/*"}},
            }
        },
    },
    **_ADMIN,
}


@router.get(
    "/v1/custom-tags",
    response_model=CustomTagList,
    responses={404: ERRORS[404], 503: {"model": ErrorResponse}},
    summary="A model's custom tags, with their examples, thresholds and estimates",
)
async def list_custom_tags(served: ServedDep, custom: CustomTagsDep) -> CustomTagList:
    tags = await custom.run(custom.store.load_all, served.model_id)
    backbone = served.tagger.probabilities_version
    return CustomTagList(model=served.ref(), tags=[info(t, backbone) for t in tags])


@router.post(
    "/v1/custom-tags/{name}/examples",
    response_model=CustomTagInfo,
    responses={**ERRORS, **_TAGERRORS},
    dependencies=[AdminKey],
    openapi_extra=_TEACH_BODY,
    summary="Teach a custom tag: add example photos and re-fit it",
    description="Creates the tag if needed, adds the photos as positive or negative examples "
    "and re-fits it (well under a second for tens of photos); the served model returns it from "
    'the next request, with path `["custom", name]`.\n\n'
    "`curl -F positive=@shrek1.jpg -F positive=@shrek2.jpg -F negative=@dog.jpg "
    "localhost:8000/v1/custom-tags/shrek/examples`",
)
async def add_examples(
    request: Request,
    name: TagName,
    served: ServedDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    batcher: BatcherDep,
    registry: RegistryDep,
    custom: CustomTagsDep,
) -> CustomTagInfo:
    positives, negatives = await _read_examples(request, settings)
    tagger = served.tagger
    scores = await _scores(positives + negatives, tagger, served.model_id, decoder, batcher)
    examples = Examples.of(scores)
    tag = await _teach(
        custom,
        registry,
        served.model_id,
        tagger,
        name,
        examples[: len(positives)],
        examples[len(positives) :],
    )
    return info(tag, tagger.probabilities_version)


@router.delete(
    "/v1/custom-tags/{name}",
    status_code=204,
    response_class=Response,
    responses={**_TAGERRORS, 503: {"model": ErrorResponse}},
    dependencies=[AdminKey],
    openapi_extra=_ADMIN,
    summary="Forget a custom tag: it is no longer returned, its file is deleted",
)
async def delete_custom_tag(
    name: TagName, served: ServedDep, registry: RegistryDep, custom: CustomTagsDep
) -> Response:
    async with custom.lock(served.model_id, name):
        await custom.run(custom.store.delete, served.model_id, name)
        _swap(registry, served.model_id, served.tagger, lambda h: h.without(name))
    return Response(status_code=204)


@router.post(
    "/v1/feedback",
    response_model=FeedbackResult,
    responses={**ERRORS, **_TAGERRORS},
    dependencies=[AdminKey],
    openapi_extra=_FEEDBACK_BODY,
    summary="Say a returned tag was right or wrong for a photo",
    description="A custom tag gets the photo as a positive (right) or negative (wrong) example "
    "and is re-fitted. A vocabulary tag marked wrong is no longer returned for this photo and "
    "near copies of it (pooled features at least 0.8 cosine-similar), and still is for other "
    "photos; marked right, such marks near this photo are lifted.",
)
async def feedback(
    request: Request,
    served: ServedDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    batcher: BatcherDep,
    registry: RegistryDep,
    custom: CustomTagsDep,
) -> FeedbackResult:
    photo, tag, verdict = await _read_feedback(request, settings)
    tagger = served.tagger
    [scores] = await _scores([photo], tagger, served.model_id, decoder, batcher)
    if tag.startswith(f"{CUSTOM}/"):
        name = tag.removeprefix(f"{CUSTOM}/")
        row = Examples.of([scores])
        positives, negatives = (row, row[:0]) if verdict == "right" else (row[:0], row)
        async with custom.lock(served.model_id, name):
            if not await custom.run(custom.store.exists, served.model_id, _checked(name)):
                raise ApiError(404, "unknown_tag", f"no custom tag {name!r}")
        taught = await _teach(custom, registry, served.model_id, tagger, name, positives, negatives)
        effect = "positive_example" if verdict == "right" else "negative_example"
        backbone = tagger.probabilities_version
        return FeedbackResult(
            tag=tag, verdict=verdict, effect=effect, custom_tag=info(taught, backbone)
        )
    label = tag.rsplit("/", 1)[-1]
    async with custom.lock(served.model_id, "_suppressions"):
        old = tagger.suppressions
        if verdict == "wrong":
            new = old.wrong(scores.features, label, tagger.probabilities_version)
        else:
            new = old.right(scores.features, label)
        await custom.run(custom.store.save_suppressions, served.model_id, new)
        tagger.suppressions = new  # the swap: one assignment
    effect = "suppressed" if verdict == "wrong" else "unsuppressed"
    return FeedbackResult(tag=tag, verdict=verdict, effect=effect)


def _checked(name: str) -> str:
    try:
        return check_name(name)
    except CustomTagError as exc:
        raise api_error(exc) from None


async def _teach(
    custom: CustomTags,
    registry: ModelRegistry,
    model_id: str,
    tagger: Tagger,
    name: str,
    positives: Examples,
    negatives: Examples,
) -> CustomTag:
    """Add the examples and re-fit, on the fitting thread, under the tag's lock; then swap the
    served heads."""
    _checked(name)
    async with custom.lock(model_id, name):
        tag = await custom.run(
            lambda: teach(
                custom.store,
                model_id,
                tagger.probabilities_version,
                tagger.space,
                name,
                positives,
                negatives,
                limits=custom.limits,
            )
        )
        _swap(registry, model_id, tagger, lambda h: h.with_tag(tag))
    return tag


def _swap(registry: ModelRegistry, model_id: str, tagger: Tagger, change) -> None:
    """Replace the heads of ``tagger`` and of the tagger now served as ``model_id`` (a reload
    may have swapped it meanwhile) with ``change(heads)``: on the event loop, one assignment
    each."""
    taggers = {id(tagger): tagger}
    try:
        _, current = registry.get(model_id)
        if current.probabilities_version == tagger.probabilities_version:
            taggers[id(current)] = current
    except ApiError:
        pass
    for each in taggers.values():
        each.custom_heads = change(each.custom_heads)


async def _scores(
    uploads: list[Upload], tagger: Tagger, model_id: str, decoder: Decoder, batcher: Batcher
) -> list[Scores]:
    """Every photo's scores; the first photo that cannot be read refuses the request."""
    outcomes = await tag_uploads(uploads, tagger, model_id, decoder, batcher)
    for outcome in outcomes:
        if isinstance(outcome, ApiError):
            raise outcome
    return [cast(Tagged, outcome).scores for outcome in outcomes]


async def _form(request: Request, settings: Settings, max_files: int) -> FormData:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type or '(none)'} is not accepted: send multipart/form-data",
        )
    return await _parse_form(request, settings, max_files)


def _files(form: FormData, field: str) -> list[Upload]:
    values = form.getlist(field)
    if not all(isinstance(v, UploadFile) for v in values):
        raise ApiError(
            400, "not_a_file", f"the `{field}` field must be a file upload (curl -F {field}=@x.jpg)"
        )
    uploads = []
    for value in values:
        value.file.seek(0)
        uploads.append(Upload(value.filename, value.file.read()))
    return uploads


async def _read_examples(request: Request, settings: Settings) -> tuple[list[Upload], list[Upload]]:
    form = await _form(request, settings, 2 * settings.max_files)
    try:
        positives, negatives = _files(form, "positive"), _files(form, "negative")
    finally:
        await form.close()
    if not positives and not negatives:
        raise ApiError(
            400,
            "no_file",
            "no example photo: send multipart fields named `positive` and/or `negative`, e.g. "
            "curl -F positive=@shrek.jpg",
        )
    if max(len(positives), len(negatives)) > settings.max_files:
        raise ApiError(
            400,
            "bad_request",
            f"at most {settings.max_files} positive and {settings.max_files} negative photos per "
            "request (PHOTOTAG_MAX_FILES)",
        )
    return positives, negatives


async def _read_feedback(request: Request, settings: Settings) -> tuple[Upload, str, str]:
    form = await _form(request, settings, 1)
    try:
        files = _files(form, "file")
        tag, verdict = form.get("tag"), form.get("verdict")
    finally:
        await form.close()
    if len(files) != 1:
        raise ApiError(400, "no_file", "send the photo as one multipart field named `file`")
    if not isinstance(tag, str) or not tag.strip() or len(tag) > 200:
        raise ApiError(422, "invalid_parameter", "tag: the tag as returned, e.g. custom/shrek")
    if verdict not in ("right", "wrong"):
        raise ApiError(422, "invalid_parameter", "verdict: right or wrong")
    return files[0], tag.strip(), verdict
