"""``phototag``: one command, a subcommand per job, --help at each level, exit codes 0/1/2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import cli
from tests.helpers import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_its_own_help(name):
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"phototag {name}" in result.stdout


def test_serve_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = run("serve", "--checkpoint", str(tmp_path / "none.safetensors"), "--port", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"phototag: cannot start: checkpoint not found: {tmp_path / 'none.safetensors'} "
        f"(build the default one with `python -m model.pretrained --out "
        f"{tmp_path / 'none.safetensors'}`)"
    ]


def test_serve_flags_are_checked_like_the_settings():
    result = run("serve", "--port", "70000")
    assert result.returncode == 2 and "PHOTOTAG_PORT=70000" in result.stderr
