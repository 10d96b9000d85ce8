"""Image sources: resolve what a sample names into a lazy source, open it into an RGB picture.

A *source* is what ``Sample.images`` holds until the pixels are needed: an absolute path (str),
raw bytes, a PIL image, or a ``UrlImage``. ``resolve_source`` turns what datasets contain
(relative paths, absolute paths, ``data:`` URIs, ``{"bytes", "path"}`` dicts written by
``datasets``' Image feature, http(s) URLs) into one of those, refusing what it must (a path
that escapes the image root, a URL when URLs are off) with a reason a user can act on.

``open_image`` decodes a source into RGB (transparency composited on white). With ``max_side``
it reads the header first and refuses absurd sizes before any pixel is decoded. Every failure
is an ``ImageProblem`` whose reason names it: file not found, empty file, not an image,
truncated, too large.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ImageProblem(ValueError):
    """An image source that cannot become pixels; ``reason`` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class UrlImage:
    """An http(s) image fetched when opened (only when data.allow_urls is on)."""

    url: str
    timeout: float

    def fetch(self) -> bytes:
        import urllib.request

        request = urllib.request.Request(self.url, headers={"User-Agent": "vlmtune"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (http(s) only)
                return response.read()
        except Exception as exc:  # urllib raises URLError, HTTPError, TimeoutError, ...
            raise ImageProblem(f"cannot fetch {self.url} ({type(exc).__name__}: {exc})") from None


# --- resolving ---------------------------------------------------------------------------------


def resolve_source(value: Any, root: Path, *, allow_urls: bool, url_timeout: float) -> Any:
    """What a sample names -> a lazy source (path str, bytes, PIL image or UrlImage)."""
    if isinstance(value, dict):  # datasets' Image feature without decoding: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return resolve_source(value["path"], root, allow_urls=allow_urls, url_timeout=url_timeout)
        raise ImageProblem("an image object with neither `bytes` nor `path`")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return _resolve_string(value.strip(), root, allow_urls=allow_urls, url_timeout=url_timeout)
    if _is_pil(value):
        return value
    raise ImageProblem(
        f"expected an image path, URL, data URI, bytes or {{bytes, path}} object, got {type(value).__name__}"
    )


def _resolve_string(value: str, root: Path, *, allow_urls: bool, url_timeout: float) -> Any:
    if not value:
        raise ImageProblem("empty image path")
    lowered = value[:8].lower()
    if lowered.startswith("data:"):
        return _decode_data_uri(value)
    if lowered.startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageProblem(
                f"image URL {value} is not fetched: URLs are off by default; set data.allow_urls: true, or "
                "download the images and use local paths (faster, and reproducible)"
            )
        return UrlImage(value, url_timeout)
    if lowered.startswith("file://"):
        value = value[len("file://") :]
    return resolve_path(value, root)


def resolve_path(value: str, root: Path) -> str:
    """An absolute path as given, or a relative one inside ``root`` (never outside it)."""
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    base = _absolute(str(root), os.getcwd())
    # normpath, not resolve(): a symlinked image folder inside the root is fine; `..` out of it is not.
    joined = os.path.normpath(os.path.join(base, value))
    if joined != base and not joined.startswith(base.rstrip(os.sep) + os.sep):
        raise ImageProblem(
            f"path {value!r} escapes the image root {base}; relative image paths must stay inside it "
            "(set data.image_root to a folder that holds them all, or use absolute paths)"
        )
    return joined


@functools.lru_cache(maxsize=64)
def _absolute(root: str, cwd: str) -> str:  # once per root, not once per image of a 100k-sample set
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(root)))


def _decode_data_uri(value: str) -> bytes:
    header, sep, payload = value.partition(",")
    if not sep or ";base64" not in header.lower():
        raise ImageProblem(f"data URI {header[:40]!r}... is not base64 (expected data:image/...;base64,...)")
    return _b64(payload, "data URI")


def decode_base64(value: Any) -> bytes:
    """A bare base64 string (Axolotl's ``{"type": "image", "base64": ...}``); a data URI is accepted too."""
    if not isinstance(value, str):
        raise ImageProblem(f"expected a base64 string, got {type(value).__name__}")
    value = value.strip()
    if value[:5].lower() == "data:":
        return _decode_data_uri(value)
    return _b64(value, "base64 image")


def _b64(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)  # line breaks are common in base64
    except (binascii.Error, ValueError) as exc:
        raise ImageProblem(f"{what} holds invalid base64 ({exc})") from None


