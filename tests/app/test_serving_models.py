"""Several models from PHOTOTAG_MODELS_DIR, served by file name, one of them the default."""

from __future__ import annotations

import pytest

from model.checkpoint import load
from tests.helpers import photo_bytes, write_tiny_checkpoint


@pytest.fixture
def models_dir(tmp_path):
    folder = tmp_path / "models"
    write_tiny_checkpoint(folder / "pets.safetensors", seed=1, name="pets-v1")
    write_tiny_checkpoint(folder / "default.safetensors", seed=2, name="everyday")
    write_tiny_checkpoint(folder / "zoo.safetensors", seed=3, name="zoo")
    (folder / "notes.txt").write_text("not a checkpoint")
    (folder / ".zoo.safetensors.123.tmp").write_bytes(b"half-written")
    return folder


def tag(client, model: str | None = None):
    url = "/v1/tags" + (f"?model={model}" if model else "")
    return client.post(url, files={"file": ("a.jpg", photo_bytes())})


def test_every_checkpoint_in_the_folder_is_served_by_its_file_name(client_for, models_dir):
    client = client_for(models_dir / "unused.safetensors", models_dir=models_dir)
    listing = client.get("/v1/models").json()
    assert [m["id"] for m in listing["models"]] == ["default", "pets", "zoo"]
    assert listing["default"] == "default"
    pets = next(m for m in listing["models"] if m["id"] == "pets")
    assert pets["name"] == "pets-v1" and pets["num_classes"] == 3 and pets["default"] is False
    assert pets["version"] == load(models_dir / "pets.safetensors").version


def test_model_query_picks_the_model_and_the_response_says_which(client_for, models_dir):
    client = client_for(models_dir / "unused.safetensors", models_dir=models_dir)
    pets = tag(client, "pets").json()
    assert pets["model"]["id"] == "pets" and pets["model"]["name"] == "pets-v1"
    plain = tag(client).json()
    assert plain["model"]["id"] == "default" and plain["model"]["name"] == "everyday"
    assert pets["results"][0]["tags"] != plain["results"][0]["tags"]  # other weights


def test_model_info_takes_the_model_query_too(client_for, models_dir):
    client = client_for(models_dir / "unused.safetensors", models_dir=models_dir)
    info = client.get("/v1/model?model=zoo").json()
    assert info["id"] == "zoo" and info["name"] == "zoo" and info["default"] is False
    assert client.get("/v1/model").json()["id"] == "default"


def test_an_unknown_model_is_404_naming_the_served_ones(client_for, models_dir):
    client = client_for(models_dir / "unused.safetensors", models_dir=models_dir)
    r = tag(client, "cats")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_model"
    assert "default, pets, zoo" in r.json()["error"]["message"]


def test_default_model_setting_wins(client_for, models_dir):
    client = client_for(
        models_dir / "unused.safetensors", models_dir=models_dir, default_model="zoo"
    )
    assert tag(client).json()["model"]["id"] == "zoo"
    assert client.get("/v1/models").json()["default"] == "zoo"


def test_without_a_default_file_the_first_name_is_the_default(client_for, models_dir):
    (models_dir / "default.safetensors").unlink()
    client = client_for(models_dir / "unused.safetensors", models_dir=models_dir)
    assert client.get("/v1/models").json()["default"] == "pets"


def test_a_broken_file_beside_good_ones_is_skipped(client_for, models_dir):
    (models_dir / "broken.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    client = client_for(models_dir / "unused.safetensors", models_dir=models_dir)
    assert [m["id"] for m in client.get("/v1/models").json()["models"]] == [
        "default",
        "pets",
        "zoo",
    ]


def test_the_single_checkpoint_setting_still_serves_alone(client, tiny_checkpoint):
    listing = client.get("/v1/models").json()
    # the label languages (tests/app/test_language.py)
    assert listing.pop("default_language") == "en" and listing.pop("languages")[0]["code"] == "en"
    assert listing == {
        "default": "tiny",
        "models": [
            {
                "id": "tiny",
                "name": "tiny",
                "version": load(tiny_checkpoint).version,
                "task": "single_label",
                "arch": "seed_cnn",
                "num_classes": 3,
                "device": "cpu",
                "backend": "torch",
                "precision": "float32",
                "default": True,
            }
        ],
    }


def test_a_missing_default_model_stops_the_start(models_dir):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from model.checkpoint import CheckpointError

    settings = Settings(models_dir=models_dir, default_model="cats", device="cpu")
    with pytest.raises(CheckpointError, match="cats"), TestClient(create_app(settings)):
        pass
