"""Lookahead: slow weights that the network is pulled back to every few steps (airbench's
version, with the decay growing over the run)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    """Every ``every`` optimizer steps: ``slow <- decay * slow + (1 - decay) * fast``, then
    ``fast <- slow``; the float buffers (BatchNorm's running statistics) too.

    ``decay`` is ``base ** every * progress ** 3`` at ``progress`` = steps done / total steps: the
    start of a run is barely slowed, its end averages over many steps. The last step of the
    run leaves the network at the slow weights.
    """

    def __init__(self, net: nn.Module, every: int, base: float):
        self.every, self.base = every, base
        self.slow = {name: t.detach().clone() for name, t in _floats(net).items()}

    def decay(self, done: int, total: int) -> float:
        return self.base**self.every * (done / total) ** 3

    @torch.no_grad()
    def step(self, net: nn.Module, done: int, total: int) -> None:
        """After optimizer step ``done`` (1-based) of ``total``."""
        if done >= total:
            self.pull(net, 1.0)
        elif done % self.every == 0:
            self.pull(net, self.decay(done, total))

    @torch.no_grad()
    def pull(self, net: nn.Module, decay: float) -> None:
        for name, fast in _floats(net).items():
            slow = self.slow[name]
            slow.lerp_(fast, 1 - decay)
            fast.copy_(slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tensor in state["slow"].items():
            self.slow[name].copy_(tensor)


def _floats(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's floating-point parameters and buffers (not BatchNorm's batch counter)."""
    return {name: t for name, t in net.state_dict(keep_vars=True).items() if t.is_floating_point()}
