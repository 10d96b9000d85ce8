"""The reliability pieces one by one, in process: checkpoint completeness, the run lock, deferred
signals, torn and damaged files, the seeded data order, the non-finite guard's verdicts.
(tests/test_resume.py drives them together through the CLI.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import spawn

from vlmtune.errors import RunDirError
from vlmtune.runs import rundir, runlock, signals, trainer_checkpoints
from vlmtune.runs.rundir import RunDir


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder with the kinds of file the Trainer writes: torch zip, JSON, safetensors."""
    import torch
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"lora_A": torch.zeros(4, 8)}, path / "adapter_model.safetensors")
    if complete:
        trainer_checkpoints.mark_complete(path)
    return path


def test_a_checkpoint_counts_only_once_marked_and_whole(tmp_path: Path):
    good = fake_checkpoint(tmp_path, 2)
    assert trainer_checkpoints.problem(good) is None
    marker = json.loads((good / rundir.CHECKPOINT_MARKER).read_text())
    assert marker["step"] == 2 and set(marker["files"]) >= {"optimizer.pt", "trainer_state.json"}

    partial = fake_checkpoint(tmp_path, 4, complete=False)
    assert trainer_checkpoints.problem(partial) == (
        "incomplete: its save was interrupted (no completion marker)",
        False,
    )
    choice = trainer_checkpoints.choose(tmp_path)
    assert choice.chosen.step == 2 and [s.path.name for s in choice.skipped] == ["checkpoint-4"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "scheduler.pt").write_bytes(b""), "scheduler.pt is 0 bytes; it had"),
        (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda p: _flip(p / "optimizer.pt"), "optimizer.pt is damaged"),
        (lambda p: _flip(p / "trainer_state.json", at=0), "trainer_state.json is damaged"),
        (lambda p: _flip(p / "adapter_model.safetensors", at=4), "adapter_model.safetensors is damaged"),
        (lambda p: (p / rundir.CHECKPOINT_MARKER).write_text("{"), "completion marker"),
    ],
)
def test_a_damaged_checkpoint_file_is_named(tmp_path: Path, damage, reason: str):
    path = fake_checkpoint(tmp_path, 6)
    damage(path)
    found, damaged = trainer_checkpoints.problem(path)
    assert reason in found and damaged


