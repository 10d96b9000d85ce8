"""The launch's strategy: what a run records and checks about its ranks, and the Trainer's DDP/FSDP arguments.

The Trainer shards the batches and averages the gradients (DDP) or shards the model itself
(FSDP2); the helpers below give it the arguments for the recipe's ``train.distributed`` section
(``trainer_arguments``, ``shard_on_cpu``). Batches without an image under FSDP:
vlmtune.distributed.text_only.
"""

from __future__ import annotations

from typing import Any

from vlmtune.distributed.launch import Ranks, ranks
from vlmtune.errors import ModelError, RecipeError, RunDirError
from vlmtune.model.families import Family
from vlmtune.recipe import DistributedSection

# --- what a run records and checks --------------------------------------------------------------


def effective_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Samples per optimizer step: the recipe's batch_size is per device."""
    return batch_size * grad_accum * world_size


def strategy_of(section: DistributedSection, here: Ranks) -> str:
    """What actually runs: the recipe's strategy under a launch of several processes, else single."""
    return section.strategy if here.distributed else "single"


def summary_figures(section: DistributedSection, here: Ranks, batch_size: int, grad_accum: int) -> dict:
    """summary.json's ``distributed`` entry (a resume checks its world size)."""
    return {
        "world_size": here.world_size,
        "nodes": here.nodes,
        "strategy": strategy_of(section, here),
        "batch_size_per_device": batch_size,
        "grad_accum": grad_accum,
        "effective_batch": effective_batch(batch_size, grad_accum, here.world_size),
    }


def describe(section: DistributedSection, here: Ranks, batch_size: int, grad_accum: int) -> str:
    """One line for the console: how many ranks, which strategy, and the effective batch."""
    total = effective_batch(batch_size, grad_accum, here.world_size)
    if not here.distributed:
        return f"effective batch {total} = batch_size {batch_size} x grad_accum {grad_accum}"
    nodes = f" on {here.nodes} nodes" if here.nodes > 1 else ""
    return (
        f"{here.world_size} ranks{nodes} ({section.strategy}); effective batch {total} = batch_size "
        f"{batch_size} x grad_accum {grad_accum} x {here.world_size} ranks"
    )


def check_resume(recorded: dict | None, here: Ranks, run_path: Any) -> None:
    """A run resumes only on as many ranks as it was started with.

    The checkpoint holds one RNG state per rank (and, under FSDP, one shard per rank), and the
    world size is part of the effective batch and of which rank saw which samples: on another
    count the run would silently train on a different schedule.
    """
    started = (recorded or {}).get("world_size", 1)
    if started == here.world_size:
        return
    launch = (
        "`vlmtune train --resume ...` (one process)"
        if started == 1
        else f"`torchrun --nproc-per-node {started} -m vlmtune train --resume {run_path}` (or the same "
        f"{started} processes over several nodes)"
    )
    raise RunDirError(
        f"run {run_path} was trained on {started} rank(s) and cannot resume on {here.world_size}: its "
        "checkpoint holds per-rank state, and the effective batch and the data order depend on the rank count",
        hint=f"resume it as it was launched: {launch}; or start a new run with this launch",
    )


# Objectives that run under FSDP. TRL's DPOTrainer and GRPOTrainer shard their frozen reference (and
# gather weights for generation) only when accelerate set FSDP up before they were built; on CPU
# vlmtune switches FSDP on after (shard_on_cpu), so neither path can be tested here: refused.
FSDP_OBJECTIVES = ("sft",)


def check_objective(objective: str, section: DistributedSection, here: Ranks) -> None:
    """Refuse a strategy the objective is not run under, before any process group, folder or weight."""
    if strategy_of(section, here) == "fsdp" and objective not in FSDP_OBJECTIVES:
        raise RecipeError(
            f"train.objective {objective} does not run under FSDP in vlmtune (train.distributed.strategy: fsdp); "
            "only sft does",
            hint=f"use train.distributed.strategy: ddp for {objective} (each GPU holds the whole model), or "
            "train.objective: sft",
        )


# --- the Trainer's arguments ---------------------------------------------------------------------


def block_classes(model: Any, family: Family) -> list[str]:
    """Class names of the transformer blocks FSDP wraps, read from the model at the family's block lists."""
    modules = dict(_core(model).named_modules())
    found: dict[str, None] = {}
    for path in family.block_lists:
        for block in modules.get(path, ()):
            found[type(block).__name__] = None
    if not found:
        raise ModelError(
            f"FSDP: no transformer blocks found in this {family.title} model at {', '.join(family.block_lists)}",
            hint="use train.distributed.strategy: ddp; the family record's block_lists must name the module lists",
        )
    return list(found)


def _core(model: Any) -> Any:
    """The transformers model under a peft wrapper (its module names are the family's)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainer_arguments(section: DistributedSection, device: str, model: Any, family: Family) -> dict:
    """TrainingArguments for this launch: nothing for one process; DDP's or FSDP2's settings otherwise."""
    if not ranks().distributed:
        return {}
    args: dict[str, Any] = {
        "ddp_backend": "nccl" if device == "cuda" else "gloo",
        "ddp_timeout": section.timeout,
    }
    if section.strategy == "ddp":
        # A rank whose batch has no image leaves the vision tower (and its LoRA) without a gradient;
        # so does a layer no batch reaches (Llava's last CLIP layer). Without unused-parameter
        # detection DDP waits for those gradients forever (docs/distributed.md has the measurement).
        args["ddp_find_unused_parameters"] = True
        return args
    version = fsdp_version()
    args["fsdp"] = True
    args["fsdp_config"] = {
        "version": version,
        "transformer_layer_cls_to_wrap": block_classes(model, family),  # each block one unit
        # Full shard: a unit's parameters are freed again after its forward (FSDP1 names the strategy).
        "reshard_after_forward": True if version == 2 else "FULL_SHARD",
        # save_pretrained gets whole tensors (gathered to rank 0), so the adapter or model folder is
        # the same as a single-GPU run's; the checkpoints stay sharded (one file per rank).
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    return args


def fsdp_version() -> int:
    """FSDP2 (per-parameter sharding, torch >= 2.6) where the installed torch has it, else FSDP1."""
    import torch.distributed.fsdp as fsdp

    return 2 if hasattr(fsdp, "fully_shard") else 1


def shard_on_cpu(trainer: Any) -> None:
    """Make FSDP on CPU really FSDP.

    accelerate turns FSDP on only for GPU-like devices: on CPU (gloo) the Trainer's fsdp option
    silently runs plain DDP. torch's FSDP2 works on CPU, so the accelerator is switched to FSDP as
    accelerate switches it on GPUs, before train() prepares the model. The tests use it to run
    the same FSDP code path a GPU run takes; on GPUs accelerate has already done this.
    """
    args = trainer.args
    if args.fsdp_plugin_args is None or not args.use_cpu:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def full_state_dict(trainer: Any) -> dict | None:
    """Under FSDP, the whole model's tensors for save_pretrained (a collective: every rank calls it)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)
