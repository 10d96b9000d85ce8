"""`vlmtune export --format gguf` for families beyond Qwen2-VL (tests/test_export_serving.py holds that one):
Qwen2.5-VL and Qwen3-VL proved (export, --verify agreement on 8 eval images), and the families still
refused, each with its reason reproduced on the tiny model.

Qwen2.5-VL. Its tiny model needs two changes before llama.cpp serves it like transformers:
- a third vision block, for the same reason as Qwen2-VL's (the converter maps ``visual.merger.mlp.2``
  through its per-block table, so 2 blocks fail);
- ``vision_config.window_size`` 112, the released checkpoints' value: llama.cpp's Qwen2.5-VL projector
  never reads a window size (clip.cpp leaves ``attn_window_size`` unset for it and uses 112), and the
  converter writes none. With the cached tiny model's 56 the windowed vision blocks would attend over a
  whole 112-pixel image in llama.cpp and over four 56-pixel windows in transformers. The family record
  names that value (``gguf_assumed_config``) and the export refuses a model that differs.
The earlier attempt compared the untrained random tiny model: its greedy answers part (16 demo images:
8 agree) with window 112 as with 56, so the test compares a
trained model, whose answers are stable, on eight demo images of three sizes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from posttrain_fixtures import ANSWER, DEMO
from test_export_serving import OTHER_ANSWER, needs_converter, needs_llama_cpp, train_on_two_images

from vlmtune.model.families import get_family

from conftest import PIXEL_BUDGET
from test_cli import vlmtune

EVAL_LINES = 8  # demo lines 1-8: 56x56, 56x84 and 112x112 images (one window and several in transformers)


# Where each tiny model keeps its vision blocks, and the config key that counts them.
VISION_BLOCKS = {
    "qwen2_5_vl": ("visual.blocks.", "depth"),
    "mistral3": ("vision_tower.transformer.layers.", "num_hidden_layers"),
}


def deeper_vision_tower(family: str, folder: Path, **vision_config) -> Path:
    """The cached tiny model of ``family`` with a third vision block (a copy of the second) and
    ``vision_config`` values set."""
    from safetensors.torch import load_file, save_file

    from vlmtune.model.tiny import tiny_model_path

    prefix, count = VISION_BLOCKS[family]
    shutil.copytree(tiny_model_path(family), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for key in [k for k in tensors if k.startswith(prefix + "1.")]:
        tensors[prefix + "2." + key[len(prefix + "1.") :]] = tensors[key].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update({count: 3, **vision_config})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def trained_run(folder: Path, model: Path) -> Path:
    """LoRA trained on two demo samples whose answers differ by image (as the Qwen2-VL run); the eval
    split holds the first EVAL_LINES demo samples."""
    shutil.copytree(DEMO / "images", folder / "images")
    lines = (DEMO / "train.jsonl").read_text().splitlines()
    (folder / "eval.jsonl").write_text("\n".join(lines[:EVAL_LINES]) + "\n")
    return train_on_two_images(folder, model)


def gguf_export(run: Path, out: Path) -> Path:
    result = vlmtune("export", str(run), "--out", str(out), "--format", "gguf", "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def qwen2_5_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2_5")
    return trained_run(
        folder, deeper_vision_tower("qwen2_5_vl", folder / "tiny-qwen2_5-vl-3", window_size=112)
    )


@pytest.fixture(scope="module")
def qwen2_5_gguf(qwen2_5_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_export(qwen2_5_run, tmp_path_factory.mktemp("qwen2_5_gguf") / "gguf")


def assert_every_answer_agrees(out: Path) -> None:
    verify = json.loads((out / "vlmtune_export.json").read_text())["verify"]
    assert (verify["n"], verify["agreeing"], verify["disagreements"]) == (EVAL_LINES, EVAL_LINES, [])
    answers = [row["llama_cpp"] for row in verify["answers"]]
    assert (answers[0], answers[2]) == (ANSWER, OTHER_ANSWER)  # the two trained images, 56 and 112 pixels


@pytest.mark.slow
@needs_llama_cpp
def test_qwen2_5_vl_gguf_answers_every_eval_image_as_transformers_does(qwen2_5_gguf: Path):
    from gguf import GGUFReader

    assert_every_answer_agrees(qwen2_5_gguf)
    mmproj = GGUFReader(str(qwen2_5_gguf / "mmproj-f16.gguf"))
    assert mmproj.get_field("clip.projector_type").contents() == "qwen2.5vl_merger"
    assert mmproj.get_field("clip.vision.n_wa_pattern").contents() == 2  # fullatt_block_indexes [1]
    # No window size travels: llama.cpp's 112 is an assumption, which is why the export checks the config.
    assert not [name for name in mmproj.fields if "window_size" in name]
    modelfile = (qwen2_5_gguf / "Modelfile").read_text()
    assert "You are a helpful assistant." in modelfile and modelfile.startswith("FROM ./model-f16.gguf\n")


@pytest.mark.slow
@needs_llama_cpp
def test_qwen3_vl_gguf_answers_every_eval_image_as_transformers_does(tmp_path: Path):
    """The cached tiny Qwen3-VL converts as it is (2 vision blocks, deepstack after the first)."""
    from gguf import GGUFReader

    from vlmtune.model.tiny import tiny_model_path

    out = gguf_export(trained_run(tmp_path, tiny_model_path("qwen3_vl")), tmp_path / "gguf")
    assert_every_answer_agrees(out)
    mmproj = GGUFReader(str(out / "mmproj-f16.gguf"))
    assert mmproj.get_field("clip.projector_type").contents() == "qwen3vl_merger"
    assert list(mmproj.get_field("clip.vision.is_deepstack_layers").contents()) == [True, False]
    modelfile = (out / "Modelfile").read_text()
    assert "<|im_start|>assistant" in modelfile and "system" not in modelfile  # no default system turn


def test_a_window_size_llama_cpp_would_ignore_is_refused_before_any_weight_loads(tmp_path: Path):
    from types import SimpleNamespace

    from vlmtune.after.export import ExportError
    from vlmtune.after.export_gguf import base_config, check_config, folder_config
    from vlmtune.model.tiny import tiny_model_path

    family = get_family("qwen2_5_vl")
    tiny = SimpleNamespace(
        recipe=SimpleNamespace(model=SimpleNamespace(name="tiny:qwen2_5_vl", revision=None))
    )
    config = base_config(tiny)  # the cached tiny model's config: window 56, refused as it is
    with pytest.raises(ExportError, match="window_size = 56, and llama.cpp computes with 112") as refused:
        check_config(config, family)
    assert "--merge" in refused.value.hint
    shutil.copy(tiny_model_path("qwen2_5_vl") / "config.json", tmp_path / "config.json")
    assert folder_config(tmp_path)["vision_config"]["window_size"] == 56
    config["vision_config"]["window_size"] = 112
    check_config(config, family)  # the released checkpoints' value passes
    check_config(folder_config(tmp_path), get_family("qwen2_vl"))  # a family without assumed values: no check


def test_the_window_size_changes_what_transformers_computes(tmp_path: Path):
    """Why the refusal matters: on a 112-pixel image the tiny tower's output depends on window_size."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.data import open_image
    from vlmtune.model.processing import load_processor

    folder = deeper_vision_tower("qwen2_5_vl", tmp_path / "tiny", window_size=112)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
    processor = load_processor(folder, get_family("qwen2_5_vl"), max_image_pixels=PIXEL_BUDGET)
    inputs = processor.image_processor(
        images=[open_image(str(DEMO / "images" / "002.png"))], return_tensors="pt"
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 4x4 merged tokens

    def features(window: int):
        model.config.vision_config.window_size = window
        model.model.visual.window_size = window
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return torch.cat(list(out.pooler_output if hasattr(out, "pooler_output") else out))

    assert not torch.allclose(features(56), features(112), atol=1e-4)
    assert torch.equal(features(112), features(112))  # control: the same window gives the same output


# --- families still refused: each record's reason, reproduced on the tiny model --------------------
# These fail (and say so) when a newer llama.cpp converter lifts the reason: then try the family again.


@needs_converter
@pytest.mark.parametrize(
    ("family", "mmproj", "converter_error"),
    [
        ("gemma3", True, "Can not map tensor 'vision_tower.embeddings.patch_embedding.bias'"),
        ("smolvlm", False, "Model SmolVLMForConditionalGeneration is not supported"),
        ("llava", True, "Unsupported model type: clip_vision_model"),
        ("qwen3_5", False, "AssertionError"),  # assert self.opt_num_mtp_layers != 0
    ],
)
def test_the_converter_refuses_what_the_family_record_says(
    family: str, mmproj: bool, converter_error: str, tmp_path: Path
):
    from vlmtune.after.export import ExportError
    from vlmtune.after.export_gguf import convert, converter_dir
    from vlmtune.model.tiny import tiny_model_path

    with pytest.raises(ExportError, match=re.escape(converter_error)):
        convert(converter_dir(), tiny_model_path(family), tmp_path / "out.gguf", "f16", mmproj=mmproj,
                pre_tokenizer="qwen2", name=family)  # fmt: skip
    assert get_family(family).gguf_pre_tokenizer is None


@needs_converter
def test_a_mistral3_mmproj_lacks_the_img_break_embedding_llama_cpp_needs(tmp_path: Path):
    from gguf import GGUFReader

    from vlmtune.after.export_gguf import convert, converter_dir

    model = deeper_vision_tower("mistral3", tmp_path / "tiny")  # 2 blocks fail as Qwen2-VL's do
    out = tmp_path / "mmproj.gguf"
    convert(converter_dir(), model, out, "f16", mmproj=True, pre_tokenizer="qwen2", name="mistral3")
    names = [t.name for t in GGUFReader(str(out)).tensors]
    assert "mm.2.weight" in names and "v.blk.2.attn_q.weight" in names  # the tower and projector convert
    assert "v.token_embd.img_break" not in names  # what clip.cpp refuses to load the mmproj without
    assert "language_model.model.embed_tokens.weight" in _safetensors_keys(model)  # where it would come from
    assert "img_break" in get_family("mistral3").gguf_refused


def _safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_the_cli_refuses_a_window_size_of_56_before_merging(qwen2_5_run: Path, tmp_path: Path):
    """The trained run, its base model given window 56 (the cached tiny model's): `export --format gguf`
    stops with exit 2 and the value, before the merge, and writes nothing."""
    import yaml

    run = shutil.copytree(qwen2_5_run, tmp_path / "run")
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())
    base = shutil.copytree(resolved["model"]["name"], tmp_path / "base-window-56")
    config = json.loads((base / "config.json").read_text())
    config["vision_config"]["window_size"] = 56
    (base / "config.json").write_text(json.dumps(config))
    resolved["model"]["name"] = str(base)
    (run / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    out = tmp_path / "gguf"
    result = vlmtune("export", str(run), "--out", str(out), "--format", "gguf")
    assert result.returncode == 2
    assert "vision_config.window_size = 56" in " ".join(result.stderr.split())
    assert "merged weight" not in result.stderr and not out.exists()  # refused before the merge
