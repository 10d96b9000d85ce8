"""The rank logic of vlmtune.distributed without launching processes: what a launch tells a process,
what the Trainer is given, what the recipe refuses, what a resume checks, who writes.

tests/test_distributed.py launches real processes (torchrun, accelerate launch, two nodes).
"""

from __future__ import annotations

import pytest

from vlmtune import distributed, pipeline
from vlmtune.distributed.text_only import TextOnlyGuard
from vlmtune.errors import ModelError, RecipeError, RunDirError, VlmtuneError
from vlmtune.model.families import FAMILIES, get_family
from vlmtune.recipe import DistributedSection, parse_recipe
from vlmtune.runs import rundir as files
from vlmtune.runs.rundir import RunDir

from conftest import PIXEL_BUDGET, TEXT_ONLY

MINIMAL = "model:\n  name: tiny:qwen2_vl\ndata:\n  train: train.jsonl\n"
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def launched(monkeypatch):
    """launched(world, rank, local_world) sets the variables torchrun sets for one process."""

    def set_launch(world: int, rank: int = 0, local_world: int | None = None) -> None:
        local_world = local_world or world
        values = (world, rank, rank % local_world, local_world)
        for name, value in zip(LAUNCH_VARIABLES, values, strict=True):
            monkeypatch.setenv(name, str(value))

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return set_launch


# --- who this process is -------------------------------------------------------------------------


def test_a_plain_process_is_a_world_of_one_that_writes(launched):
    here = distributed.ranks()
    assert (here.world_size, here.rank, here.distributed, here.writer, here.nodes) == (1, 0, False, True, 1)


def test_ranks_come_from_the_launchers_variables(launched):
    launched(4, rank=3, local_world=2)
    here = distributed.ranks()
    assert (here.world_size, here.rank, here.local_rank, here.nodes) == (4, 3, 1, 2)
    assert here.distributed and not here.writer
    assert distributed.local_device("cuda", here) == "cuda:1"  # this rank's own GPU
    assert distributed.local_device("cpu", here) == "cpu"


