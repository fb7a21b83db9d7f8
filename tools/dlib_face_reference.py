"""What dlib's own face recognition pipeline gives on a few photos: the fixture that
``tests/model/test_face_embedding.py`` checks phototag's face descriptors against.

    pip install dlib-bin face-recognition-models   # dlib itself and its models; not dependencies
    python tools/dlib_face_reference.py

Runs dlib's full pipeline on scikit-image's two photos with faces (the astronaut; the cameraman,
grey, his face turned) and on copies of them mirrored, scaled and rotated: its CNN face detector
(``mmod_human_face_detector``, the image upsampled once), its 5-point shape predictor on the best
detection, and ``compute_face_descriptor`` (no jitter, padding 0.25: the chip of
``get_face_chip(img, shape, 150, 0.25)``). Writes ``tests/data/dlib_face_reference.json``: per
photo, the face's box, the five landmarks (integers, as dlib gives them), the chip's scale
(photo pixels per chip pixel) and the 128 numbers of the descriptor.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "dlib_face_reference.json"
UPSAMPLE = 1  # the detector's upsampling: the cameraman's face is too small without it
CHIP_SIZE = 150
PADDING = 0.25


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def rotated(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated counter-clockwise about its centre, the canvas grown to hold it, black corners."""
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)


# Each photo holds one face (the one dlib is surest of is the one recorded)
PHOTOS: dict[str, Callable[[], Image.Image]] = {
    "astronaut": lambda: skimage_photo("astronaut"),
    "astronaut_mirrored": lambda: ImageOps.mirror(skimage_photo("astronaut")),
    "astronaut_half": lambda: skimage_photo("astronaut").resize(
        (256, 256), Image.Resampling.LANCZOS
    ),  # the face about 50 px wide
    "astronaut_triple": lambda: skimage_photo("astronaut").resize(
        (1536, 1536), Image.Resampling.BICUBIC
    ),  # about 300 px: more than twice the chip, dlib samples from its image pyramid
    "astronaut_rotated": lambda: rotated(skimage_photo("astronaut"), 12),
    "camera": lambda: skimage_photo("camera"),
    "camera_mirrored": lambda: ImageOps.mirror(skimage_photo("camera")),
}


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")  # not imported: needs pkg_resources
    if spec is None or spec.origin is None:
        raise SystemExit("pip install face-recognition-models dlib-bin")
    return Path(spec.origin).parent / "models"


def reference(
    photo: Image.Image, detector, predictor, recognizer
) -> dict[str, list[float] | list[int] | float]:
    import dlib

    pixels = np.asarray(photo.convert("RGB"))
    detections = sorted(detector(pixels, UPSAMPLE), key=lambda d: -d.confidence)
    if not detections:
        raise ValueError("dlib finds no face")
    box = detections[0].rect
    shape = predictor(pixels, box)
    chip = dlib.get_face_chip_details(shape, CHIP_SIZE, PADDING)
    descriptor = recognizer.compute_face_descriptor(pixels, shape, 0, PADDING)
    return {
        "box": [box.left(), box.top(), box.right(), box.bottom()],
        "landmarks": [[p.x, p.y] for p in shape.parts()],
        "chip_scale": round(chip.rect.width() / CHIP_SIZE, 4),  # drectangle: width = r - l + 1
        "descriptor": [round(float(v), 7) for v in descriptor],
    }


def main() -> int:
    import dlib

    models = models_dir()
    detector = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(
        str(models / "dlib_face_recognition_resnet_model_v1.dat")
    )
    cases = []
    for name, build in PHOTOS.items():
        photo = build()
        case = {"photo": name, "size": list(photo.size)}
        case.update(reference(photo, detector, predictor, recognizer))
        cases.append(case)
        print(f"{name:>20}: box {case['box']} chip scale {case['chip_scale']}")
    fixture = {
        "source": (
            f"dlib {dlib.__version__} (PyPI dlib-bin {version('dlib-bin')}), models of "
            f"face-recognition-models {version('face_recognition_models')}: "
            "mmod_human_face_detector (upsampled once), shape_predictor_5_face_landmarks, "
            "dlib_face_recognition_resnet_model_v1 (no jitter, padding 0.25); "
            "tools/dlib_face_reference.py"
        ),
        "cases": cases,
    }
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
