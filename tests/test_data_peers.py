"""Datasets in the exact layouts peer projects document read as they are and collate like OpenAI messages.

Fixtures: tests/data/peers/, written by tests/data/make_peer_data.py from the same three samples as
tests/data/formats/messages.jsonl (the reference). Each case cites the page that documents its layout.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data import SampleReader
from vlmtune.data.preflight import read_split
from vlmtune.data.samples import SampleError
from vlmtune.recipe import DataSection

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_data_formats import assert_same_batch

PEERS = ROOT / "tests" / "data" / "peers"
FORMATS = ROOT / "tests" / "data" / "formats"

TRL_DOCS = "https://huggingface.co/docs/trl/dataset_formats#vision-datasets"
TRL_LLAVA_MIX = (
    "https://huggingface.co/datasets/trl-lib/llava-instruct-mix"  # examples/datasets/llava_instruct_mix.py
)
CAULDRON = "https://huggingface.co/datasets/HuggingFaceM4/the_cauldron"
SWIFT = "https://swift.readthedocs.io/en/latest/Customization/Custom-dataset.html"
LLAMAFACTORY = "https://github.com/hiyouga/LLaMA-Factory/blob/main/data/README.md"
AXOLOTL = "https://docs.axolotl.ai/docs/multimodal.html#dataset-format"
OPENAI = "https://platform.openai.com/docs/guides/vision-fine-tuning"

# (file under tests/data/peers, the page documenting the layout, the layout each sample is read as)
PEER_FILES = [
    ("trl_prompt_completion.jsonl", TRL_LLAVA_MIX, "prompt_completion"),
    ("trl_prompt_completion.parquet", TRL_LLAVA_MIX, "prompt_completion"),
    ("trl_prompt_completion_image.jsonl", TRL_DOCS, "prompt_completion"),
    ("trl_prompt_completion_parts.jsonl", TRL_DOCS, "prompt_completion"),
    ("trl_prompt_completion_parts.parquet", TRL_DOCS, "prompt_completion"),
    ("trl_prompt_completion_parts_disk", TRL_DOCS, "prompt_completion"),
    ("cauldron.jsonl", CAULDRON, "exchanges"),
    ("cauldron.parquet", CAULDRON, "exchanges"),
    ("cauldron_disk", CAULDRON, "exchanges"),
    ("swift_query_response.jsonl", SWIFT, "query_response"),
    ("swift_query_response.json", SWIFT, "query_response"),
    ("swift_query_response.csv", SWIFT, "query_response"),
    ("swift_aliases.jsonl", SWIFT, "query_response"),
    ("swift_conversation.jsonl", SWIFT, "exchanges"),
    ("llamafactory_alpaca.json", LLAMAFACTORY, "query_response"),
    ("axolotl.json", AXOLOTL, "messages"),
    ("axolotl.jsonl", AXOLOTL, "messages"),
    ("openai_data_uri.jsonl", OPENAI, "messages"),
]


@pytest.fixture(scope="module")
def collator(tiny_path):
    from vlmtune.data.collator import VisionCollator
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    family = get_family("qwen2_vl")
    processor = load_processor(tiny_path("qwen2_vl"), family, PIXEL_BUDGET)
    return VisionCollator(processor, family, max_length=None, train_on_responses_only=True)


@pytest.fixture(scope="module")
def reference(collator):
    return collator(read(FORMATS / "messages.jsonl").samples)


def read(path: Path, **data):
    return read_split(str(path), DataSection(train=str(path), **data))


def reader(**data) -> SampleReader:
    return SampleReader.from_section(DataSection(train="x", **data), PEERS)


def labelled(collator, batch, row: int = 0) -> str:
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return collator.tokenizer.decode(
        [int(i) for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize(("name", "docs", "layout"), PEER_FILES, ids=[c[0] for c in PEER_FILES])
def test_each_peer_layout_reads_as_it_is_and_collates_like_openai_messages(
    collator, reference, name, docs, layout
):
    split = read(PEERS / name)
    assert split.problems == [] and split.total == len(split.samples) == 3, docs
    assert [s.format for s in split.samples] == [layout] * 3
    assert [s.n_images for s in split.samples] == [1, 2, 0], "every image is kept"
    assert_same_batch(collator(split.samples), reference)


def test_the_fixtures_are_what_the_generator_writes(tmp_path: Path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_peer_data", ROOT / "tests" / "data" / "make_peer_data.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    for name, rows in [
        ("trl_prompt_completion.jsonl", make.trl_strings()),
        ("cauldron.jsonl", make.cauldron()),
        ("swift_aliases.jsonl", make.swift_aliases()),
        ("axolotl.jsonl", make.axolotl()),
    ]:
        assert [json.loads(line) for line in (PEERS / name).read_text().splitlines()] == rows, name


# --- TRL ------------------------------------------------------------------------------------------


def test_trl_prompt_completion_trains_the_completion_only(collator):
    """A multi-turn prompt holds earlier answers: context, not targets (TRL's completion-only loss)."""
    row = {
        "prompt": [
            {"role": "user", "content": "What color is the square?"},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And the border?"},
        ],
        "completion": [{"role": "assistant", "content": "Light gray."}],
        "images": ["images/red.png"],
    }
    sample = reader().read(0, row)
    assert sample.format == "prompt_completion" and sample.trained_from == 3
    assert sample.messages[0]["content"][0] == {"type": "image"}, (
        "TRL puts the images before the first user text"
    )
    assert labelled(collator, collator([sample])) == "Light gray.<|im_end|>\n"
    as_messages = reader().read(
        0, {"messages": [*row["prompt"], *row["completion"]], "images": row["images"]}
    )
    assert labelled(collator, collator([as_messages])) == "Red.<|im_end|>\nLight gray.<|im_end|>\n"


def test_trl_messages_with_strings_and_one_image_column_put_the_image_first(collator):
    """trl-lib/llava-instruct-mix before it was split into prompt/completion: `messages` + `image`."""
    row = {
        "messages": [
            {"role": "user", "content": "What color is the square?"},
            {"role": "assistant", "content": "Red."},
        ],
        "image": "images/red.png",
    }
    sample = reader().read(0, row)
    assert sample.messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "What color is the square?"},
    ]
    assert sample.images == [str(PEERS / "images" / "red.png")]


