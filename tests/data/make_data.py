#!/usr/bin/env python3
"""Write the data-format fixtures and the bad-input corpus under tests/data/ (committed).

    python tests/data/make_data.py

formats/: the same three samples (one image; two images; text only) in every layout vlmtune
reads, so tests can check each one collates to the same batch as the OpenAI messages file.
bad/: one broken thing per sample between good ones (see bad/README.md for the list).
Deterministic; the parquet and save_to_disk files depend on the installed pyarrow/datasets.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
FORMATS = HERE / "formats"
BAD = HERE / "bad"

# (images, question, answer): the content every file in formats/ holds, in its own layout.
CANON = [
    (["red.png"], "What color is the square?", "Red."),
    (["red.png", "blue.png"], "Which image is blue?", "The second one."),
    ([], "Say hi.", "Hi!"),
]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def square(color: tuple[int, ...], size: tuple[int, int], mode: str = "RGB", background=(250, 250, 250)):
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).rectangle((8, 8, size[0] - 9, size[1] - 9), fill=color)
    return image


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    square((220, 40, 40), (48, 40)).save(folder / "red.png")
    square((40, 80, 220), (40, 56)).save(folder / "blue.png")
    # Conversions: transparency composites on white, grayscale and palette become RGB.
    square((220, 40, 40, 255), (40, 40), "RGBA", (0, 0, 0, 0)).save(folder / "rgba.png")
    square(90, (40, 40), "L", 200).save(folder / "gray.png")
    palette = square((40, 170, 60), (40, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(folder / "palette.png", transparency=palette.getpixel((0, 0)))


# --- formats/ -------------------------------------------------------------------------------------


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def openai_messages() -> list[dict]:
    """OpenAI style, every way of naming an image inline; the reference the others must match."""
    red, blue = "images/red.png", data_uri(FORMATS / "images" / "blue.png")
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": red}, text(CANON[0][1])]},
                {"role": "assistant", "content": [text(CANON[0][2])]},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": red}},
                        {"type": "image", "image": blue},
                        text(CANON[1][1]),
                    ],
                },
                {"role": "assistant", "content": CANON[1][2]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": CANON[2][1]},
                {"role": "assistant", "content": CANON[2][2]},
            ]
        },
    ]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def trl_rows() -> list[dict]:
    """TRL style: bare image parts, sources in an `images` column."""
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}] * len(images) + [text(question)]},
                {"role": "assistant", "content": [text(answer)]},
            ],
            "images": [f"images/{name}" for name in images],
        }
        for images, question, answer in CANON
    ]


def sharegpt_rows() -> list[dict]:
    """ShareGPT/LLaVA style: from/value turns, <image> in the text; one `image` or an `images` list."""
    rows = []
    for images, question, answer in CANON:
        row = {
            "conversations": [
                {"from": "human", "value": "<image>" * len(images) + question},
                {"from": "gpt", "value": answer},
            ]
        }
        if len(images) == 1:
            row["image"] = f"images/{images[0]}"  # LLaVA's single-image key
        elif images:
            row["images"] = [f"images/{name}" for name in images]
        rows.append(row)
    return rows


def llamafactory_rows() -> list[dict]:
    """LLaMA-Factory's sharegpt with role/content tags (its mllm_demo.json layout)."""
    return [
        {
            "messages": [
                {"role": "user", "content": "<image>" * len(images) + question},
                {"role": "assistant", "content": answer},
            ],
            "images": [f"images/{name}" for name in images],
        }
        for images, question, answer in CANON
    ]


