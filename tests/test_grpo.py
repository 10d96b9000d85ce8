"""Online RL (train.objective: grpo): prompts from the SFT layouts, families GRPO can score exactly,
a run's folder and metrics, and the refusals (code without opt-in, a reward that misbehaves)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vlmtune.errors import DataError, ModelError
from vlmtune.model.families import family_names, get_family
from vlmtune.recipe import parse_recipe

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune

DEMO = ROOT / "data" / "demo"
REFUSED = {  # family -> why TRL's GRPOTrainer cannot score its rollouts
    "llava_onevision": "batch_num_images",
    "mllama": "cross_attention_mask",
    "paligemma": "prefix-LM",
    "minicpmv4_6": "target_sizes",
}
# ...and the records that refuse grpo themselves (Family.refused_objectives, checked by tests/test_families.py)
SUPPORTED = [name for name in family_names() if name not in REFUSED and not get_family(name).refusal("grpo")]
# What GRPOTrainer's loss hands the model besides ids and mask (TRL 1.16 _compute_loss).
LOSS_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip


def grpo_recipe(**grpo) -> str:
    return (
        f"model: {{name: tiny:qwen2_vl}}\ndata: {{train: {DEMO / 'train.jsonl'}, max_image_pixels: {PIXEL_BUDGET}}}\n"
        "train: {objective: grpo, batch_size: 4, grad_accum: 1, max_length: 512}\n"
        f"grpo: {json.dumps({'rewards': [{'type': 'contains'}], **grpo})}\n"
    )


# --- families -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_families_whose_rollouts_grpo_cannot_score_are_refused(name: str):
    from vlmtune.stages.grpo import check_family

    with pytest.raises(ModelError, match=REFUSED[name]) as info:
        check_family(get_family(name))
    assert "train.objective: sft" in info.value.hint


@pytest.mark.slow
@pytest.mark.parametrize("name", SUPPORTED)
def test_grpo_trains_on_the_log_probabilities_the_model_gives_each_prompt_alone(name: str, tmp_path: Path):
    """A batch mixes prompts of different lengths: one image; two images and an earlier turn; no image.
    The per-token log-probabilities TRL's loss uses must equal those of the model answering each prompt
    alone, tokenized as vlmtune tokenizes it: padding, the template's BOS, image-token markers
    (M-RoPE types, Gemma 3's token types) and image features all line up. No vision token is sampled."""
    import torch

    from vlmtune.data import open_image
    from vlmtune.data.collator import template_special_tokens, vision_token_ids
    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages import grpo, load, lora

    recipe = parse_recipe(
        grpo_recipe(num_generations=2, max_completion_length=6, beta=0.0).replace("qwen2_vl", name)
        + "quantization: {bits: null}\n"
    )
    model_section = recipe.model.model_copy(update={"dtype": "float32"})  # exact arithmetic
    loaded = load.load(model_section, recipe.quantization, PIXEL_BUDGET, "cpu")
    model = lora.apply(loaded.model, recipe.lora, lora.plan(loaded.model, loaded.family, recipe.lora), seed=0)
    data = recipe.data.model_copy(update={"train": str(mixed_prompts(tmp_path)), "shuffle": False})
    trainer = grpo.build_trainer(
        model, loaded.processor, loaded.family, data, recipe.train, recipe.grpo,
        run=RunDir.create(tmp_path, "run"), device="cpu", dtype="float32",
    )  # fmt: skip
    rows = trainer.data_collator([{"position": p} for p in (0, 2, 1, 2)])
    out = trainer._generate_and_score_completions(rows)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    extra = {key: out[key] for key in LOSS_INPUTS if key in out}
    with torch.no_grad():
        trained_on, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, out["completion_ids"].shape[1], **extra
        )
    vision = set(vision_token_ids(loaded.processor.tokenizer, loaded.family))
    processor = loaded.processor  # the run's own processor: right padding, as training SFT uses it
    checked = 0
    for i, row in enumerate(rows):
        completion = out["completion_ids"][i][out["completion_mask"][i].bool()]
        assert not vision & set(completion.tolist()), "a vision token was sampled"
        if not len(completion):
            continue
        prompt = trainer.data_collator.prompts[row["position"]]
        text = processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        images = [[open_image(s) for s in prompt.images]] if prompt.images else None
        alone = processor(
            text=[text],
            images=images,
            return_tensors="pt",
            **template_special_tokens(processor.tokenizer, [text]),
        )
        inputs = {k: v for k, v in alone.items() if k != "attention_mask"}
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(completion)[None]], 1)
        inputs["input_ids"] = torch.cat([alone["input_ids"][0], completion])[None]
        with torch.no_grad():
            logits = trainer.model(**inputs).logits[0, -len(completion) - 1 : -1].float()
        expected = logits.log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
        assert trained_on[i, : len(completion)] == pytest.approx(expected, abs=1e-4)
        checked += 1
    assert checked >= 3 and out["prompt_mask"][0].sum() < out["prompt_mask"][2].sum()  # lengths differed


