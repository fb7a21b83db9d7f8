"""TrainConfig: everything that defines a run, checked when it is built."""

from __future__ import annotations

import re
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from model import architectures
from model.data import Augment
from model.preprocess import Preprocess
from model.runtime import ConfigError
from model.tta import TTA

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored as JSON in the checkpoint's card (``training``)."""

    data: str = ""  # photo folder (class sub-folders, optional train/val/test) or .csv/.jsonl
    out: str = "runs/latest"  # run folder: checkpoints, resumable state, evaluations, plots
    arch: str = "efficientnet_lite0"  # architecture name, see model.architectures.available()
    arch_args: dict[str, Any] = field(default_factory=dict)  # builder kwargs, e.g. seed_cnn widths
    pretrained: bool = False  # start from the arch's registered weights (efficientnet_lite0)
    weights: str | None = None  # registered weights name, or a local file (torchvision .pth, ...)
    name: str = ""  # model name in the card; default: the run folder's name
    task: Literal["single_label", "multi_label"] | None = None  # forced task; default: inferred
    epochs: int = 6  # passes over the training split (fine-tuning needs few; early stop may cut)
    batch_size: int = 32  # photos per optimizer step, over all processes together
    optimizer: Literal["adamw", "sgd"] = "adamw"  # adamw | sgd (nesterov)
    lr: float = 1e-3  # peak learning rate of the head (of everything, from scratch)
    backbone_lr_scale: float = 0.1  # backbone LR = lr x this, when starting from pretrained weights
    freeze_epochs: int = 2  # pretrained: first epochs train the head only, backbone frozen
    weight_decay: float = 0.05  # AdamW decoupled / SGD L2; never on biases and norm layers
    momentum: float = 0.9  # SGD momentum (nesterov)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0  # linear warmup, in epochs (fractions allowed)
    label_smoothing: float = 0.1  # cross-entropy target smoothing (0 = off)
    ema_decay: float = 0.0  # exponential moving average of weights per step; 0 = off
    lookahead_every: int = 0  # every N steps pull the weights back to their slow average; 0 = off
    lookahead_decay: float = 0.95  # lookahead's per-step decay, scaled by progress cubed (airbench)
    norm_lr_scale: float = 1.0  # LR multiplier of the batch-norm parameters (airbench: 64)
    whiten_bias_epochs: int = 0  # seed_cnn whiten: its bias trains this many epochs; 0 = always
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    balance: Literal["none", "loss", "sampler"] = "none"  # none | loss (weighted) | sampler
    resize: int = 0  # shorter side before the crop (px), the cache's size; 0: 256, seed_cnn: crop
    crop: int = 0  # square network input (px); 0: 224, seed_cnn: its input_size (32)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"  # resize filter
    augment: Augment = field(default_factory=Augment)  # training augmentation
    tta_flip: bool = False  # also measure the final model with flip test-time averaging
    tta_shift: bool = False  # with --tta-flip: also average views shifted by 1 px (6 in all)
    serve_tta: bool = False  # the card asks the server to apply these TTA views (its val numbers)
    tag_precision: float = 0.95  # tags with paths (a/b/c): thresholds fitted to this precision
    val_fraction: float = 0.2  # of each class held out for validation when there is no val split
    patience: int = 5  # early stopping: epochs without a better validation score; 0 = never
    seed: int = 0  # seeds the split, the initialisation, the sampling and the augmentation
    cache: bool = True  # decode every photo once at the working size and keep it in memory
    workers: int = 2  # data-loading processes (0 = in the main process)
    threads: int = 0  # torch CPU threads (0 = torch's default, one per core)
    amp: bool = True  # mixed precision (float16) and channels-last, on CUDA
    cpu_amp: bool = False  # bfloat16 mixed precision and channels-last on the CPU (AVX-512 BF16)
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_ranges()
        self._check_weights()
        self._default_sizes()

    def _check_choices(self) -> None:
        for name, hint in typing.get_type_hints(type(self)).items():
            allowed = _choices(hint)
            if allowed is not None and getattr(self, name) not in allowed:
                names = ", ".join(str(c) for c in allowed if c is not None)
                _fail(name, f"must be one of {names}, got {getattr(self, name)!r}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            _fail("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.arch not in architectures.available():
            names = ", ".join(architectures.available())
            _fail("arch", f"unknown {self.arch!r}; available: {names}")

    def _check_ranges(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                _fail(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "freeze_epochs", "weight_decay", "warmup_epochs", "grad_clip",
                     "patience", "workers", "threads", "resize", "crop", "lookahead_every",
                     "norm_lr_scale", "whiten_bias_epochs"):  # fmt: skip
            if getattr(self, name) < 0:
                _fail(name, f"must not be negative, got {getattr(self, name)}")
        for name in ("label_smoothing", "ema_decay", "val_fraction", "lookahead_decay"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.tag_precision <= 1:
            _fail("tag_precision", f"must be in (0, 1], got {self.tag_precision}")
        try:
            TTA(flip=self.tta_flip, shift=self.tta_shift)  # TTA holds which views go together
        except ValueError as exc:
            _fail("tta_shift", str(exc))
        if self.serve_tta and not self.tta_flip:
            _fail("serve_tta", "serves the --tta-flip views; give --tta-flip (and --tta-shift)")
        if self.augment.alternate_flip and not (self.augment.hflip and self.augment.batchable):
            _fail(
                "alternate_flip",
                "needs --hflip and the batched augmentation (no random-resized-crop, color "
                "jitter, trivial-augment or random erasing)",
            )

    def _check_weights(self) -> None:
        """One source of starting weights: ``--pretrained`` or ``--weights`` (an arch-arg
        ``weights`` is the same as ``--weights``)."""
        if "weights" in self.arch_args:
            self.arch_args = dict(self.arch_args)
            source = self.arch_args.pop("weights")
            if self.weights not in (None, source):
                _fail("weights", "given twice (--weights and arch_args) with different values")
            self.weights = source
        if self.pretrained and self.weights is not None:
            _fail("weights", "--pretrained and --weights are two starting points; pick one")
        if self.pretrained:
            try:
                architectures.pretrained_weights(self.arch)
            except architectures.WeightsError as exc:
                _fail("pretrained", str(exc))
        elif self.weights in architectures.available_weights():
            fits = architectures.get_weights(self.weights).arch
            if fits != self.arch:
                _fail("weights", f"{self.weights} are for {fits}, not {self.arch}")

    def _default_sizes(self) -> None:
        small = self.arch == "seed_cnn" and not self.crop  # a small from-scratch net: small input
        if not self.crop:
            self.crop = int(self.arch_args.get("input_size", 32)) if small else 224
        if not self.resize:
            self.resize = self.crop if small else 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["augment"] = Augment(**values.get("augment", {}))
        return cls(**values)

    @property
    def fine_tuning(self) -> bool:
        return self.pretrained or self.weights is not None

    @property
    def weights_source(self) -> str | None:
        """What the backbone starts from: a registered weights name, a file, or None."""
        if self.pretrained:
            return architectures.pretrained_weights(self.arch).name
        return self.weights

    @property
    def tta(self) -> TTA:
        """The run's TTA views (measured at the end; served with ``serve_tta``)."""
        return TTA(flip=self.tta_flip, shift=self.tta_shift)

    @property
    def served_tta(self) -> TTA:
        return self.tta if self.serve_tta else TTA()

    def preprocess(self) -> Preprocess:
        return Preprocess(self.resize, self.crop, interpolation=self.interpolation)


def _choices(hint: object) -> tuple[object, ...] | None:
    """The values a ``Literal`` field allows (None too for an optional one); None otherwise."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    literals = [arg for arg in typing.get_args(hint) if typing.get_origin(arg) is Literal]
    return (*typing.get_args(literals[0]), None) if literals else None


def _fail(name: str, problem: str) -> typing.NoReturn:
    raise ConfigError(f"--{name.replace('_', '-')}: {problem}")
