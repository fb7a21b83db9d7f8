"""Run or resume a training job, start to finished run folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model import data
from model.training.config import TrainConfig
from model.training.loop import STATE_FILE, Trainer
from model.training.processes import Log, init_distributed
from model.training.report import finalize, summary_line


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The last complete state of a run (written atomically; tensors and plain values only)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise data.DataError(
            f"{path} does not exist: the run has no complete epoch to resume from; start it again"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of a write that a kill interrupted; never read, safe to delete."""
    for path in run_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Trainer:
    """Run (or resume) training and finalize the run folder; return the trainer."""
    state = None
    if resume is not None:
        state = read_state(resume)
        cfg = TrainConfig.from_dict(state["config"])
        cfg.out = str(resume)  # the folder may have been moved since
    if cfg is None:
        raise TypeError("train() needs a TrainConfig, or resume= a run folder")
    ddp = init_distributed(cfg.device)
    try:
        log = Log(ddp)
        if ddp.main and Path(cfg.out).is_dir():
            remove_stale_temp_files(Path(cfg.out))
        trainer = Trainer(cfg, ddp, log)
        if state is not None:
            trainer.load_state_dict(state)
            log.info(f"resuming {cfg.out} after epoch {trainer.progress.epoch}")
        trainer.fit(on_epoch_end)
        if ddp.main:
            results = finalize(trainer)
            log.info(summary_line(results, Path(cfg.out)))
        return trainer
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()
