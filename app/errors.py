"""One error type for the API, and the handlers that turn every error into the same JSON shape:
``{"error": {"code": "...", "message": "..."}}`` with a stable ``code`` and a human ``message``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.errors import CodedError
from model.imageio import PhotoError

log = logging.getLogger("phototag.errors")


class ApiError(Exception):
    """An error a client caused (or a state it should know about), with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


# The HTTP status of each model-side photo error code.
# A photo with no bytes is a photo that cannot be read, like a truncated one: 422. (An empty
# raw body, empty_body, is a request with no photo in it: 400.)
_PHOTO_STATUS = {
    "empty_file": 422,
    "image_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_image": 422,
}


def coded_error(error: CodedError, statuses: dict[str, int]) -> ApiError:
    """A model-side error as the API answers it: its code's status in ``statuses`` (422, the
    request's content refused, for any other), its code and message."""
    return ApiError(statuses.get(error.code, 422), error.code, error.message)


def photo_error(error: PhotoError) -> ApiError:
    """A photo the model side refused, as the API answers it."""
    return coded_error(error, _PHOTO_STATUS)


class Unauthorized(ApiError):
    def __init__(self, message: str):
        super().__init__(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


class UnknownModel(ApiError):
    def __init__(self, name: str, served: list[str]):
        super().__init__(
            404, "unknown_model", f"no model named {name!r}; served: {', '.join(served) or 'none'}"
        )


class ModelNotReady(ApiError):
    def __init__(self) -> None:
        super().__init__(
            503, "model_not_ready", "the model is still loading; try again shortly", _retry(1)
        )


class Overloaded(ApiError):
    """The inference queue is full: refuse at once rather than let the client hang."""

    def __init__(self, queued: int, limit: int):
        super().__init__(
            503,
            "overloaded",
            f"the server is busy ({queued} photos queued, limit {limit}); retry shortly",
            _retry(1),
        )


class ExplainOverloaded(ApiError):
    """Every explanation thread is busy and the explanation queue is full."""

    def __init__(self, admitted: int, limit: int):
        super().__init__(
            503,
            "overloaded",
            f"the server is busy explaining ({admitted} explanations running or waiting, limit "
            f"{limit}: PHOTOTAG_EXPLAIN_CONCURRENCY + PHOTOTAG_EXPLAIN_QUEUE); retry shortly",
            _retry(1),
        )


class UnsupportedLanguage(ApiError):
    def __init__(self, language: str, served: list[str]):
        super().__init__(
            400,
            "unsupported_language",
            f"no labels in language {language!r}; served: {', '.join(served)} (en: the "
            "vocabulary's own labels)",
        )


class UnknownTag(ApiError):
    def __init__(self, message: str):
        super().__init__(422, "unknown_tag", message)


class InferenceTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(
            503,
            "timeout",
            f"the photo was not tagged within {seconds:g} s (PHOTOTAG_REQUEST_TIMEOUT_S); the "
            "server is overloaded, retry later",
            _retry(2),
        )


class OutOfMemory(ApiError):
    def __init__(self) -> None:
        super().__init__(
            503,
            "out_of_memory",
            "the GPU ran out of memory on this photo even alone in its batch; retry later",
            _retry(2),
        )


class InferenceFailed(ApiError):
    def __init__(self, reason: str):
        super().__init__(500, "inference_failed", f"the model failed on this batch: {reason}")


class DecodeTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(
            422,
            "decode_timeout",
            f"the image took longer than {seconds:g} s to decode (PHOTOTAG_MAX_DECODE_SECONDS)",
        )


def _retry(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(seconds)}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The one JSON shape of every error the server answers."""
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up mid-upload: its fault, not ours. Without this handler it reached
        # the catch-all below, so any client could fill the log with 500s and tracebacks. The
        # answer is never read; its status is for the access log and metrics.
        return error_response(400, "client_disconnected", "the client closed the connection")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            500, "internal_error", "the server failed on this request; see its log"
        )
