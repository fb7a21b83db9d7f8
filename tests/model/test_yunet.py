"""YuNet: the converted weights, the network and decoding against libfacedetection's own build
(``tests/data/yunet_reference.json``, made by ``tools/yunet_reference.py``), and the decoding on
hand-made maps."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.ops import box_iou

from model.people.yunet import (
    OUTPUT_NAMES,
    STRIDES,
    WEIGHTS_PATH,
    YuNet,
    candidates,
    decode,
    load_yunet,
    network_input,
    prepare_input,
    to_original,
    working_pixels,
)
from tests.helpers import tool

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "yunet_reference.json"


@pytest.fixture(scope="module")
def net() -> YuNet:
    return load_yunet()


# --------------------------------------------------------------------------------------------
# The weights
# --------------------------------------------------------------------------------------------


def test_the_weights_file_fits_the_network_exactly(net):
    stored = load_file(str(WEIGHTS_PATH))
    expected = YuNet().state_dict()
    assert set(stored) == set(expected)
    assert all(stored[k].shape == expected[k].shape for k in stored)
    assert sum(t.numel() for t in stored.values()) == 53_104


def test_every_array_of_the_cpp_is_exactly_one_tensor_of_the_file():
    convert = tool("convert_yunet_weights")
    if not convert.DEFAULT_CPP.exists():
        pytest.skip(f"no {convert.DEFAULT_CPP}")
    text = convert.DEFAULT_CPP.read_text()
    arrays = convert.read_arrays(text)
    assert len(arrays) == 106  # 53 layers: weight and bias each
    keys = {convert.key_for(name) for name in arrays}
    assert len(keys) == len(arrays)
    stored = load_file(str(WEIGHTS_PATH))
    assert keys == set(stored)
    converted = convert.convert_text(text)
    for key, tensor in converted.items():
        assert torch.equal(tensor, stored[key]), key
    for name, array in arrays.items():  # the same numbers, only laid out for PyTorch
        key = convert.key_for(name)
        if key == convert.STEM:  # 27 values of a 3x3 window over 3 channels, zeros to 32
            assert not array.reshape(16, 32)[:, 27:].any()
            array = array.reshape(16, 32)[:, :27]
        values = torch.from_numpy(array.reshape(-1)).sort().values
        assert torch.equal(values, stored[key].flatten().sort().values), key


# --------------------------------------------------------------------------------------------
# Against the library: every face it finds, and no other
# --------------------------------------------------------------------------------------------

FIXTURE_CASES = json.loads(FIXTURE.read_text())["cases"]


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    pytest.importorskip("skimage.data", reason="needs scikit-image (the [dev] extra)")
    return {name: build() for name, build in tool("yunet_reference").PHOTOS.items()}


def library_rows(faces: list[dict]) -> torch.Tensor:
    """The fixture's integer faces as (K, 15) rows like ours (still truncated)."""
    rows = []
    for face in faces:
        x, y, w, h = face["box_xywh"]
        rows.append([x, y, x + w, y + h, face["score_percent"] / 100, *face["landmarks"]])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 15)


@pytest.mark.parametrize(
    "case", FIXTURE_CASES, ids=[f"{c['photo']}-{c['work_size']}" for c in FIXTURE_CASES]
)
def test_the_network_and_decoding_find_what_the_library_finds(net, photos, case):
    prepared = prepare_input(photos[case["photo"]], case["work_size"])
    assert list(prepared.size) == case["size"]
    with torch.inference_mode():
        # a little under the library's floor of 0.2: a face at 0.2 must not get lost to rounding
        ours = decode(net(network_input(prepared.pixels)), prepared.padded, score_threshold=0.19)[0]
    library = library_rows(case["faces"])
    # the library truncates everything to integers (score to percent): compare ours truncated
    # the same way, within a pixel (x1 = int(x0) + int(w): within two) and a hundredth
    truncated = ours.clone()
    truncated[:, 2:4] = ours[:, 0:2].trunc() + (ours[:, 2:4] - ours[:, 0:2]).trunc()
    truncated[:, 4] = (ours[:, 4] * 100).trunc() / 100
    truncated[:, [0, 1, *range(5, 15)]] = ours[:, [0, 1, *range(5, 15)]].trunc()
    matched = set()
    if len(library):
        overlap = box_iou(library[:, :4], truncated[:, :4]) if len(ours) else None
        for i, face in enumerate(library):
            assert overlap is not None and overlap[i].max() > 0.9, f"library face {i} not found"
            j = int(overlap[i].argmax())
            matched.add(j)
            assert (truncated[j, :4] - face[:4]).abs().max() <= 1, (i, truncated[j], face)
            assert (truncated[j, 5:] - face[5:]).abs().max() <= 1, (i, truncated[j], face)
            assert abs(truncated[j, 4] - face[4]) <= 0.011, (i, truncated[j], face)
    extra = [j for j in range(len(ours)) if j not in matched and ours[j, 4] >= 0.21]
    assert not extra, f"faces the library does not find: {ours[extra]}"
    for threshold in (0.5, 0.7):  # the thresholds a tagger uses
        assert int((ours[:, 4] >= threshold).sum()) == int((library[:, 4] >= threshold).sum())


