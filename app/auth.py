"""Optional API keys: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.

Every configured key is compared, in constant time, against the one given, so neither the answer
nor its timing tells which keys exist or how much of one was right. Both failures are the same 401.
Whether a path needs a key is decided here, from the settings, and nowhere else: the served
contract (app.contract) declares the security schemes on exactly the paths that do.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi import Depends, Request

from app.errors import ApiError, Unauthorized
from app.settings import Settings

_HOW = "send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`"
_WHAT = "An API key from the server's PHOTOTAG_API_KEYS."

# The two ways to send a key, as OpenAPI security schemes (by name): declared on a path only when
# the server needs a key there (app.contract).
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": _WHAT},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": _WHAT},
}


def key_matches(given: str, keys: list[str]) -> bool:
    # Hashing first makes every comparison the same length, so not even a key's length leaks.
    digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return matched


def needs_key(settings: Settings, path: str) -> bool:
    return bool(settings.api_keys) and path not in settings.open_paths


def check_api_key(settings: Settings, path: str, given: list[str]) -> None:
    """Passes when ``path`` needs no key, or when any key ``given`` is accepted: the contract
    declares the two ways to send one as alternatives, so a right key in one is enough."""
    if not needs_key(settings, path):
        return
    if not given:
        raise Unauthorized(f"this server needs an API key: {_HOW}")
    accepted = False
    for key in given:  # every one compared, in constant time; an admin key is an API key too
        accepted |= key_matches(key, settings.api_keys + settings.admin_keys)
    if not accepted:
        raise Unauthorized(f"the API key was not accepted; {_HOW}")


def needs_admin_key(settings: Settings) -> bool:
    """Whether the routes that change what every client sees (custom tags, corrections) need
    a key from PHOTOTAG_ADMIN_KEYS: whenever the server has keys at all."""
    return bool(settings.api_keys or settings.admin_keys)


class Forbidden(ApiError):
    def __init__(self, message: str):
        super().__init__(403, "forbidden", message)


def check_admin_key(settings: Settings, given: list[str]) -> None:
    """401 without an accepted key; 403 for an API key that is not an admin key."""
    if not needs_admin_key(settings):
        return
    if not given:
        raise Unauthorized(f"changing tags needs an admin key: {_HOW}")
    admin = accepted = False
    for key in given:  # every one compared, in constant time
        admin |= key_matches(key, settings.admin_keys)
        accepted |= key_matches(key, settings.api_keys)
    if admin:
        return
    if not accepted:
        raise Unauthorized(f"the API key was not accepted; {_HOW}")
    raise Forbidden(
        "this key may tag photos but not change tags: that needs a key from the server's "
        "PHOTOTAG_ADMIN_KEYS"
    )


def given_keys(request: Request) -> list[str]:
    """The keys of ``X-API-Key`` and ``Authorization: Bearer``, those present."""
    keys = [request.headers.get("x-api-key", "")]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(credentials.strip())
    return [key for key in keys if key]


async def require_api_key(request: Request) -> None:
    """The guard of every API and operations route. ``async`` only so that FastAPI calls it on
    the event loop, not on a worker thread: it never waits."""
    settings: Settings = request.app.state.settings
    check_api_key(settings, request.scope["path"], given_keys(request))


async def require_admin_key(request: Request) -> None:
    """The guard of the routes that change what every client sees."""
    check_admin_key(request.app.state.settings, given_keys(request))


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
