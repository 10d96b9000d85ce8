#!/usr/bin/env python3
"""Write tests/data/peers/: the same three samples in each layout a peer project documents (committed).

    python tests/data/make_peer_data.py

The content is make_data.CANON (one image; two images; text only), the same as
tests/data/formats/messages.jsonl, so each file must collate to the same batch. Each layout is
written from its peer's own documentation (the tests cite the page), in the file types its users
have: jsonl/json with image paths, parquet with the image bytes embedded (`datasets` Image
features), and `save_to_disk` folders. Deterministic; the parquet and save_to_disk files depend on
the installed pyarrow/datasets.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_data import CANON, FORMATS, hf_image, write_jsonl  # noqa: E402

PEERS = HERE / "peers"
IMAGE_NAMES = ("red.png", "blue.png")


def path(name: str) -> str:
    return f"images/{name}"


def b64(name: str) -> str:
    return base64.b64encode((PEERS / "images" / name).read_bytes()).decode("ascii")


# --- TRL: prompt/completion + images (trl-lib/llava-instruct-mix) ----------------------------------


def trl_strings(image_column: str = "images") -> list[dict]:
    """String contents, no marker: TRL puts the images before the first user text."""
    rows = []
    for images, question, answer in CANON:
        row = {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
        }
        if image_column == "image" and len(images) == 1:
            row["image"] = path(images[0])  # TRL's single-image column
        elif images:
            row["images"] = [path(name) for name in images]
        rows.append(row)
    return rows


def trl_parts() -> list[dict]:
    """Part lists: a bare {"type": "image"} part per image, its source in `images`."""
    return [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}],
                }
            ],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [path(name) for name in images],
        }
        for images, question, answer in CANON
    ]


# --- The Cauldron: images + texts of {user, assistant, source} -------------------------------------


def cauldron() -> list[dict]:
    return [
        {
            "images": [path(name) for name in images],
            "texts": [{"user": question, "assistant": answer, "source": "vlmtune-canon"}],
        }
        for images, question, answer in CANON
    ]


# --- ms-swift: query/response/history/system, its aliases, and `conversation` pairs ---------------


def swift_query_response() -> list[dict]:
    """`<image>` tags where the images go; `images` holds their paths."""
    return [
        {"query": "<image>" * len(images) + question, "response": answer, "images": [path(n) for n in images]}
        for images, question, answer in CANON
    ]


SWIFT_ALIASES = [  # (question key, answer key, image key): names ms-swift's ResponsePreprocessor maps
    ("prompt", "completion", "images"),
    ("Question", "Answer", "image"),  # matched case-insensitively
    ("problem", "solution", "images"),
]


def swift_aliases() -> list[dict]:
    rows = []
    for (images, question, answer), (q, a, i) in zip(CANON, SWIFT_ALIASES, strict=True):
        row = {q: "<image>" * len(images) + question, a: answer}
        if images:
            row[i] = path(images[0]) if i == "image" and len(images) == 1 else [path(n) for n in images]
        rows.append(row)
    return rows


def swift_conversation() -> list[dict]:
    """ms-swift's sharegpt flavour: `conversation` of {human, assistant} pairs."""
    return [
        {
            "conversation": [{"human": "<image>" * len(images) + question, "assistant": answer}],
            "images": [path(n) for n in images],
        }
        for images, question, answer in CANON
    ]


def write_swift_csv(file: Path) -> None:
    """ms-swift reads csv too: `images` as a JSON list cell, `history` empty."""
    with file.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["query", "response", "history", "images"])
        for images, question, answer in CANON:
            paths = json.dumps([path(n) for n in images]) if images else ""
            writer.writerow(["<image>" * len(images) + question, answer, "", paths])


# --- LLaMA-Factory: alpaca instruction/input/output + images ---------------------------------------


def llamafactory_alpaca() -> list[dict]:
    return [
        {
            "instruction": "<image>" * len(images) + question,
            "input": "",
            "output": answer,
            "images": [path(n) for n in images],
        }
        for images, question, answer in CANON
    ]


# --- Axolotl: content parts naming their image (path, base64), system content as a list ----------


def axolotl() -> list[dict]:
    rows = []
    for k, (images, question, answer) in enumerate(CANON):
        parts = [
            {"type": "image", "path": path(name)}
            if (k + i) % 2 == 0
            else {"type": "image", "base64": b64(name)}
            for i, name in enumerate(images)
        ]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [*parts, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
            }
        )
    return rows


# --- OpenAI: image_url parts holding data URIs ----------------------------------------------------


def openai_data_uris() -> list[dict]:
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        *(
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/png;base64,{b64(n)}", "detail": "low"},
                            }
                            for n in images
                        ),
                        {"type": "text", "text": question},
                    ],
                },
                {"role": "assistant", "content": answer},
            ]
        }
        for images, question, answer in CANON
    ]


# --- writing --------------------------------------------------------------------------------------


def embed(rows: list[dict], column: str) -> list[dict]:
    """The rows with `column`'s paths replaced by `datasets` Image values holding the bytes."""
    return [{**row, column: [hf_image(Path(p).name) for p in row.get(column, [])]} for row in rows]


def write_datasets() -> None:
    """Parquet with the bytes embedded and save_to_disk folders, as hub datasets hold them."""
    from datasets import Dataset, Image, List

    def dataset(rows: list[dict]) -> Dataset:
        return Dataset.from_list(embed(rows, "images")).cast_column("images", List(Image()))

    dataset(trl_strings()).to_parquet(str(PEERS / "trl_prompt_completion.parquet"))
    dataset(trl_parts()).to_parquet(str(PEERS / "trl_prompt_completion_parts.parquet"))
    dataset(cauldron()).to_parquet(str(PEERS / "cauldron.parquet"))
    for name, rows in (("trl_prompt_completion_parts_disk", trl_parts()), ("cauldron_disk", cauldron())):
        shutil.rmtree(PEERS / name, ignore_errors=True)
        dataset(rows).save_to_disk(str(PEERS / name))


def write_json(file: Path, rows: list[dict]) -> None:
    file.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def write_peers() -> None:
    (PEERS / "images").mkdir(parents=True, exist_ok=True)
    for name in IMAGE_NAMES:
        shutil.copyfile(FORMATS / "images" / name, PEERS / "images" / name)
    write_jsonl(PEERS / "trl_prompt_completion.jsonl", trl_strings())
    write_jsonl(PEERS / "trl_prompt_completion_image.jsonl", trl_strings(image_column="image"))
    write_jsonl(PEERS / "trl_prompt_completion_parts.jsonl", trl_parts())
    write_jsonl(PEERS / "cauldron.jsonl", cauldron())
    write_jsonl(PEERS / "swift_query_response.jsonl", swift_query_response())
    write_json(PEERS / "swift_query_response.json", swift_query_response())
    write_jsonl(PEERS / "swift_aliases.jsonl", swift_aliases())
    write_jsonl(PEERS / "swift_conversation.jsonl", swift_conversation())
    write_swift_csv(PEERS / "swift_query_response.csv")
    write_json(PEERS / "llamafactory_alpaca.json", llamafactory_alpaca())
    write_json(PEERS / "axolotl.json", axolotl())
    write_jsonl(PEERS / "axolotl.jsonl", axolotl())
    write_jsonl(PEERS / "openai_data_uri.jsonl", openai_data_uris())
    write_datasets()


if __name__ == "__main__":
    write_peers()
    print(f"wrote {PEERS}")
