"""Convert dlib's face recognition network (its own binary serialization) into the file phototag
ships.

    pip install face-recognition-models   # dlib's models, CC0; not a dependency
    python tools/convert_dlib_face_weights.py [path/to/dlib_face_recognition_resnet_model_v1.dat]

Reads the whole ``.dat`` (default: the one in the installed ``face_recognition_models``
package), checks its layers one by one against :class:`model.people.embedding.FaceEmbedder`
(kinds, filter counts, kernel sizes, strides, paddings, the tags and skips of the residual
sums), folds each affine layer into the convolution before it, and writes
``model/weights/dlib_face_recognition.safetensors`` atomically, with the licence beside it
(``LICENSE-dlib-models``). The same ``.dat`` always gives the same bytes.

dlib's serialization, as its ``dlib/serialize.h``, ``dlib/dnn/core.h``, ``tensor.h``,
``layers.h``, ``input.h`` and ``loss.h`` write it: an integer is one byte holding its length
in bytes (low nibble) and sign (0x80), then that many bytes little-endian; a string is its
length then its bytes; a float or double is two integers, mantissa and base-2 exponent; a bool
is the character '0' or '1'; a tensor is version 2, its four dimensions, then float32
little-endian values. A network is written outermost layer first, each layer writing its
version, then its subnetwork, then its own details, so the details come out input first:
``add_layer`` (version 2; 3 over the input layer) writes details, three bools and three (empty)
tensors (then the sample expansion factor over the input); ``add_tag_layer`` and
``add_skip_layer`` (version 1) write nothing but their subnetwork, so which one is which, and
their ids, come from the network's definition, not from the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import atomic_write_bytes  # noqa: E402
from model.people.embedding import (  # noqa: E402
    BLOCKS,
    CHIP_SIZE,
    DESCRIPTOR_DIM,
    FaceEmbedder,
)

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
DEFAULT_OUT = REPO / "model" / "weights" / "dlib_face_recognition.safetensors"
LICENSE_NAME = "LICENSE-dlib-models"
PACKAGE = "face_recognition_models"

CONV_MODE = 0  # dlib's layer_mode for an affine layer after a convolution (per channel)
FC_NO_BIAS = 1  # dlib's fc_bias_mode


def default_dat() -> Path:
    """The .dat in the installed package, found without importing it (its ``__init__`` needs
    ``pkg_resources``, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install face-recognition-models")
    return Path(spec.origin).parent / "models" / DAT_NAME


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("face_recognition_models")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# dlib's serialization
# --------------------------------------------------------------------------------------------


class Reader:
    """dlib's primitives, read from bytes in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"the file ends before byte {self.pos + n}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        head = self.take(1)[0]
        if head & 0x70 or (head & 0x0F) > 8:
            raise ValueError(f"byte {self.pos - 1}: {head:#04x} does not start an integer")
        value = int.from_bytes(self.take(head & 0x0F), "little")
        return -value if head & 0x80 else value

    def str(self) -> str:
        return self.take(self.int()).decode("ascii")

    def float(self) -> float:
        mantissa = self.int()
        return float(np.ldexp(float(mantissa), self.int()))

    def bool(self) -> bool:
        char = self.take(1)
        if char not in (b"0", b"1"):
            raise ValueError(f"byte {self.pos - 1}: {char!r} is no bool")
        return char == b"1"

    def tensor(self) -> np.ndarray:
        self.expect(self.int(), 2, "tensor version")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), "<f4").reshape(shape).copy()

    def alias(self) -> tuple[int, ...]:
        """An alias_tensor: where a layer's parameters lie in its one params tensor."""
        self.expect(self.int(), 1, "alias_tensor version")
        return tuple(self.int() for _ in range(4))

    def expect(self, got, wanted, what: str) -> None:
        if got != wanted:
            raise ValueError(f"byte {self.pos}: {what} is {got!r}, expected {wanted!r}")


class Layer(NamedTuple):
    """One layer of the file: its kind (dlib's version string, or "tag" for a tag or skip
    layer), its integer settings and its parameters."""

    kind: str
    settings: dict[str, int]
    params: dict[str, np.ndarray]


def read_details(r: Reader) -> Layer:
    kind = r.str()
    layer = Layer(kind, {}, {})
    s = layer.settings
    if kind == "con_4":
        params = r.tensor().reshape(-1)
        for name in ("filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            s[name] = r.int()
        filters, biases = r.alias(), r.alias()  # (out, in, kh, kw), (1, out, 1, 1)
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        n = int(np.prod(filters))
        if params.size != n + int(np.prod(biases)):
            raise ValueError(f"con_4: {params.size} parameters for filters {filters}")
        layer.params.update(weight=params[:n].reshape(filters), bias=params[n:])
    elif kind == "affine_":
        params = r.tensor().reshape(-1)
        gamma, beta = r.alias(), r.alias()
        s["mode"] = r.int()
        n = int(np.prod(gamma))
        if params.size != n + int(np.prod(beta)):
            raise ValueError(f"affine_: {params.size} parameters for gamma {gamma}")
        layer.params.update(gamma=params[:n], beta=params[n:])
    elif kind in ("max_pool_2", "avg_pool_2"):
        for name in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            s[name] = r.int()
    elif kind == "fc_2":
        s["outputs"], s["inputs"] = r.int(), r.int()
        params = r.tensor()
        weights, _biases = r.alias(), r.alias()
        s["bias_mode"] = r.int()
        for _ in range(4):
            r.float()
        # dlib computes output = input (B, in) @ weights (in, out)
        layer.params["weight"] = params.reshape(-1)[: int(np.prod(weights))].reshape(weights[:2])
    elif kind not in ("relu_", "add_prev_"):
        raise ValueError(f"a layer of kind {kind!r}, which this network does not have")
    return layer


def read_network(r: Reader, layers: list[Layer]) -> None:
    """One layer and, first, everything under it, appended to ``layers`` input first."""
    version = r.int()
    if version == 1:  # add_tag_layer or add_skip_layer
        read_network(r, layers)
        layers.append(Layer("tag", {}, {}))
    elif version == 2:  # add_layer over another layer
        read_network(r, layers)
        layers.append(read_details(r))
        for _ in range(3):
            r.bool()
        for _ in range(3):
            r.tensor()
    elif version == 3:  # add_layer over the input layer
        kind = r.str()
        means = [r.float() for _ in range(3)]
        rows, cols = r.int(), r.int()
        layers.append(Layer(kind, {"rows": rows, "cols": cols}, {"mean": np.float32(means)}))
        layers.append(read_details(r))
        for _ in range(3):
            r.bool()
        for _ in range(3):
            r.tensor()
        r.int()  # sample expansion factor
    else:
        raise ValueError(f"byte {r.pos}: layer version {version}")


def read_dat(data: bytes) -> tuple[dict[str, float], list[Layer]]:
    """The loss layer's settings and every layer under it, input first; the whole file read."""
    r = Reader(data)
    r.expect(r.int(), 1, "add_loss_layer version")
    r.expect(r.str(), "loss_metric_2", "loss")
    loss = {"margin": r.float(), "distance_threshold": r.float()}
    layers: list[Layer] = []
    read_network(r, layers)
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} bytes left after the network")
    return loss, layers


# --------------------------------------------------------------------------------------------
# The layers -> FaceEmbedder's state dict
# --------------------------------------------------------------------------------------------


def conv(filters: int, size: int, stride: int) -> tuple[str, dict[str, int]]:
    padding = size // 2 if stride == 1 else 0  # dlib's default padding
    return "con_4", {"filters": filters, "nr": size, "nc": size, "stride_y": stride,
                     "stride_x": stride, "padding_y": padding, "padding_x": padding}  # fmt: skip


def pool(kind: str, size: int, stride: int) -> tuple[str, dict[str, int]]:
    return kind, {"nr": size, "nc": size, "stride_y": stride, "stride_x": stride,
                  "padding_y": 0, "padding_x": 0}  # fmt: skip


def expected_layers() -> list[tuple[str, dict[str, int]]]:
    """What dlib's anet_type is, input first, as (kind, settings); tags and skips as "tag"."""
    layers = [("input_rgb_image_sized", {"rows": CHIP_SIZE, "cols": CHIP_SIZE})]
    layers += [conv(32, 7, 2), ("affine_", {"mode": CONV_MODE}), ("relu_", {})]
    layers.append(pool("max_pool_2", 3, 2))
    for _, out_channels, stride in BLOCKS:
        layers.append(("tag", {}))  # tag1: the block's input
        layers += [conv(out_channels, 3, stride), ("affine_", {"mode": CONV_MODE}), ("relu_", {})]
        layers += [conv(out_channels, 3, 1), ("affine_", {"mode": CONV_MODE})]
        if stride == 2:  # tag2 on the block's output, skip1 back to its input, pooled
            layers += [("tag", {}), ("tag", {}), pool("avg_pool_2", 2, 2)]
        layers += [("add_prev_", {}), ("relu_", {})]
    layers.append(pool("avg_pool_2", 0, 1))  # avg_pool_everything
    layers.append(("fc_2", {"outputs": DESCRIPTOR_DIM, "inputs": 256, "bias_mode": FC_NO_BIAS}))
    return layers


def check_layers(layers: list[Layer]) -> None:
    """The file's layers are the network's, one for one."""
    expected = expected_layers()
    if len(layers) != len(expected):
        raise ValueError(f"the file has {len(layers)} layers, the network {len(expected)}")
    for i, (layer, (kind, settings)) in enumerate(zip(layers, expected, strict=True)):
        if layer.kind != kind or layer.settings != settings:
            found = f"{layer.kind} {layer.settings}"
            raise ValueError(f"layer {i}: {found}, expected {kind} {settings}")


def fold(con: Layer, affine: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then affine (gamma * x + beta per channel) as one convolution."""
    gamma, beta = affine.params["gamma"], affine.params["beta"]
    weight = con.params["weight"].astype(np.float64) * gamma.reshape(-1, 1, 1, 1)
    bias = con.params["bias"].astype(np.float64) * gamma + beta
    return torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))


def convert_dat(data: bytes) -> dict[str, torch.Tensor]:
    """The .dat's bytes -> the state dict of :class:`FaceEmbedder`, checked to fit it exactly."""
    _, layers = read_dat(data)
    check_layers(layers)
    convs = [i for i, layer in enumerate(layers) if layer.kind == "con_4"]
    names = ["stem"] + [f"blocks.{b}.conv{j}" for b in range(len(BLOCKS)) for j in (1, 2)]
    tensors = {"pixel_mean": torch.from_numpy(layers[0].params["mean"])}
    for name, i in zip(names, convs, strict=True):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = fold(layers[i], layers[i + 1])
    tensors["fc.weight"] = torch.from_numpy(np.ascontiguousarray(layers[-1].params["weight"].T))
    FaceEmbedder().load_state_dict(tensors, strict=True)  # refuse tensors that do not fit
    return tensors


def convert(dat: Path | None = None, out: Path = DEFAULT_OUT) -> Path:
    dat = dat or default_dat()
    tensors = convert_dat(dat.read_bytes())
    # one key: safetensors writes its metadata in no fixed order, and the same .dat must give
    # the same bytes
    metadata = {
        "source": f"{dat.name} from PyPI face-recognition-models {package_version()} "
        f"(dlib-models), CC0 1.0 (see {LICENSE_NAME})"
    }
    path = atomic_write_bytes(out, save(dict(sorted(tensors.items())), metadata=metadata))
    atomic_write_bytes(out.parent / LICENSE_NAME, license_text(dat).encode())
    return path


def license_text(dat: Path) -> str:
    """A header saying what was converted from where, then the package's own licence file."""
    from importlib.metadata import distribution

    notice = distribution(PACKAGE).read_text("licenses/LICENSE") or distribution(PACKAGE).read_text(
        "LICENSE"
    )
    if not notice:
        raise FileNotFoundError(f"{PACKAGE}'s licence file is not installed")
    header = (
        "The weights in dlib_face_recognition.safetensors are converted from\n"
        f"{dat.name}, dlib's face recognition ResNet by Davis King\n"
        "(dlib-models), as shipped in PyPI's face-recognition-models "
        f"{package_version()}.\n"
        "The package's licence file, reproduced below, is CC0 1.0 (its metadata says\n"
        "'MIT license'; the file and dlib-models say public domain, CC0).\n\n"
    )
    return header + notice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dat", type=Path, nargs="?", help=f"default: {DAT_NAME} of {PACKAGE}")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="file to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    path = convert(args.dat, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes) and {path.parent / LICENSE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