def _flip(path: Path, at: int | None = None) -> None:
    """Same size, different bytes: only a content check can tell."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if at is None else at
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    path.write_bytes(bytes(data))


def test_rotation_keeps_the_newest_complete_checkpoints_and_drops_partial_ones(tmp_path: Path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, complete=False)  # an interrupted save never pushes a good one out
    trainer_checkpoints.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    trainer_checkpoints.rotate(tmp_path, keep=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_the_lock_refuses_a_second_holder_and_is_free_once_released(tmp_path: Path):
    with runlock.hold(tmp_path):
        with pytest.raises(runlock.RunInUse) as refused, runlock.hold(tmp_path):
            pass
        assert f"in use by process {os.getpid()}" in str(refused.value)
    with runlock.hold(tmp_path):  # released on leaving (and by the kernel when a process dies)
        pass


def test_a_signal_during_a_status_write_waits_for_the_write(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    run.init_summary("r")
    with signals.stop_on_signals():
        with pytest.raises(signals.Interrupted) as stopped, signals.deferred():
            signal.raise_signal(signal.SIGTERM)
            run.set_status("interrupted")  # not cut short by the signal
        assert stopped.value.exit_code == 143 and stopped.value.name == "SIGTERM"
    assert run.summary()["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the previous handler is back"


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_named(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    (run / rundir.METRICS).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [row["step"] for row in run.read_jsonl(rundir.METRICS)] == [1, 2]
    (run / rundir.COMPLETIONS).write_text('{"step": 1, "completion": "a"}\n{"step": 2, "completion": "b"}\n')
    run.keep_logs_until(1)  # a resume from step 1: grpo's completions of step 2 are written again too
    assert (run / rundir.METRICS).read_text() == '{"step": 1, "loss": 2.0}\n'
    assert (run / rundir.COMPLETIONS).read_text() == '{"step": 1, "completion": "a"}\n'
    (run / rundir.METRICS).write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunDirError, match="line 2 is not JSON"):
        run.read_jsonl(rundir.METRICS)


def test_a_full_disk_still_lets_summary_json_say_what_happened(tmp_path: Path, monkeypatch):
    run = RunDir.create(tmp_path, "r")
    run.init_summary("r")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    run.set_status("failed", error="no space left on the device")
    assert run.summary()["status"] == "failed"


def test_the_length_grouped_order_depends_on_seed_and_epoch_only():
    import torch

    from vlmtune.training.reliable_trainer import EpochSeededLengthSampler

    lengths = [5, 50, 7, 70, 9, 90, 11, 110, 13, 130, 15, 150]
    sampler = EpochSeededLengthSampler(4, lengths, seed=3407)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global RNG (dropout, ...) has moved: the order has not
    assert list(sampler) == first and sorted(first) == list(range(12))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_grpo_prompt_order_depends_on_seed_and_epoch_only():
    """TRL's RepeatSampler advances one generator epoch after epoch, so a fresh sampler (a resumed
    run's) would draw the first epoch's order in any later epoch; reseeded per epoch it draws that
    epoch's order however many epochs came before in this process."""
    from trl.trainer.utils import RepeatSampler

    from vlmtune.training.reliable_trainer import EpochSeededSampler

    def sampler():
        repeats = RepeatSampler(list(range(6)), mini_repeat_count=2, batch_size=2, seed=3407)
        return EpochSeededSampler(repeats, seed=3407)

    uninterrupted = sampler()
    epochs = []
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        epochs.append(list(uninterrupted))
    assert epochs[0][:4] == [epochs[0][0]] * 2 + [epochs[0][2]] * 2, "each prompt once per generation"
    assert len({tuple(order) for order in epochs}) == 3, "a new order each epoch"
    resumed = sampler()
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2] and len(resumed) == len(epochs[2])


def test_the_likely_cause_of_a_divergence():
    from vlmtune.training.finite import likely_cause

    assert "before any update" in likely_cause(1, 1e-4, "bfloat16", False)
    assert "train.lr 1e+09 is far above" in likely_cause(5, 1e9, "bfloat16", False)
    assert "float16 overflow" in likely_cause(5, 1e-4, "float16", False)
    assert "skipped 10 steps in a row" in likely_cause(5, 1e-4, "float16", True)
    assert "lower train.lr or add train.warmup_steps" in likely_cause(5, 1e-4, "bfloat16", False)


def test_the_guard_stops_before_the_optimizer_applies_a_non_finite_gradient(tmp_path: Path):
    import torch

    from vlmtune.training.finite import NonFiniteGuard, TrainingDiverged

    class State:
        global_step = 3

    model = torch.nn.Linear(4, 4)
    model.weight.grad = torch.ones(4, 4)
    guard = NonFiniteGuard(lr=1e-4, dtype="bfloat16", loss_scaled=False, checkpoints=tmp_path)
    guard.observe_loss(torch.tensor(2.0))
    guard.on_pre_optimizer_step(None, State(), None, model=model)  # finite: no word

    model.weight.grad[0, 0] = float("inf")
    guard.observe_loss(torch.tensor(2.0))
    with pytest.raises(TrainingDiverged) as diverged:
        guard.on_pre_optimizer_step(None, State(), None, model=model)
    assert (
        diverged.value.figures["diverged_at_step"] == 4 and diverged.value.figures["non_finite"] == "gradient"
    )
    assert "no checkpoint was saved before it" in str(diverged.value)

    fake_checkpoint(tmp_path, 3)
    guard.observe_loss(torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="the loss is nan .* checkpoint-3, is kept"):
        guard.on_pre_optimizer_step(None, State(), None, model=model)

    scaled = NonFiniteGuard(lr=1e-4, dtype="float16", loss_scaled=True, checkpoints=tmp_path)
    for _ in range(10):  # float16's loss scaler skips these steps itself
        scaled.on_pre_optimizer_step(None, State(), None, model=model)
    with pytest.raises(TrainingDiverged, match="loss scaler skipped 10 steps in a row"):
        scaled.on_pre_optimizer_step(None, State(), None, model=model)


