"""The kernels swapped into tiny models of each family give the same loss and gradients as the torch path.

On CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32. Also: what
``train.kernels`` selects (nothing on CPU, nothing unmeasured), and that a swap the record contradicts
is refused.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmtune.kernels import triton_available
from vlmtune.model.families import family_names, get_family

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

FAMILIES = tuple(family_names())


def tiny(family_name: str, quantized: bool = False):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from vlmtune.model.tiny import tiny_model_path

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=get_family(family_name).keep_16bit(),
        )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_model_path(family_name), dtype=torch.float32, **kwargs
    )
    return model.train()


def text_batch(family_name: str) -> dict:
    torch.manual_seed(2)
    ids = torch.randint(10, 60, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in get_family(family_name).extra_inputs:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _restore_rotary():
    yield
    from vlmtune.kernels.patching import unpatch_rotary

    unpatch_rotary()


@pytest.mark.slow
@pytest.mark.parametrize("family_name", FAMILIES)
def test_patched_model_matches_torch_loss_and_gradients(family_name):
    from vlmtune.kernels.patching import patch_model

    family = get_family(family_name)
    model, batch = tiny(family_name), text_batch(family_name)
    loss_ref, grads_ref = loss_and_grads(model, batch)
    report = patch_model(model, family, ["rmsnorm", "glu", "rope"])
    layers = model.config.get_text_config().num_hidden_layers
    # Each kind the record names is swapped in everywhere; a kind it names None nowhere.
    assert (report.patched["rmsnorm"] >= 2 * layers + 1) if family.norm else not report.patched["rmsnorm"], (
        report
    )
    assert report.patched["glu"] == (layers if family.mlp_activation else 0), report
    assert (report.patched["rope"] >= 1) if family.rope else not report.patched["rope"], report
    assert not report.skipped, report
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_record_that_contradicts_the_model_is_not_applied():
    """Qwen2-VL's norms are plain RMSNorm and its MLP SwiGLU: a record saying Gemma's leaves them alone."""
    from vlmtune.kernels.patching import patch_model

    wrong = dataclasses.replace(get_family("qwen2_vl"), norm="gemma_rmsnorm", mlp_activation="geglu")
    report = patch_model(tiny("qwen2_vl"), wrong, ["rmsnorm", "glu"])
    assert not report.patched, report
    assert any("gemma_rmsnorm" in why for why in report.skipped.values())
    assert any("geglu" in why for why in report.skipped.values())


@pytest.mark.slow
def test_nf4_lora_patch_matches_peft_on_a_4bit_model():
    """QLoRA: the fused NF4 + LoRA path gives peft's loss and LoRA gradients, and is used."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.kernels.patching import patch_model

    family = get_family("qwen2_vl")
    model = tiny("qwen2_vl", quantized=True)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|up_proj|down_proj)"
    )
    model = get_peft_model(model, lora)
    torch.manual_seed(3)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at 0: give A a gradient to compare
            torch.nn.init.normal_(parameter, std=0.1)
    batch = text_batch("qwen2_vl")
    loss_ref, grads_ref = loss_and_grads(model, batch)
    report = patch_model(model, family, ["nf4_lora"])
    assert report.patched["nf4_lora"] == 3 * model.config.get_text_config().num_hidden_layers, report
    from vlmtune.kernels import nf4_lora as fused

    calls = []
    original = fused.NF4LoRAFunction.apply
    fused.NF4LoRAFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        loss, grads = loss_and_grads(model, batch)
    finally:
        fused.NF4LoRAFunction.apply = original
    assert calls, "the fused path was not taken"
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("mode", "device"), [("off", "cuda"), ("auto", "cpu"), ("off", "cpu")])
def test_kernels_are_never_chosen_off_or_on_cpu(mode, device, monkeypatch):
    from vlmtune.kernels import patching

    monkeypatch.setattr(patching, "MEASURED_FASTER", dict.fromkeys(patching.KERNELS, 2.0))
    assert patching.chosen(mode, device) == ()


def test_auto_on_cuda_uses_only_kernels_measured_faster(monkeypatch):
    from vlmtune.kernels import patching

    assert patching.chosen("auto", "cuda") == tuple(k for k, v in patching.MEASURED_FASTER.items() if v > 1.0)
    monkeypatch.setattr(patching, "MEASURED_FASTER", {"rmsnorm": 1.3, "glu": 0.9})
    assert patching.chosen("auto", "cuda") == ("rmsnorm",)


def test_kernels_asked_for_without_triton_is_a_user_error(monkeypatch):
    import vlmtune.kernels as kernels
    from vlmtune.errors import ModelError

    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ModelError) as raised:
        kernels.require_triton()
    assert "triton" in str(raised.value) and "train.kernels: off" in raised.value.hint


def test_recipe_kernels_and_offload_default_off():
    from vlmtune.recipe import TrainSection

    train = TrainSection()
    assert train.kernels == "off" and train.offload_activations is False
    with pytest.raises(ValueError):
        TrainSection(kernels="on")


class _Run:
    def __init__(self):
        self.recorded: dict = {}

    def record(self, **figures):
        self.recorded.update(figures)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_speed_switches_patch_what_auto_picks_and_nothing_under_fsdp(fsdp, monkeypatch):
    """The train stage's hook: with rmsnorm measured faster on CUDA it is swapped in, except under FSDP."""
    from types import SimpleNamespace

    from vlmtune.kernels import patching
    from vlmtune.recipe import TrainSection
    from vlmtune.runs import rundir
    from vlmtune.stages.common import speed_switches

    monkeypatch.setattr(patching, "MEASURED_FASTER", {"rmsnorm": 1.4})
    trainer = SimpleNamespace(
        model=tiny("qwen2_vl"), args=SimpleNamespace(fsdp=["full_shard"] if fsdp else [])
    )
    run = _Run()
    # "cuda" as the run's device; the tiny model stays on CPU, where the interpreter runs the kernel
    speed_switches(
        trainer, TrainSection(kernels="auto", offload_activations=True), get_family("qwen2_vl"), run, "cuda"
    )
    used = run.recorded[rundir.SPEED_SWITCHES]["kernels_used"]["patched"]
    assert used == ({} if fsdp else {"rmsnorm": 5})
    assert trainer.offload_activations is True
