#!/usr/bin/env python3
"""estimate-memory against reality: predicted vs measured peak memory of real training steps on CPU.

    python bench/memory_accuracy.py              # the default grid, 11 configurations
    python bench/memory_accuracy.py --quick      # three configurations, about a minute

Each configuration runs in its own process, so one's allocations never hide another's:
  1. import torch/transformers/peft; note the resident memory (RSS): the baseline;
  2. load a random Qwen2-VL-shaped checkpoint the way the load stage does (NF4 + double quant,
     vision tower, merger and lm_head kept in bf16), put LoRA on the lora stage's targets, cast
     the adapters to bf16 as TRL does for quantized models, enable non-reentrant gradient
     checkpointing where asked, build torch AdamW;
  3. take one AdamW step on zero gradients (AdamW allocates its states at its first step), reset
     the kernel's RSS high-water mark (/proc/self/clear_refs; ru_maxrss reports the same value),
     run one step under bf16 autocast: forward, vlmtune's supervised loss or the model's own loss,
     backward, optimizer step;
  4. measured peak = high-water mark - baseline; predicted = `estimate_recipe` on the same recipe,
     minus the CUDA-context constant (no CUDA here).
Batches are synthetic (random ids, one image of the given size per sample, labels on the text
tokens) so sequence length, image size and vocabulary are exact. The table goes to stdout and
bench/results/memory_accuracy-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# name, text hidden, layers, vocab, text tokens, image side, batch, gradient checkpointing, loss
GRID = [
    ("base", 512, 2, 32_000, 512, 448, 2, True, "supervised"),
    ("seq 128", 512, 2, 32_000, 128, 448, 2, True, "supervised"),
    ("seq 2048", 512, 2, 32_000, 2048, 448, 1, True, "supervised"),
    ("image 896", 512, 2, 32_000, 512, 896, 1, True, "supervised"),
    ("no ckpt", 512, 2, 32_000, 512, 448, 2, False, "supervised"),
    ("no ckpt, seq 2048", 512, 2, 32_000, 2048, 448, 1, False, "supervised"),
    ("vocab 152k", 512, 2, 151_936, 512, 448, 2, True, "supervised"),
    ("vocab 152k, full logits", 512, 2, 151_936, 512, 448, 1, True, "full"),
    ("vocab 262k, full logits", 512, 2, 262_144, 256, 448, 1, True, "full"),
    ("wide (h 1024, 4 layers)", 1024, 4, 32_000, 1024, 448, 1, True, "supervised"),
    ("wide, no ckpt", 1024, 4, 32_000, 1024, 448, 1, False, "supervised"),
]
# Large blocks straight from mmap and back to the kernel on free: RSS then follows the live tensors
# (as torch.cuda.max_memory_allocated would) instead of glibc's heap fragmentation.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
QUICK = ["base", "no ckpt", "vocab 152k, full logits"]


# --- the checkpoint ------------------------------------------------------------------------------


def build_checkpoint(out: Path, hidden: int, layers: int, vocab: int) -> None:
    """Random weights in Qwen2-VL shapes (head_dim 64), saved in bf16; no tokenizer needed."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    heads = hidden // 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        ),
        vision_config=dict(depth=2, embed_dim=256, num_heads=4, mlp_ratio=4, hidden_size=hidden),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)


# --- one configuration, in a child process ------------------------------------------------------------


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS means live memory


def recipe_for(checkpoint: str, c: dict):
    from vlmtune.recipe import parse_recipe

    text = json.dumps(
        {
            "model": {"name": checkpoint, "dtype": "bfloat16"},
            "quantization": {"bits": 4, "double_quant": True},
            "lora": {"r": 16},
            "data": {"train": "unused.jsonl", "max_image_pixels": c["side"] ** 2},
            "train": {"batch_size": c["batch"], "gradient_checkpointing": c["ckpt"], "optim": "adamw_torch",
                      "supervised_loss": c["loss"] == "supervised", "max_length": 65536},
        }
    )  # fmt: skip
    return parse_recipe(text, source="bench")


