"""estimate-memory: the arithmetic against real loaded models, the bundled configs against their
published sizes, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune import memory as mem
from vlmtune.commands.memory import parse_gpu_memory
from vlmtune.errors import ModelError, VlmtuneError
from vlmtune.model.families import family_names

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune

# Published total parameter counts. Sources: the "Model size" each checkpoint's Hugging Face page
# shows (huggingface.co/<hub id>, counted from the safetensors), cross-checked where the authors
# publish their own breakdown.
PUBLISHED = {
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,  # HF page: 2.21B
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,  # HF page: 8.29B
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,  # HF page: 3.75B
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,  # HF page: 8.29B
    "Qwen/Qwen2.5-VL-32B-Instruct": 33.5e9,  # HF page: 33.5B
    "Qwen/Qwen2.5-VL-72B-Instruct": 73.4e9,  # HF page: 73.4B
    "Qwen/Qwen3-VL-4B-Instruct": 4.44e9,  # HF page: 4.44B
    "Qwen/Qwen3-VL-8B-Instruct": 8.77e9,  # HF page: 8.77B
    "meta-llama/Llama-3.2-11B-Vision-Instruct": 10.7e9,  # HF page: 10.7B (model card: "11B (10.6B)")
    "meta-llama/Llama-3.2-90B-Vision-Instruct": 88.6e9,  # HF page: 88.6B (model card: "90B (88.8B)")
    "mistral-community/pixtral-12b": 12.7e9,  # HF page: 12.7B (Mistral: 12B decoder + 0.4B encoder)
    # Gemma 3 technical report, table 1: 417M vision encoder + embedding + non-embedding parameters.
    "google/gemma-3-4b-it": 4.30e9,  # 417M + 675M + 3,209M; HF page: 4.3B
    "google/gemma-3-12b-it": 12.19e9,  # 417M + 1,012M + 10,759M; HF page: 12.2B
    "google/gemma-3-27b-it": 27.43e9,  # 417M + 1,416M + 25,600M; HF page: 27.4B
    "llava-hf/llava-1.5-7b-hf": 7.06e9,  # HF page: 7.06B
    "llava-hf/llava-1.5-13b-hf": 13.4e9,  # HF page: 13.4B
    "HuggingFaceTB/SmolVLM-Instruct": 2.25e9,  # HF page: 2.25B
    "google/paligemma2-3b-pt-224": 3.03e9,  # HF page: 3.03B
    "OpenGVLab/InternVL3-2B-hf": 2.09e9,  # HF page of OpenGVLab/InternVL3-2B: 2.09B
    "OpenGVLab/InternVL3-8B-hf": 7.94e9,  # HF page of OpenGVLab/InternVL3-8B: 7.94B
    "Qwen/Qwen3-VL-30B-A3B-Instruct": 31.1e9,  # HF page: 31.1B
    "zai-org/GLM-4.1V-9B-Thinking": 10.3e9,  # HF page: 10.3B
    # Not checked against the HF page (no hub here): the name's size, within 3%. Qwen3.5 checkpoints also
    # hold one multi-token-prediction layer that transformers does not instantiate (and vlmtune never trains).
    "Qwen/Qwen3.5-27B": 27e9,
    "Qwen/Qwen3.5-35B-A3B": 35e9,
    # Written from google/gemma-4-31B-it's published config.json as recalled offline (no hub here): the
    # shapes (60 layers of 5376, 32 heads, 16 KV heads of 256 on sliding layers, 4 of 512 with K = V on
    # the full ones, a 27-layer 1152-wide vision tower) give 31.3B, the name's 31B within 3%.
    "google/gemma-4-31B-it": 31e9,
    # HF page: 8.63B, as recalled offline (the config was written from the published one the same way).
    "CohereLabs/aya-vision-8b": 8.63e9,
    # GLM-4.5V: 108B by its model card (a 106B-A12B GLM-4.5-Air decoder and its vision tower); the
    # checkpoint's multi-token-prediction layer is not instantiated, as for Qwen3.5.
    "zai-org/GLM-4.5V": 108e9,
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": 109e9,  # the model card's "109B total parameters"
    # Written from LiquidAI/LFM2-VL-1.6B's published config.json as recalled offline (no hub here): LFM2-1.2B
    # (16 layers of 2048, 6 of them attention, the MLP auto-sized to 8192) under a 26-layer SigLIP2 NaFlex
    # tower; 1.585B, the name's 1.6B within 3%.
    "LiquidAI/LFM2-VL-1.6B": 1.6e9,
}
NOMINAL = {
    "Qwen/Qwen3.5-27B",
    "Qwen/Qwen3.5-35B-A3B",
    "google/gemma-4-31B-it",
    "zai-org/GLM-4.5V",
    "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "LiquidAI/LFM2-VL-1.6B",
}
BUNDLED = list(mem.bundled_configs())


def shape_or_skip(hub_id: str) -> tuple:
    """(config, family, shape) of a bundled config; skipped while its family has no record yet."""
    from vlmtune.model.families import detect_family

    config = mem.resolve_config(hub_id).config
    try:
        family = detect_family(config)
    except ModelError as exc:
        pytest.skip(f"family not registered yet: {exc.message}")
    return config, family, mem.describe_model(config)


def recipe_for(model: str, **sections) -> object:
    from vlmtune.recipe import parse_recipe

    raw = {"model": {"name": model}, "data": {"train": "unused.jsonl"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(json.dumps(raw), source="test")


# --- bundled configs -------------------------------------------------------------------------------


def test_every_bundled_config_has_a_published_count_and_its_own_name():
    assert sorted(BUNDLED) == sorted(PUBLISHED)
    for hub_id in BUNDLED:
        assert mem.read_bundled(hub_id)["_name_or_path"] == hub_id
        assert mem.read_bundled(hub_id.lower()) is not None  # hub ids are case-insensitive


@pytest.mark.parametrize("hub_id", BUNDLED)
def test_bundled_config_matches_the_published_parameter_count(hub_id: str):
    _, _, shape = shape_or_skip(hub_id)
    assert shape.total_params == pytest.approx(PUBLISHED[hub_id], rel=0.03 if hub_id in NOMINAL else 0.01)


@pytest.mark.parametrize("hub_id", BUNDLED)
def test_bundled_config_estimates_every_term(hub_id: str):
    config, family, shape = shape_or_skip(hub_id)
    recipe = recipe_for(hub_id)
    setup = mem.training_method(recipe.model, recipe.quantization, recipe.lora, recipe.train, shape, family)
    work, _ = mem.workload_for(config, family, recipe.data, recipe.train, seq_len=256)
    result = mem.estimate(shape, setup, work, gpu_bytes=80 * mem.GiB)
    terms = result.terms
    assert all(
        terms[name] > 0 for name in ("weights", "lora", "gradients", "optimizer", "activations", "logits")
    )
    assert work.image_tokens > 0 and work.image_patches >= work.image_tokens
    assert {c.name for c in result.components} >= {"vision", "language", "lm_head"}
    assert {lin.component for lin in shape.linears if lin.name in setup.targets} == {"vision", "language"}
    # 4-bit weights: between NF4's 0.5 byte and bf16's 2 bytes per parameter
    assert 0.5 * shape.total_params < terms["weights"] < 2 * shape.total_params


def test_tied_lm_head_is_counted_once():
    _, _, shape = shape_or_skip("Qwen/Qwen2-VL-2B-Instruct")  # ties lm_head to the embeddings
    assert shape.tied_lm_head
    rows = {c.name: c for c in mem.weight_components(shape, mem.TrainingMethod())}
    assert rows["lm_head"].params == 0 and rows["lm_head"].bytes == 0
    _, _, untied = shape_or_skip("Qwen/Qwen2-VL-7B-Instruct")
    assert not untied.tied_lm_head
    assert {c.name: c for c in mem.weight_components(untied, mem.TrainingMethod())}[
        "lm_head"
    ].params == 152064 * 3584


MLLAMA_11B = "meta-llama/Llama-3.2-11B-Vision-Instruct"
# bench/gpu.py part memory_mllama_11b on an H200 (torch 2.11, transformers 5.23): `vlmtune train`, NF4 + double
# quant, LoRA r16 on both towers, checkpointing on, batch 2, one 448x448 image and 22 text tokens per sample;
# torch.cuda.max_memory_allocated during training. Before vlmtune checkpointed the vision layers transformers
# leaves out (bench/results/gpu-2026-11-30-h200.json), then with them checkpointed
# (bench/results/gpu-2026-11-30-h200-mllama-checkpointed.json).
MLLAMA_11B_MEASURED_PEAK_UNCHECKPOINTED = 36_810_102_272
MLLAMA_11B_MEASURED_PEAK = 13_237_857_280


@pytest.mark.parametrize("hub_id", BUNDLED)
def test_checkpointing_reaches_every_block(hub_id: str):
    """transformers misses Mllama's vision layers (plain modules); vlmtune's load stage covers them."""
    _, _, shape = shape_or_skip(hub_id)
    assert [layer for layer in shape.layers if not layer.checkpointable] == []


def mllama_estimate(**sections) -> tuple[mem.ModelShape, mem.MemoryEstimate]:
    config, family, shape = shape_or_skip(MLLAMA_11B)
    recipe = recipe_for(MLLAMA_11B, **{"train": {"batch_size": 2}, **sections})
    setup = mem.training_method(recipe.model, recipe.quantization, recipe.lora, recipe.train, shape, family)
    work, _ = mem.workload_for(config, family, recipe.data, recipe.train, seq_len=22, image_size=(448, 448))
    return shape, mem.estimate(shape, setup, work)


def test_mllama_vision_layers_left_unchecked_would_keep_every_activation():
    """The estimate's arithmetic for blocks checkpointing does not reach, against the H200 run that
    had them (before vlmtune checkpointed them), and vlmtune's run against the one that did not."""
    from dataclasses import replace

    shape, result = mllama_estimate()
    work, setup = result.workload, result.training
    positions = work.batch_size * work.image_patches  # 4 tiles x 40^2 patches per image, whatever its size
    vision = [layer for layer in shape.layers if layer.component == "vision"]
    vision_targets = [name for name in setup.targets if name.startswith("model.vision_model.")]
    assert len(vision_targets) == 6 * len(vision)  # q k v o fc1 fc2 in every vision layer
    kept = sum(positions * (layer.elems + 6 * setup.r) * 2 for layer in vision)
    # H200, the vision tower alone: 24.6k 16-bit elements per position and layer, 25.3 GB over 40 layers
    assert 24e9 < kept < 26e9
    unchecked = replace(
        shape,
        layers=tuple(replace(layer, checkpointable=layer.component != "vision") for layer in shape.layers),
    )
    as_transformers_runs_it = mem.estimate(unchecked, setup, work)
    inputs_only = sum(positions * layer.width * 2 for layer in vision)
    assert as_transformers_runs_it.terms["activations"] - result.terms["activations"] == kept - inputs_only
    assert any("does not reach the 40 vision layers" in note for note in as_transformers_runs_it.notes)
    assert as_transformers_runs_it.peak_bytes - mem.CUDA_CONTEXT_BYTES == pytest.approx(
        MLLAMA_11B_MEASURED_PEAK_UNCHECKPOINTED, rel=0.10
    )
    # vlmtune's run: 0.84 of the measured peak. Not modelled: the vision residual stream is fp32 under
    # autocast (Mllama's layernorm_pre), so its checkpoints are 4 bytes a value, and ~0.8 GB of stacked
    # intermediate states outside the layers.
    assert not any("does not reach" in note for note in result.notes)
    assert result.peak_bytes - mem.CUDA_CONTEXT_BYTES == pytest.approx(MLLAMA_11B_MEASURED_PEAK, rel=0.2)


