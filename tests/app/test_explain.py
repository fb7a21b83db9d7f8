"""POST /v1/explain: the heatmap of a tag as JSON or a PNG overlay, its errors, its own limits."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

import app.explain
from app.explain import wants_png
from model.runtime import openvino_installed
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint
from tests.model.test_vocabulary import TREE

PHOTO = photo_bytes((120, 80), color=(30, 60, 200), seed=3, noise=60)


@pytest.fixture
def vocabulary_checkpoint(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "colours.safetensors", seed=2, vocabulary=TREE)


def explain(client, query: str = "", accept: str | None = None, photo: bytes = PHOTO):
    headers = {"Accept": accept} if accept else {}
    return client.post(f"/v1/explain{query}", files={"file": ("p.jpg", photo)}, headers=headers)


def tags_of(client) -> list[dict]:
    r = client.post("/v1/tags", files={"file": ("p.jpg", PHOTO)})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["tags"]


def class_probabilities(client) -> dict[str, float]:
    """/v1/tags' probability of every class (TREE: warm is red's, cool green's plus blue's)."""
    r = client.post("/v1/tags?all=true", files={"file": ("p.jpg", PHOTO)})
    return r.json()["results"][0]["probabilities"]


def test_json_gives_the_tag_its_probability_a_normalised_grid_and_where_it_lies(
    client_for, vocabulary_checkpoint
):
    client = client_for(vocabulary_checkpoint)
    r = explain(client, "?tag=cool")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"]["id"] == "colours" and body["filename"] == "p.jpg"
    assert body["method"] == "hirescam"
    served = class_probabilities(client)  # what /v1/tags says of the same photo
    assert body["tag"]["label"] == "cool" and body["tag"]["path"] == ["colour", "cool"]
    expected = served["green"] + served["blue"]
    assert body["tag"]["probability"] == pytest.approx(expected, abs=1e-5)
    grid = body["grid"]
    assert len(grid) == 8 and {len(row) for row in grid} == {8}  # seed_cnn's map at 32 px
    cells = [v for row in grid for v in row]
    assert min(cells) >= 0 and max(cells) == 1.0
    # 120 x 80 at resize 36, crop 32: the middle 32/36 of the height, 71 of the 120 columns
    region = body["region"]
    assert region["top"] == pytest.approx(2 / 36) and region["bottom"] == pytest.approx(34 / 36)
    assert region["right"] - region["left"] == pytest.approx(32 / 54)


def test_without_a_tag_the_top_tag_is_explained(client_for, vocabulary_checkpoint):
    client = client_for(vocabulary_checkpoint)
    [top, *_] = tags_of(client)
    body = explain(client).json()
    assert body["tag"]["label"] == top["label"]
    assert body["tag"]["probability"] == pytest.approx(top["probability"], abs=1e-5)


def test_a_raw_class_is_explained_with_vocabulary_classes(client_for, vocabulary_checkpoint):
    client = client_for(vocabulary_checkpoint)
    body = explain(client, "?tag=green&vocabulary=classes").json()
    assert body["tag"]["label"] == "green" and "path" not in body["tag"]
    expected = class_probabilities(client)["green"]
    assert body["tag"]["probability"] == pytest.approx(expected, abs=1e-5)


def test_accept_image_png_gives_the_overlay_at_the_photos_size(client_for, vocabulary_checkpoint):
    client = client_for(vocabulary_checkpoint)
    r = explain(client, "?tag=blue", accept="image/png")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert unquote(r.headers["X-Tag"]) == "blue"
    assert 0 <= float(r.headers["X-Tag-Probability"]) <= 1
    overlay = Image.open(io.BytesIO(r.content))
    assert (overlay.format, overlay.size) == ("PNG", (120, 80))
    # a raw body works too, and what a browser's <img> asks for is an image
    browser = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"
    r = client.post(
        "/v1/explain", content=PHOTO, headers={"Content-Type": "image/jpeg", "Accept": browser}
    )
    assert r.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("accept", "png"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("image/png", True),
        ("image/*", True),
        ("image/png, application/json", False),  # a tie: JSON
        ("application/json;q=0.5, image/png", True),
        ("image/png;q=0", False),
        ("text/html", False),
    ],
)
def test_content_negotiation(accept, png):
    assert wants_png(accept) is png


def test_a_large_photo_gets_an_overlay_no_larger_than_1024_px(client_for, tmp_path):
    client = client_for(write_tiny_checkpoint(tmp_path / "t.safetensors"))
    r = explain(client, accept="image/png", photo=photo_bytes((1600, 400), fmt="PNG"))
    assert Image.open(io.BytesIO(r.content)).size == (1024, 256)


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({"files": {"other": ("p.jpg", PHOTO)}}, 400, "no_file"),
        ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty_body"),
        ({"files": [("file", ("a.jpg", PHOTO)), ("file", ("b.jpg", PHOTO))]}, 400, "bad_request"),
        ({"files": {"file": ("x.pdf", b"%PDF-1.7 no")}}, 415, "unsupported_media_type"),
        ({"files": {"file": ("x.jpg", PHOTO[:200])}}, 422, "invalid_image"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, None),
    ],
)
def test_bad_uploads_are_refused_as_by_tags(client, request_args, status, code):
    r = client.post("/v1/explain", **request_args)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == (code or "unsupported_media_type")


def test_an_unknown_tag_says_where_the_known_ones_are(client_for, vocabulary_checkpoint):
    client = client_for(vocabulary_checkpoint)
    r = explain(client, "?tag=purple")
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "unknown_tag"
    assert "purple" in error["message"] and "GET /v1/model?model=colours" in error["message"]
    r = explain(client, "?tag=cool&vocabulary=classes")  # a tag, not a class
    assert r.json()["error"]["code"] == "unknown_tag"
    assert explain(client, "?tag=").status_code == 422  # an empty tag is not "no tag"


def test_an_unknown_model_is_404(client):
    r = explain(client, "?model=nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"


def test_explain_needs_the_api_key_like_tags(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, api_keys=["k1"])
    assert explain(client).status_code == 401
    r = client.post("/v1/explain", files={"file": ("p.jpg", PHOTO)}, headers={"X-API-Key": "k1"})
    assert r.status_code == 200, r.text


def inference_passes(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("phototag_inference_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_explanations_never_go_through_the_batcher(client):
    before = inference_passes(client)
    assert explain(client).status_code == 200
    assert inference_passes(client) == before


@pytest.fixture
def held_explanations(monkeypatch):
    """Explanations that start, say so, and wait for ``release`` before doing their work."""
    started, release = threading.Event(), threading.Event()
    original = app.explain._explain

    def held(*args):
        started.set()
        assert release.wait(30), "the test never released the explanation"
        return original(*args)

    monkeypatch.setattr(app.explain, "_explain", held)
    yield started, release
    release.set()


def test_a_full_explanation_pool_refuses_at_once_and_tagging_goes_on(
    client_for, tiny_checkpoint, held_explanations
):
    started, release = held_explanations
    client = client_for(tiny_checkpoint, explain_concurrency=1, explain_queue=0)
    first: dict[str, object] = {}
    thread = threading.Thread(target=lambda: first.update(r=explain(client)))
    thread.start()
    assert started.wait(30)  # the one explanation thread is taken
    refused = explain(client)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert "PHOTOTAG_EXPLAIN_CONCURRENCY" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == "1"
    for _ in range(3):  # tagging is not held up by the explanation in progress
        r = client.post("/v1/tags", files={"file": ("p.jpg", PHOTO)})
        assert r.status_code == 200, r.text
    release.set()
    thread.join(30)
    assert first["r"].status_code == 200, first["r"].text
    assert explain(client).status_code == 200  # the room is given back


def test_queued_explanations_wait_their_turn(
    client_for, tiny_checkpoint, held_explanations, monkeypatch
):
    started, release = held_explanations
    queued = threading.Event()  # the second explanation waits for the one thread
    original_run = app.explain.ExplainPool.run
    calls: list[int] = []

    async def run(self, work, *args):
        calls.append(1)
        if len(calls) == 2:
            queued.set()
        return await original_run(self, work, *args)

    monkeypatch.setattr(app.explain.ExplainPool, "run", run)
    client = client_for(tiny_checkpoint, explain_concurrency=1, explain_queue=1)
    answers: list[int] = []

    def ask() -> None:
        answers.append(explain(client).status_code)

    threads = [threading.Thread(target=ask), threading.Thread(target=ask)]
    threads[0].start()
    assert started.wait(30)
    threads[1].start()
    assert queued.wait(30)
    refused = explain(client)  # a third, beyond one running and one waiting
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    release.set()
    for thread in threads:
        thread.join(30)
    assert answers == [200, 200]


@pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed")
def test_openvino_serves_tags_and_a_torch_copy_explains(client_for, vocabulary_checkpoint):
    client = client_for(vocabulary_checkpoint, backend="openvino")
    assert client.get("/v1/model").json()["backend"] == "openvino"
    body = explain(client, "?tag=warm").json()
    served = class_probabilities(client)  # OpenVINO's; the explanation's are torch's
    assert body["tag"]["probability"] == pytest.approx(served["red"], abs=1e-4)
    assert max(v for row in body["grid"] for v in row) in (0.0, 1.0)
    _, tagger = client.app.state.registry.get()
    assert tagger.backend == "openvino"
    assert type(tagger.explainer().net).__name__ == "TaggerNet"  # torch, on the CPU
    assert {p.device.type for p in tagger.explainer().net.parameters()} == {"cpu"}
    assert set(TINY_CLASSES) <= set(tagger.classes)
