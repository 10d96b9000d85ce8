"""Swap the kernels into a loaded (peft) model, per family record, and say what was swapped.

Which kernels ``train.kernels: auto`` uses comes from ``MEASURED_FASTER``: the kernels bench/gpu.py's
``kernels`` part measured faster than the torch path on CUDA (forward + backward). It is empty until a
GPU run fills it, so ``auto`` swaps nothing yet; on CPU nothing is ever swapped. ``patch_model`` itself
takes any list of kernels (the tests use it on CPU under the Triton interpreter).

Each swap is checked first: a norm module must compute the record's norm (rmsnorm, or gemma_rmsnorm's
1 + w), an MLP's activation the record's one, a modeling module's ``apply_rotary_pos_emb`` the rotate-half
rotation, on a probe input; where one disagrees, it is left alone and the report says why. Modules are
found by structure under the record's language prefix, never by a model name.
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmtune.model.families import Family, under
from vlmtune.model.modelinfo import PEFT_PREFIX

KERNELS = ("rmsnorm", "glu", "rope", "nf4_lora")
# Kernel -> measured speed-up (torch time / kernel time, forward + backward) from bench/gpu.py's kernels
# part on CUDA. Only kernels above 1.0 here are ever used by `auto`. Nothing has been measured yet.
MEASURED_FASTER: dict[str, float] = {}
NORM_OFFSETS = {"rmsnorm": 0.0, "gemma_rmsnorm": 1.0}
_DYNAMIC_ROPE = ("dynamic", "longrope")


def chosen(mode: str, device_type: str) -> tuple[str, ...]:
    """The kernels ``train.kernels`` selects on this device: none when off or not CUDA, else the measured-faster ones."""
    if mode == "off" or device_type != "cuda":
        return ()
    return tuple(k for k in KERNELS if MEASURED_FASTER.get(k, 0.0) > 1.0)


@dataclass
class PatchReport:
    patched: Counter = field(default_factory=Counter)  # kernel -> modules (or functions) swapped
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was left alone

    def as_dict(self) -> dict[str, Any]:
        return {"patched": dict(self.patched), "skipped": dict(self.skipped)}


def _language_modules(model: torch.nn.Module, family: Family) -> Iterable[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        plain = name.removeprefix(PEFT_PREFIX)
        if under(plain, family.language_prefix):
            yield plain, module


def _probe_device(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters(), None)
    return (
        (parameter.device, torch.float32) if parameter is not None else (torch.device("cpu"), torch.float32)
    )


# --- the swaps ----------------------------------------------------------------------------------


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from vlmtune.kernels.rmsnorm import rms_norm

    return rms_norm(hidden_states, self.weight, self._vlmtune_eps, self._vlmtune_offset)


def _patch_norm(name: str, module: torch.nn.Module, family: Family, report: PatchReport) -> None:
    from vlmtune.kernels.rmsnorm import rms_norm_reference

    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if eps is None or weight is None or weight.dim() != 1:
        return
    offset = NORM_OFFSETS[family.norm]
    device, dtype = _probe_device(module)
    probe = torch.randn(2, weight.numel(), device=device, dtype=dtype)
    with torch.no_grad():
        agrees = torch.allclose(
            module(probe).float(), rms_norm_reference(probe, weight, eps, offset).float(), atol=1e-3
        )
    if not agrees:
        report.skipped[name] = f"does not compute {family.norm}"
        return
    module._vlmtune_eps, module._vlmtune_offset = float(eps), offset
    module.forward = types.MethodType(_norm_forward, module)
    report.patched["rmsnorm"] += 1


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from vlmtune.kernels.glu import glu

    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self._vlmtune_activation))


def _patch_mlp(name: str, module: torch.nn.Module, family: Family, report: PatchReport) -> None:
    from vlmtune.kernels.glu import glu_reference

    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        agrees = torch.allclose(
            module.act_fn(probe),
            glu_reference(probe, torch.ones_like(probe), family.mlp_activation),
            atol=1e-5,
        )
    if not agrees:
        report.skipped[name] = f"its act_fn is not {family.mlp_activation}"
        return
    module._vlmtune_activation = family.mlp_activation
    module.forward = types.MethodType(_mlp_forward, module)
    report.patched["glu"] += 1


def _rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    from vlmtune.kernels.rope import rope_cos_sin

    positions = position_ids if position_ids.dim() == 3 else position_ids[None]
    if self._vlmtune_axes.max() > 0:
        positions = positions.expand(3, -1, -1)
    return rope_cos_sin(positions, self.inv_freq, self._vlmtune_axes, self.attention_scaling, dtype=x.dtype)


def _patch_rotary_module(name: str, module: torch.nn.Module, family: Family, report: PatchReport) -> None:
    from vlmtune.kernels.rope import axis_map

    rope_type = getattr(module, "rope_type", "default")
    if not isinstance(rope_type, str) or any(d in rope_type for d in _DYNAMIC_ROPE):
        report.skipped[name] = f"rope type {rope_type!r} changes its frequencies at run time"
        return
    axes = axis_map(family.rope, module.inv_freq.numel(), getattr(module, "mrope_section", ()))
    module._vlmtune_axes = axes.to(module.inv_freq.device)
    module.forward = types.MethodType(_rotary_forward, module)
    report.patched["rope"] += 1


def _kernel_apply_rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    from vlmtune.kernels.rope import apply_rotary

    return apply_rotary(q, k, cos, sin, unsqueeze_dim)


_ORIGINAL_ROTARY: dict[str, Any] = {}


def _patch_rotary_function(module_name: str, report: PatchReport) -> None:
    """Replace ``apply_rotary_pos_emb`` in a modeling module (process-wide; ``unpatch_rotary`` undoes it)."""
    from vlmtune.kernels.rope import rotary_reference

    modeling = sys.modules.get(module_name)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None or original is _kernel_apply_rotary:
        return
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16)
    cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    q_out, _ = original(q, k, cos, sin)
    if not torch.allclose(q_out, rotary_reference(q, cos, sin), atol=1e-5):
        report.skipped[module_name] = "its apply_rotary_pos_emb is not the rotate-half rotation"
        return
    _ORIGINAL_ROTARY[module_name] = original
    modeling.apply_rotary_pos_emb = _kernel_apply_rotary
    report.patched["rope"] += 1


def unpatch_rotary() -> None:
    """Give every modeling module its own apply_rotary_pos_emb back."""
    for module_name, original in _ORIGINAL_ROTARY.items():
        sys.modules[module_name].apply_rotary_pos_emb = original
    _ORIGINAL_ROTARY.clear()


def _lora4bit_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The fused path where this call is plain LoRA on an NF4 base; peft's own forward otherwise."""
    from vlmtune.kernels.nf4_lora import nf4_lora, nf4_weight

    active = self.active_adapters
    adapter = active[0] if len(active) == 1 else None
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or adapter not in self.lora_A
        or adapter in getattr(self, "lora_variant", {})
        or not isinstance(self.lora_dropout[adapter], torch.nn.Identity)
    ):
        return self._vlmtune_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    input_dtype = x.dtype
    compute = getattr(base, "compute_dtype", None) or x.dtype
    weight = nf4_weight(base.weight.data, base.weight.quant_state)
    y = nf4_lora(
        x.to(compute),
        weight,
        self.lora_A[adapter].weight,
        self.lora_B[adapter].weight,
        self.scaling[adapter],
        base.bias,
    )
    return y.to(input_dtype)


