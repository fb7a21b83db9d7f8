"""schemathesis against the app's own OpenAPI contract, in-process (issue 6): generated requests,
valid and invalid, to every operation; no answer may be a 5xx, and every answer must match the
schema (status documented, JSON body of the documented shape, headers, content type).

CI runs a bounded number of examples per operation (FUZZ_API_EXAMPLES, default 25); a long run:
``FUZZ_API_EXAMPLES=2000 .venv/bin/python -m pytest tests/app/test_fuzz_api.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.helpers import write_tiny_checkpoint

API_KEY = "fuzz-key-0123456789"
# Both of the schema's security schemes carry the key (the server takes either).
AUTH = {"X-API-Key": API_KEY, "Authorization": f"Bearer {API_KEY}"}
EXAMPLES = int(os.environ.get("FUZZ_API_EXAMPLES", "25"))


def load_schema() -> schemathesis.BaseSchema:
    """The app on a tiny checkpoint. Built at import: schemathesis parametrizes from the schema at
    collection (its lazy ``from_fixture`` loader does not run on this pytest)."""
    folder = Path(tempfile.mkdtemp(prefix="phototag-fuzz-"))
    checkpoint = write_tiny_checkpoint(folder / "tiny.safetensors")
    # With a key configured, as the schema's security schemes say; schemathesis also checks
    # that a request without it, or with a wrong one, is refused (401).
    settings = Settings(
        checkpoint=checkpoint, device="cpu", reload_interval_s=0, api_keys=[API_KEY]
    )
    app = create_app(settings)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = load_schema()


@pytest.fixture(scope="module", autouse=True)
def stop_the_app():
    """schemathesis starts the app's lifespan on the first request and keeps it; stop it here
    (batcher drained, threads joined) rather than at interpreter exit."""
    yield
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every CI run; a long run explores further
    suppress_health_check=list(HealthCheck),
)
def test_every_generated_request_gets_a_documented_non_5xx_answer(case):
    # All default checks but one: a schema-valid upload is any bytes ("format: binary"), which
    # OpenAPI cannot narrow to "a decodable photo", so random bytes are rightly refused (415).
    case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])
