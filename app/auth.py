"""Optional API keys: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.

Every configured key is compared, in constant time, against the one given, so neither the answer
nor its timing tells which keys exist or how much of one was right. Both failures are the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Unauthorized
from app.settings import Settings

_HOW = "send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`"
_bearer = HTTPBearer(
    auto_error=False, description="An API key, when the server sets PHOTOTAG_API_KEYS."
)
_api_key = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="An API key, when the server sets PHOTOTAG_API_KEYS.",
)


def key_matches(given: str, keys: list[str]) -> bool:
    # Hashing first makes every comparison the same length, so not even a key's length leaks.
    digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return matched


def check_api_key(settings: Settings, path: str, given: str | None) -> None:
    if not settings.api_keys or path in settings.open_paths:
        return
    if not given:
        raise Unauthorized(f"this server needs an API key: {_HOW}")
    if not key_matches(given, settings.api_keys):
        raise Unauthorized(f"the API key was not accepted; {_HOW}")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_api_key)],
) -> None:
    """The API routes' guard (declared in OpenAPI as the two security schemes). ``async`` only
    so that FastAPI calls it on the event loop, not on a worker thread: it never waits."""
    given = header_key or (bearer.credentials if bearer else None)
    check_api_key(_settings(request), request.scope["path"], given)


async def require_api_key_unless_open(request: Request) -> None:
    """The operations routes' guard: open by default (PHOTOTAG_OPEN_PATHS), so not advertised."""
    given = request.headers.get("x-api-key")
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if not given and scheme.lower() == "bearer":
        given = credentials.strip()
    check_api_key(_settings(request), request.scope["path"], given)


ApiKey = Depends(require_api_key)
OpsApiKey = Depends(require_api_key_unless_open)
