"""Tags into XMP, where the photo apps read keywords: sidecars (``photo.jpg.xmp``) by default,
the photo file itself only when asked (``--xmp embed``).

One tag ``animal/cat`` (under the machine root, default ``auto``) is written three ways, for the
apps that read each:

- ``dc:subject`` (Bag): the flat keywords ``animal`` and ``cat``, every app;
- ``lr:hierarchicalSubject`` (Bag): ``auto|animal|cat``, Lightroom and darktable;
- ``digiKam:TagsList`` (Seq): ``auto/animal/cat``, digiKam and Immich.

A named face (``phototag tag --names on``: path ``people/Alice``) is a keyword like any tag
(``auto|people|Alice``) and also an MWG face region (``mwg-rs:Regions``: ``RegionList`` items
with ``Name``, ``Type`` Face and the normalised centre and size ``Area``, and
``AppliedToDimensions``), which Lightroom, digiKam, darktable and Immich read as people. The
regions this module wrote are listed in ``phototag:regions`` and replaced on a re-run; a
person's own regions are kept.

Which entries are the machine's: hierarchical ones under the root, and the flat keywords this
module added, listed in ``phototag:keywords`` (a flat keyword a person already had is never
added, so never listed, so never removed). A re-run removes exactly those and writes the new
model's; every other property and keyword is kept as it was.

The XMP is parsed and written by Exempi (python-xmp-toolkit, BSD, over libexempi: no GPL code
linked). Before Exempi sees an existing packet, :func:`check_packet` refuses one that is too
large, malformed, or declares a DTD or entities (billion laughs, external entities): such a file
is reported and left untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring

from model.checkpoint import atomic_write_bytes
from model.errors import CodedError

NS_DC = "http://purl.org/dc/elements/1.1/"
NS_LR = "http://ns.adobe.com/lightroom/1.0/"
NS_DIGIKAM = "http://www.digikam.org/ns/1.0/"
NS_PHOTOTAG = "urn:phototag:xmp:1.0/"  # what this module wrote, to undo exactly that
NS_MWG_RS = "http://www.metadataworkinggroup.com/schemas/regions/"
NS_ST_AREA = "http://ns.adobe.com/xmp/sType/Area#"
NS_ST_DIM = "http://ns.adobe.com/xap/1.0/sType/Dimensions#"
REGION_LIST = "Regions/mwg-rs:RegionList"

MAX_PACKET_BYTES = 4 * 1024 * 1024  # a sidecar of keywords and edits is kilobytes
DEFAULT_ROOT = "auto"


class XmpError(CodedError):
    """An XMP file or packet left untouched. ``code``: ``xmp_too_large``, ``xmp_hostile``,
    ``xmp_malformed``, ``xmp_unwritable``, ``embed_unsupported``."""


@dataclass(frozen=True)
class FaceRegion:
    """A named face as an MWG region: its centre and size as fractions of the photo's."""

    name: str
    x: float  # centre, 0 (left) .. 1
    y: float  # centre, 0 (top) .. 1
    w: float
    h: float

    @classmethod
    def of(cls, name: str, box: Sequence[float], size: Sequence[int]) -> FaceRegion:
        """A face's box (x0, y0, x1, y1 in pixels) on a photo of ``size`` (width, height)."""
        (x0, y0, x1, y1), (width, height) = box, size
        return cls(name, (x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                   (x1 - x0) / width, (y1 - y0) / height)  # fmt: skip

    @property
    def key(self) -> str:
        """How ``phototag:regions`` recognises a region this module wrote."""
        return f"{self.name} {self.x:.4f} {self.y:.4f} {self.w:.4f} {self.h:.4f}"


@dataclass(frozen=True)
class MachineTags:
    """One photo's tags as the three XMP keyword fields write them, and its named faces."""

    flat: tuple[str, ...]  # dc:subject
    lightroom: tuple[str, ...]  # lr:hierarchicalSubject, "|"-separated, under the root
    digikam: tuple[str, ...]  # digiKam:TagsList, "/"-separated, under the root
    model: str  # "name version", for a person reading the file
    regions: tuple[FaceRegion, ...] = ()  # mwg-rs:RegionList
    dimensions: tuple[int, int] | None = None  # (width, height) the regions apply to


def machine_tags(
    paths: Iterable[Sequence[str]],
    root: str,
    model: str,
    regions: Sequence[FaceRegion] = (),
    dimensions: tuple[int, int] | None = None,
) -> MachineTags:
    """Tag paths (``("animal", "cat")``) -> the keywords to write, each once, in order; with
    the named faces' ``regions`` on a photo of ``dimensions``."""
    flat: dict[str, None] = {}
    lightroom: dict[str, None] = {}
    digikam: dict[str, None] = {}
    for path in paths:
        parts = [p.strip() for p in path if p.strip()]
        flat.update(dict.fromkeys(parts))
        lightroom["|".join([root, *(p.replace("|", " ") for p in parts)])] = None
        digikam["/".join([root, *(p.replace("/", " ") for p in parts)])] = None
    return MachineTags(
        tuple(flat), tuple(lightroom), tuple(digikam), model, tuple(regions), dimensions
    )


def _xmp():  # Exempi is loaded on first use: the server never needs it
    try:
        import libxmp
        from libxmp import XMPMeta

        # python-xmp-toolkit loads the Exempi library on the first call into it (older
        # releases at import): this call is where a missing library shows
        XMPMeta.register_namespace(NS_LR, "lr")
    except Exception as exc:  # ImportError, or libxmp's ExempiLoadError
        raise RuntimeError(
            f"XMP needs the Exempi library ({exc}): apt-get install libexempi8 (Debian, "
            "Ubuntu), brew install exempi (macOS), or use --xmp none with --out"
        ) from None
    XMPMeta.register_namespace(NS_DIGIKAM, "digiKam")
    XMPMeta.register_namespace(NS_PHOTOTAG, "phototag")
    XMPMeta.register_namespace(NS_MWG_RS, "mwg-rs")
    XMPMeta.register_namespace(NS_ST_AREA, "stArea")
    XMPMeta.register_namespace(NS_ST_DIM, "stDim")
    return libxmp


# ---- packets


def available() -> None:
    """Raises RuntimeError, saying what to install, where Exempi cannot be loaded."""
    _xmp()


def check_packet(data: bytes, what: str) -> str:
    """An existing XMP packet, refused before any XMP parser sees it when it is over
    :data:`MAX_PACKET_BYTES`, declares a DTD or entities, or is not well-formed XML."""
    if len(data) > MAX_PACKET_BYTES:
        raise XmpError(
            "xmp_too_large",
            f"{what} is {len(data)} bytes, over the {MAX_PACKET_BYTES} a keyword file needs; "
            "left untouched",
        )
    try:
        defused_fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise XmpError(
            "xmp_hostile", f"{what} declares a DTD or entities ({type(exc).__name__}); untouched"
        ) from None
    except (ParseError, ValueError) as exc:
        raise XmpError(
            "xmp_malformed", f"{what} is not well-formed XML ({exc}); untouched"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise XmpError("xmp_malformed", f"{what} is not UTF-8; untouched") from None


def parse(text: str | None, what: str):
    """A checked packet (or None) -> an ``XMPMeta``."""
    libxmp = _xmp()
    meta = libxmp.XMPMeta()
    if text:
        try:
            ok = meta.parse_from_str(text, xmpmeta_wrap=False)
        except libxmp.XMPError as exc:
            raise XmpError("xmp_malformed", f"{what} is not valid XMP ({exc}); untouched") from None
        if ok is False:
            raise XmpError("xmp_malformed", f"{what} is not valid XMP; untouched")
    return meta


def _items(meta, ns: str, name: str) -> list[str]:
    if not meta.does_property_exist(ns, name):
        return []
    count = meta.count_array_items(ns, name)
    return [meta.get_array_item(ns, name, i) for i in range(1, count + 1)]


def _set_items(meta, ns: str, name: str, values: Sequence[str], ordered: bool) -> None:
    if meta.does_property_exist(ns, name):
        meta.delete_property(ns, name)
    option = "prop_array_is_ordered" if ordered else "prop_array_is_unordered"
    for value in values:
        meta.append_array_item(ns, name, value, {"prop_value_is_array": True, option: True})


def _set_or_delete(meta, name: str, value: str | None) -> None:
    if value:
        meta.set_property(NS_PHOTOTAG, name, value)
    elif meta.does_property_exist(NS_PHOTOTAG, name):
        meta.delete_property(NS_PHOTOTAG, name)


def merge(meta, tags: MachineTags | None, root: str) -> None:
    """Remove the machine tags an earlier run wrote (under its root, or ``root``), then add
    ``tags`` (None: only remove). Everything else in ``meta`` stays as it was."""
    old_root = meta.get_property(NS_PHOTOTAG, "root") if _has(meta, "root") else root
    roots = {root, old_root}
    added_before = set(_items(meta, NS_PHOTOTAG, "keywords"))
    regions_before = set(_items(meta, NS_PHOTOTAG, "regions"))
    # everything of ours goes first and is set again last, in one order: a file is the same
    # however often it was rewritten (a resumed run rewrites what a killed one had written)
    for name in ("keywords", "root", "model"):
        _set_or_delete(meta, name, None)
    flat = [k for k in _items(meta, NS_DC, "subject") if k not in added_before]
    lightroom = [k for k in _items(meta, NS_LR, "hierarchicalSubject") if not _under(k, roots, "|")]
    digikam = [k for k in _items(meta, NS_DIGIKAM, "TagsList") if not _under(k, roots, "/")]
    added: list[str] = []
    if tags is not None:
        added = [k for k in tags.flat if k not in flat]
        flat += added
        lightroom += tags.lightroom
        digikam += tags.digikam
    _set_items(meta, NS_DC, "subject", flat, ordered=False)
    _set_items(meta, NS_LR, "hierarchicalSubject", lightroom, ordered=False)
    _set_items(meta, NS_DIGIKAM, "TagsList", digikam, ordered=True)
    _set_items(meta, NS_PHOTOTAG, "keywords", added, ordered=False)
    regions = tags.regions if tags is not None else ()
    _merge_regions(meta, regions_before, regions, tags.dimensions if tags is not None else None)
    _set_items(meta, NS_PHOTOTAG, "regions", [r.key for r in regions], ordered=False)
    _set_or_delete(meta, "root", root if tags is not None else None)
    _set_or_delete(meta, "model", tags.model if tags is not None else None)


def _merge_regions(
    meta, ours_before: set[str], regions: Sequence[FaceRegion], dimensions: tuple[int, int] | None
) -> None:
    """Remove the face regions an earlier run wrote (their keys in ``ours_before``), then add
    ``regions``; a person's regions, and every other field of the regions, stay."""
    count = meta.count_array_items(NS_MWG_RS, REGION_LIST) if _has_regions(meta) else 0
    for i in range(count, 0, -1):  # from the end: deleting shifts the later items
        if _region_key(meta, i) in ours_before:
            meta.delete_property(NS_MWG_RS, f"{REGION_LIST}[{i}]")
    if regions and dimensions is not None:
        dims = "Regions/mwg-rs:AppliedToDimensions"
        if not meta.does_property_exist(NS_MWG_RS, dims):
            for field, value in zip(("w", "h", "unit"), (*dimensions, "pixel"), strict=True):
                meta.set_property(NS_MWG_RS, f"{dims}/stDim:{field}", str(value))
    for region in regions if dimensions is not None else ():
        meta.append_array_item(
            NS_MWG_RS,
            REGION_LIST,
            None,
            {"prop_value_is_array": True, "prop_array_is_unordered": True},
            prop_value_is_struct=True,
        )
        item = f"{REGION_LIST}[{meta.count_array_items(NS_MWG_RS, REGION_LIST)}]"
        meta.set_property(NS_MWG_RS, f"{item}/mwg-rs:Name", region.name)
        meta.set_property(NS_MWG_RS, f"{item}/mwg-rs:Type", "Face")
        area = {"x": region.x, "y": region.y, "w": region.w, "h": region.h}
        for field, value in area.items():
            meta.set_property(NS_MWG_RS, f"{item}/mwg-rs:Area/stArea:{field}", f"{value:.6f}")
        meta.set_property(NS_MWG_RS, f"{item}/mwg-rs:Area/stArea:unit", "normalized")
    if _has_regions(meta) and not meta.count_array_items(NS_MWG_RS, REGION_LIST):
        meta.delete_property(NS_MWG_RS, "Regions")  # no region left: nothing they apply to


def _has_regions(meta) -> bool:
    return meta.does_property_exist(NS_MWG_RS, REGION_LIST)


def _region_key(meta, index: int) -> str | None:
    """The :attr:`FaceRegion.key` of a RegionList item, None where it is no such face."""
    item = f"{REGION_LIST}[{index}]"

    def get(path: str) -> str | None:
        exists = meta.does_property_exist(NS_MWG_RS, f"{item}/{path}")
        return meta.get_property(NS_MWG_RS, f"{item}/{path}") if exists else None

    area = [get(f"mwg-rs:Area/stArea:{field}") for field in "xywh"]
    name = get("mwg-rs:Name")
    if name is None or None in area:
        return None
    try:
        return FaceRegion(name, *(float(v) for v in area)).key
    except ValueError:
        return None


def _has(meta, name: str) -> bool:
    return meta.does_property_exist(NS_PHOTOTAG, name)


def _under(keyword: str, roots: set[str], separator: str) -> bool:
    return any(keyword == r or keyword.startswith(r + separator) for r in roots)


def _is_empty(meta) -> bool:
    return not any(True for _ in meta)


def serialize(meta) -> bytes:
    return meta.serialize_to_str(omit_packet_wrapper=True).encode("utf-8")


# ---- sidecars


def sidecar_path(photo: str | Path) -> Path:
    """``photo.jpg.xmp``; an existing ``photo.xmp`` (Lightroom's naming) when only it is there."""
    photo = Path(photo)
    full = photo.with_name(photo.name + ".xmp")
    if full.exists():
        return full
    short = photo.with_suffix(".xmp")
    return short if short != photo and short.exists() else full


def read_limited(path: Path, what: str) -> bytes:
    """A file's bytes, never more than :data:`MAX_PACKET_BYTES` + 1 read."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_PACKET_BYTES:
            raise XmpError(
                "xmp_too_large",
                f"{what} is over the {MAX_PACKET_BYTES} bytes a keyword file needs; untouched",
            )
        return f.read(MAX_PACKET_BYTES + 1)


def update_sidecar(photo: str | Path, tags: MachineTags | None, root: str) -> dict:
    """Write ``tags`` into the photo's sidecar (None: remove the machine tags); returns what was
    done, ``{"path", "action"}`` with action ``created``, ``updated``, ``removed``, ``deleted``
    (a sidecar only phototag had written, emptied) or ``none``. Raises :class:`XmpError` and
    leaves the file untouched when it cannot be read safely."""
    path = sidecar_path(photo)
    what = f"sidecar {path}"
    exists = path.exists()
    if not exists and tags is None:
        return {"path": str(path), "action": "none"}
    text = check_packet(read_limited(path, what), what) if exists else None
    meta = parse(text, what)
    created = not exists or _has(meta, "created")  # phototag made this file
    _set_or_delete(meta, "created", None)
    merge(meta, tags, root)
    if tags is None and created and _is_empty(meta):
        path.unlink()
        return {"path": str(path), "action": "deleted"}
    _set_or_delete(meta, "created", "True" if created else None)
    try:
        atomic_write_bytes(path, serialize(meta))
    except OSError as exc:
        raise XmpError("xmp_unwritable", f"{what}: {exc.strerror or exc}") from None
    action = "created" if not exists else ("removed" if tags is None else "updated")
    return {"path": str(path), "action": action}


# ---- embedded (opt-in: the photo file itself changes)


def embedded_packet(photo: str | Path) -> bytes | None:
    """The XMP packet inside a photo, as raw bytes (Pillow finds it; nothing parses it)."""
    from PIL import Image

    from model import imageio  # noqa: F401  (registers the HEIF opener)

    with Image.open(photo) as image:
        packet = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
        if packet is None and hasattr(image, "tag_v2"):
            packet = image.tag_v2.get(700)
    if isinstance(packet, str):
        packet = packet.encode("utf-8")
    return packet or None


def update_embedded(photo: str | Path, tags: MachineTags | None, root: str) -> dict:
    """Merge ``tags`` into the XMP inside the photo (JPEG, TIFF, PNG, WebP by Exempi, written to
    a temp file and renamed; HEIC by ExifTool where it is installed). The photo's pixels and
    other metadata are kept; an existing packet is checked as a sidecar is."""
    photo = Path(photo)
    what = f"the XMP inside {photo}"
    packet = embedded_packet(photo)
    meta = parse(check_packet(packet, what) if packet else None, what)
    merge(meta, tags, root)
    libxmp = _xmp()
    try:
        files = libxmp.XMPFiles(file_path=str(photo), open_forupdate=True)
    except libxmp.XMPError:
        files = None
    if files is not None:
        if files.can_put_xmp(meta):
            files.put_xmp(meta)
            files.close_file(close_flags=libxmp.consts.XMP_CLOSE_SAFEUPDATE)
            return {"path": str(photo), "action": "embedded"}
        files.close_file()
    _embed_with_exiftool(photo, serialize(meta))
    return {"path": str(photo), "action": "embedded"}


def _embed_with_exiftool(photo: Path, packet: bytes) -> None:
    """ExifTool (a separate program) writes the XMP of the formats Exempi cannot (HEIC)."""
    exiftool = shutil.which("exiftool")
    if exiftool is None:
        raise XmpError(
            "embed_unsupported",
            f"{photo}: embedding XMP in this format needs exiftool (apt-get install "
            "libimage-exiftool-perl); use --xmp sidecar",
        )
    with tempfile.NamedTemporaryFile(suffix=".xmp", dir=photo.parent, prefix=".") as tmp:
        tmp.write(packet)
        tmp.flush()
        result = subprocess.run(
            [exiftool, "-q", "-overwrite_original", f"-xmp<={tmp.name}", str(photo)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if result.returncode != 0:
        raise XmpError("xmp_unwritable", f"{photo}: exiftool: {result.stderr.strip()[:300]}")
