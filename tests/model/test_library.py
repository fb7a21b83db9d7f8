"""``phototag tag``: photos found by their bytes, per-file errors, the server's tags, XMP sidecars
merged beside a person's keywords (as exiftool reads them), hostile sidecars left alone,
originals untouched, resume after kill -9, and the Ray engine's parity with the local one."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from model.library import xmp
from model.library.cli import main, rows_of
from tests.helpers import REPO, photo_bytes, wait_until, write_tiny_checkpoint

FAST = ["--device", "cpu", "--backend", "torch", "--autocast", "off", "--progress", "none"]
EXIFTOOL = shutil.which("exiftool")
# CI (.ci/run) installs exiftool and the [ray] extra and sets these: there a missing tool fails.
REQUIRE_EXIFTOOL = os.environ.get("PHOTOTAG_REQUIRE_EXIFTOOL") == "1"
REQUIRE_RAY = os.environ.get("PHOTOTAG_REQUIRE_RAY") == "1"


def tag(*args: object, checkpoint: Path | None = None) -> int:
    argv = [str(a) for a in args] + FAST
    if checkpoint is not None:
        argv += ["--checkpoint", str(checkpoint)]
    return main(argv)


def library(root: Path, count: int = 4) -> Path:
    """A small library: JPEGs in nested folders, a PNG and a HEIC under misleading names."""
    import model.imageio  # noqa: F401  (registers the HEIF writer)

    (root / "2024" / "summer").mkdir(parents=True)
    for i in range(count):
        color = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][i % 3]
        (root / "2024" / "summer" / f"IMG_{i:04d}.jpg").write_bytes(
            photo_bytes((64 + i, 48), color, seed=i)
        )
    (root / "2024" / "scan.txt").write_bytes(photo_bytes(fmt="PNG"))  # a PNG by its bytes
    (root / "phone.dat").write_bytes(photo_bytes(fmt="HEIF"))  # a HEIC by its bytes
    return root


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".xmp") and not p.name.startswith(".")
    }


def exiftool(path: Path) -> dict:
    if EXIFTOOL is None:
        if REQUIRE_EXIFTOOL:
            pytest.fail("exiftool is missing (apt-get install libimage-exiftool-perl)")
        pytest.skip("needs exiftool (apt-get install libimage-exiftool-perl)")
    out = subprocess.run(
        [EXIFTOOL, "-j", "-G1", "-struct", "-XMP:all", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)[0]


def as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


# ---- what is a photo, and what is not


def test_photos_are_found_by_their_bytes_and_the_rest_is_counted(tmp_path, tiny_checkpoint, capsys):
    lib = library(tmp_path / "lib")
    (lib / "notes.jpg").write_text("not a photo, whatever the name")
    (lib / "empty.jpg").write_bytes(b"")
    (lib / ".hidden.jpg").write_bytes(photo_bytes())
    (lib / "2024" / "loop").symlink_to(lib)  # a symlink loop: walked once
    out = tmp_path / "tags.jsonl"
    assert tag(lib, "--out", out, "--people", "off", checkpoint=tiny_checkpoint) == 0
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert set(rows) == {f"IMG_{i:04d}.jpg" for i in range(4)} | {"scan.txt", "phone.dat"}
    assert all(r["status"] == "tagged" and r["tags"] for r in rows.values())
    assert "2 files not photos" in capsys.readouterr().err


def test_corrupt_photos_are_listed_with_a_reason_and_the_run_goes_on(
    tmp_path, tiny_checkpoint, capsys
):
    lib = library(tmp_path / "lib", count=2)
    (lib / "cut.jpg").write_bytes(photo_bytes((200, 150))[:300])
    (lib / "bomb.png").write_bytes(photo_bytes((100, 100), fmt="PNG"))
    out = tmp_path / "tags.jsonl"
    code = tag(
        lib, "--out", out, "--max-pixels", "5000", "--people", "off", checkpoint=tiny_checkpoint
    )
    assert code == 0
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert rows["cut.jpg"]["status"] == "error"
    assert rows["cut.jpg"]["error"]["code"] == "invalid_image"
    assert rows["bomb.png"]["error"]["code"] == "image_too_large"
    assert rows["IMG_0000.jpg"]["status"] == "tagged"
    err = capsys.readouterr().err
    assert f"{lib / 'cut.jpg'}: invalid_image" in err and "2 could not be tagged" in err
    assert not (lib / "cut.jpg.xmp").exists()


# ---- the server's pipeline, exactly


def test_rows_equal_the_servers_answer_for_the_same_photos(
    tmp_path, default_checkpoint, client_for
):
    skimage_data = pytest.importorskip("skimage.data")
    lib = tmp_path / "lib"
    lib.mkdir()
    photos = {}
    for name in ("astronaut", "chelsea", "coffee"):  # people tags on the astronaut
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage_data, name)()).save(buffer, "JPEG", quality=90)
        photos[name] = buffer.getvalue()
        (lib / f"{name}.jpg").write_bytes(photos[name])
    out = tmp_path / "tags.jsonl"
    assert tag(lib, "--out", out, "--xmp", "none", checkpoint=default_checkpoint) == 0
    rows = {Path(r["path"]).stem: r for r in rows_of(out)}
    client = client_for(default_checkpoint)  # people on, as the library run
    for name, data in photos.items():
        answer = client.post("/v1/tags", files={"file": (name, data, "image/jpeg")}).json()
        served = answer["results"][0]["tags"]
        row = rows[name]
        assert row["model"] == answer["model"]
        assert [(t["label"], t["path"]) for t in row["tags"]] == [
            (t["label"], t["path"]) for t in served
        ]
        for ours, theirs in zip(row["tags"], served, strict=True):
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-6)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert ["people", "person"] in [t["path"] for t in rows["astronaut"]["tags"]]


# ---- XMP sidecars


USER_SIDECAR = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/" xmlns:digiKam="http://www.digikam.org/ns/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="5">
   <dc:subject><rdf:Bag><rdf:li>holiday</rdf:li><rdf:li>red</rdf:li></rdf:Bag></dc:subject>
   <lr:hierarchicalSubject><rdf:Bag><rdf:li>places|Paris</rdf:li></rdf:Bag></lr:hierarchicalSubject>
   <digiKam:TagsList><rdf:Seq><rdf:li>places/Paris</rdf:li></rdf:Seq></digiKam:TagsList>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def test_a_rerun_replaces_the_machine_tags_and_never_a_persons_keywords(tmp_path):
    photo = tmp_path / "IMG_1.jpg"
    photo.write_bytes(photo_bytes())
    sidecar = tmp_path / "IMG_1.xmp"  # Lightroom's name: updated, no second sidecar
    sidecar.write_text(USER_SIDECAR)
    first = write_tiny_checkpoint(tmp_path / "first.safetensors", seed=0)
    second = write_tiny_checkpoint(tmp_path / "second.safetensors", seed=1)
    for checkpoint in (first, second):
        assert tag(photo, "--top-k", "3", "--people", "off", checkpoint=checkpoint) == 0
    assert not (tmp_path / "IMG_1.jpg.xmp").exists()
    meta = exiftool(sidecar)
    assert meta["XMP-xmp:Rating"] == 5
    # "red" was the person's before it was a tag: kept, and never listed as the machine's
    assert sorted(as_list(meta["XMP-dc:Subject"])) == ["blue", "green", "holiday", "red"]
    assert sorted(as_list(meta["XMP-lr:HierarchicalSubject"])) == [
        "auto|blue",
        "auto|green",
        "auto|red",
        "places|Paris",
    ]
    assert as_list(meta["XMP-digiKam:TagsList"])[0] == "places/Paris"
    assert sorted(as_list(meta["XMP-digiKam:TagsList"])[1:]) == [
        "auto/blue",
        "auto/green",
        "auto/red",
    ]
    # second model's name and version
    assert "tiny" in meta["XMP-phototag:Model"]
    assert tag(photo, "--mode", "remove") == 0
    meta = exiftool(sidecar)
    assert sorted(as_list(meta["XMP-dc:Subject"])) == ["holiday", "red"]
    assert as_list(meta["XMP-lr:HierarchicalSubject"]) == ["places|Paris"]
    assert as_list(meta["XMP-digiKam:TagsList"]) == ["places/Paris"]
    assert meta["XMP-xmp:Rating"] == 5


def test_sidecar_fields_their_array_types_and_the_apps_readings_agree(tmp_path, tiny_checkpoint):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(photo_bytes())
    assert tag(photo, "--root", "phototag", "--people", "off", checkpoint=tiny_checkpoint) == 0
    sidecar = tmp_path / "a.jpg.xmp"
    text = sidecar.read_text()
    for field, array in (
        ("dc:subject", "Bag"),
        ("lr:hierarchicalSubject", "Bag"),
        ("digiKam:TagsList", "Seq"),
    ):
        start = text.index(f"<{field}>")
        assert text[start:].split(">", 2)[1].strip().startswith(f"<rdf:{array}")
    meta = exiftool(sidecar)
    lightroom = {tuple(k.split("|")) for k in as_list(meta["XMP-lr:HierarchicalSubject"])}
    digikam = {tuple(k.split("/")) for k in as_list(meta["XMP-digiKam:TagsList"])}
    assert lightroom == digikam  # Lightroom and darktable read the one, digiKam the other
    assert all(path[0] == "phototag" for path in lightroom)
    flat = set(as_list(meta["XMP-dc:Subject"]))
    assert flat == {part for path in lightroom for part in path[1:]}


def test_a_new_model_rewrites_the_tags_and_a_second_run_has_nothing_to_do(
    tmp_path, tiny_checkpoint, capsys
):
    lib = library(tmp_path / "lib", count=2)
    assert tag(lib, "--people", "off", checkpoint=tiny_checkpoint) == 0
    assert tag(lib, "--people", "off", checkpoint=tiny_checkpoint) == 0
    assert "0 tagged" in capsys.readouterr().err.splitlines()[-1]
    assert (lib / ".phototag-journal.jsonl").exists()
    assert tag(lib, "--people", "off", "--top-k", "1", checkpoint=tiny_checkpoint) == 0
    assert "4 tagged" in capsys.readouterr().err.splitlines()[-1]
    sidecar = (lib / "phone.dat.xmp").read_text()
    assert sidecar.count("<rdf:li>auto|") == 1


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
<dc:subject><rdf:Bag><rdf:li>&lol9;</rdf:li></rdf:Bag></dc:subject></rdf:Description></rdf:RDF>
</x:xmpmeta>"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
<dc:subject><rdf:Bag><rdf:li>&secret;</rdf:li></rdf:Bag></dc:subject></rdf:Description></rdf:RDF>
</x:xmpmeta>"""
HOSTILE = {
    "laughs": (BILLION_LAUGHS.encode(), "xmp_hostile"),
    "external": (EXTERNAL_ENTITY.encode(), "xmp_hostile"),
    "malformed": (b"<x:xmpmeta><rdf:RDF>no end", "xmp_malformed"),
    "huge": (b"<x:xmpmeta>" + b" " * (xmp.MAX_PACKET_BYTES + 1) + b"</x:xmpmeta>", "xmp_too_large"),
}