def test_a_prompt_completion_row_with_a_user_turn_in_the_completion_is_named():
    row = {"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "user", "content": "A."}]}
    with pytest.raises(SampleError, match="expected assistant turns only"):
        reader().read(0, row)


# --- The Cauldron ---------------------------------------------------------------------------------


def test_cauldron_exchanges_are_turns_in_order_and_the_images_go_first(collator, tmp_path: Path):
    row = {
        "images": ["images/red.png", "images/blue.png"],
        "texts": [
            {"user": "Which image is blue?", "assistant": "The second one.", "source": "x"},
            {"user": "And the first?", "assistant": "Red.", "source": "x"},
        ],
    }
    sample = reader().read(0, row)
    openai = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": str(PEERS / "images" / n)} for n in ("red.png", "blue.png")]
             + [{"type": "text", "text": "Which image is blue?"}]},
            {"role": "assistant", "content": "The second one."},
            {"role": "user", "content": "And the first?"},
            {"role": "assistant", "content": "Red."},
        ]
    }  # fmt: skip
    assert_same_batch(collator([sample]), collator([reader().read(0, openai)]))
    assert labelled(collator, collator([sample])) == "The second one.<|im_end|>\nRed.<|im_end|>\n"


def test_an_exchange_with_an_unknown_key_is_named_not_dropped():
    row = {"images": [], "texts": [{"user": "Q?", "assistant": "A.", "tool": "calc"}]}
    with pytest.raises(SampleError, match=r"unexpected key\(s\) \['tool'\]") as info:
        reader().read(0, row)
    assert info.value.field == "texts[0]"


