"""GRPO learns: the example of docs/rl.md, run as written. A tiny model is warm-started by a short SFT
run on the colour-naming set (data/colours), then trained with GRPO and the built-in exact_match
reward; its mean reward on held-out prompts rises clearly.

A short SFT run teaches the answer words but not yet the colours reliably, so sampled answers are
often a wrong colour: what a reward can sharpen. The reward is measured on the held-out images by
sampling as GRPO samples (temperature 1), before (the 4-bit base with the SFT adapter, where GRPO
starts) and after (with the adapter GRPO saved), from the saved weights, not read off the training
curve; the run's own held-out eval_reward must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from test_cli import vlmtune

pytestmark = pytest.mark.slow

RECIPES = ROOT / "recipes" / "grpo"
SAMPLES_PER_PROMPT = 8


def run(*args: str) -> None:
    result = vlmtune(*args, env_extra={"OMP_NUM_THREADS": "1"})  # 1 thread: steadier on busy cores
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def held_out_reward(inference, prompts, seed: int = 0) -> float:
    """Mean exact-match reward of completions sampled as GRPO samples them (temperature 1, no top-k)."""
    import torch

    from vlmtune.after.evaluate import exact_match
    from vlmtune.data import open_image
    from vlmtune.stages.grpo import suppressed_tokens

    model, processor = inference.model, inference.processor
    torch.manual_seed(seed)
    suppress = suppressed_tokens(model, processor, inference.family)
    hits = []
    for prompt in prompts:
        text = processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[[open_image(s) for s in prompt.images]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=SAMPLES_PER_PROMPT, suppress_tokens=suppress,
            )  # fmt: skip
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += [exact_match(answer, prompt.reference) for answer in answers]
    return sum(hits) / len(hits)


def test_grpo_raises_the_held_out_reward_of_an_sft_warm_start(tmp_path: Path):
    from peft import PeftModel

    from vlmtune.after.trained import load_for_inference, open_trained_run
    from vlmtune.data.preflight import read_split
    from vlmtune.data.prompts import prompt_of
    from vlmtune.recipe import load_recipe

    runs = f"output.dir={tmp_path}"
    run("train", str(RECIPES / "colours_sft.yaml"), "--set", runs, "--run-dir", str(tmp_path / "sft"))
    grpo = RECIPES / "colours_grpo.yaml"
    sft_run = f"model.adapter={tmp_path / 'sft'}"  # the recipe's model.adapter, pointed at this test's run
    run("train", str(grpo), "--set", sft_run, "--set", runs, "--run-dir", str(tmp_path / "grpo"))

    trained = open_trained_run(tmp_path / "grpo")
    data = load_recipe(grpo).data
    prompts = [prompt_of(sample) for sample in read_split(data.eval, data).samples]
    start = load_for_inference(trained, base_only=True)  # the 4-bit base GRPO trained on ...
    start.model = PeftModel.from_pretrained(start.model, str(open_trained_run(tmp_path / "sft").weights))
    before = held_out_reward(start, prompts)  # ... with the SFT adapter: where GRPO started
    after = held_out_reward(load_for_inference(trained), prompts)
    rows = [
        json.loads(line)
        for line in (tmp_path / "grpo" / "3-train" / "metrics.jsonl").read_text().splitlines()
    ]
    curve = [(row["step"], round(row["eval_reward"], 3)) for row in rows if "eval_reward" in row]
    print(f"\nheld-out mean exact-match reward, {len(prompts)} prompts x {SAMPLES_PER_PROMPT} samples: "
          f"{before:.3f} -> {after:.3f}; the run's eval_reward by step: {curve}")  # fmt: skip
    assert 0.1 < before < 0.7  # the warm start knows the words, not yet the colours: room to learn
    assert after >= before + 0.15 and after >= 0.55
    assert curve[0][0] == 0 and curve[-1][1] >= curve[0][1] + 0.15  # the run measured the same rise
    # The KL reference is the SFT model GRPO started from (a frozen copy of its adapter), not the base:
    # at the first step the policy is that model exactly. The saved adapter is the trained one alone.
    assert next(row["kl"] for row in rows if "kl" in row) == 0.0
    assert not (trained.weights / "ref").exists()
