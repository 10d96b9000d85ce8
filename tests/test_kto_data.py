"""KTO's data (train.objective: kto): unpaired answers read from the layouts users have, each with its
good/bad label; the batch TRL's KTOTrainer scores (answers-only mask, the KL sequences); the refusals
by name; `vlmtune data check` reading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.data.samples import SampleError
from vlmtune.data.unpaired import UnpairedAnswer, UnpairedReader
from vlmtune.recipe import DataSection

from conftest import PIXEL_BUDGET, RED, ROOT, assistant, user, write_recipe

COLOURS = ROOT / "data" / "colours"
QUESTION = "What colour is the shape?"


def reader(**data) -> UnpairedReader:
    return UnpairedReader.from_section(DataSection(train="x.jsonl", **data), RED.parent)


def read(record: dict, **data) -> UnpairedAnswer:
    return reader(**data).read(7, record)


# Each peer's layout of one good answer about one picture; every one must read to the same item.
LAYOUTS = {
    "trl": {"images": [RED.name], "prompt": [user(QUESTION, images=1)], "completion": [assistant("Red.")],
            "label": True},
    "trl strings": {"images": [RED.name], "prompt": [{"role": "user", "content": QUESTION}],
                    "completion": "Red.", "label": "true"},
    "messages (ms-swift)": {"images": [RED.name], "label": 1,
                            "messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                         {"role": "assistant", "content": "Red."}]},
    "sharegpt (LLaMA-Factory)": {"images": [RED.name], "kto_tag": True,
                                 "conversations": [{"from": "human", "value": f"<image>{QUESTION}"},
                                                   {"from": "gpt", "value": "Red."}]},
    "query/response": {"image": RED.name, "query": QUESTION, "response": "Red.", "label": "good"},
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_to_the_same_prompt_answer_and_label(layout: str):
    item = read(LAYOUTS[layout])
    assert item.desirable is True and item.index == 7
    assert item.answer_text() == "Red."
    assert [m["role"] for m in item.prompt] == ["user"]
    assert item.prompt[0]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert item.images == [str(RED)]


@pytest.mark.parametrize(
    ("value", "desirable"),
    [(True, True), (False, False), (0, False), ("False", False), ("undesirable", False), (" Good ", True)],
)
def test_labels_in_the_words_of_each_peer(value, desirable: bool):
    assert read({**LAYOUTS["trl"], "label": value}).desirable is desirable


REFUSED = [  # (what, record change, field named, words of the reason)
    ("no label", {"label": None}, "label", "expected exactly one of `label`, `kto_tag`"),
    ("two labels", {"kto_tag": False}, "label", "got `label` and `kto_tag`"),
    ("a word that is no label", {"label": "maybe"}, "label", "'maybe' is not a label"),
    ("a count that is no label", {"label": 2}, "label", "2 is not a label"),
    ("an empty answer", {"completion": [assistant("  ")]}, "completion", "every assistant turn is empty"),
    ("no answer at the end", {"completion": None, "prompt": None,
                              "messages": [user(QUESTION, 1), assistant("Red."), user("Sure?")]},
     "sample", "the last turn must be the assistant answer"),
    ("two answers", {"completion": [assistant("Red."), assistant("Blue.")]}, "completion", "one assistant turn"),
    ("a pair", {"chosen": "Red.", "rejected": "Blue."}, "sample", "train.objective: dpo for pairs"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_records_kto_cannot_learn_from_are_refused_with_their_reason(change: dict, field: str, reason: str):
    record = {k: v for k, v in {**LAYOUTS["trl"], **change}.items() if v is not None}
    with pytest.raises(SampleError) as raised:
        read(record)
    assert raised.value.field == field and reason in raised.value.reason


# --- the batch TRL scores ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collated():
    """Three colour answers (good, bad, good) of two pictures, collated as KTO's trainer gets them, beside
    the SFT collator's labels of the same samples."""
    from vlmtune.data.check import sft_collator
    from vlmtune.data.unpaired_collator import UnpairedCollator
    from vlmtune.recipe import parse_recipe

    recipe = parse_recipe(
        f"model: {{name: 'tiny:qwen2_vl'}}\ndata: {{train: {COLOURS / 'unpaired.jsonl'}, max_image_pixels: "
        f"{PIXEL_BUDGET}}}\ntrain: {{objective: kto}}\n"
    )
    sft = sft_collator(recipe)
    rows = [json.loads(line) for line in (COLOURS / "unpaired.jsonl").read_text().splitlines()[:3]]
    items = [reader(image_root=str(COLOURS)).read(i, row) for i, row in enumerate(rows)]
    batch = UnpairedCollator(sft.processor, sft.family, max_length=256)(items)
    return items, batch, sft(items)["labels"], sft.processor.tokenizer


