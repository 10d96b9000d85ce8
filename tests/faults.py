"""Run the vlmtune CLI with one fault injected at an exact point: a signal, a full disk, a pause.

    python tests/faults.py FAULT@WHERE -- train recipe.yaml --run-dir RUN

FAULT: SIGINT, SIGTERM, SIGHUP, SIGKILL (the process signals itself), ENOSPC (an OSError as from a full
disk), PAUSE (sleep 120 s, to hold the run's lock while another process tries it), SLOW (a deliberately
slow step: each micro-batch of step N+1 sleeps 3 s after printing "slow step", for a signal sent from
outside in mid-step), GROW (a slow divergence: from step N+1 on, the trainable weights are multiplied
by 5 before each step; no single step blows up, no number goes non-finite).
WHERE:
  step:N          before the first micro-batch of step N+1 (steps 1..N and their checkpoints are done)
  save:N:FILE     as the Trainer writes FILE into checkpoint-N (the files before it are on disk)
  load            as the load stage starts loading the model
  final           as the final adapter is saved (after the last checkpoint)
  eval            as the eval stage (train.eval_generate) starts
  export          as `vlmtune export` checks the adapter it copied (its folder half written)
  write:NAME      as vlmtune writes the run folder's file NAME (e.g. recipe.yaml), atomically

Under torchrun (`python -m torch.distributed.run ... tests/faults.py FAULT@WHERE@rank:R -- train ...`) a
fault given with @rank:R fires in that rank only.

Real signals, delivered to the real CLI in its own process: only the moment is chosen here, so a test
that kills "at step 3" kills at step 3 on any machine, however slow.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time


def fire(fault: str, filename: str | None = None) -> None:
    if fault == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    if fault == "PAUSE":
        print("paused", file=sys.stderr, flush=True)
        time.sleep(120)
        return
    if fault == "SLOW":
        print("slow step", file=sys.stderr, flush=True)
        time.sleep(3)
        return
    os.kill(os.getpid(), getattr(signal, fault))
    if fault in ("SIGTERM", "SIGHUP"):
        return  # in the training loop they only ask for a stop at the step's end; elsewhere they raised
    time.sleep(5)  # SIGINT raises in the handler before this returns; SIGKILL never returns


def install(fault: str, where: str) -> None:
    kind, _, rest = where.partition(":")
    if kind == "step":
        # the mixin's training_step: every objective's trainer (sft, dpo, grpo) goes through it
        from vlmtune.training.reliable_trainer import ReliableTrainerMixin

        step, original = int(rest), ReliableTrainerMixin.training_step
        grown = set()

        def training_step(self, *args, **kwargs):
            if fault == "GROW":
                if self.state.global_step >= step and self.state.global_step not in grown:
                    grown.add(self.state.global_step)
                    import torch

                    with torch.no_grad():
                        for p in self.model.parameters():
                            if p.requires_grad:
                                p.mul_(5)
            elif self.state.global_step == step and (fault == "SLOW" or not grown):
                grown.add(step)  # a signal once, not at each micro-batch: a second SIGTERM means "stop now"
                fire(fault)
            return original(self, *args, **kwargs)

        ReliableTrainerMixin.training_step = training_step
    elif kind == "write":
        from vlmtune.runs import rundir

        original_write = rundir.write_text_atomic

        def write_text_atomic(path, text):
            if os.fspath(path).endswith(rest):
                fire(fault, os.fspath(path))
            return original_write(path, text)

        rundir.write_text_atomic = write_text_atomic
    elif kind == "save":
        import torch

        step, _, name = rest.partition(":")
        target, original_save = os.path.join(f"checkpoint-{step}", name), torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, str | os.PathLike) and os.fspath(f).endswith(target):
                fire(fault, os.fspath(f))
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        module, name = {
            "load": ("vlmtune.stages.load", "load"),
            "final": ("vlmtune.stages.common", "save_final"),  # run_trainer saves every objective's weights
            "eval": ("vlmtune.after.evaluate", "after_training"),
            "export": ("vlmtune.after.export", "check_adapter"),
        }[kind]
        import importlib

        owner = importlib.import_module(module)
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            fire(fault)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)


def main() -> None:
    separator = sys.argv.index("--")
    for spec in sys.argv[1:separator]:
        fault, _, where = spec.partition("@")
        where, _, rank = where.partition("@rank:")  # FAULT@WHERE@rank:R: only that rank of a torchrun launch
        if not rank or os.environ.get("RANK", "0") == rank:
            install(fault, where)
    sys.argv = ["vlmtune", *sys.argv[separator + 1 :]]
    from vlmtune.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