def test_hostile_malformed_or_huge_sidecars_are_reported_and_left_untouched(
    tmp_path, tiny_checkpoint, capsys
):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name, (content, _) in HOSTILE.items():
        (lib / f"{name}.jpg").write_bytes(photo_bytes())
        (lib / f"{name}.jpg.xmp").write_bytes(content)
    (lib / "fine.jpg").write_bytes(photo_bytes())
    out = tmp_path / "tags.jsonl"
    assert tag(lib, "--out", out, "--people", "off", checkpoint=tiny_checkpoint) == 0
    rows = {Path(r["path"]).stem: r for r in rows_of(out)}
    for name, (content, code) in HOSTILE.items():
        assert (lib / f"{name}.jpg.xmp").read_bytes() == content
        assert rows[name]["xmp"]["error"]["code"] == code
        assert rows[name]["status"] == "tagged"  # the tags are in --out all the same
    assert rows["fine"]["xmp"]["action"] == "created"
    err = capsys.readouterr().err
    assert "4 XMP left untouched" in err and "root:" not in err


def test_originals_are_never_modified_unless_embedding_is_asked_for(tmp_path, tiny_checkpoint):
    lib = library(tmp_path / "lib")
    before = digests(lib)
    assert tag(lib, "--people", "off", checkpoint=tiny_checkpoint) == 0
    assert tag(lib, "--people", "off", "--mode", "all", checkpoint=tiny_checkpoint) == 0
    assert tag(lib, "--mode", "remove") == 0
    assert digests(lib) == before
    assert not list(lib.rglob("*.xmp"))  # sidecars only phototag wrote are gone again


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "HEIF"])
def test_embed_writes_the_keywords_into_the_photo_and_keeps_its_pixels(
    tmp_path, tiny_checkpoint, fmt
):
    import model.imageio  # noqa: F401  (HEIF)

    if fmt == "HEIF" and EXIFTOOL is None:
        pytest.skip("embedding in HEIC needs exiftool")
    photo = tmp_path / f"photo.{fmt.lower()}"
    photo.write_bytes(photo_bytes((64, 48), fmt=fmt))
    with Image.open(photo) as image:
        pixels = image.convert("RGB").tobytes()
    assert tag(photo, "--xmp", "embed", "--people", "off", checkpoint=tiny_checkpoint) == 0
    assert not list(tmp_path.glob("*.xmp"))
    with Image.open(photo) as image:
        assert image.convert("RGB").tobytes() == pixels
    meta = exiftool(photo)
    assert sorted(as_list(meta["XMP-dc:Subject"])) == ["blue", "green", "red"]
    assert tag(photo, "--xmp", "embed", "--mode", "remove") == 0
    assert "XMP-dc:Subject" not in exiftool(photo)


