"""Operations: batching through the app, backpressure, API keys, metrics, request ids and
structured logs, CORS, and the OpenAPI contract."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.auth import key_matches
from app.logs import JsonFormatter, KeyValueFormatter
from app.settings import Settings
from model.tagger import Tagger
from tests.helpers import photo_bytes


def tag(client, headers: dict[str, str] | None = None, **params):
    return client.post(
        "/v1/tags", params=params, headers=headers, files={"file": ("a.jpg", photo_bytes())}
    )


def metric(client, metric_name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == metric_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return sample.value
    return 0.0


@pytest.fixture
def forward_sizes(monkeypatch):
    """Every forward pass's batch size, through the real Tagger."""
    sizes: list[int] = []
    original = Tagger.outputs  # what the batcher calls, once per batch

    def spy(self, batch):
        sizes.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(Tagger, "outputs", spy)
    return sizes


def test_concurrent_requests_are_batched_together(client_for, tiny_checkpoint, forward_sizes):
    client = client_for(tiny_checkpoint, max_batch_size=8, max_batch_wait_ms=500)
    forward_sizes.clear()  # the warm-up passes
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: tag(client), range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert sum(forward_sizes) == 8
    assert max(forward_sizes) >= 4, forward_sizes  # not one pass per request
    assert metric(client, "phototag_batch_size_count", model="tiny") == len(forward_sizes)
    assert metric(client, "phototag_batch_size_sum", model="tiny") == 8


def block_forward_passes(monkeypatch) -> threading.Event:
    """Every forward pass from now on waits for the returned gate (a stuck GPU); the gate's
    ``entered`` is set once one is waiting."""
    gate = threading.Event()
    gate.entered = threading.Event()
    original = Tagger.outputs

    def blocked(self, batch):
        gate.entered.set()
        gate.wait(10)
        return original(self, batch)

    monkeypatch.setattr(Tagger, "outputs", blocked)
    return gate


def test_a_full_queue_answers_503_with_retry_after_at_once(
    client_for, tiny_checkpoint, monkeypatch
):
    # max_queue counts every photo admitted: the one in the forward pass and the queued one
    client = client_for(tiny_checkpoint, max_queue=2, max_batch_size=1, max_batch_wait_ms=0)
    gate = block_forward_passes(monkeypatch)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(tag, client)
            assert gate.entered.wait(5)  # first is in the forward pass, blocked
            second = pool.submit(tag, client)  # queued: the queue is now full
            for _ in range(200):
                if metric(client, "phototag_queue_depth") == 1:
                    break
                threading.Event().wait(0.02)
            started = time.monotonic()
            refused = tag(client)
            refused_after = time.monotonic() - started
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        gate.set()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "1"
    assert refused_after < 1.0


def test_a_request_not_served_in_time_is_503_timeout(client_for, tiny_checkpoint, monkeypatch):
    client = client_for(tiny_checkpoint, request_timeout_s=0.2)
    gate = block_forward_passes(monkeypatch)
    try:
        r = tag(client)
    finally:
        gate.set()
    assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
    assert "Retry-After" in r.headers
    assert tag(client).status_code == 200  # healthy afterwards


# --- API keys


