"""The face detector (YuNet on the runtime) and the people tags, on real photos (scikit-image's)
and photos built from them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from model.people import DetectorConfig, Face, FaceDetector, people_tags, person_from_categories
from model.people.tags import PERSON_EVIDENCE
from model.runtime import RuntimeChoice
from model.tagger import Tag

skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image (the [dev] extra)")

# where the astronaut's face is in skimage's 512x512 photo (looked at): forehead to chin
ASTRONAUT_FACE = (170, 50, 280, 185)


def skimage_photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


def three_faces() -> Image.Image:
    """The astronaut's face pasted three times, at 100%, 90% and 80%, on a plain canvas."""
    face = skimage_photo("astronaut").crop((150, 30, 300, 205))  # 150x175, hair to neck
    canvas = Image.new("RGB", (520, 260), (128, 128, 128))
    x = 10
    for scale in (1.0, 0.9, 0.8):
        size = (round(face.width * scale), round(face.height * scale))
        canvas.paste(face.resize(size, Image.Resampling.BICUBIC), (x, 40))
        x += size[0] + 20
    return canvas


def labels(faces: list[Face], image: Image.Image) -> list[str]:
    return [tag.label for tag in people_tags(faces, image.size)]


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector.load()


def inside(box: tuple[float, ...], region: tuple[float, ...]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] < cx < region[2] and region[1] < cy < region[3]


def test_astronaut_has_one_face_where_her_face_is_and_is_a_portrait(detector):
    photo = skimage_photo("astronaut")
    faces = detector.detect(photo)
    assert len(faces) == 1
    assert faces[0].score > 0.9
    assert inside(faces[0].box, ASTRONAUT_FACE)
    assert 60 < faces[0].side < 140
    assert labels(faces, photo) == ["person", "portrait"]
    # five landmarks inside the box: the eyes above the nose, the nose above the mouth, and the
    # person's right eye and mouth corner on the photo's left
    (rx, ry), (lx, ly), (nx, ny), (mrx, mry), (mlx, mly) = faces[0].landmarks
    assert all(inside((x, y, x, y), faces[0].box) for x, y in faces[0].landmarks)
    assert max(ry, ly) < ny < min(mry, mly)
    assert rx < nx < lx and mrx < mlx


def test_camera_has_a_face(detector):
    photo = skimage_photo("camera")  # greyscale ("L"): the detector converts it
    assert photo.mode == "L"
    faces = detector.detect(photo)
    assert len(faces) == 1
    assert "person" in labels(faces, photo)


def test_chelsea_the_cat_has_no_face_and_no_tags(detector):
    photo = skimage_photo("chelsea")
    faces = detector.detect(photo)
    assert faces == []
    assert people_tags(faces, photo.size) == []


def test_three_faces_of_similar_size_are_a_group(detector):
    photo = three_faces()
    faces = detector.detect(photo)
    assert len(faces) == 3
    assert labels(faces, photo) == ["person", "group"]


def test_a_huge_photo_is_downscaled_first_and_gives_the_same_face(detector):
    small = skimage_photo("astronaut")
    big = small.resize((4000, 4000), Image.Resampling.BICUBIC)
    result = detector.run(big)
    assert result.work_size == (640, 640)  # the network never saw more than this
    assert len(result.faces) == 1
    scale = 4000 / 512
    assert inside(result.faces[0].box, tuple(v * scale for v in ASTRONAUT_FACE))
    assert labels(result.faces, big) == labels(detector.detect(small), small)


def test_a_photo_smaller_than_the_working_size_is_not_upscaled(detector):
    assert detector.run(skimage_photo("chelsea")).work_size == (451, 300)


def test_a_photo_too_small_for_any_face_gives_none(detector):
    assert detector.detect(Image.new("RGB", (8, 8))) == []


