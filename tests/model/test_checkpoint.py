import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import checkpoint
from model.checkpoint import CheckpointError, load, output_version, save
from model.pretrained import build_default_checkpoint
from tests.helpers import TINY_ARCH_ARGS, TINY_CLASSES, write_tiny_checkpoint


def rewrite_card(path: Path, out: Path, **changes: object) -> Path:
    """A copy of a checkpoint whose card JSON has ``changes`` applied (bypassing validation)."""
    loaded = load(path)
    card = json.loads(loaded.card.to_json())
    card.update(changes)
    save_file(loaded.state_dict, str(out), metadata={"phototag": json.dumps(card)})
    return out


def test_save_then_load_round_trips_card_and_tensors(tiny_checkpoint: Path):
    loaded = load(tiny_checkpoint)
    assert loaded.card.classes == TINY_CLASSES
    assert loaded.card.arch_args == TINY_ARCH_ARGS
    assert loaded.card.preprocess.crop == 32
    net = loaded.build_model()
    assert not net.training
    torch.manual_seed(0)  # write_tiny_checkpoint's seed: the same random weights
    from model.architectures import build

    expected = build("seed_cnn", 3, **TINY_ARCH_ARGS).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in net.state_dict().items())


def test_two_builds_of_the_default_checkpoint_have_one_version(tmp_path: Path):
    first = build_default_checkpoint(tmp_path / "a.safetensors")
    card = json.loads(load(first).card.to_json())
    # a build on another day, by another name, with other notes: the same network
    second = rewrite_card(
        build_default_checkpoint(tmp_path / "b.safetensors"),
        tmp_path / "b2.safetensors",
        created_at="2030-05-05T05:05:05+00:00",
    )
    assert load(first).version == load(second).version
    assert len(load(first).version) == 12
    assert load(first).file_digest != load(second).file_digest
    assert card["created_at"] != json.loads(load(second).card.to_json())["created_at"]


@pytest.mark.parametrize(
    "provenance",
    [
        {"created_at": "2001-01-01T00:00:00+00:00"},
        {"name": "renamed"},
        {"description": "retold"},
        {"metrics": {"val_accuracy": 0.5}},
        {"data_fingerprint": "sha256:other"},
        {"training": {"epochs": 99}},
    ],
)
def test_rewriting_the_provenance_keeps_the_version(tiny_checkpoint, tmp_path, provenance):
    rewritten = rewrite_card(tiny_checkpoint, tmp_path / "p.safetensors", **provenance)
    assert load(rewritten).version == load(tiny_checkpoint).version


@pytest.mark.parametrize(
    "output",
    [
        {"temperature": 1.7},
        {"task": "multi_label", "thresholds": [0.5, 0.5, 0.5]},
        {"classes": ["red", "green", "cyan"]},
        {"preprocess": {"resize": 40, "crop": 32}},
        {"preprocess": {"resize": 36, "crop": 32, "interpolation": "bicubic"}},
        {"arch_args": {**TINY_ARCH_ARGS, "dropout": 0.3}},
        {"tta": "flip"},
        {"tta": "flip_shift"},
    ],
)
def test_whatever_changes_the_outputs_changes_the_version(tiny_checkpoint, tmp_path, output):
    rewritten = rewrite_card(tiny_checkpoint, tmp_path / "o.safetensors", **output)
    assert load(rewritten).version != load(tiny_checkpoint).version


def test_thresholds_and_weights_are_part_of_the_version(tmp_path: Path):
    multi = write_tiny_checkpoint(
        tmp_path / "m.safetensors", task="multi_label", thresholds=[0.5, 0.5, 0.5]
    )
    other = rewrite_card(multi, tmp_path / "t.safetensors", thresholds=[0.5, 0.4, 0.5])
    assert load(multi).version != load(other).version
    loaded = load(multi)
    weights = dict(loaded.state_dict)
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3  # one weight, a little
    changed = save(tmp_path / "w.safetensors", weights, loaded.card)
    assert load(changed).version != loaded.version


def test_an_output_field_added_later_keeps_earlier_versions_at_its_default(tiny_checkpoint):
    """``tta`` joined the card after versions were published: at its default ("none") the
    digest is the one computed without it, so no earlier file changes its version."""
    from model.checkpoint import LATER_FIELDS, OUTPUT_FIELDS, _digest

    loaded = load(tiny_checkpoint)
    assert loaded.card.tta == LATER_FIELDS["tta"] == "none"
    before = tuple(name for name in OUTPUT_FIELDS if name not in LATER_FIELDS)
    assert loaded.version == _digest(loaded.card, loaded.state_dict, before)