@pytest.fixture
def keyed(client_for, tiny_checkpoint):
    return client_for(tiny_checkpoint, api_keys="first-key, second-key")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer second-key"},
        {"X-API-Key": "first-key"},
        {"x-api-key": "second-key"},
        # the contract declares the two ways as alternatives: a right key in one is enough
        {"X-API-Key": "wrong", "Authorization": "Bearer first-key"},
        {"X-API-Key": "second-key", "Authorization": "Bearer wrong"},
    ],
)
def test_a_valid_api_key_is_accepted_in_either_header(keyed, headers):
    assert tag(keyed, headers).status_code == 200
    assert keyed.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "first-ke"},
        {"X-API-Key": "first-key-and-more"},
        {"Authorization": "Basic Zmlyc3Qta2V5"},
        {"Authorization": "Bearer nope"},
        {"X-API-Key": "nope", "Authorization": "Bearer first-ke"},
    ],
)
def test_a_missing_or_wrong_key_is_401_revealing_nothing(keyed, headers):
    r = tag(keyed, headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert "first" not in r.text and "second" not in r.text


def test_wrong_keys_all_get_the_same_answer(keyed):
    answers = {tag(keyed, {"X-API-Key": k}).text for k in ("a", "first-ke", "second-kex", "x" * 99)}
    assert len(answers) == 1


def test_health_metrics_and_the_page_stay_open_by_default(keyed):
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_open_paths_are_configurable(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, api_keys="k", open_paths="/healthz")
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_key_comparison_checks_every_key():
    assert key_matches("b", ["a", "b", "c"]) and not key_matches("", ["a"])
    assert not key_matches("a ", ["a"])


# --- metrics, request ids, logs


def test_metrics_count_requests_by_route_and_status(client):
    tag(client)
    client.post("/v1/tags", content=b"junk", headers={"Content-Type": "image/png"})
    client.get("/v1/nothing-here")
    assert metric(client, "phototag_requests_total", route="/v1/tags", status="200") == 1
    assert metric(client, "phototag_requests_total", route="/v1/tags", status="415") == 1
    assert metric(client, "phototag_requests_total", route="unmatched", status="404") == 1
    assert metric(client, "phototag_request_seconds_count", route="/v1/tags") == 2
    assert metric(client, "phototag_decode_seconds_count") == 1
    assert metric(client, "phototag_decode_failures_total", code="unsupported_media_type") == 1
    assert metric(client, "phototag_inference_seconds_count", model="tiny") == 1
    assert metric(client, "phototag_model_info", model="tiny", name="tiny", device="cpu") == 1
    assert metric(client, "phototag_model_loads_total", model="tiny", result="ok") == 1
    assert metric(client, "phototag_queue_depth") == 0


def test_each_app_has_its_own_metrics(client_for, tiny_checkpoint):
    one, two = client_for(tiny_checkpoint), client_for(tiny_checkpoint)
    tag(one)
    assert metric(one, "phototag_requests_total", route="/v1/tags") == 1
    assert metric(two, "phototag_requests_total", route="/v1/tags") == 0


def test_metrics_can_be_turned_off(client_for, tiny_checkpoint):
    assert client_for(tiny_checkpoint, metrics=False).get("/metrics").status_code == 404


def test_a_sane_client_request_id_is_echoed_and_logged(client, caplog):
    caplog.set_level(logging.INFO, logger="phototag.access")
    r = tag(client, {"X-Request-ID": "app-42.retry:1"})
    assert r.headers["X-Request-ID"] == "app-42.retry:1"
    [record] = [rec for rec in caplog.records if rec.name == "phototag.access"]
    assert record.request_id == "app-42.retry:1" and record.status == 200
    assert record.route == "/v1/tags" and record.method == "POST"


@pytest.mark.parametrize("given", ["", "has space", "x" * 200, "new\nline"])
def test_an_insane_request_id_is_replaced(client, given):
    r = client.get("/healthz", headers={"X-Request-ID": given} if "\n" not in given else {})
    assert len(r.headers["X-Request-ID"]) == 32 and r.headers["X-Request-ID"] != given


def test_errors_carry_the_request_id_too(client):
    r = client.post("/v1/tags", content=b"", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and r.headers["X-Request-ID"]


def access_record() -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": "phototag.access", "msg": "request", "levelname": "INFO", "levelno": 20}
    )
    record.request_id, record.status, record.path = "abc", 200, "/v1/tags"
    return record


def test_json_logs_are_one_object_per_line():
    line = JsonFormatter().format(access_record())
    assert json.loads(line) | {"ts": None} == {
        "ts": None,
        "level": "info",
        "logger": "phototag.access",
        "msg": "request",
        "request_id": "abc",
        "status": 200,
        "path": "/v1/tags",
    }


def test_text_logs_are_key_value_pairs():
    line = KeyValueFormatter().format(access_record())
    assert " level=info logger=phototag.access msg=request request_id=abc status=200 " in line


# --- CORS and OpenAPI


def test_cors_is_off_unless_origins_are_configured(client, client_for, tiny_checkpoint):
    preflight = {"Origin": "https://photos.example", "Access-Control-Request-Method": "POST"}
    assert (
        "access-control-allow-origin" not in client.options("/v1/tags", headers=preflight).headers
    )
    cors = client_for(tiny_checkpoint, cors_origins="https://photos.example")
    r = cors.options(
        "/v1/tags", headers=preflight | {"Access-Control-Request-Headers": "x-api-key"}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://photos.example"
    answer = cors.get("/healthz", headers={"Origin": "https://photos.example"})
    assert "X-Request-ID" in answer.headers["access-control-expose-headers"]


def test_openapi_documents_routes_forms_errors_and_limits(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/tags", "/v1/models", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    post = spec["paths"]["/v1/tags"]["post"]
    body = post["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} == set(body)
    files = body["multipart/form-data"]["schema"]["properties"]["file"]
    assert (files["minItems"], files["maxItems"]) == (1, Settings().max_files)
    assert body["image/*"]["schema"]["minLength"] == 1
    assert str(Settings().max_body_bytes) in post["requestBody"]["description"]
    assert {"model", "top_k", "threshold", "all"} <= {p["name"] for p in post["parameters"]}
    assert {"200", "400", "404", "413", "415", "422", "431", "500", "503"} == set(post["responses"])
    assert post["responses"]["503"]["headers"]["Retry-After"]["required"]
    # every error is the one JSON shape, FastAPI's default 422 body included
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    for path in spec["paths"].values():
        for operation in path.values():
            for status, response in operation["responses"].items():
                if status >= "400":
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith(
                        "/ErrorResponse"
                    )
    assert schemas["TagResponse"]["examples"][0]["results"][0]["tags"]
    assert schemas["ErrorResponse"]["examples"]


def operations(spec: dict) -> dict[tuple[str, str], dict]:
    """(path, method) -> the operation, for every operation of the contract."""
    return {(p, m): operation for p, ops in spec["paths"].items() for m, operation in ops.items()}


def test_openapi_without_keys_declares_no_security(client):
    spec = client.get("/openapi.json").json()
    assert "securitySchemes" not in spec["components"]
    for path, operation in operations(spec).items():
        assert "security" not in operation, path
        assert "401" not in operation["responses"], path
    assert client.get("/v1/models", headers={"X-API-Key": "made-up"}).status_code == 200


def test_openapi_with_keys_declares_them_on_the_paths_that_need_one(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, api_keys="k", open_paths="/healthz,/readyz")
    spec = client.get("/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    for (path, method), operation in operations(spec).items():
        needs_key = path not in ("/healthz", "/readyz")
        assert ("security" in operation) == needs_key, path
        assert ("401" in operation["responses"]) == needs_key, path
        assert (client.request(method, path).status_code == 401) == needs_key, path
    metrics = operations(spec)[("/metrics", "get")]
    assert metrics["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]


def test_the_contract_follows_each_apps_settings(client_for, tiny_checkpoint):
    """Two apps in one process publish two contracts: nothing of it is global."""
    few = client_for(tiny_checkpoint, max_files=2, api_keys="k").get("/openapi.json").json()
    many = client_for(tiny_checkpoint, max_files=9).get("/openapi.json").json()

    def max_files(spec: dict) -> int:
        body = spec["paths"]["/v1/tags"]["post"]["requestBody"]["content"]
        return body["multipart/form-data"]["schema"]["properties"]["file"]["maxItems"]

    assert (max_files(few), max_files(many)) == (2, 9)
    assert "securitySchemes" in few["components"] and "securitySchemes" not in many["components"]


def test_warm_up_runs_a_single_photo_and_a_full_batch(client_for, tiny_checkpoint, monkeypatch):
    sizes = []
    original = Tagger.probabilities
    monkeypatch.setattr(
        Tagger, "probabilities", lambda s, b: sizes.append(len(b)) or original(s, b)
    )
    client_for(tiny_checkpoint, max_batch_size=6)
    assert sizes == [1, 6]


def test_the_api_reports_the_package_version(client):
    import tomllib

    from tests.helpers import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert client.get("/openapi.json").json()["info"]["version"] == project["version"]
