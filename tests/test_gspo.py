"""GSPO and the loss variants of TRL's GRPOTrainer (grpo.importance_sampling_level, grpo.loss_type): the
recipe refuses the combinations that are not what they say, TRL's config carries them, and the policy
ratio really is one per completion: equal to GRPO's gradient on-policy (as vlmtune updates), different
once the batch is off-policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_grpo import LOSS_INPUTS

from vlmtune.errors import RecipeError
from vlmtune.recipe import parse_recipe

from conftest import PIXEL_BUDGET, ROOT
from test_cli import vlmtune

DEMO = ROOT / "data" / "demo"


def recipe_text(**grpo) -> str:
    return (
        f"model: {{name: tiny:qwen2_vl}}\ndata: {{train: {DEMO / 'train.jsonl'}, max_image_pixels: {PIXEL_BUDGET}}}\n"
        "train: {objective: grpo, batch_size: 4, grad_accum: 1, max_length: 512}\n"
        f"grpo: {json.dumps({'rewards': [{'type': 'contains'}], **grpo})}\n"
    )


def test_the_ratio_is_per_token_unless_the_recipe_asks_for_gspo():
    assert parse_recipe(recipe_text()).grpo.importance_sampling_level == "token"
    gspo = parse_recipe(recipe_text(importance_sampling_level="sequence", loss_type="grpo")).grpo
    assert (gspo.importance_sampling_level, gspo.loss_type) == ("sequence", "grpo")
    luspo = parse_recipe(recipe_text(importance_sampling_level="sequence", loss_type="luspo")).grpo
    assert luspo.loss_type == "luspo"


MISTAKES = [  # (grpo keys, words of the refusal)
    ({"importance_sampling_level": "sequence"}, "with loss_type dapo sums one ratio per token"),
    ({"importance_sampling_level": "sequence", "loss_type": "bnpo"}, "set grpo.loss_type: grpo"),
    ({"loss_type": "luspo"}, "it needs grpo.importance_sampling_level: sequence"),
    ({"importance_sampling_level": "sequence", "loss_type": "vespo"}, "keep grpo.importance_sampling_level: token"),
    ({"importance_sampling_level": "sentence"}, "Input should be 'token' or 'sequence'"),
]  # fmt: skip


@pytest.mark.parametrize(("grpo", "message"), MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_combinations_that_are_not_what_they_say_are_refused(grpo: dict, message: str):
    with pytest.raises(RecipeError) as raised:
        parse_recipe(recipe_text(**grpo))
    assert any(message in problem for problem in raised.value.problems), raised.value.problems


def test_the_cli_refuses_gspo_with_a_token_summing_loss_before_anything_loads(tmp_path: Path):
    path = tmp_path / "gspo.yaml"
    path.write_text(recipe_text(importance_sampling_level="sequence"))
    result = vlmtune("validate", str(path))
    assert result.returncode == 2
    assert "grpo.importance_sampling_level sequence (GSPO) with loss_type dapo" in result.stderr
    assert "set grpo.loss_type: grpo" in result.stderr and "Traceback" not in result.stderr


def test_grpo_config_carries_the_ratio_level_and_the_loss(tmp_path: Path):
    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages.grpo import grpo_config

    recipe = parse_recipe(recipe_text(importance_sampling_level="sequence", loss_type="luspo"))
    config = grpo_config(
        recipe.train, recipe.grpo, recipe.data, RunDir.create(tmp_path, "r"), device="cpu", dtype="float32",
        has_eval=False, suppress=[], report_to=[],
    )  # fmt: skip
    assert (config.importance_sampling_level, config.loss_type) == ("sequence", "luspo")


@pytest.mark.slow
def test_gspo_equals_grpo_on_policy_and_departs_from_it_off_policy(tmp_path: Path):
    """The same sampled batch, scored with one ratio per token and with one per completion (loss_type grpo):
    on-policy (the old log-probs are the current ones, as in every vlmtune step) the gradients agree; with
    old log-probs from elsewhere (what TRL's num_iterations > 1 would give) they differ."""
    import torch

    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages import grpo, load, lora

    recipe = parse_recipe(
        recipe_text(num_generations=2, max_completion_length=6, beta=0.0, loss_type="grpo")
        + "quantization: {bits: null}\n"
    )
    model_section = recipe.model.model_copy(update={"dtype": "float32"})
    loaded = load.load(model_section, recipe.quantization, PIXEL_BUDGET, "cpu")
    model = lora.apply(loaded.model, recipe.lora, lora.plan(loaded.model, loaded.family, recipe.lora), seed=0)
    with torch.no_grad():  # a trained-looking adapter: gradients that reach every LoRA weight
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    trainer = grpo.build_trainer(
        model, loaded.processor, loaded.family, recipe.data.model_copy(update={"shuffle": False}), recipe.train,
        recipe.grpo, run=RunDir.create(tmp_path, "run"), device="cpu", dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(
        trainer.data_collator([{"position": p} for p in (0, 0, 1, 1)])
    )
    assert batch["completion_mask"].sum(1).min() > 1
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])  # rewards of a random model are all alike
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this test skips

    def gradient(level: str, old_logps=None) -> torch.Tensor:
        trainer.importance_sampling_level = level
        inputs = dict(batch, **({"old_per_token_logps": old_logps} if old_logps is not None else {}))
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    token, sequence = gradient("token"), gradient("sequence")
    assert token.abs().max() > 0
    assert torch.allclose(token, sequence, rtol=1e-4, atol=1e-7), "on-policy, GSPO's gradient is GRPO's"

    with torch.no_grad():  # the log-probs of another policy: the ratios are no longer 1
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        extra = {key: batch[key] for key in LOSS_INPUTS if key in batch}
        logps, *_ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].shape[1], **extra
        )
        old = logps + torch.randn_like(logps) * 0.3
    token, sequence = gradient("token", old), gradient("sequence", old)
    assert not torch.allclose(token, sequence, rtol=1e-2, atol=1e-6), "off-policy, the two ratios part"