def test_detect_from_four_threads_at_once_matches_serial(detector):
    photos = [skimage_photo(n) for n in ("astronaut", "camera", "chelsea")] + [three_faces()]
    serial = [detector.detect(p) for p in photos]
    start = threading.Barrier(len(photos))

    def detect(photo: Image.Image) -> list[Face]:
        start.wait()
        return detector.detect(photo)

    with ThreadPoolExecutor(len(photos)) as pool:
        parallel = list(pool.map(detect, photos))
    for one, other in zip(serial, parallel, strict=True):
        assert len(one) == len(other)
        for a, b in zip(one, other, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-3)
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_detect_leaves_torch_settings_as_they_were(detector):
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    detector.detect(skimage_photo("astronaut"))
    assert (torch.get_num_threads(), torch.is_grad_enabled()) == (threads, grad)


def test_config_refuses_values_that_cannot_work():
    with pytest.raises(ValueError, match="work_size"):
        DetectorConfig(work_size=16)
    with pytest.raises(ValueError, match="score_threshold"):
        DetectorConfig(score_threshold=0)


def test_torch_and_openvino_find_the_same_faces():
    pytest.importorskip("openvino")
    cpu = {"device": "cpu"}
    torch_detector = FaceDetector.load(RuntimeChoice.resolve(backend="torch", **cpu))
    openvino = RuntimeChoice.resolve(backend="openvino", **cpu)
    openvino_detector = FaceDetector.load(openvino, precision="f32")
    assert (torch_detector.backend, openvino_detector.backend) == ("torch", "openvino")
    for photo in (skimage_photo("astronaut"), three_faces(), skimage_photo("chelsea")):
        one, other = torch_detector.detect(photo), openvino_detector.detect(photo)
        assert len(one) == len(other)
        for a, b in zip(one, other, strict=True):
            assert a.box == pytest.approx(b.box, abs=0.5)
            assert a.score == pytest.approx(b.score, abs=1e-3)


# ---- people_tags on faces given directly ----------------------------------------------------

PHOTO = (1000, 800)  # shorter side 800: a portrait face needs a side of at least 96 px


def face(x: float, y: float, side: float, score: float = 0.99) -> Face:
    return Face(box=(x, y, x + side, y + side), score=score)


def test_no_faces_no_tags():
    assert people_tags([], PHOTO) == []


def test_a_small_far_face_is_a_person_not_a_portrait():
    tags = people_tags([face(100, 100, 30, 0.97)], PHOTO)
    assert [(t.label, t.probability) for t in tags] == [("person", 0.97)]


def test_one_large_face_with_small_ones_behind_is_a_portrait():
    tags = people_tags([face(300, 200, 250, 0.98), face(50, 50, 40), face(800, 60, 50)], PHOTO)
    assert [t.label for t in tags] == ["person", "portrait"]
    assert tags[1].probability == 0.98


def test_two_faces_of_similar_size_are_neither_portrait_nor_group():
    tags = people_tags([face(100, 100, 200), face(500, 100, 180)], PHOTO)
    assert [t.label for t in tags] == ["person"]


def test_group_probability_is_the_weakest_of_its_faces():
    faces = [face(0, 0, 100, 0.99), face(200, 0, 90, 0.95), face(400, 0, 80, 0.93)]
    tags = people_tags([*faces, face(600, 0, 20, 0.5)], PHOTO)
    assert [(t.label, t.probability) for t in tags] == [("person", 0.99), ("group", 0.93)]


# ---- person from the classifier's categories, where no face shows ----------------------------


def test_a_confident_sport_or_clothing_category_is_a_person_without_a_face():
    tag = person_from_categories({"sport": 0.3, "clothing": 0.62, "animal": 0.99})
    assert tag is not None and (tag.label, tag.probability) == ("person", 0.62)
    assert person_from_categories({"sport": PERSON_EVIDENCE - 0.01, "animal": 0.99}) is None
    assert person_from_categories({}) is None  # a vocabulary without those categories


