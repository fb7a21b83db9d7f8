"""The served OpenAPI contract: FastAPI's schema of the routes, made to say what this server, with
its settings, answers. Built per app (``create_app``), never globally: two servers with different
settings publish different contracts.

What the routes cannot say by themselves, and is set here:
- security: the schemes are declared, with the 401, on exactly the paths that need a key
  (app.auth.needs_key); a server without PHOTOTAG_API_KEYS declares none; the operations that
  change what every client sees (marked ``x-phototag-admin`` by their routes) need an admin key
  whenever the server has keys (app.auth.needs_admin_key), with a 403 for a key that is not one;
- the label languages the server serves: the enum of every ``lang`` parameter;
- the upload limits: most photos per request (PHOTOTAG_MAX_FILES) and largest body
  (PHOTOTAG_MAX_BODY_BYTES, for /v1/explain too);
- the answers any request can get, whatever its route: 413 (a body over the limit), 431 (a request
  head over PHOTOTAG_MAX_HEADER_BYTES), 503 (over PHOTOTAG_MAX_CONNECTIONS, with Retry-After);
- 422 is the one error shape, never FastAPI's default validation body (app.errors answers every
  invalid parameter as ``{"error": {"code": "invalid_parameter", ...}}``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from app.auth import SECURITY_SCHEMES, needs_admin_key, needs_key
from app.settings import Settings
from model.labels import ENGLISH

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}}
# Answers of the server as a whole, possible on every operation.
_SERVER_WIDE: dict[str, dict[str, Any]] = {
    "413": {"description": "The request body is over PHOTOTAG_MAX_BODY_BYTES (payload_too_large)."},
    "431": {
        "description": "The request line and headers are over PHOTOTAG_MAX_HEADER_BYTES "
        "(headers_too_large); the connection is closed."
    },
    "503": {
        "description": "The server is busy or not ready: the model is loading, the photo queue "
        "is full, inference timed out, or the server holds PHOTOTAG_MAX_CONNECTIONS connections "
        "already. Retry after Retry-After seconds.",
        "headers": _RETRY_AFTER,
    },
}
_FORBIDDEN = (
    "An accepted API key that is not an admin key (forbidden): changing tags needs a key from "
    "PHOTOTAG_ADMIN_KEYS."
)
_UNAUTHORIZED = {
    "description": "No API key, or one the server does not accept (unauthorized).",
    "headers": _WWW_AUTHENTICATE,
}


def install_contract(
    app: FastAPI, settings: Settings, languages: Sequence[str] = (ENGLISH,)
) -> None:
    """Serve :func:`served_contract` at /openapi.json (and /docs) for ``app``."""
    generate = app.openapi  # FastAPI's own: the schema of the routes

    @functools.cache
    def openapi() -> dict[str, Any]:
        return served_contract(generate(), settings, languages)

    app.openapi = openapi  # type: ignore[method-assign]


def served_contract(
    schema: dict[str, Any], settings: Settings, languages: Sequence[str] = (ENGLISH,)
) -> dict[str, Any]:
    """FastAPI's schema of the routes -> the contract of a server with ``settings`` and the
    label ``languages`` it serves (a copy)."""
    schema = copy.deepcopy(schema)
    keyed = False
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query" and parameter["name"] == "lang":
                    parameter["schema"] = {"type": "string", "enum": list(languages)}
                    _unsupported_language(responses)
            admin = operation.pop("x-phototag-admin", False) and needs_admin_key(settings)
            if admin:
                responses["403"] = {"description": _FORBIDDEN, "content": _ERROR}
            if needs_key(settings, path) or admin:
                keyed = True
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                responses["401"] = {**_UNAUTHORIZED, "content": _ERROR}
            else:
                operation.pop("security", None)
                responses.pop("401", None)
            for status, response in _SERVER_WIDE.items():
                # a route's own description of the status (413 also for a too large image) stays
                described = responses.get(status, {}).get("description")
                responses[status] = {**response, "content": _ERROR}
                if described:
                    responses[status]["description"] = described
            if _is_fastapi_validation_error(responses.get("422")):
                responses["422"] = {
                    "description": "A query parameter is invalid (invalid_parameter).",
                    "content": _ERROR,
                }
    components = schema.setdefault("components", {})
    if keyed:
        components["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
    else:
        components.pop("securitySchemes", None)
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never sent
        components.get("schemas", {}).pop(unused, None)
    upload = schema["paths"]["/v1/tags"]["post"]["requestBody"]
    _limit_uploads(upload, settings)
    _limit_body(schema["paths"]["/v1/explain"]["post"]["requestBody"], settings)
    examples = schema["paths"]["/v1/custom-tags/{name}/examples"]["post"]["requestBody"]
    for field in ("positive", "negative"):
        examples["content"]["multipart/form-data"]["schema"]["properties"][field]["maxItems"] = (
            settings.max_files
        )
    examples["description"] += (
        f" At most {settings.max_files} of each per request (PHOTOTAG_MAX_FILES; more: 400)."
    )
    faces = schema["paths"]["/v1/people/{name}/examples"]["post"]["requestBody"]
    faces["content"]["multipart/form-data"]["schema"]["properties"]["file"]["maxItems"] = (
        settings.max_files
    )
    faces["description"] += f" At most {settings.max_files} per request (PHOTOTAG_MAX_FILES)."
    return schema


def _unsupported_language(responses: dict[str, Any]) -> None:
    described = responses.get("400", {}).get("description", "")
    responses["400"] = {
        "description": f"{described} A `lang` this server does not serve "
        "(unsupported_language; the message lists those it does).".strip(),
        "content": _ERROR,
    }


def _is_fastapi_validation_error(response: dict[str, Any] | None) -> bool:
    schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
    return schema.get("$ref", "").endswith("/HTTPValidationError")


def _limit_body(body: dict[str, Any], settings: Settings) -> None:
    body["description"] += (
        f" At most {settings.max_body_bytes} bytes of body (PHOTOTAG_MAX_BODY_BYTES; more: 413)."
    )


def _limit_uploads(body: dict[str, Any], settings: Settings) -> None:
    files = body["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    files["maxItems"] = settings.max_files
    body["description"] += (
        f" At most {settings.max_files} photos per request (PHOTOTAG_MAX_FILES; more: 400) and "
        f"{settings.max_body_bytes} bytes of body in all (PHOTOTAG_MAX_BODY_BYTES; more: 413)."
    )
