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
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlmtune.errors import DataError
from vlmtune.redact import redact_text, redact_url


class ImageProblem(ValueError):
    """An image source that cannot become pixels; ``reason`` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


DEFAULT_URL_BYTES = 64 << 20  # what UrlImage caps a download at unless told (data.url_max_bytes)
URL_CHUNK = 64 << 10


@dataclass(frozen=True)
class UrlImage:
    """An http(s) image fetched when opened (only when data.allow_urls is on).

    ``timeout`` bounds the whole fetch (name lookup, connection, every read), not one read: a server
    that sends a byte every few seconds cannot hold a run. ``max_bytes`` caps what is downloaded.
    Messages show the URL with its credentials (user info, query values) redacted.
    """

    url: str
    timeout: float
    max_bytes: int = DEFAULT_URL_BYTES

    def __repr__(self) -> str:
        return f"UrlImage({redact_url(self.url)!r})"

    def fetch(self) -> bytes:
        import threading

        outcome: dict[str, Any] = {}
        stop = threading.Event()
        # A thread, because only a join bounds everything: urlopen's timeout bounds each socket
        # operation, and not the name lookup at all. A fetch past its deadline is abandoned; its
        # thread stops at its next read (each read is bounded by the timeout too).
        worker = threading.Thread(target=self._download, args=(outcome, stop), daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            stop.set()
            raise ImageProblem(
                f"cannot fetch {redact_url(self.url)}: no complete answer within data.url_timeout={self.timeout:g}s"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["data"]

    def _download(self, outcome: dict, stop: Any) -> None:
        import urllib.request

        shown = redact_url(self.url)
        request = urllib.request.Request(self.url, headers={"User-Agent": "vlmtune"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (http(s) only)
                declared = getattr(response, "headers", {}).get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageProblem(self._too_large(shown, int(declared)))
                chunks, total = [], 0
                read = getattr(response, "read1", response.read)
                while not stop.is_set():
                    chunk = read(URL_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ImageProblem(self._too_large(shown, total, "at least "))
                    chunks.append(chunk)
                outcome["data"] = b"".join(chunks)
        except ImageProblem as exc:
            outcome["error"] = exc
        except Exception as exc:  # urllib raises URLError, HTTPError, TimeoutError, ...
            detail = redact_text(f"{type(exc).__name__}: {exc}")
            outcome["error"] = ImageProblem(f"cannot fetch {shown} ({detail})")

    def _too_large(self, shown: str, size: int, qualifier: str = "") -> str:
        return (
            f"image URL {shown} is {qualifier}{size:,} bytes, over data.url_max_bytes={self.max_bytes:,} "
            "(download it and check it, or raise data.url_max_bytes)"
        )


class ImageUnreadable(DataError):
    """An image that passed the pre-flight and cannot be read while training (deleted, moved, a URL
    failing): the run stops naming the sample; ``for_run`` puts the run's resume command in the hint."""

    def for_run(self, run: Any) -> ImageUnreadable:
        message, hint = self.message, self.hint
        marker = f"{type(self).__name__}: "
        if hint is None and marker in message:  # re-raised from a DataLoader worker: its traceback as text
            message, _, hint = message.rsplit(marker, 1)[1].partition("\nhint: ")
        return ImageUnreadable(
            message.strip(), hint=hint.strip().replace(RESUME_PLACEHOLDER, str(run)) or None
        )


RESUME_PLACEHOLDER = "RUN_DIR"


def open_images(index: int, sources: list[Any], fields: list[str] | None = None) -> list[Any]:
    """The decoded images of the sample at ``index`` for a batch; ImageUnreadable naming it otherwise."""
    opened = []
    for i, source in enumerate(sources):
        try:
            opened.append(open_image(source))
        except ImageProblem as exc:
            field = fields[i] if fields and i < len(fields) else f"images[{i}]"
            raise ImageUnreadable(
                f"sample {index}: {field}: the image passed the pre-flight but cannot be read now: {exc.reason}",
                hint="restore it (or fix its URL), then continue from the last checkpoint with `vlmtune train "
                f"--resume {RESUME_PLACEHOLDER}`; or take the sample out of the data and start a new run",
            ) from None
    return opened


# --- resolving ---------------------------------------------------------------------------------