# ---- outputs


def test_parquet_and_json_lines_hold_the_same_rows(tmp_path, tiny_checkpoint):
    pytest.importorskip("pyarrow")
    lib = library(tmp_path / "lib", count=2)
    jsonl, parquet = tmp_path / "t.jsonl", tmp_path / "t.parquet"
    assert (
        tag(lib, "--out", jsonl, "--xmp", "none", "--people", "off", checkpoint=tiny_checkpoint)
        == 0
    )
    assert (
        tag(lib, "--out", parquet, "--xmp", "none", "--people", "off", checkpoint=tiny_checkpoint)
        == 0
    )
    assert list(rows_of(jsonl)) == list(rows_of(parquet))
    row = next(rows_of(parquet))
    assert set(row) == {
        "path",
        "size",
        "mtime",
        "mtime_ns",
        "sha256",
        "status",
        "model",
        "tags",
        "error",
        "xmp",
    }


def test_usage_and_configuration_errors_exit_2(tmp_path, capsys):
    assert main([str(tmp_path), "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--mode", "sometimes", str(tmp_path)])
    assert exit_.value.code == 2


# Runs `phototag tag` in a fresh process where the Exempi library cannot be found (as on a fresh
# Debian without libexempi8, or macOS without `brew install exempi`)
WITHOUT_EXEMPI = """
import ctypes.util, sys
find = ctypes.util.find_library
ctypes.util.find_library = lambda name: None if name == "exempi" else find(name)
from model.library.cli import main
sys.exit(main(sys.argv[1:]))
"""