def embedded_bytes(value: Any, encoding: str | None = None) -> bytes:
    """The bytes of an image stored in a dataset row: raw bytes, a {bytes, path} dict, base64 text."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return decode_base64(value) if encoding == "base64" else _decode_data_uri(value.strip())
    raise ImageProblem(f"expected image bytes in the dataset row, got {type(value).__name__}")


def describe(source: Any) -> str:
    """A short name for a source in messages (never megabytes of base64)."""
    if isinstance(source, str):
        return source
    if isinstance(source, UrlImage):
        return source.url
    if callable(getattr(source, "fetch", None)):
        return repr(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


# --- opening -----------------------------------------------------------------------------------


ORIENTATION_TAG = 0x0112


def open_image(source: Any, *, max_side: int | None = None):
    """A decoded RGB PIL image; ``ImageProblem`` with a named reason when that is impossible."""
    raw = _materialise(source)
    image = _open_header(raw)
    try:
        _check_side(image, max_side)
        _decode(image, raw)  # decode now: a truncated file fails here, not inside the processor
    except ImageProblem:
        _close_if_ours(image, raw)
        raise
    rgb = to_rgb(upright(image))
    if rgb is not image:
        _close_if_ours(image, raw)
    return rgb


def image_size(source: Any, *, max_side: int | None = None, decode: bool = False) -> tuple[int, int]:
    """(width, height) as the model sees the image (EXIF orientation applied), once it is known whole.

    ``decode`` decodes every pixel, as open_image does. Otherwise the check reads the file's
    structure to its end instead of building the picture: a JPEG's segments and scans to its EOI
    marker, a PNG's chunks to IEND with every CRC checked and enough compressed bytes for its
    pixels; any other format is decoded. Both catch what the bad-sample corpus holds (truncated,
    empty, not an image, decompression bombs, absurd sizes) and a file cut short; only ``decode``
    catches compressed data corrupted in place behind an intact structure.
    """
    if decode:
        image = open_image(source, max_side=max_side)
        size = image.size
        if image is not source:
            image.close()
        return size
    raw = _materialise(source)
    data = _read(raw) if isinstance(raw, str) else raw  # one read: the header and the walk share it
    image = _open_header(data, name=raw)
    try:
        _check_side(image, max_side)
        width, height = image.size
        orientation = _verify_whole(image, data, raw)
    finally:
        _close_if_ours(image, data)
    return (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)


def upright(image):
    """The image as a viewer shows it: phone photos store pixels sideways plus an EXIF Orientation
    tag, and transformers' own ``load_image`` applies that tag, so a model must see it applied."""
    from PIL import ImageOps

    if image.getexif().get(ORIENTATION_TAG, 1) == 1:
        return image  # exif_transpose would return a copy even then
    return ImageOps.exif_transpose(image)


def _materialise(source: Any) -> Any:
    """A path, bytes or a PIL image: what a lazy source (URL, dataset row, {bytes, path}) stands for."""
    if callable(getattr(source, "fetch", None)):  # UrlImage, or an image kept inside a dataset row
        source = source.fetch()
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    return source


