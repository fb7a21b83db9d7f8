"""Names over HTTP: teach a person's face, list, forget (README: "Name the people in your
photos"). Off unless the server sets PHOTOTAG_NAMES=on: then every route here answers 404
``names_off``.

A teaching photo is decoded by the server's Decoder under the usual limits; finding its face
and computing the face's descriptor run on a worker thread, never the event loop; the store
(:class:`model.people.names.NameStore`) serialises its writes, so concurrent teaching loses no
example. No route returns a descriptor.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import torch
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field

from app.auth import AdminKey, ApiKey
from app.custom_tags import _files, _form
from app.deps import ERRORS, PHOTO, DecoderDep, RegistryDep, ServedDep, SettingsDep
from app.errors import ApiError, coded_error
from app.registry import ModelRegistry
from app.schemas import ErrorResponse
from model.explain import scale_boxes
from model.imageio import full_size
from model.people import PEOPLE, FaceDetector
from model.people.names import NAME_PATTERN, Namer, NamesError

router = APIRouter(dependencies=[ApiKey])

# model-side codes -> HTTP statuses
_STATUS = {
    "invalid_name": 422,
    "unknown_name": 404,
    "no_face": 422,
    "several_faces": 422,
    "limit_reached": 409,
    "invalid_name_file": 409,
}


class PersonInfo(BaseModel):
    name: str = Field(examples=["Alice"])
    path: list[str] = Field(
        description="The person's tag path in responses.", examples=[["people", "Alice"]]
    )
    examples: int = Field(description="Example faces taught (their descriptors are kept).")


class PeopleList(BaseModel):
    people: list[PersonInfo]


PersonName = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        max_length=48,
        description="The person: 1 to 48 letters, digits, '-' or '_', starting with a letter or "
        "digit (not person, portrait or group).",
        examples=["Alice"],
    ),
]

_ADMIN = {"x-phototag-admin": True}
_NAMEERRORS = {
    404: {
        "model": ErrorResponse,
        "description": "Naming is off (names_off: PHOTOTAG_NAMES=on turns it on) or nobody has "
        "that name (unknown_name).",
    },
    409: {"model": ErrorResponse, "description": "Too many examples for one name."},
    503: {"model": ErrorResponse},
}
_TEACH_BODY = {
    "requestBody": {
        "required": True,
        "description": "`file`: photos of the person, each showing their face alone, repeated "
        "as needed; or one photo and `box` (`x0,y0,x1,y1`, the face's box in the photo's "
        "pixels) to pick their face among several. A photo with no face, or several and no "
        "box, refuses the request and nothing is added.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "minItems": 1, "items": PHOTO},
                        "box": {"type": "string", "examples": ["170,52,282,188"]},
                    },
                },
                "encoding": {"file": {"contentType": "image/*"}},
            }
        },
    },
    **_ADMIN,
}


def namer_of(registry: ModelRegistry) -> tuple[Namer, FaceDetector]:
    if registry.names is None or registry.people is None:
        raise ApiError(
            404,
            "names_off",
            "this server does not name people: its operator turns it on with PHOTOTAG_NAMES=on "
            "(and PHOTOTAG_PEOPLE=on); face descriptors are then kept in PHOTOTAG_NAMES_DIR",
        )
    return registry.names, registry.people


async def _run(function, *args):
    """``function(*args)`` on a worker thread; NamesError -> its ApiError, an unusable folder
    -> 503 naming the setting."""
    try:
        return await asyncio.to_thread(function, *args)
    except NamesError as exc:
        raise coded_error(exc, _STATUS) from None
    except OSError as exc:
        raise ApiError(
            503,
            "names_unavailable",
            f"the names folder cannot be used ({exc.strerror}: {exc.filename}); give the "
            "server a writable PHOTOTAG_NAMES_DIR",
            {"Retry-After": "60"},
        ) from None


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None or not text.strip():
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        x0 = y0 = x1 = y1 = float("nan")
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ApiError(
            422,
            "invalid_parameter",
            f"box={text!r}: the face's box as x0,y0,x1,y1 in the photo's pixels, x0 < x1 and "
            "y0 < y1, e.g. box=170,52,282,188",
        )
    return x0, y0, x1, y1


@router.get(
    "/v1/people",
    response_model=PeopleList,
    responses={404: _NAMEERRORS[404], 503: _NAMEERRORS[503]},
    summary="The people taught, with how many example faces each",
)
async def list_people(registry: RegistryDep) -> PeopleList:
    namer, _ = namer_of(registry)
    counts = await _run(namer.store.counts)
    return PeopleList(people=[person(n, c) for n, c in counts.items()])


def person(name: str, examples: int) -> PersonInfo:
    return PersonInfo(name=name, path=[PEOPLE, name], examples=examples)


@router.post(
    "/v1/people/{name}/examples",
    response_model=PersonInfo,
    responses={**ERRORS, **_NAMEERRORS},
    dependencies=[AdminKey],
    openapi_extra=_TEACH_BODY,
    summary="Teach a name: add photos of the person's face",
    description="Creates the name if needed and adds each photo's face as an example; from the "
    'next request a face close to one of them gets the tag with path `["people", name]`.\n\n'
    "`curl -F file=@alice.jpg localhost:8000/v1/people/Alice/examples`",
)
async def add_examples(
    request: Request,
    name: PersonName,
    served: ServedDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    registry: RegistryDep,
) -> PersonInfo:
    namer, detector = namer_of(registry)
    form = await _form(request, settings, settings.max_files)
    try:
        uploads = _files(form, "file")
        box_field = form.get("box")
    finally:
        await form.close()
    box = parse_box(box_field if isinstance(box_field, str) else request.query_params.get("box"))
    if not uploads:
        raise ApiError(400, "no_file", "no photo: send it as a multipart field named `file`")
    if box is not None and len(uploads) > 1:
        raise ApiError(400, "bad_request", "box picks a face in one photo: send one `file`")
    descriptors = []
    for upload in uploads:  # every photo is read before anything is added
        image = await decoder.image(upload.data, served.tagger)
        picked = None if box is None else scale_boxes([box], full_size(image), image.size)[0]
        try:
            descriptors.append(await _run(namer.example, detector, image, picked))
        except ApiError as error:
            if upload.filename:
                error.message = f"{upload.filename}: {error.message}"
            raise
    count = await _run(namer.store.add, name, torch.cat(descriptors))
    return person(name, count)


@router.delete(
    "/v1/people/{name}",
    status_code=204,
    response_class=Response,
    responses=_NAMEERRORS,
    dependencies=[AdminKey],
    openapi_extra=_ADMIN,
    summary="Forget a name: its file, with every face descriptor taught for it, is deleted",
)
async def delete_person(name: PersonName, registry: RegistryDep) -> Response:
    namer, _ = namer_of(registry)
    await _run(namer.store.remove, name)
    return Response(status_code=204)