def tag_without_exempi(*args: object) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", WITHOUT_EXEMPI, *map(str, args), *FAST]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_without_exempi_xmp_is_one_line_saying_what_to_install(tmp_path, tiny_checkpoint):
    done = tag_without_exempi(library(tmp_path / "lib"), "--checkpoint", tiny_checkpoint)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert "Traceback" not in done.stderr
    for advice in ("apt-get install libexempi8", "brew install exempi", "--xmp none"):
        assert advice in done.stderr


def test_without_exempi_xmp_none_still_tags(tmp_path, tiny_checkpoint):
    out = tmp_path / "rows.jsonl"
    root = library(tmp_path / "lib")
    done = tag_without_exempi(root, "--xmp", "none", "--out", out, "--checkpoint", tiny_checkpoint)
    assert done.returncode == 0, done.stderr
    rows = list(rows_of(out))
    assert len(rows) == 6 and all(r["status"] == "tagged" for r in rows)
    assert not list(root.rglob("*.xmp"))


# ---- resume: exactly once after kill -9


def comparable(out: Path, root: Path) -> list[dict]:
    """Rows without what differs between two copies of a library (its place, whether the sidecar
    was created or rewritten by a resumed run)."""
    rows = []
    for row in rows_of(out):
        row["path"] = str(Path(row["path"]).relative_to(root))
        row["xmp"] = {"path": str(Path(row["xmp"]["path"]).relative_to(root))}
        rows.append(row)
    return rows


