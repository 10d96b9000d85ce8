#!/usr/bin/env python3
"""Write the preference-pair fixtures under tests/data/preference/ (committed).

    python tests/data/make_preference_data.py

The same three pairs (one image; two images and a system prompt; a text-only multi-turn prompt)
in every preference layout vlmtune reads, so tests can check each one collates to the same batch
as TRL's layout (trl.jsonl). A layout that cannot hold a pair leaves it out (plain columns have no
multi-turn prompt). Deterministic; the parquet file depends on the installed pyarrow/datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "preference"

# (system, prompt turns as (role, text, images), chosen, rejected): what every file holds.
PAIRS = [
    (None, [("user", "What color is the square?", ["red.png"])], "Red.", "Blue."),
    ("Be brief.", [("user", "Which image is red?", ["red.png", "blue.png"])], "The first.", "The second."),
    (
        None,
        [
            ("user", "Hello.", []),
            ("assistant", "Hi there.", []),
            ("user", "How many sides has a square?", []),
        ],
        "Four.",
        "Three.",
    ),
]
MARKER = "<image>"


def square(color: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(image).rectangle((6, 6, size[0] - 7, size[1] - 7), fill=color)
    return image


def images_of(turns) -> list[str]:
    return [f"images/{name}" for _, _, names in turns for name in names]


def parts(text: str, images: list[str]) -> list[dict]:
    return [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]


def system_turns(system, content) -> list[dict]:
    return [{"role": "system", "content": content(system)}] if system else []


def trl(system, turns, chosen, rejected) -> dict:
    """TRL's explicit-prompt layout with part lists: bare image parts, images in an `images` column."""
    prompt = system_turns(system, lambda s: [{"type": "text", "text": s}])
    prompt += [{"role": role, "content": parts(text, names)} for role, text, names in turns]
    return {
        "images": images_of(turns),
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
    }


def trl_strings(system, turns, chosen, rejected) -> dict:
    """TRL with string contents: TRL puts the images before the first user turn's text."""
    prompt = system_turns(system, lambda s: s) + [{"role": role, "content": text} for role, text, _ in turns]
    return {
        "images": images_of(turns),
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def trl_implicit(system, turns, chosen, rejected) -> dict:
    """TRL's implicit prompt: two whole conversations that share everything but the answer."""
    record = trl(system, turns, chosen, rejected)
    prompt = record.pop("prompt")
    return {
        "images": record["images"],
        "chosen": prompt + record["chosen"],
        "rejected": prompt + record["rejected"],
    }


def llamafactory(system, turns, chosen, rejected) -> dict:
    """LLaMA-Factory's ranking sharegpt: conversations up to the question, chosen/rejected turns."""
    record = {
        "conversations": [
            {"from": "human" if role == "user" else "gpt", "value": MARKER * len(names) + text}
            for role, text, names in turns
        ],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
        "images": images_of(turns),
    }
    return {**record, "system": system} if system else record


def swift(system, turns, chosen, rejected) -> dict:
    """ms-swift's DPO layout: messages ending with the chosen answer, plus rejected_response."""
    messages = system_turns(system, lambda s: s)
    messages += [{"role": role, "content": MARKER * len(names) + text} for role, text, names in turns]
    messages.append({"role": "assistant", "content": chosen})
    return {"messages": messages, "rejected_response": rejected, "images": images_of(turns)}


def columns(system, turns, chosen, rejected) -> dict | None:
    """RLAIF-V style plain columns (one question: a multi-turn prompt does not fit)."""
    if len(turns) != 1:
        return None
    _, question, names = turns[0]
    return {"image": images_of(turns), "question": question, "chosen": chosen, "rejected": rejected,
            "system": system}  # fmt: skip


def write_rlaif_v(out: Path) -> None:
    """RLAIF-V's own shape: one embedded image per row (a datasets Image feature) and its extra columns."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    system, turns, chosen, rejected = PAIRS[0]
    ((_, question, names),) = turns
    features = Features(
        {"ds_name": Value("string"), "image": ImageFeature(), "question": Value("string"),
         "chosen": Value("string"), "rejected": Value("string"), "origin_dataset": Value("string")}
    )  # fmt: skip
    row = {"ds_name": "fixture", "image": {"bytes": (HERE / "images" / names[0]).read_bytes(), "path": None},
           "question": question, "chosen": chosen, "rejected": rejected, "origin_dataset": "vlmtune"}  # fmt: skip
    Dataset.from_list([row], features=features).to_parquet(str(out))


def write() -> None:
    (HERE / "images").mkdir(parents=True, exist_ok=True)
    square((220, 40, 40), (48, 40)).save(HERE / "images" / "red.png")
    square((40, 80, 220), (40, 56)).save(HERE / "images" / "blue.png")
    for name, layout in (("trl", trl), ("trl_strings", trl_strings), ("trl_implicit", trl_implicit),
                         ("swift", swift), ("columns", columns)):  # fmt: skip
        rows = [layout(*pair) for pair in PAIRS]
        lines = [json.dumps(row, ensure_ascii=False) for row in rows if row is not None]
        (HERE / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ranking = [llamafactory(*pair) for pair in PAIRS]
    (HERE / "llamafactory.json").write_text(json.dumps(ranking, indent=1, ensure_ascii=False) + "\n")
    write_rlaif_v(HERE / "rlaif_v.parquet")
    print(f"wrote {HERE}")


if __name__ == "__main__":
    write()
