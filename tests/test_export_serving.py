"""`vlmtune export --format gguf | vllm`: serving exports, proved on a tiny Qwen2-VL trained once.

The GGUF tests need llama.cpp's converter (and llama-cpp-python for q4_k_m and --verify), which
`make install-gguf` builds; without them they skip, saying so. The vLLM tests need no vLLM: they check
what vLLM would load against the family record, and that the split export equals base + adapter.

Why a tiny Qwen2-VL with a 3-block vision tower: llama.cpp's converter maps the merger's second Linear
(``visual.merger.mlp.2``) through its per-block table, which has as many rows as the tower has blocks;
the cached tiny model's 2 blocks make the mmproj conversion fail ("Can not map tensor
'visual.merger.mlp.2.bias'"). Released checkpoints have 32.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from posttrain_fixtures import ANSWER, DEMO, overfit_folder

from vlmtune.model.families import QWEN2_VL, get_family

from conftest import PIXEL_BUDGET, write_recipe
from test_cli import vlmtune

CONVERTER = Path(os.environ.get("VLMTUNE_LLAMA_CPP") or Path(sys.prefix) / "share" / "vlmtune" / "llama.cpp")
HAS_CONVERTER = (CONVERTER / "convert_hf_to_gguf.py").is_file()
try:
    import llama_cpp  # noqa: F401

    HAS_LLAMA_CPP = True
except ImportError:
    HAS_LLAMA_CPP = False
needs_converter = pytest.mark.skipif(
    not HAS_CONVERTER, reason="llama.cpp's converter: run `make install-gguf`"
)
needs_llama_cpp = pytest.mark.skipif(
    not (HAS_CONVERTER and HAS_LLAMA_CPP), reason="llama-cpp-python: run `make install-gguf`"
)


OTHER_ANSWER = "The square is red."  # demo train.jsonl line 3, about images/002.png


def three_block_qwen2_vl(folder: Path) -> Path:
    """The cached tiny Qwen2-VL with a third vision block (a copy of the second, so still random)."""
    from safetensors.torch import load_file, save_file

    from vlmtune.model.tiny import tiny_model_path

    shutil.copytree(tiny_model_path("qwen2_vl"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for key in [k for k in tensors if k.startswith("visual.blocks.1.")]:
        tensors[key.replace("blocks.1.", "blocks.2.")] = tensors[key].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA (vision and language, bf16 base) trained on two demo samples whose answers differ by image:
    ANSWER about the first, OTHER_ANSWER about the third (the eval split holds both)."""
    folder = overfit_folder(tmp_path_factory.mktemp("serving"))
    return train_on_two_images(folder, three_block_qwen2_vl(folder / "tiny-qwen2-vl-3"))


