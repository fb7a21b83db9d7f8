"""Tags in the user's language (model/labels.py): every shipped language labels every tag, no
two sibling tags read alike, the files round-trip, an operator's files change or add labels and
languages, and a bad file is one clear error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.labels import (
    ENGLISH,
    LabelFile,
    Labels,
    LabelsError,
    dump,
    parse,
    read,
    shipped,
    sibling_twins,
    write,
)
from model.people import PEOPLE, PEOPLE_TAGS
from model.vocabulary import shipped as shipped_vocabulary

VOCABULARIES = Path(__file__).resolve().parents[2] / "model" / "vocabularies"
LANGUAGES = ("de", "fr", "es", "it", "pt", "nl", "pl", "ja", "zh", "ko")  # the ten


def every_tag_path() -> list[str]:
    """Every tag the default model can give: the vocabulary's and the people tags."""
    tags = ["/".join(tag["path"]) for tag in shipped_vocabulary()["tags"]]
    return tags + [f"{PEOPLE}/{label}" for label in PEOPLE_TAGS]


def test_the_ten_languages_are_shipped_and_english_comes_first():
    assert sorted(f.language for f in shipped()) == sorted(LANGUAGES)
    assert Labels.load().languages == (ENGLISH, *sorted(LANGUAGES))
    assert {Labels.load().name(code) for code in ("en", "de", "ja")} == {
        "English",
        "Deutsch",
        "日本語",
    }


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_tag_has_a_label_in_every_shipped_language(language):
    labels = {f.language: f for f in shipped()}[language].labels
    missing = [path for path in every_tag_path() if not labels.get(path, "").strip()]
    assert not missing, f"{language} has no label for {len(missing)} tags: {missing[:10]}"
    unknown = sorted(set(labels) - set(every_tag_path()))
    assert not unknown, f"{language} labels tags the vocabulary does not have: {unknown[:10]}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_two_sibling_tags_share_a_label(language):
    labels = {f.language: f for f in shipped()}[language].labels
    assert sibling_twins(labels) == []


def test_sibling_twins_are_found_whatever_their_case():
    labels = {"animal/cat": "Katze", "animal/dog": "katze", "food/cat": "Katze"}
    assert sibling_twins(labels) == [("animal", "Katze", ["animal/cat", "animal/dog"])]


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_shipped_file_round_trips_byte_for_byte(language, tmp_path):
    path = VOCABULARIES / f"imagenet.{language}.json"
    loaded = read(path)
    assert dump(loaded) == path.read_text(encoding="utf-8")
    copy = write(loaded, tmp_path / "copy.json")
    assert read(copy) == loaded


def test_a_label_in_a_language_and_its_path_labels_and_english_is_the_path_itself():
    labels = Labels.load()
    assert labels.label(("animal", "cat"), "de") == "Katze"
    assert labels.path_labels(("animal", "cat"), "de") == ["Tier", "Katze"]
    assert labels.path_labels(("people", "portrait"), "fr")[-1] == "portrait"
    assert labels.path_labels(("animal", "cat"), "ja") == ["動物", "猫"]
    assert labels.label(("animal", "cat"), ENGLISH) == "cat"
    assert labels.path_labels(("food", "fruit", "banana"), ENGLISH) == ["food", "fruit", "banana"]


def test_a_path_a_language_lacks_keeps_its_english_label_and_a_custom_tag_its_name():
    labels = Labels.load()
    # a tag added later, a trained checkpoint's own tag, a class as its own tag
    assert labels.path_labels(("animal", "cat", "shrek"), "de") == ["Tier", "Katze", "shrek"]
    assert labels.path_labels(("colour", "warm"), "de") == ["colour", "warm"]
    assert labels.path_labels(("custom", "cat"), "de") == ["custom", "cat"]  # not "Katze"


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_an_operators_file_changes_and_adds_labels_and_keeps_the_shipped_rest(tmp_path):
    write_json(
        tmp_path / "de.json",
        {"language": "de", "labels": {"animal/cat": "Mieze", "colour": "Farbe"}},
    )
    labels = Labels.load(tmp_path)
    assert labels.path_labels(("animal", "cat"), "de") == ["Tier", "Mieze"]
    assert labels.label(("colour",), "de") == "Farbe"
    assert labels.label(("animal", "dog"), "de") == "Hund"  # the shipped label stays
    assert labels.name("de") == "Deutsch"
    assert labels.digest("de") != Labels.load().digest("de")
    assert labels.digest("fr") == Labels.load().digest("fr")