def sidecars(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.xmp"))}


@pytest.mark.slow
def test_killed_at_random_points_then_finished_equals_an_uninterrupted_run(
    tmp_path, tiny_checkpoint
):
    def build(root: Path) -> Path:
        root.mkdir()
        for i in range(120):
            (root / f"{i // 40}").mkdir(exist_ok=True)
            size = (640 + i, 480)
            (root / f"{i // 40}" / f"{i:03d}.jpg").write_bytes(photo_bytes(size, seed=i))
        return root

    def command(root: Path, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "app.cli",
            "tag",
            str(root),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--batch-size",
            "2",
            "--people",
            "off",
            *FAST,
        ]

    calm, killed = build(tmp_path / "calm"), build(tmp_path / "killed")
    for root in (calm, killed):  # same mtimes: same rows
        for src, dst in zip(sorted(calm.rglob("*.jpg")), sorted(root.rglob("*.jpg")), strict=True):
            os.utime(dst, ns=(src.stat().st_mtime_ns, src.stat().st_mtime_ns))
    subprocess.run(command(calm, tmp_path / "calm.jsonl"), cwd=REPO, check=True, timeout=300)
    rng = random.Random(13)
    journal = tmp_path / "killed.jsonl.journal"
    kills = 0
    for attempt in range(6):
        process = subprocess.Popen(
            command(killed, tmp_path / "killed.jsonl"), cwd=REPO, stderr=subprocess.DEVNULL
        )
        lines = journal.read_text().count("\n") if journal.exists() else 0

        # wait until this run is recording, then kill it a random moment later
        def recording(process=process, before=lines) -> bool:
            count = journal.read_text().count("\n") if journal.exists() else 0
            return process.poll() is not None or count > before + 1

        wait_until(recording, 120, "recording")
        time.sleep(rng.uniform(0, 0.4))
        if process.poll() is not None:
            break  # finished before the kill
        (process.send_signal(signal.SIGINT) if attempt == 2 else process.kill())
        process.wait(timeout=60)
        kills += 1
    assert kills >= 3
    subprocess.run(command(killed, tmp_path / "killed.jsonl"), cwd=REPO, check=True, timeout=300)
    assert comparable(tmp_path / "killed.jsonl", killed) == comparable(
        tmp_path / "calm.jsonl", calm
    )
    assert sidecars(killed) == sidecars(calm)
    assert not [p for p in killed.rglob(".*") if p.name.endswith(".tmp")]  # no half files


# ---- Ray: the same class on Ray Data


@pytest.mark.slow
def test_the_ray_engine_gives_the_local_engines_rows(tmp_path, tiny_checkpoint):
    try:
        import ray
    except ImportError:
        if REQUIRE_RAY:
            pytest.fail("ray is missing: pip install -e '.[ray]'")
        pytest.skip("needs ray: pip install -e '.[ray]'")
    lib = library(tmp_path / "lib", count=6)
    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    common = ["--xmp", "none", "--people", "off", "--batch-size", "4"]
    assert tag(lib, "--out", local, *common, checkpoint=tiny_checkpoint) == 0
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        code = tag(
            lib,
            "--out",
            distributed,
            *common,
            "--engine",
            "ray",
            "--workers",
            "1",
            checkpoint=tiny_checkpoint,
        )
    finally:
        ray.shutdown()
    assert code == 0
    ours, theirs = list(rows_of(local)), list(rows_of(distributed))
    assert len(ours) == 8
    for a, b in zip(ours, theirs, strict=True):
        for t, u in zip(a.pop("tags"), b.pop("tags"), strict=True):
            assert (t["label"], t["path"]) == (u["label"], u["path"])
            assert t["probability"] == pytest.approx(u["probability"], abs=1e-6)
        assert a == b


# ---- --server: the same rows through a running server


def test_server_mode_posts_the_photos_and_gets_the_local_rows(tmp_path, tiny_checkpoint):
    import socket
    import threading

    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(
        checkpoint=tiny_checkpoint, device="cpu", backend="torch", autocast="off", people="off"
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, "the server started")
        lib = library(tmp_path / "lib", count=3)
        (lib / "cut.jpg").write_bytes(photo_bytes((200, 150))[:300])
        local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
        common = ["--xmp", "none", "--batch-size", "2"]
        assert tag(lib, "--out", local, "--people", "off", *common, checkpoint=tiny_checkpoint) == 0
        assert (
            main(
                [
                    str(lib),
                    "--out",
                    str(remote),
                    "--server",
                    f"http://127.0.0.1:{port}",
                    "--progress",
                    "none",
                    *common,
                ]
            )
            == 0
        )
    finally:
        server.should_exit = True
        thread.join(30)
    ours, theirs = list(rows_of(local)), list(rows_of(remote))
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs, strict=True):
        for t, u in zip(a.pop("tags"), b.pop("tags"), strict=True):
            assert (t["label"], t["path"]) == (u["label"], u["path"])
            assert t["probability"] == pytest.approx(u["probability"], abs=1e-6)
        if a["error"]:  # the server names the upload in its message
            assert a.pop("error")["code"] == b.pop("error")["code"]
        assert a == b