def test_a_frozen_mllama_vision_tower_keeps_nothing_and_says_nothing():
    _, trained = mllama_estimate()
    _, frozen = mllama_estimate(lora={"finetune_vision_layers": False})
    assert frozen.terms["activations"] < trained.terms["activations"] / 10
    assert not any("gradient checkpointing does not reach" in note for note in frozen.notes)


# --- against real loaded models ------------------------------------------------------------------


def build_qwen2_vl(
    out: Path, hidden: int, layers: int, vocab: int, vision_depth: int, vision_dim: int
) -> Path:
    """A random Qwen2-VL checkpoint (weights only, no processor): enough to load and count bytes."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    heads = hidden // 16 if hidden < 256 else hidden // 64
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # sums to head_dim / 2
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 if hidden < 256 else hidden * 8 // 3,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, num_heads=2, mlp_ratio=2, hidden_size=hidden),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    # text hidden 64 (quantized Linears keep in_features >= 64), 2 layers, vocab 400; vision depth 2, width 32
    return build_qwen2_vl(tmp_path_factory.mktemp("tiny") / "ckpt", 64, 2, 400, 2, 32)


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    # about 100M parameters: text hidden 768, 8 layers, vocab 32,000; vision depth 4, width 256
    return build_qwen2_vl(tmp_path_factory.mktemp("mid") / "ckpt", 768, 8, 32_000, 4, 256)


def load_prepared(checkpoint: Path, recipe) -> tuple:
    """The model as `vlmtune train` prepares it: load stage, lora stage, then TRL's bf16 cast."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.model.families import detect_family
    from vlmtune.stages import load, lora

    family = detect_family(mem.resolve_config(str(checkpoint)).config)
    dtype = getattr(torch, recipe.model.dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=dtype, device_map={"": "cpu"},
        quantization_config=load.quantization_config(recipe.quantization, family, dtype),
    )  # fmt: skip
    weights = load.model_report(model, family)
    model = lora.apply(model, recipe.lora, lora.plan(model, family, recipe.lora), seed=recipe.train.seed)
    if recipe.quantization.bits is not None:  # SFTTrainer casts a quantized model's trainable params to bf16
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model, weights


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (bitsandbytes shares its quantization maps between tensors)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_bytes(model, optim: str) -> int:
    """Optimizer states after one step (gradients of zeros: the states are allocated all the same)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "adamw_torch":
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # AdamW's `step` counter is a scalar kept on the CPU, never on the GPU
    return tensor_bytes(
        t
        for state in optimizer.state.values()
        for k, t in state.items()
        if torch.is_tensor(t) and k != "step"
    )


def assert_components_match(predicted: mem.MemoryEstimate, report: dict) -> None:
    rows = {c.name: c for c in predicted.components}
    for name, real in report["components"].items():
        if real["params"]:
            assert rows[name].params == real["params"], name
            assert rows[name].bytes == pytest.approx(real["bytes"], rel=0.01), name
    assert predicted.terms["weights"] == pytest.approx(report["total_bytes"], rel=0.01)


QUANT_CASES = [
    pytest.param({"bits": 4, "double_quant": True}, id="nf4-dq"),
    pytest.param({"bits": 4, "double_quant": False}, id="nf4"),
    pytest.param({"bits": 8}, id="int8"),
    pytest.param({"bits": None}, id="bf16"),
]


@pytest.mark.parametrize("quant", QUANT_CASES)
def test_tiny_model_weights_lora_and_optimizer_match_the_loaded_model(tiny_checkpoint: Path, quant: dict):
    recipe = recipe_for(str(tiny_checkpoint), quantization=quant)
    predicted = mem.estimate_recipe(recipe)
    model, report = load_prepared(tiny_checkpoint, recipe)
    assert_components_match(predicted, report)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert predicted.trainable_params == sum(p.numel() for p in trainable)
    assert predicted.terms["lora"] == pytest.approx(tensor_bytes(trainable), rel=0.01)
    assert predicted.terms["gradients"] == predicted.terms["lora"]
    assert predicted.terms["optimizer"] == pytest.approx(
        optimizer_state_bytes(model, "adamw_torch"), rel=0.01
    )


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_mid_size_model_matches_the_loaded_model(mid_checkpoint: Path, optim: str):
    recipe = recipe_for(str(mid_checkpoint), train={"optim": optim})
    predicted = mem.estimate_recipe(recipe)
    assert 90e6 < predicted.total_params < 130e6
    model, report = load_prepared(mid_checkpoint, recipe)
    assert_components_match(predicted, report)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert predicted.terms["lora"] == pytest.approx(tensor_bytes(trainable), rel=0.01)
    assert predicted.terms["optimizer"] == pytest.approx(optimizer_state_bytes(model, optim), rel=0.01)


@pytest.mark.parametrize("family", family_names())
def test_every_family_weights_and_lora_match_its_loaded_tiny_model(family: str, tiny_path):
    """The quantization and target rules hold for each architecture, tied heads included."""
    path = tiny_path(family)
    recipe = recipe_for(str(path))
    predicted = mem.estimate_recipe(recipe)
    model, report = load_prepared(path, recipe)
    assert_components_match(predicted, report)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert predicted.trainable_params == sum(p.numel() for p in trainable)
    assert predicted.terms["lora"] == pytest.approx(tensor_bytes(trainable), rel=0.01)
    assert predicted.workload.image_tokens > 0


def test_full_fine_tuning_trains_every_weight_in_the_model_dtype(tiny_checkpoint: Path):
    recipe = recipe_for(str(tiny_checkpoint), quantization={"bits": None}, lora={"method": "full"})
    predicted = mem.estimate_recipe(recipe)
    assert predicted.terms["lora"] == 0 and predicted.lora_targets == 0
    assert predicted.trainable_params == predicted.total_params
    assert predicted.terms["gradients"] == predicted.terms["weights"] == 2 * predicted.total_params
    assert predicted.terms["optimizer"] == 2 * predicted.terms["weights"]  # AdamW: two bf16 states


@pytest.mark.slow
def test_the_training_pipeline_holds_what_was_predicted(tmp_path: Path):
    """LoRA dtype and optimizer states as TRL's SFTTrainer really leaves them, via `vlmtune train`."""
    import torch
    from transformers import TrainerCallback

    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe

    seen = {}

    class Capture(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            trainable = [p for p in model.parameters() if p.requires_grad]
            seen["lora"] = tensor_bytes(trainable)
            seen["dtypes"] = {p.dtype for p in trainable}
            seen["optimizer"] = tensor_bytes(
                t
                for s in optimizer.state.values()
                for k, t in s.items()
                if torch.is_tensor(t) and k != "step"
            )

    path = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(ROOT / "data/demo/train.jsonl"), "max_image_pixels": PIXEL_BUDGET},
        train={"max_steps": 1, "batch_size": 1, "grad_accum": 1, "max_length": 256, "save_steps": 100},
    )
    recipe = load_recipe(path)
    predicted = mem.estimate_recipe(recipe)
    pipeline.run(recipe, path.read_text(), "memory", tmp_path / "run", callbacks=[Capture()])
    report = json.loads((tmp_path / "run/1-load/model_report.json").read_text())
    assert predicted.terms["weights"] == pytest.approx(report["total_bytes"], rel=0.01)
    assert seen["dtypes"] == {torch.bfloat16}
    assert predicted.terms["lora"] == pytest.approx(seen["lora"], rel=0.01)
    assert predicted.terms["optimizer"] == pytest.approx(seen["optimizer"], rel=0.01)