def test_recipe_differences_are_dotted_keys():
    from vlmtune.runs.resuming import differences

    before = {"lora": {"r": 16, "alpha": 16}, "data": {"columns": {"image": "image"}}}
    after = {"lora": {"r": 32, "alpha": 16}, "data": {"columns": {"image": "img"}}}
    assert differences(before, after) == {
        "data.columns": ({"image": "image"}, {"image": "img"}),
        "lora.r": (16, 32),
    }


def tiny_lora(target: str, r: int = 2):
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)
            self.v = torch.nn.Linear(8, 8)

    return get_peft_model(Net(), LoraConfig(r=r, target_modules=[target]))


@pytest.mark.parametrize(
    "saved, message",
    [
        (lambda: tiny_lora("v"), "does not fit this model: 2 unexpected and 2 missing LoRA weights"),
        (lambda: tiny_lora("q", r=4), "cannot read adapter_model.safetensors of checkpoint"),  # other shapes
        (None, "cannot read adapter_model.safetensors of checkpoint"),  # a 0-byte file
    ],
)
def test_a_checkpoint_adapter_that_cannot_go_into_the_model_is_a_message(tmp_path: Path, saved, message):
    """The resume's in-place reload of a checkpoint's adapter refuses, naming the checkpoint, an adapter
    of other modules or shapes, or a file it cannot read (not a size-mismatch traceback)."""
    from types import SimpleNamespace

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from vlmtune.runs.trainer_checkpoints import CheckpointError
    from vlmtune.training.reliable_trainer import ReliableTrainerMixin

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    file = checkpoint / rundir.PEFT_WEIGHTS
    if saved is None:
        file.write_bytes(b"")
    else:
        save_file(get_peft_model_state_dict(saved()), str(file))
    live = tiny_lora("q")
    before = {name: p.clone() for name, p in live.named_parameters()}
    with pytest.raises(CheckpointError, match=message) as refusal:
        ReliableTrainerMixin._load_adapter_in_place(SimpleNamespace(model=live), checkpoint)
    assert str(checkpoint) in str(refusal.value) and refusal.value.hint
    if saved is not None and "does not fit" in message:
        assert all(p.equal(before[name]) for name, p in live.named_parameters()), "nothing loaded"


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_lock_that_is_not_a_plain_file_is_refused_and_its_target_untouched(tmp_path: Path, kind: str):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    if kind == "symlink":
        (run / rundir.LOCK).symlink_to(target)
    else:
        (run / rundir.LOCK).mkdir()
    with pytest.raises(RunDirError, match=r"\.lock is not a plain file") as refused, runlock.hold(run):
        pass
    assert refused.value.hint.startswith("remove ")
    assert target.read_text() == "keep me", "the link's target was not truncated"


def test_set_with_a_mapping_merges_into_the_section():
    """`--set 'train={max_steps: 2}'` used to replace the whole section: batch size and lr fell back to
    their defaults without a word."""
    import yaml

    from conftest import ROOT
    from test_cli import vlmtune

    result = vlmtune("validate", str(ROOT / "recipes/demo.yaml"), "--set", "train={max_steps: 2, lr: 1e-3}")
    assert result.returncode == 0, result.stderr
    train = yaml.safe_load(result.stdout.split("Resolved recipe:", 1)[1])["train"]
    assert (train["max_steps"], train["lr"], train["batch_size"], train["lr_scheduler"]) == (
        2, 1e-3, 4, "constant"), "the demo's other train keys kept"  # fmt: skip
    result = vlmtune("validate", str(ROOT / "recipes/demo.yaml"), "--set", "train.lr=1e9")
    assert result.returncode == 0 and "warning: train.lr 1e+09 is far above any sensible learning rate" in (
        result.stdout
    )


