"""Greedy answers from a model in inference mode: one user turn, its images, the decoded reply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.errors import DataError
from vlmtune.training.answer_eval import generate_answer

__all__ = ["generate_answer", "open_images", "user_turn"]


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ESC sequences included) written as escapes (\\x1b);
    newlines and tabs kept."""
    return "".join(c if c.isprintable() or c in "\n\t" else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def user_turn(prompt: str, n_images: int) -> list[dict]:
    """One user message: the images first, then the question (the layout the demo data uses)."""
    return [
        {
            "role": "user",
            "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": prompt}],
        }
    ]


def open_images(paths: list[str | Path]) -> list[Any]:
    """Decoded RGB images, or a DataError naming the file that does not open."""
    from vlmtune.data import open_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"image not found: {path}", hint="pass the path of a PNG, JPEG or WebP file")
        try:
            images.append(open_image(str(path)))
        except Exception as exc:  # PIL raises many types for broken files
            raise DataError(
                f"cannot open image {path}: {exc}",
                hint="pass a readable PNG, JPEG or WebP file (`python -m PIL.Image` can tell what it is)",
            ) from None
    return images
