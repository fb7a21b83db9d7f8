"""Photo folders and manifests, splits, odd files, the decoded cache and the transforms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import data
from model.data import Augment, DataError, Sample, load_dataset
from model.imageio import open_rgb
from model.preprocess import Preprocess, build_eval_transform, normalize
from tests.helpers import COLORS, photo_bytes
from tests.helpers import write_photo_folder as make_folder

PRE = Preprocess(resize=36, crop=32)


def test_class_folders_give_a_stratified_seeded_split(tmp_path):
    root = make_folder(tmp_path / "photos")
    spec = load_dataset(root, val_fraction=0.2, seed=0)
    assert spec.classes == ["blue", "green", "red"] and spec.task == "single_label"
    assert len(spec.train) == 24 and len(spec.val) == 6 and spec.test == []
    for index in range(3):
        assert sum(s.target == index for s in spec.val) == 2  # 20% of each class
    again = load_dataset(root, val_fraction=0.2, seed=0)
    assert [s.path for s in again.val] == [s.path for s in spec.val]
    other = load_dataset(root, val_fraction=0.2, seed=1)
    assert {s.path for s in other.val} != {s.path for s in spec.val}
    assert not {s.path for s in spec.val} & {s.path for s in spec.train}


def test_small_classes_still_get_one_validation_photo(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=2)
    spec = load_dataset(root, val_fraction=0.1)
    assert len(spec.val) == 3 and len(spec.train) == 3


def test_split_folders_are_used_as_they_are(tmp_path):
    make_folder(tmp_path / "set" / "train", per_class=4)
    make_folder(tmp_path / "set" / "val", per_class=2)
    make_folder(tmp_path / "set" / "test", per_class=1, classes={"red": COLORS["red"]})
    spec = load_dataset(tmp_path / "set")
    assert spec.classes == ["blue", "green", "red"]
    assert (len(spec.train), len(spec.val), len(spec.test)) == (12, 6, 1)
    assert spec.test[0].target == spec.classes.index("red")
    assert all("/val/" in str(s.path) for s in spec.val)


def test_split_folders_without_val_are_split_from_train(tmp_path):
    make_folder(tmp_path / "set" / "train", per_class=5)
    spec = load_dataset(tmp_path / "set", val_fraction=0.2)
    assert len(spec.train) == 12 and len(spec.val) == 3


def write_photos(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).write_bytes(photo_bytes(seed=i))


def test_csv_manifest_is_multi_label_with_its_own_split(tmp_path):
    write_photos(tmp_path / "img", [f"{i}.jpg" for i in range(6)])
    (tmp_path / "tags.csv").write_text(
        "path,tags,split\n"
        "img/0.jpg,beach;dog,train\n"
        "img/1.jpg,dog,train\n"
        "img/2.jpg,beach|sunset,train\n"
        "img/3.jpg,sunset,train\n"
        "img/4.jpg,dog;sunset,val\n"
        "img/5.jpg,beach,test\n"
    )
    spec = load_dataset(tmp_path / "tags.csv")
    assert spec.task == "multi_label" and spec.classes == ["beach", "dog", "sunset"]
    assert [s.target for s in spec.train] == [[0, 1], [1], [0, 2], [2]]
    assert spec.val[0].target == [1, 2] and spec.test[0].target == [0]
    assert spec.val[0].path == tmp_path / "img" / "4.jpg"


def test_jsonl_manifest_with_one_tag_each_is_single_label_and_split(tmp_path):
    write_photos(tmp_path, [f"{i}.png" for i in range(8)])
    lines = [{"path": f"{i}.png", "tags": ["cat" if i % 2 else "dog"]} for i in range(8)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    spec = load_dataset(tmp_path / "m.jsonl", val_fraction=0.25)
    assert spec.task == "single_label" and spec.classes == ["cat", "dog"]
    assert len(spec.val) == 2 and {s.target for s in spec.val} == {0, 1}
    forced = load_dataset(tmp_path / "m.jsonl", task="multi_label")
    assert forced.task == "multi_label" and forced.train[0].target in ([0], [1])


def test_bad_manifests_are_clear_errors(tmp_path):
    (tmp_path / "a.csv").write_text("file,label\nx.jpg,cat\n")
    with pytest.raises(DataError, match="header with `path` and `tags`"):
        load_dataset(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"path": "x.jpg", "tags": ["a"], "split": "dev"}\n')
    with pytest.raises(DataError, match="split must be"):
        load_dataset(tmp_path / "b.jsonl")


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=3)
    (root / "red" / "notes.jpg").write_bytes(b"this is not a photo")
    (root / "red" / "empty.jpg").write_bytes(b"")
    (root / "blue" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored, not a skip
    spec = load_dataset(root)
    skipped = {Path(path).name: reason for path, reason in spec.skipped}
    assert set(skipped) == {"notes.jpg", "empty.jpg"}
    assert "not a readable image" in skipped["notes.jpg"]
    assert len(spec.train) + len(spec.val) == 9


def test_a_photo_that_fails_to_decode_is_dropped_by_the_cache(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=3)
    whole = photo_bytes((300, 200), seed=9)
    (root / "green" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # header fine, data cut
    spec = load_dataset(root)
    cache = data.ImageCache(PRE)
    cache.add(s.path for s in spec.train + spec.val)
    assert list(cache.failed) == [str(root / "green" / "cut.jpg")]
    data.drop_samples(spec, cache.failed)
    assert all(s.path.name != "cut.jpg" for s in spec.train + spec.val)
    assert Path(spec.skipped[-1][0]).name == "cut.jpg"


def test_fewer_than_two_classes_is_an_error(tmp_path):
    root = make_folder(tmp_path / "photos", classes={"red": COLORS["red"]})
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset(root)


def test_a_class_without_usable_photos_is_an_error(tmp_path):
    root = make_folder(
        tmp_path / "photos", per_class=3, classes={"red": (1, 2, 3), "blue": (4, 5, 6)}
    )
    (root / "green").mkdir()
    (root / "green" / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="no usable training photos: green"):
        load_dataset(root)


def test_decoding_a_class_empty_is_an_error(tmp_path):
    root = make_folder(
        tmp_path / "photos", per_class=2, classes={"red": (1, 2, 3), "blue": (4, 5, 6)}
    )
    spec = load_dataset(root)
    failed = {str(s.path): "cannot decode" for s in spec.train + spec.val if s.target == 0}
    with pytest.raises(DataError, match="blue"):
        data.drop_samples(spec, failed)


def odd_photos(folder: Path) -> dict[str, Path]:
    """A GIF named .jpg, CMYK JPEG, 16-bit greyscale PNG, palette PNG and RGBA PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "gif_named_jpg.jpg": photo_bytes((50, 40), fmt="GIF", mode="P"),
        "cmyk.jpg": photo_bytes((50, 40), mode="CMYK"),
        "palette.png": photo_bytes((40, 50), fmt="PNG", mode="P"),
        "alpha.png": photo_bytes((40, 40), fmt="PNG", mode="RGBA"),
    }
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    ramp = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.png")
    return {p.name: p for p in folder.iterdir()}


