"""Convert libfacedetection's YuNet weights (C float arrays) into the file phototag ships.

    python tools/convert_yunet_weights.py [path/to/facedetectcnn-data.cpp]

Reads every ``float NAME[d0*d1*...] = {...};`` array of the library's
``src/facedetectcnn-data.cpp`` (default: ``../shared/third_party/libfacedetection/`` beside the
repository), checks it against the file's own layer table (``param_pConvInfo``), and writes
``model/weights/yunet.safetensors`` atomically, with the library's licence beside it
(``LICENSE-libfacedetection``). Array ``a__b__c_pw_weight`` becomes key ``a.b.c.pw.weight``
(``__`` separates modules, and in the last part ``_`` does), the key of
:class:`model.people.yunet.YuNet`'s state dict. The same .cpp always gives the same bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import atomic_write_bytes  # noqa: E402
from model.people.yunet import YuNet  # noqa: E402

DEFAULT_CPP = REPO.parent / "shared" / "third_party" / "libfacedetection" / "facedetectcnn-data.cpp"
DEFAULT_OUT = REPO / "model" / "weights" / "yunet.safetensors"
LICENSE_NAME = "LICENSE-libfacedetection"
SOURCE = (
    "github.com/ShiqiYu/libfacedetection, src/facedetectcnn-data.cpp, "
    "commit acf7b254121927e7dced30e233a2e03119f28ea2"
)
STEM = "backbone.model0.pw.weight"  # the one 3x3 convolution over the photo's 3 channels

_ARRAY = re.compile(r"float\s+(\w+)\s*\[([\d*\s]+)\]\s*=\s*\{([^}]*)\};")
_CONV_INFO = re.compile(
    r"\{\s*(\d+)\s*,\s*(\d+)\s*,\s*(true|false)\s*,\s*(true|false)\s*,\s*(true|false)\s*,"
    r"\s*(\w+)\s*,\s*(\w+)\s*\}"
)


def read_arrays(text: str) -> dict[str, np.ndarray]:
    """Every float array of the .cpp, shaped as its declared size ``d0*d1*...`` says."""
    arrays: dict[str, np.ndarray] = {}
    for name, dims, body in _ARRAY.findall(text):
        shape = tuple(int(d) for d in dims.split("*"))
        values = np.array(
            [float(v.strip().rstrip("fF")) for v in body.split(",") if v.strip()], np.float32
        )
        if values.size != np.prod(shape):
            raise ValueError(f"{name}: {values.size} values for a size of {dims}")
        if name in arrays:
            raise ValueError(f"{name} is defined twice")
        arrays[name] = values.reshape(shape)
    return arrays


def read_conv_info(text: str) -> list[tuple[int, int, bool, str, str]]:
    """The layer table: (in, out, is_depthwise, weight array, bias array) per layer."""
    table = text[text.index("param_pConvInfo") :]
    return [
        (int(cin), int(cout), dw == "true", weight, bias)
        for cin, cout, dw, _pw, _bn, weight, bias in _CONV_INFO.findall(table)
    ]


def key_for(name: str) -> str:
    """``bbox_head__multi_level_cls__0_pw_weight`` -> ``bbox_head.multi_level_cls.0.pw.weight``."""
    *modules, last = name.split("__")
    return ".".join([*modules, *last.split("_")])


def to_tensor(key: str, array: np.ndarray, depthwise: bool) -> torch.Tensor:
    """One array as the tensor PyTorch's layer holds: (out, in, kh, kw) weights, (out,) biases.

    The library's layouts (its ``Filters`` and ``setDataFrom3x3S2P1to1x1S1P0FromImage``):
    a 1x1 weight is (out, in), as PyTorch's; a depthwise 3x3 weight, declared ``C*1*3*3``, is
    stored tap-major, (ky, kx, C); the stem's 3x3 convolution over the photo's 3 channels is
    run as a 1x1 one over each window's 27 values laid out (ky, kx, c), padded with zeros to 32.
    """
    if key == STEM:
        flat = array.reshape(array.shape[0], -1)
        if np.any(flat[:, 27:]):
            raise ValueError(f"{key}: the stem's padding channels 27..31 are not zero")
        # (out, ky, kx, c) -> (out, c, ky, kx)
        array = flat[:, :27].reshape(-1, 3, 3, 3).transpose(0, 3, 1, 2)
    elif depthwise and key.endswith(".weight"):
        channels = array.shape[0]
        array = array.reshape(3, 3, channels).transpose(2, 0, 1)[:, None]  # (C, 1, ky, kx)
    return torch.from_numpy(np.ascontiguousarray(array))


def check_table(arrays: dict[str, np.ndarray], table: list[tuple[int, int, bool, str, str]]):
    """Every array is in the layer table exactly once, with the channels the table says."""
    named = [name for *_, weight, bias in table for name in (weight, bias)]
    if sorted(named) != sorted(arrays):
        raise ValueError("the layer table and the arrays do not name the same arrays once each")
    for cin, cout, depthwise, weight, bias in table:
        shape = arrays[weight].shape
        expected = (cout, 1, 3, 3) if depthwise else (cout, cin, 1, 1)
        if shape != expected or arrays[bias].shape != (cout,):
            raise ValueError(f"{weight}: shape {shape}, the layer table says {expected}")


def convert_text(text: str) -> dict[str, torch.Tensor]:
    """The .cpp's text -> the state dict of :class:`YuNet`, checked to fit it exactly."""
    arrays = read_arrays(text)
    table = read_conv_info(text)
    check_table(arrays, table)
    depthwise = {name for _, _, dw, *names in table if dw for name in names}
    tensors = {
        key_for(name): to_tensor(key_for(name), array, name in depthwise)
        for name, array in arrays.items()
    }
    if len(tensors) != len(arrays):
        raise ValueError("two arrays map to the same key")
    YuNet().load_state_dict(tensors, strict=True)  # refuse arrays that do not fit the network
    return tensors


def convert(cpp: Path = DEFAULT_CPP, out: Path = DEFAULT_OUT) -> Path:
    tensors = convert_text(cpp.read_text())
    metadata = {"source": SOURCE, "license": f"3-clause BSD (see {LICENSE_NAME})"}
    path = atomic_write_bytes(out, save(dict(sorted(tensors.items())), metadata=metadata))
    notice = (cpp.parent / "LICENSE").read_text()
    header = f"YuNet weights in yunet.safetensors converted from {SOURCE}. The licence:\n\n"
    atomic_write_bytes(out.parent / LICENSE_NAME, (header + notice).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "cpp", type=Path, nargs="?", default=DEFAULT_CPP, help="default: %(default)s"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="file to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    path = convert(args.cpp, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes) and {path.parent / LICENSE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