def test_recipe_warnings_name_absurd_learning_rates():
    from vlmtune.recipe import parse_recipe, recipe_warnings

    def warned(lr: float) -> list[str]:
        return recipe_warnings(
            parse_recipe(f"model: {{name: tiny:qwen2_vl}}\ndata: {{train: x.jsonl}}\ntrain: {{lr: {lr}}}\n")
        )

    assert warned(2e-4) == [] and warned(5e-3) == []
    assert (
        "far above any sensible learning rate" in warned(1e9)[0] and "diverge or collapse" in warned(1.0)[0]
    )
    assert "far below" in warned(1e-12)[0]


@pytest.mark.parametrize("file", ["recipe.yaml", "summary.json"])
def test_a_full_disk_before_the_first_summary_is_a_message_and_leaves_no_half_run(tmp_path: Path, file: str):
    import sys

    from conftest import ROOT

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    result = spawn.run(
        [sys.executable, str(ROOT / "tests/faults.py"), f"ENOSPC@write:{file}", "--", "train",
         str(ROOT / "recipes/demo.yaml"), "--run-dir", str(run)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"no space left on the device of {run}" in result.stderr
    assert "the new run folder is removed" in result.stderr and "run the same command again" in result.stderr
    assert not run.exists()


def test_the_resume_command_of_a_launch_names_torchrun_and_a_lost_rank_is_a_message(monkeypatch):
    from vlmtune import distributed, pipeline

    run = RunDir(Path("/runs/demo"))
    assert pipeline.resume_command(run, distributed.ranks()) == "vlmtune train --resume /runs/demo"
    for name, value in {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert pipeline.resume_command(run, distributed.ranks()) == (
        "torchrun --nnodes 2 --nproc-per-node 2 -m vlmtune train --resume /runs/demo"
    )
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:42172: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")  # fmt: skip
    lost = distributed.lost_peer(gloo, "RESUME")
    assert isinstance(lost, distributed.RankLost) and lost.exit_code == 2
    assert str(lost).startswith("rank 1 of 4 lost contact with the other ranks (RuntimeError: [gloo")
    assert "Connection reset by peer)" in str(lost) and lost.hint.endswith("RESUME")
    assert distributed.lost_peer(ValueError("a bug of ours"), "RESUME") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.lost_peer(gloo, "RESUME") is None, "one process: no rank to lose"


@pytest.fixture
def terminal_signals():
    """The dispositions a process started from a shell has: an xdist worker starts with SIGINT ignored, which
    stop_on_signals rightly leaves alone (as for a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_the_shell_told_us_to_ignore_stays_ignored():
    """A background job's SIGINT (or SIGHUP under nohup) is SIG_IGN when the process starts: no handler replaces
    it, the others still stop the run, and the disposition is restored on the way out."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # ignored
            with pytest.raises(signals.Interrupted) as stopped:
                signal.raise_signal(signal.SIGTERM)
            assert stopped.value.exit_code == 143
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sighup_and_sigterm_ask_for_a_stop_inside_the_training_loop_only(terminal_signals):
    with signals.stop_on_signals():
        with pytest.raises(signals.Interrupted) as outside:
            signal.raise_signal(signal.SIGHUP)
        assert outside.value.exit_code == 129
        with signals.graceful():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a repeat (torchrun forwarding it) changes nothing
            assert signals.stop_requested() == signal.SIGTERM
            with pytest.raises(signals.Interrupted) as saved:
                signals.stop_now(signal.SIGTERM, saved_step=3)
            assert saved.value.saved_step == 3 and saved.value.seconds_to_save >= 0
            assert signals.stop_requested() is None
        with pytest.raises(signals.Interrupted), signals.graceful():
            signal.raise_signal(signal.SIGHUP)  # asked for during the final save: raised as the loop ends
        with pytest.raises(signals.Interrupted) as ctrl_c, signals.graceful():
            signal.raise_signal(signal.SIGINT)  # Ctrl-C stops at once
        assert ctrl_c.value.exit_code == 130


def test_the_completion_marker_catches_a_file_changed_in_place_with_the_same_size(tmp_path: Path):
    """Sizes and format checks pass for a JSON value rewritten with as many digits, or an RNG state
    replaced by another run's: only the content hash in the marker tells."""
    import torch

    path = fake_checkpoint(tmp_path, 2)
    marker = json.loads((path / rundir.CHECKPOINT_MARKER).read_text())
    assert set(marker["hashes"]) == set(marker["files"])
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))  # parses, same size
    assert trainer_checkpoints.problem(path) == (
        "trainer_state.json is damaged (its content changed since it was saved)",
        True,
    )
    other = fake_checkpoint(tmp_path, 4)
    torch.save({"last_epoch": 5}, other / "scheduler.pt")  # a whole, valid archive of the same size
    assert (other / "scheduler.pt").stat().st_size == marker["files"]["scheduler.pt"]
    assert "scheduler.pt is damaged (its content changed" in trainer_checkpoints.problem(other)[0]


def test_a_large_file_is_fingerprinted_from_samples_and_a_rewrite_is_caught(tmp_path: Path):
    big = tmp_path / "optimizer.pt"
    big.write_bytes(bytes(8 << 20))
    before = trainer_checkpoints.fingerprint(big)
    with big.open("r+b") as f:  # a block rewritten where a sample falls (the first block)
        f.write(b"\x01" * 1024)
    assert trainer_checkpoints.fingerprint(big) != before


def test_checkpoints_saved_after_a_collapse_are_set_aside_and_the_last_good_one_chosen(tmp_path: Path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    trainer_checkpoints.set_aside_from(tmp_path, 4, "saved after the training collapsed")
    choice = trainer_checkpoints.choose(tmp_path)
    assert choice.chosen.step == 2
    assert [(s.path.name, s.reason, s.damaged) for s in choice.skipped] == [
        ("checkpoint-6", "set aside: saved after the training collapsed", False),
        ("checkpoint-4", "set aside: saved after the training collapsed", False),
    ]
    trainer_checkpoints.rotate(tmp_path, keep=2)  # set-aside ones never count as complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


class _State:
    global_step = 0


def test_the_collapse_guard_on_zero_gradients_and_a_rising_loss(tmp_path: Path):
    import torch

    from vlmtune.training.finite import CollapseGuard, TrainingDiverged

    model = torch.nn.Linear(4, 4)
    guard = CollapseGuard(
        lr=1e-4, dtype="bfloat16", checkpoints=tmp_path, logging_steps=1, loss_positive=True
    )
    guard.on_train_begin(None, _State(), None, model=model)
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    state = _State()
    model.weight.grad, model.bias.grad = torch.zeros(4, 4), torch.zeros(4)
    with pytest.raises(TrainingDiverged) as dead:
        for step in range(2, 10):  # steps 3, 4, 5 give no gradient at all
            state.global_step = step
            guard.on_pre_optimizer_step(None, state, None, model=model)
    figures = dead.value.figures
    assert figures["collapse"] == "zero_gradient" and figures["diverged_at_step"] == 5
    assert (
        "exactly 0 for 3 steps in a row (steps 3-5) while 20 parameters are trainable" in figures["evidence"]
    )
    assert figures["last_good_checkpoint"] == "checkpoint-1", "checkpoint-2's weights gave no gradient"

    grpo = CollapseGuard(
        lr=1e-4, dtype="bfloat16", checkpoints=tmp_path, logging_steps=1, loss_positive=False
    )
    for step in range(2, 10):  # equal rewards: no gradient, nothing broken
        state.global_step = step
        grpo.on_pre_optimizer_step(None, state, None, model=model)
        grpo.on_log(None, state, None, logs={"loss": 100.0 * step})

    rising = CollapseGuard(
        lr=1e-4, dtype="bfloat16", checkpoints=tmp_path, logging_steps=1, loss_positive=True
    )
    losses = [2.0, 1.8, 1.9, 7.0, 1.5, 6.5, 6.8, 7.2]  # one spike is no divergence; three rows in a row are
    with pytest.raises(TrainingDiverged) as rose:
        for step, loss in enumerate(losses, 1):
            state.global_step = step
            rising.on_log(None, state, None, logs={"loss": loss})
    assert rose.value.figures["collapse"] == "loss_rose" and rose.value.figures["diverged_at_step"] == 8
    assert "the loss rose from 2 at the start to 6.833 (mean of the rows of steps 6-8), over 6" in str(
        rose.value
    )
