"""The photos of a request: multipart ``file`` fields, or one raw ``image/*`` body."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile

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
