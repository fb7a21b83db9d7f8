"""Real photos of one person taken on different days, to measure naming people with.

    python tools/face_photos.py        # once: fetches them into build/face-photos/ (make test does)

They are the test photos of face_recognition's source package on PyPI (``face-recognition``
1.3.0, MIT, Adam Geitgey; fetched with pip from the package index, which checks its hash before
anything of it runs): three photos of Barack Obama from three occasions (a speech to Congress in
2009, a portrait sitting in 2012, an announcement in the White House's Blue Room in 2010) and
one of Joe Biden (a crop of the 2010 photo, as its EXIF says). The photos are official White
House photographs by Pete Souza, whose EXIF states their own terms: they are read where they
are, for measuring only, and never copied into the repo, a test fixture or an image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "build" / "face-photos"
PACKAGE = "face-recognition==1.3.0"
SDIST = "face_recognition-1.3.0.tar.gz"
SHA256 = "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"
MEMBERS = "face_recognition-1.3.0/tests/test_images/"
LICENCE = "face_recognition-1.3.0/LICENSE"
# each person's photos, one occasion each; the test teaches from the first
PEOPLE = {"Obama": ("obama2.jpg", "obama.jpg", "obama3.jpg"), "Biden": ("biden.jpg",)}


def photos(folder: Path = FOLDER) -> dict[str, list[Path]] | None:
    """Each person's photo files, or None where they have not been fetched."""
    people = {name: [folder / f for f in files] for name, files in PEOPLE.items()}
    if not all(p.is_file() for paths in people.values() for p in paths):
        return None
    return people


def fetch(folder: Path = FOLDER) -> Path:
    """Fetch the photos into ``folder`` (nothing to do when they are there); raises
    RuntimeError when the package cannot be fetched or is not the one expected."""
    if photos(folder) is not None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # staged beside the folder, so that it appears whole, by one rename, or not at all
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        requirement = Path(scratch) / "requirement.txt"
        requirement.write_text(f"{PACKAGE} --hash=sha256:{SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--requirement", str(requirement)]
        command += ["--no-deps", "--no-binary", ":all:", "--quiet", "--dest", scratch]
        done = subprocess.run(command, capture_output=True, text=True)
        sdist = Path(scratch) / SDIST
        if done.returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"pip could not fetch {PACKAGE}: {done.stderr.strip()[-400:]}")
        staged = Path(scratch) / "photos"
        staged.mkdir()
        wanted = {MEMBERS + f for files in PEOPLE.values() for f in files} | {LICENCE}
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if member.name in wanted and member.isfile():
                    (staged / Path(member.name).name).write_bytes(
                        archive.extractfile(member).read()
                    )
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier fetch
        os.replace(staged, folder)
    return folder


def main() -> int:
    try:
        print(fetch())
    except RuntimeError as error:
        print(f"face photos not fetched: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
