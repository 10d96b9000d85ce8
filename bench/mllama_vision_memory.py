#!/usr/bin/env python3
"""What Llama 3.2 Vision's vision tower keeps for backward: one forward + backward of the real-shape
tower (random weights, bundled config), LoRA r16 on every vision attention and MLP Linear as vlmtune's
lora stage puts it (bf16, as TRL casts them), gradient checkpointing enabled the way the Trainer enables
it, bf16 autocast as the Trainer's bf16=True runs it.

    python bench/mllama_vision_memory.py --dry-run              # CPU: 2 local + 1 global layer, ~3 min
    python bench/mllama_vision_memory.py --device cuda          # GPU: the whole tower, every mode, ~1.5 min

Why: MllamaVisionEncoderLayer is a plain nn.Module, not a transformers GradientCheckpointingLayer, so
`gradient_checkpointing_enable()` leaves the 32 + 8 vision layers uncheckpointed and each keeps all its
activations, over 4 tiles x 1608 positions per image (always 4 tiles: a 448x448 image is one real tile
and three masked padding tiles). Modes, each in its own subprocess (clean peaks):

  hf       checkpointing as vlmtune turns it on today (model.gradient_checkpointing_enable)
  vision   the same, plus every vision encoder layer wrapped in torch.utils.checkpoint (non-reentrant)
  eager    hf with attn_implementation="eager" (materialises heads x seq x seq scores per layer);
           one layer (GPU) or a 224-pixel tile (CPU dry run), since 40 layers at 560 need ~370 GB

Per mode, one JSON line: bytes autograd saves for backward (unique storages, via saved_tensors_hooks;
tensors saved inside a checkpointed region are not seen, so `vision` shows only what is outside the
layers), per layer and position; on CUDA, memory allocated after the forward and max_memory_allocated
over forward + backward, above the weights, and the SDPA kernel torch picks for this float mask
(torch._fused_sdp_choice: 0 math, 1 flash, 2 memory-efficient, 3 cuDNN).

Measured on an H200 (torch 2.11, transformers 5.17, peft 0.21; a compact copy of this script), batch 2:
  hf      after forward 27.44 GB, peak 29.02 GB (batch 1: 13.72 GB after forward: linear in batch)
  vision  after forward  3.40 GB, peak  4.98 GB
  eager   ONE layer: after forward 9.20 GB, peak 22.08 GB
  without autocast (hf): 21.86 GB after forward; SDPA kernel for the mask: 3 (cuDNN), no seq x seq.
On CPU (dry run, 2+1 layers, batch 1, autocast on CPU keeps LayerNorm in bf16): 20.6k 16-bit values saved
per position and layer besides the shared mask; eager at a 224-pixel tile adds ~47 per position per key.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIG = (
    Path(__file__).resolve().parent.parent
    / "vlmtune/model/configs/meta-llama--Llama-3.2-11B-Vision-Instruct.json"
)
VISION_TARGETS = r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))"


def build(args: argparse.Namespace):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MllamaVisionConfig, MllamaVisionModel

    vision = json.loads(CONFIG.read_text())["vision_config"]
    vision.update(num_hidden_layers=args.local_layers, num_global_layers=args.global_layers)
    if args.image_size:  # a smaller tile (dry-run eager): the per-position figures hold, S^2 shrinks
        vision["image_size"] = args.image_size
    # Fewer layers (a dry run): the same number of intermediate outputs, from the layers there are.
    last = args.local_layers - 1
    vision["intermediate_layers_indices"] = [min(i, last) for i in vision["intermediate_layers_indices"]]
    config = MllamaVisionConfig(**vision)
    config._attn_implementation = "eager" if args.mode == "eager" else "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = MllamaVisionModel(config).to(torch.bfloat16)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=VISION_TARGETS)
    )
    for param in model.parameters():  # TRL casts the adapters of a quantized model to bf16; vlmtune's are
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if args.mode == "vision":
        checkpoint_vision_layers(model)
    model.train()
    return model, config


def checkpoint_vision_layers(model) -> None:
    """The remedy: run each vision encoder layer under non-reentrant torch.utils.checkpoint."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for module in model.modules():
        if type(module).__name__ == "MllamaVisionEncoderLayer":
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


def inputs(args: argparse.Namespace, config, device: str):
    """A batch as the processor makes it: always max_num_tiles tiles, the unused ones masked (a 448x448
    image is one tile of 560x560 and three padding tiles; the tower still runs over all four)."""
    import torch

    tiles, size = config.max_num_tiles, config.image_size
    pixels = torch.randn(args.batch, 1, tiles, 3, size, size, device=device, dtype=torch.bfloat16)
    ratio_id = {1: 1, 2: 2, 3: 3, 4: 6}[args.tiles]  # [1,1] [1,2] [1,3] [2,2] among supported_aspect_ratios
    aspect_ratio_ids = torch.full((args.batch, 1), ratio_id, device=device)
    aspect_ratio_mask = torch.zeros(args.batch, 1, tiles, dtype=torch.long, device=device)
    aspect_ratio_mask[:, :, : args.tiles] = 1
    return pixels, aspect_ratio_ids, aspect_ratio_mask


