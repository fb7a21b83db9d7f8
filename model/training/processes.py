"""This process's place in a torchrun job, and what it prints."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_setting: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    cuda = device_setting != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast(value: object, ddp: Dist) -> object:
    """Rank 0's ``value`` on every rank."""
    if ddp.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Log:
    """Progress bars on a terminal, one plain line per epoch otherwise; silent off rank 0."""

    def __init__(self, ddp: Dist):
        self.enabled = ddp.main
        self.tty = self.enabled and sys.stderr.isatty()

    def info(self, message: str) -> None:
        if self.tty:
            tqdm.write(message, file=sys.stdout)
        elif self.enabled:
            print(message, flush=True)

    def bar(self, total: int, desc: str, leave: bool = False) -> tqdm:
        return tqdm(total=total, desc=desc, leave=leave, disable=not self.tty, dynamic_ncols=True)