# --- ms-swift and LLaMA-Factory -------------------------------------------------------------------


def test_swift_history_system_and_a_marker_in_a_later_turn_equal_their_openai_rewrite(collator):
    row = {
        "system": "You are terse.",
        "history": [["<image>What color is the square?", "Red."]],
        "query": "Is this one<image> blue?",
        "response": "Yes.",
        "images": ["images/red.png", "images/blue.png"],
    }
    red, blue = (str(PEERS / "images" / n) for n in ("red.png", "blue.png"))
    openai = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "What color is the square?"}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": [{"type": "text", "text": "Is this one"}, {"type": "image", "image": blue},
                                         {"type": "text", "text": " blue?"}]},
            {"role": "assistant", "content": "Yes."},
        ]
    }  # fmt: skip
    sample = reader().read(0, row)
    assert sample.format == "query_response" and sample.image_fields == ["images[0]", "images[1]"]
    assert_same_batch(collator([sample]), collator([reader().read(0, openai)]))
    assert labelled(collator, collator([sample])) == "Red.<|im_end|>\nYes.<|im_end|>\n", (
        "history answers train too"
    )


def test_swift_history_written_as_text_in_a_csv_cell_is_parsed(tmp_path: Path):
    row = {"query": "Q2?", "response": "A2.", "history": "[['Q1?', 'A1.']]"}
    messages = reader().read(0, row).messages
    assert [m["content"][0]["text"] for m in messages] == ["Q1?", "A1.", "Q2?", "A2."]


def test_alpaca_instruction_and_input_join_with_a_newline():
    row = {
        "instruction": "Describe the image.",
        "input": "Be brief.",
        "output": "A square.",
        "images": ["images/red.png"],
    }
    sample = reader().read(0, row)
    assert sample.messages[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Describe the image.\nBe brief."},
    ]


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ({"query": "Q?", "prompt": "Q?", "response": "A."}, "query", "`query` and `prompt` all name the question"),
        ({"query": "Q?", "response": "A.", "answer": "B."}, "response", "`response` and `answer` all name the answer"),
        ({"query": "Q?", "response": ["A.", "B."]}, "response", "a list of 2 answers"),
        ({"query": "<image>Q?", "response": "A.", "images": ["a.png", "b.png"]}, "images",
         "1 `<image>` placeholder(s) in the text but 2 image(s) in `images`"),
        ({"query": "Q?", "response": "A.", "photo": "images/red.png"}, "photo", "looks like images"),
        ({"query": "Q?", "response": "A.", "history": [["only a question"]]}, "history[0]", "a [question, answer] pair"),
        ({"response": "A."}, "response", "no question"),
    ],
)  # fmt: skip
def test_ambiguous_or_broken_flat_rows_get_a_named_reason(row, field, words):
    with pytest.raises(SampleError) as info:
        reader().read(0, row)
    assert info.value.field == field and words in info.value.reason


# --- Axolotl and OpenAI ---------------------------------------------------------------------------


def test_axolotl_system_content_as_a_list_and_base64_parts(collator):
    raw = (PEERS / "images" / "red.png").read_bytes()
    row = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": [{"type": "image", "base64": base64.b64encode(raw).decode()},
                                         {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ]
    }  # fmt: skip
    sample = reader().read(0, row)
    assert sample.images == [raw] and sample.image_fields == ["messages[1].content[0].base64"]
    assert sample.messages[0] == {"role": "system", "content": [{"type": "text", "text": "You are terse."}]}