def measure(args: argparse.Namespace) -> dict:
    import torch

    model, config = build(args)
    pixels, ids, mask = inputs(args, config, args.device)
    cuda = args.device == "cuda"
    layer_of = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "MllamaVisionEncoderLayer":
            layer_of[module] = name
    current = ["outside"]

    def enter(module, *_):
        current[0] = layer_of[module]

    def leave(module, *_):
        current[0] = "outside"

    for module in layer_of:
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    seen: dict[tuple, tuple[str, int]] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved weights cost nothing extra

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key not in seen and storage.data_ptr() not in weights:
            seen[key] = (current[0], storage.nbytes())
        return t

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    # The Trainer's bf16=True: autocast (on CUDA it also runs LayerNorm in fp32; on CPU it does not).
    with (
        torch.autocast(args.device, dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        out = model(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
    after_forward = torch.cuda.memory_allocated() - base if cuda else 0
    out.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_layer: dict[str, int] = {}
    for where, nbytes in seen.values():
        per_layer[where] = per_layer.get(where, 0) + nbytes
    layers = {k: v for k, v in per_layer.items() if k != "outside"}
    tiles = config.max_num_tiles
    positions = args.batch * tiles * (config.image_size // config.patch_size) ** 2
    padded = args.batch * tiles * (((config.image_size // config.patch_size) ** 2 + 1 + 7) // 8 * 8)
    grads = sum(
        p.grad is not None and p.grad.abs().sum().item() > 0 for p in model.parameters() if p.requires_grad
    )
    sdpa_choice = None
    if cuda:  # which kernel torch's dispatcher picks for q/k/v of this shape with Mllama's bf16 float mask
        q = torch.zeros(
            args.batch,
            config.attention_heads,
            padded // args.batch,
            config.hidden_size // config.attention_heads,
            device="cuda",
            dtype=torch.bfloat16,
        )
        bias = torch.zeros(
            args.batch, 1, padded // args.batch, padded // args.batch, device="cuda", dtype=q.dtype
        )
        sdpa_choice = int(torch._fused_sdp_choice(q, q, q, bias))
    return {
        "mode": args.mode,
        "device": args.device,
        "layers": f"{args.local_layers}+{args.global_layers}",
        "batch": args.batch,
        "image_size": config.image_size,
        "tiles": args.tiles,
        "positions": positions,
        "padded_positions": padded,
        "saved_bytes": sum(per_layer.values()),
        "saved_outside_layers": per_layer.get("outside", 0),
        "saved_per_layer_mean": sum(layers.values()) // max(1, len(layers)),
        "saved_elems_per_token_per_layer": round(sum(layers.values()) / max(1, len(layers)) / padded / 2, 1),
        "peak_above_weights": torch.cuda.max_memory_allocated() - base if cuda else None,
        "after_forward": after_forward if cuda else None,
        "sdpa_kernel": sdpa_choice,
        "trainable_with_grad": grads,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="CPU, 2 local + 1 global layers, batch 1")
    parser.add_argument("--modes", default="hf,vision,eager")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a subprocess
    parser.add_argument("--local-layers", type=int, default=None)
    parser.add_argument("--global-layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tiles", type=int, default=1, help="real tiles per image (1: a 448x448 image)")
    parser.add_argument("--image-size", type=int, default=None, help="tile side (default: the config's 560)")
    args = parser.parse_args()
    if args.dry_run:
        args.device = "cpu"
    full = not args.dry_run
    args.local_layers = args.local_layers if args.local_layers is not None else (32 if full else 2)
    args.global_layers = args.global_layers if args.global_layers is not None else (8 if full else 1)
    args.batch = args.batch if args.batch is not None else (2 if full else 1)
    if args.mode:
        print(json.dumps(measure(args)), flush=True)
        return
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--device", args.device, "--local-layers",
               str(args.local_layers), "--global-layers", str(args.global_layers), "--batch", str(args.batch)]  # fmt: skip
        cmd += ["--tiles", str(args.tiles)]
        if mode == "eager":  # ~4 GB of scores per layer and image at 560: one layer (GPU), a small tile (CPU)
            cmd[cmd.index("--local-layers") + 1], cmd[cmd.index("--global-layers") + 1] = "1", "0"
            if not full:
                cmd += ["--image-size", "224"]
        elif args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        print(
            line if done.returncode == 0 else json.dumps({"mode": mode, "error": done.stderr[-2000:]}),
            flush=True,
        )


if __name__ == "__main__":
    main()
