"""Mixture-of-experts families: LoRA reaches the fused experts (3-D parameters, no Linears) through
peft's target_parameters, the router is never quantized, 4-bit leaves the experts 16-bit, and
estimate-memory tells total from active parameters. Expected names come from the loaded model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlmtune.errors import RecipeError
from vlmtune.model.families import FAMILIES, get_family
from vlmtune.recipe import LoraSection, ModelSection, QuantizationSection
from vlmtune.stages import load, lora

from conftest import ONE_IMAGE, PIXEL_BUDGET, TWO_TURNS

MOE = [f.name for f in FAMILIES if f.moe]
EXPERT_TENSORS = (".experts.gate_up_proj", ".experts.down_proj")


def test_the_moe_families_are_the_expected_ones():
    assert sorted(MOE) == ["gemma4", "glm4v_moe", "llama4", "qwen3_5_moe", "qwen3_vl_moe"]


@pytest.fixture(scope="module", params=MOE)
def loaded(request):
    return load.load(ModelSection(name=f"tiny:{request.param}"), QuantizationSection(), PIXEL_BUDGET, "cpu")


def test_4bit_leaves_the_router_and_the_experts_16bit(loaded):
    params = dict(loaded.model.named_parameters())
    routers = {n: p for n, p in params.items() if n.endswith(f".{loaded.family.router}.weight")}
    experts = {n: p for n, p in params.items() if n.endswith(EXPERT_TENSORS)}
    assert routers and len(experts) == 2 * len(routers)  # one router and two expert tensors per MoE layer
    for name, param in {**routers, **experts}.items():
        assert type(param).__name__ == "Parameter" and param.dtype.is_floating_point, name
        assert param.dtype.itemsize == 2, name  # bfloat16, never packed 4-bit
    modules = dict(loaded.model.named_modules())
    for name, module in modules.items():  # a router or gate that were a Linear stays a plain one
        if name.endswith((f".{loaded.family.router}", ".shared_expert_gate")):
            assert type(module).__name__ != "Linear4bit", name
    # ...while the attention Linears of the same layers are 4-bit
    assert (
        type(modules[f"{loaded.family.language_prefix}.layers.1.self_attn.q_proj"]).__name__ == "Linear4bit"
    )


@pytest.mark.parametrize("family", MOE)
def test_lora_reaches_every_expert_tensor_and_trains_it(family: str):
    import torch

    loaded = load.load(ModelSection(name=f"tiny:{family}"), QuantizationSection(), PIXEL_BUDGET, "cpu")

    section = LoraSection(r=4, alpha=8)
    plan = lora.plan(loaded.model, loaded.family, section)
    expected = {n for n, _ in loaded.model.named_parameters() if n.endswith(EXPERT_TENSORS)}
    assert set(plan.expert_parameters) == expected and plan.experts_refused is None
    model = lora.apply(loaded.model, section, plan, seed=0)
    model.train()
    expert_lora = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert len(expert_lora) == 2 * len(expected)  # A and B per expert tensor
    routers = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith(f".{loaded.family.router}.weight")
    }
    assert routers
    before = {n: p.detach().clone() for n, p in expert_lora.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    from vlmtune.data.collator import VisionCollator

    batch = VisionCollator(loaded.processor, loaded.family, max_length=None, train_on_responses_only=True)(
        [TWO_TURNS, ONE_IMAGE]
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in expert_lora.items() if "lora_B" in n}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), (
        "every expert's LoRA gets a gradient"
    )
    optimizer.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in expert_lora.items() if "lora_B" in n)
    for name, value in routers.items():  # the router is not a target and stays frozen
        assert torch.equal(dict(model.named_parameters())[name].detach(), value), name


def test_inspect_names_the_expert_tensors_lora_reaches():
    from typer.testing import CliRunner

    from vlmtune.cli import app

    result = CliRunner().invoke(app, ["inspect", "--model", "tiny:qwen3_vl_moe"])
    assert result.exit_code == 0, result.output
    assert "LoRA on the experts: 4 fused expert tensors" in result.output


def test_the_mlp_toggle_off_leaves_the_experts_alone(loaded):
    plan = lora.plan(loaded.model, loaded.family, LoraSection(finetune_mlp_modules=False))
    assert plan.expert_parameters == () and plan.targets


def test_a_family_that_refuses_expert_lora_says_why(loaded):
    reason = "its experts are stored in a layout peft cannot wrap"
    refusing = dataclasses.replace(loaded.family, expert_lora_refusal=reason)
    both = lora.plan(loaded.model, refusing, LoraSection())
    assert both.expert_parameters == () and both.experts_refused == reason and both.targets
    experts_only = LoraSection(finetune_vision_layers=False, finetune_attention_modules=False)
    if loaded.family.name == "qwen3_vl_moe":  # no other language MLP Linear: nothing would train
        with pytest.raises(RecipeError, match=reason) as info:
            lora.plan(loaded.model, refusing, experts_only)
        assert "finetune_attention_modules" in info.value.hint


# --- estimate-memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hub_id",
    ["Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3-VL-30B-A3B-Instruct", "zai-org/GLM-4.5V",
     "meta-llama/Llama-4-Scout-17B-16E-Instruct"],
)  # fmt: skip
def test_estimate_memory_counts_total_and_active_parameters_and_16bit_experts(hub_id: str):
    from vlmtune import memory as mem
    from vlmtune.recipe import parse_recipe

    recipe = parse_recipe(f"model: {{name: {hub_id}}}\ndata: {{train: x.jsonl}}\n")
    result = mem.estimate_recipe(recipe)
    doc = result.to_json()
    assert 0 < doc["active_params"] < doc["total_params"] / 5  # "A3B": about 3B of 30-35B
    assert doc["expert_params"] > doc["total_params"] / 2
    language = next(c for c in result.components if c.name == "language")
    # the experts stay bf16 under 4-bit: 2 bytes each, the rest of the language model at most 2
    assert language.bytes > 2 * doc["expert_params"]
    assert language.quantized_params < language.params - doc["expert_params"] + 1
    assert any("cannot quantize the fused expert tensors" in note for note in doc["notes"])
    assert doc["inputs"]["lora_expert_tensors"] > 0
    dense = mem.estimate_recipe(parse_recipe("model: {name: Qwen/Qwen3.5-27B}\ndata: {train: x.jsonl}\n"))
    assert dense.to_json()["active_params"] == dense.total_params and dense.to_json()["expert_params"] == 0


def test_every_record_names_a_router_for_its_experts():
    for family in FAMILIES:
        assert bool(family.router) == family.moe, family.name
        if family.moe:
            assert any(family.router in pattern.replace("\\", "") for pattern in family.keep_16bit()), (
                family.name
            )
    assert get_family("qwen3_5").expert_parameters == ()


# --- the new families through the pipeline ------------------------------------------------------------

NEW = ["qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "gemma4", "glm4v", "glm46v", "aya_vision", "minicpmv4_6",
       "glm4v_moe", "llama4", "lfm2_vl"]  # fmt: skip
PAIRS = Path(__file__).parent / "data" / "preference" / "trl.jsonl"
DEMO = Path(__file__).parent.parent / "data" / "demo" / "train.jsonl"


# DPO for every new family that serves it; SFT through the pipeline for three MoEs (the adapter must carry the
# experts).
# SFT's loss on every family is tests/test_family_training.py's two QLoRA steps, GRPO's tests/test_grpo.py.
RUNS = [(family, "dpo") for family in NEW if not get_family(family).refusal("dpo")]
RUNS += [
    ("qwen3_5_moe", "sft"),
    ("glm4v_moe", "sft"),
    ("llama4", "sft"),
]  # these two refuse DPO (their records say why)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "objective"), RUNS)
def test_qlora_sft_and_dpo_runs_through_the_pipeline(family: str, objective: str, tmp_path: Path):
    """4-bit base, LoRA on both towers (and the experts): two steps, finite losses, an adapter that holds
    every planned module; for a MoE, the experts' LoRA is in the saved adapter."""
    import math

    from safetensors import safe_open

    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe
    from vlmtune.runs import rundir

    from conftest import write_recipe

    train = {"objective": objective, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-3,
             "max_length": 512, "save_steps": 1000}  # fmt: skip
    path = write_recipe(
        tmp_path, model={"name": f"tiny:{family}"}, train=train, output={"dir": "runs"},
        data={"train": str(PAIRS if objective == "dpo" else DEMO), "max_image_pixels": PIXEL_BUDGET},
    )  # fmt: skip
    run = pipeline.run(load_recipe(path), path.read_text(), "r", tmp_path / "run")
    assert run.summary()["status"] == "done"
    losses = run.losses()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    plan = run.read_json(rundir.LORA_PLAN)
    with safe_open(str(run / rundir.ADAPTER / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    vision = get_family(family).vision_prefix
    assert any(f".{vision}." in k for k in keys) and any(".language_model." in k for k in keys)
    if get_family(family).moe:
        assert (
            len(plan["expert_parameters"])
            == 2 * sum(".experts.down_proj" in n for n in plan["expert_parameters"])
            > 0
        )
        assert any(".experts." in k for k in keys), "the experts' LoRA is saved"


# --- peft's transformers-4 rewrite of MoE targets (vlmtune.model.peft_targets) ---------------------------


def _wrapped(model) -> set[str]:
    """Module names peft put a LoRA on (the Linears; the experts' ParamWrapper appears as `experts`)."""
    return {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for n, _ in model.named_modules()
            if n.endswith(".lora_A")}  # fmt: skip


def test_peft_wraps_exactly_the_planned_linears_of_glm4v_moe_and_reloads_them(tmp_path: Path):
    """peft 0.21 rewrites glm4v_moe's gate/up/down_proj targets into the fused experts (transformers 4
    adapters); vlmtune's plan names transformers 5 modules, so it must reach the dense MLP, the shared
    expert and the vision MLP as planned, at the planned rank, and reload the same way."""
    import torch
    from peft import PeftModel

    section = LoraSection(r=4, alpha=8)
    loaded = load.load(
        ModelSection(name="tiny:glm4v_moe"), QuantizationSection(bits=None), PIXEL_BUDGET, "cpu"
    )
    plan = lora.plan(loaded.model, loaded.family, section)
    assert any(".shared_experts.gate_proj" in t for t in plan.targets)
    assert any(t.startswith("model.visual.blocks.") and t.endswith("mlp.gate_proj") for t in plan.targets)
    model = lora.apply(loaded.model, section, plan, seed=0)
    assert {t for t in _wrapped(model) if not t.endswith(".experts") and ".experts." not in t} == set(
        plan.targets
    )
    experts_a = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_A" in n}
    assert {p.shape[0] for p in experts_a.values()} == {4 * 4}, "rank r per expert, never doubled"
    model.save_pretrained(tmp_path)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    fresh = load.load(
        ModelSection(name="tiny:glm4v_moe"), QuantizationSection(bits=None), PIXEL_BUDGET, "cpu"
    )
    reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    again = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[n], saved[n]) for n in saved)


