"""Settings: every derived value resolved in one place, every bad value refused in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from app.settings import Settings, get_settings
from model.runtime import ConfigError
from tests.helpers import REPO, write_tiny_checkpoint


def test_the_plan_holds_every_derived_value_on_a_cpu():
    plan = Settings(device="cpu", backend="torch").serving_plan()
    assert plan.runtime.device == torch.device("cpu") and plan.runtime.backend == "torch"
    assert (plan.max_batch_size, plan.max_batch_wait_s) == (8, 0.002)
    assert plan.warm_up_sizes == (1, 8) and plan.decode_threads >= 1
    custom = Settings(device="cpu", max_batch_size=3, max_batch_wait_ms=0, decode_threads=5)
    plan = custom.serving_plan()
    assert (plan.max_batch_size, plan.max_batch_wait_s, plan.decode_threads) == (3, 0.0, 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_an_impossible_device_is_a_configuration_error():
    with pytest.raises(ConfigError, match="PHOTOTAG_DEVICE=cuda:1 but CUDA is not available"):
        Settings(device="cuda:1").serving_plan()


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("PHOTOTAG_LOG_LEVEL", "loud")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="PHOTOTAG_LOG_LEVEL=loud: Input should be"):
            get_settings()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(("value", "expected"), [("4", 4), ("0", 0)])
def test_regions_are_read_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("PHOTOTAG_REGIONS", value)
    get_settings.cache_clear()
    try:
        assert get_settings().regions == expected
        monkeypatch.setenv("PHOTOTAG_REGIONS", "3")
        get_settings.cache_clear()
        with pytest.raises(ConfigError, match=r"PHOTOTAG_REGIONS=3: .*0 or 4"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_log_level_is_read_in_any_case():
    assert Settings(log_level="WARNING").log_level == "warning"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PHOTOTAG_LOG_LEVEL", "loud", "PHOTOTAG_LOG_LEVEL=loud"),
        ("PHOTOTAG_MAX_FILES", "many", "PHOTOTAG_MAX_FILES=many"),
        ("PHOTOTAG_DEVICE", "tpu", "PHOTOTAG_DEVICE=tpu"),
        ("PHOTOTAG_CHECKPOINT", "bad", "bad.safetensors"),
    ],
)
def test_the_server_refuses_a_bad_setting_or_checkpoint_in_one_line(tmp_path, variable, value,
                                                                     expected):  # fmt: skip
    good = write_tiny_checkpoint(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"definitely not a checkpoint")
    env = {"PHOTOTAG_CHECKPOINT": str(good), "PATH": "/usr/bin:/bin", "PHOTOTAG_PORT": "1"}
    env[variable] = str(bad) if variable == "PHOTOTAG_CHECKPOINT" else value
    proc = subprocess.run(
        [sys.executable, "-m", "app"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("phototag: cannot start:") and expected in lines[0]
