"""Uploads: every accepted format (HEIC included) decided by its bytes, everything else refused
before a parser runs, and the limits (body, files, pixels, decode time) as JSON errors."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.GifImagePlugin import GifImageFile

from model import imageio as images
from tests.helpers import load_tagger, photo_bytes, shared_data

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_accepted_format_is_tagged_whatever_the_name_or_content_type(client, fmt):
    data = photo_bytes(fmt=fmt)
    r = client.post("/v1/tags", files={"file": ("photo.bin", data, "text/plain")})
    assert r.status_code == 200, r.text
    raw = client.post("/v1/tags", content=data, headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    assert r.json()["results"][0]["tags"] == raw.json()["results"][0]["tags"]


def test_heic_from_a_phone_is_decoded_upright_in_rgb():
    data = photo_bytes((64, 48), color=(10, 200, 10), fmt="HEIF", noise=0)
    assert data[4:12] == b"ftypheic"
    image = images.decode(data, max_pixels=10**6)
    assert image.mode == "RGB" and image.size == (64, 48)
    r, g, b = image.getpixel((32, 24))
    assert g > 150 and r < 60 and b < 60


def test_a_rotated_heic_is_turned_upright_once():
    """pillow-heif applies the HEIF rotation and resets the EXIF orientation to 1, so the
    EXIF transpose that follows must not turn the photo a second time."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :20] = 255  # white left third: shows which way the photo was turned
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="HEIF", exif=exif.tobytes(), quality=95)
    image = images.decode(buffer.getvalue(), max_pixels=10**6)
    assert image.size == (40, 60)  # turned once: 60x40 stored, 40x60 shown
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 55))
    assert min(top) > 200 and max(bottom) < 60  # the white third is now on top


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    brands = major + b"\0\0\0\0" + b"".join(compatible)
    return struct.pack(">I", 8 + len(brands)) + b"ftyp" + brands + b"\0" * 32


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (ftyp(b"heic", b"mif1", b"heic"), "HEIF"),
        (ftyp(b"mif1", b"mif1", b"heic"), "HEIF"),
        (ftyp(b"heix"), "HEIF"),
        (ftyp(b"avif", b"mif1", b"avif"), None),
        (ftyp(b"mif1", b"avif"), None),
        (ftyp(b"isom", b"mp41"), None),  # an MP4 video
    ],
)
def test_heif_is_recognised_by_its_ftyp_brands(head, expected):
    assert images.sniff_format(head) == expected


REFUSED = {
    "psd": b"8BPS\x00\x01" + b"\0" * 64,
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"\0" * 64,
    "eps-binary": b"\xc5\xd0\xd3\xc6" + b"\0" * 64,
    "pdf": b"%PDF-1.7\n" + b"\0" * 64,
    "fits": b"SIMPLE  =                    T" + b" " * 50,
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    "ico": b"\x00\x00\x01\x00\x01\x00" + b"\0" * 64,
    "avif": photo_bytes(fmt="AVIF") if "AVIF" in Image.registered_extensions().values() else b"",
}


@pytest.mark.parametrize("name", [k for k, v in REFUSED.items() if v])
def test_other_formats_are_415_before_any_parser_runs(client, monkeypatch, name):
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    r = client.post("/v1/tags", files={"file": (f"x.{name}", REFUSED[name], "image/png")})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert opened == []


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def test_animated_gif_uses_the_first_frame_without_walking_the_others(monkeypatch):
    seeks = []
    original = GifImageFile.seek
    monkeypatch.setattr(GifImageFile, "seek", lambda self, f: seeks.append(f) or original(self, f))
    image = images.decode(animated_gif(), max_pixels=10**6)
    assert image.getpixel((5, 5))[0] > 200  # red: frame 0
    assert all(frame == 0 for frame in seeks)