def test_axolotl_url_parts_need_allow_urls_and_then_give_the_same_batch(collator, reference, monkeypatch):
    import io
    import urllib.request

    rows = [json.loads(line) for line in (PEERS / "axolotl.jsonl").read_text().splitlines()]
    rows[0]["messages"][0]["content"][0] = {"type": "image", "url": "https://example.com/red.png"}
    with pytest.raises(SampleError, match="URLs are off by default"):
        reader().read(0, rows[0])

    def fake_urlopen(request, timeout):
        assert request.full_url == "https://example.com/red.png"
        return io.BytesIO((PEERS / "images" / "red.png").read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    samples = [reader(allow_urls=True).read(i, row) for i, row in enumerate(rows)]
    assert_same_batch(collator(samples), reference)


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ({"type": "image", "base64": "@@not base64@@"}, "base64 image holds invalid base64"),
        (
            {"type": "image", "path": "images/red.png", "url": "https://x/y.png"},
            "naming its image twice (path, url)",
        ),
    ],
)
def test_a_bad_axolotl_image_part_is_named(part, words):
    row = {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "A."}]}
    with pytest.raises(SampleError) as info:
        reader().read(0, row)
    assert info.value.field.startswith("messages[0].content[0]") and words in info.value.reason


def test_embedded_and_base64_images_of_a_parquet_file_stay_in_the_dataset(tmp_path: Path):
    """Data URIs and base64 strings inside an Arrow table are decoded when opened, not held per sample."""
    from datasets import Dataset

    from vlmtune.data import RowImage
    from vlmtune.data.images import open_image

    rows = [json.loads(line) for line in (PEERS / "openai_data_uri.jsonl").read_text().splitlines()]
    for row in rows:  # Arrow holds one type per column: every content a part list
        for message in row["messages"]:
            if isinstance(message["content"], str):
                message["content"] = [{"type": "text", "text": message["content"]}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "uris.parquet"))
    split = read(tmp_path / "uris.parquet")
    sources = [source for s in split.samples for source in s.images]
    assert len(sources) == 3 and all(isinstance(source, RowImage) for source in sources)
    assert open_image(sources[0]).size == (48, 40)


# --- a 2-step train on each peer's layout ----------------------------------------------------------

# One file per peer: the batch equality above already covers the other file types of a layout.
TRAINED = [
    "trl_prompt_completion.parquet",
    "cauldron_disk",
    "swift_query_response.csv",
    "llamafactory_alpaca.json",
    "axolotl.json",
    "openai_data_uri.jsonl",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_a_two_step_train_runs_on_each_peer_layout(name: str, tmp_path: Path):
    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe

    path = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(PEERS / name), "max_image_pixels": PIXEL_BUDGET},
        train={
            "max_steps": 2,
            "batch_size": 3,
            "grad_accum": 1,
            "max_length": 128,
            "gradient_checkpointing": False,
        },
        output={"dir": str(tmp_path / "runs")},
    )
    run = pipeline.run(
        load_recipe(path), path.read_text(), "peer", tmp_path / "run", warn=lambda message: None
    )
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["status"] == "done" and summary["stages"]["train"]["steps"] == 2
    data = json.loads((run.path / "3-train" / "data_report.json").read_text())["train"]
    assert data["samples_kept"] == 3 and data["images_total"] == 3 and data["skipped_invalid"] == []
    losses = [
        json.loads(line)["loss"] for line in (run.path / "3-train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) >= 2 and all(loss == loss and loss > 0 for loss in losses)


@pytest.mark.parametrize(
    ("fmt", "row", "field", "words"),
    [
        ("auto", {"messages": 42}, "messages", "expected a non-empty list of turns, got a int"),
        (
            "exchanges",
            {"query": "Q?", "response": "A."},
            "texts",
            "expected a list of {user, assistant} pairs",
        ),
        ("prompt_completion", {"completion": "A."}, "prompt", "expected a non-empty list of turns"),
        ("query_response", {"query": "Q?"}, "answer", "missing: expected one of response"),
    ],
)
def test_a_forced_layout_that_does_not_fit_the_row_is_named(fmt, row, field, words):
    with pytest.raises(SampleError) as info:
        reader(format=fmt).read(0, row)
    assert info.value.field == field and words in info.value.reason
