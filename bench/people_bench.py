"""People (face detector) benchmark: recall, false positives and CPU time per photo.

    python bench/people_bench.py                          # the shipped defaults
    python bench/people_bench.py --work-size 320 --score-threshold 0.6 --quick

Faces the ImageNet classifier sees as animals' are dropped, as served (``model/people/animals.py``;
``--no-animal-check`` keeps them).

- real everyday photos (coco-dev, 100 COCO photos with person counts and areas): the share of
  photos with people tagged ``person`` by the size of the largest person (its share of the
  photo), and of photos without people tagged; the same over a sweep of score thresholds and
  working sizes (an upscaled pass included), from one run of the network per setting.
- recall, through the server's pipeline (faces, and person from the classifier's categories):
  photos with people, and how many of them got a ``person`` tag: scikit-image's
  astronaut and camera, the indoor photos whose manifest says ``person`` (far, small faces),
  and 100 LFW faces (scikit-image's ``lfw_subset``, 25x25 tight crops) pasted one per photo at
  several sizes onto a 640x480 photo without faces (a hit is a box around the pasted face).
- false positives, through the same pipeline: photos without people that got a ``person``
  tag: scikit-image's photographs without faces, ants-bees/train, the indoor photos without
  ``person``, the exif-orientation landscape. Each false detection is listed, to be looked at.
- CPU time: milliseconds of this process's CPU per photo (every thread, the runtime's too),
  median of ``--repeat`` runs, on thumbnails (640x480), on phone photos (4032x3024 JPEG) as the
  server decodes them (JPEG draft to 1008x756) and on the full 4032x3024 decode.

Photo sets come from ``../shared/data`` (``--data``); a set that is absent is skipped with a
message. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md, "Training"

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import make_photo, source_photos  # noqa: E402

from model.imageio import decode  # noqa: E402
from model.people import DetectorConfig, FaceDetector, people_tags  # noqa: E402
from model.runtime import RuntimeChoice  # noqa: E402
from model.tagger import Tagger  # noqa: E402

Photo = tuple[str, Image.Image]
LFW_SIDES = (16, 24, 32, 48, 64, 96, 160)
SKIMAGE_FACES = ("astronaut", "camera")
SKIMAGE_NO_FACES = (
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "coins",
    "moon",
    "clock",
    "colorwheel",
)
SERVER_DRAFT = 512  # the server's JPEG draft size (2x its 256 px resize)


def skimage_photos(names: tuple[str, ...]) -> list[Photo]:
    from skimage import data

    return [(name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in names]


def indoor_photos(data: Path, with_person: bool) -> list[Photo] | None:
    folder = data / "indoor-multilabel"
    if not (folder / "manifest.jsonl").is_file():
        return None
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [
        (row["path"], Image.open(folder / row["path"]).convert("RGB"))
        for row in rows
        if ("person" in row["tags"]) == with_person
    ]


def folder_photos(folder: Path, limit: int | None) -> list[Photo] | None:
    if not folder.is_dir():
        return None
    suffixes = (".jpg", ".jpeg", ".png", ".gif")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    photos = []
    for path in paths[:limit]:
        with Image.open(path) as image:
            photos.append((str(path.relative_to(folder)), ImageOps.exif_transpose(image)))
    return [(name, image.convert("RGB")) for name, image in photos]


def lfw_pasted(side: int, count: int, seed: int = 0) -> Iterator[tuple[Image.Image, tuple]]:
    """LFW faces upscaled to ``side`` px, one per 640x480 copy of a faceless photo."""
    from skimage import data

    faces = (data.lfw_subset()[:count] * 255).astype(np.uint8)  # the first 100 are faces
    background = Image.fromarray(data.coffee()).resize((640, 480))
    rng = np.random.default_rng(seed)
    for face in faces:
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
        photo = background.copy()
        pasted = Image.fromarray(face).convert("RGB").resize((side, side), Image.BICUBIC)
        photo.paste(pasted, (x, y))
        yield photo, (x + side / 2, y + side / 2)


COCO_SIZES = ((0.0, 0.02), (0.02, 0.1), (0.1, 1.01))  # the largest person's share of the photo
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


def coco_photos(data: Path) -> list[tuple[dict, Image.Image]] | None:
    folder = data / "coco-dev"
    if not (folder / "manifest.jsonl").is_file():
        return None
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [(row, Image.open(folder / row["file"]).convert("RGB")) for row in rows]


def coco_scores(detector: FaceDetector, photos: list, work_size: int) -> list[float]:
    """Each photo's best face score at ``work_size`` (0 without a face): photos smaller than it
    are upscaled to it, a pass for small faces."""
    best = []
    for _, image in photos:
        scale = work_size / max(image.size)
        if scale > 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.BILINEAR)
        faces = detector.detect(image)
        best.append(max((f.score for f in faces), default=0.0))
    return best


def report_coco(detector: FaceDetector, tagger: Tagger, data: Path, quick: bool) -> None:
    photos = coco_photos(data)
    if photos is None:
        print("  coco-dev: skipped (not found under --data)")
        return
    threshold = detector.config.score_threshold
    faces = [has_person(detector, image)[0] for _, image in photos]
    folder = data / "coco-dev"
    served = [  # the server's pipeline: faces, and person from the classifier's categories
        any(t.label == "person" for t in tagger.tag((folder / row["file"]).read_bytes()))
        for row, _ in photos
    ]
    rows = [row for row, _ in photos]
    report_person(rows, faces, "faces alone")
    report_person(rows, served, "the server's pipeline (faces + the classifier's categories)")
    sizes = (320, detector.config.work_size) if quick else (320, 480, 640, 960)
    print(f"  coco-dev sweep (recall / false positives; default threshold {threshold}):")
    for size in sizes:
        config = replace(detector.config, work_size=size, score_threshold=min(SWEEP_THRESHOLDS))
        scores = coco_scores(FaceDetector(detector.network, config, detector.animals), photos, size)
        people = [s for s, (row, _) in zip(scores, photos, strict=True) if row["people"] > 0]
        empty = [s for s, (row, _) in zip(scores, photos, strict=True) if row["people"] == 0]
        cells = [
            f">= {t}: {sum(s >= t for s in people)}/{len(people)} / "
            f"{sum(s >= t for s in empty)}/{len(empty)}"
            for t in SWEEP_THRESHOLDS
        ]
        print(f"    {size} px{' (upscaled)' if size > 640 else ''}: " + "; ".join(cells))


def report_person(rows: list[dict], found: list[bool], how: str) -> None:
    """Recall by the largest person's size, and false alarms, of one way of finding people."""
    people = [(row, f) for row, f in zip(rows, found, strict=True) if row["people"] > 0]
    cells = []
    for low, high in COCO_SIZES:
        hits = [f for row, f in people if low <= row["person_area"] < high]
        cells.append(f"{low:.0%}-{min(high, 1):.0%} of the photo {sum(hits)}/{len(hits)}")
    false = [row["file"] for row, f in zip(rows, found, strict=True) if row["people"] == 0 and f]
    without = sum(row["people"] == 0 for row in rows)
    tagged = sum(f for _, f in people)
    print(
        f"  coco-dev, {how}: photos with people tagged person {tagged}/{len(people)} = "
        f"{tagged / len(people):.1%} (by the largest person's size: {', '.join(cells)}); "
        f"without people tagged {len(false)}/{without} = {len(false) / without:.1%}"
        + (f" ({', '.join(false)})" if false else "")
    )


