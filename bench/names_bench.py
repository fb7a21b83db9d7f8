"""Names benchmark: identification of taught people, false names for strangers, time per face.

    python bench/names_bench.py            # writes bench/out/names_bench.json, prints a table

What it has to measure with, offline (nothing is downloaded):

- taught people: the two photographs of identifiable people that scikit-image ships
  (``astronaut``: Eileen Collins, NASA, public domain; ``camera``: the cameraman, MIT's, free
  for any use per scikit-image's data README). Each is taught from its photo; the "other photos"
  are that photo changed: mirrored, scaled to 40-100% (faces ~40-90 px), cropped, darker and
  brighter, rotated by 8 degrees, recompressed as JPEG quality 30, and pasted beside a stranger.
  That is far easier than another photo of the person (other pose, light, age): its genuine
  distances (about 0.1-0.3) say the pipeline (detect, align, embed) is consistent, not how
  often a new photo of a person lies under the line. dlib's own figure for that is 99.38%
  accuracy on LFW's pairs at 0.6.
- strangers: every face YuNet finds in coco-dev (``../shared/data/coco-dev``, 100 COCO photos,
  CC BY licences per photo), each a different person from the taught ones. Their distances to
  the taught examples, and between faces of different photos, are the impostor distribution the
  open-set line is chosen from: the share of strangers that get a name at each line.
- time per face: alignment, and the descriptor network on torch and on OpenVINO (batch 1 and
  8), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path

import torch
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from model.imageio import open_rgb
from model.people.detector import FaceDetector
from model.people.embedding import align_faces, load_embedder
from model.people.names import (
    MATCH_DISTANCE,
    Embedder,
    Gallery,
    OpenVINOEmbedder,
    TorchEmbedder,
    identify,
    nameable,
)
from model.runtime import RuntimeChoice

NO_FACE_PHOTOS = "skipped: fetch the photos with `python tools/face_photos.py`"
LINES = (0.45, 0.5, 0.55, 0.6)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import face_photos  # noqa: E402  (tools/ is no package)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def variants(image: Image.Image, stranger: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    out = {
        "mirror": ImageOps.mirror(image),
        "crop": image.crop((w // 8, 0, w, h * 7 // 8)),
        "darker": ImageEnhance.Brightness(image).enhance(0.5),
        "brighter": ImageEnhance.Brightness(image).enhance(1.4),
        "rotate8": image.rotate(8, expand=True, fillcolor=(0, 0, 0)),
        "jpeg30": jpeg(image, 30),
        "beside_stranger": beside(image, stranger),
    }
    for scale in (1.0, 0.7, 0.55, 0.4):
        out[f"scale{scale}"] = image.resize((round(w * scale), round(h * scale)))
    return out


def faces_of(detector: FaceDetector, embedder: Embedder, image: Image.Image):
    faces = detector.detect(image)
    return faces, embedder.embed(image, faces)


def gallery_of(people: dict[str, torch.Tensor]) -> Gallery:
    owners = torch.cat([torch.full((len(e),), i) for i, e in enumerate(people.values())])
    return Gallery(tuple(people), torch.cat(list(people.values())), owners)


def identification(detector, embedder, taught, gallery, stranger) -> dict:
    """Per line: the share of the taught people's changed photos named right, named wrong."""
    trials = []  # (expected name, the name's distance, every other face named?)
    for name, image in taught.items():
        for variant, changed in variants(image, stranger).items():
            faces, embeddings = faces_of(detector, embedder, changed)
            # the taught person's face: the leftmost (the stranger is pasted on the right)
            order = sorted(range(len(faces)), key=lambda i: faces[i].box[0])
            if not faces:
                trials.append((name, variant, None, None))
                continue
            own = embeddings[order[0] : order[0] + 1]
            distance = float(torch.cdist(own, gallery_embeddings(gallery, name)).min())
            trials.append((name, variant, distance, embeddings))
    result = {"trials": len(trials), "missed_by_detector": sum(t[2] is None for t in trials)}
    for line in LINES:
        right = wrong = 0
        for name, _, distance, embeddings in trials:
            if distance is None:
                continue
            found = identify(embeddings, gallery, line)
            named = [f.name for f in found if f is not None]
            right += name in named
            wrong += sum(n != name for n in named)
        result[f"{line}"] = {"named_right": right / len(trials), "wrong_names": wrong}
    distances = [t[2] for t in trials if t[2] is not None]
    result["genuine_distance"] = {"max": max(distances), "median": statistics.median(distances)}
    result["per_trial"] = [(n, v, d and round(d, 3)) for n, v, d, _ in trials]
    return result