def child(c: dict) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging

    from vlmtune import memory
    from vlmtune.model.families import detect_family
    from vlmtune.stages import load, lora
    from vlmtune.training.loss import lm_head_input, supervised_cross_entropy

    logging.set_verbosity_error()
    torch.manual_seed(0)
    recipe = recipe_for(c["checkpoint"], c)
    predicted = memory.estimate_recipe(recipe, seq_len=c["text"], image_size=(c["side"], c["side"]))
    import bitsandbytes  # noqa: F401  (its native library belongs to the baseline, not to the weights)
    import peft  # noqa: F401

    _trim()
    baseline = _status("VmRSS")

    config = memory.resolve_config(c["checkpoint"]).config
    family = detect_family(config)
    model = AutoModelForImageTextToText.from_pretrained(
        c["checkpoint"], dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=load.quantization_config(recipe.quantization, family, torch.bfloat16),
    )  # fmt: skip
    load.keep_quantized_layers_trainable(model)
    for param in model.parameters():  # 16-bit weights are still pages of the mapped file: copy them in
        if param.dtype != torch.uint8:
            param.data = param.data.clone()
    plan = lora.plan(model, family, recipe.lora)
    model = lora.apply(model, recipe.lora, plan, seed=recipe.train.seed)
    for param in model.parameters():  # what TRL's SFTTrainer does to a quantized model's adapters
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    if c["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _trim()
    loaded = _status("VmRSS") - baseline

    work = predicted.workload
    batch = _batch(work, config, c["batch"])
    # AdamW allocates its states at its first step: take one on zero gradients before measuring.
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _trim()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (ru_maxrss too)
    started = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, batch, c["loss"] == "supervised", lm_head_input, supervised_cross_entropy)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    hwm = _status("VmHWM")
    terms = dict(predicted.terms)
    predicted_peak = predicted.peak_bytes - terms["overhead"]
    return {
        **{k: v for k, v in c.items() if k != "checkpoint"},
        "image_tokens": work.image_tokens,
        "total_tokens": work.sequence,
        "predicted_bytes": predicted_peak,
        "measured_bytes": hwm - baseline,
        "predicted_weights_bytes": terms["weights"] + terms["lora"],
        "measured_loaded_bytes": loaded,
        "measured_step_increase_bytes": hwm - before,
        "predicted_terms": terms,
        "seconds": round(time.time() - started, 1),
        "loss_value": float(loss),
    }


def _batch(work, config, batch_size: int) -> dict:
    import torch

    side_patches = int(round((work.image_patches) ** 0.5))
    vocab = config.get_text_config().vocab_size
    image_id = config.image_token_id
    ids = torch.randint(10, vocab - 10, (batch_size, work.sequence))
    ids[:, 1 : 1 + work.image_tokens] = image_id
    labels = ids.clone()
    labels[:, : 1 + work.image_tokens] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == image_id).long(),
        "pixel_values": torch.randn(batch_size * work.image_patches, 3 * 2 * 14 * 14),
        "image_grid_thw": torch.tensor([[1, side_patches, side_patches]] * batch_size),
        "labels": labels,
    }


def _loss(model, batch, supervised: bool, lm_head_input, supervised_cross_entropy):
    if not supervised:
        return model(**batch, use_cache=False).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lm_head = model.get_base_model().get_output_embeddings()
    with lm_head_input(lm_head) as captured:
        model(**inputs, use_cache=False)
    return supervised_cross_entropy(captured.hidden, batch["labels"], lm_head).loss


# --- the parent: build, run, tabulate -------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    grid = [g for g in GRID if not args.quick or g[0] in QUICK]
    results = []
    with tempfile.TemporaryDirectory(prefix="vlmtune-membench-") as tmp:
        checkpoints: dict[tuple, str] = {}
        for name, hidden, layers, vocab, text, side, batch, ckpt, loss in grid:
            key = (hidden, layers, vocab)
            if key not in checkpoints:
                path = Path(tmp) / f"qwen2vl-h{hidden}-l{layers}-v{vocab}"
                build_checkpoint(path, hidden, layers, vocab)
                checkpoints[key] = str(path)
            c = dict(name=name, hidden=hidden, layers=layers, vocab=vocab, text=text, side=side, batch=batch,
                     ckpt=ckpt, loss=loss, checkpoint=checkpoints[key])  # fmt: skip
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(c)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, **CHILD_ENV},
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(line.removeprefix("RESULT "))
            results.append(result)
            print(_row(result), flush=True)
    print()
    print(table(results))
    out = HERE / "results" / f"memory_accuracy-{date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(ROOT)}")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _row(r: dict) -> str:
    err = (r["predicted_bytes"] - r["measured_bytes"]) / r["measured_bytes"] * 100
    werr = (r["predicted_weights_bytes"] - r["measured_loaded_bytes"]) / r["measured_loaded_bytes"] * 100
    return (
        f"| {r['name']} | {r['vocab']:,} | {r['text']:,} + {r['image_tokens']:,} | {r['side']}² | {r['batch']} | "
        f"{'on' if r['ckpt'] else 'off'} | {r['loss']} | {_mib(r['predicted_bytes'])} | {_mib(r['measured_bytes'])} | "
        f"{err:+.1f}% | {_mib(r['predicted_weights_bytes'])} / {_mib(r['measured_loaded_bytes'])} ({werr:+.1f}%) |"
    )


def table(results: list[dict]) -> str:
    head = (
        "| configuration | vocab | text + image tokens | image | batch | ckpt | loss | predicted MiB | "
        "measured MiB | error | weights+LoRA predicted / measured MiB |\n"
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"
    )
    return "\n".join([head, *(_row(r) for r in results)])


if __name__ == "__main__":
    main()
