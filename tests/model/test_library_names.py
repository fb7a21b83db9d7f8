"""phototag tag --names on: named faces as people|<name> keywords and MWG face regions (read back
with exiftool), a person's own regions kept, re-runs and --mode remove undo exactly ours; the
results rows' faces; --names needs --people."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageOps
from skimage import data

from model.library.cli import rows_of
from model.people import cli as people_cli
from tests.helpers import write_tiny_checkpoint
from tests.model.test_library import as_list, exiftool, tag

PERSON_REGION = """<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF
 xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""
 xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/"
 xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#">
 <mwg-rs:Regions rdf:parseType="Resource"><mwg-rs:RegionList><rdf:Bag>
  <rdf:li rdf:parseType="Resource"><mwg-rs:Name>Grandma</mwg-rs:Name>
   <mwg-rs:Type>Face</mwg-rs:Type><mwg-rs:Area rdf:parseType="Resource"><stArea:x>0.1</stArea:x>
   <stArea:y>0.1</stArea:y><stArea:w>0.05</stArea:w><stArea:h>0.05</stArea:h>
   <stArea:unit>normalized</stArea:unit></mwg-rs:Area></rdf:li>
 </rdf:Bag></mwg-rs:RegionList></mwg-rs:Regions>
</rdf:Description></rdf:RDF></x:xmpmeta>"""


def regions(meta: dict) -> list[dict]:
    return as_list(meta.get("XMP-mwg-rs:RegionInfo", {}).get("RegionList"))


@pytest.fixture
def taught(tmp_path: Path) -> Path:
    teacher = tmp_path / "teacher.png"
    Image.fromarray(data.astronaut()).save(teacher)
    names = tmp_path / "names"
    assert people_cli.main(["--names-dir", str(names), "add", "Eileen", str(teacher)]) == 0
    return names


def test_named_faces_become_keywords_and_mwg_regions(tmp_path, taught):
    photos = tmp_path / "photos"
    photos.mkdir()
    ImageOps.mirror(Image.fromarray(data.astronaut())).resize((400, 400)).save(photos / "e.jpg")
    Image.fromarray(data.camera()).save(photos / "stranger.jpg")
    (photos / "e.jpg.xmp").write_text(PERSON_REGION)
    first = write_tiny_checkpoint(tmp_path / "first.safetensors", seed=0)
    names = ["--names", "on", "--names-dir", taught, "--jpeg-reducing-gap", "0"]
    out = tmp_path / "out.jsonl"
    assert tag(photos, *names, "--out", out, checkpoint=first) == 0
    meta = exiftool(photos / "e.jpg.xmp")
    assert "auto|people|Eileen" in as_list(meta["XMP-lr:HierarchicalSubject"])
    found = {r["Name"]: r for r in regions(meta)}
    assert sorted(found) == ["Eileen", "Grandma"]
    eileen = found["Eileen"]
    assert eileen["Type"] == "Face" and eileen["Area"]["Unit"] == "normalized"
    # the flipped astronaut's face is right of centre, in the top half
    assert 0.5 < eileen["Area"]["X"] < 0.75 and 0.1 < eileen["Area"]["Y"] < 0.4
    assert 0.1 < eileen["Area"]["W"] < 0.3
    dims = meta["XMP-mwg-rs:RegionInfo"]["AppliedToDimensions"]
    assert (dims["W"], dims["H"], dims["Unit"]) == (400, 400, "pixel")
    stranger = exiftool(photos / "stranger.jpg.xmp")
    assert regions(stranger) == []
    assert not any("Eileen" in k for k in as_list(stranger.get("XMP-lr:HierarchicalSubject")))
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert [f["name"] for f in rows["e.jpg"]["faces"]] == ["Eileen"]
    assert [f["name"] for f in rows["stranger.jpg"]["faces"]] == [None]
    assert rows["e.jpg"]["dimensions"] == [400, 400]
    assert "embedding" not in out.read_text()
    # another model: ours replaced, not doubled; the person's region kept
    second = write_tiny_checkpoint(tmp_path / "second.safetensors", seed=1)
    assert tag(photos, *names, checkpoint=second) == 0
    assert sorted(r["Name"] for r in regions(exiftool(photos / "e.jpg.xmp"))) == [
        "Eileen",
        "Grandma",
    ]
    assert tag(photos, "--mode", "remove") == 0
    assert [r["Name"] for r in regions(exiftool(photos / "e.jpg.xmp"))] == ["Grandma"]


def test_names_need_people_tags(tmp_path, taught):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    assert tag(tmp_path, "--names", "on", "--people", "off", checkpoint=checkpoint) == 2
