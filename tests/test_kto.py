"""Unpaired preference tuning (train.objective: kto): the recipe keys, TRL's config, estimate-memory, the
frozen reference, and runs through the CLI (the run folder, an exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dpo import base_logps, estimate, loaded_model, logps, trained_looking_adapter

from vlmtune.errors import RecipeError
from vlmtune.model.families import family_names, get_family
from vlmtune.recipe import DataSection, KtoSection, TrainSection, parse_recipe
from vlmtune.runs.rundir import RunDir

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune

COLOURS = ROOT / "data" / "colours"
MINIMAL = "model:\n  name: tiny:qwen2_vl\ndata:\n  train: answers.jsonl\n"

# --- the recipe ---------------------------------------------------------------------------------


def test_the_objective_gets_its_section_with_defaults_and_resolved_yaml_round_trips():
    recipe = parse_recipe(MINIMAL + "train:\n  objective: kto\n")
    assert recipe.kto == KtoSection() and recipe.objective_options() is recipe.kto
    assert (recipe.kto.beta, recipe.kto.loss_type, recipe.kto.reference) == (0.1, "kto", "start")
    assert parse_recipe(recipe.to_yaml()) == recipe
    assert parse_recipe(MINIMAL).kto is None


MISTAKES = [
    ("kto:\n  beta: 0.2\n", "a `kto:` section is given but train.objective is sft; set train.objective: kto"),
    ("train:\n  objective: kto\n  batch_size: 1\n", "train.batch_size must be 2 or more (or use kto.loss_type"),
    ("train:\n  objective: kto\nkto:\n  loss_type: sigmoid\n", "Input should be 'kto' or 'apo_zero_unpaired'"),
    ("train:\n  objective: kto\nkto:\n  desirable_weight: 0\n", "kto.desirable_weight (line 8): Input should be"),
    ("train:\n  objective: kto\nlora:\n  dropout: 0.1\n", "lora.dropout applies to sft only, and train.objective is kto"),
    ("train:\n  objective: kto\n  packing: true\n", "train.packing applies to sft only"),
    ("model:\n  name: tiny:qwen2_vl\n  adapter: runs/sft\nquantization:\n  bits: null\nlora:\n  method: full\n"
     "train:\n  objective: kto\nkto:\n  reference: base\n", "kto.reference base with lora.method full and model.adapter"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_recipe_mistakes_are_errors_with_a_hint(extra: str, message: str):
    text = MINIMAL + extra if not extra.startswith("model:") else extra + "data:\n  train: answers.jsonl\n"
    with pytest.raises(RecipeError) as raised:
        parse_recipe(text)
    assert any(message in problem for problem in raised.value.problems), raised.value.problems


def test_a_batch_of_one_is_accepted_where_no_kl_baseline_is_estimated():
    recipe = parse_recipe(
        MINIMAL + "train:\n  objective: kto\n  batch_size: 1\nkto:\n  loss_type: apo_zero_unpaired\n"
    )
    assert recipe.kto.loss_type == "apo_zero_unpaired"


def test_kto_config_carries_the_knobs_and_the_run_s_own_sampling(tmp_path: Path):
    from vlmtune.stages.kto import kto_config

    run = RunDir.create(tmp_path, "r")
    options = KtoSection(
        beta=0.3, desirable_weight=1.33, undesirable_weight=0.5, loss_type="apo_zero_unpaired"
    )
    config = kto_config(
        TrainSection(objective="kto", group_by_length=True), options, run, "cpu", "float32", False
    )
    assert (config.beta, config.loss_type, config.desirable_weight, config.undesirable_weight) == (
        0.3, "apo_zero_unpaired", 1.33, 0.5,
    )  # fmt: skip
    assert config.max_length is None and config.learning_rate == TrainSection().lr
    assert config.train_sampling_strategy == "sequential"  # what KTOTrainer checks; the trainer puts back ...
    assert config.vlmtune_sampling == "group_by_length"  # ... the run's own, seeded per epoch


# --- estimate-memory knows the objective ----------------------------------------------------------


def test_a_kto_sample_is_one_sequence_and_the_reference_costs_what_it_holds():
    sft, kto = estimate("sft"), estimate("kto")
    assert kto.terms["activations"] == sft.terms["activations"], "one sequence with gradients per sample"
    assert kto.terms["reference"] == 0, "LoRA: the adapter is disabled, no copy"
    assert kto.to_json()["inputs"]["sequences_per_sample"] == 1 and "kto: each sample" in kto.notes[-1]
    continued = estimate("kto", model={"adapter": "runs/sft"})
    assert continued.terms["reference"] == 2 * continued.terms["lora"], "an fp32 copy of a bf16 adapter"
    full = estimate("kto", quantization={"bits": None}, lora={"method": "full"})
    assert full.terms["reference"] == full.terms["weights"], "full fine-tuning: a frozen second copy"
    assert "the reference is a frozen copy of the weights" in full.notes[-1]


# --- the reference ------------------------------------------------------------------------------------

CASES = [  # (id, bits, method, continue an adapter, kto.reference)
    ("4bit-lora-fresh", 4, "lora", False, "start"),
    ("lora-continued", None, "lora", True, "start"),
    ("full", None, "full", False, "start"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "method", "continued", "reference"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_training_starts_at_its_reference_which_does_not_move(tmp_path, bits, method, continued, reference):
    """Step 1's loss is exactly 0.5 (every log-ratio 0: 1 - sigmoid(0)); the reference's log-probs of the
    answers stay bit for bit while the policy's move."""
    import torch

    from vlmtune.stages import kto

    adapter = trained_looking_adapter(tmp_path / "sft-adapter") if continued else None
    model, loaded = loaded_model(bits, method, adapter)
    data = DataSection(train=str(COLOURS / "unpaired.jsonl"), max_samples=12, max_image_pixels=PIXEL_BUDGET)
    train = TrainSection(objective="kto", max_steps=3, batch_size=4, grad_accum=1, lr=5e-3, max_length=256,
                         gradient_checkpointing=False, save_steps=1000)  # fmt: skip
    trainer = kto.build_trainer(
        model, loaded.processor, loaded.family, data, train, KtoSection(reference=reference),
        run=RunDir.create(tmp_path, "r"), device="cpu", dtype="float32",
    )  # fmt: skip
    assert trainer.args.train_sampling_strategy == "group_by_length", "the run's order, not TRL's sequential"
    batch = trainer.data_collator([{"position": i} for i in range(4)])
    scored = {k: v for k, v in batch.items() if not k.startswith("KL_") and k != "label"}
    reference_before, policy_before = reference_logps(trainer, scored), logps(trainer, scored, False)
    if method == "full":
        assert trainer.ref_model is not None and not any(
            p.requires_grad for p in trainer.ref_model.parameters()
        )
    elif continued:  # the continued adapter, copied frozen by TRL: not the base
        assert set(trainer.model.peft_config) == {"default", "ref"}
        assert not torch.allclose(reference_before, base_logps(trainer, scored))
    else:
        assert set(trainer.model.peft_config) == {"default"} and trainer.ref_model is None
    assert torch.allclose(reference_before, policy_before, atol=1e-5), "the policy starts as its reference"

    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert (logps(trainer, scored, False) - policy_before).abs().max() > 0.05, "the model trained"
    assert torch.equal(reference_logps(trainer, scored), reference_before), "the reference did not move"