def test_custom_tags_taught_for_the_checkpoint_come_out_of_the_library_run(tmp_path):
    """phototag teach keeps tags in custom-tags/ beside the checkpoint, where the server reads
    them: phototag tag reads them there too, and a newly taught tag makes photos new again."""
    from model.library.cli import main
    from model.teach import main as teach
    from tests.helpers import COLORS, photo_bytes, write_photo_folder, write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "models" / "tiny.safetensors")
    reds = write_photo_folder(tmp_path / "teach", per_class=6, classes={"red": COLORS["red"]})
    blues = write_photo_folder(tmp_path / "not", per_class=6, classes={"blue": COLORS["blue"]})
    library = tmp_path / "library"
    library.mkdir()
    (library / "a.jpg").write_bytes(photo_bytes((48, 40), COLORS["red"], seed=99))
    out = tmp_path / "tags.jsonl"
    common = ["--checkpoint", str(checkpoint), "--xmp", "none", "--people", "off", "--out"]
    assert main([str(library), *common, str(out), "--threshold", "0"]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(tag["path"][0] != "custom" for tag in first[0]["tags"])
    assert teach([
        "reddish", "--checkpoint", str(checkpoint), "--positive", str(reds / "red"),
        "--negative", str(blues / "blue"),
    ]) == 0  # fmt: skip
    assert main([str(library), *common, str(out), "--threshold", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    assert ["custom", "reddish"] in [tag["path"] for tag in rows[0]["tags"]]
    assert rows[0]["model"]["id"] == "tiny"


def test_explain_writes_each_photos_top_tag_heatmap_for_a_review(tmp_path):
    from PIL import Image

    from model.library.cli import main
    from tests.helpers import photo_bytes, write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    library = tmp_path / "library"
    library.mkdir()
    (library / "a.jpg").write_bytes(photo_bytes((96, 64), seed=1))
    (library / "b.png").write_bytes(photo_bytes((50, 70), fmt="PNG", seed=2))
    review = tmp_path / "review"
    args = [str(library), "--checkpoint", str(checkpoint), "--xmp", "none", "--people", "off"]
    assert main([*args, "--out", str(tmp_path / "t.jsonl"), "--explain", str(review)]) == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, (tmp_path / "t.jsonl").open())}
    pictures = sorted(review.iterdir())
    assert len(pictures) == 2
    for picture in pictures:
        name = picture.name.split("-", 1)[1]  # <sha prefix>-<photo name>.<tag>.png
        photo = next(n for n in rows if name.startswith(n + "."))
        assert name == f"{photo}.{rows[photo]['tags'][0]['label']}.png"
        with Image.open(picture) as overlay, Image.open(library / photo) as original:
            assert overlay.size == original.size
    remote = [str(library), "--server", "http://127.0.0.1:9", "--explain", str(review)]
    assert main([*remote, "--xmp", "none", "--out", str(tmp_path / "r.jsonl")]) == 2


# ---- keywords in the user's language (--lang)


def animals_checkpoint(path: Path) -> Path:
    """The tiny classes as three tags of the shipped vocabulary, which the label files know."""
    from model.vocabulary import Vocabulary
    from tests.helpers import TINY_CLASSES

    paths = {"red": "animal/cat", "green": "animal/dog", "blue": "food/fruit/banana"}
    vocabulary = Vocabulary.from_paths(paths, TINY_CLASSES).to_dict()
    return write_tiny_checkpoint(path, vocabulary=vocabulary)


def test_keywords_written_in_german_read_back_with_exiftool_and_another_language_rewrites_them(
    tmp_path, capsys
):
    checkpoint = animals_checkpoint(tmp_path / "animals.safetensors")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "IMG_1.jpg").write_bytes(photo_bytes())
    sidecar = lib / "IMG_1.jpg.xmp"
    out = tmp_path / "tags.jsonl"
    every = ["--threshold", "0", "--people", "off", "--out", out]  # all three leaves
    assert tag(lib, "--lang", "de", *every, checkpoint=checkpoint) == 0
    meta = exiftool(sidecar)
    assert sorted(as_list(meta["XMP-lr:HierarchicalSubject"])) == [
        "auto|Essen|Obst|Banane",
        "auto|Tier|Hund",
        "auto|Tier|Katze",
    ]
    assert sorted(as_list(meta["XMP-digiKam:TagsList"])) == [
        "auto/Essen/Obst/Banane",
        "auto/Tier/Hund",
        "auto/Tier/Katze",
    ]
    assert sorted(as_list(meta["XMP-dc:Subject"])) == sorted(
        ["Tier", "Katze", "Hund", "Essen", "Obst", "Banane"]
    )
    [row] = rows_of(out)
    cat = next(t for t in row["tags"] if t["path"] == ["animal", "cat"])  # the id: English
    assert cat["label"] == "Katze" and cat["path_labels"] == ["Tier", "Katze"]

    # the language is part of what a photo was tagged for: French makes it new again
    capsys.readouterr()
    assert tag(lib, "--lang", "fr", *every, checkpoint=checkpoint) == 0
    assert "1 tagged" in capsys.readouterr().err.splitlines()[-1]
    meta = exiftool(sidecar)
    assert "auto|animal|chat" in as_list(meta["XMP-lr:HierarchicalSubject"])
    assert not {"Tier", "Katze"} & set(as_list(meta["XMP-dc:Subject"]))  # German is gone
    assert tag(lib, "--lang", "fr", *every, checkpoint=checkpoint) == 0
    assert "0 tagged" in capsys.readouterr().err.splitlines()[-1]

    # and English, the default, is as before languages: the path's own words
    assert tag(lib, *every, checkpoint=checkpoint) == 0
    assert "auto|animal|cat" in as_list(exiftool(sidecar)["XMP-lr:HierarchicalSubject"])
    [row] = rows_of(out)
    assert all(t["label"] == t["path"][-1] and t["path_labels"] == t["path"] for t in row["tags"])