def test_an_operators_file_adds_a_language(tmp_path):
    write_json(
        tmp_path / "sv.json",
        {"language": "sv", "name": "Svenska", "labels": {"animal": "djur", "animal/cat": "katt"}},
    )
    labels = Labels.load(tmp_path)
    assert "sv" in labels.languages and labels.name("sv") == "Svenska"
    assert labels.path_labels(("animal", "cat"), "sv") == ["djur", "katt"]
    assert labels.label(("animal", "dog"), "sv") == "dog"  # none given: English


def test_files_that_are_not_label_files_in_the_folder_are_left_alone(tmp_path):
    (tmp_path / "README.md").write_text("my labels")
    (tmp_path / ".de.json.tmp").write_text("half written")
    (tmp_path / ".backup.json").write_text("{")
    assert Labels.load(tmp_path).languages == Labels.load().languages


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ("[]", "a label file is a JSON object"),
        ('{"language": "de", "lables": {}}', "unknown field 'lables'"),
        ('{"labels": {"animal": "Tier"}}', "language None is not a language code"),
        ('{"language": "German", "labels": {"a": "b"}}', "'German' is not a language code"),
        ('{"language": "en", "labels": {"animal/cat": "kitty"}}', "language 'en' is the"),
        ('{"language": "de", "labels": {}}', "labels must be an object"),
        ('{"language": "de", "labels": {"animal//cat": "Katze"}}', "is not a tag path"),
        ('{"language": "de", "labels": {"custom/shrek": "Schrek"}}', "a custom tag keeps"),
        ('{"language": "de", "labels": {"animal": ""}}', "its label must be a non-empty"),
        ('{"language": "de", "labels": {"animal": 3}}', "its label must be a non-empty"),
        ('{"language": "de", "labels": {"animal": " Tier"}}', "spaces around it"),
        ('{"language": "de", "labels": {"animal": "A", "animal": "B"}}', "given twice"),
        ('{"language": "xx", "labels": {"animal": "A"}}', "'xx' is a new language: give"),
        ('{"language": "de", "labels": {"animal/dog": "Katze"}}', "would both read 'Katze'"),
    ],
)
def test_a_bad_operator_file_is_one_error_naming_the_file_and_the_problem(tmp_path, text, problem):
    bad = tmp_path / "mine.json"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(LabelsError) as error:
        Labels.load(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{bad}: ") and problem in message
    assert "\n" not in message


def test_two_files_of_one_language_and_a_missing_folder_are_refused(tmp_path):
    write_json(tmp_path / "a.json", {"language": "de", "labels": {"animal": "Tiere"}})
    write_json(tmp_path / "b.json", {"language": "de", "labels": {"plant": "Pflanzen"}})
    with pytest.raises(LabelsError, match=r"b\.json: language 'de' already comes from .*a\.json"):
        Labels.load(tmp_path)
    with pytest.raises(LabelsError, match="not a folder of label files"):
        Labels.load(tmp_path / "absent")


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    text = '{"language": "de", "labels": {"a": "Tür"}}'
    (tmp_path / "de.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(LabelsError, match=r"de\.json: not UTF-8 text"):
        Labels.load(tmp_path)


def test_parse_and_dump_are_inverse():
    file = LabelFile("sv", "Svenska", {"animal": "djur", "animal/cat": "katt"}, "mine")
    assert parse(dump(file), "sv.json") == file