def other_days(detector, embedder, people: dict[str, list[Path]]) -> dict:
    """Taught from one or two photos of a person, named on their photos of other days, alone and
    beside another person (tools/face_photos.py); that other person must get no name."""
    images = {n: [open_rgb(p) for p in paths] for n, paths in people.items()}
    (name, photos), (_, [other]) = images.items()
    descriptor = {i: faces_of(detector, embedder, im)[1][:1] for i, im in enumerate(photos)}
    files = [p.name for p in people[name]]
    shown_faces = {}  # (photo, alone?) -> its faces' descriptors, left first
    for i, photo in enumerate(photos):
        for alone, image in ((True, photo), (False, beside(photo, other))):
            faces, embeddings = faces_of(detector, embedder, image)
            shown_faces[i, alone] = embeddings[
                sorted(range(len(faces)), key=lambda f: faces[f].box[0])
            ]
    trials = []  # (taught from, shown, alone?, each face's distance to the taught, left first)
    for taught in [(i,) for i in descriptor] + list(combinations(descriptor, 2)):
        examples = torch.cat([descriptor[i] for i in taught])
        for (shown, alone), embeddings in shown_faces.items():
            if shown in taught:
                continue
            distances = torch.cdist(embeddings, examples).min(1).values
            distances = [round(float(d), 3) for d in distances]
            trials.append(([files[i] for i in taught], files[shown], alone, distances))
    result: dict = {"trials": len(trials)}
    for line in LINES:
        result[f"{line}"] = {
            "named_right": sum(t[3][0] < line for t in trials) / len(trials),
            "other_person_named": sum(d < line for t in trials for d in t[3][1:]),
        }
    result["per_trial"] = trials
    return result


def beside(image: Image.Image, other: Image.Image) -> Image.Image:
    """The two photos side by side, ``image`` on the left, at ``image``'s height."""
    other = other.resize((round(other.width * image.height / other.height), image.height))
    both = Image.new("RGB", (image.width + other.width, image.height))
    both.paste(image, (0, 0))
    both.paste(other, (image.width, 0))
    return both


def gallery_embeddings(gallery: Gallery, name: str) -> torch.Tensor:
    return gallery.embeddings[gallery.owners == gallery.names.index(name)]


def strangers(detector, embedder, folder: Path, gallery: Gallery) -> dict:
    """Every face in a folder of photos of other people: false names per line, and the impostor
    distances between faces of different photos."""
    rows, photo_of, unnamed = [], [], 0
    for i, path in enumerate(sorted(folder.glob("*.jpg"))):
        image = Image.open(path).convert("RGB")
        faces = detector.detect(image)
        named = [f for f in faces if nameable(f)]  # as Namer names them
        unnamed += len(faces) - len(named)
        rows.append(embedder.embed(image, named))
        photo_of += [i] * len(named)
    embeddings = torch.cat(rows) if rows else torch.zeros(0, 128)
    photo = torch.tensor(photo_of)
    result: dict = {"photos": len(rows), "faces": len(embeddings), "faces_unnamed": unnamed}
    if not len(embeddings):
        return result
    to_taught = torch.cdist(embeddings, gallery.embeddings).min(1).values
    pairs = torch.cdist(embeddings, embeddings)
    different = photo[:, None] != photo[None, :]
    impostors = pairs[torch.triu(different, diagonal=1)]
    result["nearest_taught_distance_min"] = float(to_taught.min())
    for line in LINES:
        result[f"{line}"] = {
            "strangers_named": float((to_taught < line).float().mean()),
            "stranger_pairs_under_line": float((impostors < line).float().mean()),
        }
    result["impostor_pairs"] = len(impostors)
    result["impostor_quantiles"] = {
        q: float(impostors.quantile(float(q))) for q in ("0.001", "0.01", "0.05", "0.5")
    }
    return result


def timing(choice: RuntimeChoice, image: Image.Image, detector: FaceDetector) -> dict:
    faces = detector.detect(image)
    started = time.perf_counter()
    for _ in range(20):
        chips = align_faces(image, faces)
    out = {"align_ms_per_face": (time.perf_counter() - started) / 20 / len(faces) * 1000}
    networks = {"torch": TorchEmbedder(load_embedder(), torch.device("cpu"))}
    try:
        networks["openvino"] = OpenVINOEmbedder(load_embedder(), choice)
    except Exception as exc:  # no OpenVINO here
        out["openvino"] = f"unavailable: {exc}"
    for name, network in networks.items():
        for batch in (1, 8):
            x = chips.repeat(batch, 1, 1, 1)[:batch]
            network.run(x)
            started = time.perf_counter()
            for _ in range(10):
                network.run(x)
            out[f"{name}_batch{batch}_ms_per_face"] = (
                (time.perf_counter() - started) / 10 / batch * 1000
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "names_bench.json")
    args = parser.parse_args()
    choice = RuntimeChoice.resolve("cpu")
    detector, embedder = FaceDetector.load(choice), Embedder.load(choice)
    taught = {
        "Eileen": Image.fromarray(data.astronaut()),
        "Cameraman": Image.fromarray(data.camera()).convert("RGB"),
    }
    known = {n: faces_of(detector, embedder, im)[1] for n, im in taught.items()}
    people = face_photos.photos()
    for name, paths in (people or {}).items():  # every photo of these people is taught too
        known[name] = torch.cat([faces_of(detector, embedder, open_rgb(p))[1] for p in paths])
    gallery = gallery_of(known)
    coco = args.data / "coco-dev"
    stranger = Image.open(sorted(coco.glob("*.jpg"))[0]).convert("RGB") if coco.is_dir() else (
        Image.new("RGB", (320, 320), (120, 120, 120)))  # fmt: skip
    report = {
        "line": MATCH_DISTANCE,
        "identification": identification(detector, embedder, taught, gallery, stranger),
        "other_days": other_days(detector, embedder, people) if people else NO_FACE_PHOTOS,
        "strangers": strangers(detector, embedder, coco, gallery) if coco.is_dir() else None,
        "time": timing(choice, taught["Eileen"], detector),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items()}, indent=1)[:6000])


if __name__ == "__main__":
    main()