def resolve_source(
    value: Any, root: Path, *, allow_urls: bool, url_timeout: float, url_max_bytes: int = DEFAULT_URL_BYTES,
    follow_symlinks: bool = False,
) -> Any:  # fmt: skip
    """What a sample names -> a lazy source (path str, bytes, PIL image or UrlImage)."""
    if isinstance(value, dict):  # datasets' Image feature without decoding: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return resolve_source(
                value["path"], root, allow_urls=allow_urls, url_timeout=url_timeout, url_max_bytes=url_max_bytes,
                follow_symlinks=follow_symlinks,
            )  # fmt: skip
        raise ImageProblem("an image object with neither `bytes` nor `path`")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        fetch = UrlImage("", url_timeout, url_max_bytes) if allow_urls else None  # how a URL is fetched
        return _resolve_string(value.strip(), root, fetch=fetch, follow_symlinks=follow_symlinks)
    if _is_pil(value):
        return value
    raise ImageProblem(
        f"expected an image path, URL, data URI, bytes or {{bytes, path}} object, got {type(value).__name__}"
    )


def _resolve_string(value: str, root: Path, *, fetch: UrlImage | None, follow_symlinks: bool) -> Any:
    """``fetch``: None when URLs are off, else a UrlImage with the settings a URL is fetched with."""
    if not value:
        raise ImageProblem("empty image path")
    if "\0" in value:  # the OS refuses such a path outright (ValueError, not OSError)
        raise ImageProblem(f"image path {redact_text(value)!r} holds a NUL byte; no file can have that name")
    lowered = value[:8].lower()
    if lowered.startswith("data:"):
        return _decode_data_uri(value)
    if lowered.startswith(("http://", "https://")):
        if fetch is None:
            raise ImageProblem(
                f"image URL {redact_url(value)} is not fetched: URLs are off by default; set data.allow_urls: true, or "
                "download the images and use local paths (faster, and reproducible)"
            )
        return replace(fetch, url=value)
    if lowered.startswith("file://"):
        value = value[len("file://") :]
    return resolve_path(value, root, follow_symlinks=follow_symlinks)


