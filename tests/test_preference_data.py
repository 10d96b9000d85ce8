"""Preference layouts: every one reads to the same batch as the same pairs in TRL's layout, and a
pair that cannot teach a preference is refused with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmtune.data import SampleError
from vlmtune.data.preference import PairReader, looks_like_pair
from vlmtune.data.preflight import check_split, scan_split
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection

from conftest import ROOT

PREFERENCE = ROOT / "tests" / "data" / "preference"
IMAGES = PREFERENCE / "images"
BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask", "pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def collator(tiny_path):
    from vlmtune.data.preference_collator import PreferenceCollator
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    family = get_family("qwen2_vl")
    return PreferenceCollator(load_processor(tiny_path("qwen2_vl"), family, 12544), family, max_length=None)


def read_pairs(path: Path, **data):
    return check_split("train", str(path), DataSection(train=str(path), **data), reader=PairReader)


@pytest.fixture(scope="module")
def reference():
    return read_pairs(PREFERENCE / "trl.jsonl").samples


def assert_same_batch(batch: dict, expected: dict) -> None:
    import torch

    assert set(batch) == set(expected)
    for key in BATCH_KEYS:
        assert torch.equal(batch[key], expected[key]), key


# (file, recipe data keys, layout of each pair, which of trl.jsonl's pairs it holds)
LAYOUTS = [
    ("trl_strings.jsonl", {}, ["trl"] * 3, [0, 1, 2]),
    ("trl_implicit.jsonl", {}, ["trl"] * 3, [0, 1, 2]),
    ("llamafactory.json", {}, ["sharegpt"] * 3, [0, 1, 2]),
    ("swift.jsonl", {}, ["swift"] * 3, [0, 1, 2]),
    ("columns.jsonl", {"columns": {"system": "system"}}, ["columns"] * 2, [0, 1]),
    ("rlaif_v.parquet", {}, ["columns"], [0]),
]


@pytest.mark.parametrize(("name", "data", "layouts", "held"), LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_each_preference_layout_collates_to_the_same_batch_as_trl(
    collator, reference, name, data, layouts, held
):
    split = read_pairs(PREFERENCE / name, **data)
    assert split.problems == [] and [p.format for p in split.samples] == layouts
    assert_same_batch(collator(split.samples), collator([reference[i] for i in held]))


def test_the_trl_reference_holds_what_the_others_are_compared_with(reference, collator):
    assert [p.n_images for p in reference] == [1, 2, 0]
    assert reference[1].images == [str(IMAGES / "red.png"), str(IMAGES / "blue.png")]
    assert reference[1].image_fields == ["images[0]", "images[1]"]
    assert [m["role"] for m in reference[1].prompt] == ["system", "user"]
    assert [m["role"] for m in reference[2].prompt] == ["user", "assistant", "user"]
    assert [(p.answer_text("chosen"), p.answer_text("rejected")) for p in reference] == [
        ("Red.", "Blue."), ("The first.", "The second."), ("Four.", "Three."),
    ]  # fmt: skip
    batch = collator(reference)
    texts = [collator.answers.tokenizer.decode(ids[mask.bool()]) for ids, mask in
             zip(batch["input_ids"], batch["completion_mask"], strict=True)]  # fmt: skip
    assert texts == [
        f"{a}<|im_end|>\n" for a in ("Red.", "The first.", "Four.", "Blue.", "The second.", "Three.")
    ]


def test_rlaif_v_images_stay_in_the_parquet_rows():
    from vlmtune.data import RowImage

    (pair,) = read_pairs(PREFERENCE / "rlaif_v.parquet").samples
    assert isinstance(pair.images[0], RowImage) and pair.images[0].path == ("image",)
    assert pair.images[0].fetch() == (IMAGES / "red.png").read_bytes()


def test_data_format_sharegpt_splits_markers_and_messages_keeps_them_as_text(tmp_path: Path):
    record = json.loads((PREFERENCE / "trl_strings.jsonl").read_text().splitlines()[0])
    record["prompt"][0]["content"] = "Look: <image> What color is the square?"
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    shutil.copytree(IMAGES, tmp_path / "images")  # a link out of the image root needs data.follow_symlinks
    (split_here,) = read_pairs(path).samples  # auto: a marker in TRL string content is where the image goes
    assert split_here.prompt[0]["content"] == [
        {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " What color is the square?"},
    ]  # fmt: skip
    assert read_pairs(path, format="sharegpt").samples[0].prompt == split_here.prompt
    as_text = scan_split(
        "train", str(path), DataSection(train=str(path), format="messages"), reader=PairReader
    )
    assert as_text.samples[0].prompt[0]["content"][0]["type"] == "image"  # TRL's rule: images first
    assert as_text.samples[0].prompt[0]["content"][1]["text"] == "Look: <image> What color is the square?"


# --- refused pairs, each with its reason ------------------------------------------------------------

GOOD = {"images": ["images/red.png"], "prompt": [{"role": "user", "content": "What color?"}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Blue."}]}  # fmt: skip
BAD = [
    ({"rejected": [{"role": "assistant", "content": " Red. "}]}, "rejected",
     "the chosen and rejected answers are identical: the pair teaches nothing"),
    ({"chosen": [{"role": "assistant", "content": "  "}]}, "chosen", "empty chosen answer"),
    ({"rejected": ""}, "rejected", "empty rejected answer"),
    ({"images": ["images/missing.png"]}, "images[0]", "not found"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], "images": []},
     "images", "1 image part(s) without an inline source but 0 image(s)"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "prompt",
     "the prompt must end with a user turn"),
    ({"chosen": [{"role": "user", "content": "Red."}]}, "chosen[0]", "an answer must be an assistant turn"),
    ({"chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}, "chosen[0].content[0]",
     "an answer holds text parts only"),
    ({"prompt": [{"role": "robot", "content": "Q"}]}, "prompt[0].role", "unknown role 'robot'"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field", "reason"), BAD, ids=[b[2][:30] for b in BAD])
def test_a_broken_pair_is_refused_with_its_field_and_reason(tmp_path: Path, change, field, reason):
    shutil.copytree(IMAGES, tmp_path / "images")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **change}) + "\n")
    split = scan_split("train", str(path), DataSection(train=str(path)), reader=PairReader)
    assert len(split.samples) == 1 and len(split.skipped) == 1
    problem = split.skipped[0]
    assert (problem.index, problem.field) == (1, field) and reason in problem.reason
    with pytest.raises(DataError, match="1 of 2 samples are invalid"):
        read_pairs(path)


def test_an_unknown_layout_names_the_layouts_it_knows():
    reader = PairReader.from_section(DataSection(train="x"), PREFERENCE)
    with pytest.raises(SampleError, match=r"prompt/chosen/rejected \(TRL\).*rejected_response \(ms-swift\)"):
        reader.read(0, {"messages": [{"role": "user", "content": "Q"}]})


def test_looks_like_pair_tells_pairs_from_sft_samples():
    assert looks_like_pair(GOOD) and looks_like_pair({"messages": [], "rejected_response": "x"})
    assert not looks_like_pair({"messages": []}) and not looks_like_pair("text")


def test_too_long_pairs_are_measured_on_their_longer_side_and_follow_too_long(collator):
    pairs = read_pairs(PREFERENCE / "trl.jsonl").samples
    lengths = [collator.count_tokens(p) for p in pairs]
    chosen_only = [collator.answers.count_tokens(p.side("chosen")) for p in pairs]
    rejected_only = [collator.answers.count_tokens(p.side("rejected")) for p in pairs]
    assert lengths == [max(c, r) for c, r in zip(chosen_only, rejected_only, strict=True)]
    limit = sorted(lengths)[1]  # the longest pair is over it
    data = DataSection(train="x", too_long="drop")
    kept = check_split(
        "train", str(PREFERENCE / "trl.jsonl"), data, limit, collator.count_tokens, reader=PairReader
    )
    assert len(kept.samples) == 2 and [p.index for p in kept.too_long] == [lengths.index(max(lengths))]
    assert f"> max_length {limit}" in kept.too_long[0].reason
    with pytest.raises(DataError, match="exceed train.max_length"):
        check_split("train", str(PREFERENCE / "trl.jsonl"), DataSection(train="x"), limit, collator.count_tokens,
                    reader=PairReader)  # fmt: skip


# --- the committed files are what their scripts write ---------------------------------------------


def test_the_preference_fixtures_are_what_make_preference_data_writes(tmp_path: Path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_preference_data", PREFERENCE.parent / "make_preference_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.write()
    for name in ("trl.jsonl", "trl_strings.jsonl", "trl_implicit.jsonl", "swift.jsonl", "columns.jsonl",
                 "llamafactory.json"):  # fmt: skip
        assert (tmp_path / name).read_text() == (PREFERENCE / name).read_text(), name
    for name in ("red.png", "blue.png"):
        assert (tmp_path / "images" / name).read_bytes() == (IMAGES / name).read_bytes(), name


def test_the_demo_pairs_are_what_make_demo_pairs_writes(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    demo = ROOT / "data" / "demo"
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(demo / name, tmp_path / name)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_pairs.py"), str(tmp_path)], check=True)
    for name in ("pairs.jsonl", "eval_pairs.jsonl"):
        assert (tmp_path / name).read_text() == (demo / name).read_text(), name
    pairs = read_pairs(demo / "pairs.jsonl").samples
    assert len(pairs) == 48 and all(p.answer_text("chosen") != p.answer_text("rejected") for p in pairs)
    # Only what the question asks about changes: "The circle is yellow." vs "The circle is red."
    first = pairs[0]
    assert (first.answer_text("chosen"), first.answer_text("rejected")) == (
        "The circle is yellow.",
        "The circle is red.",
    )
