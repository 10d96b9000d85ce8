#!/usr/bin/env python3
"""vlmtune vs the plain stack: same model, same data, same steps; step time, tokens/s, peak memory.

    python bench/compare.py                   # CPU defaults: 2 rounds, 6 steps per arm launch
    python bench/compare.py --rounds 3 --steps 8 --layers 4 --hidden 1024
    python bench/compare.py --image-side 896  # 896x896 and 1344x896 images: 1,024-1,536 tokens each

Arms, each run in its own process launch, interleaved A/B/A/B so machine noise hits both:
  A  vlmtune's pipeline (load -> lora -> sft with its collator and supervised-positions loss)
  B  the plain stack as its documentation shows it: AutoModelForImageTextToText +
     BitsAndBytesConfig + peft LoraConfig + TRL SFTTrainer with its default vision collator
     (assistant_only_loss=True, so both arms optimise the same labels).
Both load the same random-weight checkpoint (Qwen2-VL shapes, the real 151,936-token vocabulary),
keep the same modules in 16 bit, put LoRA on the same modules and see the samples in the same
order; the script checks that both report the same loss at step 1, so the comparison is of the
same work. Results go to bench/results/compare-<date>-images<side>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QWEN_VISION_SKIP = ["model.visual", "lm_head"]


# --- shared fixtures: the checkpoint and the data --------------------------------------------------


def build_checkpoint(out: Path, hidden: int, layers: int, vocab: int) -> None:
    """Qwen2-VL shapes with random weights; the tiny model's tokenizer and processor files."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vlmtune.families import get_family
    from vlmtune.processing import load_processor, save_processor
    from vlmtune.tiny import tiny_model_path

    tiny = tiny_model_path("qwen2_vl")
    processor = load_processor(tiny, get_family("qwen2_vl"), 448 * 448)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    heads = hidden // 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False,
        ),
        vision_config=dict(depth=layers, embed_dim=256, num_heads=4, mlp_ratio=4, hidden_size=hidden,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    save_processor(processor, out)


def max_pixels(side: int) -> int:
    """The pixel budget that admits both image shapes of build_data unscaled."""
    return side * 3 // 2 * side


def build_data(out: Path, side: int, n: int = 24) -> Path:
    """Image-heavy samples, short answers: side x side or 1.5 side x side images.

    At the default side of 448 that is 256 or 384 image tokens per sample.
    """
    from PIL import Image, ImageDraw

    (out / "images").mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        size = (side, side) if i % 2 == 0 else (side * 3 // 2, side)
        image = Image.new("RGB", size, (250, 250, 250))
        ImageDraw.Draw(image).ellipse((60, 60, 300, 300), fill=colors[name])
        image.save(out / "images" / f"{i:03d}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"images/{i:03d}.png"},
                                         {"type": "text", "text": "What color is the circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"The circle is {name}."}]},
        ]})  # fmt: skip
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- arms (each runs inside its own process) -----------------------------------------------------


class StepTimer:
    """Trainer callback: wall time and loss of every step, and the RSS just before training."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.rss_before_training_mb = current_rss_mb()

            def on_step_begin(self, args, state, control, **kwargs):
                timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.started)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.callbacks = [Callback()]  # the trainer gets them all; callers may add their own
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.started = 0.0
        self.rss_before_training_mb = 0.0


def run_arm_a(ckpt: Path, data: Path, pixels: int, out: Path, steps: int, timer: StepTimer) -> None:
    from vlmtune import pipeline
    from vlmtune.recipe import parse_recipe

    text = f"""
model: {{name: {ckpt}}}
lora: {{r: 16, alpha: 16}}
data: {{train: {data}, max_image_pixels: {pixels}, shuffle: false}}
train: {{max_steps: {steps}, batch_size: 2, grad_accum: 1, lr: 1.0e-4, max_length: 4096, logging_steps: 1,
        save_steps: 100000, group_by_length: false, gradient_checkpointing: true}}
output: {{dir: {out}}}
"""
    pipeline.run(parse_recipe(text), text, "bench", out / "run", callbacks=timer.callbacks)


def run_arm_b(ckpt: Path, data: Path, pixels: int, out: Path, steps: int, timer: StepTimer) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from vlmtune.families import get_family
    from vlmtune.lora_targets import target_regex
    from vlmtune.processing import load_processor
    from vlmtune.recipe import LoraSection

    family = get_family("qwen2_vl")
    processor = load_processor(ckpt, family, pixels)  # AutoProcessor, minus the torchvision-only video part
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=QWEN_VISION_SKIP,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(ckpt, quantization_config=bnb, dtype=torch.bfloat16)
    for module in model.modules():  # the CPU repacking trap (FACTS.md) hits the plain stack too
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([
        {"messages": [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                      for p in m["content"]]} for m in r["messages"]],
         "images": [Image.open(data.parent / p["image"]).convert("RGB")
                    for m in r["messages"] for p in m["content"] if p["type"] == "image"]}
        for r in rows
    ])  # fmt: skip
    args = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=True, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None, assistant_only_loss=True, seed=3407, disable_tqdm=True, warmup_steps=0,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=16, lora_alpha=16, target_modules=target_regex(family, LoraSection()), task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=timer.callbacks)  # fmt: skip
    trainer.train()


def arm_main(arm: str, ckpt: Path, data: Path, pixels: int, out: Path, steps: int, result: Path) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    timer = StepTimer()
    (run_arm_a if arm == "A" else run_arm_b)(ckpt, data, pixels, out, steps, timer)
    result.write_text(json.dumps({
        "arm": arm, "step_seconds": timer.seconds, "losses": timer.losses, "peak_rss_mb": peak_rss_mb(),
        "rss_before_training_mb": timer.rss_before_training_mb,
    }))  # fmt: skip


def current_rss_mb() -> float:
    return _proc_status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. Not ru_maxrss: Linux carries that across exec from the parent."""
    return _proc_status_mb("VmHWM:")


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this benchmark measures memory on Linux only")


# --- driver ---------------------------------------------------------------------------------------


def tokens_per_step(ckpt: Path, data: Path, pixels: int) -> float:
    """Real tokens per batch of 2 (image tokens included), measured with the processor."""
    from vlmtune.collator import VisionCollator
    from vlmtune.families import get_family
    from vlmtune.preflight import read_split
    from vlmtune.processing import load_processor
    from vlmtune.recipe import DataSection

    family = get_family("qwen2_vl")
    collator = VisionCollator(load_processor(ckpt, family, pixels), family, max_length=None,
                              train_on_responses_only=True)  # fmt: skip
    samples = read_split(str(data), DataSection(train=str(data))).samples
    return statistics.fmean(int(collator([s])["attention_mask"].sum()) for s in samples) * 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--image-side", type=int, default=448, help="images are SIDE x SIDE and 1.5 SIDE x SIDE"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--arm", choices=["A", "B"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ckpt = args.work / f"qwen2vl-h{args.hidden}-l{args.layers}-v{args.vocab}"
    data = args.work / f"data-{args.image_side}" / "train.jsonl"
    pixels = max_pixels(args.image_side)
    if args.arm:
        out = args.work / f"out-{args.arm}-{time.time_ns()}"
        arm_main(args.arm, ckpt, data, pixels, out, args.steps, args.result)
        return

    if not (ckpt / "config.json").is_file():
        build_checkpoint(ckpt, args.hidden, args.layers, args.vocab)
    if not data.is_file():
        build_data(data.parent, args.image_side)
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for round_index in range(args.rounds):
        for arm in ("A", "B"):
            result = args.work / f"result-{args.image_side}-{arm}-{round_index}.json"
            cmd = [sys.executable, __file__, "--arm", arm, "--result", str(result), "--steps", str(args.steps),
                   "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
                   "--image-side", str(args.image_side), "--work", str(args.work)]  # fmt: skip
            print(f"round {round_index + 1}/{args.rounds} arm {arm} ...", flush=True)
            subprocess.run(cmd, check=True)
            runs[arm].append(json.loads(result.read_text()))
    report(runs, tokens_per_step(ckpt, data, pixels), args)


def report(runs: dict[str, list[dict]], tokens: float, args: argparse.Namespace) -> None:
    def summary(arm: str) -> dict:
        steps = [s for r in runs[arm] for s in r["step_seconds"][1:]]  # the first step warms caches
        median = statistics.median(steps)
        return {
            "median_step_s": median,
            "tokens_per_s": tokens / median,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[arm]),
            # what training adds on top of the imports, the loaded model and the data
            "training_rss_mb": statistics.median(
                r["peak_rss_mb"] - r["rss_before_training_mb"] for r in runs[arm]
            ),
            "first_loss": [r["losses"][0] for r in runs[arm]],
        }

    a, b = summary("A"), summary("B")
    same_work = all(
        abs(x - y) <= 0.02 * abs(y) for x, y in zip(a["first_loss"], b["first_loss"], strict=True)
    )
    result = {
        "date": str(date.today()),
        "device": "cpu",
        "config": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "steps": args.steps,
            "rounds": args.rounds,
            "batch_size": 2,
            "image_side": args.image_side,
            "tokens_per_step": tokens,
        },  # fmt: skip
        "A_vlmtune": a,
        "B_plain": b,
        "ratios_A_over_B": {
            "step_time": a["median_step_s"] / b["median_step_s"],
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
            "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
            "training_rss": a["training_rss_mb"] / b["training_rss_mb"],
        },
        "same_loss_at_step_1": same_work,
    }
    out = HERE / "results" / f"compare-{date.today()}-images{args.image_side}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    r = result["ratios_A_over_B"]
    print(f"\n{'':24}{'vlmtune (A)':>14}{'plain (B)':>14}{'A/B':>8}")
    print(f"{'median step (s)':24}{a['median_step_s']:14.3f}{b['median_step_s']:14.3f}{r['step_time']:8.2f}")
    print(f"{'tokens/s':24}{a['tokens_per_s']:14.1f}{b['tokens_per_s']:14.1f}{r['tokens_per_s']:8.2f}")
    print(f"{'peak RSS (MB)':24}{a['peak_rss_mb']:14.0f}{b['peak_rss_mb']:14.0f}{r['peak_rss']:8.2f}")
    print(f"{'  of which training (MB)':24}{a['training_rss_mb']:14.0f}{b['training_rss_mb']:14.0f}"
          f"{r['training_rss']:8.2f}")  # fmt: skip
    print(f"{'loss at step 1':24}{str([round(x, 4) for x in a['first_loss']]):>14}"
          f"{str([round(x, 4) for x in b['first_loss']]):>14}")  # fmt: skip
    print(f"same loss at step 1 (2%): {same_work}\nwritten to {out}")
    if not same_work:
        sys.exit("the arms did not start from the same loss: they are not doing the same work")


if __name__ == "__main__":
    main()
