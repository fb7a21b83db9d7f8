"""Convert facenet-pytorch's MTCNN weights into the one file phototag ships.

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/wheels
    python tools/convert_mtcnn_weights.py /tmp/wheels/facenet_pytorch-2.6.0-py3-none-any.whl

Reads ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` (plain state dicts) straight from the wheel,
without installing the package (it pins an old torch), and writes them, prefixed ``pnet.``,
``rnet.`` and ``onet.``, to ``model/weights/mtcnn.safetensors``, atomically. The same wheel
always gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import atomic_write_bytes  # noqa: E402
from model.people import MTCNNNets  # noqa: E402

NETS = ("pnet", "rnet", "onet")
DEFAULT_OUT = REPO / "model" / "weights" / "mtcnn.safetensors"


def read_wheel(wheel: Path) -> dict[str, torch.Tensor]:
    """The three state dicts of the wheel, as one flat dict with ``<net>.`` prefixes."""
    tensors: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(wheel) as archive:
        for net in NETS:
            data = archive.read(f"facenet_pytorch/data/{net}.pt")
            # weights_only: tensors and containers only, never arbitrary pickled code
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            for key, value in state.items():
                tensors[f"{net}.{key}"] = value.to(torch.float32).contiguous()
    return tensors


def convert(wheel: Path, out: Path = DEFAULT_OUT) -> Path:
    tensors = read_wheel(wheel)
    MTCNNNets().load_state_dict(tensors, strict=True)  # refuse a wheel whose tensors do not fit
    metadata = {
        "source": f"{wheel.name}: facenet_pytorch/data/pnet.pt, rnet.pt, onet.pt",
        "license": "MIT (see LICENSE-facenet-pytorch)",
    }
    data = save(dict(sorted(tensors.items())), metadata=metadata)
    return atomic_write_bytes(out, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="facenet_pytorch-2.6.0-py3-none-any.whl")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="file to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    path = convert(args.wheel, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
