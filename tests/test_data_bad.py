"""The bad-input corpus: each broken sample gets its own named reason and nothing else is lost."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vlmtune.data.preflight import check_split, read_split, scan_split
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection

from conftest import PIXEL_BUDGET, ROOT

BAD = ROOT / "tests" / "data" / "bad"
TRAIN = BAD / "train.jsonl"
MAX_LENGTH = 200
GOOD = [0, 5, 20, 25]

# index -> (field, words of the reason). One entry per broken line of tests/data/bad/train.jsonl.
EXPECTED = {
    1: ("messages[0].content[0].image", "file not found"),
    2: ("messages[0].content[0].image", "truncated image data"),
    3: ("messages[0].content[0].image", "empty file (0 bytes)"),
    4: ("messages[0].content[0].image", "not an image Pillow can read"),
    6: ("images", "2 `<image>` placeholder(s) in the text but 1 image(s) in `images`"),
    7: ("images", "1 image part(s) without an inline source but 0 image(s) in `images`"),
    8: ("messages", "no assistant turn"),
    9: ("messages[0].role", "unknown role 'robot'"),
    10: ("messages", "expected a non-empty list of turns, got empty"),
    11: ("messages[0].content", "expected a string or a list of parts, got int"),
    12: ("images", "expected an image or a list of images, got int"),
    13: ("messages[0].content[0].image", "image is 40000x8 pixels, a side over data.max_image_side=16384"),
    14: ("messages[0].content[0].image", "decompression bomb"),
    15: ("tokens", f"> max_length {MAX_LENGTH}"),
    16: ("line 17", "not valid UTF-8"),
    17: ("line 18", "not valid JSON"),
    18: ("messages[0].content[0].image", "escapes the image root"),
    19: ("messages[0].content[0].image", "set data.allow_urls: true"),
    21: ("sample", "expected an object (a JSON dict), got list"),
    22: ("processor", "aspect ratio must be smaller than 200"),
    23: ("messages[0].role", "missing; each turn needs a `role`"),
    24: ("messages", "every assistant turn is empty"),
}


@pytest.fixture(scope="module", params=["fast", "processor", "fast with workers"])
def arm(request, tiny_path):
    """Every bad sample gets the same named reason whether lengths come from image sizes (the default,
    images proven whole without decoding, in this process or in workers) or from the processor with
    every image decoded."""
    from vlmtune.data.collator import VisionCollator
    from vlmtune.data.lengths import TokenCounter
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    family = get_family("qwen2_vl")
    processor = load_processor(tiny_path("qwen2_vl"), family, PIXEL_BUDGET)
    collator = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)
    if request.param == "processor":
        return collator.count_tokens, 0
    return TokenCounter(collator), 2 if request.param == "fast with workers" else 0


@pytest.fixture(scope="module")
def measure(arm):
    return arm[0]


def lenient(**changes) -> DataSection:
    keys = {"on_bad_sample": "skip", "too_long": "drop", "max_image_pixels": PIXEL_BUDGET, **changes}
    return DataSection(train=str(TRAIN), **keys)


@pytest.fixture(scope="module")
def workers(arm):
    return arm[1]


@pytest.fixture(scope="module")
def report(measure, workers):
    return scan_split("train", str(TRAIN), lenient(check_workers=workers), MAX_LENGTH, measure)


def test_the_corpus_is_what_make_data_writes(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "tests" / "data" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    lines = [x if isinstance(x, bytes) else json.dumps(x).encode() for _, x in make_data.BAD_LINES]
    assert TRAIN.read_bytes() == b"".join(line + b"\n" for line in lines)
    assert len(lines) == len(EXPECTED) + len(GOOD)


def test_every_good_sample_survives_the_bad_ones(report):
    assert report.total == 26
    assert [s.index for s in report.samples] == GOOD
    assert [s.n_images for s in report.samples] == [1, 0, 2, 1]


@pytest.mark.parametrize("index", sorted(EXPECTED))
def test_each_bad_sample_gets_its_named_reason(report, index):
    found = [p for p in report.problems if p.index == index]
    assert len(found) == 1, f"sample {index}: exactly one problem, got {found}"
    field, words = EXPECTED[index]
    assert found[0].field == field
    assert words in found[0].reason


def test_no_problem_is_reported_twice_or_for_a_good_sample(report):
    assert sorted(p.index for p in report.problems) == sorted(EXPECTED)


def test_on_bad_sample_error_stops_listing_every_invalid_sample(measure):
    with pytest.raises(DataError) as info:
        check_split("train", str(TRAIN), lenient(on_bad_sample="error"), MAX_LENGTH, measure)
    message = str(info.value)
    assert f"{len(EXPECTED) - 1} of 26 samples are invalid" in message  # the too-long one is not invalid
    for index in sorted(EXPECTED)[:20]:
        if index != 15:
            assert f"sample {index}:" in message
    assert "and 1 more" in message and "data.on_bad_sample: skip" in message


def test_skip_and_drop_train_on_the_rest_with_everything_listed(measure):
    report = check_split("train", str(TRAIN), lenient(), MAX_LENGTH, measure)
    summary = json.loads(json.dumps(report.to_json()))
    assert summary["samples_total"] == 26 and summary["samples_kept"] == 4
    assert len(summary["skipped_invalid"]) == len(EXPECTED) - 1
    assert summary["dropped_too_long"] == [
        {"index": 15, "field": "tokens", "reason": summary["dropped_too_long"][0]["reason"]}
    ]


def test_too_long_error_names_the_sample_and_the_fix(measure):
    with pytest.raises(DataError, match=r"1 sample\(s\) exceed train.max_length=200; the first is sample 15"):
        check_split("train", str(TRAIN), lenient(too_long="error"), MAX_LENGTH, measure)


def test_load_split_without_a_model_finds_the_same_invalid_samples():
    split = read_split(str(TRAIN), DataSection(train="x", on_bad_sample="skip"))
    assert sorted(p.index for p in split.problems) == sorted(set(EXPECTED) - {15, 22}), (
        "token length and processor limits need the model; everything else is found without it"
    )


# --- whole-file problems: one clear error, not a traceback ---------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("train.txt", b"hello", "unsupported data file type '.txt'"),
        ("train.json", b'{"messages": []}', "must hold a JSON list of samples"),
        ("train.json", b"[{", "is not valid JSON"),
        ("train.json", b"[\xff]", "is not valid UTF-8"),
        ("train.csv", b"question,answer\nq,caf\xe9\n", "not valid UTF-8"),
        ("train.parquet", b"not parquet", "is not a readable parquet file"),
        ("train.arrow", b"not arrow", "is not an Arrow file written by datasets"),
    ],
)
def test_unreadable_files_are_one_clear_error(tmp_path: Path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_split(str(tmp_path / name), DataSection(train="x"))


def test_a_folder_that_is_not_a_saved_dataset_is_named(tmp_path: Path):
    with pytest.raises(DataError, match="not a dataset written by datasets' save_to_disk"):
        read_split(str(tmp_path), DataSection(train="x"))


def test_a_file_with_no_usable_sample_says_so(tmp_path: Path):
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(DataError, match="no usable samples"):
        read_split(str(tmp_path / "train.jsonl"), DataSection(train="x", on_bad_sample="skip"))


def test_max_image_side_is_a_recipe_knob(tmp_path: Path):
    split = read_split(str(TRAIN), DataSection(train=str(TRAIN), on_bad_sample="skip", max_image_side=40_000))
    reason = next(p.reason for p in split.problems if p.index == 13)
    assert "max_image_side" not in reason and "truncated" in reason, (
        "40000x8 passes a 40000 side limit, so the file is decoded, and its missing pixels are found"
    )
    small = read_split(str(TRAIN), DataSection(train=str(TRAIN), on_bad_sample="skip", max_image_side=50))
    assert 20 in {p.index for p in small.problems}, "good2.png is 40x56: over a 50-pixel side"
