"""Photos to upright RGB, the one way every loader (training, evaluation, server) does it.

Files on disk (training sets) open with :func:`open_rgb`; bytes from outside (uploads, a photo
library) go through :func:`decode`, which refuses what is not an allowed photo before any parser
sees it and raises :class:`PhotoError` with a stable code.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pillow_heif
from PIL import Image, ImageOps

from model.errors import CodedError

_WHITE = (255, 255, 255)


FULL_SIZE = "phototag_full_size"  # the key in a decoded image's info: see :func:`full_size`


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


class PhotoError(CodedError, ValueError):
    """Bytes that are not a photo this project takes. ``code`` is stable (``empty_file``,
    ``unsupported_media_type``, ``image_too_large``, ``invalid_image``); ``message`` is for a
    person."""


pillow_heif.register_heif_opener()  # adds Pillow's "HEIF" format: HEIC photos from phones

# Magic numbers of the formats we accept. The format is decided by the bytes, never by the file
# name or the Content-Type, and only the matching Pillow plugin is allowed to parse them.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")
# ISO-BMFF brands of HEIF still images and sequences (HEIC is HEIF with HEVC). AVIF shares the
# container ("avif", "avis") but is not among them.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_HEIF_GENERIC_BRANDS = {b"mif1", b"msf1"}


def sniff_format(data: bytes) -> str | None:
    """The allowed format these bytes start with, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return "HEIF" if _is_heif(data) else None
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def _is_heif(data: bytes) -> bool:
    """An ISO-BMFF ``ftyp`` box whose major brand, or (for the generic ``mif1``/``msf1``) one of
    whose compatible brands, is a HEIF one."""
    box_size = int.from_bytes(data[:4], "big")
    major = data[8:12]
    if major in _HEIF_BRANDS:
        return True
    if major not in _HEIF_GENERIC_BRANDS:
        return False
    end = min(max(box_size, 16), 4096, len(data))
    compatible = {data[i : i + 4] for i in range(16, end - 3, 4)}
    return bool(compatible & _HEIF_BRANDS) or not compatible & {b"avif", b"avis"}


def decode(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Bytes of one photo -> upright RGB image.

    ``draft_size`` lets JPEGs decode straight at a reduced scale (1/2, 1/4 or 1/8, the smallest
    that keeps both sides at least ``draft_size``): libjpeg skips most of the inverse DCT, several
    times faster on a phone photo. Each pixel is then the mean of a block, a slightly softer
    start for the resize than the full photo.
    """
    if not data:
        raise PhotoError("empty_file", "the photo is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise PhotoError(
            "unsupported_media_type",
            f"not a supported image; send one of {', '.join(ALLOWED_FORMATS)}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            _check_pixels(image, max_pixels)
            full_size = image.size
            if fmt == "JPEG" and draft_size:
                image.draft("RGB", (draft_size, draft_size))
            image.load()  # first frame only, for animations
    except PhotoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoError(
            "image_too_large", f"the image has more than {max_pixels} pixels"
        ) from None
    except Exception as exc:  # Pillow signals broken data with many types (OSError, ValueError, …)
        raise PhotoError(
            "invalid_image", f"the {fmt} data could not be decoded (truncated or corrupt?): {exc}"
        ) from None
    decoded_size = image.size
    result = to_rgb(upright(image))
    turned = result.size != decoded_size  # a quarter turn by the EXIF orientation
    # what the photo measures upright at full scale, for drawings on it (explanations)
    result.info[FULL_SIZE] = full_size[::-1] if turned else full_size
    return result


def full_size(image: Image.Image) -> tuple[int, int]:
    """The upright size of the photo ``image`` was decoded from (a JPEG draft is smaller)."""
    return tuple(image.info.get(FULL_SIZE, image.size))


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise PhotoError("invalid_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PhotoError(
            "image_too_large",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