def test_the_group_photo_has_its_eight_faces_with_eyes_above_mouths(net, photos):
    prepared = prepare_input(photos["group"], 640)
    with torch.inference_mode():
        faces = decode(net(network_input(prepared.pixels)), prepared.padded, score_threshold=0.7)[0]
    faces = to_original(faces, prepared.scale)
    assert len(faces) == 8
    points = faces[:, 5:].reshape(-1, 5, 2)  # right eye, left eye, nose, right/left mouth
    assert torch.all(points[:, 0, 0] < points[:, 1, 0])  # the right eye is left in the photo
    assert torch.all(points[:, 3, 0] < points[:, 4, 0])
    assert torch.all(points[:, :2, 1].amax(1) < points[:, 2, 1])  # eyes above the nose
    assert torch.all(points[:, 2, 1] < points[:, 3:, 1].amin(1))  # nose above the mouth
    inside = (points >= faces[:, None, 0:2]) & (points <= faces[:, None, 2:4])
    assert torch.all(inside)


def test_openvino_converts_the_network_and_agrees_in_f32(net):
    openvino = pytest.importorskip("openvino")
    x = torch.rand(2, 3, 96, 128) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracing's deprecation
        model = openvino.convert_model(net, example_input=x[:1])
    # f32 asked for: on CPUs with native bf16 OpenVINO would otherwise run in bf16
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert len(compiled.outputs) == len(OUTPUT_NAMES)
    result = compiled(x.numpy())  # another batch size than the example's
    with torch.inference_mode():
        expected = net(x)
    for i, tensor in enumerate(expected):
        torch.testing.assert_close(torch.from_numpy(result[i]), tensor, atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Decoding on hand-made maps; the input
# --------------------------------------------------------------------------------------------

NEVER = -30.0  # a logit whose sigmoid is ~1e-13


def blank_maps(height: int = 64, width: int = 96, batch: int = 1) -> list[torch.Tensor]:
    """Raw maps where no prior is a face."""
    maps = []
    for stride in STRIDES:
        size = (height // stride, width // stride)
        for channels in (1, 1, 4, 10):
            fill = NEVER if channels == 1 else 0.0
            maps.append(torch.full((batch, channels, *size), fill))
    return maps


def set_prior(maps, level, row, col, score, box, points=(0.0,) * 10, image=0):
    """Make prior (row, col) of ``level`` a face: cls = obj logits for sqrt(p * p) = score."""
    logit = math.log(score / (1 - score))
    cls, obj, bbox, kps = maps[4 * level : 4 * level + 4]
    cls[image, 0, row, col] = obj[image, 0, row, col] = logit
    bbox[image, :, row, col] = torch.tensor(box)
    kps[image, :, row, col] = torch.tensor(points)


def test_a_single_prior_decodes_to_its_box_and_landmarks():
    maps = blank_maps()
    # stride 16, row 1, col 2: the prior is the grid point (32, 16)
    point_offsets = (-0.5, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 1.0, -1.0, -2.0)
    set_prior(maps, 1, 1, 2, 0.9, (0.5, -0.25, math.log(2), math.log(3)), point_offsets)
    (faces,) = decode(maps, (64, 96))
    assert faces.shape == (1, 15)
    # centre: prior + offset * stride = (40, 12); size: exp(log 2, log 3) * stride = (32, 48)
    box = (40 - 16, 12 - 24, 40 + 16, 12 + 24)
    points = [32 + 16 * d if i % 2 == 0 else 16 + 16 * d for i, d in enumerate(point_offsets)]
    torch.testing.assert_close(faces[0], torch.tensor([*box, 0.9, *points]))


def test_candidates_are_every_prior_in_the_library_order():
    rows = candidates(blank_maps(64, 96))
    assert rows.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 15)
    centres = (rows[0, :, 0:2] + rows[0, :, 2:4]) / 2
    assert centres[1].tolist() == [8, 0] and centres[12].tolist() == [0, 8]  # row-major
    assert centres[96].tolist() == [0, 0] and centres[97].tolist() == [16, 0]  # then stride 16


def test_nms_keeps_the_better_of_two_overlapping_boxes_and_both_apart():
    maps = blank_maps()
    set_prior(maps, 0, 2, 2, 0.8, (0.0, 0.0, 1.0, 1.0))  # centre (16, 16), 21.7 px square
    set_prior(maps, 0, 2, 3, 0.9, (-0.25, 0.0, 1.0, 1.0))  # centre (22, 16): IoU 0.8
    set_prior(maps, 0, 6, 10, 0.7, (0.0, 0.0, 1.0, 1.0))  # far away
    (faces,) = decode(maps, (64, 96))
    assert faces[:, 4].tolist() == pytest.approx([0.9, 0.7])
    (faces,) = decode(maps, (64, 96), nms_iou=0.85)
    assert faces[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7])
    (faces,) = decode(maps, (64, 96), score_threshold=0.75, nms_iou=0.85)
    assert faces[:, 4].tolist() == pytest.approx([0.9, 0.8])
    (faces,) = decode(maps, (64, 96), top_k=1)
    assert faces[:, 4].tolist() == pytest.approx([0.9])


