"""The fast pre-flight: the same report as decoding every image and running the processor, without doing it.

Token counts from image sizes equal the processor's for every family; images are proven whole from
their bytes, catching every bad kind the corpus holds; worker processes change nothing but the time;
and `vlmtune data check` says what training would do with the recipe's policies.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import spawn

from vlmtune.data import Sample, preflight
from vlmtune.data.images import ImageProblem, image_size
from vlmtune.data.lengths import TokenCounter
from vlmtune.data.preflight import scan_split
from vlmtune.model.families import family_names, get_family
from vlmtune.recipe import DataSection

from conftest import PIXEL_BUDGET, ROOT, write_recipe

BAD = ROOT / "tests" / "data" / "bad"
FORMATS = ROOT / "tests" / "data" / "formats"
# (width, height): tiny, odd, extreme-ish and large sizes, both orientations
SIZES = [(56, 56), (90, 30), (30, 90), (17, 41), (200, 130), (640, 480), (480, 640), (1200, 900), (500, 1400)]


def collator_of(family: str, budget: int | None, tiny_path):
    from vlmtune.data.collator import VisionCollator
    from vlmtune.model.processing import load_processor

    record = get_family(family)
    processor = load_processor(tiny_path(family), record, budget)
    return VisionCollator(processor, record, max_length=None, train_on_responses_only=True)


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def samples_of_every_shape() -> list[tuple[Sample, list[tuple[int, int]]]]:
    """One image of each size, two images of different sizes, an image in a later turn, text only."""
    from PIL import Image

    def sample(messages: list[dict], sizes: list[tuple[int, int]]):
        return Sample(0, messages, [Image.new("RGB", size) for size in sizes]), sizes

    shapes = [sample([user("What is it?\n\n", 1), assistant("A square.\n")], [size]) for size in SIZES]
    shapes.append(sample([user("Compare them.", 2), assistant("Same.")], [(640, 480), (90, 30)]))
    shapes.append(
        sample([user("Hi"), assistant("Hello."), user("And this?", 1), assistant("Red.")], [(300, 200)])
    )
    shapes.append(sample([user("Say hi."), assistant("Hi!")], []))
    return shapes


@pytest.mark.parametrize("budget", [None, 4000])
@pytest.mark.parametrize("family", family_names())
def test_token_counts_from_image_sizes_equal_the_processors(family: str, budget, tiny_path):
    collator = collator_of(family, budget, tiny_path)
    counter = TokenCounter(collator)
    for sample, sizes in samples_of_every_shape():
        try:
            exact = collator.count_tokens(sample)
        except Exception:  # the processor refuses it (PaliGemma wants an image): the counter defers
            exact = None
        assert counter.count([sample], [sizes]) == [exact], (family, sizes)


def test_count_only_families_stop_probing_once_the_pattern_is_confirmed(tiny_path):
    counter = TokenCounter(collator_of("qwen2_vl", None, tiny_path))
    for width in range(100, 1100, 50):
        counter.replacement(width, 480)
    assert counter.probes == 2, "two counts confirm prefix + token x count + suffix; the rest are written"
    assert counter.replacement(1100, 480) == "<|image_pad|>" * counter.family.tokens_per_image(
        1100, 480, counter.settings
    )


# --- images proven whole without decoding ----------------------------------------------------------

BAD_KINDS = {
    "truncated.png": "truncated image data",
    "empty.png": "empty file (0 bytes)",
    "not_an_image.jpg": "not an image Pillow can read",
    "bomb.png": "decompression bomb",
    "huge_side.png": "a side over data.max_image_side=16384",
}


@pytest.mark.parametrize("decode", [False, True], ids=["fast", "decoded"])
@pytest.mark.parametrize("name", sorted(BAD_KINDS))
def test_every_bad_image_kind_of_the_corpus_is_caught_without_decoding(name, decode):
    with pytest.raises(ImageProblem, match=BAD_KINDS[name].replace("(", r"\(").replace(")", r"\)")):
        image_size(str(BAD / "images" / name), max_side=16384, decode=decode)


@pytest.mark.parametrize("decode", [False, True], ids=["fast", "decoded"])
def test_a_png_declaring_more_pixels_than_it_holds_is_caught(decode):
    """huge_side.png under a raised side limit: valid chunks, far too few bytes for 40000x8 pixels."""
    with pytest.raises(ImageProblem, match="truncated image data"):
        image_size(str(BAD / "images" / "huge_side.png"), max_side=40_000, decode=decode)


def encoded(kind: str) -> bytes:
    from PIL import Image

    rng = random.Random(0)
    image = Image.frombytes("RGB", (96, 64), bytes(rng.randrange(256) for _ in range(96 * 64 * 3)))
    buffer = io.BytesIO()
    options = {"jpeg": ("JPEG", {}), "progressive": ("JPEG", {"progressive": True}), "png": ("PNG", {})}
    image.save(buffer, options[kind][0], **options[kind][1])
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "progressive", "png"])
def test_a_file_cut_anywhere_is_caught_as_decoding_catches_it(kind):
    data = encoded(kind)
    assert image_size(data) == image_size(data, decode=True) == (96, 64)
    for cut in range(100, len(data), 97):
        with pytest.raises(ImageProblem, match="truncated image data|cannot decode|cannot read"):
            image_size(data[:cut])
        with pytest.raises(ImageProblem):
            image_size(data[:cut], decode=True)


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_the_size_is_the_upright_one_as_decoding_gives_it(kind, tmp_path: Path):
    """Orientation 6 (a phone photo held upright): width and height swap, with or without decoding."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo.{kind}"
    Image.new("RGB", (80, 30), (200, 30, 30)).save(path, exif=exif.tobytes())
    assert image_size(str(path)) == image_size(str(path), decode=True) == (30, 80)


