"""Ranks under torchrun or `accelerate launch`: who this process is, what the ranks agree on, DDP/FSDP.

``launch`` is this process's place and its process group (rank 0 writes, the others receive what it
decided); ``strategy`` what a run records about its ranks and the Trainer's DDP/FSDP arguments;
``text_only`` the blank image that keeps FSDP ranks in step. Callers use ``distributed.X``.
"""

from vlmtune.distributed.launch import (
    RankLost,
    Ranks,
    barrier,
    finish,
    from_writer,
    local_device,
    lost_peer,
    ranks,
    session,
    start,
)
from vlmtune.distributed.strategy import (
    FSDP_OBJECTIVES,
    block_classes,
    check_objective,
    check_resume,
    describe,
    effective_batch,
    fsdp_version,
    full_state_dict,
    shard_on_cpu,
    strategy_of,
    summary_figures,
    trainer_arguments,
)

__all__ = [
    "FSDP_OBJECTIVES",
    "RankLost",
    "Ranks",
    "lost_peer",
    "barrier",
    "block_classes",
    "check_objective",
    "check_resume",
    "describe",
    "effective_batch",
    "finish",
    "from_writer",
    "fsdp_version",
    "full_state_dict",
    "local_device",
    "ranks",
    "session",
    "shard_on_cpu",
    "start",
    "strategy_of",
    "summary_figures",
    "trainer_arguments",
]
