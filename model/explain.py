"""Why this tag: where in the photo a tag's evidence is, from the network's last feature maps.

The method is HiResCAM (Draelos & Carin, 2020), of the Grad-CAM family: for the last spatial
feature map ``A`` (C, h, w) of the network and a tag's score ``s``, the heatmap is
``relu(sum_k dS/dA_k * A_k)``, the element-wise product of the gradient and the activations
summed over the channels. Grad-CAM instead averages each channel's gradient over the positions
first. The two agree exactly on a network whose head reads globally average-pooled features
(EfficientNet-Lite0, ResNet, MobileNet: the gradient is then the same at every position), and
HiResCAM stays faithful where the head reads every position on its own (seed_cnn's flatten and
fully-connected layers), where Grad-CAM's average blurs what the head saw.

The last spatial feature map is found by one rule, for every registered architecture: the last
module of ``features`` to finish with a (B, C, h, w) output of more than one position, i.e. what
the global pooling (or flatten) reads (:func:`feature_layer`).

A tag's score (:class:`Target`) is a function of the temperature-scaled logits and the pooled
features: a vocabulary tag of a single-label model differentiates the log of its rolled-up
probability (the sum of its gathered classes' softmax), one of a multi-label model the logit of
its likeliest class, a raw class its logit, and a custom tag the logit of its logistic head over
the model's :class:`model.custom_tags.Space` (:func:`custom_target`).

Explanations need gradients, which the served runtime may not have (OpenVINO): they run on a
torch copy of the network on the CPU (:class:`Explainer`, built once per tagger when first
asked), thread-safe, so the server can give it its own threads beside the inference thread.
Library tagging writes overlays with :func:`write_overlay`.

A people tag (person, portrait, group) comes from a face detector, not the network: it has no
heatmap, its explanation is the faces themselves, drawn with :func:`faces_overlay`.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from model.architectures import TaggerNet
from model.checkpoint import atomic_write_bytes
from model.custom_tags import CustomHeads, Examples
from model.imageio import full_size
from model.preprocess import Preprocess, crop_box, normalize
from model.runtime import fold_batchnorm
from model.vocabulary import Vocabulary

METHOD = "hirescam"

# (logits (B, C) divided by the temperature, pooled features (B, F), mid-level features (B, M))
# -> (B,)
Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """What to explain: ``score`` is differentiated, ``probability`` is what /v1/tags reports for
    the tag (both from the temperature-scaled logits and the pooled and mid-level features)."""

    label: str
    score: Score
    probability: Score
    path: tuple[str, ...] | None = None


def class_target(classes: list[str], index: int, task: str) -> Target:
    """A raw class: its logit (what its probability is monotonic in)."""

    def probability(logits: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        if task == "multi_label":
            return torch.sigmoid(logits[:, index])
        return torch.softmax(logits, dim=1)[:, index]

    return Target(classes[index], lambda logits, *_: logits[:, index], probability)


def vocabulary_target(vocabulary: Vocabulary, tag: int, task: str) -> Target:
    """A vocabulary tag, through the classes it gathers: single-label, the log of the sum of
    their softmax probabilities (its rolled-up probability; the log keeps the gradient alive
    when the tag is nearly certain); multi-label, the logit of the likeliest of them (its
    rolled-up probability is that class's)."""
    members = vocabulary.gathered[tag]
    label, path = vocabulary.tags[tag].label, vocabulary.tags[tag].path

    if task == "multi_label":

        def best_logit(logits: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
            return logits[:, members].amax(dim=1)

        def likeliest(logits: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(best_logit(logits))

        return Target(label, best_logit, likeliest, path)

    def log_probability(logits: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(torch.log_softmax(logits, dim=1)[:, members], dim=1)

    def probability(logits: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)[:, members].sum(dim=1).clamp(0, 1)

    return Target(label, log_probability, probability, path)


# A custom tag's score reads each class probability's root as sqrt(p + ROOT_EPS): sqrt's slope
# is infinite at 0, and a class whose softmax underflows to exactly 0 (any confident photo) would
# make the gradient inf * 0 = NaN. The shift moves each root by at most 1e-6, the score only.
ROOT_EPS = 1e-12


def class_probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(B, C) temperature-scaled logits -> the class probabilities, as the tagger computes them."""
    return torch.sigmoid(logits) if task == "multi_label" else torch.softmax(logits, dim=1)


def custom_target(heads: CustomHeads, index: int, task: str) -> Target:
    """The custom tag ``heads.names[index]``, through the served ``heads`` (kept whole: a tag
    taught while it explains cannot mismatch them). Its probability is the served path itself
    (:meth:`model.custom_tags.CustomHeads.probabilities` on the class probabilities and the
    pooled features); its score is the head's logit (the probability is its sigmoid), with the
    roots taken at ``p + ROOT_EPS``, so that its gradient is finite everywhere."""
    weight, bias = heads.weight[:, index], heads.bias[index]  # (D,), ()

    def logit(logits: torch.Tensor, features: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        probabilities = class_probabilities(logits, task) + ROOT_EPS  # (B, C)
        return heads.space.inputs(Examples(probabilities, features, mid)) @ weight + bias

    def probability(logits: torch.Tensor, features: torch.Tensor, mid: torch.Tensor):
        examples = Examples(class_probabilities(logits, task), features, mid)
        return heads.probabilities(examples)[:, index]

    return Target(heads.names[index], logit, probability)


@dataclass(frozen=True)
class Heatmap:
    """Where a tag's evidence is, over the crop the network saw: ``grid`` (h, w) float32 in
    [0, 1], 1 at the strongest evidence (all 0 when no position speaks for the tag)."""

    grid: np.ndarray
    tag: str
    probability: float
    path: tuple[str, ...] | None = None


# --------------------------------------------------------------------------------------------
# the feature layer: one rule for every architecture
# --------------------------------------------------------------------------------------------


def feature_layer(net: TaggerNet, size: int) -> str:
    """The name (in ``net``) of the last module of ``net.features`` to finish with a spatial map
    (B, C, h, w), h * w > 1, on a ``size`` x ``size`` input: the feature map the global pooling
    or the flatten reads. Containers count, so a block that ends in a residual sum is taken
    whole. Found by one forward pass on a blank photo."""
    finished: list[str] = []

    def note(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, __: object, output: object) -> None:
            spatial = isinstance(output, torch.Tensor) and output.dim() == 4
            if spatial and output.shape[-1] * output.shape[-2] > 1:
                finished.append(name)

        return hook

    modules = [(f"features.{n}" if n else "features", m) for n, m in net.features.named_modules()]
    handles = [module.register_forward_hook(note(name)) for name, module in modules]
    try:
        with torch.no_grad():
            net.features(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise ValueError(f"{type(net.features).__name__} has no spatial feature map to explain")
    return finished[-1]


# --------------------------------------------------------------------------------------------
# the explainer
# --------------------------------------------------------------------------------------------


class Explainer:
    """A torch copy of a network on the CPU, ready to explain (BatchNorm folded, no parameter
    needs a gradient). Thread-safe: each call keeps its feature map in its own thread's slot.

    Only the layers after the feature map are differentiated: the hook hands the rest of the
    network a fresh leaf in place of the map, so the backbone runs as in inference, and the
    backward pass covers just the pooling and the head."""

    def __init__(self, net: TaggerNet, preprocess: Preprocess, temperature: float) -> None:
        self.net = fold_batchnorm(net).cpu()
        self.net.requires_grad_(False)
        self.preprocess = preprocess
        self.temperature = temperature
        self.layer = feature_layer(self.net, preprocess.crop)
        self._maps = threading.local()
        self.net.get_submodule(self.layer).register_forward_hook(self._keep_map)

    def _keep_map(self, _: nn.Module, __: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_()
        self._maps.leaf = leaf
        return leaf.clone()  # not the leaf itself: a later in-place op may write to its input

    def forward(self, pixels: torch.Tensor) -> Pass:
        """uint8 (3, crop, crop) pixels -> the forward pass an explanation differentiates."""
        batch = normalize(pixels.cpu()[None], self.preprocess)  # (1, 3, crop, crop)
        with torch.enable_grad():
            logits, features, mid = self.net.outputs(batch)  # (1, C), (1, F), (1, M)
        return Pass(self._maps.leaf, logits / self.temperature, features, mid)

    def heatmap(self, forward: Pass, target: Target) -> Heatmap:
        """HiResCAM of ``target`` on ``forward``'s feature map."""
        with torch.enable_grad():
            score = target.score(*forward.outputs).sum()
            (gradient,) = torch.autograd.grad(score, forward.feature_map, retain_graph=True)
        with torch.no_grad():
            cam = (gradient * forward.feature_map).sum(dim=1)[0].clamp_(min=0)  # (h, w)
            top = float(cam.max())
            grid = (cam / top if top > 0 else cam).numpy().astype(np.float32)
            probability = float(target.probability(*forward.outputs)[0])
        return Heatmap(grid, target.label, probability, target.path)

    def explain(self, pixels: torch.Tensor, target: Target) -> Heatmap:
        return self.heatmap(self.forward(pixels), target)


@dataclass(frozen=True)
class Pass:
    feature_map: torch.Tensor  # (1, C, h, w), a leaf that requires grad
    logits: torch.Tensor  # (1, num_classes), temperature-scaled
    features: torch.Tensor  # (1, F), pooled
    mid: torch.Tensor  # (1, M), mid-level (before the map on a photo-sized crop)

    @property
    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a target's score and probability read."""
        return self.logits, self.features, self.mid

    def probabilities(self, task: str) -> torch.Tensor:
        """(num_classes,) as the tagger computes them."""
        return class_probabilities(self.logits.detach(), task)[0]


def explain(explainer: Explainer | TaggerNet, pixels: torch.Tensor, target: Target,
            preprocess: Preprocess | None = None, temperature: float = 1.0) -> Heatmap:  # fmt: skip
    """The heatmap of ``target`` for uint8 (3, crop, crop) ``pixels``: on an :class:`Explainer`,
    or on a bare network (then with its ``preprocess`` and ``temperature``; building the
    explainer costs a forward pass, so keep one to explain many photos)."""
    if not isinstance(explainer, Explainer):
        explainer = Explainer(explainer, preprocess or Preprocess(), temperature)
    return explainer.explain(pixels, target)


# --------------------------------------------------------------------------------------------
# onto the photo
# --------------------------------------------------------------------------------------------


def on_photo(
    heatmap: Heatmap,
    size: tuple[int, int],
    preprocess: Preprocess,
    decoded_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The heatmap over a whole photo of ``size`` (width, height), float32 (height, width) in
    [0, 1]: the grid resized (bilinear) onto the region the network saw, 0 outside it. The
    region is where :func:`model.preprocess.crop_box` puts it on the image as it was decoded
    (``decoded_size``, default ``size``; a JPEG draft is smaller), scaled to ``size``."""
    width, height = size
    fractions = region(decoded_size or size, preprocess)
    left, top, right, bottom = (round(f * s) for f, s in zip(fractions, size * 2, strict=True))
    inside = (max(right - left, 1), max(bottom - top, 1))
    grid = Image.fromarray(heatmap.grid.astype(np.float32), mode="F")
    values = np.asarray(grid.resize(inside, Image.Resampling.BILINEAR), dtype=np.float32)
    full = np.zeros((height, width), dtype=np.float32)
    full[top : top + inside[1], left : left + inside[0]] = values[: height - top, : width - left]
    return np.clip(full, 0.0, 1.0)


def region(size: tuple[int, int], preprocess: Preprocess) -> tuple[float, float, float, float]:
    """The region the network saw, as fractions (left, top, right, bottom) of the photo's width
    and height: where a client draws the grid, whatever size it shows the photo at."""
    width, height = size
    left, top, right, bottom = crop_box(size, preprocess)
    return left / width, top / height, right / width, bottom / height


@functools.cache
def _turbo() -> np.ndarray:
    """matplotlib's "turbo" colour map (blue, cold; red, hot) as a (256, 3) float32 table."""
    from matplotlib import colormaps  # already a dependency (model/plots.py); no pyplot

    return (colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


def shown_size(photo: Image.Image, max_side: int | None = None) -> tuple[int, int]:
    """The size an overlay of ``photo`` is drawn at: the size of the photo sent (a JPEG decoded
    at a draft scale is scaled back up, :func:`model.imageio.full_size`), or scaled down to
    ``max_side`` on its longer side."""
    size = full_size(photo)
    if max_side and max(size) > max_side:
        scale = max_side / max(size)
        size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    return size


def _shown(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    photo = photo.convert("RGB")
    return photo if photo.size == size else photo.resize(size, Image.Resampling.BILINEAR)


def overlay(
    photo: Image.Image,
    heatmap: Heatmap,
    preprocess: Preprocess,
    max_side: int | None = None,
) -> Image.Image:
    """The photo with the heatmap drawn over it: hot colours where the evidence is (more opaque
    the stronger it is), the part the network never saw (outside the crop) darkened; at
    :func:`shown_size`."""
    decoded = photo.size
    size = shown_size(photo, max_side)
    photo = _shown(photo, size)
    values = on_photo(heatmap, size, preprocess, decoded)  # (H, W)
    base = np.asarray(photo, dtype=np.float32)
    fractions = region(decoded, preprocess)
    left, top, right, bottom = (round(f * s) for f, s in zip(fractions, size * 2, strict=True))
    seen = np.zeros(values.shape, dtype=bool)
    seen[top:bottom, left:right] = True
    base = np.where(seen[..., None], base, base * 0.35)
    alpha = (0.15 + 0.55 * values)[..., None] * seen[..., None]  # (H, W, 1)
    colours = _turbo()[np.rint(values * 255).astype(np.uint8)]  # (H, W, 3)
    mixed = base * (1 - alpha) + colours * alpha
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def overlay_png(
    photo: Image.Image, heatmap: Heatmap, preprocess: Preprocess, max_side: int | None = None
) -> bytes:
    """:func:`overlay` encoded as PNG."""
    return png_bytes(overlay(photo, heatmap, preprocess, max_side))


def png_bytes(image: Image.Image) -> bytes:
    """An overlay encoded as PNG, fast rather than small."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # 60 ms, not 300, for 5% more bytes
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# people tags: the faces, not a heatmap
# --------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in some image's pixels


def scale_boxes(boxes: Sequence[Box], source: tuple[int, int], to: tuple[int, int]) -> list[Box]:
    """``boxes`` in the pixels of an image of size ``source`` (width, height) -> in those of the
    same image at size ``to`` (the photo sent, where the decoded one is a JPEG draft; or the
    overlay)."""
    sx, sy = to[0] / source[0], to[1] / source[1]
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]


def faces_overlay(
    photo: Image.Image, boxes: Sequence[Box], max_side: int | None = None
) -> Image.Image:
    """The photo with each face's box drawn on it (``boxes`` in the decoded ``photo``'s pixels),
    at :func:`shown_size`: a light outline inside a dark one, visible on light and dark photos
    alike, its width growing with the photo. No boxes: the photo as it is."""
    size = shown_size(photo, max_side)
    shown = _shown(photo, size).copy()
    draw = ImageDraw.Draw(shown)
    for x0, y0, x1, y1 in scale_boxes(boxes, photo.size, size):
        box = (round(x0), round(y0), round(x1), round(y1))
        # px: 4 on a 512 px photo, 8 on a 1024 px overlay, thinner round a small face, at least 2
        line = max(2, min(round(max(size) / 128), round(min(x1 - x0, y1 - y0) / 14)))
        rim = max(1, line // 2)  # px of dark on either side of the light line
        outer = (box[0] - rim, box[1] - rim, box[2] + rim, box[3] + rim)
        draw.rectangle(outer, outline=(0, 0, 0), width=line + 2 * rim)
        draw.rectangle(box, outline=(255, 214, 0), width=line)  # amber, inside the dark rim
    return shown


def faces_png(photo: Image.Image, boxes: Sequence[Box], max_side: int | None = None) -> bytes:
    """:func:`faces_overlay` encoded as PNG."""
    return png_bytes(faces_overlay(photo, boxes, max_side))


def write_overlay(
    path: str | Path, photo: Image.Image, heatmap: Heatmap, preprocess: Preprocess
) -> Path:
    """Write the overlay PNG of ``heatmap`` on ``photo`` to ``path`` atomically (temp file in
    the same folder, then rename): what ``phototag tag --explain`` leaves beside its results."""
    return atomic_write_bytes(path, overlay_png(photo, heatmap, preprocess))