def test_the_tagger_adds_person_from_its_categories_only_where_people_tags_are_on(tmp_path):
    from model.tagger import Tagger
    from tests.helpers import TINY_CLASSES, write_tiny_checkpoint

    tree = {
        "name": "t",
        "tags": [
            {"label": "sport", "path": ["sport"], "threshold": 0.5, "classes": ["red"]},
            {"label": "colour", "path": ["colour"], "threshold": 0.5, "classes": ["green"]},
        ],
        "hidden": ["blue"],
    }
    path = write_tiny_checkpoint(tmp_path / "t.safetensors", vocabulary=tree)
    choice = RuntimeChoice.resolve("cpu", "torch", "off")
    on, off = Tagger.load(path, choice, FaceDetector.load(choice)), Tagger.load(path, choice)
    red = torch.zeros(len(TINY_CLASSES))
    red[TINY_CLASSES.index("red")] = 0.9
    green = 1 - red

    def people(tagger: Tagger, probabilities: torch.Tensor) -> list:
        return [(t.label, t.path) for t in tagger.tags(probabilities) if t.path[0] == "people"]

    assert people(on, red) == [("person", ("people", "person"))]
    assert people(on, green) == [] and people(off, red) == []
    face = Tag("person", 0.8, ("people", "person"))
    assert [t.probability for t in on.tags(red, people=[face]) if t.label == "person"] == [0.8]


def test_person_from_categories_reads_the_whole_photo_not_its_likeliest_region(tmp_path):
    """The evidence rule was measured on the whole photo; read with the regions, a broad
    category is likelier, and the false people doubled on photos without any."""
    from model.tagger import Scores, Tagger
    from tests.helpers import TINY_CLASSES, write_tiny_checkpoint

    sport = {"label": "sport", "path": ["sport"], "threshold": 0.5, "classes": ["red"]}
    tree = {"name": "t", "hidden": ["green", "blue"], "tags": [sport]}
    path = write_tiny_checkpoint(tmp_path / "t.safetensors", vocabulary=tree)
    choice = RuntimeChoice.resolve("cpu", "torch", "off")
    tagger = Tagger.load(path, choice, FaceDetector.load(choice))
    red = TINY_CLASSES.index("red")

    def scores(whole_red: float, region_red: float) -> Scores:
        whole = torch.full((len(TINY_CLASSES),), (1 - whole_red) / (len(TINY_CLASSES) - 1))
        whole[red] = whole_red
        region = torch.full((len(TINY_CLASSES),), (1 - region_red) / (len(TINY_CLASSES) - 1))
        region[red] = region_red
        heads = tagger.custom_heads
        return Scores(whole, torch.zeros(0), torch.zeros(0), torch.zeros(0), heads, region[None])

    def has_person(s: Scores) -> bool:
        return any(t.path == ("people", "person") for t in tagger.tags(s))

    assert not has_person(scores(0.2, 0.95))  # only a corner looks like sport
    assert any(t.label == "sport" for t in tagger.tags(scores(0.2, 0.95)))  # the tag still is
    assert has_person(scores(0.95, 0.2))


def test_the_default_explanation_is_of_the_models_own_top_tag_not_a_people_rule(tmp_path):
    """person from a category can be a photo's first tag, and no heatmap target: the default
    explanation is the model's own top tag (people tags are explained by their faces)."""
    from PIL import Image

    from model.tagger import Tagger
    from tests.helpers import write_tiny_checkpoint

    tree = {"name": "t", "hidden": [], "tags": [
        {"label": "sport", "path": ["sport"], "threshold": 0.5, "classes": ["green", "blue"]},
        {"label": "ski", "path": ["sport", "ski"], "threshold": 0.0, "classes": ["red"]},
    ]}  # fmt: skip
    path = write_tiny_checkpoint(tmp_path / "t.safetensors", vocabulary=tree)
    choice = RuntimeChoice.resolve("cpu", "torch", "off")
    tagger = Tagger.load(path, choice, FaceDetector.load(choice))
    pixels = tagger.crop(Image.new("RGB", (64, 48), (200, 30, 30)))
    probabilities = tagger.explainer().forward(pixels).probabilities(tagger.card.task)
    # "sport" gathers every class (1.0): person from it comes before "ski"
    assert tagger.tags(probabilities, 1)[0].path == ("people", "person")
    assert tagger.explain(pixels).tag == "ski"
