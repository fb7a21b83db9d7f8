"""model/people/names.py: the name store on disk, identify's open-set line and one name per
photo, the probability mapping, the teaching photo's face, the embedder's runtimes."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model.people.detector import Face
from model.people.embedding import load_embedder
from model.people.names import (
    MATCH_DISTANCE,
    Gallery,
    NamesError,
    NameStore,
    OpenVINOEmbedder,
    TorchEmbedder,
    identify,
    nameable,
    pick_face,
    probability,
)
from model.runtime import RuntimeChoice
from tests.helpers import face_photos


def unit(*values: float) -> torch.Tensor:
    """A (1, 128) descriptor: ``values`` first, zeros after."""
    row = torch.zeros(1, 128)
    row[0, : len(values)] = torch.tensor(values)
    return row


def gallery(**people: torch.Tensor) -> Gallery:
    names = tuple(people)
    owners = torch.cat([torch.full((len(e),), i) for i, e in enumerate(people.values())])
    return Gallery(names, torch.cat(list(people.values())), owners)


def test_a_face_gets_the_name_of_its_nearest_example_under_the_line():
    known = gallery(alice=torch.cat([unit(0, 0), unit(5, 0)]), bob=unit(0, 5))
    found = identify(torch.cat([unit(5.1, 0), unit(0, 4.8), unit(3, 3)]), known)
    assert [f.name if f else None for f in found] == ["alice", "bob", None]
    assert found[0].distance == pytest.approx(0.1, abs=1e-5)
    assert found[0].probability == pytest.approx(probability(0.1))


def test_only_clear_faces_get_a_name_chance_small_or_unsure_ones_count_as_people_only():
    def square(side: float, score: float) -> Face:
        return Face((0.0, 0.0, side, side), score)

    assert nameable(square(40, 0.75))
    assert not nameable(square(40, 0.65))  # a person (faces count from 0.6), but no name
    assert not nameable(square(20, 0.95))


def test_two_faces_never_share_a_name_the_closer_one_keeps_it():
    known = gallery(alice=unit(0, 0), bob=unit(0, 0.8))
    # both near alice; the second is nearer, and bob lies beyond the line for the first
    found = identify(torch.cat([unit(0, -0.3), unit(0, 0.1)]), known)
    assert [f.name if f else None for f in found] == [None, "alice"]
    # the first takes its next name where that is under the line: 0.35 from alice, 0.45 from bob
    found = identify(torch.cat([unit(0, 0.35), unit(0, 0.1)]), known)
    assert [f.name if f else None for f in found] == ["bob", "alice"]


def test_the_open_set_line_and_the_probability_mapping():
    known = gallery(alice=unit(0, 0))
    assert identify(unit(MATCH_DISTANCE + 0.01), known) == [None]
    assert identify(unit(MATCH_DISTANCE - 0.01), known)[0].name == "alice"
    assert identify(unit(0.1), Gallery.empty()) == [None]
    assert identify(torch.zeros(0, 128), known) == []
    assert probability(0.6) == pytest.approx(0.5)
    assert probability(0.2) > probability(0.4) > probability(0.5) > 0.85
    assert probability(MATCH_DISTANCE) > 0.5  # every name given is more likely than not


def test_the_store_keeps_one_private_file_per_name_and_remove_deletes_it(tmp_path):
    store = NameStore(tmp_path / "names")
    assert store.names() == [] and len(store.gallery()) == 0
    assert store.add("Alice", unit(1)) == 1
    assert store.add("Alice", torch.cat([unit(2), unit(3)])) == 3
    store.add("bob", unit(4))
    assert store.names() == ["Alice", "bob"] and store.counts() == {"Alice": 3, "bob": 1}
    assert torch.equal(store.load("Alice")[:, 0], torch.tensor([1.0, 2, 3]))
    assert stat.S_IMODE((tmp_path / "names").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "names").iterdir() if p.name.startswith(".")] == []
    assert store.gallery().names == ("Alice", "bob")
    store.remove("Alice")
    assert not (tmp_path / "names" / "Alice.safetensors").exists()
    assert store.gallery().names == ("bob",)  # the cache went with the write
    assert NameStore(tmp_path / "names").names() == ["bob"]  # a new process reads the folder
    with pytest.raises(NamesError) as error:
        store.remove("Alice")
    assert error.value.code == "unknown_name"


def test_a_store_sees_names_another_process_taught_or_removed_without_a_restart(tmp_path):
    """The server's store and the CLI's (another process: another NameStore on the folder)."""
    served, cli = NameStore(tmp_path), NameStore(tmp_path)
    served.add("bob", unit(4))
    assert served.gallery().names == ("bob",)
    cli.add("Alice", unit(1))
    assert served.gallery().names == ("Alice", "bob")
    cli.add("Alice", unit(2))  # more examples of a name the server has read already
    assert len(served.gallery().embeddings) == 3
    cli.remove("bob")
    assert served.gallery().names == ("Alice",)
    gallery = served.gallery()
    assert served.gallery() is gallery  # nothing changed: the folder is not read again


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "group", "Person", "x" * 49])
def test_names_that_cannot_be_file_names_or_clash_with_people_tags_are_refused(tmp_path, name):
    with pytest.raises(NamesError) as error:
        NameStore(tmp_path).add(name, unit(1))
    assert error.value.code == "invalid_name"
    assert list(tmp_path.iterdir()) == []


def test_concurrent_adds_lose_nothing_and_a_limit_leaves_the_file(tmp_path):
    store = NameStore(tmp_path, max_examples=40)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.add("Alice", unit(i)), range(32)))
    assert sorted(store.load("Alice")[:, 0].tolist()) == list(map(float, range(32)))
    with pytest.raises(NamesError) as error:
        store.add("Alice", torch.zeros(9, 128))
    assert error.value.code == "limit_reached" and len(store.load("Alice")) == 32


def face(x0: float, y0: float, side: float = 50) -> Face:
    return Face((x0, y0, x0 + side, y0 + side), 0.9)


def test_a_teaching_photo_shows_one_face_or_a_box_picks_one():
    assert pick_face([face(0, 0)]) == face(0, 0)
    for faces, code in (([], "no_face"), ([face(0, 0), face(100, 0)], "several_faces")):
        with pytest.raises(NamesError) as error:
            pick_face(faces)
        assert error.value.code == code
    assert pick_face([face(0, 0), face(100, 0)], (95, 5, 150, 55)) == face(100, 0)
    with pytest.raises(NamesError) as error:
        pick_face([face(0, 0), face(100, 0)], (300, 300, 350, 350))
    assert error.value.code == "no_face"


def test_a_person_taught_from_one_photo_is_named_on_photos_of_other_days_a_stranger_is_not(
    tmp_path,
):
    """Real photos of one person on three occasions (tools/face_photos.py): taught from one,
    named on the other two, alone or beside another person; that person gets no name."""
    from PIL import Image

    from model.imageio import open_rgb
    from model.people.detector import FaceDetector
    from model.people.names import Embedder, Namer

    people = face_photos()
    choice = RuntimeChoice.resolve("cpu")
    detector, store = FaceDetector.load(choice), NameStore(tmp_path)
    namer = Namer(Embedder.load(choice), store)
    taught, *others = (open_rgb(p) for p in people["Obama"])
    stranger = open_rgb(people["Biden"][0])
    store.add("Obama", namer.example(detector, taught))

    def names(image: Image.Image) -> list[str | None]:
        found = namer.name(image, detector.detect(image))
        return [f.name for f in sorted(found, key=lambda f: f.box[0])]

    assert [names(photo) for photo in others] == [["Obama"], ["Obama"]]
    assert names(stranger) == [None]
    together = Image.new("RGB", (others[1].width + stranger.width, others[1].height))
    together.paste(others[1], (0, 0))
    together.paste(stranger, (others[1].width, 0))
    assert names(together) == ["Obama", None]


def test_openvino_gives_the_descriptors_torch_does():
    pytest.importorskip("openvino")
    chips = torch.rand(3, 3, 150, 150) * 255
    choice = RuntimeChoice.resolve("cpu", "openvino")
    torch_run = TorchEmbedder(load_embedder(), torch.device("cpu")).run(chips)
    openvino_run = OpenVINOEmbedder(load_embedder(), choice).run(chips)
    assert torch.allclose(torch_run, openvino_run, atol=1e-4)
    assert openvino_run.shape == (3, 128)


def test_phototag_people_add_list_remove(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from model.people import cli

    alone, empty = tmp_path / "eileen.png", tmp_path / "blank.png"
    Image.fromarray(data.astronaut()).save(alone)
    Image.new("RGB", (200, 200), (90, 120, 60)).save(empty)
    names = ["--names-dir", str(tmp_path / "names")]
    assert cli.main([*names, "add", "Eileen", str(alone), str(alone)]) == 0
    assert cli.main([*names, "add", "Eileen", str(alone), str(empty)]) == 1  # nothing added
    assert "blank.png: the detector found no face" in capsys.readouterr().err
    assert cli.main([*names, "add", "Eileen", str(alone), "--box", "170,55,275,180"]) == 0
    capsys.readouterr()
    assert cli.main([*names, "list"]) == 0
    assert capsys.readouterr().out == "Eileen\t3\n"
    assert cli.main([*names, "remove", "Eileen"]) == 0
    assert list((tmp_path / "names").iterdir()) == []
    assert cli.main([*names, "remove", "Eileen"]) == 1
    assert cli.main([*names, "add", "group", str(alone)]) == 2


def test_unnamed_faces_are_grouped_by_person_largest_group_first():
    from model.people.names import group

    faces = torch.cat([unit(0), unit(5), unit(0.2), unit(5.3), unit(0.4), unit(9)])
    assert group(faces) == [[0, 2, 4], [1, 3], [5]]
    assert group(torch.zeros(0, 128)) == []


def test_phototag_people_suggest_groups_the_unnamed_faces_of_a_run(tmp_path, capsys):
    import json

    from PIL import Image, ImageOps
    from skimage import data

    from model.people import cli

    eileen = Image.fromarray(data.astronaut())
    paths = {}
    for name, image in (("a", eileen), ("b", ImageOps.mirror(eileen)),
                        ("c", Image.fromarray(data.camera()).convert("RGB"))):  # fmt: skip
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    boxes = {"a": [178, 63, 268, 176], "b": [243, 61, 334, 177], "c": [195, 113, 256, 194]}
    rows = [
        {"path": str(paths[n]), "faces": [{"box": boxes[n], "score": 0.9, "name": None}]}
        for n in "abc"
    ]
    rows.append({"path": str(paths["a"]), "faces": [{"box": boxes["a"], "name": "Eileen"}]})
    results = tmp_path / "out.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["suggest", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("group 1: 2 faces\n") and "group 2" not in out
    assert f"  {paths['a']}\n  {paths['b']}\n" in out and str(paths["c"]) not in out
    assert f"phototag people add NAME '{paths['a']}' --box 178,63,268,176" in out


def test_names_are_returned_beyond_top_k_and_face_rules_are_not():
    from model.tagger import Tag, with_people

    tags = [Tag("beach", 0.9, ("place", "beach")), Tag("sea", 0.8, ("place", "sea"))]
    people = [
        Tag("person", 0.7, ("people", "person")),
        Tag("Eileen", 0.6, ("people", "Eileen")),
        Tag("Bob", 0.55, ("people", "Bob")),
    ]
    assert [t.label for t in with_people(tags, people, 1, None)] == ["beach", "Eileen", "Bob"]
    assert [t.label for t in with_people(tags, people, 3, None)] == [
        "beach", "sea", "person", "Eileen", "Bob"
    ]  # fmt: skip
    assert [t.label for t in with_people(tags, people, 1, 0.58)] == ["beach", "Eileen"]
