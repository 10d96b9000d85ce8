"""The model's shape without its weights: every parameter and Linear of the real architecture,
instantiated on the META device (nothing is read or allocated), and its transformer blocks.

The memory model (vlmtune.memory.estimate) turns a ``ModelShape`` into bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from vlmtune.model.families import Family, ends_with

NORM_ELEMS = 2  # an RMSNorm saves its input upcast to fp32: two 16-bit elements per channel


@dataclass(frozen=True)
class Param:
    """One parameter tensor (tied ones appear once)."""

    name: str
    component: str
    numel: int
    linear: str | None = None  # the nn.Linear it is the weight of, if any
    embedding: bool = False
    shape: tuple[int, ...] = ()
    expert: bool = False  # a fused expert tensor (its family's expert_parameters)


@dataclass(frozen=True)
class Linear:
    name: str
    component: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Layer:
    """One transformer block, read from its Linear shapes."""

    name: str  # e.g. model.language_model.layers.3
    component: str  # vision | language | other
    width: int  # channels of the block's input (what a checkpoint keeps)
    elems: int  # 16-bit elements autograd saves per token in one forward, without LoRA
    # Does gradient checkpointing reach this block? transformers checkpoints only GradientCheckpointingLayer
    # blocks; others (Mllama's vision encoder layers) keep every activation whatever the recipe says.
    checkpointable: bool = True


@dataclass(frozen=True)
class ModelShape:
    family: str
    title: str
    params: tuple[Param, ...]
    linears: tuple[Linear, ...]
    layers: tuple[Layer, ...]
    vocab_size: int
    text_hidden: int
    vision_hidden: int
    tied_lm_head: bool
    projector_prefixes: tuple[str, ...] = ()
    experts: int = 0  # routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 0

    @property
    def total_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: the routed experts count for experts_per_token of
        experts (the router, shared experts and everything else count whole)."""
        expert = sum(p.numel for p in self.params if p.expert)
        if not expert or not self.experts:
            return self.total_params
        return self.total_params - expert + expert * self.experts_per_token // self.experts


def describe_model(config: Any) -> ModelShape:
    """Parameter and Linear shapes of the real architecture, instantiated on the meta device."""
    from vlmtune.model.families import detect_family

    family = detect_family(config)
    return _describe(family, config.to_json_string(use_diff=False))