def train_on_two_images(folder: Path, model: Path) -> Path:
    """LoRA trained 40 steps on the first and third demo samples (ANSWER, OTHER_ANSWER) of a folder that holds
    the demo's images and an eval.jsonl; the run folder."""
    lines = (DEMO / "train.jsonl").read_text().splitlines()
    assert ANSWER in lines[0] and OTHER_ANSWER in lines[2]
    (folder / "train.jsonl").write_text((lines[0] + "\n" + lines[2] + "\n") * 4)
    recipe = write_recipe(
        folder,
        model={"name": str(model)},
        data={"train": "train.jsonl", "eval": "eval.jsonl", "max_image_pixels": PIXEL_BUDGET},
        train={"max_steps": 40, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant",
               "max_length": 256, "gradient_checkpointing": False, "save_steps": 1000},
    )  # fmt: skip
    result = vlmtune("train", str(recipe), "--run-dir", str(folder / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def _trained(run: Path):
    from vlmtune.after.trained import open_trained_run

    return open_trained_run(run, None)


# --- vLLM -----------------------------------------------------------------------------------------


def test_vllm_layout_follows_the_family_record_and_what_the_adapter_trains():
    from vlmtune.after.export_vllm import plan

    off_list = replace(QWEN2_VL, vllm_tower_lora=False)
    assert plan(QWEN2_VL, {"language", "vision"}, merge=True).layout == "merged"
    assert plan(off_list, {"language"}, merge=False) == plan(QWEN2_VL, {"language"}, merge=False)
    assert plan(off_list, {"language"}, merge=False).layout == "adapter"
    on = plan(QWEN2_VL, {"language", "vision"}, merge=False)
    assert (on.layout, on.tower_lora) == ("adapter", True)
    off = plan(off_list, {"language", "vision", "projector"}, merge=False)
    assert (off.layout, off.tower_lora) == ("adapter+merged-tower", False)
    assert "skip" in off.why


@pytest.mark.slow
def test_the_vllm_check_catches_a_planted_unsupported_module(run: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from vlmtune.after.export import ExportError
    from vlmtune.after.export_vllm import check_vllm_modules, unsupported_modules

    weights = _trained(run).weights / "adapter_model.safetensors"
    assert unsupported_modules(QWEN2_VL, weights, tower_lora=True) == []  # negative control: all loadable
    assert check_vllm_modules(QWEN2_VL, weights, tower_lora=True)["ok"]
    vision_only = unsupported_modules(QWEN2_VL, weights, tower_lora=False)  # without the tower flag
    assert vision_only and all(m.startswith("model.visual.") for m in vision_only)

    tensors = load_file(str(weights))
    a = next(v for k, v in tensors.items() if k.endswith("layers.0.mlp.down_proj.lora_A.weight"))
    planted = "base_model.model.model.language_model.layers.0.mlp.act_fn"
    tensors[f"{planted}.lora_A.weight"] = a.clone()
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = a.clone()
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    found = unsupported_modules(QWEN2_VL, tmp_path / "adapter_model.safetensors", tower_lora=True)
    assert found == [
        "model.language_model.layers.0.mlp.act_fn",
        "base_model.model.lm_head.modules_to_save.default.weight",
    ]
    with pytest.raises(ExportError, match="vLLM would skip 2 module"):
        check_vllm_modules(QWEN2_VL, tmp_path / "adapter_model.safetensors", tower_lora=True)


@pytest.mark.slow
def test_vllm_export_ships_the_adapter_with_the_exact_serve_command_and_a_failed_push_keeps_it(
    run: Path, tmp_path: Path
):
    out = tmp_path / "vllm"
    result = vlmtune("export", str(run), "--out", str(out), "--format", "vllm", "--push-to-hub", "someone/tiny",
                     env_extra={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    command = (
        "vllm serve path/to/the/base/model --enable-lora --max-lora-rank 16 --lora-modules finetune=./adapter "
        "--enable-tower-connector-lora"
    )
    assert command in " ".join(result.stdout.split()), result.stderr[-3000:]
    curves = ["curves.png"] if (run / "3-train" / "curves.png").is_file() else []
    listing = sorted(["README.md", "adapter", "serve.sh", "vlmtune_export.json", *curves])
    assert sorted(p.name for p in out.iterdir()) == listing
    assert ("![loss, learning rate" in (out / "README.md").read_text()) == bool(curves)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert command in (out / "serve.sh").read_text() and command in (out / "README.md").read_text()
    report = json.loads((out / "vlmtune_export.json").read_text())
    assert report["vllm"]["layout"] == "adapter" and report["export"] == "vllm"
    assert [c["ok"] for c in report["checks"]] == [True, True]
    # --push-to-hub: the hub is unreachable (offline mode); a user error, the export stays complete.
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not push" in result.stderr and "hf upload someone/tiny" in result.stderr


@pytest.mark.slow
def test_merge_verify_compares_the_merged_model_with_base_plus_adapter(run: Path, tmp_path: Path):
    out = tmp_path / "merged"
    result = vlmtune("export", str(run), "--out", str(out), "--merge", "--dtype", "float32", "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "vlmtune_export.json").read_text())
    verify, scored = report["verify"], report["scored"]
    assert verify["compared"] == "base_plus_adapter vs merged" and verify["n"] == scored["n"] == 2
    assert verify["agreeing"] == scored["agreeing"] == 2 and verify["disagreements"] == []
    assert "the same answer on 2 of 2 eval samples (100.0%)" in " ".join(result.stdout.split())


@pytest.mark.slow
def test_split_vllm_export_equals_base_plus_adapter(run: Path, tmp_path: Path):
    """Off vLLM's tower list: model/ (the tower's LoRA merged) + adapter/ (the language LoRA alone)
    gives the logits of base + the whole adapter, and differs from the base."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from vlmtune.after.export_vllm import export_split

    trained = _trained(run)
    family = replace(get_family("qwen2_vl"), vllm_tower_lora=False)
    (tmp_path / "split").mkdir()
    checks = export_split(trained, family, tmp_path / "split", "float32")
    assert all(c["ok"] for c in checks)
    with safe_open(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".language_model." in k for k in keys)

    base_path = trained.recipe.model.name
    inputs = _image_prompt(tmp_path / "split" / "model")

    def logits(model):
        with torch.no_grad():
            return model.eval()(**inputs).logits

    load = AutoModelForImageTextToText.from_pretrained
    whole = logits(PeftModel.from_pretrained(load(base_path, dtype=torch.float32), str(trained.weights)))
    split = logits(PeftModel.from_pretrained(load(tmp_path / "split" / "model", dtype=torch.float32),
                                             str(tmp_path / "split" / "adapter")))  # fmt: skip
    base = logits(load(base_path, dtype=torch.float32))
    assert (whole - split).abs().max() < 1e-4
    assert (whole - base).abs().max() > 1.0


def _image_prompt(folder: Path) -> dict:
    from posttrain_fixtures import IMAGE, PROMPT

    from vlmtune.after.generate import user_turn
    from vlmtune.data import open_image
    from vlmtune.model.processing import load_processor

    processor = load_processor(folder, get_family("qwen2_vl"))
    text = processor.apply_chat_template(user_turn(PROMPT, 1), tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[[open_image(str(IMAGE))]], return_tensors="pt"))


# --- GGUF -----------------------------------------------------------------------------------------


def test_gguf_refuses_a_family_llama_cpp_cannot_convert_by_name():
    from vlmtune.after.export import ExportError
    from vlmtune.after.export_gguf import check_family

    with pytest.raises(ExportError, match="not available for Llama 3.2 Vision: llama.cpp's converter has no"):
        check_family(get_family("mllama"))
    with pytest.raises(ExportError, match="not available for Gemma 4: no vlmtune test proves"):
        check_family(get_family("gemma4"))
    with pytest.raises(ExportError, match="not available for Gemma 3: llama.cpp's converter cannot map"):
        check_family(get_family("gemma3"))  # tests/test_export_gguf_families.py reproduces the reason
    check_family(QWEN2_VL)  # proven below


def test_the_pre_tokenizer_is_named_only_for_the_exact_split_regex(tmp_path: Path):
    from vlmtune.after.export_gguf import matching_pre_tokenizer
    from vlmtune.model.tiny import tiny_model_path

    assert matching_pre_tokenizer(tiny_model_path("qwen2_vl"), QWEN2_VL) == "qwen2"
    tokenizer = json.loads((tiny_model_path("qwen2_vl") / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert matching_pre_tokenizer(tmp_path, QWEN2_VL) is None


def test_export_options_that_do_not_fit_fail_before_loading(tmp_path: Path):
    quant = vlmtune("export", str(tmp_path), "--out", str(tmp_path / "x"), "--quant", "q8_0")
    assert quant.returncode == 2 and "--quant is for --format gguf" in quant.stderr
    verify = vlmtune("export", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "vllm", "--verify")
    assert verify.returncode == 2 and "--verify cannot run vLLM here" in verify.stderr


@pytest.mark.slow
@needs_converter
def test_gguf_export_holds_the_language_model_the_fine_tuned_mmproj_and_a_modelfile(
    gguf_export: Path, run: Path
):
    import numpy as np
    from gguf import GGUFReader

    out = gguf_export
    curves = ["curves.png"] if (run / "3-train" / "curves.png").is_file() else []
    listing = ["Modelfile", "README.md", "mmproj-f16.gguf", "model-f16.gguf", "vlmtune_export.json", *curves]
    assert sorted(p.name for p in out.iterdir()) == sorted(listing)
    language = {t.name: t for t in GGUFReader(str(out / "model-f16.gguf")).tensors}
    vision = {t.name: t for t in GGUFReader(str(out / "mmproj-f16.gguf")).tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= set(
        language
    )
    assert list(language["token_embd.weight"].shape) == [64, 413]  # GGUF lists ne0 (hidden) first
    assert {"v.blk.2.attn_q.weight", "mm.0.weight", "mm.2.weight", "v.patch_embd.weight"} <= set(vision)
    # The vision fine-tune travels in the mmproj: its q rows are the merged tower's, not the base's.
    report = json.loads((out / "vlmtune_export.json").read_text())
    assert report["checks"][-1]["projector_type"] == "qwen2vl_merger"
    base = _tensor(Path(_trained(run).recipe.model.name), "visual.blocks.0.attn.qkv.weight")[:32]
    served = np.asarray(vision["v.blk.0.attn_q.weight"].data, dtype=np.float32).reshape(32, 32)
    assert np.abs(served - base).max() > 1e-2
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\nFROM ./mmproj-f16.gguf\nTEMPLATE")
    assert "<|im_start|>{{ .Role }}" in modelfile
    assert "llama-server -m model-f16.gguf --mmproj mmproj-f16.gguf" in (out / "README.md").read_text()


def _tensor(folder: Path, key: str):
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return np.asarray(f.get_tensor(key).float())


@pytest.fixture(scope="module")
def gguf_export(run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    flags = ["--verify"] if HAS_LLAMA_CPP else []
    result = vlmtune("export", str(run), "--out", str(out), "--format", "gguf", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_answers_the_eval_images_as_transformers_does(gguf_export: Path):
    verify = json.loads((gguf_export / "vlmtune_export.json").read_text())["verify"]
    assert verify["compared"] == "transformers vs llama_cpp"
    assert (verify["n"], verify["agreeing"], verify["disagreements"]) == (2, 2, [])
    # The fine-tune reached llama.cpp, the vision path included: each image gets its own trained answer.
    assert [row["llama_cpp"] for row in verify["answers"]] == [ANSWER, OTHER_ANSWER]
    assert verify["llama_cpp_image_tokens"] == {"min": 4, "max": 16}  # the processor's pixel budget


@pytest.mark.slow
@needs_llama_cpp
def test_q4_k_m_goes_through_llama_cpps_quantizer(run: Path, gguf_export: Path, tmp_path: Path):
    """The converter writes f16, llama.cpp's quantizer makes Q4_K_M of it, the f16 file goes."""
    from gguf import GGUFReader

    from vlmtune.after.export_gguf import convert, converter_dir

    base = Path(_trained(run).recipe.model.name)  # the 3-block tiny base: no merge needed to test this
    out = tmp_path / "model-q4_k_m.gguf"
    convert(converter_dir(), base, out, "q4_k_m", mmproj=False, pre_tokenizer="qwen2", name="q4")
    assert GGUFReader(str(out)).get_field("general.file_type").contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert [p.name for p in tmp_path.iterdir()] == ["model-q4_k_m.gguf"]
    assert out.stat().st_size < 0.6 * (gguf_export / "model-f16.gguf").stat().st_size  # same shapes in f16


class WordTokenizer:
    """Words as tokens: enough to read the first differing token off by eye."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.words = getattr(self, "words", [])
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
        return [self.words.index(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_first_difference_names_the_token_where_answers_part():
    from vlmtune.after.gguf_verify import comparison

    answers = [ANSWER, ANSWER, ANSWER]
    served = [ANSWER, "The circle is red.", "The circle"]
    result = comparison(WordTokenizer(), [0, 1, 2], answers, served, ("a", "b"))
    assert (result["n"], result["agreeing"], result["agreement"]) == (3, 1, 1 / 3)
    first, second = result["disagreements"]
    assert (first["index"], first["first_differing_token"], first["a_token"], first["b_token"]) == (
        1, 3, "yellow.", "red.")  # fmt: skip
    assert (second["first_differing_token"], second["a_token"], second["b_token"]) == (2, "is", None)


def test_user_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from vlmtune.after.export import ExportError
    from vlmtune.after.export_gguf import GgufUnavailable, check_quant, converter_dir
    from vlmtune.after.export_vllm import export_vllm
    from vlmtune.after.gguf_verify import eval_items

    monkeypatch.setenv("VLMTUNE_LLAMA_CPP", str(tmp_path / "no-llama.cpp"))
    with pytest.raises(GgufUnavailable, match="converter is not installed") as missing:
        converter_dir()
    assert "make install-gguf" in missing.value.hint
    with pytest.raises(ExportError, match="--quant 'q2_k' is not one of f16, q8_0, q4_k_m"):
        check_quant("q2_k")
    no_eval = SimpleNamespace(
        recipe=SimpleNamespace(data=SimpleNamespace(eval=None)), run=SimpleNamespace(path="r")
    )
    with pytest.raises(ExportError, match="run r has none") as verify:
        eval_items(no_eval)
    assert "without --verify" in verify.value.hint
    full = SimpleNamespace(is_full=True, run=SimpleNamespace(path="r"))
    with pytest.raises(ExportError, match="--format vllm is for LoRA runs"):
        export_vllm(full, tmp_path / "out", merge=False, dtype="bfloat16")
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_serving_export_folder(tmp_path: Path):
    (tmp_path / "vlmtune_export.json").write_text(json.dumps({"export": "gguf"}))
    result = vlmtune("predict", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert "is a gguf export for serving, not a transformers model" in result.stderr
