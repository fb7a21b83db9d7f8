"""What libfacedetection's own build finds on a few photos: the fixture that
``tests/model/test_yunet.py`` checks phototag's YuNet against.

    pip install yuface==2023.5.1   # the library itself, Python 3.11 wheel; not a dependency
    python tools/yunet_reference.py

Runs ``yuface`` (the library's C++ detector behind pybind11) on scikit-image's photos and on a
group photo composed from them, each downscaled to the working sizes (PIL bilinear, reducing_gap
2, longest side at most the working size; :func:`model.people.yunet.working_pixels` resizes with
torch's antialiased bilinear since, within one level of PIL's), and writes
``tests/data/yunet_reference.json``: per photo and working
size, every face the library returns (its own floor of score 0.2), as it returns them, integers
truncated toward zero: score in percent, box (x, y, w, h), five landmarks (x, y).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "yunet_reference.json"
WORK_SIZES = (320, 640)


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def group() -> Image.Image:
    """Seven faces on a 960x640 canvas: the astronaut's at 40 to 190 px wide, some mirrored,
    and the cameraman (his face about 50 px)."""
    face = skimage_photo("astronaut").crop((150, 30, 300, 205))  # 150x175, hair to neck
    canvas = Image.new("RGB", (960, 640), (96, 110, 124))
    canvas.paste(skimage_photo("camera").resize((320, 320), Image.Resampling.BICUBIC), (620, 300))
    spots = [(1.25, False, (20, 20)), (0.8, True, (240, 40)), (0.6, False, (380, 40)),
             (0.45, True, (480, 60)), (0.3, False, (560, 80)), (0.9, True, (60, 330)),
             (0.7, False, (250, 360))]  # fmt: skip
    for scale, mirror, xy in spots:
        size = (round(face.width * scale), round(face.height * scale))
        tile = face.resize(size, Image.Resampling.BICUBIC)
        canvas.paste(ImageOps.mirror(tile) if mirror else tile, xy)
    return canvas


# astronaut: one face; camera: one small face, grey; group: seven; chelsea (a cat) and coffee:
# none (what the library finds there anyway is checked all the same)
PHOTOS: dict[str, Callable[[], Image.Image]] = {
    "astronaut": lambda: skimage_photo("astronaut"),
    "camera": lambda: skimage_photo("camera"),
    "group": group,
    "chelsea": lambda: skimage_photo("chelsea"),
    "coffee": lambda: skimage_photo("coffee"),
}


def working_image(image: Image.Image, work_size: int) -> Image.Image:
    """The working size of :func:`model.people.yunet.working_pixels` (PIL's bilinear: the resize
    phototag used when the fixture was made), written out here so that the fixture does not
    depend on the code it checks."""
    scale = work_size / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def reference_faces(image: Image.Image) -> list[dict[str, list[int] | int]]:
    """The library's faces on an RGB image, best first, as integers."""
    import yuface

    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    scores, boxes, landmarks = yuface.detect(bgr, conf=0.0)
    # the wheel hands back uint16: a box poking out of the photo's top or left wraps around
    boxes = boxes.astype(np.int16)
    landmarks = landmarks.astype(np.int16)
    return [
        {"score_percent": int(s), "box_xywh": b.tolist(), "landmarks": lm.tolist()}
        for s, b, lm in zip(scores, boxes, landmarks, strict=True)
    ]


def main() -> int:
    import yuface  # noqa: F401  (fail early, with the install hint above)

    cases = []
    for name, build in PHOTOS.items():
        photo = build()
        for work_size in WORK_SIZES:
            work = working_image(photo, work_size)
            cases.append(
                {
                    "photo": name,
                    "work_size": work_size,
                    "size": list(work.size),
                    "faces": reference_faces(work),
                }
            )
    fixture = {
        "source": "yuface 2023.5.1 (libfacedetection's YuNet), tools/yunet_reference.py",
        "cases": cases,
    }
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    for case in cases:
        scores = [f["score_percent"] for f in case["faces"]]
        print(f"{case['photo']:>10} @ {case['work_size']}: {case['size']} faces {scores}")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
