import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import checkpoint
from model.checkpoint import CheckpointError, load, save
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


def test_version_is_derived_from_the_file_content(tmp_path: Path):
    a = write_tiny_checkpoint(tmp_path / "a.safetensors", seed=1, created_at="2026-01-01T00:00:00")
    b = write_tiny_checkpoint(tmp_path / "b.safetensors", seed=1, created_at="2026-01-01T00:00:00")
    c = write_tiny_checkpoint(tmp_path / "c.safetensors", seed=2, created_at="2026-01-01T00:00:00")
    assert load(a).version == load(b).version
    assert load(a).version != load(c).version
    assert len(load(a).version) == 12


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
