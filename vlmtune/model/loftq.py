"""lora.init loftq on a 4-bit base: each adapter starts as the low-rank part of its weight's quantization error.

For a 4-bit Linear with original weight W and dequantized NF4 weight Q, the adapter is set so that
scaling x B @ A is the best rank-r approximation of W - Q (its r largest singular directions): the
model starts closer to the 16-bit one than the 4-bit base alone (LoftQ, one alternating step, as
peft's ``replace_lora_weights_loftq``). Done here rather than through peft's helper because that
helper computes on CUDA only and leaves out the LoRA scaling (alpha / r), wrong whenever alpha != r.

The original W comes from the checkpoint's safetensors, read one tensor at a time (names as the
model has them, or as transformers renames the checkpoint's keys when it loads them). Linears that
are not 4-bit (the vision tower, kept 16-bit) have no quantization error: their adapters keep
peft's default start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmtune.errors import ModelError

PEFT_PREFIX = "base_model.model."


def start_from_quantization_error(peft_model: Any, adapter: str = "default") -> int:
    """Set every 4-bit LoRA layer's A and B from its weight's quantization error; the count set."""
    import torch

    layers = [(name, m) for name, m in peft_model.named_modules() if _is_4bit_lora(m, adapter)]
    if not layers:
        raise ModelError(
            "lora.init loftq found no 4-bit Linear among the LoRA targets: nothing has a quantization error",
            hint="target the language model's Linears (the 4-bit ones), or use lora.init kaiming",
        )
    originals = CheckpointTensors(peft_model.get_base_model())
    with torch.no_grad():
        for name, module in layers:
            weight = originals.get(name.removeprefix(PEFT_PREFIX) + ".weight")
            a, b = low_rank_error(module.get_base_layer(), weight, module.r[adapter], module.scaling[adapter])
            module.lora_A[adapter].weight.data = a.to(module.lora_A[adapter].weight.dtype)
            module.lora_B[adapter].weight.data = b.to(module.lora_B[adapter].weight.dtype)
    return len(layers)


def low_rank_error(base_layer: Any, original: Any, rank: int, scaling: float) -> tuple[Any, Any]:
    """(A, B) with scaling x B @ A the rank-``rank`` SVD truncation of original - dequantized."""
    import bitsandbytes as bnb
    import torch

    weight = base_layer.weight
    dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    error = original.to(device=dequantized.device, dtype=torch.float32) - dequantized
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def _is_4bit_lora(module: Any, adapter: str) -> bool:
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or adapter not in lora_a or not hasattr(module, "get_base_layer"):
        return False
    return type(module.get_base_layer().weight).__name__ == "Params4bit"


class CheckpointTensors:
    """The 16-bit tensors of the checkpoint a model was loaded from, by the model's own parameter names."""

    def __init__(self, model: Any):
        self.folder = _checkpoint_folder(model)
        self.files = _tensor_files(self.folder)  # checkpoint key -> file
        self.names = _live_names(model, list(self.files))  # model's name -> checkpoint key

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        key = self.names.get(name)
        if key is None:
            raise ModelError(
                f"lora.init loftq needs the 16-bit weight {name}, and the checkpoint in {self.folder} has no tensor "
                "by that name (nor one transformers renames to it)",
                hint="use lora.init kaiming (or gaussian) for this checkpoint",
            )
        with safe_open(str(self.files[key]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)


def _checkpoint_folder(model: Any) -> Path:
    """The local folder of the model's checkpoint (the hub cache's snapshot for a hub id)."""
    name = model.config._name_or_path
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        revision = getattr(model.config, "_commit_hash", None)
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception as exc:
        raise ModelError(
            f"lora.init loftq reads the 16-bit weights of {name}, and no local copy was found ({exc})",
            hint="download the checkpoint first (it was loaded from somewhere: give model.name as that folder)",
        ) from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelError(
            f"lora.init loftq reads the 16-bit weights from safetensors files, and {folder} has none",
            hint="use a safetensors checkpoint, or lora.init kaiming",
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt", device="cpu") as handle:
        return dict.fromkeys(handle.keys(), single)


def _live_names(model: Any, keys: list[str]) -> dict[str, str]:
    """Checkpoint keys by the names the model has: as they are, or renamed as transformers renames them on load."""
    names = {key: key for key in keys}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        for key in keys:
            names.setdefault(rename_source_key(key, renamings, [])[0], key)
    except (
        ImportError,
        TypeError,
        AttributeError,
    ):  # a transformers without these helpers: names as they are
        pass
    return names