def test_odd_formats_and_modes_decode_to_rgb_at_the_working_size(tmp_path):
    photos = odd_photos(tmp_path / "odd")
    cache = data.ImageCache(PRE)
    cache.add(photos.values())
    assert cache.failed == {}
    for path in photos.values():
        image = cache.get(path)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert min(image.shape[1:]) == PRE.resize
    assert cache.get(photos["sixteen_bit.png"]).float().std() > 10  # scaled, not clipped to 255


def test_odd_photos_load_in_a_folder_set(tmp_path):
    odd_photos(tmp_path / "set" / "odd")
    make_folder(tmp_path / "set", per_class=3, classes={"plain": (9, 9, 9)})
    spec = load_dataset(tmp_path / "set")
    assert spec.skipped == [] and len(spec.train) + len(spec.val) == 8


def test_cached_photos_give_exactly_the_served_eval_tensor(tmp_path):
    path = tmp_path / "p.jpg"
    path.write_bytes(photo_bytes((90, 60), seed=3))
    cache = data.ImageCache(PRE)
    cache.add([path])
    transform = build_eval_transform(PRE)
    assert torch.equal(transform(cache.get(path)), transform(open_rgb(str(path))))


def test_the_cache_decodes_each_photo_once(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "photos", per_class=2)
    calls = []
    real = data.decode_at_working_size
    monkeypatch.setattr(
        data, "decode_at_working_size", lambda p, pre: calls.append(p) or real(p, pre)
    )
    spec = load_dataset(root)
    cache = data.ImageCache(PRE)
    cache.add(s.path for s in spec.train)
    cache.add(s.path for s in spec.train + spec.val)
    dataset = data.PhotoDataset(spec.train, 3, "single_label", lambda image: image, cache)
    for _ in range(2):
        _ = [dataset[i] for i in range(len(dataset))]
    assert len(calls) == 6 and cache.nbytes() > 0


