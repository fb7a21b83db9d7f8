"""What runs a network for inference, decided in one place: device, backend, precision, threads.

Every caller that needs a device (the server, training, the evaluate CLI, library tagging) asks
:func:`resolve_device`; every served network runs behind the small :class:`Runtime` protocol,
built by :func:`create_runtime`, so a new backend is one new class and one line there. The
networks the decode threads call (the face detector, the animal check) are built for several
threads at once (:class:`ThreadedOpenVINO`); :func:`choose_backend` picks every backend.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.architectures import TaggerNet

log = logging.getLogger("phototag.runtime")
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting whose value cannot work on this machine; the message says which and why."""


def resolve_device(setting: str, rank: int | None = None, name: str = "device") -> torch.device:
    """``auto`` -> the GPU when CUDA works, else the CPU; ``cpu``, ``cuda`` or ``cuda:N``, which
    must exist. ``rank`` (a torchrun process's local rank) picks the GPU of an index-less
    ``auto``/``cuda``. ``name`` is the setting's name in error messages."""
    given = setting
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(setting)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{name}={given}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name}={given} but CUDA is not available here")
        if device.index is None and rank is not None:
            device = torch.device("cuda", rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"{name}={given} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Without it, bf16 is
    emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay with float32
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_autocast(setting: str, device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype for inference, or None for full float32.

    CUDA: ``auto`` is bf16 where the GPU has it, else fp16. CPU: ``auto`` is float32, which keeps
    probabilities equal to the training-time ones; ``bf16`` is bf16 on a CPU with native bf16,
    float32 elsewhere; ``fp16`` means float32 (no fast fp16 on CPUs)."""
    if setting == "off":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if setting == "bf16" and cpu_has_native_bf16() else None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(setting: str, device: torch.device, name: str = "backend") -> Backend:
    """``auto`` -> ``openvino`` on a CPU where it is installed, else ``torch``; ``openvino`` must
    be installed and runs on the CPU only. ``name`` is the setting's name in error messages."""
    if setting not in ("auto", "torch", "openvino"):
        raise ConfigError(f"{name}={setting}: use auto, torch or openvino")
    if setting == "torch" or (setting == "auto" and device.type != "cpu"):
        return "torch"
    if not openvino_installed():
        if setting == "auto":
            return "torch"
        raise ConfigError(f"{name}=openvino but OpenVINO is not installed: pip install openvino")
    if device.type != "cpu":
        raise ConfigError(
            f"{name}=openvino runs on the CPU, but the device is {device}: "
            "use the cpu device or the torch backend"
        )
    return "openvino"


Backend = Literal["torch", "openvino"]


@dataclass(frozen=True)
class RuntimeChoice:
    """What runs every network of this process, resolved once from the settings."""

    device: torch.device
    backend: Backend
    fallback: bool  # the backend was ``auto``: a network OpenVINO cannot convert runs on torch
    amp_dtype: torch.dtype | None
    torch_threads: int | None  # torch's intra-op threads; None: torch's own choice
    openvino_threads: int

    @classmethod
    def resolve(
        cls,
        device: str = "auto",
        backend: str = "auto",
        autocast: str = "auto",
        threads: int = 0,
        names: Mapping[str, str] | None = None,
    ) -> RuntimeChoice:
        """``names`` maps each argument to the setting's name in error messages (e.g.
        ``PHOTOTAG_DEVICE``). ``threads`` 0: OpenVINO takes all cores (its threads sleep while
        they wait, so busy decoders keep their share); torch on a CPU a quarter of them, at
        least one (its OpenMP threads spin-wait in barriers beside busy decoders and slow
        everything down); on a GPU torch's choice."""
        names = {k: k for k in ("device", "backend", "autocast", "threads")} | dict(names or {})
        if autocast not in ("auto", "off", "fp16", "bf16"):
            raise ConfigError(f"{names['autocast']}={autocast}: use auto, off, fp16 or bf16")
        if threads < 0:
            raise ConfigError(f"{names['threads']}={threads}: use 0 (automatic) or more")
        resolved = resolve_device(device, name=names["device"])
        cores = len(os.sched_getaffinity(0))
        torch_threads = threads or (max(1, cores // 4) if resolved.type == "cpu" else None)
        return cls(
            device=resolved,
            backend=resolve_backend(backend, resolved, names["backend"]),
            fallback=backend == "auto",
            amp_dtype=resolve_autocast(autocast, resolved),
            torch_threads=torch_threads,
            openvino_threads=threads or cores,
        )


class Outputs(NamedTuple):
    logits: torch.Tensor  # (B, num_classes) float32
    features: torch.Tensor  # (B, F) float32: the pooled features the head reads
    mid: torch.Tensor  # (B, M) float32: mid-level features (TaggerNet.outputs); (B, 0): none


class Runtime(Protocol):
    """A network ready for inference on one backend. Not thread-safe: one caller at a time (the
    server's inference thread)."""

    backend: Backend
    device: torch.device
    precision: str  # float32, bfloat16 or float16: what the network computes in

    def run(self, batch: torch.Tensor) -> Outputs:
        """Normalised float32 (B, 3, crop, crop) on :attr:`device` -> logits, pooled and
        mid-level features (:meth:`model.architectures.TaggerNet.outputs`)."""
        ...


class TorchRuntime:
    """The network in torch: BatchNorm folded into the convolutions, channels-last (cuDNN's and
    oneDNN's fast layout), autocast to ``amp_dtype`` where set."""

    backend: Backend = "torch"

    def __init__(self, net: TaggerNet, choice: RuntimeChoice) -> None:
        self.device = choice.device
        self.amp_dtype = choice.amp_dtype
        self.precision = str(self.amp_dtype or torch.float32).removeprefix("torch.")
        self.net = fold_batchnorm(net).to(self.device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> Outputs:
        batch = batch.contiguous(memory_format=torch.channels_last)
        dtype = self.amp_dtype or torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=bool(self.amp_dtype)):
            logits, features, mid = self.net.outputs(batch)
        return Outputs(logits.float(), features.float(), mid.float())


class _AllOutputs(nn.Module):
    """One graph with every output of :meth:`TaggerNet.outputs`, for converters that trace
    ``forward`` (the mid-level features only where the network has them: no empty outputs)."""

    def __init__(self, net: TaggerNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.net.outputs(x)
        return outputs if self.net.has_mid_level else outputs[:2]


class OpenVINORuntime:
    """The network converted by OpenVINO and compiled for this CPU, for any batch size.

    OpenVINO fuses the depthwise convolutions and activations that torch runs one by one, with
    logits equal to torch's within float rounding in f32 (bench/README.md has the figures);
    ``bf16`` precision is faster again on CPUs with native bf16, and moves probabilities."""

    backend: Backend = "openvino"

    def __init__(self, net: TaggerNet, crop: int, choice: RuntimeChoice) -> None:
        import openvino

        self.device = torch.device("cpu")
        ov_precision = openvino_precision(choice)
        self.precision = "bfloat16" if ov_precision == "bf16" else "float32"
        example = torch.zeros(1, 3, crop, crop)
        model = convert_for_openvino(
            _AllOutputs(fold_batchnorm(net).cpu()), example, [-1, 3, crop, crop]
        )
        compiled = openvino.Core().compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": choice.openvino_threads,
                "INFERENCE_PRECISION_HINT": ov_precision,
                "PERFORMANCE_HINT": "LATENCY",
                # threads pinned to cores would keep the decode threads off those cores
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._request = compiled.create_infer_request()
        self._has_mid = net.has_mid_level

    def run(self, batch: torch.Tensor) -> Outputs:
        pixels = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        result = self._request.infer({0: pixels})
        # the request reuses its output buffers: copy them out
        logits, features = (torch.from_numpy(result[i].copy()) for i in (0, 1))
        mid = (
            torch.from_numpy(result[2].copy())
            if self._has_mid
            else features.new_zeros(len(features), 0)
        )
        return Outputs(logits, features, mid)


def convert_for_openvino(module: nn.Module, example: torch.Tensor, shape: list[int]):
    """``module`` (eval mode, on the CPU) traced on ``example`` and converted to an OpenVINO
    model whose input has ``shape`` (-1: any size on that axis)."""
    import openvino

    with warnings.catch_warnings():
        # TorchScript tracing: deprecated upstream but what OpenVINO's converter uses, and
        # shape arithmetic (TF "SAME" padding) that is constant for a fixed input size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return openvino.convert_model(
            module, example_input=example, input=[openvino.PartialShape(shape)]
        )


class ThreadedOpenVINO:
    """An OpenVINO model compiled for calls from several threads at once (the decode threads):
    one stream per core with one thread each, each photo on one core as each photo is decoded on
    one core, and one infer request per calling thread. In bfloat16 where the CPU computes it
    natively (``precision="auto"``), float32 elsewhere (emulated bf16 is slower)."""

    def __init__(self, model, choice: RuntimeChoice, precision: str = "auto") -> None:
        import openvino

        if precision == "auto":
            precision = "bf16" if cpu_has_native_bf16() else "f32"
        self.precision = precision
        self._compiled = openvino.Core().compile_model(
            model,
            "CPU",
            {
                "NUM_STREAMS": choice.openvino_threads,
                "INFERENCE_NUM_THREADS": choice.openvino_threads,
                "INFERENCE_PRECISION_HINT": precision,
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._outputs = len(self._compiled.outputs)
        self._local = threading.local()

    def infer(self, inputs: np.ndarray) -> list[torch.Tensor]:
        """One input array -> the model's outputs, copied out of the request's buffers (which
        the request reuses)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({0: inputs})
        return [torch.from_numpy(result[i].copy()) for i in range(self._outputs)]


def choose_backend(
    choice: RuntimeChoice,
    openvino: Callable[[], T],
    torch_: Callable[[], T],
    what: str,
) -> T:
    """The one place a backend is chosen: ``openvino()`` where ``choice`` is OpenVINO,
    ``torch_()`` otherwise. Raises :class:`RuntimeUnavailable` when OpenVINO was asked for by
    name and cannot compile ``what``; with ``auto`` torch runs it instead (logged)."""
    if choice.backend == "openvino":
        try:
            return openvino()
        except Exception as exc:  # converters fail in many ways; torch still runs it
            reason = f"{type(exc).__name__}: {str(exc)[:500]}"
            if not choice.fallback:
                raise RuntimeUnavailable(
                    f"OpenVINO could not compile {what} ({reason}); serve it with the torch backend"
                ) from exc
            log.warning("OpenVINO could not compile %s (%s); torch runs it", what, reason)
    return torch_()


def create_runtime(net: TaggerNet, crop: int, choice: RuntimeChoice) -> Runtime:
    """The classifier's runtime on the chosen backend (:func:`choose_backend`). ``net`` is in
    eval mode; ``crop`` is its input size."""
    if choice.torch_threads:
        torch.set_num_threads(choice.torch_threads)  # process-wide; normalize() runs in torch too
    return choose_backend(
        choice,
        lambda: OpenVINORuntime(net, crop, choice),
        lambda: TorchRuntime(net, choice),
        "the classifier",
    )


def openvino_precision(choice: RuntimeChoice) -> str:
    """The classifier's OpenVINO inference precision: bf16 where ``PHOTOTAG_AUTOCAST`` asks for
    it, f32 otherwise (probabilities exactly as measured)."""
    return "bf16" if choice.amp_dtype == torch.bfloat16 else "f32"


class RuntimeUnavailable(RuntimeError):
    """The chosen backend cannot run this network; the message says what to do."""


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with every BatchNorm2d that directly follows a Conv2d inside a
    ``Sequential`` folded into that convolution's weights and bias (the BatchNorm becomes an
    Identity). In eval mode a BatchNorm is a fixed per-channel affine map, so the outputs are
    the same up to float rounding, and one memory pass per folded layer is saved: on a CPU,
    where these small networks are memory-bound, that is a large share of the time."""
    folded = copy.deepcopy(net).eval()
    _fold_in_place(folded)
    return folded


def _fold_in_place(module: nn.Module) -> None:
    for child in module.children():
        if isinstance(child, nn.Sequential):
            for i in range(len(child) - 1):
                conv, norm = child[i], child[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    child[i] = fuse_conv_bn_eval(conv, norm)
                    child[i + 1] = nn.Identity()
        _fold_in_place(child)