def reference_logps(trainer, batch):
    """Summed answer log-probs by the reference as KTOTrainer reaches it: its frozen copy (full), the
    frozen "ref" adapter (a continued adapter), or the adapter disabled."""
    import contextlib

    import torch
    from trl.trainer.utils import use_adapter

    model, using = trainer.ref_model, contextlib.nullcontext()
    if model is None:
        model = trainer.model
        using = use_adapter(model, "ref" if "ref" in model.peft_config else None)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad(), using:
        return model(**inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)


# --- runs -----------------------------------------------------------------------------------------------


TRAIN = {"objective": "kto", "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant",
         "max_length": 256, "gradient_checkpointing": False, "max_steps": 3, "save_steps": 2, "eval_steps": 3,
         "logging_steps": 1}  # fmt: skip


def kto_recipe(folder: Path) -> Path:
    folder.mkdir()
    data = {"train": str(COLOURS / "unpaired.jsonl"), "eval": str(COLOURS / "eval_unpaired.jsonl"),
            "max_samples": 24, "max_image_pixels": PIXEL_BUDGET}  # fmt: skip
    return write_recipe(folder, model={"name": "tiny:qwen2_vl", "dtype": "float32"}, quantization={"bits": 4},
                        data=data, train=TRAIN, output={"dir": str(folder / "runs")})  # fmt: skip


