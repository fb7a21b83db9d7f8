"""Photos to upright RGB, the one way every loader (training, evaluation, server) does it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_WHITE = (255, 255, 255)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so a phone photo is seen as the phone showed it.

    A malformed EXIF block is not worth refusing a photo over: the photo is kept as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # Pillow raises several types for broken EXIF data
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: CMYK and YCbCr converted, palettes expanded, 16-bit and float
    scaled to 8 bits (not clipped), transparency flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits -> 8-bit "L", using the range the format allows."""
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
    if image.mode == "I" and pixels.max() <= 255:
        top = 255.0
    scaled = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8 -> "L"


def open_rgb(path: str) -> Image.Image:
    """A photo file -> upright RGB image (first frame of an animation)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(upright(image))