def test_animated_webp_uses_the_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 250), (250, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert images.decode(buffer.getvalue(), max_pixels=10**6).getpixel((5, 5))[2] > 200


def test_jpeg_decodes_in_draft_mode_near_the_model_input_size():
    data = photo_bytes((2000, 1500), noise=0)
    image = images.decode(data, max_pixels=10**8, draft_size=36)
    assert image.size == (250, 188)  # 1/8 scale: the smallest that keeps both sides >= 36


@pytest.mark.parametrize(("gap", "expected_size"), [(1, (250, 188)), (6, (500, 375)), (0, None)])
def test_the_decoder_drafts_at_the_reducing_gap_times_the_resize(tiny_checkpoint, gap,
                                                                  expected_size,
                                                                  monkeypatch):  # fmt: skip
    from app.metrics import Metrics
    from app.pipeline import Decoder
    from model import tagger as tagger_module

    tagger = load_tagger(tiny_checkpoint)  # resize 36
    decoder = Decoder(1, 10**8, 10.0, Metrics(), reducing_gap=gap)
    sizes = []
    monkeypatch.setattr(tagger_module, "resize_and_crop", lambda image, _: sizes.append(image.size))
    try:
        decoder._decode(photo_bytes((2000, 1500), noise=0), tagger)
    finally:
        decoder.close()
    # gap 1: 1/8 scale (both sides >= 36 px); gap 6: 1/4 (>= 216 px); 0: the full photo
    assert sizes == [expected_size or (2000, 1500)]


def test_reducing_gaps_keep_shipped_photos_close_to_a_full_decode(default_checkpoint):
    """The figures PHOTOTAG_JPEG_REDUCING_GAP documents, on the real photos large enough to be
    decoded at a reduced scale (3 of the ants-bees set; gap 1 drafts all 3, gap 2 one)."""
    import torch

    photos = [
        p.read_bytes()
        for p in sorted(shared_data("ants-bees/train").rglob("*.jpg"))
        if min(Image.open(p).size) >= 512
    ]
    assert len(photos) == 3
    tagger = load_tagger(default_checkpoint)

    def probabilities(gap: float) -> torch.Tensor:
        pixels = [tagger.pixels(d, max_pixels=10**9, reducing_gap=gap) for d in photos]
        return tagger.probabilities(torch.stack(pixels))

    full = probabilities(0)
    fastest, default = ((probabilities(gap) - full).abs().max() for gap in (1, 2))
    assert default <= 0.035 < fastest  # measured: 0.030 and 0.155
    assert torch.equal(probabilities(0).argmax(1), probabilities(2).argmax(1))


def test_a_reducing_gap_below_one_is_refused():
    from app.settings import Settings

    with pytest.raises(ValueError, match=r"use 0 \(decode in full\) or a value of at least 1"):
        Settings(jpeg_reducing_gap=0.5)
    assert Settings(jpeg_reducing_gap=0).jpeg_reducing_gap == 0


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but holds a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_413_without_allocating_it(client):
    r = client.post("/v1/tags", files={"file": ("bomb.png", png_claiming(100_000, 100_000))})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "image_too_large"


def test_a_bomb_beside_a_good_photo_fails_alone(client):
    files = [
        ("file", ("bomb.png", png_claiming(30_000, 30_000))),
        ("file", ("ok.heic", photo_bytes(fmt="HEIF"))),
    ]
    r = client.post("/v1/tags", files=files)
    assert r.status_code == 200
    bomb, ok = r.json()["results"]
    assert bomb["error"]["code"] == "image_too_large" and bomb["error"]["message"].startswith(
        "bomb.png"
    )
    assert ok["tags"] and "error" not in ok


def test_pixel_limit_is_configurable(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, max_pixels=1000)
    r = client.post(
        "/v1/tags", content=photo_bytes((64, 48)), headers={"Content-Type": "image/jpeg"}
    )
    assert r.status_code == 413 and "3072" in r.json()["error"]["message"]


def test_a_photo_slower_to_decode_than_the_limit_is_422(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, max_decode_seconds=0.001)
    big = photo_bytes((3000, 2000), fmt="PNG", noise=100)
    r = client.post("/v1/tags", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "decode_timeout"
    assert client.get("/readyz").status_code == 200


def test_decoding_runs_on_the_decode_threads_not_the_event_loop(client, monkeypatch):
    threads = []
    original = images.decode
    monkeypatch.setattr(
        images,
        "decode",
        lambda *a, **k: threads.append(threading.current_thread().name) or original(*a, **k),
    )
    assert (
        client.post("/v1/tags", files={"file": ("a.png", photo_bytes(fmt="PNG"))}).status_code
        == 200
    )
    assert threads and all(name.startswith("phototag-decode") for name in threads)


def chunks(data: bytes, size: int = 1024):
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_body_limit_holds_while_streaming_without_content_length(client_for, tiny_checkpoint, form):
    client = client_for(tiny_checkpoint, max_body_bytes=8192)
    payload = photo_bytes((300, 300), fmt="PNG", noise=120)
    assert len(payload) > 8192
    if form == "raw":
        body, content_type = payload, "image/png"
    else:
        boundary = "b0undary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + payload
            + f"\r\n--{boundary}--\r\n".encode()
        )
        content_type = f"multipart/form-data; boundary={boundary}"
    r = client.post("/v1/tags", content=chunks(body), headers={"Content-Type": content_type})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_body_limit_refuses_a_declared_length_at_once(client_for, tiny_checkpoint, form):
    client = client_for(tiny_checkpoint, max_body_bytes=8192)
    payload = photo_bytes((300, 300), fmt="PNG", noise=120)
    if form == "raw":
        r = client.post("/v1/tags", content=payload, headers={"Content-Type": "image/png"})
    else:
        r = client.post("/v1/tags", files={"file": ("a.png", payload)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_more_files_than_allowed_is_a_json_error(client_for, tiny_checkpoint):
    client = client_for(tiny_checkpoint, max_files=2)
    files = [("file", (f"{i}.jpg", photo_bytes(seed=i))) for i in range(3)]
    r = client.post("/v1/tags", files=files)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request" and "2" in r.json()["error"]["message"]


def test_truncated_photo_is_422_not_a_server_error(client):
    data = photo_bytes((200, 200), fmt="HEIF")[:300]
    r = client.post("/v1/tags", content=data, headers={"Content-Type": "image/heic"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_an_unexpected_decoder_error_fails_only_its_photo(client, monkeypatch):
    """A bug on one odd photo (not an ApiError) is that photo's 422; the others are tagged."""
    real = images.decode

    def flaky(data, **kwargs):
        if data.startswith(b"\x89PNG"):
            raise ValueError("unexpected mode")
        return real(data, **kwargs)

    monkeypatch.setattr(images, "decode", flaky)
    files = [
        ("file", ("good.jpg", photo_bytes(), "image/jpeg")),
        ("file", ("odd.png", photo_bytes(fmt="PNG"), "image/png")),
    ]
    r = client.post("/v1/tags", files=files)
    assert r.status_code == 200, r.text
    good, odd = r.json()["results"]
    assert good["tags"]
    assert odd["error"]["code"] == "invalid_image" and "odd.png" in odd["error"]["message"]