def test_lang_defaults_to_phototag_lang_and_an_unknown_one_is_a_usage_error(
    tmp_path, monkeypatch, capsys
):
    checkpoint = animals_checkpoint(tmp_path / "animals.safetensors")
    photo = tmp_path / "a.jpg"
    photo.write_bytes(photo_bytes())
    out = tmp_path / "tags.parquet"
    monkeypatch.setenv("PHOTOTAG_LANG", "ja")
    args = ["--xmp", "none", "--threshold", "0", "--people", "off", "--out", out]
    assert tag(photo, *args, checkpoint=checkpoint) == 0
    [row] = rows_of(out)  # Parquet: the labels have their column
    cat = next(t for t in row["tags"] if t["path"] == ["animal", "cat"])
    assert (cat["label"], cat["path_labels"]) == ("猫", ["動物", "猫"])
    assert tag(photo, *args, "--lang", "tlh", checkpoint=checkpoint) == 2
    assert "--lang tlh: no labels in that language; use one of en, de," in capsys.readouterr().err
    bad = tmp_path / "labels"
    bad.mkdir()
    (bad / "de.json").write_text("{")
    assert tag(photo, *args, "--labels-dir", bad, checkpoint=checkpoint) == 2
    assert f"--labels-dir: {bad / 'de.json'}: not JSON" in capsys.readouterr().err
