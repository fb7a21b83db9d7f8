"""Animals' faces told from people's (model/people/animals.py): the face detector finds faces on
dogs, and the ImageNet classifier, reading each face with its surroundings, drops them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.people import Face, FaceDetector
from model.people.animals import (
    ANIMAL_THRESHOLD,
    MAX_CHECKED,
    SURROUNDINGS,
    AnimalCheck,
    surroundings,
)
from model.runtime import RuntimeChoice
from model.vocabulary import Vocabulary
from tests.helpers import shared_data

# coco-dev photos without people on which YuNet finds a dog's face (looked at): a white dog
# catching a frisbee, its face at 0.88; a black dog on a boat, at 0.62
DOGS = ("000000000394.jpg", "000000000400.jpg")


@pytest.fixture(scope="module")
def check() -> AnimalCheck:
    return AnimalCheck.load()


@pytest.fixture(scope="module")
def detector(check) -> FaceDetector:
    without = FaceDetector.load(animals=False)
    return FaceDetector(without.network, without.config, check)


def dog_photo(name: str) -> Image.Image:
    return Image.open(shared_data("coco-dev") / name).convert("RGB")


@pytest.mark.parametrize("name", DOGS)
def test_a_dogs_face_is_found_and_dropped_as_an_animals(name, check, detector):
    photo = dog_photo(name)
    faces = FaceDetector(detector.network, detector.config).detect(photo)  # no check
    assert len(faces) == 1 and faces[0].score >= detector.config.score_threshold
    assert check.probabilities(photo, faces)[0] >= ANIMAL_THRESHOLD
    assert detector.detect(photo) == []


def test_peoples_faces_are_kept(check, detector):
    skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image ([dev] extra)")
    astronaut = Image.fromarray(skimage_data.astronaut())
    camera = Image.fromarray(skimage_data.camera())  # greyscale: read as RGB
    for photo in (astronaut, camera):
        faces = detector.detect(photo)
        assert len(faces) == 1
        assert check.probabilities(photo, faces)[0] < 0.2


def test_torch_and_openvino_see_the_same_animal():
    pytest.importorskip("openvino")
    photo = dog_photo(DOGS[0])
    faces = FaceDetector.load(animals=False).detect(photo)
    cpu = {"device": "cpu"}
    torch_check = AnimalCheck.load(RuntimeChoice.resolve(backend="torch", **cpu))
    openvino_check = AnimalCheck.load(RuntimeChoice.resolve(backend="openvino", **cpu))
    one, other = torch_check.probabilities(photo, faces), openvino_check.probabilities(photo, faces)
    assert one == pytest.approx(other, abs=1e-3)


class BrightIsAnimal:
    """A network that sees a bright input as its first class (an animal), a dark one as its
    second, counting the inputs it read."""

    def __init__(self) -> None:
        self.read = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.read += len(pixels)
        bright = pixels.float().mean(dim=(1, 2, 3)) > 128
        return torch.stack(
            [bright.float() * 20, (~bright).float() * 20, torch.zeros(len(bright))], 1
        )


def fake_check() -> tuple[AnimalCheck, BrightIsAnimal]:
    classes = ["a", "b", "c"]
    vocabulary = Vocabulary.from_paths({"a": "animal", "b": "thing", "c": "thing"}, classes)
    network = BrightIsAnimal()
    return AnimalCheck(network, 16, vocabulary), network


def test_each_face_is_judged_by_its_own_surroundings():
    check, _ = fake_check()
    photo = Image.new("RGB", (300, 100))
    photo.paste((255, 255, 255), (100, 0, 200, 100))  # a bright middle third
    dark, bright = Face((20.0, 40, 40, 60), 0.9), Face((140.0, 40, 160, 60), 0.8)
    assert check.probabilities(photo, [dark, bright]) == pytest.approx([0, 1], abs=1e-6)
    assert check.people(photo, [dark, bright]) == [dark]
    assert check.people(photo, [bright, dark]) == [dark]


def test_only_the_most_confident_faces_are_checked_the_rest_kept():
    check, network = fake_check()
    photo = Image.new("RGB", (200, 50), (255, 255, 255))  # every face an "animal"
    faces = [Face((10.0 * i, 0, 10.0 * i + 8, 8), 0.9 - 0.01 * i) for i in range(MAX_CHECKED + 2)]
    assert check.people(photo, faces) == faces[MAX_CHECKED:]
    assert network.read == MAX_CHECKED
    assert check.people(photo, []) == []
    assert network.read == MAX_CHECKED  # no faces: no pass


def test_a_face_is_read_with_its_surroundings_beyond_the_edge_black():
    photo = Image.new("L", (100, 100), 200)  # greyscale: read as RGB
    side = round(SURROUNDINGS * 20)  # the square around a 20 px face, read at 1:1
    read = surroundings(photo, Face((0.0, 0.0, 20.0, 20.0), 0.9), side)
    assert read.mode == "RGB" and read.size == (side, side)
    edge = (side - 20) // 2  # the photo's corner, where the face's box starts
    assert read.getpixel((edge - 2, edge - 2)) == (0, 0, 0)  # above and left of the photo
    assert read.getpixel((edge + 2, edge + 2)) == (200, 200, 200)
    assert read.getpixel((side - 1, side - 1)) == (200, 200, 200)


def test_a_large_photo_is_read_only_where_the_face_is():
    photo = Image.new("RGB", (6000, 4000), (90, 90, 90))
    photo.paste((250, 10, 10), (2900, 1900, 3100, 2100))  # the face: 200 px, red
    read = surroundings(photo, Face((2900.0, 1900, 3100, 2100), 0.9), 224)
    assert read.size == (224, 224)
    assert read.getpixel((112, 112)) == (250, 10, 10)
    assert read.getpixel((5, 5)) == (90, 90, 90)  # 440 px around the face: all photo