def test_dataset_targets_are_class_indices_or_multi_hot(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(photo_bytes())
    transform = build_eval_transform(PRE)
    image, target = data.PhotoDataset([Sample(path, 2)], 3, "single_label", transform)[0]
    assert image.shape == (3, 32, 32) and target.dtype == torch.int64 and target.item() == 2
    _, multi = data.PhotoDataset([Sample(path, [0, 2])], 3, "multi_label", transform)[0]
    assert multi.dtype == torch.float32 and multi.tolist() == [1.0, 0.0, 1.0]


def test_eval_loader_batches_in_sample_order(tmp_path):
    spec = load_dataset(make_folder(tmp_path / "photos", per_class=3))
    loader = data.make_eval_loader(
        spec.val + spec.train, spec.classes, spec.task, PRE, batch_size=4
    )
    batches = list(loader)
    assert batches[0][0].shape == (4, 3, 32, 32)
    targets = torch.cat([t for _, t in batches])
    assert targets.tolist() == [s.target for s in spec.val + spec.train]


def test_every_augmentation_can_be_switched_on_and_off(tmp_path):
    image = torch.randint(0, 256, (3, 36, 48), dtype=torch.uint8)
    everything = Augment(vflip=True, translate=0.1, trivial_augment=True, random_erasing=0.5)
    nothing = Augment(random_resized_crop=False, hflip=False, color_jitter=0.0)
    torch.manual_seed(0)
    assert data.build_train_transform(PRE, everything)(image).shape == (3, 32, 32)
    plain = data.build_train_transform(Preprocess(resize=32, crop=32), nothing)
    expected = build_eval_transform(Preprocess(resize=32, crop=32))
    small = image[:, :32, :32]
    assert torch.equal(plain(small), expected(small))  # all off: exactly the eval tensor
    assert nothing.batchable and not everything.batchable


def test_batched_shift_and_flip_keep_pixels_and_shapes():
    pre = Preprocess(resize=32, crop=32)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    out = data.augment_batch(
        images, pre, Augment(random_resized_crop=False, color_jitter=0, translate=0.125)
    )
    assert out.shape == (8, 3, 32, 32)
    unchanged = data.augment_batch(
        images, pre, Augment(random_resized_crop=False, color_jitter=0, hflip=False)
    )
    assert torch.allclose(unchanged, normalize(images, pre))


def test_batched_shifts_are_each_photos_own_window_of_its_padded_self():
    pre = Preprocess(resize=32, crop=32)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    aug = Augment(random_resized_crop=False, color_jitter=0, hflip=False, translate=0.125)
    torch.manual_seed(3)
    out = data.augment_batch(images, pre, aug)
    torch.manual_seed(3)  # the same draws, cropped one photo at a time
    top, left = torch.randint(0, 9, (6,)), torch.randint(0, 9, (6,))
    padded = torch.nn.functional.pad(images.float(), (4,) * 4, mode="reflect")
    expected = torch.stack(
        [p[:, y : y + 32, x : x + 32] for p, y, x in zip(padded, top, left, strict=True)]
    )
    assert torch.equal(out, normalize(expected, pre))


def test_fingerprint_follows_files_and_labels_not_location(tmp_path):
    root = make_folder(tmp_path / "a", per_class=3)
    first = load_dataset(root).fingerprint
    assert first.startswith("sha256:") and load_dataset(root).fingerprint == first
    shutil.copytree(root, tmp_path / "b")
    assert load_dataset(tmp_path / "b").fingerprint == first
    (root / "red" / "00.jpg").rename(root / "green" / "moved.jpg")
    assert load_dataset(root).fingerprint != first
