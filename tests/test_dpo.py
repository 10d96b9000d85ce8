"""Preference tuning (train.objective: dpo): the recipe keys, TRL's config, and the frozen reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlmtune.errors import RecipeError
from vlmtune.recipe import (
    DataSection,
    DpoSection,
    LoraSection,
    ModelSection,
    QuantizationSection,
    TrainSection,
    parse_recipe,
)
from vlmtune.runs.rundir import RunDir

from conftest import ROOT

PAIRS = ROOT / "tests" / "data" / "preference" / "trl.jsonl"
MINIMAL = "model:\n  name: tiny:qwen2_vl\ndata:\n  train: pairs.jsonl\n"


# --- the recipe ---------------------------------------------------------------------------------


def test_the_objective_gets_its_section_with_defaults_and_resolved_yaml_round_trips():
    recipe = parse_recipe(MINIMAL + "train:\n  objective: dpo\n")
    assert recipe.dpo == DpoSection() and recipe.objective_options() is recipe.dpo
    assert parse_recipe(recipe.to_yaml()) == recipe
    sft = parse_recipe(MINIMAL)
    assert sft.dpo is None and sft.objective_options() is None
    assert parse_recipe(sft.to_yaml()) == sft, "an sft run's resolved.yaml (dpo: null) loads again"


MISTAKES = [
    ("dpo:\n  beta: 0.2\n", "a `dpo:` section is given but train.objective is sft; set train.objective: dpo"),
    ("train:\n  objective: dpo\nlora:\n  dropout: 0.1\n",
     "lora.dropout applies to sft only, and train.objective is dpo (DPO turns dropout off"),
    ("train:\n  objective: dpo\n  supervised_loss: false\n", "train.supervised_loss applies to sft only"),
    ("train:\n  objective: dpo\ndpo:\n  label_smoothing: 0.1\n",
     "dpo.label_smoothing is set but loss_type sigmoid does not read it; use loss_type robust"),
    ("train:\n  objective: dpo\ndpo:\n  loss_type: exo_pair\n", "exo_pair needs dpo.label_smoothing above 0"),
    ("train:\n  objective: dpo\ndpo:\n  loss_type: kto\n", "dpo.loss_type (line 8): Input should be 'sigmoid', 'ipo'"),
    ("train:\n  objective: dpo\ndpo:\n  betta: 0.2\n", "dpo.betta (line 8): unknown key; did you mean `dpo.beta`?"),
    ("beta: 0.2\n", "beta (line 5): unknown key; did you mean `dpo.beta`?"),
    ("model:\n  name: tiny:qwen2_vl\n  adapter: runs/sft\nquantization:\n  bits: null\nlora:\n  method: full\n"
     "train:\n  objective: dpo\ndpo:\n  reference: base\n", "dpo.reference base with lora.method full and model.adapter"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_keys_that_do_not_apply_to_the_objective_are_errors_with_a_hint(extra, message):
    text = MINIMAL + extra if not extra.startswith("model:") else extra + "data:\n  train: pairs.jsonl\n"
    with pytest.raises(RecipeError) as raised:
        parse_recipe(text)
    assert any(message in problem for problem in raised.value.problems), raised.value.problems


def test_a_default_value_of_an_sft_only_key_is_accepted_under_dpo():
    """resolved.yaml writes every key: its defaults must load again under any objective."""
    recipe = parse_recipe(
        MINIMAL + "train:\n  objective: dpo\n  supervised_loss: true\nlora:\n  dropout: 0.0\n"
    )
    assert recipe.train.objective == "dpo"


# --- TRL's config -------------------------------------------------------------------------------


def test_dpo_config_carries_the_knobs_and_the_rpo_term(tmp_path: Path):
    from vlmtune.stages.dpo import dpo_config

    run = RunDir.create(tmp_path, "r")
    train = TrainSection(objective="dpo", lr=5e-6, batch_size=3, max_steps=7, gradient_checkpointing=False)
    pure = dpo_config(train, DpoSection(beta=0.3, loss_type="ipo"), run, "cpu", "bfloat16", has_eval=False)
    assert (pure.beta, pure.loss_type, pure.loss_weights) == (0.3, ["ipo"], [1.0])
    assert (pure.learning_rate, pure.per_device_train_batch_size, pure.max_steps) == (5e-6, 3, 7)
    assert pure.max_length is None and pure.activation_checkpointing is False and pure.use_cpu
    assert pure.output_dir == str(run / "3-train/checkpoints") and not pure.remove_unused_columns
    rpo = dpo_config(train, DpoSection(sft_weight=0.5), run, "cpu", "float32", has_eval=False)
    assert (rpo.loss_type, rpo.loss_weights, rpo.bf16) == (["sigmoid", "sft"], [1.0, 0.5], False)
    robust = dpo_config(
        train, DpoSection(loss_type="robust", label_smoothing=0.1), run, "cpu", "float32", False
    )
    assert robust.label_smoothing == 0.1


# --- the reference stays frozen -----------------------------------------------------------------


def loaded_model(bits: int | None, method: str, adapter: Path | None = None, seed: int = 0):
    from vlmtune.stages import load, lora

    loaded = load.load(
        ModelSection(name="tiny:qwen2_vl", dtype="float32"), QuantizationSection(bits=bits), 12544, "cpu"
    )
    section = LoraSection(method=method)
    plan = lora.plan(loaded.model, loaded.family, section)
    return lora.apply(loaded.model, section, plan, seed=seed, adapter=adapter), loaded


def trained_looking_adapter(folder: Path) -> Path:
    """A LoRA adapter whose lora_B are not zero, saved as a run saves one (stands in for an SFT run)."""
    import torch

    model, _ = loaded_model(None, "lora")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return folder


def build(tmp_path: Path, model, loaded, reference: str = "start"):
    from vlmtune.stages import dpo

    run = RunDir.create(tmp_path, "r")
    data = DataSection(train=str(PAIRS), shuffle=False)
    train = TrainSection(objective="dpo", max_steps=3, batch_size=3, grad_accum=1, lr=5e-3, max_length=512,
                         gradient_checkpointing=False, save_steps=1000)  # fmt: skip
    return dpo.build_trainer(
        model, loaded.processor, loaded.family, data, train, DpoSection(reference=reference), run=run,
        device="cpu", dtype="float32",
    )  # fmt: skip


def logps(trainer, batch, reference: bool):
    """Summed answer log-probs of the chosen and rejected rows, by the policy or by TRL's reference."""
    import torch

    if reference:
        return torch.cat(trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        return trainer.model(**inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)


def base_logps(trainer, batch):
    with trainer.model.disable_adapter():
        return logps(trainer, batch, reference=False)


def tiny_estimate(continued: bool):
    from vlmtune import memory as mem

    model = {"name": "tiny:qwen2_vl", "dtype": "float32", **({"adapter": "runs/sft"} if continued else {})}
    recipe = parse_recipe(
        f"model: {model}\nquantization: {{bits: null}}\ndata: {{train: x.jsonl}}\ntrain: {{objective: dpo}}\n"
    )
    return mem.estimate_recipe(recipe)


CASES = [  # (id, bits, method, continue an adapter, dpo.reference)
    ("4bit-lora-fresh", 4, "lora", False, "start"),
    ("lora-continued", None, "lora", True, "start"),
    ("lora-continued-base-reference", None, "lora", True, "base"),
    ("full", None, "full", False, "start"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "method", "continued", "reference"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_the_reference_log_probs_do_not_move_while_the_model_trains(
    tmp_path, bits, method, continued, reference
):
    import torch

    from vlmtune.after.evaluate import answer_logps

    adapter = trained_looking_adapter(tmp_path / "sft-adapter") if continued else None
    model, loaded = loaded_model(bits, method, adapter)
    trainer = build(tmp_path, model, loaded, reference)
    batch = trainer.data_collator([{"position": i} for i in range(3)])
    reference_before, policy_before = logps(trainer, batch, True), logps(trainer, batch, False)
    scored_by_eval = answer_logps(trainer.model, dict(batch))  # what `vlmtune eval` compares pairs by
    assert torch.allclose(scored_by_eval, policy_before, atol=1e-4), "eval scores the tokens DPO scores"

    if method == "full":  # a frozen copy: a second set of weights, none of them trainable
        assert trainer.ref_model is not None and not any(
            p.requires_grad for p in trainer.ref_model.parameters()
        )
    elif continued and reference == "start":  # the continued adapter, copied frozen by TRL
        assert set(trainer.model.peft_config) == {"default", "ref"}
        frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
        assert frozen and not any(
            p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n
        )
        assert not torch.allclose(reference_before, base_logps(trainer, batch)), (
            "the reference is not the base"
        )
        measured = sum(
            p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if ".ref." in n
        )
        assert measured == tiny_estimate(continued=True).terms["reference"], "estimate-memory counts the copy"
    else:  # a fresh adapter, or reference: base: the adapter disabled, no copy kept
        assert set(trainer.model.peft_config) == {"default"} and trainer.ref_model is None
        assert torch.equal(reference_before, base_logps(trainer, batch))
    if reference == "start":
        assert torch.allclose(reference_before, policy_before), "training starts at its reference (loss ln 2)"

    trainer.train()
    first_loss = trainer.state.log_history[0]["loss"]
    if reference == "start":
        assert first_loss == pytest.approx(math.log(2), abs=1e-4)
    else:  # the continued adapter already differs from the base it is measured against
        assert abs(first_loss - math.log(2)) > 1e-3
    policy_after = logps(trainer, batch, False)
    assert (policy_after - policy_before).abs().max() > 0.05, "the model trained"
    assert torch.equal(logps(trainer, batch, True), reference_before), "the reference did not move"
    if continued and reference == "start":
        now = dict(trainer.model.named_parameters())
        assert all(torch.equal(now[n], p) for n, p in frozen.items())


# --- estimate-memory knows the objective ----------------------------------------------------------


def estimate(objective: str, **sections):
    from vlmtune import memory as mem

    raw = {"model": {"name": "Qwen/Qwen2-VL-7B-Instruct"}, "data": {"train": "unused.jsonl"},
           "train": {"objective": objective}}  # fmt: skip
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    import json

    return mem.estimate_recipe(parse_recipe(json.dumps(raw)), seq_len=512)


def test_a_pair_is_two_sequences_and_the_reference_costs_what_it_holds():
    sft, dpo = estimate("sft"), estimate("dpo")
    assert dpo.terms["activations"] == pytest.approx(2 * sft.terms["activations"], rel=1e-9)
    assert dpo.terms["reference"] == sft.terms["reference"] == 0, "LoRA: the adapter is disabled, no copy"
    assert dpo.to_json()["inputs"]["sequences_per_sample"] == 2 and "dpo: each pair" in dpo.notes[-1]
    continued = estimate("dpo", model={"adapter": "runs/sft"})
    assert continued.terms["reference"] == 2 * continued.terms["lora"], "an fp32 copy of a bf16 adapter"
    full = estimate("dpo", quantization={"bits": None}, lora={"method": "full"})
    assert full.terms["reference"] == full.terms["weights"], "full fine-tuning: a frozen second copy"
    assert (
        full.peak_bytes - estimate("sft", quantization={"bits": None}, lora={"method": "full"}).peak_bytes
        > (full.terms["weights"])
    )