# --- the arithmetic -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen7b():
    config, family, shape = shape_or_skip("Qwen/Qwen2-VL-7B-Instruct")
    return config, family, shape


def estimate_7b(qwen7b, seq_len: int = 1024, **sections) -> mem.MemoryEstimate:
    config, family, shape = qwen7b
    recipe = recipe_for("Qwen/Qwen2-VL-7B-Instruct", **sections)
    setup = mem.training_method(recipe.model, recipe.quantization, recipe.lora, recipe.train, shape, family)
    work, _ = mem.workload_for(config, family, recipe.data, recipe.train, seq_len=seq_len)
    return mem.estimate(shape, setup, work, gpu_bytes=24 * mem.GiB)


def test_nf4_bytes_per_parameter_are_the_measured_ones(qwen7b):
    n, rows = 4096 * 4096, 4096
    assert mem.quantized_bytes(n, rows, mem.TrainingMethod(bits=4, double_quant=False)) / n == pytest.approx(
        0.5625, abs=1e-4
    )
    assert mem.quantized_bytes(n, rows, mem.TrainingMethod(bits=4, double_quant=True)) / n == pytest.approx(
        0.5165, abs=1e-3
    )
    assert mem.quantized_bytes(n, rows, mem.TrainingMethod(bits=8)) / n == pytest.approx(1.0, abs=1e-3)