def has_person(detector: FaceDetector, image: Image.Image) -> tuple[bool, list]:
    faces = detector.detect(image)
    tags = people_tags(faces, image.size)
    return any(t.label == "person" for t in tags), faces


def served_person(tagger: Tagger, image: Image.Image) -> str | None:
    """How the server's pipeline finds a person on ``image`` (sent as a JPEG): "faces", "the
    classifier's categories", or None."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    prepared = tagger.prepare(buffer.getvalue())
    if any(t.label == "person" for t in prepared.people):
        return "faces"
    tags = tagger.tags(tagger.outputs(prepared.pixels[None]).unbind()[0], people=prepared.people)
    return "the classifier's categories" if any(t.label == "person" for t in tags) else None


def report_set(tagger: Tagger, title: str, photos: list[Photo] | None, people: bool):
    """Photos with or without people through the server's pipeline."""
    if photos is None:
        print(f"  {title}: skipped (not found under --data)")
        return
    hits = []
    for name, image in photos:
        how = served_person(tagger, image)
        if how:
            assert tagger.people is not None
            hits.append((name, how, tagger.people.detect(image)))
    kind = "recall" if people else "false positives"
    print(f"  {title}: {kind} {len(hits)}/{len(photos)} = {len(hits) / len(photos):.1%}")
    if people:
        missed = sorted(set(n for n, _ in photos) - set(n for n, *_ in hits))
        if missed:
            print(f"    missed: {', '.join(missed)}")
        return
    for name, how, faces in hits:
        boxes = ", ".join(f"{[round(v) for v in f.box]} p={f.score:.3f}" for f in faces)
        print(f"    {name}: from {how}{': ' if faces else ''}{boxes}")


