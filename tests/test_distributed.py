"""Distributed launches on CPU (gloo): torchrun, accelerate launch, two nodes on loopback, DDP and FSDP.

Every launch runs a tiny Qwen2-VL for a few steps on four samples, one with an image and three
without, so that every epoch has a step where one rank's batch is text-only while the other's
has the image (vision LoRA on): the case that hangs DDP without unused-parameter detection and
aborts FSDP without the blank-image guard. The recipe's collective timeout is 60 s and every
subprocess has a timeout, so a hang fails the test instead of blocking CI.

Tolerances: in float32 two ranks x batch 1 and one rank x batch 2 differ only in the order of
the gradient sums: 1e-5 on the loss (the spike measured under 1e-6), 1e-4 on final weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import spawn

from conftest import PIXEL_BUDGET, RED, ROOT, assistant, user, write_recipe

pytestmark = pytest.mark.slow

LAUNCH_TIMEOUT = 240  # seconds for one launch; the recipe's collective timeout (60 s) fails a hang sooner
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


# --- data, recipes, launches ---------------------------------------------------------------------


def mixed_data(folder: Path) -> Path:
    """One sample with an image, three text-only ones of different lengths."""
    rows = [
        {"messages": [user("What colour is it?", 1), assistant("Red.")], "images": [str(RED)]},
        {"messages": [user("Say hello."), assistant("Hello.")]},
        {"messages": [user("Count to three."), assistant("One, two, three.")]},
        {
            "messages": [
                user("Name a colour and a shape."),
                assistant("A blue square, and then a red circle."),
            ]
        },
    ]
    for row in rows:  # the conftest helpers write {"type": "image"} parts; the image path goes on the part
        images = row.pop("images", [])
        for part in row["messages"][0]["content"]:
            if part["type"] == "image":
                part["image"] = images.pop(0)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def recipe(folder: Path, *, model: dict | None = None, quantization: dict | None = None, lora: dict | None = None,
           train: dict | None = None, distributed: dict | None = None) -> Path:  # fmt: skip
    """A float32 LoRA recipe (vision and language) over the mixed data, 4 steps of batch 1."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl", "dtype": "float32", **(model or {})},
        quantization=quantization or {"bits": None},
        lora=lora or {"finetune_vision_layers": True, "finetune_language_layers": True},
        data={"train": str(mixed_data(folder)), "max_image_pixels": PIXEL_BUDGET},
        train={
            "max_steps": 4, "batch_size": 1, "grad_accum": 1, "lr": 1e-3, "lr_scheduler": "constant",
            "max_length": 256, "gradient_checkpointing": False, "save_steps": 2, "logging_steps": 1,
            "distributed": {"timeout": 60, **(distributed or {})}, **(train or {}),
        },
        output={"dir": "runs"},
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def run_command(command: list[str], timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    return spawn.run(command, cwd=ROOT, capture_output=True, text=True, env=launch_env(), timeout=timeout)


def torchrun(*train_args: str | Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m vlmtune train ARGS` on loopback."""
    return run_command([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "vlmtune", "train", *map(str, train_args),
    ])  # fmt: skip


def single(recipe_path: Path) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "vlmtune", "train", str(recipe_path)])


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])


def the_run_folder(recipe_path: Path) -> Path:
    """The one run folder a launch wrote (asserting that it wrote exactly one)."""
    folders = sorted((recipe_path.parent / "runs").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "3-train" / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def assert_same_losses(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < LOSS_TOLERANCE, (a, b)


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- DDP: torchrun, two ranks, LoRA on both towers -----------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    path = recipe(tmp_path_factory.mktemp("ddp"))
    result = torchrun(path)
    succeeded(result)
    return the_run_folder(path), result


def test_two_ranks_write_one_run_folder_once(ddp_run):
    run, result = ddp_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done"
    assert summary["distributed"] == {
        "world_size": 2, "nodes": 1, "strategy": "ddp", "batch_size_per_device": 1, "grad_accum": 1,
        "effective_batch": 2,
    }  # fmt: skip
    assert (run / "3-train" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "3-train" / "model").exists()
    # Rank 1 wrote no metrics row, printed nothing, and the data was reported once.
    steps = [
        json.loads(line)["step"] for line in (run / "3-train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    assert result.stdout.count("effective batch 2 = batch_size 1 x grad_accum 1 x 2 ranks") == 1
    assert result.stdout.count("done in") == 1
    assert result.stdout.count("  loss ") == 1 and result.stdout.count("curves:") == 1, "rank 1's summary too"
    assert result.stderr.count("reducer.cpp") <= 1, "torch's DDP note once, from rank 0, not once per rank"
    report = json.loads((run / "3-train" / "data_report.json").read_text())["train"]
    assert report["samples_kept"] == 4 and report["text_only_samples"] == 3
    # The checkpoints hold each rank's RNG state (a resume needs both).
    for step in (2, 4):
        checkpoint = run / "3-train" / "checkpoints" / f"checkpoint-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


def test_vision_lora_trains_with_text_only_batches_on_one_rank(ddp_run):
    run, _ = ddp_run
    adapter = tensors(run / "3-train" / "adapter" / "adapter_model.safetensors")
    vision = [name for name in adapter if ".visual.blocks." in name and "lora_B" in name]
    language = [name for name in adapter if ".language_model.layers." in name and "lora_B" in name]
    assert vision and language
    # lora_B starts at zero: a non-zero one has been trained.
    assert all(adapter[name].abs().sum() > 0 for name in vision + language)


def test_two_ranks_of_batch_one_match_one_rank_of_batch_two(ddp_run, tmp_path: Path):
    run, _ = ddp_run
    path = recipe(tmp_path, train={"batch_size": 2})
    succeeded(single(path))
    one = the_run_folder(path)
    assert json.loads((one / "summary.json").read_text())["distributed"]["world_size"] == 1
    assert_same_losses(losses(run), losses(one))
    a = tensors(run / "3-train" / "adapter" / "adapter_model.safetensors")
    b = tensors(one / "3-train" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHT_TOLERANCE


def test_accelerate_launch_trains_like_torchrun(ddp_run, tmp_path: Path):
    """`accelerate launch --multi_gpu` starts the same kind of processes; without GPUs they train on CPU."""
    run, _ = ddp_run
    path = recipe(tmp_path)
    result = run_command([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "vlmtune", "train", str(path),
    ])  # fmt: skip
    succeeded(result)
    accelerated = the_run_folder(path)
    assert json.loads((accelerated / "summary.json").read_text())["distributed"]["world_size"] == 2
    assert_same_losses(losses(run), losses(accelerated))


def test_two_nodes_on_loopback_write_one_run_folder(ddp_run, tmp_path: Path):
    run, _ = ddp_run
    path = recipe(tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        spawn.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "two-nodes",
                "-m",
                "vlmtune",
                "train",
                str(path),
            ],
            cwd=ROOT,
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-4000:] for _, err in outputs]
    two_nodes = the_run_folder(path)
    figures = json.loads((two_nodes / "summary.json").read_text())["distributed"]
    assert figures["world_size"] == 2 and figures["nodes"] == 2
    assert (two_nodes / "3-train" / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_losses(losses(run), losses(two_nodes))


def stopped_after_step_two(run: Path, copy: Path, output: str = "adapter") -> Path:
    """A copy of a finished run as it was when stopped after its step-2 checkpoint."""
    shutil.copytree(run, copy)
    for later in (copy / "3-train" / "checkpoints").glob("checkpoint-*"):
        if int(later.name.removeprefix("checkpoint-")) > 2:
            shutil.rmtree(later)
    shutil.rmtree(copy / "3-train" / output)
    metrics = copy / "3-train" / "metrics.jsonl"
    rows = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2]
    metrics.write_text("".join(row + "\n" for row in rows))
    summary = json.loads((copy / "summary.json").read_text())
    summary["status"] = summary["stages"]["train"]["status"] = "interrupted"
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def test_a_two_rank_run_resumes_under_the_same_launch(ddp_run, tmp_path: Path):
    run, _ = ddp_run
    stopped = stopped_after_step_two(run, tmp_path / run.name)
    result = torchrun("--resume", stopped)
    succeeded(result)
    assert json.loads((stopped / "summary.json").read_text())["status"] == "done"
    assert (stopped / "3-train" / "adapter" / "adapter_model.safetensors").is_file()
    # Steps 3 and 4 trained again from the checkpoint, each rank from its own RNG state: as before.
    assert_same_losses(losses(run), losses(stopped))


def test_a_user_error_on_rank_zero_stops_every_rank_with_its_message(tmp_path: Path):
    path = recipe(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    result = torchrun(path, "--run-dir", str(taken))
    assert result.returncode != 0
    # An existing --run-dir is refused before any process group (vlmtune validate's checks, run by every
    # rank on its own): the first rank to refuse ends the launch, so one or both print it, none waits.
    assert result.stderr.count("already exists; vlmtune never overwrites a run") >= 1, result.stderr[-3000:]
    assert "Timed out" not in result.stderr


# --- FSDP on CPU ---------------------------------------------------------------------------------


FULL = {"quantization": {"bits": None}, "lora": {"method": "full"}}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """FSDP2 full fine-tuning over two ranks (the blank-image guard keeps the vision tower in step)."""
    path = recipe(tmp_path_factory.mktemp("fsdp"), **FULL, distributed={"strategy": "fsdp"})
    result = torchrun(path)
    succeeded(result)
    assert "2 ranks (fsdp)" in result.stdout
    return the_run_folder(path)


def test_fsdp_full_finetuning_matches_one_process(fsdp_run: Path, tmp_path: Path):
    unsharded = recipe(tmp_path, **FULL, train={"batch_size": 2})
    succeeded(single(unsharded))
    one = the_run_folder(unsharded)
    assert json.loads((fsdp_run / "summary.json").read_text())["distributed"]["strategy"] == "fsdp"
    assert_same_losses(losses(fsdp_run), losses(one))
    # The final model is whole (gathered from both shards), written once, equal to the one-process model.
    sharded_model = tensors(fsdp_run / "3-train" / "model" / "model.safetensors")
    one_model = tensors(one / "3-train" / "model" / "model.safetensors")
    assert sharded_model.keys() == one_model.keys()
    assert all(sharded_model[k].shape == one_model[k].shape for k in one_model)
    assert max(float((sharded_model[k] - one_model[k]).abs().max()) for k in one_model) < WEIGHT_TOLERANCE


def test_fsdp_resumes_from_its_sharded_checkpoint(fsdp_run: Path, tmp_path: Path):
    checkpoint = fsdp_run / "3-train" / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # a shard per rank
    stopped = stopped_after_step_two(fsdp_run, tmp_path / fsdp_run.name, output="model")
    succeeded(torchrun("--resume", stopped))
    assert (stopped / "3-train" / "model" / "model.safetensors").is_file()
    assert_same_losses(losses(fsdp_run), losses(stopped))


def test_fsdp_qlora_trains_with_16bit_storage(tmp_path: Path):
    """QLoRA under FSDP: the 4-bit weights stored as bfloat16 (checked at load), adapters trained on both towers."""
    path = recipe(
        tmp_path, model={"dtype": "bfloat16"}, quantization={"bits": 4}, distributed={"strategy": "fsdp"}
    )
    succeeded(torchrun(path))
    run = the_run_folder(path)
    assert json.loads((run / "summary.json").read_text())["distributed"]["strategy"] == "fsdp"
    report = json.loads((run / "1-load" / "model_report.json").read_text())
    assert report["components"]["language"]["quantized_linears"] > 0
    adapter = tensors(run / "3-train" / "adapter" / "adapter_model.safetensors")
    trained = [name for name in adapter if "lora_B" in name]
    assert any(".visual." in name for name in trained) and any(".language_model." in name for name in trained)
    assert all(adapter[name].abs().sum() > 0 for name in trained)
    assert all(x == x and x < 20 for x in losses(run))  # finite and sane


def test_a_killed_rank_is_a_message_naming_the_cause_and_the_torchrun_resume(tmp_path: Path):
    """kill -9 of rank 1 at step 2: rank 0 does not print gloo's raw "Connection reset by peer"
    traceback but says another rank stopped, and how to resume every rank together (with torchrun)."""
    path = recipe(tmp_path)
    run = tmp_path / "run"
    result = run_command([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(ROOT / "tests/faults.py"), "SIGKILL@step:2@rank:1", "--", "train", str(path), "--run-dir", str(run),
    ])  # fmt: skip
    assert result.returncode != 0
    assert "error: rank 0 of 2 lost contact with the other ranks" in result.stderr, result.stderr[-4000:]
    assert f"resume every rank together: torchrun --nproc-per-node 2 -m vlmtune train --resume {run}" in (
        result.stderr
    )
    lines = result.stderr.splitlines()
    assert not [
        line for line in lines if line.startswith(("RuntimeError", "torch.distributed.DistBackendError"))
    ]
    assert result.stderr.count("Traceback (most recent call last)") <= 1, "at most torchrun's own summary"
    state = json.loads((run / "summary.json").read_text())
    assert state["status"] == "failed" and "lost contact" in state["stages"]["train"]["error"]