def _patch_lora4bit(name: str, module: torch.nn.Module, report: PatchReport) -> None:
    base = module.get_base_layer()
    state = getattr(base.weight, "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4":
        report.skipped[name] = "its base weight is not NF4"
        return
    module._vlmtune_forward = module.forward
    module.forward = types.MethodType(_lora4bit_forward, module)
    report.patched["nf4_lora"] += 1


def patch_model(model: torch.nn.Module, family: Family, kernels: Iterable[str]) -> PatchReport:
    """Swap ``kernels`` (a subset of KERNELS) into ``model``'s modules, as its family record says."""
    wanted = set(kernels)
    unknown = wanted - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}")
    # What the record says this family computes; a kind it names None has no kernel here.
    wanted -= {kind for kind, field in (("rmsnorm", family.norm), ("glu", family.mlp_activation),
                                       ("rope", family.rope)) if field is None}  # fmt: skip
    report = PatchReport()
    if not wanted:
        return report
    lora4bit = _lora4bit_class() if "nf4_lora" in wanted else None
    rotary_modules: set[str] = set()
    for name, module in list(_language_modules(model, family)):
        if "rmsnorm" in wanted and type(module).__name__.endswith("RMSNorm"):
            _patch_norm(name, module, family, report)
        elif "glu" in wanted and all(
            hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")
        ):
            _patch_mlp(name, module, family, report)
        elif "rope" in wanted and hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            _patch_rotary_module(name, module, family, report)
        elif "rope" in wanted and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            rotary_modules.add(type(module).__module__)
    for module_name in sorted(rotary_modules):
        _patch_rotary_function(module_name, report)
    if lora4bit is not None:
        for name, module in model.named_modules():
            if isinstance(module, lora4bit):
                _patch_lora4bit(name.removeprefix(PEFT_PREFIX), module, report)
    return report


def _lora4bit_class() -> type | None:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes
        return None
    return Linear4bit
