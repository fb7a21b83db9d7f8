"""Coverage-guided fuzz target (atheris/libFuzzer) for the upload decode path: bytes ->
``model.imageio.decode`` (format sniffing, Pillow, EXIF orientation, RGB) -> the eval transform.

The property: any input either decodes to an RGB image within the pixel limit that preprocesses to
(3, crop, crop), or is refused with a PhotoError the API answers with a 4xx status. Anything else
(another exception, a crash, a hang past -timeout, memory past -rss_limit_mb) is a finding.

Short run (what CI does, via tests/app/test_fuzz_decode.py, ~15 s from a generated seed corpus):

    .venv/bin/python tests/fuzz/fuzz_decode.py --make-corpus /tmp/decode-corpus
    .venv/bin/python tests/fuzz/fuzz_decode.py /tmp/decode-corpus -max_total_time=15

Long run (an hour, findings saved as crash-*/timeout-* files in the working folder; replay one
with ``.venv/bin/python tests/fuzz/fuzz_decode.py crash-<hash>``):

    .venv/bin/python tests/fuzz/fuzz_decode.py /tmp/decode-corpus -max_total_time=3600 \
        -rss_limit_mb=2048 -timeout=10 -max_len=65536
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Pillow's plugins are Python: instrumenting them is what makes the search coverage-guided
# inside the parsers, not just in our own code.
with atheris.instrument_imports(include=["PIL", "model.imageio", "model.preprocess"]):
    from app.errors import photo_error
    from model import imageio as images
    from model.preprocess import Preprocess, build_eval_transform

# Small limits keep each run fast; the logic under test is the same at any limit.
MAX_PIXELS = 4_000_000
PREPROCESS = Preprocess(resize=36, crop=32)
TRANSFORM = build_eval_transform(PREPROCESS)
warnings.simplefilter("ignore")  # Pillow warns on odd tags; decode() still turns bombs into errors


def test_one_input(data: bytes) -> None:
    try:
        image = images.decode(data, max_pixels=MAX_PIXELS, draft_size=PREPROCESS.resize)
    except images.PhotoError as refused:
        error = photo_error(refused)
        if not 400 <= error.status < 500:
            raise AssertionError(f"decode refused with a {error.status}: {error.message}") from None
        return
    if image.mode != "RGB" or image.width * image.height > MAX_PIXELS:
        raise AssertionError(f"decoded to {image.mode} {image.size}")
    shape = tuple(TRANSFORM(image).shape)
    if shape != (3, PREPROCESS.crop, PREPROCESS.crop):
        raise AssertionError(f"preprocessed to {shape}")


def make_corpus(folder: Path) -> list[Path]:
    """Small valid photos of every accepted format and a few odd modes: the fuzzer's seeds."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.radial_gradient("L").resize((24, 16)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 to display
    seeds = {
        "a.jpg": (base, "JPEG", {"quality": 70}),
        "exif.jpg": (base, "JPEG", {"exif": exif}),
        "progressive.jpg": (base, "JPEG", {"progressive": True}),
        "cmyk.jpg": (base.convert("CMYK"), "JPEG", {}),
        "a.png": (base, "PNG", {}),
        "palette.png": (base.convert("P"), "PNG", {}),
        "la.png": (base.convert("LA"), "PNG", {}),
        "i16.png": (base.convert("I;16"), "PNG", {}),
        "a.gif": (base.convert("P"), "GIF", {}),
        "rgba.webp": (base.convert("RGBA"), "WEBP", {"lossless": True}),
        "a.bmp": (base, "BMP", {}),
        "a.tiff": (base, "TIFF", {}),
        "float.tiff": (base.convert("F"), "TIFF", {}),
        "a.heic": (base, "HEIF", {}),
    }
    paths = []
    for name, (image, fmt, options) in seeds.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        paths.append(folder / name)
        paths[-1].write_bytes(buffer.getvalue())
    return paths


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--make-corpus":
        print("\n".join(str(p) for p in make_corpus(Path(argv[2]))))
        return
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
