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
import io
import os
import warnings
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
    path = Path(value).expanduser()
    if path.is_absolute():
        return os.path.normpath(path)
    base = os.path.normpath(Path(root).absolute())
    # normpath, not resolve(): a symlinked image folder inside the root is fine; `..` out of it is not.
    joined = os.path.normpath(os.path.join(base, path))
    if os.path.commonpath([base, joined]) != base:
        raise ImageProblem(
            f"path {value!r} escapes the image root {base}; relative image paths must stay inside it "
            "(set data.image_root to a folder that holds them all, or use absolute paths)"
        )
    return joined


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
    image = _open_header(source)
    width, height = image.size
    if max_side is not None and max(width, height) > max_side:
        _close_if_ours(image, source)
        raise ImageProblem(
            f"image is {width}x{height} pixels, a side over data.max_image_side={max_side} "
            "(a decompression bomb, a corrupt header, or an image to shrink before training)"
        )
    try:
        image.load()  # decode now: a truncated file fails here, not inside the processor
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken data
        _close_if_ours(image, source)
        if "truncated" in str(exc):
            raise ImageProblem(f"truncated image data: {describe(source)} ({exc})") from None
        raise ImageProblem(f"cannot decode {describe(source)} ({type(exc).__name__}: {exc})") from None
    rgb = to_rgb(upright(image))
    if rgb is not image:
        _close_if_ours(image, source)
    return rgb


def upright(image):
    """The image as a viewer shows it: phone photos store pixels sideways plus an EXIF Orientation
    tag, and transformers' own ``load_image`` applies that tag, so a model must see it applied."""
    from PIL import ImageOps

    if image.getexif().get(ORIENTATION_TAG, 1) == 1:
        return image  # exif_transpose would return a copy even then
    return ImageOps.exif_transpose(image)


def _open_header(source: Any):
    """Open without decoding pixels: the header (and so the size) only."""
    from PIL import Image

    if callable(getattr(source, "fetch", None)):  # UrlImage, or an image kept inside a dataset row
        source = source.fetch()
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
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
            raise ImageProblem("empty image bytes")
        stream = io.BytesIO(source)
    else:
        raise ImageProblem(f"unsupported image source {type(source).__name__}")
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
