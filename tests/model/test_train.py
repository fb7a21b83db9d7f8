"""The trainer: a tiny run end to end, what it writes, serving it, resume and kill -9."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import architectures, checkpoint, evaluate, train
from model.data import Augment, DataError
from model.imageio import open_rgb
from model.preprocess import build_eval_transform
from model.runtime import ConfigError
from model.train import TrainConfig
from tests.helpers import COLORS, REPO, photo_bytes, write_photo_folder

TINY_NET = {"widths": [4, 8], "hidden": [16], "dropout": 0.1, "batch_norm": True}


def make_photos(root: Path, per_class: int = 8) -> Path:
    return write_photo_folder(root, per_class)


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = {
        "data": str(data),
        "out": str(out),
        "arch": "seed_cnn",
        "arch_args": TINY_NET,
        "resize": 36,
        "crop": 32,
        "epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "workers": 0,
        "threads": 1,  # tiny tensors: a second thread only adds synchronisation
        "augment": Augment(crop_scale_min=0.5, translate=0.1),
    }
    return TrainConfig(**(values | overrides))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with the cores shared, extra threads mostly wait on each other."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = make_photos(tmp_path_factory.mktemp("photos"))
    (root / "red" / "broken.jpg").write_bytes(b"not a photo at all")
    return root


@pytest.fixture(scope="module")
def finished_run(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.train(tiny_config(photos, out, tta_flip=True))
    return out


def test_a_run_writes_a_servable_calibrated_checkpoint_and_its_outputs(finished_run, photos):
    names = {p.name for p in finished_run.iterdir()}
    assert {
        "best.safetensors",
        "last.safetensors",
        "state.pt",
        "history.csv",
        "val_evaluation.json",
        "val_tta_evaluation.json",
    } <= names
    assert {"report.json", "history.png", "val_confusion.png", "val_reliability.png"} <= names
    card = checkpoint.load(finished_run / "best.safetensors").card
    evaluation = json.loads((finished_run / "val_evaluation.json").read_text())
    assert card.classes == ["blue", "green", "red"] and card.task == "single_label"
    assert (card.preprocess.resize, card.preprocess.crop) == (36, 32)
    assert card.arch_args == TINY_NET | {"input_size": 32}
    assert card.temperature == evaluation["temperature"] > 0
    assert card.data_fingerprint.startswith("sha256:")
    assert card.training["arch"] == "seed_cnn" and card.training["epochs"] == 3
    assert {"val_accuracy", "val_ece_before", "val_ece_after", "val_accuracy_tta"} <= set(
        card.metrics
    )
    assert len(evaluation["confusion_matrix"]) == 3
    report = json.loads((finished_run / "report.json").read_text())
    assert [Path(s["path"]).name for s in report["skipped"]] == ["broken.jpg"]
    rows = list(csv.DictReader((finished_run / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(rows[0])


def test_the_evaluate_cli_on_the_validation_split_gets_the_numbers_the_run_reported(
    finished_run, photos, tmp_path
):
    cfg = TrainConfig.from_dict(checkpoint.load(finished_run / "best.safetensors").card.training)
    args = ["--checkpoint", finished_run / "best.safetensors", "--data", photos, "--split", "val"]
    args += ["--val-fraction", cfg.val_fraction, "--seed", cfg.seed, "--workers", 0]
    assert evaluate.main([str(a) for a in [*args, "--out", tmp_path]]) == 0
    cli = json.loads((tmp_path / "evaluation.json").read_text())
    run = json.loads((finished_run / "val_evaluation.json").read_text())
    assert cli.pop("source")["checkpoint_version"] == run.pop("source")["checkpoint_version"]
    assert cli["num_samples"] == 6 and {"accuracy", "ece", "nll", "per_class"} <= set(cli)
    assert cli == run  # every number: accuracy, ECE and NLL before and after T, per class


def test_served_probabilities_equal_the_trained_network_with_its_temperature(
    finished_run, photos, client_for
):
    best = checkpoint.load(finished_run / "best.safetensors")
    photo = photos / "green" / "03.jpg"
    image = build_eval_transform(best.card.preprocess)(open_rgb(str(photo)))
    with torch.no_grad():
        logits = best.build_model()(image.unsqueeze(0))[0]
    expected = torch.softmax(logits / best.card.temperature, 0)
    client = client_for(finished_run / "best.safetensors")
    response = client.post(
        "/v1/tags?all=true", files={"file": ("g.jpg", photo.read_bytes(), "image/jpeg")}
    )
    served = response.json()["results"][0]["probabilities"]
    assert list(served) == best.card.classes
    assert torch.allclose(torch.tensor(list(served.values())), expected, atol=1e-6)


class Interrupted(Exception):
    pass


def stop_after(epochs: int):
    def hook(done: int) -> None:
        if done == epochs:
            raise Interrupted

    return hook


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    first, second = tensors(a), tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def history(run: Path) -> list[dict[str, str]]:
    ignore = {"seconds", "images_per_s"}
    return [
        {k: v for k, v in row.items() if k not in ignore}
        for row in csv.DictReader((run / "history.csv").open())
    ]


def test_resume_continues_exactly_like_an_uninterrupted_run(photos, tmp_path):
    settings = {"epochs": 4, "ema_decay": 0.9, "patience": 0}
    train.train(tiny_config(photos, tmp_path / "whole", **settings))
    with pytest.raises(Interrupted):
        train.train(tiny_config(photos, tmp_path / "cut", **settings), on_epoch_end=stop_after(2))
    assert len(history(tmp_path / "cut")) == 2
    train.train(resume=tmp_path / "cut")
    assert_same_tensors(
        tmp_path / "whole" / "last.safetensors", tmp_path / "cut" / "last.safetensors"
    )
    assert_same_tensors(
        tmp_path / "whole" / "best.safetensors", tmp_path / "cut" / "best.safetensors"
    )
    assert history(tmp_path / "whole") == history(tmp_path / "cut")


def test_a_run_killed_with_sigkill_resumes_from_its_last_complete_state(photos, tmp_path):
    run = tmp_path / "killed"
    args = ["--data", str(photos), "--out", str(run), "--arch", "seed_cnn", "--resize", "36"]
    args += ["--arch-args", json.dumps(TINY_NET), "--epochs", "8", "--batch-size", "8"]
    args += ["--workers", "0", "--threads", "1", "--patience", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "model.train", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "state.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = torch.load(run / "state.pt", weights_only=True)["progress"]["epoch"]
    assert 1 <= done < 8
    cfg, _ = train.parse_args(args)
    train.train(resume=run)
    assert [int(r["epoch"]) for r in history(run)] == list(range(1, 9))
    assert not list(run.glob(".*.tmp"))
    assert checkpoint.load(run / "best.safetensors").card.training["epochs"] == 8
    train.train(cfg.__class__(**(cfg.__dict__ | {"out": str(tmp_path / "whole")})))
    assert_same_tensors(run / "last.safetensors", tmp_path / "whole" / "last.safetensors")


def test_resuming_a_run_without_a_complete_epoch_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no complete epoch"):
        train.train(resume=tmp_path)


def test_pretrained_fine_tuning_trains_the_head_first_then_everything(photos, tmp_path):
    shipped = architectures.load_shipped_lite0()
    snapshots = []
    cfg = tiny_config(
        photos, tmp_path, arch="efficientnet_lite0", arch_args={}, pretrained=True, epochs=2
    )
    cfg.freeze_epochs, cfg.resize, cfg.crop = 1, 64, 64
    trainer = train.Trainer(cfg, train.Dist(), train.Log(train.Dist()))
    trainer.fit(lambda done: snapshots.append(trainer.net.features[0][0].weight.detach().clone()))
    stem = shipped["features.0.0.weight"]
    assert torch.equal(snapshots[0], stem)  # epoch 1: backbone frozen
    assert not torch.equal(snapshots[1], stem)  # epoch 2: fine-tuned at the lower LR
    assert [row["phase"] for row in trainer.progress.history] == ["head", "all"]
    backbone_lrs = {g["lr_scale"] for g in trainer.optimizer.param_groups}
    assert backbone_lrs == {0.1, 1.0}


def test_weights_file_initialises_a_torchvision_backbone_and_stays_out_of_the_card(tmp_path):
    source = architectures.build("resnet18", 5)
    torch.save(source.features.state_dict(), tmp_path / "resnet18.pth")
    cfg = TrainConfig(arch="resnet18", weights=str(tmp_path / "resnet18.pth"))
    net = train.build_network(cfg, 3)
    assert torch.equal(net.features.conv1.weight, source.features.conv1.weight)
    assert "weights" not in train.effective_arch_args(cfg)


def test_pretrained_a_registered_name_and_the_original_file_start_from_the_same_tensors():
    sources = [
        {"pretrained": True},
        {"weights": "efficientnet_lite0.imagenet"},
        {"weights": str(architectures.shipped_lite0_weights_path())},  # original key names
    ]
    nets = [train.build_network(TrainConfig(**source), 3) for source in sources]
    first = nets[0].features.state_dict()
    for net in nets[1:]:
        assert all(torch.equal(t, first[k]) for k, t in net.features.state_dict().items())


def test_a_config_checks_itself_and_the_cli_says_what_is_wrong_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--optimizer: must be one of adamw, sgd"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="no registered weights for resnet18"):
        TrainConfig(arch="resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="--device"):
        TrainConfig(device="gpu")
    assert train.main(["--data", str(tmp_path), "--schedule", "linear"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phototag train: error: --schedule:") and err.count("\n") == 1


def test_multi_label_manifest_gets_thresholds_and_map(tmp_path):
    rows = ["path,tags,split"]
    for i in range(24):
        tags = ["warm" if i % 2 else "cold"] + (["bright"] if i % 3 == 0 else [])
        color = (220, 40, 40) if i % 2 else (40, 40, 220)
        (tmp_path / f"{i}.png").write_bytes(photo_bytes((36, 36), color, fmt="PNG", seed=i))
        rows.append(f"{i}.png,{';'.join(tags)},{'test' if i >= 18 else ''}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    train.train(tiny_config(tmp_path / "tags.csv", out, epochs=2, tta_flip=True))
    card = checkpoint.load(out / "best.safetensors").card
    assert card.task == "multi_label" and card.classes == ["bright", "cold", "warm"]
    assert len(card.thresholds) == 3 and card.temperature == 1.0
    assert "val_mAP" in card.metrics and "val_macro_f1" in card.metrics
    assert "test_mAP" in card.metrics and "val_accuracy_tta" not in card.metrics
    test = json.loads((out / "test_evaluation.json").read_text())
    assert test["num_samples"] == 6 and test["source"]["split"] == "test"
    assert [test["per_class"][c]["threshold"] for c in card.classes] == card.thresholds
    assert {"val_per_class.png", "val_tta_evaluation.json", "test_per_class.png"} <= {
        p.name for p in out.iterdir()
    }


def test_tags_that_are_paths_give_the_checkpoint_a_vocabulary(tmp_path, client_for):
    rows = ["path,tags"]
    paths = {"red": "colour/warm/red", "green": "colour/cool/green", "blue": "colour/cool/blue"}
    for i in range(30):
        name, color = list(COLORS.items())[i % 3]
        (tmp_path / f"{i}.png").write_bytes(photo_bytes((36, 36), color, fmt="PNG", seed=i))
        rows.append(f"{i}.png,{paths[name]}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    train.train(tiny_config(tmp_path / "tags.csv", out, epochs=3, tag_precision=0.9))
    card = checkpoint.load(out / "best.safetensors").card
    assert card.task == "single_label" and sorted(card.classes) == sorted(paths.values())
    tags = {t["label"]: t for t in card.vocabulary["tags"]}
    assert tags["cool"]["path"] == ["colour", "cool"] and tags["blue"]["classes"] == [
        "colour/cool/blue"
    ]
    assert all(0 <= t["threshold"] <= 1 for t in tags.values())
    evaluation = json.loads((out / "val_evaluation.json").read_text())
    assert {"precision", "coverage", "tags_per_photo"} <= set(evaluation["tags"])
    client = client_for(out / "best.safetensors")
    photo = photo_bytes((36, 36), COLORS["blue"], fmt="PNG")
    served = client.post("/v1/tags?threshold=0", files={"file": ("b.png", photo)}).json()
    assert all(t["path"][0] == "colour" for t in served["results"][0]["tags"])


def test_early_stopping_ends_a_run_that_stopped_improving(photos, tmp_path):
    no_batch_norm = TINY_NET | {"batch_norm": False}  # so nothing changes with a zero LR
    cfg = tiny_config(photos, tmp_path, epochs=6, patience=1, lr=0.0, arch_args=no_batch_norm)
    trainer = train.train(cfg)
    assert trainer.progress.stopped_early and trainer.progress.epoch == 2
    assert json.loads((tmp_path / "report.json").read_text())["training"]["stopped_early"]


def test_one_class_is_a_clear_error_from_the_cli(tmp_path, capsys):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jpg").write_bytes(photo_bytes())
    assert train.main(["--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "at least 2 classes" in capsys.readouterr().err


def test_cli_flags_fill_the_config_and_seed_cnn_gets_small_inputs():
    cfg, resume = train.parse_args(
        ["--data", "d", "--arch", "seed_cnn", "--no-hflip", "--translate", "0.125", "--tta-flip"]
    )
    assert resume is None and (cfg.resize, cfg.crop) == (32, 32)
    assert cfg.augment.hflip is False and cfg.augment.translate == 0.125 and cfg.tta_flip
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    default, _ = train.parse_args(["--data", "d", "--pretrained"])
    assert (default.arch, default.crop, default.optimizer) == ("efficientnet_lite0", 224, "adamw")
    assert train.parse_args(["--resume", "runs/x"]) == (None, "runs/x")


def test_schedules_warm_up_then_decay_to_zero():
    cosine = [train.lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == 1.0 and cosine[-1] < 0.01
    onecycle = [train.lr_factor(s, 100, 30, "onecycle") for s in range(100)]
    assert onecycle[0] > 0.04 and max(onecycle) == 1.0 and onecycle[-1] < 0.02


def test_balanced_sampling_draws_classes_equally():
    weights = torch.tensor([1 / 90] * 90 + [1 / 10] * 10)
    sampler = train.BalancedSampler(weights, train.Dist(), seed=0)
    drawn = torch.tensor(list(sampler))
    rare = (drawn >= 90).float().mean()
    assert len(drawn) == 100 and 0.35 < rare < 0.65


def test_seed_cnn_can_pool_after_the_first_conv_of_each_block():
    args = {"widths": [8, 16], "convs_per_block": 2, "batch_norm": True, "hidden": []}
    late = architectures.build("seed_cnn", 10, **args)
    early = architectures.build("seed_cnn", 10, **args, pool_first=True)
    assert early(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in early.parameters()) == sum(p.numel() for p in late.parameters())
    kinds = [type(m).__name__ for m in early.features[:8]]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]


def test_balancing_works_for_multi_label_photos_without_tags():
    from model.data import DatasetSpec, Sample

    photos = [
        Sample(Path(f"{i}.jpg"), [0] if i < 8 else ([0, 1] if i == 8 else [])) for i in range(10)
    ]
    spec = DatasetSpec(["a", "b"], "multi_label", photos, [], [])
    sampler = train.make_sampler(spec, TrainConfig(balance="sampler"), train.Dist())
    assert len(list(sampler)) == 10
    loss = train.loss_function(spec, TrainConfig(balance="loss"), torch.device("cpu"))
    assert torch.isfinite(loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])))