def test_knobs_move_the_terms_the_right_way(qwen7b):
    base = estimate_7b(qwen7b)
    no_ckpt = estimate_7b(qwen7b, train={"gradient_checkpointing": False})
    assert no_ckpt.terms["activations"] > 3 * base.terms["activations"]
    longer = estimate_7b(qwen7b, seq_len=4096)
    assert longer.terms["activations"] > base.terms["activations"]
    no_vision = estimate_7b(qwen7b, lora={"finetune_vision_layers": False})
    assert no_vision.terms["activations"] < base.terms["activations"]  # a frozen tower keeps nothing
    assert no_vision.lora_targets < base.lora_targets
    full_logits = estimate_7b(qwen7b, train={"supervised_loss": False})
    assert full_logits.terms["logits"] > 10 * base.terms["logits"]
    eight_bit = estimate_7b(qwen7b, train={"optim": "adamw_8bit"})
    assert eight_bit.terms["optimizer"] < base.terms["optimizer"]
    assert estimate_7b(qwen7b, quantization={"bits": 8}).terms["weights"] > base.terms["weights"]
    assert estimate_7b(qwen7b, lora={"r": 64}).terms["lora"] == pytest.approx(
        4 * base.terms["lora"], rel=1e-6
    )


def test_image_tokens_count_in_the_sequence(qwen7b):
    config, family, shape = qwen7b
    recipe = recipe_for("Qwen/Qwen2-VL-7B-Instruct")
    small, _ = mem.workload_for(config, family, recipe.data, recipe.train, seq_len=512, image_size=(448, 448))
    two, _ = mem.workload_for(
        config, family, recipe.data, recipe.train, seq_len=512, image_size=(448, 448), images_per_sample=2
    )
    assert small.image_tokens == 256 and small.image_patches == 1024  # (448/28)^2 tokens, 4 patches each
    assert two.sequence == 512 + 2 * 256
    # without --seq-len the text fills train.max_length around the images
    default, _ = mem.workload_for(config, family, recipe.data, recipe.train)
    assert default.sequence == recipe.train.max_length


