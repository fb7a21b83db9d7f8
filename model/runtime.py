"""What runs a network for inference, decided in one place: device, backend, precision, threads.

Every caller that needs a device (the server, training, the evaluate CLI, library tagging) asks
:func:`resolve_device`; every served network runs behind the small :class:`Runtime` protocol,
built by :func:`create_runtime`, so a new backend is one new class and one line there.
"""

from __future__ import annotations

import torch


class ConfigError(ValueError):
    """A setting whose value cannot work on this machine; the message says which and why."""


def resolve_device(setting: str, rank: int | None = None) -> torch.device:
    """``auto`` -> the GPU when CUDA works, else the CPU; ``cpu``, ``cuda`` or ``cuda:N``, which
    must exist. ``rank`` (a torchrun process's local rank) picks the GPU of an index-less
    ``auto``/``cuda``."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"device {setting!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {setting!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {setting} but CUDA is not available here")
        if device.index is None and rank is not None:
            device = torch.device("cuda", rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device