def resolve_path(value: str, root: Path, *, follow_symlinks: bool = False) -> str:
    """An absolute path as given, or a relative one inside ``root`` (never outside it).

    Inside means where the path really leads: symlinks are resolved before the check (a link in
    the data folder to /etc/passwd escapes as surely as ``../..`` does), unless ``follow_symlinks``
    (data.follow_symlinks) trusts the links a data folder holds (an image folder linked in, the
    hub cache's blobs); ``..`` out of the root is refused either way.
    """
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    base = _absolute(str(root), os.getcwd())
    joined = os.path.normpath(os.path.join(base, value))
    if not _inside(joined, base):
        raise ImageProblem(
            f"path {value!r} escapes the image root {base}; relative image paths must stay inside it "
            "(set data.image_root to a folder that holds them all, or use absolute paths)"
        )
    if not follow_symlinks:
        real, real_base = os.path.realpath(joined), _real(base)
        if not _inside(real, real_base):
            raise ImageProblem(
                f"path {value!r} is a symlink (or inside a linked folder) that leads out of the image root "
                f"{base}, to {real} (set data.image_root to the folder it leads to, use absolute paths, or set "
                "data.follow_symlinks: true if you trust the links in your data folder)"
            )
    return joined


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=64)
def _real(path: str) -> str:  # the root resolved once, not once per image
    return os.path.realpath(path)


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
        return redact_url(source.url)
    if callable(getattr(source, "fetch", None)):
        return repr(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


# --- opening -----------------------------------------------------------------------------------


ORIENTATION_TAG = 0x0112


FIRST_FRAME, REFUSE_FRAMES = "first_frame", "error"  # data.multi_frame_images
# Formats whose extra frames are frames: not MPO, whose extra pictures (a phone's depth or gain maps)
# come with one photo.
MULTI_FRAME_FORMATS = ("GIF", "PNG", "TIFF", "WEBP")
FRAMES_INFO = "vlmtune_frames"  # open_image notes a multi-frame source's frame count in image.info


def open_image(source: Any, *, max_side: int | None = None, multi_frame: str = FIRST_FRAME):
    """A decoded RGB PIL image; ``ImageProblem`` with a named reason when that is impossible.

    An animated GIF/PNG/WebP or a multi-page TIFF gives its first frame (``frames_of`` tells how
    many it had), or is refused with ``multi_frame="error"``.
    """
    raw = _materialise(source)
    image = _open_header(raw)
    try:
        _check_side(image, max_side)
        frames = _frames(image, raw, multi_frame)
        _decode(image, raw)  # decode now: a truncated file fails here, not inside the processor
    except ImageProblem:
        _close_if_ours(image, raw)
        raise
    rgb = to_rgb(upright(image))
    if rgb is not image:
        _close_if_ours(image, raw)
    if frames > 1:
        rgb.info[FRAMES_INFO] = frames
    return rgb


def frames_of(image: Any) -> int:
    """How many frames the source ``open_image`` made ``image`` from had (1 for a still image)."""
    return image.info.get(FRAMES_INFO, 1)


def image_size(
    source: Any, *, max_side: int | None = None, decode: bool = False, multi_frame: str = FIRST_FRAME
) -> tuple[int, int]:
    """(width, height) as the model sees the image; see ``image_facts``."""
    return image_facts(source, max_side=max_side, decode=decode, multi_frame=multi_frame)[0]


def image_facts(
    source: Any, *, max_side: int | None = None, decode: bool = False, multi_frame: str = FIRST_FRAME
) -> tuple[tuple[int, int], int]:
    """(width, height) as the model sees the image (EXIF orientation applied), once it is known whole,
    and its number of frames (more than 1: an animation or a multi-page TIFF, trained on its first).

    ``decode`` decodes every pixel, as open_image does. Otherwise the check reads the file's
    structure to its end instead of building the picture: a JPEG's segments and scans to its EOI
    marker, a PNG's chunks to IEND with every CRC checked and enough compressed bytes for its
    pixels; any other format is decoded. Both catch what the bad-sample corpus holds (truncated,
    empty, not an image, decompression bombs, absurd sizes) and a file cut short; only ``decode``
    catches compressed data corrupted in place behind an intact structure.
    """
    if decode:
        image = open_image(source, max_side=max_side, multi_frame=multi_frame)
        size, frames = image.size, frames_of(image)
        if image is not source:
            image.close()
        return size, frames
    raw = _materialise(source)
    data = _read(raw) if isinstance(raw, str) else raw  # one read: the header and the walk share it
    image = _open_header(data, name=raw)
    try:
        _check_side(image, max_side)
        frames = _frames(image, raw, multi_frame)
        width, height = image.size
        orientation = _verify_whole(image, data, raw)
    finally:
        _close_if_ours(image, data)
    return ((height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)), frames


def _frames(image: Any, raw: Any, multi_frame: str) -> int:
    """The image's frame count; ImageProblem for more than one under ``multi_frame="error"``."""
    if image.format not in MULTI_FRAME_FORMATS:
        return 1
    try:
        frames = image.n_frames if getattr(image, "is_animated", False) else 1
    except Exception:  # noqa: BLE001 - a damaged later frame: the first is checked on its own
        return 1
    if frames > 1 and multi_frame == REFUSE_FRAMES:
        kind = "a multi-page TIFF" if image.format == "TIFF" else f"an animated {image.format}"
        raise ImageProblem(
            f"{describe(raw)} is {kind} of {frames} frames; data.multi_frame_images: error refuses it "
            "(first_frame trains on its first frame)"
        )
    return frames


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
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageProblem(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImageProblem(f"is a folder, not an image: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageProblem(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    with open(fd, "rb") as f:
        _regular(os.fstat(fd).st_mode, path)
        data = f.read()
    if not data:
        raise ImageProblem(f"empty file (0 bytes): {path}")
    return data


def _regular(mode: int, path: str) -> None:
    """Refuse what is not a plain file before a byte is read: reading a FIFO waits for a writer and a
    device like /dev/zero never ends."""
    if stat.S_ISDIR(mode):
        raise ImageProblem(f"is a folder, not an image: {path}")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )  # fmt: skip
        raise ImageProblem(f"is {kind}, not an image file: {path}")


def _open_header(source: Any, name: Any = None):
    """Open without decoding pixels: the header (and so the size) only. ``name`` is what messages call
    the image when ``source`` holds its bytes (its path, say)."""
    from PIL import Image

    if _is_pil(source):
        return source
    if isinstance(source, str):
        try:
            info = os.stat(source)
        except FileNotFoundError:
            raise ImageProblem(f"file not found: {source}") from None
        except (OSError, ValueError) as exc:
            raise ImageProblem(f"cannot read {source} ({getattr(exc, 'strerror', None) or exc})") from None
        _regular(info.st_mode, source)
        if info.st_size == 0:
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