def test_without_the_mark_peft_would_move_glm4v_moe_mlp_targets_into_the_experts():
    """Negative control: an unmarked model gets peft's conversion (the reason for the mark)."""
    from peft import LoraConfig, get_peft_model

    from vlmtune.model.peft_targets import MARK

    loaded = load.load(
        ModelSection(name="tiny:glm4v_moe"), QuantizationSection(bits=None), PIXEL_BUDGET, "cpu"
    )
    plan = lora.plan(loaded.model, loaded.family, LoraSection(r=4, alpha=8))
    setattr(loaded.model, MARK, False)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=plan.regex, target_parameters=list(plan.expert_parameters)
    )
    model = get_peft_model(loaded.model, config)
    assert not any(".shared_experts." in n for n in _wrapped(model)), (
        "peft dropped the shared expert's Linears"
    )


def test_glm4v_moe_refuses_dpo_with_the_reason_before_any_weight_loads(tmp_path: Path):
    from vlmtune import pipeline
    from vlmtune.errors import ModelError
    from vlmtune.recipe import load_recipe

    from conftest import write_recipe

    path = write_recipe(
        tmp_path, model={"name": "tiny:glm4v_moe"}, train={"objective": "dpo"}, output={"dir": "runs"},
        data={"train": str(PAIRS)},
    )  # fmt: skip
    with pytest.raises(ModelError, match="GLM-4.5V cannot be trained with train.objective: dpo") as info:
        pipeline.run(load_recipe(path), path.read_text(), "r", tmp_path / "run")
    assert "n_routed_experts" in str(info.value) and "train.objective" in info.value.hint
    assert not any((tmp_path / "run" / "1-load").iterdir())  # refused before the load stage wrote anything


@pytest.mark.parametrize("family", ["llama4", "glm4v_moe"])
def test_a_merge_probes_the_linears_beside_the_experts_lora(family: str):
    """`vlmtune export --merge` probes the LoRA modules' merged weights; peft's wrapper of a fused expert
    tensor has no weight of its own (it failed with an AttributeError): the probes are the Linears."""
    from vlmtune.after.export import merge_probes

    loaded = load.load(
        ModelSection(name=f"tiny:{family}"), QuantizationSection(bits=None), PIXEL_BUDGET, "cpu"
    )
    section = LoraSection(r=4, alpha=8)
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section), seed=0)
    probes = merge_probes(model, loaded.family.component_of, 4)
    assert len(probes) == 4 and not any(".experts" in probe.module for probe in probes)
