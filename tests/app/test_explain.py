"""POST /v1/explain: the heatmap of a tag as JSON or a PNG overlay, its errors, its own limits;
a people tag's faces as JSON boxes or the photo with the boxes drawn."""

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
    # the whole photo's top tag: an explanation reads the whole photo, not its regions
    client = client_for(vocabulary_checkpoint, regions=0)
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


def test_a_custom_tag_is_explained_by_its_path_with_the_probability_tags_gives_it(
    client_for, vocabulary_checkpoint
):
    client = client_for(vocabulary_checkpoint)
    red = [photo_bytes(color=(200, 30, 30), seed=i) for i in range(3)]
    blue = [photo_bytes(color=(30, 30, 200), seed=i) for i in range(3)]
    files = [("positive", (f"p{i}.jpg", p)) for i, p in enumerate(red)]
    files += [("negative", (f"n{i}.jpg", n)) for i, n in enumerate(blue)]
    assert client.post("/v1/custom-tags/reddish/examples", files=files).status_code == 200
    r = client.post("/v1/tags?threshold=0&top_k=10", files={"file": ("p.jpg", PHOTO)})
    served = next(t for t in r.json()["results"][0]["tags"] if t["label"] == "reddish")
    assert served["path"] == ["custom", "reddish"]
    r = explain(client, "?tag=custom/reddish")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tag"]["label"] == "reddish" and body["tag"]["path"] == ["custom", "reddish"]
    assert body["tag"]["probability"] == pytest.approx(served["probability"], abs=1e-5)
    assert body["method"] == "hirescam" and len(body["grid"]) == 8
    assert explain(client, "?tag=reddish").json()["tag"] == body["tag"]  # no tag of its own
    r = explain(client, "?tag=custom/reddish", accept="image/png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert unquote(r.headers["X-Tag"]) == "reddish"
    assert float(r.headers["X-Tag-Probability"]) == pytest.approx(served["probability"], abs=1e-4)
    assert Image.open(io.BytesIO(r.content)).size == (120, 80)
    r = explain(client, "?tag=custom/bluish")
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_tag"
    assert "custom/reddish" in r.json()["error"]["message"]
    r = explain(client, "?tag=custom/reddish&vocabulary=classes")  # as in /v1/tags: classes only
    assert r.json()["error"]["code"] == "unknown_tag"


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


# ---- people tags: the faces, not a heatmap


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    """scikit-image's astronaut as a JPEG: 512 x 512, one face (tests/model/test_people.py)."""
    skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image ([dev])")
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


# where her face is in the 512 x 512 photo (looked at): forehead to chin
ASTRONAUT_FACE = (170, 50, 280, 185)


def people_probabilities(client, photo: bytes) -> dict[str, float]:
    r = client.post("/v1/tags?top_k=20", files={"file": ("p.jpg", photo)})
    tags = r.json()["results"][0]["tags"]
    return {t["label"]: t["probability"] for t in tags if t["path"][0] == "people"}


def test_a_people_tag_answers_with_the_faces_boxes_in_the_photos_pixels(client, astronaut):
    r = explain(client, "?tag=person", photo=astronaut)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["id"] == "tiny" and body["filename"] == "p.jpg"
    assert body["method"] == "faces" and "grid" not in body
    assert (body["width"], body["height"]) == (512, 512)
    [face] = body["faces"]
    left, top, right, bottom = ASTRONAUT_FACE
    assert left < (face["left"] + face["right"]) / 2 < right
    assert top < (face["top"] + face["bottom"]) / 2 < bottom
    assert 60 < face["right"] - face["left"] < 140 and face["score"] > 0.8
    served = people_probabilities(client, astronaut)  # what /v1/tags says of the same photo
    assert set(served) == {"person", "portrait"}
    assert body["tag"] == {
        "label": "person",
        "probability": pytest.approx(served["person"]),
        "path": ["people", "person"],
    }
    assert explain(client, "?tag=people/person", photo=astronaut).json() == body  # its path
    portrait = explain(client, "?tag=people/portrait", photo=astronaut).json()
    assert portrait["tag"]["probability"] == pytest.approx(served["portrait"])
    assert portrait["faces"] == body["faces"]
    group = explain(client, "?tag=group", photo=astronaut).json()  # not hers: 0, same face
    assert group["tag"]["probability"] == 0.0 and group["faces"] == body["faces"]


def test_a_people_tag_as_png_is_the_photo_with_the_face_boxed(client, astronaut):
    box = explain(client, "?tag=person", photo=astronaut).json()["faces"][0]
    r = explain(client, "?tag=person", accept="image/png", photo=astronaut)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert (unquote(r.headers["X-Tag"]), r.headers["X-Faces"]) == ("person", "1")
    assert float(r.headers["X-Tag-Probability"]) > 0.8
    drawn = Image.open(io.BytesIO(r.content))
    assert (drawn.format, drawn.size) == ("PNG", (512, 512))
    middle = round((box["top"] + box["bottom"]) / 2)
    amber, black = (255, 214, 0), (0, 0, 0)
    # the box's left side: a light line just inside it, a dark rim just outside
    assert drawn.getpixel((round(box["left"]) + 1, middle)) == amber
    assert drawn.getpixel((round(box["left"]) - 1, middle)) == black
    assert drawn.getpixel((round(box["right"]) - 2, middle)) == amber


def test_a_photo_without_a_face_gets_no_faces_and_the_photo_as_it_is(client):
    body = explain(client, "?tag=person").json()
    assert body["method"] == "faces" and body["faces"] == []
    assert body["tag"]["probability"] == 0.0 and (body["width"], body["height"]) == (120, 80)
    big = photo_bytes((1600, 400), fmt="PNG")  # and the overlay's size rule: at most 1024 px
    r = explain(client, "?tag=person", accept="image/png", photo=big)
    assert r.headers["X-Faces"] == "0" and r.headers["X-Tag-Probability"] == "0.0000"
    drawn = Image.open(io.BytesIO(r.content))
    original = Image.open(io.BytesIO(big)).convert("RGB").resize((1024, 256), Image.BILINEAR)
    assert drawn.size == (1024, 256) and drawn.tobytes() == original.tobytes()


def test_people_tags_with_people_off_are_refused_saying_how_to_turn_them_on(client_for, tmp_path):
    client = client_for(write_tiny_checkpoint(tmp_path / "t.safetensors"), people="off")
    for tag in ("person", "people/group"):
        # refused before the body is read: an empty one would be 400 empty_body
        r = client.post(
            f"/v1/explain?tag={tag}", content=b"", headers={"Content-Type": "image/jpeg"}
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "people_off"
        assert "PHOTOTAG_PEOPLE=off" in error["message"]
        assert "PHOTOTAG_PEOPLE=on" in error["message"]
    assert explain(client, "?tag=red").status_code == 200  # the network's tags still are


def test_the_models_own_tag_of_a_people_name_wins_and_its_path_reaches_the_faces(
    client_for, tmp_path, astronaut
):
    vocabulary = {
        "name": "with-person",
        "tags": [
            {"label": "person", "path": ["person"], "threshold": 0.5, "classes": ["red"]},
            {"label": "cool", "path": ["cool"], "threshold": 0.5, "classes": ["green", "blue"]},
        ],
        "hidden": [],
    }
    client = client_for(write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=vocabulary))
    assert explain(client, "?tag=person", photo=astronaut).json()["method"] == "hirescam"
    assert explain(client, "?tag=people/person", photo=astronaut).json()["method"] == "faces"


def test_people_tags_are_no_raw_classes_and_unknown_tags_name_them(client):
    r = explain(client, "?tag=person&vocabulary=classes")  # /v1/tags gives classes no people
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_tag"
    r = explain(client, "?tag=people/crowd")
    assert r.status_code == 422
    assert "people/person, people/portrait, people/group" in r.json()["error"]["message"]


def test_faces_are_found_on_an_explanation_thread_never_the_batchers(
    client, monkeypatch, astronaut
):
    _, tagger = client.app.state.registry.get()
    threads: list[str] = []
    detect = tagger.people.detect

    def noted(image):
        threads.append(threading.current_thread().name)
        return detect(image)

    monkeypatch.setattr(tagger.people, "detect", noted)
    before = inference_passes(client)
    assert explain(client, "?tag=person", photo=astronaut).status_code == 200
    assert inference_passes(client) == before
    assert len(threads) == 1 and threads[0].startswith("phototag-explain"), threads


def test_the_contract_documents_the_faces_answer(client):
    spec = client.get("/openapi.json").json()
    answer = spec["paths"]["/v1/explain"]["post"]["responses"]["200"]
    schemas = {
        s["$ref"].rsplit("/", 1)[-1]
        for s in answer["content"]["application/json"]["schema"]["anyOf"]
    }
    assert schemas == {"ExplainResponse", "PeopleExplainResponse"}
    assert "X-Faces" in answer["headers"]
    people = spec["components"]["schemas"]["PeopleExplainResponse"]
    assert {"tag", "method", "width", "height", "faces"} <= set(people["required"])
    face = spec["components"]["schemas"]["FaceBox"]["properties"]
    assert set(face) == {"left", "top", "right", "bottom", "score"}


def test_a_person_with_no_face_is_explained_by_the_category_that_showed_it(client_for, tmp_path):
    # every class is sport: the classifier sees what people do on any photo, and no face is on it
    vocabulary = {
        "name": "all-sport",
        "tags": [{"label": "sport", "path": ["sport"], "threshold": 0.5, "classes": TINY_CLASSES}],
        "hidden": [],
    }
    client = client_for(write_tiny_checkpoint(tmp_path / "s.safetensors", vocabulary=vocabulary))
    [person] = [t for t in tags_of(client) if t["label"] == "person"]
    assert person["path"] == ["people", "person"]
    body = explain(client, "?tag=person").json()
    assert body["tag"] == {**person, "probability": pytest.approx(person["probability"], abs=1e-4)}
    assert body["via"]["label"] == "sport" and body["method"] == "hirescam" and body["grid"]
    r = explain(client, "?tag=people/person", accept="image/png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["X-Tag"], r.headers["X-Via"]) == ("person", "sport")
