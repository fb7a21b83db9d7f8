"""POST /v1/explain: why a photo got a tag, as a heatmap (JSON grid or a PNG overlay), or, for a
people tag (person, portrait, group: from the face detector, not the network), the faces found
(JSON boxes or the photo with the boxes drawn).

Explanations need gradients, so they never run on the batcher's inference thread (whose runtime
may be OpenVINO): each runs on a torch copy of the network on the CPU (``Tagger.explainer``),
on this module's own small pool of threads (PHOTOTAG_EXPLAIN_CONCURRENCY), behind its own
admission limit (PHOTOTAG_EXPLAIN_QUEUE more may wait; beyond that, 503 at once, before
decoding). /v1/tags keeps its queue, its batches and its thread to itself. A people tag's
faces are found on the same threads, behind the same admission, on the same decoded photo.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar, cast
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from PIL import Image

from app.auth import ApiKey
from app.batcher import ShuttingDown
from app.deps import ERRORS, PHOTO, DecoderDep, ServedDep, SettingsDep, lifespan_state
from app.errors import ApiError, ExplainOverloaded, InferenceTimeout, UnknownTag
from app.language import Language, LanguageDep
from app.schemas import (
    ExplainResponse,
    FaceBox,
    ModelRef,
    PeopleExplainResponse,
    Region,
    Tag,
)
from app.uploads import read_uploads
from model import explain
from model.explain import Heatmap
from model.imageio import full_size
from model.people import PEOPLE, PEOPLE_TAGS, Face, people_tags
from model.tagger import Tagger, View
from model.tagger import UnknownTag as UnknownModelTag

log = logging.getLogger("phototag.explain")

T = TypeVar("T")

# The PNG overlay is the photo as decoded, scaled down to this many pixels on its longer side
# (a phone photo's full size would be a 20 MB PNG, and take a second to encode).
OVERLAY_MAX_SIDE = 1024


class ExplainPool:
    """The threads explanations run on, and their admission: at most ``concurrency`` at once,
    ``queue`` more waiting; a request beyond that is refused at once (503 + Retry-After)."""

    def __init__(self, concurrency: int, queue: int, timeout_s: float) -> None:
        self.limit = concurrency + queue
        self.timeout_s = timeout_s
        self._admitted = 0
        self._closing = False
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="phototag-explain")

    @property
    def admitted(self) -> int:
        return self._admitted

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Reserve room for one explanation before its photo is decoded (the event loop is
        single-threaded: no lock needed)."""
        if self._closing:
            raise ShuttingDown()
        if self._admitted >= self.limit:
            raise ExplainOverloaded(self._admitted, self.limit)
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def run(self, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` on an explanation thread, within PHOTOTAG_REQUEST_TIMEOUT_S."""
        context = contextvars.copy_context()  # the request id follows it into its thread
        future = self._executor.submit(context.run, work, *args)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise InferenceTimeout(self.timeout_s) from None
        finally:
            future.cancel()  # still waiting for a thread (timed out, client gone): never runs

    def close(self) -> None:
        self._closing = True
        self._executor.shutdown(wait=True, cancel_futures=True)


async def get_explain_pool(request: Request) -> ExplainPool:
    return cast(ExplainPool, lifespan_state(request, "explainer"))


ExplainPoolDep = Annotated[ExplainPool, Depends(get_explain_pool)]

explain_api = APIRouter(dependencies=[ApiKey])

_ONEPHOTO = {
    "requestBody": {
        "required": True,
        "description": "One photo: a multipart field named `file`, or the raw body with an "
        "`image/*` or `application/octet-stream` Content-Type. The format is read from the "
        "bytes, as for /v1/tags.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": PHOTO},
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            "image/*": {"schema": PHOTO},
            "application/octet-stream": {"schema": PHOTO},
        },
    }
}
_EXPLAINERRORS = {
    **ERRORS,
    400: {
        **ERRORS[400],
        "description": ERRORS[400]["description"] + " More than one photo (bad_request): "
        "one photo per explanation.",
    },
    422: {
        **ERRORS[422],
        "description": ERRORS[422]["description"] + " A `tag` the model does not have "
        "(unknown_tag; GET /v1/model lists its tags and classes, GET /v1/custom-tags its custom "
        "tags). A people tag on a server "
        "whose face detector is off (people_off: PHOTOTAG_PEOPLE=on turns it on).",
    },
    503: {
        **ERRORS[503],
        "description": ERRORS[503]["description"] + " Explanations have their own limit "
        "(PHOTOTAG_EXPLAIN_CONCURRENCY running + PHOTOTAG_EXPLAIN_QUEUE waiting): overloaded.",
    },
}
_PNG = {
    200: {
        "description": "The heatmap: JSON (ExplainResponse: a grid over the region the network "
        "saw), or with `Accept: image/png` the photo with the heatmap drawn over it (X-Tag names "
        "the tag, percent-encoded UTF-8, and X-Tag-Probability its probability). For a people "
        "tag, the faces the detector found: JSON (PeopleExplainResponse: method `faces`, their "
        "boxes in the photo's pixels), or the photo with their boxes drawn (X-Faces: how many).",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            "X-Tag": {"schema": {"type": "string"}, "description": "The tag explained."},
            "X-Tag-Probability": {"schema": {"type": "string"}},
            "X-Faces": {
                "schema": {"type": "string"},
                "description": "A people tag's PNG only: the number of faces drawn.",
            },
        },
    }
}


@explain_api.post(
    "/v1/explain",
    response_model=ExplainResponse | PeopleExplainResponse,
    response_model_exclude_unset=True,
    responses={**_PNG, **_EXPLAINERRORS},
    openapi_extra=_ONEPHOTO,
    summary="Why this tag: where in the photo a tag's evidence is",
    description="A heatmap of one tag on one photo (HiResCAM, of the Grad-CAM family, on the "
    "network's last feature map): JSON by default, the photo with the heatmap over it as a PNG "
    "with `Accept: image/png`. Without `tag`, the photo's top tag. A custom tag "
    "(`custom/NAME`) is explained the same way, through its head's score.\n\n"
    "A people tag (`person`, `portrait`, `group`, or as its path: `people/person`) comes from "
    "the face detector, not the network: its answer is the faces the detector found on the "
    "photo, every one of them (JSON boxes, or the photo with the boxes drawn); none found is a "
    "200 with no faces.\n\n"
    "`curl -F file=@cat.jpg 'localhost:8000/v1/explain?tag=cat'` or "
    "`curl -H 'Accept: image/png' -F file=@cat.jpg localhost:8000/v1/explain -o why.png`",
)
async def explain_photo(
    request: Request,
    served: ServedDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    pool: ExplainPoolDep,
    language: LanguageDep,
    response: Response,
    tag: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=500,
            description="The tag to explain: a label of the model's vocabulary (or, with "
            "`vocabulary=classes`, one of its classes); GET /v1/model lists both. Or a custom "
            "tag: `custom/NAME` (GET /v1/custom-tags lists them). Or a people tag: "
            "`people/person`, `people/portrait`, `people/group`. A custom or people tag may be "
            "named by its bare label where the model has no tag of that name. Default: the "
            "photo's top tag.",
            examples=["cat"],
        ),
    ] = None,
    vocabulary: Annotated[
        Literal["tags", "classes"],
        Query(description="`tags` (default): `tag` is a vocabulary tag; `classes`: a class."),
    ] = "tags",
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response | ExplainResponse | PeopleExplainResponse:
    tagger = served.tagger
    people = people_tag(tag, tagger, vocabulary)  # refused before the body is read
    if people is not None and tagger.people is None:
        raise ApiError(
            422,
            "people_off",
            f"{PEOPLE}/{people} is a people tag, from the face detector, and this server has "
            "it off (PHOTOTAG_PEOPLE=off): no photo gets people tags; start the server with "
            "PHOTOTAG_PEOPLE=on to get them and see their faces",
        )
    if tag is not None and people is None:
        try:
            tagger.target(tag, vocabulary)
        except UnknownModelTag as error:
            where = f"GET /v1/model?model={served.model_id} lists them: vocabulary[].label, or "
            where += "classes[] with ?vocabulary=classes"
            if vocabulary == "tags":
                where += f"; custom tags (custom/NAME): GET /v1/custom-tags?model={served.model_id}"
            if tagger.people is not None and vocabulary == "tags":
                where += "; people tags: " + ", ".join(f"{PEOPLE}/{t}" for t in PEOPLE_TAGS)
            raise UnknownTag(f"{error}; {where}") from None
    uploads = await read_uploads(request, settings)
    if len(uploads) > 1:
        raise ApiError(
            400, "bad_request", f"one photo per explanation, got {len(uploads)}: send one `file`"
        )
    upload = uploads[0]
    png = wants_png(accept)
    language.stamp(response)  # the JSON answers; a PNG is stamped where it is made
    with pool.admit():
        image = await decoder.image(upload.data, tagger)
        via = None  # the category that showed a person with no face
        if people is not None:
            found = await pool.run(_faces, tagger, image, people, png)
            without_face = None
            if people == "person" and not found.faces:
                without_face = await pool.run(_person_without_face, tagger, image, png)
            if without_face is None:
                return _faces_answer(served.ref(), upload.filename, image, found, language)
            done, via = without_face, without_face.heatmap
        else:
            done = await pool.run(_explain, tagger, image, tag, vocabulary, png)
    heatmap = done.heatmap
    label, path = ("person", (PEOPLE, "person")) if via else (heatmap.tag, heatmap.path)
    probability = min(max(heatmap.probability, 0.0), 1.0)
    if png:
        shown = language.names(label, path)["label"]  # in the request's language
        headers = {"X-Tag": quote(shown), "X-Tag-Probability": f"{probability:.4f}"}
        if via:
            headers["X-Via"] = quote(language.names(via.tag, via.path)["label"])
        return language.stamp(Response(done.png, media_type="image/png", headers=headers))
    left, top, right, bottom = explain.region(image.size, tagger.card.preprocess)
    return ExplainResponse(
        model=served.ref(),
        filename=upload.filename,
        tag=Tag(probability=probability, **language.names(label, path)),
        method=explain.METHOD,
        grid=[[round(float(v), 4) for v in row] for row in heatmap.grid],
        region=Region(left=left, top=top, right=right, bottom=bottom),
        **(
            {"via": Tag(probability=probability, **language.names(via.tag, via.path))}
            if via
            else {}
        ),
    )


def people_tag(tag: str | None, tagger: Tagger, view: View) -> str | None:
    """The label of the people tag ``tag`` asks for, by its path (``people/person``) or by its
    label alone (``person``) where the model has no tag of that name (the model's own tags come
    first); with names on, a taught name by its path (``people/Alice``); None for any other
    tag."""
    if tag is None or view == "classes":  # the raw classes have no people tags, as in /v1/tags
        return None
    parent, _, label = tag.rpartition("/")
    if parent == PEOPLE and label not in PEOPLE_TAGS and tagger.names is not None:
        return label  # a name: its faces answer (none where the photo does not show them)
    if label not in PEOPLE_TAGS or parent not in ("", PEOPLE):
        return None
    if not parent:
        try:
            tagger.target(label, view)
            return None
        except UnknownModelTag:
            pass
    return label


@dataclass
class _Found:
    """A people tag's explanation: the faces on the photo, in its decoded pixels."""

    label: str
    probability: float  # the tag's, from the faces: what /v1/tags gives; 0 when it has not
    faces: list[Face]
    png: bytes | None


def _faces(tagger: Tagger, image: Image.Image, label: str, png: bool) -> _Found:
    """On an explanation thread: the faces, the people tag's probability, and the photo with every
    face's box drawn when it is wanted."""
    assert tagger.people is not None
    faces = tagger.people.detect(image)
    if label in PEOPLE_TAGS:
        tags = {t.label: t.probability for t in people_tags(faces, image.size)}
        probability = tags.get(label, 0.0)
    else:  # a taught name: only the face it names, with its probability
        assert tagger.names is not None
        named = tagger.names.name(image, faces)
        faces = [f for f, n in zip(faces, named, strict=True) if n.name == label]
        probability = max((n.probability or 0.0 for n in named if n.name == label), default=0.0)
    drawn = explain.faces_png(image, [f.box for f in faces], OVERLAY_MAX_SIDE) if png else None
    return _Found(label, probability, faces, drawn)


def _person_without_face(tagger: Tagger, image: Image.Image, png: bool) -> _Done | None:
    """On an explanation thread: the heatmap of the category that showed a person where no face
    did (what gave /v1/tags its ``person``), drawn when it is wanted; None where none did."""
    heatmap = tagger.person_heatmap(tagger.crop(image))
    if heatmap is None:
        return None
    if not png:
        return _Done(heatmap, None)
    return _Done(
        heatmap, explain.overlay_png(image, heatmap, tagger.card.preprocess, OVERLAY_MAX_SIDE)
    )


def _faces_answer(
    model: ModelRef, filename: str | None, image: Image.Image, found: _Found, language: Language
) -> Response | PeopleExplainResponse:
    probability = min(max(found.probability, 0.0), 1.0)
    if found.png is not None:
        headers = {
            "X-Tag": quote(language.names(found.label, (PEOPLE, found.label))["label"]),
            "X-Tag-Probability": f"{probability:.4f}",
            "X-Faces": str(len(found.faces)),
        }
        return language.stamp(Response(found.png, media_type="image/png", headers=headers))
    size = full_size(image)  # the photo as sent: the decoded one may be a JPEG draft
    boxes = explain.scale_boxes([f.box for f in found.faces], image.size, size)
    return PeopleExplainResponse(
        model=model,
        filename=filename,
        tag=Tag(probability=probability, **language.names(found.label, (PEOPLE, found.label))),
        method="faces",
        width=size[0],
        height=size[1],
        faces=[
            FaceBox(
                left=round(max(x0, 0.0), 1),
                top=round(max(y0, 0.0), 1),
                right=round(max(x1, 0.0), 1),
                bottom=round(max(y1, 0.0), 1),
                score=round(min(max(face.score, 0.0), 1.0), 4),
            )
            for face, (x0, y0, x1, y1) in zip(found.faces, boxes, strict=True)
        ],
    )


@dataclass
class _Done:
    heatmap: Heatmap
    png: bytes | None


def _explain(
    tagger: Tagger, image: Image.Image, tag: str | None, view: Literal["tags", "classes"], png: bool
) -> _Done:
    """On an explanation thread: crop, explain, and draw the overlay when it is wanted."""
    heatmap = tagger.explain(tagger.crop(image), tag, view)
    if not png:
        return _Done(heatmap, None)
    overlay = explain.overlay_png(image, heatmap, tagger.card.preprocess, OVERLAY_MAX_SIDE)
    return _Done(heatmap, overlay)


def wants_png(accept: str | None) -> bool:
    """Whether the Accept header prefers image/png (or image/*) to JSON; JSON on a tie, and when
    the header asks for neither."""
    quality = {"json": -1.0, "png": -1.0}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in ("image/png", "image/*"):
            quality["png"] = max(quality["png"], q)
        if media in ("application/json", "application/*", "*/*"):
            quality["json"] = max(quality["json"], q)
    return quality["png"] > 0 and quality["png"] > quality["json"]