def test_what_fits_is_the_largest_batch_and_length(qwen7b):
    config, family, shape = qwen7b
    result = estimate_7b(qwen7b)
    fit = result.fit
    assert fit.fits and fit.max_batch_size >= result.workload.batch_size
    setup, work = result.training, result.workload
    from dataclasses import replace

    assert mem.peak_bytes(shape, setup, replace(work, batch_size=fit.max_batch_size)) <= fit.gpu_bytes
    assert mem.peak_bytes(shape, setup, replace(work, batch_size=fit.max_batch_size + 1)) > fit.gpu_bytes
    assert mem.peak_bytes(shape, setup, replace(work, text_tokens=fit.max_seq_len)) <= fit.gpu_bytes
    assert mem.peak_bytes(shape, setup, replace(work, text_tokens=fit.max_seq_len + 1)) > fit.gpu_bytes
    tight = mem.estimate(shape, setup, work, gpu_bytes=4 * mem.GiB).fit  # the weights alone need more
    assert not tight.fits and tight.max_batch_size == 0 and tight.max_seq_len == -1


@pytest.mark.parametrize(
    "text, expected",
    [("24GB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("80g", 80 * 2**30), ("16000MB", 16000 * 2**20),
     ("24", 24 * 2**30), ("0.5TB", 2**39)],
)  # fmt: skip
def test_gpu_memory_sizes(text: str, expected: int):
    assert parse_gpu_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-3GB", "0", "24XB", ""])
def test_bad_gpu_memory_is_a_clear_error(text: str):
    with pytest.raises(VlmtuneError) as err:
        parse_gpu_memory(text)
    assert "--gpu-memory" in err.value.message and "24GB" in err.value.hint


def test_unknown_models_are_clear_errors(tmp_path: Path):
    with pytest.raises(ModelError) as err:
        mem.resolve_config(str(tmp_path / "missing"))
    assert err.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        mem.resolve_config(str(tmp_path / "empty"))
    with pytest.raises(ModelError) as err:
        mem.resolve_config("Qwen/Qwen2-VL-7B-Instruc")  # a typo: offline, so the hub cannot answer
    assert "Qwen/Qwen2-VL-7B-Instruct" in err.value.hint


# --- the command line -------------------------------------------------------------------------------


def test_json_has_the_stable_keys():
    result = vlmtune(
        "estimate-memory",
        "--model",
        "Qwen/Qwen2-VL-2B-Instruct",
        "--json",
        "--gpu-memory",
        "16GB",
        "--seq-len",
        "512",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"total_params", "peak_bytes", "components", "terms", "fits"} <= set(out)
    for term in ("weights", "lora", "optimizer", "activations", "logits", "overhead"):
        assert isinstance(out[term], int) and out[term] == out["terms"][term]
    assert out["peak_bytes"] == sum(out["terms"].values())
    assert all(set(c) >= {"name", "params", "dtype", "bytes"} for c in out["components"])
    assert sum(c["params"] for c in out["components"]) == out["total_params"]
    assert {"max_batch_size", "max_seq_len", "fits"} <= set(out["fits"])
    assert out["inputs"]["seq_len"] == 512


def test_a_recipe_with_overrides_and_knobs(tmp_path: Path):
    from typer.testing import CliRunner

    from vlmtune.cli import app

    path = write_recipe(tmp_path, model={"name": "Qwen/Qwen2.5-VL-3B-Instruct"}, data={"train": "x.jsonl"})
    args = ["estimate-memory", str(path), "--set", "train.batch_size=3", "--optim", "adamw_8bit", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["inputs"]["batch_size"] == 3 and out["inputs"]["optim"] == "adamw_8bit"
    assert out["family"] == "qwen2_5_vl"
    table = CliRunner().invoke(app, ["estimate-memory", str(path), "--gpu-memory", "24GB"])
    assert table.exit_code == 0, table.output
    assert (
        "language" in table.output and "activations" in table.output and "largest batch size" in table.output
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "./no/such/folder"], "not a folder with a config.json"),
        (["--model", "Qwen/Qwen2-VL-2B-Instruct", "--gpu-memory", "lots"], "cannot read --gpu-memory"),
        (["--model", "Qwen/Qwen2-VL-2B-Instruct", "--bits", "3"], "--bits"),
        (["--model", "Qwen/Qwen2-VL-2B-Instruct", "--optim", "lion"], "train.optim"),
        (["recipes/demo.yaml", "--model", "Qwen/Qwen2-VL-2B-Instruct"], "either a RECIPE or --model"),
    ],
)
def test_user_errors_exit_2_with_a_hint(args: list[str], expected: str):
    result = vlmtune("estimate-memory", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_command_module_imports_no_heavy_library():
    import subprocess
    import sys

    code = "import sys, vlmtune.commands.memory; print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