def test_a_malformed_launch_variable_is_a_clear_error(launched, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(VlmtuneError) as err:
        distributed.ranks()
    assert "WORLD_SIZE='two'" in err.value.message and "torchrun" in err.value.hint


def test_the_effective_batch_counts_every_rank(launched):
    launched(8, local_world=4)
    here = distributed.ranks()
    section = DistributedSection(strategy="fsdp")
    assert distributed.effective_batch(2, 4, 8) == 64
    assert distributed.describe(section, here, 2, 4) == (
        "8 ranks on 2 nodes (fsdp); effective batch 64 = batch_size 2 x grad_accum 4 x 8 ranks"
    )
    assert distributed.summary_figures(section, here, 2, 4) == {
        "world_size": 8, "nodes": 2, "strategy": "fsdp", "batch_size_per_device": 2, "grad_accum": 4,
        "effective_batch": 64,
    }  # fmt: skip


def test_one_process_records_a_single_strategy(launched):
    here = distributed.ranks()
    figures = distributed.summary_figures(DistributedSection(strategy="fsdp"), here, 2, 4)
    assert figures["strategy"] == "single" and figures["effective_batch"] == 8
    assert (
        distributed.describe(DistributedSection(), here, 2, 4)
        == "effective batch 8 = batch_size 2 x grad_accum 4"
    )


def test_outside_a_launch_from_writer_just_computes(launched):
    assert distributed.from_writer(lambda: 41 + 1) == 42
    with pytest.raises(RunDirError):
        distributed.from_writer(lambda: (_ for _ in ()).throw(RunDirError("taken", hint="pick another")))


# --- what the Trainer is given -------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_model(tiny_path):
    """meta_model(family) -> the tiny model of that family on the meta device (shapes only)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    def build(name: str):
        config = AutoConfig.from_pretrained(tiny_path(name))
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config)

    return build


def test_one_process_gets_no_distributed_arguments(launched, meta_model):
    model = meta_model("qwen2_vl")
    assert distributed.trainer_arguments(DistributedSection(), "cpu", model, get_family("qwen2_vl")) == {}


def test_ddp_finds_unused_parameters_and_keeps_the_recipes_timeout(launched, meta_model):
    launched(2)
    args = distributed.trainer_arguments(
        DistributedSection(timeout=90), "cpu", meta_model("qwen2_vl"), get_family("qwen2_vl")
    )
    assert args == {"ddp_backend": "gloo", "ddp_timeout": 90, "ddp_find_unused_parameters": True}


def test_fsdp_wraps_the_blocks_named_by_the_family_record(launched, meta_model):
    launched(2)
    args = distributed.trainer_arguments(
        DistributedSection(strategy="fsdp"), "cuda", meta_model("qwen2_vl"), get_family("qwen2_vl")
    )
    assert args["ddp_backend"] == "nccl" and "ddp_find_unused_parameters" not in args
    assert args["fsdp"] is True
    assert args["fsdp_config"]["version"] == 2 and args["fsdp_config"]["reshard_after_forward"] is True
    assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == [
        "Qwen2VLVisionBlock",
        "Qwen2VLDecoderLayer",
    ]


def test_fsdp1_where_torch_has_no_fsdp2(launched, meta_model, monkeypatch):
    launched(2)
    monkeypatch.setattr(distributed.strategy, "fsdp_version", lambda: 1)
    args = distributed.trainer_arguments(
        DistributedSection(strategy="fsdp"), "cuda", meta_model("qwen2_vl"), get_family("qwen2_vl")
    )
    assert (
        args["fsdp_config"]["version"] == 1 and args["fsdp_config"]["reshard_after_forward"] == "FULL_SHARD"
    )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_record_names_the_blocks_transformers_keeps_whole(family, meta_model):
    """The block lists find blocks in both towers; each block is, or holds, a module transformers never splits."""
    model = meta_model(family.name)
    classes = distributed.block_classes(model, family)
    modules = dict(model.named_modules())
    towers = {family.component_of(path) for path in family.block_lists if path in modules}
    assert towers == {"vision", "language"}
    unsplit = set(model._no_split_modules)
    for path in family.block_lists:
        for block in modules.get(path, ()):
            assert type(block).__name__ in classes
            assert {type(m).__name__ for m in block.modules()} & unsplit, type(block).__name__


def test_a_model_without_the_records_blocks_is_refused_for_fsdp(meta_model):
    with pytest.raises(ModelError) as err:
        distributed.block_classes(meta_model("qwen2_vl"), get_family("idefics3"))
    assert "FSDP: no transformer blocks" in err.value.message and "strategy: ddp" in err.value.hint


# --- what the recipe refuses ---------------------------------------------------------------------


def test_the_distributed_section_has_defaults_and_is_strict():
    recipe = parse_recipe(MINIMAL)
    assert recipe.train.distributed == DistributedSection(strategy="ddp", timeout=1800)
    with pytest.raises(RecipeError) as err:
        parse_recipe(MINIMAL + "train:\n  distributed:\n    strategy: zero3\n    timout: 5\n")
    joined = "\n".join(err.value.problems)
    assert "train.distributed.strategy (line 7)" in joined and "'ddp' or 'fsdp'" in joined
    assert (
        "train.distributed.timout (line 8): unknown key; did you mean `train.distributed.timeout`?" in joined
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("quantization:\n  bits: 8\n", "cannot shard 8-bit"),
        (
            "train:\n  eval_generate: true\n  distributed:\n    strategy: fsdp\n",
            "eval_generate cannot run under",
        ),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(extra: str, message: str):
    text = MINIMAL + extra + ("" if "strategy" in extra else "train:\n  distributed:\n    strategy: fsdp\n")
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert message in "\n".join(err.value.problems)


def test_fsdp_accepts_qlora():
    recipe = parse_recipe(MINIMAL + "quantization:\n  bits: 4\ntrain:\n  distributed:\n    strategy: fsdp\n")
    assert recipe.quantization.bits == 4 and recipe.train.distributed.strategy == "fsdp"


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_fsdp_is_refused_for_the_preference_and_rl_objectives(launched, objective: str):
    fsdp = DistributedSection(strategy="fsdp")
    distributed.check_objective(objective, fsdp, distributed.ranks())  # one process: no FSDP runs at all
    launched(2)
    distributed.check_objective("sft", fsdp, distributed.ranks())
    distributed.check_objective(objective, DistributedSection(strategy="ddp"), distributed.ranks())
    with pytest.raises(RecipeError) as err:
        distributed.check_objective(objective, fsdp, distributed.ranks())
    assert f"train.objective {objective} does not run under FSDP" in err.value.message
    assert f"train.distributed.strategy: ddp for {objective}" in err.value.hint


def test_a_dpo_launch_under_fsdp_exits_2_before_any_folder_or_process_group(tmp_path):
    """Every rank refuses on its own, from the launch variables alone: no rank waits for another."""
    from conftest import write_recipe
    from test_cli import vlmtune

    path = write_recipe(
        tmp_path, model={"name": "tiny:qwen2_vl"}, data={"train": "pairs.jsonl"}, output={"dir": str(tmp_path / "runs")},
        train={"objective": "dpo", "distributed": {"strategy": "fsdp", "timeout": 10}},
    )  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("")  # there, so the refusal is the strategy's, not a missing file's
    # Rank 1: it would wait for rank 0 if it did not refuse on its own.
    launch = dict(zip(LAUNCH_VARIABLES, ("2", "1", "1", "2"), strict=True))
    result = vlmtune("train", str(path), env_extra=launch)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.objective dpo does not run under FSDP" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


# --- who writes, and what a resume checks ---------------------------------------------------------


def test_only_the_writer_writes_the_run_folder(tmp_path):
    writer = RunDir.create(tmp_path, "r")
    writer.init_summary("r")
    reader = RunDir.open(writer.path, writer=False)
    reader.write_json(files.ENV, {"rank": 1})
    reader.write_text(files.RECIPE, "rank 1")
    reader.append_jsonl(files.METRICS, {"step": 1, "loss": 1.0})
    reader.set_stage("load", "running")
    reader.set_status("failed")
    reader.record(distributed={"world_size": 2})
    assert not (writer / files.ENV).exists() and not (writer / files.RECIPE).exists()
    assert not (writer / files.METRICS).exists()
    summary = writer.summary()
    assert summary["status"] == "running" and summary["stages"]["load"] == {"status": "pending"}
    assert "distributed" not in summary


def test_a_resume_on_another_rank_count_is_refused(launched, tmp_path):
    run = RunDir.create(tmp_path, "r")
    run.write_text(files.RESOLVED, MINIMAL)
    run.init_summary("r")
    run.record(distributed={"world_size": 2, "strategy": "ddp"})
    with pytest.raises(RunDirError) as err:
        pipeline.resume(run.path)  # one process, before any model loads
    assert f"run {run.path} was trained on 2 rank(s) and cannot resume on 1" in err.value.message
    assert f"torchrun --nproc-per-node 2 -m vlmtune train --resume {run.path}" in err.value.hint

    launched(4)
    with pytest.raises(RunDirError) as err:
        distributed.check_resume(run.summary()["distributed"], distributed.ranks(), run.path)
    assert "cannot resume on 4" in err.value.message


def test_a_resume_on_the_same_rank_count_passes_the_check(launched, tmp_path):
    distributed.check_resume({"world_size": 1}, distributed.ranks(), tmp_path)
    distributed.check_resume(None, distributed.ranks(), tmp_path)  # a run from before the entry existed
    launched(2)
    distributed.check_resume({"world_size": 2}, distributed.ranks(), tmp_path)
    with pytest.raises(RunDirError) as err:
        distributed.check_resume(None, distributed.ranks(), tmp_path)
    assert "trained on 1 rank(s)" in err.value.message and "`vlmtune train --resume ...`" in err.value.hint


# --- 4-bit storage for FSDP ----------------------------------------------------------------------


def test_shardable_4bit_weights_are_stored_in_the_16bit_dtype():
    import torch

    from vlmtune.recipe import QuantizationSection
    from vlmtune.stages import load

    family = get_family("qwen2_vl")
    plain = load.quantization_config(QuantizationSection(), family, torch.bfloat16)
    shardable = load.quantization_config(QuantizationSection(), family, torch.bfloat16, shardable=True)
    assert plain.bnb_4bit_quant_storage == torch.uint8
    assert shardable.bnb_4bit_quant_storage == torch.bfloat16


@pytest.mark.slow
def test_a_4bit_model_in_uint8_storage_is_refused_for_fsdp():
    import torch

    from vlmtune.recipe import ModelSection, QuantizationSection
    from vlmtune.stages import load

    loaded = load.load(ModelSection(name="tiny:qwen2_vl"), QuantizationSection(), PIXEL_BUDGET, "cpu")
    with pytest.raises(ModelError) as err:
        load.check_quant_storage(loaded.model, torch.bfloat16)
    assert "FSDP needs the 4-bit weights stored as torch.bfloat16" in err.value.message
    shardable = load.load(
        ModelSection(name="tiny:qwen2_vl"), QuantizationSection(), PIXEL_BUDGET, "cpu", shardable=True
    )
    load.check_quant_storage(shardable.model, torch.bfloat16)  # what load itself checks


# --- the blank image that keeps FSDP ranks in step ------------------------------------------------


class PeerHasAnImage(TextOnlyGuard):
    """The guard as on a rank whose peer's batch has an image (no process group needed)."""

    def some_rank_has_an_image(self, has_image: bool) -> bool:
        return True


def text_only_step(name: str, guarded: bool):
    """Loss and vision gradients of one full-fine-tuning step on a text-only batch."""
    import torch

    from vlmtune.data.collator import VisionCollator
    from vlmtune.recipe import ModelSection, QuantizationSection
    from vlmtune.stages import load

    loaded = load.load(ModelSection(name=f"tiny:{name}", dtype="float32"), QuantizationSection(bits=None), PIXEL_BUDGET, "cpu")  # fmt: skip
    for param in loaded.model.parameters():
        param.requires_grad_(True)
    if guarded:
        PeerHasAnImage(loaded.model, loaded.family, loaded.processor)
    batch = VisionCollator(loaded.processor, loaded.family, max_length=None, train_on_responses_only=True)(
        [TEXT_ONLY]
    )
    torch.manual_seed(0)
    loss = loaded.model(**batch).loss
    loss.backward()
    family = loaded.family
    vision = {
        n: p.grad
        for n, p in loaded.model.named_parameters()
        if family.component_of(n.rsplit(".", 1)[0]) == "vision"
    }
    return float(loss.detach()), vision


# PaliGemma's processor refuses a sample without an image, so it never has a text-only batch.
GUARDED = [f.name for f in FAMILIES if f.name not in ("mllama", "paligemma")]


@pytest.mark.slow
@pytest.mark.parametrize("name", GUARDED)
def test_the_blank_image_runs_the_vision_tower_at_zero_weight(name: str):
    loss, plain = text_only_step(name, guarded=False)
    guarded_loss, guarded = text_only_step(name, guarded=True)
    assert guarded_loss == loss  # the same loss to the last bit
    assert all(grad is None for grad in plain.values())  # text only: the tower did not run
    ran = {n: g for n, g in guarded.items() if g is not None}
    # Every block of the tower ran (Llava's unused post-layernorm aside) and learnt nothing.
    assert len(ran) >= len(guarded) - 2 and all(float(g.abs().sum()) == 0.0 for g in ran.values())


@pytest.mark.slow
def test_a_family_whose_tower_cannot_run_alone_is_refused_under_fsdp_on_a_text_only_batch():
    with pytest.raises(ModelError) as err:
        text_only_step("mllama", guarded=True)
    assert "a batch without an image under FSDP: Llama 3.2 Vision" in err.value.message
    assert "strategy: ddp" in err.value.hint