@pytest.mark.slow
def test_a_kto_run_through_the_cli_writes_its_folder_and_resumes_exactly(tmp_path: Path):
    from transformers import TrainerCallback

    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe

    recipe = kto_recipe(tmp_path / "whole")
    result = vlmtune("train", str(recipe), "--run-dir", str(tmp_path / "whole" / "run"),
                     env_extra={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    whole = RunDir(tmp_path / "whole" / "run")
    report = json.loads((whole / "3-train" / "data_report.json").read_text())
    assert (report["train"]["desirable"], report["train"]["undesirable"]) == (48, 48)  # every row, counted
    assert (report["eval"]["desirable"], report["eval"]["undesirable"]) == (16, 16)
    rows = whole.read_jsonl("3-train/metrics.jsonl")
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3]
    assert train_rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and train_rows[0]["reward_margin"] == 0.0
    assert {"kl", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"} <= set(train_rows[0])
    assert [row["step"] for row in rows if "eval_loss" in row] == [0, 3]
    assert (Path(whole.summary()["output"]) / "adapter_model.safetensors").is_file()

    class CtrlCAtStep3(TrainerCallback):  # the same run, stopped after its checkpoint at step 2
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    recipe = kto_recipe(tmp_path / "cut")
    with pytest.raises(pipeline.Stopped):
        pipeline.run(load_recipe(recipe), recipe.read_text(), "cut", tmp_path / "cut" / "run",
                     callbacks=[CtrlCAtStep3()])  # fmt: skip
    cut = RunDir(tmp_path / "cut" / "run")
    pipeline.resume(cut.path)
    resumed = [row for row in cut.read_jsonl("3-train/metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in resumed] == [1, 2, 3], "the resumed run continues at step 3"
    for key in ("loss", "reward_chosen", "reward_rejected", "kl"):
        assert resumed[-1][key] == pytest.approx(train_rows[-1][key], abs=1e-4), key


# --- every family ---------------------------------------------------------------------------------------

KTO_FAMILIES = [name for name in family_names() if get_family(name).refusal("kto") is None]


@pytest.mark.slow
@pytest.mark.parametrize("name", KTO_FAMILIES)
def test_every_family_scores_its_answers_and_kl_sequences(name: str, tmp_path: Path):
    """One KTO batch of each family (16-bit, fresh LoRA): the policy is its reference (loss exactly 0.5),
    the KL sequences run with their own token-level inputs, and the gradient reaches the adapter."""
    import torch

    from vlmtune.recipe import LoraSection, ModelSection, QuantizationSection
    from vlmtune.stages import kto, load, lora

    loaded = load.load(ModelSection(name=f"tiny:{name}", dtype="float32"), QuantizationSection(bits=None),
                       PIXEL_BUDGET, "cpu")  # fmt: skip
    section = LoraSection()
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section), seed=0)
    data = DataSection(train=str(COLOURS / "unpaired.jsonl"), max_samples=4, shuffle=False,
                       max_image_pixels=PIXEL_BUDGET)  # fmt: skip
    train = TrainSection(objective="kto", max_steps=1, batch_size=4, grad_accum=1, max_length=2048,
                         gradient_checkpointing=False)  # fmt: skip
    trainer = kto.build_trainer(
        model, loaded.processor, loaded.family, data, train, KtoSection(),
        run=RunDir.create(tmp_path, "r"), device="cpu", dtype="float32",
    )  # fmt: skip
    batch = trainer.data_collator([{"position": i} for i in range(4)])
    assert batch["KL_input_ids"].shape[0] == 4 and batch["label"].tolist() == [True, False, True, False]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    # every reward is 0 at the start; MoE families add their router's load-balancing loss (TRL)
    aux = (
        trainer.router_aux_loss_coef * trainer._metrics["train"]["aux_loss"][-1]
        if trainer.aux_loss_enabled
        else 0
    )
    assert loss.item() == pytest.approx(0.5 + aux, abs=1e-5)
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(torch.count_nonzero(g) for g in grads)
