"""GRPO learns: a tiny model warm-started by a short SFT run on a synthetic image task, then GRPO
with the built-in exact_match reward; its mean reward on held-out prompts rises clearly.

The task: name the colour of a shape (4 colours, 2 shapes, 3 image sizes, jittered). A short SFT
run teaches the answer vocabulary but not yet the colours reliably, so sampled answers are often
a wrong colour: exactly what a reward can sharpen. The reward is measured on held-out images by
sampling as GRPO samples (temperature 1), before (the SFT model) and after (plus the GRPO adapter),
never read off the training curve.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import PIXEL_BUDGET, write_recipe
from test_cli import vlmtune

pytestmark = pytest.mark.slow

QUESTION = "What colour is the shape? Answer with one word."
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SAMPLES_PER_PROMPT = 8


def write_task(folder: Path, name: str, count: int, seed: int) -> str:
    """``count`` samples, colours and shapes in turn; sizes and positions drawn with ``seed``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % 4], ("square", "circle")[i // 4 % 2]
        width, height = rng.choice([(56, 56), (84, 56), (56, 84)])
        dx, dy = rng.randint(-4, 4), rng.randint(-4, 4)
        image = Image.new("RGB", (width, height), (255, 255, 255))
        box = (width // 5 + dx, height // 5 + dy, 4 * width // 5 + dx, 4 * height // 5 + dy)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        path = f"images/{name}-{i:03d}.png"
        image.save(folder / path)
        user = {
            "role": "user",
            "content": [{"type": "image", "image": path}, {"type": "text", "text": QUESTION}],
        }
        lines.append(json.dumps({"messages": [user, {"role": "assistant", "content": colour}]}))
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return f"{name}.jsonl"


def train(recipe: Path, run: Path) -> None:
    result = vlmtune("train", str(recipe), "--run-dir", str(run), env_extra={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def held_out_reward(model, processor, family, prompts, seed: int = 0) -> float:
    """Mean exact-match reward of completions sampled as GRPO samples them (temperature 1, no top-k)."""
    import torch

    from vlmtune.data import open_image
    from vlmtune.evaluate import exact_match
    from vlmtune.stages.grpo import suppressed_tokens

    torch.manual_seed(seed)
    suppress = suppressed_tokens(model, processor, family)
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
    from vlmtune.preflight import read_split
    from vlmtune.recipe import load_recipe
    from vlmtune.stages.grpo import prompt_of
    from vlmtune.trained import load_for_inference, open_trained_run

    train_file, held_out_file = (
        write_task(tmp_path, "train", 48, seed=1),
        write_task(tmp_path, "heldout", 16, seed=2),
    )
    lora = {"r": 16, "alpha": 16}
    steps = {"batch_size": 4, "grad_accum": 1, "lr_scheduler": "constant", "max_length": 256,
             "gradient_checkpointing": False, "save_steps": 1000}  # fmt: skip
    (tmp_path / "sft").mkdir()
    sft = write_recipe(
        tmp_path / "sft", model={"name": "tiny:qwen2_vl"}, quantization={"bits": None}, lora=lora,
        data={"train": f"../{train_file}", "max_image_pixels": PIXEL_BUDGET},
        train={**steps, "max_steps": 40, "lr": 5e-3},
    )  # fmt: skip
    train(sft, tmp_path / "sft-run")
    # The warm start, until model.adapter lands: the SFT adapter merged into the base, then a fresh adapter.
    result = vlmtune("export", str(tmp_path / "sft-run"), "--out", str(tmp_path / "warm"), "--merge")
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "grpo").mkdir()
    grpo = write_recipe(
        tmp_path / "grpo", model={"name": str(tmp_path / "warm")}, quantization={"bits": 4}, lora=lora,
        data={"train": f"../{train_file}", "max_image_pixels": PIXEL_BUDGET},
        train={**steps, "objective": "grpo", "max_steps": 30, "batch_size": 16, "lr": 2e-3},
        grpo={"num_generations": 8, "max_completion_length": 4, "rewards": [{"type": "exact_match"}]},
    )  # fmt: skip
    train(grpo, tmp_path / "grpo-run")

    trained = open_trained_run(tmp_path / "grpo-run")
    data = load_recipe(grpo).data
    prompts = [prompt_of(sample) for sample in read_split(str(tmp_path / held_out_file), data).samples]
    sft_model = load_for_inference(trained, base_only=True)  # the warm start, 4-bit as GRPO trained it
    before = held_out_reward(sft_model.model, sft_model.processor, sft_model.family, prompts)
    del sft_model
    tuned = load_for_inference(trained)
    after = held_out_reward(tuned.model, tuned.processor, tuned.family, prompts)
    print(
        f"\nheld-out mean exact-match reward ({len(prompts)} prompts x {SAMPLES_PER_PROMPT}): {before:.3f} -> {after:.3f}"
    )
    assert 0.1 < before < 0.7  # the warm start knows the words, not yet the colours: room to learn
    assert after >= before + 0.15 and after >= 0.55