def report_lfw(detector: FaceDetector, count: int) -> None:
    cells = []
    for side in LFW_SIDES:
        found = 0
        for photo, (cx, cy) in lfw_pasted(side, count):
            boxes = [f.box for f in detector.detect(photo)]
            found += any(x0 < cx < x1 and y0 < cy < y1 for x0, y0, x1, y1 in boxes)
        cells.append(f"{side}px {found / count:.0%}")
    print(f"  LFW faces pasted into 640x480 ({count} per size): " + ", ".join(cells))


def time_set(detector: FaceDetector, title: str, images: list[Image.Image], repeat: int) -> None:
    per_photo = []
    for image in images:
        detector.detect(image)  # warm-up: first-call allocations
        runs = []
        for _ in range(repeat):
            # CPU time of this process, the runtime's threads included: what the photo costs
            # the server, and steady on a machine shared with other jobs, unlike wall time
            start = time.process_time()
            detector.detect(image)
            runs.append(time.process_time() - start)
        per_photo.append(statistics.median(runs))
    work = detector.run(images[0]).work_size
    ms = sorted(t * 1000 for t in per_photo)
    print(
        f"  {title} {images[0].size[0]}x{images[0].size[1]} -> {work[0]}x{work[1]}: "
        f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms CPU per photo "
        f"({len(images)} photos)"
    )


def cost_photos(count: int) -> dict[str, list[Image.Image]]:
    """Thumbnails and phone photos as the serving benchmark makes them (bench/photos.py)."""
    sets: dict[str, list[Image.Image]] = {"thumb": [], "phone (server decode)": [], "phone": []}
    for seed, (_, image) in enumerate(source_photos(count)):
        thumb = make_photo(image, (640, 480), 0.0, seed)
        phone = make_photo(image, (4032, 3024), 5.0, seed)
        sets["thumb"].append(Image.open(io.BytesIO(thumb)).convert("RGB"))
        draft = decode(phone, max_pixels=50_000_000, draft_size=SERVER_DRAFT)
        sets["phone (server decode)"].append(draft)
        sets["phone"].append(Image.open(io.BytesIO(phone)).convert("RGB"))
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    defaults = DetectorConfig()
    parser.add_argument("--work-size", type=int, default=defaults.work_size)
    parser.add_argument("--score-threshold", type=float, default=defaults.score_threshold)
    parser.add_argument("--backend", default="auto", help="auto, torch or openvino")
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "bench" / "out" / "default.safetensors"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per photo")
    parser.add_argument("--cost-photos", type=int, default=10, help="photos per timed set")
    parser.add_argument("--quick", action="store_true", help="fewer photos (a smoke run)")
    parser.add_argument(
        "--no-animal-check",
        action="store_true",
        help="keep the faces the classifier sees as animals'",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = DetectorConfig(work_size=args.work_size, score_threshold=args.score_threshold)
    choice = RuntimeChoice.resolve(device="cpu", backend=args.backend, threads=1)
    detector = FaceDetector.load(choice, config, animals=not args.no_animal_check)
    if not args.checkpoint.exists():
        from model.pretrained import build_default_checkpoint

        build_default_checkpoint(args.checkpoint)
    tagger = Tagger.load(args.checkpoint, choice, detector)
    limit = 20 if args.quick else None
    check = "off" if detector.animals is None else "on"
    print(f"YuNet on {detector.backend}, {config}, animal check {check}, 1 thread")

    print("real everyday photos:")
    report_coco(detector, tagger, args.data, args.quick)
    print("photos with people:")
    report_set(tagger, "scikit-image astronaut, camera", skimage_photos(SKIMAGE_FACES), True)
    indoor = indoor_photos(args.data, with_person=True)
    report_set(tagger, "indoor-multilabel tagged person (far faces)", indoor, True)
    report_lfw(detector, 20 if args.quick else 100)

    print("photos without people:")
    report_set(tagger, "scikit-image photographs", skimage_photos(SKIMAGE_NO_FACES), False)
    ants_bees = folder_photos(args.data / "ants-bees" / "train", limit)
    report_set(tagger, "ants-bees/train", ants_bees, False)
    report_set(tagger, "indoor-multilabel without person", indoor_photos(args.data, False), False)
    exif = folder_photos(args.data / "exif-orientation", None)
    landscape = None if exif is None else [p for p in exif if p[0] == "Landscape_1.jpg"]
    report_set(tagger, "exif-orientation landscape", landscape, False)

    print("CPU time per photo (one thread):")
    count = 3 if args.quick else args.cost_photos
    for title, images in cost_photos(count).items():
        time_set(detector, title, images, 2 if args.quick else args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