def mixed_prompts(folder: Path) -> Path:
    """Demo sample 0 (one image), demo sample 4 (two images, two turns) and a text-only prompt."""
    demo = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    for row in (demo[0], demo[4]):
        for part in (p for m in row["messages"] for p in m["content"] if p["type"] == "image"):
            part["image"] = str(DEMO / part["image"])
    text_only = {
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    }
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (demo[0], demo[4], text_only)))
    return path


# --- prompts ------------------------------------------------------------------------------------------


def processor_of(name: str = "qwen2_vl"):
    from vlmtune.model.checkpoint import detect
    from vlmtune.model.processing import load_processor

    path, family = detect(f"tiny:{name}", None)
    return load_processor(path, family, PIXEL_BUDGET)


def test_prompts_are_the_conversation_before_the_last_answer(tmp_path: Path):
    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages.grpo import prepare_prompts
    from vlmtune.training import rewards

    recipe = parse_recipe(grpo_recipe() + "\n", base_dir=ROOT)
    data = recipe.data.model_copy(update={"shuffle": False})
    run = RunDir.create(tmp_path, "run")
    scorers = rewards.build(recipe.grpo.rewards)
    train, held_out = prepare_prompts(processor_of(), data, recipe.train, recipe.grpo, scorers, run)
    assert len(train.items) == len(train.lengths) == 48 and held_out.items == []
    two_turns = train.items[4]
    assert [m["role"] for m in two_turns.messages] == ["user", "assistant", "user"]
    assert len(two_turns.images) == 2 and two_turns.reference == "The green one."
    assert two_turns.text.endswith("user: Which one is first?")
    report = run.read_json("3-train/data_report.json")["train"]
    assert report["samples_kept"] == 48
    # the prompt's tokens plus the longest completion: what train.max_length must hold
    assert report["tokens"]["min"] > recipe.grpo.max_completion_length


def write_prompts(folder: Path, answered: bool) -> Path:
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 20, 20)).save(folder / "red.png")
    question = {
        "role": "user",
        "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Colour?"}],
    }
    rows = [{"messages": [question, *([{"role": "assistant", "content": "red"}] if answered and i else [])]}
            for i in range(4)]  # fmt: skip
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompts_without_an_answer_train_on_rewards_that_need_none(tmp_path: Path):
    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages.grpo import prepare_prompts
    from vlmtune.training import rewards

    path = write_prompts(tmp_path, answered=False)
    recipe = parse_recipe(grpo_recipe(rewards=[{"type": "regex", "pattern": "[a-z]+"}]).replace(
        str(DEMO / "train.jsonl"), str(path)))  # fmt: skip
    run = RunDir.create(tmp_path, "run")
    train, _ = prepare_prompts(
        processor_of(), recipe.data, recipe.train, recipe.grpo, rewards.build(recipe.grpo.rewards), run
    )
    assert [p.reference for p in train.items] == [None] * 4 and all(len(p.images) == 1 for p in train.items)


