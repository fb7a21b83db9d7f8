"""Tags in the user's language over HTTP: ?lang= beats Accept-Language beats PHOTOTAG_LANG beats
English, on /v1/tags, /v1/model and /v1/explain; the path stays the English id; without a
language the answers are exactly those of before; an unknown lang is a 400 listing the served
ones, which the contract lists too; an operator's label files and bad settings at start."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from app.language import negotiate
from app.main import create_app
from app.settings import Settings
from model.runtime import ConfigError
from model.vocabulary import Vocabulary
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint

SERVED = ("en", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "zh")
# the tiny classes as three tags of the shipped vocabulary, which the label files know
PATHS = {"red": "animal/cat", "green": "animal/dog", "blue": "food/fruit/banana"}
PHOTO = {"file": ("p.jpg", photo_bytes((80, 60), color=(200, 30, 30), seed=4))}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    vocabulary = Vocabulary.from_paths(PATHS, TINY_CLASSES).to_dict()
    return write_tiny_checkpoint(tmp_path / "animals.safetensors", vocabulary=vocabulary)


@pytest.fixture
def client(client_for, checkpoint):
    return client_for(checkpoint, people="off")


def tags(client, query: str = "", **headers: str) -> tuple[list[dict], dict]:
    r = client.post(f"/v1/tags?threshold=0{query}", files=PHOTO, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["tags"], r.headers


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("de", "de"),
        ("de-AT", "de"),
        ("DE-at", "de"),
        ("pt-BR,pt;q=0.9", "pt"),
        ("zh-Hans-CN", "zh"),
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        ("fr-CA;q=0.5, ja;q=0.8, en;q=0.7", "ja"),  # the highest q wins, not the first
        ("nl, de", "nl"),  # a tie: the first
        ("sv, de;q=0.3", "de"),  # sv is not served: the next one that is
        ("en-US,en;q=0.9,de;q=0.8", "en"),
        ("de;q=0, fr;q=0.1", "fr"),  # q=0: not wanted
        ("*", "it"),  # any language: the server's default
        ("sv;q=0.9, *;q=0.1", "it"),
        ("sv, no", None),  # nothing served: the caller's default (not an error)
        ("", None),
        (None, None),
        ("de;q=abc, x y z, ;;, fr;q=2, ko;q=0.4", "ko"),  # malformed entries are passed over
    ],
)
def test_accept_language_picks_the_served_language_it_prefers_most(header, expected):
    assert negotiate(header, SERVED, default="it") == expected


def test_without_a_language_the_answer_is_exactly_that_of_before(client):
    plain, headers = tags(client)
    assert [t["label"] for t in plain] == [t["path"][-1] for t in plain]
    assert all(set(t) == {"label", "probability", "path"} for t in plain)
    assert headers["content-language"] == "en" and "Accept-Language" in headers["vary"]
    assert tags(client, "&lang=en")[0] == plain
    assert tags(client, **{"Accept-Language": "sv-SE"})[0] == plain  # nothing served matches


def test_lang_translates_the_labels_and_keeps_the_english_path(client):
    plain, _ = tags(client)
    german, headers = tags(client, "&lang=de")
    assert headers["content-language"] == "de"
    assert [t["path"] for t in german] == [t["path"] for t in plain]
    assert [t["probability"] for t in german] == [t["probability"] for t in plain]
    by_path = {tuple(t["path"]): t for t in german}
    assert by_path["animal", "cat"]["label"] == "Katze"
    assert by_path["animal", "cat"]["path_labels"] == ["Tier", "Katze"]
    assert by_path["food", "fruit", "banana"]["path_labels"] == ["Essen", "Obst", "Banane"]
    japanese, _ = tags(client, "&lang=ja")
    assert {tuple(t["path"]): t["label"] for t in japanese}["animal", "dog"] == "犬"


def test_raw_classes_keep_their_names_in_every_language(client):
    r = client.post("/v1/tags?vocabulary=classes&lang=de", files=PHOTO)
    assert {t["label"] for t in r.json()["results"][0]["tags"]} == set(TINY_CLASSES)
    assert all(set(t) == {"label", "probability"} for t in r.json()["results"][0]["tags"])


def test_lang_beats_accept_language_which_beats_the_servers_default(client_for, checkpoint):
    client = client_for(checkpoint, people="off", lang="fr")
    label = {"en": "cat", "de": "Katze", "fr": "chat", "it": "gatto"}

    def cat(query: str = "", **headers: str) -> tuple[str, str]:
        found, answer = tags(client, query, **headers)
        chosen = {tuple(t["path"]): t["label"] for t in found}["animal", "cat"]
        return chosen, answer["content-language"]

    assert cat() == (label["fr"], "fr")  # PHOTOTAG_LANG
    assert cat(**{"Accept-Language": "it-CH, de;q=0.5"}) == (label["it"], "it")
    assert cat(**{"Accept-Language": "sv"}) == (label["fr"], "fr")  # no match: the default
    assert cat("&lang=de", **{"Accept-Language": "it"}) == (label["de"], "de")
    assert cat("&lang=en", **{"Accept-Language": "it"}) == (label["en"], "en")


@pytest.mark.parametrize("lang", ["xx", "DE", "de-AT", ""])
def test_an_unknown_lang_is_a_400_listing_the_served_languages(client, lang):
    for r in (
        client.post(f"/v1/tags?lang={lang}", files=PHOTO),
        client.get(f"/v1/model?lang={lang}"),
        client.post(f"/v1/explain?lang={lang}", files=PHOTO),
    ):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_language"
        assert ", ".join(SERVED) in error["message"]


def test_the_model_lists_its_vocabulary_in_the_language(client):
    plain = client.get("/v1/model").json()["vocabulary"]
    assert all("path_labels" not in t for t in plain)
    r = client.get("/v1/model?lang=ko")
    assert r.headers["content-language"] == "ko"
    korean = r.json()["vocabulary"]
    assert [t["path"] for t in korean] == [t["path"] for t in plain]
    assert [t["classes"] for t in korean] == [t["classes"] for t in plain]
    cat = {tuple(t["path"]): t for t in korean}["animal", "cat"]
    assert cat["label"] == "고양이" and cat["path_labels"] == ["동물", "고양이"]


def test_the_models_listing_names_the_languages(client_for, checkpoint):
    listing = client_for(checkpoint, people="off", lang="pl").get("/v1/models").json()
    assert [entry["code"] for entry in listing["languages"]] == list(SERVED)
    assert {"code": "de", "name": "Deutsch"} in listing["languages"]
    assert listing["languages"][0] == {"code": "en", "name": "English"}
    assert listing["default_language"] == "pl"


def test_an_explanation_names_its_tag_in_the_language(client):
    r = client.post("/v1/explain?tag=cat&lang=zh", files=PHOTO)
    assert r.status_code == 200, r.text
    assert r.headers["content-language"] == "zh"
    assert r.json()["tag"]["label"] == "猫" and r.json()["tag"]["path"] == ["animal", "cat"]
    assert r.json()["tag"]["path_labels"] == ["动物", "猫"]
    png = client.post(
        "/v1/explain?tag=cat", files=PHOTO, headers={"Accept": "image/png", "Accept-Language": "de"}
    )
    assert png.headers["content-type"] == "image/png"
    assert unquote(png.headers["x-tag"]) == "Katze" and png.headers["content-language"] == "de"
    plain = client.post("/v1/explain?tag=cat", files=PHOTO).json()["tag"]
    assert set(plain) == {"label", "probability", "path"} and plain["label"] == "cat"


def test_a_people_tags_explanation_names_it_in_the_language(client_for, checkpoint):
    client = client_for(checkpoint)  # people on: the detector finds no face on a flat colour
    r = client.post("/v1/explain?tag=people/person&lang=fr", files=PHOTO)
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "faces"
    assert r.json()["tag"]["path"] == ["people", "person"]
    assert r.json()["tag"]["path_labels"] == ["personnes", r.json()["tag"]["label"]]


def test_the_contract_lists_the_served_languages_and_the_400(client_for, checkpoint, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "sv.json").write_text(
        json.dumps({"language": "sv", "name": "Svenska", "labels": {"animal/cat": "katt"}})
    )
    schema = client_for(checkpoint, people="off", labels_dir=folder).get("/openapi.json").json()
    for path, method in (("/v1/tags", "post"), ("/v1/model", "get"), ("/v1/explain", "post")):
        operation = schema["paths"][path][method]
        [lang] = [p for p in operation["parameters"] if p["name"] == "lang"]
        assert lang["schema"] == {"type": "string", "enum": [*SERVED[:10], "sv", "zh"]}
        assert "unsupported_language" in operation["responses"]["400"]["description"]
        assert any(p["name"] == "accept-language" for p in operation["parameters"])


def test_an_operators_labels_are_served(client_for, checkpoint, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "de.json").write_text(
        json.dumps({"language": "de", "labels": {"animal/cat": "Mieze"}}), encoding="utf-8"
    )
    (folder / "sv.json").write_text(
        json.dumps({"language": "sv", "name": "Svenska", "labels": {"animal/cat": "katt"}})
    )
    client = client_for(checkpoint, people="off", labels_dir=folder)
    german = {tuple(t["path"]): t for t in tags(client, "&lang=de")[0]}
    assert german["animal", "cat"]["path_labels"] == ["Tier", "Mieze"]
    assert german["animal", "dog"]["label"] == "Hund"
    swedish = {tuple(t["path"]): t for t in tags(client, **{"Accept-Language": "sv-FI"})[0]}
    assert swedish["animal", "cat"]["path_labels"] == ["animal", "katt"]


def test_a_bad_label_file_or_language_stops_the_server_at_start_with_one_line(checkpoint, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    bad = folder / "de.json"
    bad.write_text('{"language": "de", "labels": {"animal": ""}}')
    with pytest.raises(ConfigError) as error:
        create_app(Settings(checkpoint=checkpoint, device="cpu", labels_dir=folder))
    assert str(error.value).startswith(f"PHOTOTAG_LABELS_DIR={folder}: {bad}: 'animal': its")
    with pytest.raises(ConfigError, match="PHOTOTAG_LANG=klingon: not a served language; use"):
        create_app(Settings(checkpoint=checkpoint, device="cpu", lang="klingon"))
