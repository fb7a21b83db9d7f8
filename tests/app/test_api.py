"""The tagging API of the foundation: upload forms, response shape, probabilities, errors."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.settings import Settings
from model.checkpoint import load
from model.imageio import decode
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint


def direct_probabilities(checkpoint_path: Path, data: bytes, max_pixels: int = 60_000_000):
    """What the API must return: the same network on the same preprocessed input, by hand."""
    checkpoint = load(checkpoint_path)
    card = checkpoint.card
    gap = Settings.model_fields["jpeg_reducing_gap"].default
    image = decode(data, max_pixels=max_pixels, draft_size=round(gap * card.preprocess.resize))
    from model.preprocess import build_eval_transform

    x = build_eval_transform(card.preprocess)(image).unsqueeze(0)
    with torch.inference_mode():
        logits = checkpoint.build_model()(x) / card.temperature
    return torch.sigmoid(logits)[0] if card.task == "multi_label" else logits.softmax(1)[0]


def test_multipart_upload_returns_sorted_tags_with_model_and_version(client, tiny_checkpoint):
    r = client.post("/v1/tags", files={"file": ("red.jpg", photo_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "tiny"
    assert body["model"]["version"] == load(tiny_checkpoint).version
    [result] = body["results"]
    assert result["filename"] == "red.jpg"
    probabilities = [t["probability"] for t in result["tags"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert {t["label"] for t in result["tags"]} == set(TINY_CLASSES)  # top_k 5 > 3 classes
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert "probabilities" not in result


def test_probabilities_equal_a_direct_forward_pass(client_for, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "t.safetensors", seed=3, temperature=1.7)
    client = client_for(ckpt)
    data = photo_bytes((90, 70), color=(20, 180, 60), seed=5)
    r = client.post("/v1/tags?all=true", files={"file": ("g.jpg", data, "image/jpeg")})
    served = r.json()["results"][0]["probabilities"]
    expected = direct_probabilities(ckpt, data)
    assert list(served) == TINY_CLASSES
    assert torch.allclose(torch.tensor(list(served.values())), expected, atol=1e-6)


def test_multi_label_models_use_sigmoid_and_their_thresholds(client_for, tmp_path):
    ckpt = write_tiny_checkpoint(
        tmp_path / "ml.safetensors", task="multi_label", thresholds=[0.0, 1.0, 0.0]
    )
    client = client_for(ckpt)
    data = photo_bytes()
    r = client.post("/v1/tags?all=true", files={"file": ("a.png", data, "image/png")})
    result = r.json()["results"][0]
    expected = direct_probabilities(ckpt, data)
    assert torch.allclose(torch.tensor(list(result["probabilities"].values())), expected, atol=1e-6)
    assert {t["label"] for t in result["tags"]} == {"red", "blue"}  # green's threshold is 1.0
    r = client.post("/v1/tags?threshold=0", files={"file": ("a.png", data, "image/png")})
    assert len(r.json()["results"][0]["tags"]) == 3


def test_raw_body_upload_is_tagged_like_multipart(client):
    data = photo_bytes(fmt="PNG")
    raw = client.post("/v1/tags", content=data, headers={"Content-Type": "image/png"})
    form = client.post("/v1/tags", files={"file": ("x.png", data, "image/png")})
    assert raw.status_code == 200, raw.text
    assert raw.json()["results"][0]["filename"] is None
    assert raw.json()["results"][0]["tags"] == form.json()["results"][0]["tags"]


def test_several_files_in_one_request_keep_their_order(client):
    files = [
        ("file", ("one.jpg", photo_bytes(color=(250, 0, 0)), "image/jpeg")),
        ("file", ("two.png", photo_bytes(color=(0, 0, 250), fmt="PNG"), "image/png")),
        ("file", ("three.gif", photo_bytes(fmt="GIF"), "image/gif")),
    ]
    r = client.post("/v1/tags?top_k=2", files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["one.jpg", "two.png", "three.gif"]
    assert all(len(x["tags"]) == 2 for x in results)


def test_top_k_and_threshold_filter_the_tags(client):
    files = {"file": ("a.jpg", photo_bytes(), "image/jpeg")}
    r = client.post("/v1/tags?top_k=1", files=files)
    assert len(r.json()["results"][0]["tags"]) == 1
    r = client.post("/v1/tags?threshold=0.999", files=files)
    assert r.json()["results"][0]["tags"] == []


def test_a_failing_photo_among_several_is_reported_and_the_others_tagged(client):
    files = [
        ("file", ("good.jpg", photo_bytes(), "image/jpeg")),
        ("file", ("notes.txt", b"just some text", "text/plain")),
    ]
    r = client.post("/v1/tags", files=files)
    assert r.status_code == 200
    good, bad = r.json()["results"]
    assert good["tags"] and "error" not in good
    assert bad["tags"] == [] and bad["error"]["code"] == "unsupported_media_type"
    assert "notes.txt" in bad["error"]["message"]


def test_an_empty_part_among_several_is_that_photos_error_as_the_contract_says(client):
    files = [
        ("file", ("empty.jpg", b"", "image/jpeg")),
        ("file", ("good.jpg", photo_bytes(), "image/jpeg")),
    ]
    r = client.post("/v1/tags", files=files)
    assert r.status_code == 200
    empty, good = r.json()["results"]
    assert empty["error"]["code"] == "empty_file" and good["tags"]
    body = client.get("/openapi.json").json()["paths"]["/v1/tags"]["post"]["requestBody"]
    item = body["content"]["multipart/form-data"]["schema"]["properties"]["file"]["items"]
    assert "minLength" not in item and "empty_file" in item["description"]
    assert body["content"]["image/*"]["schema"]["minLength"] == 1  # an empty raw body: 400


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty_body"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ({"content": b"not an image at all", "headers": {"Content-Type": "image/jpeg"}}, 415,
         "unsupported_media_type"),
        ({"content": b"\xff\xd8\xff\xe0 broken jpeg", "headers": {"Content-Type": "image/jpeg"}},
         422, "invalid_image"),
        ({"files": {"photo": ("a.jpg", b"x", "image/jpeg")}}, 400, "no_file"),
        ({"data": {"file": "a string, not a file"}, "files": {"other": ("a", b"x")}}, 400,
         "not_a_file"),
        ({"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 422, "empty_file"),
        ({"files": {"file": ("cat.jpg", b"GIF89a", "image/jpeg")}}, 422, "invalid_image"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_json_4xx_with_code_and_message(client, kwargs, status, code):
    r = client.post("/v1/tags", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code
    assert len(error["message"]) > 10
    assert client.get("/readyz").status_code == 200  # still healthy


def test_bad_query_parameters_are_422_with_a_readable_message(client):
    files = {"file": ("a.jpg", photo_bytes(), "image/jpeg")}
    r = client.post("/v1/tags?top_k=0", files=files)
    assert r.status_code == 422
    assert r.json()["error"] == {
        "code": "invalid_parameter",
        "message": "top_k: Input should be greater than or equal to 1",
    }
    assert client.post("/v1/tags?threshold=2", files=files).status_code == 422


def test_body_over_the_limit_is_413_for_raw_and_multipart(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, max_body_bytes=4096)
    big = photo_bytes((400, 400), noise=120, fmt="PNG")
    assert len(big) > 4096
    raw = client.post("/v1/tags", content=big, headers={"Content-Type": "image/png"})
    form = client.post("/v1/tags", files={"file": ("big.png", big, "image/png")})

    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    streamed = client.post("/v1/tags", content=chunks(), headers={"Content-Type": "image/png"})
    for r in (raw, form, streamed):
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"


def test_image_over_the_pixel_limit_is_413(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, max_pixels=100 * 100)
    r = client.post("/v1/tags", files={"file": ("a.png", photo_bytes((200, 100), fmt="PNG"))})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "image_too_large"


def test_exif_orientation_is_applied_before_tagging(client):
    upright = Image.open(io.BytesIO(photo_bytes((60, 40), fmt="PNG", noise=100))).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    decoded = decode(buffer.getvalue(), max_pixels=10**6)
    assert decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))
    plain = io.BytesIO()
    upright.save(plain, format="PNG")
    a = client.post(
        "/v1/tags?all=true", content=buffer.getvalue(), headers={"Content-Type": "image/png"}
    )
    b = client.post(
        "/v1/tags?all=true", content=plain.getvalue(), headers={"Content-Type": "image/png"}
    )
    assert a.json()["results"][0]["probabilities"] == b.json()["results"][0]["probabilities"]


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG")],
)
def test_any_colour_mode_is_tagged(client, mode, fmt):
    data = photo_bytes(fmt=fmt, mode=mode)
    r = client.post("/v1/tags", content=data, headers={"Content-Type": f"image/{fmt.lower()}"})
    assert r.status_code == 200, r.text


def test_model_info_health_and_readiness(client, tiny_checkpoint):
    info = client.get("/v1/model").json()
    assert info["name"] == "tiny" and info["classes"] == TINY_CLASSES
    assert info["version"] == load(tiny_checkpoint).version
    assert info["task"] == "single_label" and info["arch"] == "seed_cnn"
    assert info["preprocessing"]["crop"] == 32
    assert info["device"] == "cpu"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_openapi_documents_both_upload_forms(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/tags"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)


def test_everyday_photo_gets_sensible_imagenet_tags(client_for, default_checkpoint):
    skimage_data = pytest.importorskip("skimage.data")
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buffer, format="JPEG", quality=90)
    client = client_for(default_checkpoint)
    photo = {"file": ("chelsea.jpg", buffer.getvalue())}
    r = client.post("/v1/tags?top_k=3&vocabulary=classes", files=photo)
    labels = [t["label"] for t in r.json()["results"][0]["tags"]]
    assert labels[0] == "Egyptian cat"
    assert set(labels) <= {"Egyptian cat", "tabby", "tiger cat", "lynx", "Siamese cat"}
    breeds = sum(t["probability"] for t in r.json()["results"][0]["tags"] if t["label"] != "lynx")
    [cat] = client.post("/v1/tags", files=photo).json()["results"][0]["tags"]
    assert (cat["label"], cat["path"]) == ("cat", ["animal", "cat"])
    assert cat["probability"] >= breeds  # the breeds roll up (and the two it did not list)


def test_tags_come_from_the_vocabulary_with_their_paths_or_as_raw_classes(client_for, tmp_path):
    from tests.model.test_vocabulary import TREE

    checkpoint = write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE)
    client = client_for(checkpoint, regions=0)  # the whole photo's classes, rolled up
    photo = photo_bytes(color=(20, 20, 230))
    tags = client.post("/v1/tags?threshold=0", files={"file": ("b.jpg", photo)}).json()
    for tag in tags["results"][0]["tags"]:
        assert tag["path"][-1] == tag["label"] and tag["path"][0] == "colour"
        assert tag["label"] in {"warm", "blue"}  # the leaves, at threshold 0
    raw = client.post("/v1/tags?vocabulary=classes", files={"file": ("b.jpg", photo)}).json()
    assert {t["label"] for t in raw["results"][0]["tags"]} == set(TINY_CLASSES)
    assert all("path" not in t for t in raw["results"][0]["tags"])
    expected = direct_probabilities(checkpoint, photo)
    rolled = {t["label"]: t["probability"] for t in tags["results"][0]["tags"]}
    assert rolled["warm"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert rolled["blue"] == pytest.approx(float(expected[2]), abs=1e-6)
    bad = client.post("/v1/tags?vocabulary=synsets", files={"file": ("b.jpg", photo)})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"


def test_the_model_lists_its_vocabulary_with_the_classes_each_tag_gathers(client_for, tmp_path):
    from tests.model.test_vocabulary import TREE

    client = client_for(write_tiny_checkpoint(tmp_path / "v.safetensors", vocabulary=TREE))
    vocabulary = {t["label"]: t for t in client.get("/v1/model").json()["vocabulary"]}
    assert vocabulary["cool"] == {
        "label": "cool", "path": ["colour", "cool"], "threshold": 0.6,
        "classes": ["green", "blue"],
    }  # fmt: skip
    assert vocabulary["colour"]["classes"] == TINY_CLASSES