def test_the_batch_scores_the_answers_only_with_labels_and_kl_sequences(collated):
    items, batch, sft_labels, tokenizer = collated
    assert [item.desirable for item in items] == [True, False, True]
    assert batch["label"].tolist() == [True, False, True]
    # completion_mask: exactly the tokens SFT labels (the answer and its end-of-turn), nothing of the prompt
    assert torch_equal(batch["completion_mask"].bool(), sft_labels != -100)
    answers = decoded(tokenizer, batch["input_ids"], batch["completion_mask"].bool())
    assert answers == ["red<|im_end|>\n", "green<|im_end|>\n", "green<|im_end|>\n"]
    # KL sequences: each prompt (its own image) with the previous sample's answer, the first with the last's
    assert decoded(tokenizer, batch["KL_input_ids"], batch["KL_completion_mask"].bool()) == [
        answers[2],
        answers[0],
        answers[1],
    ]
    prompts = batch["KL_completion_mask"].cumsum(1) == 0  # every token before the answer
    assert decoded(tokenizer, batch["KL_input_ids"], prompts) == decoded(
        tokenizer, batch["input_ids"], prompts
    ), "the KL sequences keep their own prompt, image tokens included"
    assert (
        batch["KL_mm_token_type_ids"].shape == batch["KL_input_ids"].shape
    )  # Qwen's M-RoPE types, per sequence
    assert "labels" not in batch and batch["pixel_values"].shape[0] > 0


def decoded(tokenizer, ids, masks) -> list[str]:
    return [tokenizer.decode(row[mask]) for row, mask in zip(ids, masks, strict=True)]


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# --- refusals and `data check` ----------------------------------------------------------------------


def test_a_family_kto_cannot_score_is_refused_by_name_before_any_weight_loads(tmp_path: Path):
    from vlmtune import pipeline
    from vlmtune.errors import ModelError
    from vlmtune.recipe import load_recipe
    from vlmtune.runs import rundir

    path = write_recipe(
        tmp_path, model={"name": "tiny:mllama"}, train={"objective": "kto"},
        data={"train": str(COLOURS / "unpaired.jsonl"), "max_image_pixels": PIXEL_BUDGET},
        output={"dir": str(tmp_path / "runs")},
    )  # fmt: skip
    with pytest.raises(ModelError) as refused:
        pipeline.run(load_recipe(path), path.read_text(), "r", tmp_path / "run")
    assert "Llama 3.2 Vision cannot be trained with train.objective: kto" in refused.value.message
    assert "cross_attention_mask" in refused.value.message and "objective" in refused.value.hint
    load = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["load"]
    assert load["status"] == "failed" and not (tmp_path / "run" / rundir.MODEL_REPORT).exists()


def test_data_check_reads_kto_data_and_names_each_bad_record(tmp_path: Path):
    from vlmtune.data.check import check_recipe_data
    from vlmtune.recipe import load_recipe

    rows = [json.loads(line) for line in (COLOURS / "unpaired.jsonl").read_text().splitlines()[:4]]
    rows[1]["label"] = "perhaps"
    del rows[2]["label"]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = write_recipe(
        tmp_path, model={"name": "tiny:qwen2_vl"}, train={"objective": "kto"},
        data={"train": str(data), "image_root": str(COLOURS), "max_image_pixels": PIXEL_BUDGET},
    )  # fmt: skip
    report = check_recipe_data(load_recipe(path))["train"]  # what `vlmtune data check` prints
    assert [str(problem) for problem in report.problems] == [
        "sample 1: label: 'perhaps' is not a label: expected true/false (or 1/0, good/desirable/yes vs "
        "bad/undesirable/no)",
        "sample 2: label: expected exactly one of `label`, `kto_tag` (is the answer good?), got none",
    ]
    assert [item.desirable for item in report.samples] == [True, False]  # rows 0 and 3, measured
    assert len(report.lengths) == 2 and min(report.lengths) > 50


def test_eval_on_labelled_answers_takes_the_good_ones_as_references():
    """`vlmtune eval` on a KTO set (a kto run's data.eval): one item per good answer, never a bad one."""
    from vlmtune.after.evaluate import load_items

    data = DataSection(train=str(COLOURS / "unpaired.jsonl"), eval=str(COLOURS / "eval_unpaired.jsonl"))
    items, source = load_items(data.eval, data, None)
    rows = [json.loads(line) for line in (COLOURS / "eval_unpaired.jsonl").read_text().splitlines()]
    good = [row["completion"][0]["content"][0]["text"] for row in rows if row["label"]]
    assert [item.reference for item in items] == good and len(items) == 16 and source["samples_total"] == 32
    assert all(item.images and item.messages[-1]["role"] == "user" for item in items)
