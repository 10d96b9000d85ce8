"""estimate-memory --gpus N: the per-GPU peak under DDP and under FSDP, from the bundled configs."""

from __future__ import annotations

import json

import pytest

from vlmtune import memory as mem
from vlmtune.model.families import detect_family
from vlmtune.recipe import Recipe, parse_recipe

QWEN_7B = "Qwen/Qwen2.5-VL-7B-Instruct"


def recipe_for(model: str, **sections) -> Recipe:
    raw = {"model": {"name": model}, "data": {"train": "unused.jsonl"}, **sections}
    return parse_recipe(json.dumps(raw), source="test")


def spread(model: str, gpus: int, **sections) -> mem.MemoryEstimate:
    return mem.estimate_recipe(recipe_for(model, **sections), gpus=gpus, seq_len=512)


def per_gpu(result: mem.MemoryEstimate) -> dict[str, mem.PerGpu]:
    return {p.strategy: p for p in result.per_gpu}


def shape_and_method(model: str, **sections):
    recipe = recipe_for(model, **sections)
    config = mem.resolve_config(model).config
    family, shape = detect_family(config), mem.describe_model(config)
    method = mem.training_method(recipe.model, recipe.quantization, recipe.lora, recipe.train, shape, family)
    return family, shape, method


def test_one_gpu_adds_nothing():
    result = spread(QWEN_7B, 1)
    assert result.gpus == 1 and result.per_gpu == ()
    assert "per_gpu" not in result.to_json()


def test_ddp_holds_everything_on_every_gpu_plus_the_gradient_buckets():
    result = spread(QWEN_7B, 4)
    ddp = per_gpu(result)["ddp"]
    assert {k: v for k, v in ddp.terms.items() if k != "buckets"} == result.terms
    assert ddp.terms["buckets"] == result.terms["gradients"] > 0
    assert ddp.peak_bytes == result.peak_bytes + result.terms["gradients"]
    assert per_gpu(spread(QWEN_7B, 8))["ddp"].peak_bytes == ddp.peak_bytes  # more GPUs, same per-GPU load


@pytest.mark.parametrize("sections", [{}, {"lora": {"method": "full"}, "quantization": {"bits": None}}])
def test_fsdp_shards_the_states_and_gathers_the_root_and_two_blocks(sections: dict):
    gpus = 4
    result = spread(QWEN_7B, gpus, **sections)
    fsdp = per_gpu(result)["fsdp"]
    for term in ("weights", "lora", "gradients", "optimizer"):
        assert fsdp.terms[term] == -(-result.terms[term] // gpus)  # ceil: each GPU holds a quarter
    for term in ("activations", "logits", "overhead"):
        assert fsdp.terms[term] == result.terms[term]  # each GPU runs its own batch
    family, shape, method = shape_and_method(QWEN_7B, **sections)
    units = mem.unit_bytes(shape, method, family.block_lists)
    root = units.pop("")
    # Every block of both towers is a unit of its own; the rest is the root.
    assert len(units) == sum(1 for layer in shape.layers)
    # The units hold every byte of the model and of its adapters, and every gradient.
    total = sum(u.params for u in units.values()) + root.params
    assert total == result.terms["weights"] + result.terms["lora"]
    assert sum(u.grads for u in units.values()) + root.grads == result.terms["gradients"]
    largest = max(units.values(), key=lambda u: u.params)
    assert fsdp.terms["gathered"] == root.params + root.grads + 2 * largest.params + largest.grads
    # The root holds the embeddings and the (untied) lm_head: 2 x 152k x 3584 bf16 values.
    assert root.params >= 2 * 152_064 * 3_584 * 2


def test_fsdp_is_what_makes_full_finetuning_of_a_72b_model_fit_on_8_gpus():
    result = spread("Qwen/Qwen2.5-VL-72B-Instruct", 8, lora={"method": "full"}, quantization={"bits": None})
    strategies = per_gpu(result)
    assert strategies["ddp"].peak_bytes > 600 * mem.GiB
    assert strategies["fsdp"].peak_bytes < 0.15 * strategies["ddp"].peak_bytes
    # More GPUs, less per GPU (the gathered units and the activations stay).
    sixteen = per_gpu(
        spread("Qwen/Qwen2.5-VL-72B-Instruct", 16, lora={"method": "full"}, quantization={"bits": None})
    )
    assert sixteen["fsdp"].peak_bytes < strategies["fsdp"].peak_bytes


@pytest.mark.parametrize(
    ("objective", "knobs"), [("dpo", {}), ("grpo", {"grpo": {"rewards": [{"type": "contains"}]}})]
)
def test_objectives_refused_under_fsdp_get_the_ddp_figure_only(objective: str, knobs: dict):
    result = spread(QWEN_7B, 4, train={"objective": objective, "grad_accum": 8}, **knobs)
    assert [p.strategy for p in result.per_gpu] == ["ddp"]
    assert per_gpu(result)["ddp"].peak_bytes == result.peak_bytes + result.terms["gradients"]
    assert f"per GPU: DDP only; train.objective {objective} is not run under FSDP" in result.notes
    assert set(result.to_json()["per_gpu"]) == {"ddp"}


def test_the_command_prints_both_strategies_per_gpu():
    from typer.testing import CliRunner

    from vlmtune.cli import app

    args = ["estimate-memory", "--model", QWEN_7B, "--gpus", "4", "--gpu-memory", "8GB", "--seq-len", "512"]
    out = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert out["gpus"] == 4 and set(out["per_gpu"]) == {"ddp", "fsdp"}
    for strategy in out["per_gpu"].values():
        assert strategy["peak_bytes"] == sum(strategy["terms"].values())
        assert strategy["fits"] == (strategy["peak_bytes"] <= 8 * mem.GiB)
    assert out["per_gpu"]["ddp"]["fits"] is False and out["per_gpu"]["fsdp"]["fits"] is True
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "per GPU, spread over 4 GPUs" in table.output
    assert "ddp: does not fit in 8.00 GiB per GPU" in table.output and "fsdp: fits" in table.output


def test_zero_gpus_is_refused():
    from typer.testing import CliRunner

    from vlmtune.cli import app

    result = CliRunner().invoke(app, ["estimate-memory", "--model", QWEN_7B, "--gpus", "0"])
    assert result.exit_code != 0 and "--gpus" in result.output