def test_only_a_full_decode_catches_compressed_pixels_cut_short_behind_valid_checksums():
    """The documented difference between data.image_check fast and full: a writer that cut the
    compressed stream and still wrote valid chunks (checksums, IEND) around it."""
    data = encoded("png")
    at = data.index(b"IDAT")  # the chunk's type; its length is the 4 bytes before, its data follows
    length = struct.unpack(">I", data[at - 4 : at])[0]
    kept = data[at + 4 : at + 4 + length * 6 // 10]
    chunk = struct.pack(">I", len(kept)) + b"IDAT" + kept + struct.pack(">I", zlib.crc32(b"IDAT" + kept))
    cut = data[: at - 4] + chunk + data[at + 8 + length :]
    assert image_size(cut) == (96, 64), "every chunk whole, enough bytes for the pixels"
    with pytest.raises(ImageProblem, match="truncated image data|cannot decode"):
        image_size(cut, decode=True)


# --- the scan: same report whatever runs it --------------------------------------------------------


def write_set(folder: Path, samples: int) -> Path:
    """``samples`` samples over images of several sizes, a few of them broken."""
    from PIL import Image

    (folder / "images").mkdir()
    for i, size in enumerate([(48, 40), (90, 30), (200, 130), (30, 90)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(
            folder / "images" / f"{i}.{'png' if i % 2 else 'jpg'}"
        )
    (folder / "images" / "broken.jpg").write_bytes((folder / "images" / "0.jpg").read_bytes()[:300])
    names = ["0.jpg", "1.png", "2.jpg", "3.png"]
    lines = []
    for i in range(samples):
        chosen = [names[(i + k) % 4] for k in range(i % 3)]
        if i % 97 == 5:
            chosen = ["broken.jpg"]
        text = "why " * (300 if i % 89 == 7 else 3)
        parts = [{"type": "image", "image": f"images/{n}"} for n in chosen] + [{"type": "text", "text": text}]
        lines.append(
            json.dumps({"messages": [{"role": "user", "content": parts}, assistant(f"Answer {i}.")]})
        )
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def qwen(tiny_path):
    return collator_of("qwen2_vl", PIXEL_BUDGET, tiny_path)


def section(path: Path, **keys) -> DataSection:
    return DataSection(train=str(path), **{"max_image_pixels": PIXEL_BUDGET, **keys})


def test_the_fast_scan_in_workers_gives_the_processors_report(qwen, tmp_path: Path):
    path = write_set(tmp_path, 300)
    exact = scan_split("train", str(path), section(path, check_workers=0), 200, qwen.count_tokens)
    fast = scan_split("train", str(path), section(path, check_workers=0), 200, TokenCounter(qwen))
    parallel = scan_split("train", str(path), section(path, check_workers=2), 200, TokenCounter(qwen))
    reports = [json.loads(json.dumps(r.to_json())) for r in (exact, fast, parallel)]
    for report in reports:
        report.pop("tokens_measured_by")
    assert reports[0] == reports[1] == reports[2]
    assert (
        reports[0]["samples_kept"] < 300 and reports[0]["skipped_invalid"] and reports[0]["dropped_too_long"]
    )
    assert [s.index for s in parallel.samples] == [s.index for s in exact.samples], (
        "kept in the order of the data"
    )
    assert fast.measured_by.startswith("image sizes (checked against the processor")


def test_the_fast_scan_decodes_no_image_beyond_the_first_checked_samples(qwen, tmp_path: Path, monkeypatch):
    path = write_set(tmp_path, 400)
    opened = []
    real = preflight.open_image
    monkeypatch.setattr(
        preflight, "open_image", lambda source, **kw: opened.append(source) or real(source, **kw)
    )
    report = scan_split("train", str(path), section(path), 200, TokenCounter(qwen))
    assert report.total == 400 and len(opened) <= 2 * (preflight.VERIFY_SAMPLES + 2)


def test_a_fast_count_that_disagrees_with_the_processor_hands_the_split_to_the_processor(
    qwen, tmp_path, monkeypatch
):
    path = write_set(tmp_path, 100)
    real = TokenCounter.count
    monkeypatch.setattr(TokenCounter, "count", lambda self, s, z: [n and n + 1 for n in real(self, s, z)])
    report = scan_split("train", str(path), section(path), 200, TokenCounter(qwen))
    assert report.measured_by.startswith("the processor: the count from image sizes disagreed on sample")
    assert report.lengths == scan_split("train", str(path), section(path), 200, qwen.count_tokens).lengths


def test_chunks_in_flight_stay_bounded_with_workers(qwen):
    checker = preflight.FastChecker(preflight.ImageRules(16384, PIXEL_BUDGET, False), TokenCounter(qwen))
    sample = Sample(0, [user("Hi"), assistant("Hello.")], [])
    pulled = 0

    def chunks():
        nonlocal pulled
        for _ in range(40):
            pulled += 1
            yield [(0, sample)] * 8

    consumed = 0
    for _, outcomes in preflight._checked(chunks(), checker, workers=2):
        consumed += 1
        assert pulled - consumed <= 2 * 2, "at most two chunks per worker wait"
        assert [o.length for o in outcomes] == [outcomes[0].length] * 8
    assert consumed == 40


def test_the_progress_bar_shows_samples_per_second(qwen, tmp_path: Path):
    from rich.console import Console

    path = write_set(tmp_path, 150)
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    scan_split("train", str(path), section(path), 200, TokenCounter(qwen), console=terminal)
    assert "samples/s" in terminal.file.getvalue()


# --- data check says what training would do -------------------------------------------------------


def vlmtune(*args: str) -> subprocess.CompletedProcess:
    return spawn.run([sys.executable, "-m", "vlmtune", *args], capture_output=True, text=True, cwd=ROOT)


def bad_recipe(folder: Path, **data) -> Path:
    keys = {"train": str(BAD / "train.jsonl"), "max_image_pixels": PIXEL_BUDGET, **data}
    return write_recipe(folder, model={"name": "tiny:qwen2_vl"}, data=keys, train={"max_length": 200})


def test_data_check_with_skip_and_drop_lists_what_training_leaves_out_and_exits_zero(tmp_path: Path):
    result = vlmtune("data", "check", str(bad_recipe(tmp_path, on_bad_sample="skip", too_long="drop")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "26 read, 4 usable" in result.stdout
    assert "skipped sample 1: messages[0].content[0].image: file not found" in result.stdout
    assert "dropped sample 15: tokens: 943 tokens" in result.stdout
    assert "training would go on without the samples listed above: 4 of 26 in train" in result.stdout
    assert "problem sample" not in result.stderr and "Traceback" not in result.stderr


def test_data_check_exits_two_when_a_policy_is_left_at_error_and_hints_only_that_one(tmp_path: Path):
    result = vlmtune("data", "check", str(bad_recipe(tmp_path, on_bad_sample="skip")))
    assert result.returncode == 2
    assert "1 problem sample(s) (1 in train)" in result.stderr
    assert "data.too_long: drop" in result.stderr and "on_bad_sample" not in result.stderr
    assert "  x sample 15: tokens:" in result.stdout and "skipped sample 1:" in result.stdout


def test_data_check_full_decode_is_a_switch(tmp_path: Path):
    recipe = write_recipe(
        tmp_path, model={"name": "tiny:qwen2_vl"}, data={"train": str(FORMATS / "messages.jsonl")}
    )
    fast = json.loads(vlmtune("data", "check", str(recipe), "--json").stdout)["train"]
    full = json.loads(vlmtune("data", "check", str(recipe), "--json", "--full-decode").stdout)["train"]
    assert (fast["image_check"], full["image_check"]) == ("fast", "full")
    assert fast["tokens"] == full["tokens"] and fast["samples_kept"] == full["samples_kept"] == 3


@pytest.mark.parametrize("name", ["cauldron.parquet", "trl_prompt_completion_parts_disk"])
def test_workers_open_images_kept_inside_a_dataset(qwen, name):
    """Samples reach the workers with row references into the memory-mapped dataset, not image bytes."""
    path = ROOT / "tests" / "data" / "peers" / name
    serial = scan_split("train", str(path), section(path, check_workers=0), 200, TokenCounter(qwen))
    parallel = scan_split("train", str(path), section(path, check_workers=2), 200, TokenCounter(qwen))
    assert parallel.to_json() == serial.to_json() and serial.to_json()["images_total"] == 3
