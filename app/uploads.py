"""The photos of a request: multipart ``file`` fields, or one raw ``image/*`` body."""

from __future__ import annotations

from contextlib import aclosing

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import ApiError
from app.pipeline import Upload
from app.settings import Settings


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


async def _parse_form(
    request: Request, settings: Settings, max_files: int | None = None
) -> FormData:
    """Starlette's multipart parser, with file parts kept in memory up to the body limit (which
    the body-size middleware already enforces on the whole request): a phone photo is 2-3 MB,
    and spooling each one to a temp file on disk cost a disk write and a thread hand-off per
    chunk. ``max_files``: most file parts (default PHOTOTAG_MAX_FILES)."""
    max_files = max_files or settings.max_files
    async with aclosing(request.stream()) as stream:
        parser = MultiPartParser(
            request.headers, stream, max_files=max_files, max_fields=max_files + 16,
        )  # fmt: skip
        parser.spool_max_size = settings.max_body_bytes
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, "bad_request", exc.message) from None


async def _read_multipart(request: Request, settings: Settings) -> list[Upload]:
    form = await _parse_form(request, settings)
    try:
        return _photos_of(form)
    finally:
        await form.close()


def _photos_of(form: FormData) -> list[Upload]:
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
    # in memory (see _parse_form): reading the spooled file is a plain copy, no thread needed
    return [Upload(f.filename, _contents(f)) for f in files]


def _contents(upload: UploadFile) -> bytes:
    upload.file.seek(0)
    return upload.file.read()