def test_data_check_reads_a_grpo_recipe_as_training_does(tmp_path: Path):
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(write_prompts(tmp_path, answered=False)), "max_image_pixels": PIXEL_BUDGET},
        train={"objective": "grpo", "batch_size": 4, "grad_accum": 1, "max_length": 256},
        grpo={"max_completion_length": 100, "rewards": [{"type": "regex", "pattern": "[a-z]+"}]},
    )
    result = vlmtune("data", "check", str(recipe), "--json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    train = json.loads(result.stdout)["train"]
    assert train["samples_kept"] == 4 and not train["skipped_invalid"]  # no answer is needed for a prompt
    assert train["tokens"]["min"] > 100  # the prompt and the longest completion


@pytest.mark.parametrize(
    ("reward", "lacking"),
    [("exact_match", "a reference answer (a last assistant turn), and 1 sample(s) have none: 0"),
     ("number", "a reference answer with a number in it, and 4 sample(s) have none: 0, 1, 2, 3")],
)  # fmt: skip
def test_a_reward_that_needs_an_answer_names_the_samples_without_one(
    tmp_path: Path, reward: str, lacking: str
):
    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages.grpo import prepare_prompts
    from vlmtune.training import rewards

    path = write_prompts(tmp_path, answered=True)  # sample 0 has no answer; the others answer "red"
    recipe = parse_recipe(
        grpo_recipe(rewards=[{"type": reward}]).replace(str(DEMO / "train.jsonl"), str(path))
    )
    with pytest.raises(DataError) as info:
        prepare_prompts(
            processor_of(), recipe.data, recipe.train, recipe.grpo, rewards.build(recipe.grpo.rewards),
            RunDir.create(tmp_path, "run"),
        )  # fmt: skip
    assert f"reward `{reward}` (built-in {reward}) needs {lacking}" in str(info.value)


# --- metrics ------------------------------------------------------------------------------------------


def test_trl_log_keys_become_stable_metrics_names(tmp_path: Path):
    from types import SimpleNamespace

    from vlmtune.runs.rundir import RunDir
    from vlmtune.training.callbacks import MetricsWriter

    run = RunDir.create(tmp_path, "run")
    writer = MetricsWriter(run)
    state = SimpleNamespace(global_step=3)
    writer.on_log(None, state, None, logs={
        "loss": 0.1, "reward": 0.5, "reward_std": 0.2, "reward_group_std": 0.1, "frac_reward_zero_std": 0.25,
        "rewards/exact_match/mean": 0.5, "rewards/exact_match/std": 0.5, "kl": 0.01, "entropy": 1.2,
        "completions/mean_length": 4.0, "completions/clipped_ratio": 0.1, "clip_ratio/region_mean": 0.0,
        "completions/min_terminated_length": 2.0,
    })  # fmt: skip
    writer.on_log(None, state, None, logs={"eval_loss": 0.0, "eval_reward": 0.4, "eval_rewards/format/mean": 1.0,
                                           "eval_runtime": 2.0, "eval_completions/min_length": 1.0})  # fmt: skip
    train_row, eval_row = run.read_jsonl("3-train/metrics.jsonl")
    assert train_row == {
        "step": 3, "loss": 0.1, "reward": 0.5, "reward_std": 0.2, "reward_group_std": 0.1,
        "groups_zero_spread": 0.25, "reward_exact_match": 0.5, "kl": 0.01, "entropy": 1.2,
        "completion_length": 4.0, "completions_clipped": 0.1, "clip_ratio": 0.0,
    }  # fmt: skip
    assert eval_row == {
        "step": 3,
        "eval_loss": 0.0,
        "eval_reward": 0.4,
        "eval_reward_format": 1.0,
        "eval_runtime": 2.0,
    }


# --- memory -------------------------------------------------------------------------------------------


def test_estimate_memory_counts_the_sampled_sequences():
    from vlmtune.memory import estimate_recipe
    from vlmtune.memory.objectives import kv_elems_per_token

    text = (
        "model: {name: Qwen/Qwen2.5-VL-7B-Instruct}\ndata: {train: x.jsonl}\n"
        "train: {objective: grpo, batch_size: 8, grad_accum: 2, max_length: 2048}\n"
        "grpo: {num_generations: 8, max_completion_length: 512, rewards: [{type: exact_match}]}\n"
    )
    grpo = estimate_recipe(parse_recipe(text))
    sft = estimate_recipe(parse_recipe(text.replace("objective: grpo", "objective: sft").split("grpo:")[0]))
    assert "generation" not in sft.terms and grpo.terms["reference"] == 0  # a fresh adapter, disabled
    # Qwen2.5-VL-7B: 28 layers x (512 keys + 512 values) per token, 16 sequences of 2048 tokens, bf16
    assert kv_elems_per_token(describe(grpo)) == 28 * 1024
    cache = 16 * 2048 * 28 * 1024 * 2
    assert cache < grpo.terms["generation"] < cache * 1.05
    # TRL's log-prob tiles over the completions: 8 x 512 tokens, 32768 vocabulary columns, fp32
    assert grpo.terms["logits"] == (4096 + 3584) * 32768 * 4
    others = {name: value for name, value in grpo.terms.items() if name not in ("generation", "logits")}
    assert others == {name: value for name, value in sft.terms.items() if name != "logits"}
    assert grpo.to_json()["inputs"]["generations"] == 16
    full = estimate_recipe(
        parse_recipe(text.replace("data:", "quantization: {bits: null}\nlora: {method: full}\ndata:"))
    )
    assert full.terms["reference"] == full.terms["weights"]  # beta > 0: a frozen copy to measure KL against
    no_kl = estimate_recipe(
        parse_recipe(text.replace("data:", "quantization: {bits: null}\nlora: {method: full}\ndata:")
                     .replace("num_generations: 8", "num_generations: 8, beta: 0"))
    )  # fmt: skip
    assert no_kl.terms["reference"] == 0


def describe(estimate):
    from vlmtune.memory import describe_model, resolve_config

    return describe_model(resolve_config(estimate.model, None).config)


# --- the command line ---------------------------------------------------------------------------------


def code_recipe(
    folder: Path, allow_code: bool, function: str = "my_rewards:score", model: str = "missing-model"
):
    marker = folder / "imported"
    (folder / "my_rewards.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef score(completions, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    return marker, write_recipe(
        folder,
        model={"name": model},
        data={"train": str(DEMO / "train.jsonl")},
        train={"objective": "grpo", "batch_size": 4, "grad_accum": 1},
        grpo={"allow_code": allow_code, "rewards": [{"type": "function", "function": function}]},
        output={"dir": str(folder / "runs")},
    )


def test_a_code_reward_without_opt_in_is_refused_before_anything_loads(tmp_path: Path):
    marker, recipe = code_recipe(tmp_path, allow_code=False)
    result = vlmtune("train", str(recipe))
    assert result.returncode == 2
    assert "grpo.allow_code is false" in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()  # no code ran, no run folder, no model


def test_a_code_reward_that_cannot_import_is_refused_before_the_model_loads(tmp_path: Path):
    marker, recipe = code_recipe(tmp_path, allow_code=True, function="my_rewardz:score")
    result = vlmtune("train", str(recipe))
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "cannot import my_rewardz" in output, output[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["load"]["status"] == "failed"
    assert not (run / "1-load" / "memory_estimate.json").exists()  # nothing after the refusal ran


# --- a run ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory) -> Path:
    """Three GRPO steps on the 4-bit tiny model: 4 completions per prompt, two micro-batches per step,
    three rewards (one a penalty), the held-out reward before training and every two steps. A random
    model earns rewards only by chance: the regex on the first letter splits its groups (a signal)."""
    folder = tmp_path_factory.mktemp("grpo")
    recipe = write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl"), "max_image_pixels": PIXEL_BUDGET},
        train={"objective": "grpo", "max_steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-3,
               "max_length": 256, "eval_steps": 2, "save_steps": 2},
        grpo={"num_generations": 4, "max_completion_length": 6, "completions_to_log": 6, "rewards": [
            {"type": "contains"}, {"type": "regex", "pattern": "[a-m].*", "name": "a_to_m", "weight": 0.5},
            {"type": "length", "max_tokens": 3, "weight": 0.25}]},
    )  # fmt: skip
    result = vlmtune("train", str(recipe), "--run-dir", str(folder / "run"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "reward" in result.stdout
    return folder / "run"


@pytest.mark.slow
def test_grpo_run_logs_each_reward_its_spread_kl_and_length(grpo_run: Path):
    rows = [json.loads(line) for line in (grpo_run / "3-train/metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    held_out = [row for row in rows if "eval_reward" in row]
    assert [row["step"] for row in train] == [1, 2, 3]
    assert [row["step"] for row in held_out] == [
        0,
        2,
        3,
    ]  # a baseline before the first step, every 2, the end
    for row in train:
        for key in ("reward", "reward_contains", "reward_a_to_m", "reward_length", "reward_std",
                    "reward_group_std", "groups_zero_spread", "kl", "entropy", "completion_length",
                    "completions_clipped", "learning_rate", "grad_norm"):  # fmt: skip
            assert isinstance(row[key], float | int), key
        assert row["reward"] == pytest.approx(
            row["reward_contains"] + 0.5 * row["reward_a_to_m"] + 0.25 * row["reward_length"], abs=1e-5
        )
        assert 0 < row["completion_length"] <= 6 and -1 <= row["reward_length"] <= 0
    assert any(row["reward_group_std"] > 0 and row["grad_norm"] > 0 for row in train)  # a signal, learnt from
    assert train[0]["kl"] == 0.0 and any(row["kl"] > 0 for row in train[1:])  # the policy moved off its start
    summary = json.loads((grpo_run / "summary.json").read_text())["stages"]["train"]
    assert summary["first_reward"] == train[0]["reward"] and summary["last_reward"] == train[-1]["reward"]


@pytest.mark.slow
def test_grpo_run_writes_completions_with_their_rewards(grpo_run: Path):
    rows = [json.loads(line) for line in (grpo_run / "3-train/completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] * 6 + [2] * 6 + [3] * 6
    first = rows[0]
    assert set(first) == {
        "step",
        "sample",
        "prompt",
        "reference",
        "completion",
        "reward",
        "rewards",
        "advantage",
    }
    samples = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    sample = samples[first["sample"]]["messages"]
    assert first["reference"] == sample[-1]["content"][0]["text"]
    assert first["prompt"].startswith("user: <image>")
    for row in rows:
        assert set(row["rewards"]) == {"contains", "a_to_m", "length"}
        expected = (
            row["rewards"]["contains"] + 0.5 * row["rewards"]["a_to_m"] + 0.25 * row["rewards"]["length"]
        )
        assert row["reward"] == pytest.approx(expected, abs=1e-5)
    # a step's first 6 completions: a whole group of 4 for one prompt, then the next prompt's group
    assert len({row["sample"] for row in rows[:4]}) == 1


@pytest.mark.slow
def test_grpo_run_saves_the_trained_adapter_alone(grpo_run: Path):
    from vlmtune.runs.rundir import RunDir

    adapter = grpo_run / "3-train/adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert [p.name for p in RunDir(grpo_run).checkpoints()] == ["checkpoint-2", "checkpoint-3"]
    saved = json.loads((adapter / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == "right"  # GRPO's left padding stayed on its own copy
    report = json.loads((grpo_run / "3-train/data_report.json").read_text())
    assert set(report) == {"train", "eval"} and report["eval"]["samples_kept"] == 12


@pytest.mark.slow
def test_a_reward_that_raises_stops_the_run_naming_the_function_and_the_sample(tmp_path: Path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def picky(completions, samples, **kwargs):
            if 3 in samples:
                raise ValueError("cannot score this one")
            return [0.0] * len(completions)
    """))  # fmt: skip
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(DEMO / "train.jsonl"), "max_image_pixels": PIXEL_BUDGET, "max_samples": 4,
              "shuffle": False},
        train={"objective": "grpo", "max_steps": 2, "batch_size": 8, "grad_accum": 1, "max_length": 256},
        grpo={"num_generations": 2, "max_completion_length": 2, "allow_code": True,
              "rewards": [{"type": "function", "function": "my_rewards:picky"}]},
    )  # fmt: skip
    result = vlmtune("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "reward `picky`" in output and "my_rewards.py:picky" in output
    assert "ValueError: cannot score this one on sample 3" in output and "Traceback" not in output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["train"]["status"] == "failed"


def test_the_colour_set_is_what_its_script_writes(tmp_path: Path):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    committed = ROOT / "data" / "colours"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_colour_data.py"), str(tmp_path)], check=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (committed / name).read_text()
    images = sorted(p.name for p in (committed / "images").iterdir())
    assert len(images) == 64 and images == sorted(p.name for p in (tmp_path / "images").iterdir())
    for name in images:  # pixels, not bytes: PNG compression may differ between Pillow releases
        assert (
            np.asarray(Image.open(committed / "images" / name))
            == np.asarray(Image.open(tmp_path / "images" / name))
        ).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "said"),
    [("return [None] * len(completions)", "no reward applied to any of the 16 completions scored"),
     ("import sys; sys.exit(0)", "called sys.exit(0) on sample 0"),
     ("import os; os._exit(0)", "called os._exit(0) on sample 0")],
    ids=["never-applies", "sys.exit", "os._exit"],
)  # fmt: skip
def test_a_reward_that_never_applies_or_exits_fails_the_run(tmp_path: Path, body: str, said: str):
    """Before: a reward returning None everywhere trained nothing and ended `done`; one calling
    sys.exit(0) or os._exit(0) ended the process with exit 0."""
    (tmp_path / "my_rewards.py").write_text(f"def odd(completions, **kwargs):\n    {body}\n")
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(DEMO / "train.jsonl"), "max_image_pixels": PIXEL_BUDGET, "max_samples": 4,
              "shuffle": False},
        train={"objective": "grpo", "max_steps": 2, "batch_size": 8, "grad_accum": 1, "max_length": 256},
        grpo={"num_generations": 2, "max_completion_length": 2, "allow_code": True,
              "rewards": [{"type": "function", "function": "my_rewards:odd"}]},
    )  # fmt: skip
    result = vlmtune("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    output = " ".join((result.stdout + result.stderr).split())  # the console wraps long lines
    assert result.returncode == 2, output[-3000:]
    assert "`odd` (" in output and "my_rewards.py:odd)" in output and said in output, output[-3000:]
    assert "Traceback" not in output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["train"]["status"] == "failed"