def _read(path: str) -> bytes:
    """A file's bytes; ImageProblem naming what is wrong with the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageProblem(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImageProblem(f"is a folder, not an image: {path}") from None
    except OSError as exc:
        raise ImageProblem(f"cannot read {path} ({exc.strerror or exc})") from None
    if not data:
        raise ImageProblem(f"empty file (0 bytes): {path}")
    return data


def _open_header(source: Any, name: Any = None):
    """Open without decoding pixels: the header (and so the size) only. ``name`` is what messages call
    the image when ``source`` holds its bytes (its path, say)."""
    from PIL import Image

    if _is_pil(source):
        return source
    if isinstance(source, str):
        if not os.path.isfile(source):
            what = "is a folder, not an image" if os.path.isdir(source) else "file not found"
            raise ImageProblem(f"{what}: {source}")
        if os.path.getsize(source) == 0:
            raise ImageProblem(f"empty file (0 bytes): {source}")
        stream: Any = source
    elif isinstance(source, bytes | bytearray):
        if not source:
            raise ImageProblem(
                f"empty file (0 bytes): {name}" if isinstance(name, str) else "empty image bytes"
            )
        stream = io.BytesIO(source)
    else:
        raise ImageProblem(f"unsupported image source {type(source).__name__}")
    source = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_side is our guard
            return Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageProblem(
            f"Pillow refuses {describe(source)} as a possible decompression bomb ({exc})"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageProblem(f"not an image Pillow can read: {describe(source)}") from None
    except OSError as exc:
        raise ImageProblem(f"cannot read {describe(source)} ({exc})") from None


def _check_side(image: Any, max_side: int | None) -> None:
    width, height = image.size
    if max_side is not None and max(width, height) > max_side:
        raise ImageProblem(
            f"image is {width}x{height} pixels, a side over data.max_image_side={max_side} "
            "(a decompression bomb, a corrupt header, or an image to shrink before training)"
        )


def _decode(image: Any, raw: Any) -> None:
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken data
        if "truncated" in str(exc):
            raise ImageProblem(f"truncated image data: {describe(raw)} ({exc})") from None
        raise ImageProblem(f"cannot decode {describe(raw)} ({type(exc).__name__}: {exc})") from None


# --- checking an image whole without decoding it --------------------------------------------------

TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"iTXt", b"tEXt", b"zTXt")
# What Pillow reads an orientation from in a PNG: an eXIf chunk, or text chunks with these keywords.
PNG_ORIENTATION_KEYWORDS = (b"Raw profile type exif", b"XML:com.adobe.xmp")


def _verify_whole(image: Any, data: Any, raw: Any) -> int:
    """Prove the image whole as cheaply as its format allows; its EXIF orientation (1 = upright).
    ``data`` is its bytes (or a PIL image), ``raw`` what messages call it."""
    if _is_pil(data):
        return image.getexif().get(ORIENTATION_TAG, 1)
    if image.format == "JPEG":
        _jpeg_whole(data, raw)
        return image.getexif().get(ORIENTATION_TAG, 1)  # APP1 and XMP were read with the header
    if image.format == "PNG":
        if not _png_whole_may_turn(data, raw):
            return 1  # no EXIF, no XMP: nothing can turn it (and Pillow's getexif() would decode the pixels)
        return image.getexif().get(ORIENTATION_TAG, 1)
    _decode(image, raw)
    return image.getexif().get(ORIENTATION_TAG, 1)


JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in entropy-coded data: the end of a scan
JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


def _jpeg_whole(data: bytes, raw: Any) -> None:
    """Walk a JPEG's segments and scans to its EOI marker (ImageProblem if it is not whole).

    The segments' lengths must fit in the file, at least one scan must be there, and every scan
    must end in a marker before the file does: a file cut short (the usual damage) fails here as
    it would fail to decode. Stray bytes between segments are skipped, as libjpeg skips them.
    """
    end, pos, scans = len(data), 2, 0
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= end:
            raise ImageProblem(f"truncated image data: {describe(raw)} (the file ends before its EOI marker)")
        marker = data[pos + 1]
        if marker == 0xFF or marker in JPEG_STANDALONE:  # fill byte, or a marker with no segment
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:  # EOI
            if not scans:
                raise ImageProblem(f"cannot decode {describe(raw)} (a JPEG with no image data)")
            return
        if pos + 4 > end or pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big") > end:
            raise ImageProblem(f"truncated image data: {describe(raw)} (the file ends inside a segment)")
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # SOS: compressed data follows, up to the next marker
            scans += 1
            found = JPEG_MARKER.search(data, pos)
            if found is None:
                raise ImageProblem(f"truncated image data: {describe(raw)} (the file ends inside a scan)")
            pos = found.start()


def _png_whole_may_turn(data: bytes, raw: Any) -> bool:
    """Read a PNG's chunks to IEND, each CRC checked, and its compressed pixels weighed against its
    size (ImageProblem if it is not whole); True when a chunk could hold an EXIF orientation."""
    view = memoryview(data)
    may_turn = False
    compressed = least = 0
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ImageProblem(f"truncated image data: {describe(raw)} (the file ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", view[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ImageProblem(
                f"truncated image data: {describe(raw)} (the file ends inside a {kind!r} chunk)"
            )
        crc = zlib.crc32(view[pos + 8 : end - 4], zlib.crc32(kind))
        if crc != int.from_bytes(view[end - 4 : end], "big"):
            raise ImageProblem(
                f"cannot decode {describe(raw)} (CRC mismatch in a {kind!r} chunk: corrupt data)"
            )
        if kind == b"IHDR":
            least = _png_pixel_bytes(view[pos + 8 : end - 4])
        compressed += length if kind == b"IDAT" else 0
        keyword = bytes(view[pos + 8 : min(end - 4, pos + 8 + 80)]).split(b"\0", 1)[0]
        may_turn |= kind == b"eXIf" or (kind in PNG_TEXT_CHUNKS and keyword in PNG_ORIENTATION_KEYWORDS)
        if kind == b"IEND":
            break
        pos = end
    if compressed * DEFLATE_MAX_RATIO < least:
        raise ImageProblem(
            f"truncated image data: {describe(raw)} ({compressed} compressed bytes cannot hold the "
            f"{least} bytes of its pixels)"
        )
    return may_turn


DEFLATE_MAX_RATIO = 1032  # deflate's best case: one 258-byte match per 2 bits
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def _png_pixel_bytes(ihdr: memoryview) -> int:
    """The fewest bytes a PNG's pixels take uncompressed (filter bytes left out), from its IHDR."""
    width, height, depth, colour = struct.unpack(">IIBB", ihdr[:10])
    return width * height * depth * PNG_CHANNELS.get(colour, 1) // 8


def to_rgb(image):
    """RGB; transparency (RGBA, LA, palette with transparency) composited on white, not on black."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16/32-bit grayscale (scans, depth maps): scale to 8 bits instead of letting convert() clip to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if array.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(array * scale, 0, 255).astype("uint8")).convert("RGB")
    return image.convert("RGB")


def _close_if_ours(image: Any, source: Any) -> None:
    if image is not source:
        image.close()


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover (Pillow comes with transformers' vision extras)
        return False
    return isinstance(value, Image.Image)
