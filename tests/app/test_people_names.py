"""Naming people: teach a face over HTTP, served as people/<name> and in each photo's faces; a
stranger gets no name; bad teaching photos refused; forget deletes the file; the store survives
a restart; off unless PHOTOTAG_NAMES=on; admin keys for writes; no descriptor in any answer."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageOps
from skimage import data

from app.settings import ConfigError, Settings

ASTRONAUT = Image.fromarray(data.astronaut())  # Eileen Collins, one face (public domain)
CAMERAMAN = Image.fromarray(data.camera()).convert("RGB")  # one face, another person


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    return both


@pytest.fixture
def names_client(client_for, tiny_checkpoint, tmp_path):
    def make(**overrides):
        overrides.setdefault("names_dir", tmp_path / "names")
        # JPEGs in full: the tiny model's draft scale (2 x 36 px) would leave no face to find
        overrides.setdefault("jpeg_reducing_gap", 0)
        return client_for(tiny_checkpoint, people="on", names="on", **overrides)

    return make


def teach(client, name: str, *photos: bytes, **kwargs):
    files = [("file", (f"p{i}.jpg", p)) for i, p in enumerate(photos)]
    return client.post(f"/v1/people/{name}/examples", files=files, **kwargs)


def result_of(client, photo: bytes) -> dict:
    r = client.post("/v1/tags", files={"file": ("x.jpg", photo)}, params={"top_k": 20})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def names_in(result: dict) -> list[str]:
    return [t["label"] for t in result["tags"] if t["path"][0] == "people" and t["label"] not in
            ("person", "portrait", "group")]  # fmt: skip


def test_a_taught_face_is_named_in_other_photos_and_a_stranger_is_not(names_client):
    client = names_client()
    r = teach(client, "Eileen", jpeg(ASTRONAUT))
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "Eileen", "path": ["people", "Eileen"], "examples": 1}
    flipped = result_of(client, jpeg(ImageOps.mirror(ASTRONAUT).resize((300, 300))))
    assert names_in(flipped) == ["Eileen"]
    tag = next(t for t in flipped["tags"] if t["label"] == "Eileen")
    assert tag["path"] == ["people", "Eileen"] and 0.5 < tag["probability"] <= 1
    assert "person" in [t["label"] for t in flipped["tags"]]  # people tags are kept
    [face] = flipped["faces"]
    assert face["name"] == "Eileen" and face["probability"] == tag["probability"]
    assert 0 < face["left"] < face["right"] <= 300  # in the pixels of the photo as sent
    stranger = result_of(client, jpeg(CAMERAMAN))
    assert names_in(stranger) == []
    assert [f["name"] for f in stranger["faces"]] == [None]


def test_two_faces_of_one_photo_never_get_the_same_name(names_client):
    client = names_client()
    assert teach(client, "Eileen", jpeg(ASTRONAUT)).status_code == 200
    twins = result_of(client, jpeg(side_by_side(ASTRONAUT, ImageOps.mirror(ASTRONAUT))))
    assert len(twins["faces"]) == 2
    assert sorted(map(str, (f["name"] for f in twins["faces"]))) == ["Eileen", "None"]
    assert names_in(twins) == ["Eileen"]


def test_teaching_refuses_a_photo_with_no_face_or_several(names_client, make_photo):
    client = names_client()
    r = teach(client, "Eileen", make_photo())
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_face"
    assert "p0.jpg" in r.json()["error"]["message"]
    both = jpeg(side_by_side(ASTRONAUT, CAMERAMAN))
    r = teach(client, "Eileen", both)
    assert r.status_code == 422 and r.json()["error"]["code"] == "several_faces"
    assert "box=" in r.json()["error"]["message"]
    # one good photo beside a bad one: nothing is added
    assert teach(client, "Eileen", jpeg(ASTRONAUT), both).status_code == 422
    assert client.get("/v1/people").json() == {"people": []}
    # a box picks the face: the cameraman's, on the right
    r = client.post(
        "/v1/people/Cameraman/examples",
        files={"file": ("both.jpg", both)},
        data={"box": "700,110,775,200"},
    )
    assert r.status_code == 200, r.text
    assert names_in(result_of(client, jpeg(CAMERAMAN.resize((400, 400))))) == ["Cameraman"]
    r = teach(client, "Eileen", both, params={"box": "0,0,5,5"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_face"
    r = teach(client, "Eileen", both, params={"box": "5,5,1,1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    r = teach(client, "person", jpeg(ASTRONAUT))  # a people tag's own name
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_name"


def test_forgetting_a_name_deletes_its_file_and_the_store_survives_a_restart(
    names_client, tmp_path
):
    client = names_client()
    assert teach(client, "Eileen", jpeg(ASTRONAUT)).status_code == 200
    assert teach(client, "Eileen", jpeg(ASTRONAUT.resize((256, 256)))).json()["examples"] == 2
    assert teach(client, "Cameraman", jpeg(CAMERAMAN)).status_code == 200
    files = sorted(p.name for p in (tmp_path / "names").iterdir())
    assert files == ["Cameraman.safetensors", "Eileen.safetensors"]
    restarted = names_client()
    listing = restarted.get("/v1/people").json()["people"]
    assert [(p["name"], p["examples"]) for p in listing] == [("Cameraman", 1), ("Eileen", 2)]
    assert names_in(result_of(restarted, jpeg(ImageOps.mirror(ASTRONAUT)))) == ["Eileen"]
    assert restarted.delete("/v1/people/Eileen").status_code == 204
    assert not (tmp_path / "names" / "Eileen.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "names").iterdir()) == ["Cameraman.safetensors"]
    assert names_in(result_of(restarted, jpeg(ImageOps.mirror(ASTRONAUT)))) == []
    r = restarted.delete("/v1/people/Eileen")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_name"


def test_concurrent_teaching_loses_no_example(names_client):
    client = names_client()
    photos = [jpeg(ASTRONAUT.resize((s, s))) for s in (300, 340, 380, 420, 460, 512)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: teach(client, "Eileen", p), photos))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert client.get("/v1/people").json()["people"][0]["examples"] == len(photos)


def test_no_answer_holds_a_descriptor(names_client):
    client = names_client()
    answers = [teach(client, "Eileen", jpeg(ASTRONAUT)), client.get("/v1/people")]
    answers.append(client.post("/v1/tags", files={"file": ("x.jpg", jpeg(ASTRONAUT))}))
    for answer in answers:
        text = answer.text
        assert "embedding" not in text and "descriptor" not in text
        assert len(text) < 2000  # 128 floats would not fit


def test_names_are_off_by_default(client_for, tiny_checkpoint, tmp_path):
    client = client_for(tiny_checkpoint, people="on", names_dir=tmp_path / "names")
    r = client.get("/v1/people")
    assert r.status_code == 404 and r.json()["error"]["code"] == "names_off"
    assert "PHOTOTAG_NAMES=on" in r.json()["error"]["message"]
    assert teach(client, "Eileen", jpeg(ASTRONAUT)).json()["error"]["code"] == "names_off"
    assert "faces" not in result_of(client, jpeg(ASTRONAUT))
    assert not (tmp_path / "names").exists()


def test_names_need_the_face_detector(tiny_checkpoint):
    settings = Settings(checkpoint=tiny_checkpoint, people="off", names="on")
    with pytest.raises(ConfigError, match="PHOTOTAG_PEOPLE=on"):
        settings.serving_plan()


def test_teaching_and_forgetting_need_an_admin_key(names_client):
    client = names_client(api_keys=["user"], admin_keys=["admin"])
    user, admin = {"X-API-Key": "user"}, {"X-API-Key": "admin"}
    assert teach(client, "Eileen", jpeg(ASTRONAUT), headers=user).status_code == 403
    assert teach(client, "Eileen", jpeg(ASTRONAUT), headers=admin).status_code == 200
    assert client.get("/v1/people", headers=user).status_code == 200
    assert client.delete("/v1/people/Eileen", headers=user).status_code == 403
    assert client.delete("/v1/people/Eileen", headers=admin).status_code == 204


def test_an_unusable_names_folder_is_a_503_naming_the_setting(names_client, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    client = names_client(names_dir=blocker)
    r = teach(client, "Eileen", jpeg(ASTRONAUT))
    assert r.status_code == 503 and r.json()["error"]["code"] == "names_unavailable"
    assert "PHOTOTAG_NAMES_DIR" in r.json()["error"]["message"]
    assert names_in(result_of(client, jpeg(ASTRONAUT))) == []  # tagging works as before


def test_explaining_a_name_draws_the_face_it_names_and_only_that_one(names_client):
    client = names_client()
    assert teach(client, "Eileen", jpeg(ASTRONAUT)).status_code == 200
    both = jpeg(side_by_side(ImageOps.mirror(ASTRONAUT), CAMERAMAN))
    named = result_of(client, both)
    tag = next(t for t in named["tags"] if t["label"] == "Eileen")
    r = client.post("/v1/explain?tag=people/Eileen", files={"file": ("b.jpg", both)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "faces" and body["tag"]["path"] == ["people", "Eileen"]
    assert body["tag"]["probability"] == pytest.approx(tag["probability"], abs=1e-4)
    [face] = body["faces"]  # hers, on the left; not the cameraman's
    assert face["right"] <= ASTRONAUT.width
    png = client.post(
        "/v1/explain?tag=people/Eileen",
        files={"file": ("b.jpg", both)},
        headers={"Accept": "image/png"},
    )
    assert png.status_code == 200 and png.headers["X-Faces"] == "1"
    nobody = client.post("/v1/explain?tag=people/Nobody", files={"file": ("b.jpg", both)})
    assert nobody.status_code == 200 and nobody.json()["faces"] == []
