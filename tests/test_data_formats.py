"""Every layout and file type vlmtune reads collates to the same batch as the OpenAI messages file."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest

from vlmtune.data import RowImage, Sample, SampleError, SampleReader, open_records
from vlmtune.data.images import ImageProblem, UrlImage, open_image, resolve_source
from vlmtune.data.preflight import read_split, scan_split
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection

from conftest import PIXEL_BUDGET, ROOT

DATA = ROOT / "tests" / "data"
FORMATS = DATA / "formats"
IMAGES = FORMATS / "images"
LLAMAFACTORY = DATA / "llamafactory" / "mllm_demo.json"
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw")


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


def assert_same_batch(batch: dict, reference: dict) -> None:
    import torch

    for key in BATCH_KEYS:
        assert torch.equal(batch[key], reference[key]), key


# (file under tests/data/formats, recipe data keys, the layout each sample is read as)
SAME_CONTENT = [
    ("trl.jsonl", {}, ["messages"] * 3),
    ("sharegpt.json", {}, ["sharegpt"] * 3),
    ("llamafactory.json", {}, ["sharegpt", "sharegpt", "messages"]),  # text-only: both layouts agree
    (
        "columns.csv",
        {"columns": {"image": "picture", "question": "query", "answer": "label"}},
        ["columns"] * 3,
    ),
    ("columns.parquet", {"columns": {"image": "images"}}, ["columns"] * 3),
    ("trl.parquet", {}, ["messages"] * 3),
    ("disk", {}, ["messages"] * 3),
    ("disk/train/data-00000-of-00001.arrow", {}, ["messages"] * 3),
]


@pytest.mark.parametrize(("name", "data", "layouts"), SAME_CONTENT, ids=[c[0] for c in SAME_CONTENT])
def test_each_layout_collates_to_the_same_batch_as_openai_messages(collator, reference, name, data, layouts):
    split = read(FORMATS / name, **data)
    assert split.problems == [] and split.total == 3
    assert [s.format for s in split.samples] == layouts
    assert [s.n_images for s in split.samples] == [1, 2, 0]
    assert_same_batch(collator(split.samples), reference)


def test_the_reference_file_holds_what_the_others_are_compared_with(reference, collator):
    samples = read(FORMATS / "messages.jsonl").samples
    assert [s.n_images for s in samples] == [1, 2, 0]
    # Inline path, image_url part and data URI: paths resolve next to the file, the URI to bytes.
    assert samples[1].images[0] == str(IMAGES / "red.png") and isinstance(samples[1].images[1], bytes)
    assert samples[1].image_fields == ["messages[0].content[0].image_url.url", "messages[0].content[1].image"]
    texts = [collator.tokenizer.decode(row[row != -100]) for row in reference["labels"]]
    assert texts == ["Red.<|im_end|>\n", "The second one.<|im_end|>\n", "Hi!<|im_end|>\n"]


def test_explicit_format_overrides_detection(tmp_path: Path):
    split = read_split(
        str(FORMATS / "llamafactory.json"), DataSection(train="x", format="messages", on_bad_sample="skip")
    )
    # Read as OpenAI messages, `<image>` is plain text and the images go first, as TRL reads strings.
    assert split.problems == []
    assert split.samples[1].messages[0]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "<image><image>Which image is blue?"},
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"sample 0: answer: column missing"):
        read_split(str(FORMATS / "trl.jsonl"), DataSection(train="x", format="columns"))


# --- LLaMA-Factory's own demo file, as its users have it -----------------------------------------


def test_llamafactory_mllm_demo_loads_as_users_have_it(collator):
    split = read(LLAMAFACTORY)
    assert split.total == len(split.samples) == 6 and split.problems == []
    assert [s.n_images for s in split.samples] == [2, 1, 1, 2, 1, 1]
    first = split.samples[0]
    assert first.format == "sharegpt"
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]
    # "<image>Who are they?" and "What are they doing?<image>": each image lands where its marker was.
    assert first.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Who are they?"}]
    assert first.messages[2]["content"] == [
        {"type": "text", "text": "What are they doing?"},
        {"type": "image"},
    ]
    assert first.images == [str(LLAMAFACTORY.parent / "mllm_demo_data" / "1.jpg")] * 2
    batch = collator(split.samples)
    assert batch["image_grid_thw"].shape[0] == 8, "every image of the six samples reaches the processor"


def test_llamafactory_demo_equals_its_openai_rewrite(collator, tmp_path: Path):
    row = json.loads(LLAMAFACTORY.read_text())[0]
    image = str(LLAMAFACTORY.parent / "mllm_demo_data" / "1.jpg")
    openai = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Who are they?"}],
            },
            {"role": "assistant", "content": row["messages"][1]["content"]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What are they doing?"},
                    {"type": "image", "image": image},
                ],
            },
            {"role": "assistant", "content": row["messages"][3]["content"]},
        ]
    }
    (tmp_path / "openai.jsonl").write_text(json.dumps(openai) + "\n")
    assert_same_batch(
        collator(read(LLAMAFACTORY).samples[:1]), collator(read(tmp_path / "openai.jsonl").samples)
    )


# --- columns: mapped names, captioning prompt, system ---------------------------------------------


def test_captioning_columns_use_the_fixed_prompt_and_a_system_column(tmp_path: Path):
    rows = [{"img": "images/red.png", "caption": "A red square.", "sys": "Be brief."}]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes((IMAGES / "red.png").read_bytes())
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"image": "img", "question": None, "answer": "caption", "system": "sys"}
    sample = read(tmp_path / "captions.jsonl", columns=columns, prompt="Describe the image.").samples[0]
    assert sample.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]
    assert sample.images == [str(tmp_path / "images" / "red.png")]


def test_a_mistyped_image_column_is_a_problem_not_a_silent_text_only_set(tmp_path: Path):
    (tmp_path / "vqa.jsonl").write_text(
        json.dumps({"picture": "a.png", "question": "Q?", "answer": "A."}) + "\n"
    )
    with pytest.raises(DataError, match=r"picture: looks like images, .*data.columns.image: picture"):
        read(tmp_path / "vqa.jsonl")
    scan = scan_split(
        "train", str(tmp_path / "vqa.jsonl"), DataSection(train="x", columns={"image": "picture"})
    )
    assert [(p.field, p.reason.split(":")[0]) for p in scan.skipped] == [("picture", "file not found")], (
        "mapped, the column is read as the images"
    )


def test_prompt_and_question_column_together_are_refused_by_the_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="give one"):
        DataSection(train="x", prompt="Describe.")
    assert DataSection(train="x", columns={"question": None}, prompt="Describe.").columns == {
        "image": "image",
        "question": None,
        "answer": "answer",
        "system": None,
    }


# --- image sources --------------------------------------------------------------------------------


def pixels(image) -> bytes:
    return image.convert("RGB").tobytes()


def test_every_kind_of_image_source_gives_the_same_pixels(tmp_path: Path):
    from PIL import Image

    red = IMAGES / "red.png"
    raw = red.read_bytes()
    kinds = {
        "relative path": "images/red.png",
        "absolute path": str(red),
        "file URI": f"file://{red}",
        "raw bytes": raw,
        "data URI": "data:image/png;base64," + base64.b64encode(raw).decode(),
        "datasets dict with bytes": {"bytes": raw, "path": "ignored.png"},
        "datasets dict with a path": {"bytes": None, "path": "images/red.png"},
        "PIL image": Image.open(red),
    }
    expected = pixels(Image.open(red))
    for kind, value in kinds.items():
        source = resolve_source(value, FORMATS, allow_urls=False, url_timeout=1.0)
        assert pixels(open_image(source)) == expected, kind


def test_transparency_composites_on_white_and_every_mode_becomes_rgb():
    rgba = open_image(str(IMAGES / "rgba.png"))
    assert (
        rgba.mode == "RGB"
        and rgba.getpixel((0, 0)) == (255, 255, 255)
        and rgba.getpixel((20, 20)) == (220, 40, 40)
    )
    palette = open_image(str(IMAGES / "palette.png"))
    assert palette.mode == "RGB" and palette.getpixel((0, 0)) == (255, 255, 255)
    gray = open_image(str(IMAGES / "gray.png"))
    assert gray.mode == "RGB" and gray.getpixel((20, 20)) == (90, 90, 90)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert open_image(str(tmp_path / "deep.png")).getpixel((0, 0)) == (127, 127, 127)


def test_paths_stay_inside_the_image_root_where_they_really_lead(tmp_path: Path):
    with pytest.raises(ImageProblem, match="escapes the image root"):
        resolve_source("../../etc/passwd.png", tmp_path, allow_urls=False, url_timeout=1.0)
    with pytest.raises(ImageProblem, match="escapes the image root"):
        resolve_source("images/../../x.png", tmp_path, allow_urls=False, url_timeout=1.0)
    # A link inside the root that leads out of it escapes as surely as `..` does.
    (tmp_path / "linked").symlink_to(IMAGES, target_is_directory=True)
    (tmp_path / "passwd.png").symlink_to("/etc/passwd")
    for value in ("linked/red.png", "passwd.png"):
        with pytest.raises(ImageProblem, match="leads out of the image root") as info:
            resolve_source(value, tmp_path, allow_urls=False, url_timeout=1.0)
        assert "data.follow_symlinks: true" in info.value.reason
    # A link that stays inside the root is fine; data.follow_symlinks trusts the links that leave it.
    (tmp_path / "real").mkdir()
    shutil.copy(IMAGES / "red.png", tmp_path / "real" / "red.png")
    (tmp_path / "alias.png").symlink_to(tmp_path / "real" / "red.png")
    assert open_image(resolve_source("alias.png", tmp_path, allow_urls=False, url_timeout=1.0)).size == (
        48,
        40,
    )
    source = resolve_source(
        "linked/red.png", tmp_path, allow_urls=False, url_timeout=1.0, follow_symlinks=True
    )
    assert open_image(source).size == (48, 40)


def test_a_link_out_of_the_image_root_is_one_bad_sample_until_follow_symlinks(tmp_path: Path):
    (tmp_path / "images").symlink_to(IMAGES, target_is_directory=True)
    row = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hey."}]}
    lines = [json.dumps({**row, "images": [name]}) for name in ("images/red.png", "images/blue.png")]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    split = scan_split("train", str(tmp_path / "data.jsonl"), DataSection(train="x", format="sharegpt"))
    assert [p.index for p in split.skipped] == [0, 1] and "leads out of the image root" in split.skipped[
        0
    ].reason
    followed = DataSection(train="x", format="sharegpt", follow_symlinks=True)
    assert len(scan_split("train", str(tmp_path / "data.jsonl"), followed).samples) == 2


def test_image_root_moves_where_relative_paths_start(tmp_path: Path):
    row = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hey."}]}
    (tmp_path / "data.jsonl").write_text(json.dumps({**row, "images": ["red.png"]}) + "\n")
    sample = read(tmp_path / "data.jsonl", image_root=str(IMAGES)).samples[0]
    assert sample.images == [str(IMAGES / "red.png")]


def test_urls_are_refused_unless_allowed_and_then_fetched_lazily():
    with pytest.raises(ImageProblem, match="set data.allow_urls: true"):
        resolve_source("https://example.com/a.png", FORMATS, allow_urls=False, url_timeout=1.0)
    source = resolve_source("https://example.com/a.png", FORMATS, allow_urls=True, url_timeout=7.0)
    assert source == UrlImage("https://example.com/a.png", 7.0), "nothing is fetched until opened"


def test_an_allowed_url_is_fetched_with_the_timeout_when_opened(monkeypatch):
    import urllib.request

    seen = []

    def fake_urlopen(request, timeout):
        seen.append((request.full_url, timeout))
        return io.BytesIO((IMAGES / "red.png").read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    image = open_image(UrlImage("https://example.com/red.png", 7.0))
    assert image.size == (48, 40) and seen == [("https://example.com/red.png", 7.0)]


def test_a_failing_url_is_a_named_image_problem(monkeypatch):
    import urllib.error
    import urllib.request

    def refuse(request, timeout):
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(ImageProblem, match=r"cannot fetch https://example.com/a.png \(URLError"):
        open_image(UrlImage("https://example.com/a.png", 1.0))


def test_a_data_uri_that_is_not_base64_is_named(tmp_path: Path):
    with pytest.raises(ImageProblem, match="invalid base64"):
        resolve_source("data:image/png;base64,@@@", tmp_path, allow_urls=False, url_timeout=1.0)


# --- reading: lazy, file kinds, splits, hub ------------------------------------------------------


@pytest.mark.parametrize("name", ["messages.jsonl", "columns.csv", "trl.parquet", "disk"])
def test_records_are_read_lazily(name):
    records = open_records(str(FORMATS / name))
    assert iter(records.rows) is records.rows, "an iterator, not a list read up front"
    assert next(iter(records.rows))[0] == 0


@pytest.mark.parametrize("name", ["disk", "trl.parquet", "columns.parquet"])
def test_embedded_images_stay_in_the_dataset_until_opened(name):
    import pickle

    data = {"columns": {"image": "images"}} if name.startswith("columns") else {}
    samples = read(FORMATS / name, **data).samples
    sources = [source for s in samples for source in s.images]
    assert len(sources) == 3 and all(isinstance(source, RowImage) for source in sources), (
        "a kept sample holds a row reference, not the image bytes"
    )
    blue = sources[2]
    assert pixels(open_image(blue)) == pixels(open_image(str(IMAGES / "blue.png")))
    copy = pickle.loads(pickle.dumps(blue))  # DataLoader workers get samples by pickling
    assert pixels(open_image(copy)) == pixels(open_image(blue))
    assert len(pickle.dumps(samples)) < 20_000, "pickled samples reference the dataset file, not its rows"


def test_json_lines_in_a_json_file_are_read_as_lines(tmp_path: Path):
    (tmp_path / "data.json").write_text((FORMATS / "trl.jsonl").read_text())
    shutil.copytree(IMAGES, tmp_path / "images")
    assert len(read(tmp_path / "data.json").samples) == 3


def test_save_to_disk_splits_are_chosen_by_name():
    data = DataSection(train="x", eval=str(FORMATS / "disk"))
    assert open_records(str(FORMATS / "disk"), data.eval_split).total == 1
    with pytest.raises(DataError, match="has no split 'test'; it has train, validation"):
        open_records(str(FORMATS / "disk"), "test")


def test_a_hub_id_goes_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return datasets.load_from_disk(str(FORMATS / "disk"))[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = open_records("someone/vqa-set", "train", "en")
    assert calls == [("someone/vqa-set", "en", "train")] and records.total == 3
    rows = [row for _, row in records.rows]
    assert [len(row["images"]) for row in rows] == [1, 2, 0]
    assert isinstance(rows[0]["images"][0]["bytes"], bytes), "Image features stay undecoded bytes"


def test_a_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path: Path):
    with pytest.raises(DataError, match="data file not found"):
        open_records(str(tmp_path / "train.jsonl"))


def test_text_only_and_image_samples_mix_in_one_file(collator):
    split = read(FORMATS / "trl.jsonl")
    batch = collator([split.samples[2], split.samples[0]])
    assert batch["image_grid_thw"].shape[0] == 1


def test_sample_reader_names_the_field_of_a_bad_part():
    reader = SampleReader.from_section(DataSection(train="x"), FORMATS)
    bad = {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}]}
    with pytest.raises(SampleError) as info:
        reader.read(0, bad)
    assert info.value.field == "messages[0].content[0]" and "got type 'video'" in info.value.reason
    text = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert reader.read(3, text) == Sample(
        3,
        [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
        ],
        [],
        [],
        "messages",
    )


def test_exif_orientation_is_applied_as_a_photo_viewer_shows_it(tmp_path: Path):
    """A phone photo: pixels stored sideways plus Orientation=6 (rotate 90 degrees clockwise)."""
    from PIL import Image

    stored = Image.new("RGB", (40, 20), (250, 250, 250))
    stored.paste((220, 40, 40), (0, 0, 10, 20))  # red band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)

    shown = open_image(str(tmp_path / "photo.jpg"))
    assert shown.size == (20, 40)  # portrait, as the viewer shows it
    red, green, blue = shown.getpixel((10, 2))  # the left edge, turned clockwise, is now the top
    assert red > 200 and green < 80 and blue < 80
    assert open_image(str(tmp_path / "photo.jpg")).getpixel((10, 37))[1] > 200  # the bottom stays white