@cache
def _describe(family: Family, config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(**json.loads(config_json))
        with torch.device("meta"), no_init_weights():
            model = AutoModelForImageTextToText.from_config(config)
        model.tie_weights()  # skipped under no_init_weights; tied tensors must appear once
    finally:
        logging.set_verbosity(verbosity)
    return shape_of(model, family)


def shape_of(model: Any, family: Family) -> ModelShape:
    """A ModelShape from any instantiated model (meta, CPU or GPU)."""
    import torch

    from vlmtune.model.modelinfo import is_linear, logical_numel, tied_lm_head

    linears, embeddings = [], set()
    linear_weights: dict[str, str] = {}
    for name, module in model.named_modules():
        if is_linear(module):
            linears.append(
                Linear(name, family.component_of(name), module.in_features, module.out_features,
                       module.bias is not None)
            )  # fmt: skip
            linear_weights[f"{name}.weight"] = name
        elif isinstance(module, torch.nn.Embedding):
            embeddings.add(f"{name}.weight")
    params = []
    for name, param in model.named_parameters(remove_duplicate=True):
        params.append(
            Param(name, family.component_of(name.rsplit(".", 1)[0]), logical_numel(param),
                  linear_weights.get(name), name in embeddings, tuple(param.shape),
                  family.is_expert_parameter(name))
        )  # fmt: skip
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    text = model.config.get_text_config()
    vision_cfg = getattr(model.config, "vision_config", None)
    vision_hidden = getattr(vision_cfg, "hidden_size", 0) or getattr(vision_cfg, "embed_dim", 0) or 0
    layers = group_layers(linears, family, checkpointable_blocks(model, family))
    vision_layers = [layer.width for layer in layers if layer.component == "vision"]
    return ModelShape(
        family=family.name,
        title=family.title,
        params=tuple(params),
        linears=tuple(linears),
        layers=layers,
        vocab_size=outputs.weight.shape[0] if outputs is not None else text.vocab_size,
        text_hidden=inputs.weight.shape[1],
        vision_hidden=vision_layers[0] if vision_layers else int(vision_hidden),
        tied_lm_head=tied_lm_head(model),
        projector_prefixes=family.projector_prefixes,
        **expert_counts(text, family),
    )


def expert_counts(text_config: Any, family: Family) -> dict[str, int]:
    """Routed experts per layer and experts per token, from the text config keys the record names."""
    if not family.moe:
        return {}
    total_key, active_key = family.expert_count_keys
    return {
        "experts": int(getattr(text_config, total_key, 0) or 0),
        "experts_per_token": int(getattr(text_config, active_key, 0) or 0),
    }


def checkpointable_blocks(model: Any, family: Family) -> frozenset[str]:
    """Names of the blocks gradient checkpointing reaches in a vlmtune run.

    transformers checkpoints its GradientCheckpointingLayer blocks; the load stage makes every other
    transformer block one too (vlmtune.model.checkpointing: Mllama's vision layers), and the estimate
    describes vlmtune's run. A block neither covers keeps every activation.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from vlmtune.model.checkpointing import transformer_blocks

    wrapped = {
        name for name, module in model.named_modules() if isinstance(module, GradientCheckpointingLayer)
    }
    return frozenset(wrapped | {name for name, _ in transformer_blocks(model, family)})


# --- layers from Linear names ----------------------------------------------------------------------

_LAYER = re.compile(r"^(.*\.\d+)\.")


def layer_of(name: str) -> str | None:
    """model.language_model.layers.3.self_attn.q_proj -> model.language_model.layers.3."""
    match = _LAYER.match(name)
    return match.group(1) if match else None


def _matches(name: str, suffixes: tuple[str, ...]) -> int | None:
    return next((i for i, suffix in enumerate(suffixes) if ends_with(name, suffix)), None)


def group_layers(
    linears: Iterable[Linear], family: Family, checkpointable: Collection[str] | None = None
) -> tuple[Layer, ...]:
    """Transformer blocks of the vision and language towers, from the family's Linear names.

    ``checkpointable``: the blocks gradient checkpointing reaches (``checkpointable_blocks``); None: all.
    """
    names = {
        "vision": (family.vision_attention, family.vision_mlp),
        "language": (family.language_attention, family.language_mlp),
    }
    blocks: dict[str, tuple[str, dict[int, Linear], dict[int, Linear]]] = {}
    for lin in linears:
        if lin.component not in names:
            continue
        key = layer_of(lin.name)
        if key is None:
            continue
        attention_names, mlp_names = names[lin.component]
        _, attention, mlp = blocks.setdefault(key, (lin.component, {}, {}))
        i = _matches(lin.name, attention_names)
        if i is not None:
            attention[i] = lin
            continue
        i = _matches(lin.name, mlp_names)
        if i is not None:
            mlp[i] = lin
    layers = []
    for key, (component, attention, mlp) in blocks.items():
        if not attention and not mlp:
            continue
        width, elems = layer_activation_elems(
            [attention[i] for i in sorted(attention)], [mlp[i] for i in sorted(mlp)]
        )
        layers.append(Layer(key, component, width, elems, checkpointable is None or key in checkpointable))
    return tuple(layers)


def layer_activation_elems(attention: list[Linear], mlp: list[Linear]) -> tuple[int, int]:
    """(input width, 16-bit elements saved per token) of one transformer block.

    The Family lists each tower's attention and MLP Linear names with the output projection last
    (o_proj, out_proj, attn.proj) and the down projection last (down_proj, fc2). Per token:
      attention: norm (fp32 input) + block input + q/k/v outputs + attention output + its copy
                 entering the output projection;
      MLP:       norm + input + first-stage outputs (gate/up or fc1) + activation output
                 (+ the gate*up product for gated MLPs).
    Fused attention kernels (sdpa/flash) keep no seq x seq matrix, so there is no quadratic term.
    """
    width = (attention or mlp)[0].in_features
    elems = 0
    if attention:
        qkv, out = attention[:-1] or attention, attention[-1]
        elems += NORM_ELEMS * width + width + sum(x.out_features for x in qkv) + 2 * out.in_features
    if mlp:
        first, down = mlp[:-1] or mlp, mlp[-1]
        hidden = first[0].in_features
        gated = 2 if len(first) >= 2 else 1
        elems += NORM_ELEMS * hidden + hidden + sum(x.out_features for x in first) + gated * down.in_features
    return width, elems
