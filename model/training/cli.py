"""Train a tagger: from a folder of photos (or a manifest) to a calibrated, servable checkpoint.

The command line is generated from :class:`TrainConfig` (and :class:`model.data.Augment`): one
flag per field, its help the field's comment, so the config documents itself once.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from dataclasses import MISSING, fields

from model import architectures, data
from model.runtime import ConfigError
from model.training.config import TrainConfig
from model.training.run import train


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line comment in the dataclass source."""
    pattern = re.compile(r"^\s+(\w+): [^#]+#\s*(.+)$")
    matches = (pattern.match(line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2) for m in matches if m}


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    helps = field_help(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {json.dumps(default)})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, dict):
            parser.add_argument(flag, type=json.loads, metavar="JSON", help=text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, help=text)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig | None, str | None]:
    parser = argparse.ArgumentParser(
        prog="phototag train",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,  # only the flags given override the config defaults
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    add_config_flags(parser, TrainConfig, skip=("augment",))
    add_config_flags(parser.add_argument_group("augmentation"), data.Augment)
    given = vars(parser.parse_args(argv))
    resume = given.pop("resume", None)
    if resume is not None:
        return None, resume
    if "data" not in given:
        parser.error("--data is required (a photo folder or a .csv/.jsonl manifest)")
    augment_names = {f.name for f in fields(data.Augment)}
    augment = data.Augment(**{k: v for k, v in given.items() if k in augment_names})
    cfg = TrainConfig(**{k: v for k, v in given.items() if k not in augment_names}, augment=augment)
    return cfg, resume


def main(argv: list[str] | None = None) -> int:
    """``phototag train``: 0 when the run finished; 2 and one line on stderr when the photos or
    the settings cannot work."""
    try:
        cfg, resume = parse_args(argv)
        train(cfg, resume=resume)
    except (data.DataError, ConfigError, architectures.WeightsError) as exc:
        print(f"phototag train: error: {exc}", file=sys.stderr)
        return 2
    return 0