def write_columns_csv(path: Path) -> None:
    """Plain columns under names of the dataset's own (mapped in the recipe); a list cell is JSON."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["picture", "query", "label"])
        for images, question, answer in CANON:
            paths = [f"images/{name}" for name in images]
            cell = paths[0] if len(paths) == 1 else (json.dumps(paths) if paths else "")
            writer.writerow([cell, question, answer])


def hf_image(name: str) -> dict:
    return {"bytes": (FORMATS / "images" / name).read_bytes(), "path": None}


def write_hf_files() -> None:
    """What `datasets` writes: Image features with the bytes embedded (parquet and save_to_disk)."""
    from datasets import Dataset, DatasetDict, Features, Image, List, Value

    columns = Dataset.from_dict(
        {
            "images": [[hf_image(name) for name in images] for images, _, _ in CANON],
            "question": [q for _, q, _ in CANON],
            "answer": [a for _, _, a in CANON],
        },
        features=Features({"images": List(Image()), "question": Value("string"), "answer": Value("string")}),
    )
    columns.to_parquet(str(FORMATS / "columns.parquet"))
    rows = trl_rows()
    trl = Dataset.from_dict(
        {
            "messages": [r["messages"] for r in rows],
            "images": [[hf_image(name) for name in images] for images, _, _ in CANON],
        }
    ).cast_column("images", List(Image()))
    trl.to_parquet(str(FORMATS / "trl.parquet"))
    shutil.rmtree(FORMATS / "disk", ignore_errors=True)
    DatasetDict({"train": trl, "validation": trl.select([0])}).save_to_disk(str(FORMATS / "disk"))


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_formats() -> None:
    write_images(FORMATS / "images")
    write_jsonl(FORMATS / "messages.jsonl", openai_messages())
    write_jsonl(FORMATS / "trl.jsonl", trl_rows())
    (FORMATS / "sharegpt.json").write_text(json.dumps(sharegpt_rows(), indent=1) + "\n", encoding="utf-8")
    (FORMATS / "llamafactory.json").write_text(
        json.dumps(llamafactory_rows(), indent=1) + "\n", encoding="utf-8"
    )
    write_columns_csv(FORMATS / "columns.csv")
    write_hf_files()


# --- bad/ -------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds (almost) no pixel data: tiny on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def write_bad_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    square((220, 40, 40), (48, 40)).save(folder / "good.png")
    square((40, 80, 220), (40, 56)).save(folder / "good2.png")
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3)))
    whole = png_bytes(noise)
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("this is a text file with a .jpg name\n", encoding="utf-8")
    (folder / "huge_side.png").write_bytes(png_header_only(40_000, 8))  # one side over max_image_side
    (folder / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # 900M pixels: Pillow's bomb guard
    Image.new("RGB", (500, 2), (40, 80, 220)).save(
        folder / "too_wide.png"
    )  # aspect 250: the processor refuses


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def image(path: str) -> dict:
    return {"type": "image", "image": path}


def answer(value: str = "A square.") -> dict:
    return {"role": "assistant", "content": [text(value)]}


QUESTION = text("What is in the image?")
GOOD = {"messages": [user(image("images/good.png"), QUESTION), answer()]}

# (what is wrong, the line as a Python object or raw bytes). The README lists the expected reasons.
BAD_LINES = [
    ("good", GOOD),
    ("missing image file", {"messages": [user(image("images/missing.png"), QUESTION), answer()]}),
    ("truncated PNG", {"messages": [user(image("images/truncated.png"), QUESTION), answer()]}),
    ("zero-byte file", {"messages": [user(image("images/empty.png"), QUESTION), answer()]}),
    ("text file named .jpg", {"messages": [user(image("images/not_an_image.jpg"), QUESTION), answer()]}),
    ("good, text only", {"messages": [{"role": "user", "content": "Hello"}, answer("Hi.")]}),
    (
        "placeholder/image count mismatch (sharegpt)",
        {
            "conversations": [
                {"from": "human", "value": "<image><image>Compare them."},
                {"from": "gpt", "value": "Same."},
            ],
            "images": ["images/good.png"],
        },
    ),
    (
        "image part/image count mismatch (TRL)",
        {"messages": [user({"type": "image"}, QUESTION), answer()], "images": []},
    ),
    ("no assistant turn", {"messages": [user(image("images/good.png"), QUESTION)]}),
    ("unknown role", {"messages": [{"role": "robot", "content": "beep"}, answer()]}),
    ("empty messages", {"messages": []}),
    ("wrong type: content is a number", {"messages": [{"role": "user", "content": 42}, answer()]}),
    (
        "wrong type: images is a number",
        {"messages": [user({"type": "image"}, QUESTION), answer()], "images": 7},
    ),
    ("huge declared size", {"messages": [user(image("images/huge_side.png"), QUESTION), answer()]}),
    ("decompression bomb", {"messages": [user(image("images/bomb.png"), QUESTION), answer()]}),
    ("longer than max_length", {"messages": [user(image("images/good.png"), text("why " * 300)), answer()]}),
    ("non-UTF-8 line", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'),
    ("invalid JSON line", b'{"messages": [{"role": "user", "content": "unclosed'),
    ("path escaping the image root", {"messages": [user(image("../../etc/passwd.png"), QUESTION), answer()]}),
    (
        "URL while data.allow_urls is off",
        {"messages": [user(image("https://example.com/a.png"), QUESTION), answer()]},
    ),
    (
        "good, two images (sharegpt)",
        {
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare."},
                {"from": "gpt", "value": "Both."},
            ],
            "images": ["images/good.png", "images/good2.png"],
        },
    ),
    ("not an object", [1, 2, 3]),
    (
        "aspect ratio the processor refuses",
        {"messages": [user(image("images/too_wide.png"), QUESTION), answer()]},
    ),
    ("turn without a role", {"messages": [{"content": "Hi"}, answer()]}),
    ("empty assistant answer", {"messages": [user(image("images/good.png"), QUESTION), answer("  ")]}),
    ("good", GOOD),
]


def write_bad() -> None:
    write_bad_images(BAD / "images")
    with (BAD / "train.jsonl").open("wb") as f:
        for _, line in BAD_LINES:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


if __name__ == "__main__":
    write_formats()
    write_bad()
    print(f"wrote {FORMATS} and {BAD}")