def test_each_image_of_a_batch_gets_its_own_faces():
    maps = blank_maps(batch=2)
    set_prior(maps, 2, 1, 1, 0.6, (0.0, 0.0, 0.0, 0.0), image=1)
    first, second = decode(maps, (64, 96))
    assert first.shape == (0, 15) and second.shape == (1, 15)


def test_decode_refuses_an_input_size_the_maps_do_not_come_from():
    with pytest.raises(ValueError, match="do not come from"):
        decode(blank_maps(64, 96), (96, 64))


def test_a_photo_without_faces_gives_none(net):
    for colour in ((0, 0, 0), (128, 128, 128), (250, 240, 230)):
        prepared = prepare_input(Image.new("RGB", (400, 300), colour), 320)
        with torch.inference_mode():
            (faces,) = decode(net(network_input(prepared.pixels)), prepared.padded)
        assert faces.shape == (0, 15)


def test_the_input_is_bgr_0_255_zero_padded_to_32_with_the_scale_back():
    photo = Image.new("RGB", (1000, 500), (255, 16, 1))  # red
    prepared = prepare_input(photo, 200)
    assert prepared.size == (200, 100) and prepared.padded == (128, 224)
    assert prepared.scale == (5.0, 5.0)
    assert prepared.pixels.shape == (1, 128, 224, 3) and prepared.pixels.dtype == torch.uint8
    pixels = network_input(prepared.pixels)  # what the network reads
    assert pixels.shape == (1, 3, 128, 224) and pixels.dtype == torch.float32
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert pixels[0, :, :100, :200].amax((1, 2)).tolist() == [1, 16, 255]  # B, G, R
    assert pixels[0, :, :100, :200].amin((1, 2)).tolist() == [1, 16, 255]
    assert pixels[0, :, 100:].abs().sum() == 0 and pixels[0, :, :, 200:].abs().sum() == 0
    small = prepare_input(Image.new("L", (64, 40), 7), 640)  # never upscaled; any mode
    assert small.size == (64, 40) and small.pixels.shape == (1, 64, 64, 3)
    assert small.scale == (1.0, 1.0)


def test_the_working_size_matches_pils_bilinear_within_a_level():
    """torch's antialiased bilinear (after a box reduce where the photo is over twice too big)
    in place of PIL's resize: the same pixels within one level."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((1700, 1301))  # 2.7x and 6.6x too large
    for work_size, size in ((640, (640, 490)), (256, (256, 196)), (2000, (1700, 1301))):
        ours = working_pixels(photo, work_size).numpy().astype(int)
        pil = photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        assert ours.shape == (size[1], size[0], 3)
        assert abs(ours - np.asarray(pil).astype(int)).max() <= 1


def test_to_original_scales_x_and_y_columns():
    row = torch.arange(15, dtype=torch.float32)[None]
    scaled = to_original(row, (2.0, 10.0))
    x_columns = [0, 2, 5, 7, 9, 11, 13]
    y_columns = [1, 3, 6, 8, 10, 12, 14]
    assert torch.equal(scaled[0, x_columns], row[0, x_columns] * 2)
    assert torch.equal(scaled[0, y_columns], row[0, y_columns] * 10)
    assert scaled[0, 4] == 4  # the score stays