def test_a_card_refuses_an_unknown_tta(tiny_checkpoint, tmp_path):
    rewritten = rewrite_card(tiny_checkpoint, tmp_path / "x.safetensors", tta="mirror")
    with pytest.raises(CheckpointError, match="tta must be one of"):
        load(rewritten)


def test_every_card_field_is_either_an_output_or_provenance():
    from dataclasses import fields

    from model.checkpoint import OUTPUT_FIELDS, PROVENANCE_FIELDS, ModelCard

    names = {f.name for f in fields(ModelCard)}
    assert names == set(OUTPUT_FIELDS) | set(PROVENANCE_FIELDS)
    assert not set(OUTPUT_FIELDS) & set(PROVENANCE_FIELDS)


def test_a_checkpoint_written_before_reports_its_version_under_the_new_rule(tiny_checkpoint):
    """The version is computed at load from tensors and card, so any file written by an older
    phototag (whose version was the digest of its bytes) loads and gets the new version."""
    loaded = load(tiny_checkpoint)
    assert loaded.version == output_version(loaded.card, loaded.state_dict)
    assert loaded.version != loaded.file_digest[:12]


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch):
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", seed=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_tiny_checkpoint(path, seed=2)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.safetensors"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        load(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -10])
def test_truncated_file_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path, keep: int):
    data = tiny_checkpoint.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"truncated|too short|corrupt"):
        load(cut)


def test_garbage_and_pickles_are_refused_without_unpickling(tmp_path: Path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(CheckpointError):
        load(evil)
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"w": torch.zeros(2)}, torch_file)
    with pytest.raises(CheckpointError):
        load(torch_file)


def test_header_without_a_model_card_says_how_to_make_one(tmp_path: Path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="without a phototag model card"):
        load(plain)


def test_wrong_format_version_is_refused(tiny_checkpoint: Path, tmp_path: Path):
    out = rewrite_card(tiny_checkpoint, tmp_path / "v9.safetensors", format_version=9)
    with pytest.raises(CheckpointError, match="format version 9 is not supported"):
        load(out)


def test_unknown_architecture_is_refused(tiny_checkpoint: Path, tmp_path: Path):
    out = rewrite_card(tiny_checkpoint, tmp_path / "arch.safetensors", arch="transformer9000")
    with pytest.raises(CheckpointError, match="unknown architecture 'transformer9000'"):
        load(out)


def test_mismatched_tensors_are_refused(tiny_checkpoint: Path, tmp_path: Path):
    more_classes = rewrite_card(
        tiny_checkpoint, tmp_path / "classes.safetensors", classes=["a", "b", "c", "d"]
    )
    with pytest.raises(CheckpointError, match=r"head\.1\.weight has shape \(3, 16\), expected"):
        load(more_classes)
    loaded = load(tiny_checkpoint)
    del loaded.state_dict["head.1.bias"]
    save(tmp_path / "missing.safetensors", loaded.state_dict, loaded.card)
    with pytest.raises(CheckpointError, match=r"missing head\.1\.bias"):
        load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "regression"}, "task must be one of"),
        ({"classes": []}, "at least one non-empty name"),
        ({"classes": ["a", "a", "b"]}, "must be unique"),
        ({"temperature": 0}, "temperature must be positive"),
        ({"thresholds": [0.5]}, "1 thresholds for 3 classes"),
        ({"preprocess": {"resize": 10, "crop": 32}}, "crop <= resize"),
        ({"arch_args": {"widths": "wide"}}, "cannot build"),
        ({"surprise": 1}, "model card is invalid"),
    ],
)
def test_invalid_cards_are_refused_with_a_reason(tiny_checkpoint, tmp_path, changes, message):
    out = rewrite_card(tiny_checkpoint, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match=message):
        load(out)


def test_header_larger_than_the_file_is_refused(tmp_path: Path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="truncated"):
        load(bogus)


def test_nothing_on_the_serving_path_can_unpickle():
    root = Path(__file__).resolve().parents[2]
    serving = ["model/checkpoint.py", "model/preprocess.py", "model/imageio.py"]
    serving += [str(p.relative_to(root)) for p in (root / "app").rglob("*.py")]
    for module in serving:
        text = (root / module).read_text()
        for call in ("import pickle", "pickle.load", "torch.load(", "weights_only=False"):
            assert call not in text, f"{module} uses {call}"


def test_saved_files_are_readable_by_other_users(tiny_checkpoint: Path):
    """A server in a container runs as another user than the training run that wrote the file."""
    assert tiny_checkpoint.stat().st_mode & 0o777 == 0o644
