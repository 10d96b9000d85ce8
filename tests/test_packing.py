"""Packing, proven per family: a packed row trains exactly like its samples one by one.

For every family whose record packs: one row of three samples of different lengths with 0, 1 and 2
images (of different sizes) gives the same loss and the same gradient on every parameter (full
fine-tuning, float32) as the same samples unpacked, relative 1e-5, through the per-sample attention
that packed training switches the language model to (vlmtune.training.packed_attention). Negative
controls show the comparison can fail: one sample's positions shifted, or a boundary between two
samples removed. The per-sample attention itself equals sdpa with the packed row's block-causal mask.

The loss is computed as VlmtuneTrainer.compute_loss computes it (the same position builder, the
same input cleaning, the supervised-positions loss with the batch's supervised-token count).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from vlmtune.data import Sample
from vlmtune.data.collator import VisionCollator
from vlmtune.data.packing import IMAGES_PER_SAMPLE, SAMPLE_LENGTHS, PackedCollator, pack
from vlmtune.errors import DataError
from vlmtune.model.families import FAMILIES, get_family
from vlmtune.recipe import ModelSection, QuantizationSection
from vlmtune.stages import load
from vlmtune.training.packed import PackedRowSampler, heaviest_to_front, packed_positions
from vlmtune.training.packed_attention import (
    SAMPLE_ATTENTION,
    SAMPLE_LENGTHS_KWARG,
    per_sample_sdpa,
    use_per_sample_attention,
)
from vlmtune.training.trainer import unpacked_keys

from conftest import PIXEL_BUDGET, ROOT, assistant, user

PACKING = [f.name for f in FAMILIES if f.packing is not None]
REFUSED = [f.name for f in FAMILIES if f.packing is None]
IMAGES = ROOT / "data" / "demo" / "images"
TALL, SMALL, BIG = (str(IMAGES / name) for name in ("001.png", "000.png", "002.png"))  # 56x84, 56x56, 112x112
RTOL = 1e-5


# --- the packer: arithmetic ---------------------------------------------------------------------


def test_pack_keeps_every_sample_whole_within_the_budget():
    lengths = [5, 400, 37, 120, 120, 9, 300, 64, 1, 250]
    rows = pack(lengths, budget=512, seed=1)
    members = sorted(i for row in rows.rows for i in row)
    assert members == list(range(len(lengths))), "every sample once, none dropped"
    for row, total in zip(rows.rows, rows.lengths, strict=True):
        assert total == sum(lengths[i] for i in row) <= 512
    assert len(rows.rows) == 3  # 1306 tokens: 3 rows is the least
    assert pack(lengths, 512, seed=1) == rows, "a function of lengths, budget and seed"


def test_pack_is_first_fit_decreasing_with_seeded_ties():
    rows = pack([3, 8, 5, 2, 7], budget=10, seed=0)
    assert rows.rows == [[1, 3], [4, 0], [2]]
    tied = {tuple(map(tuple, pack([4] * 6, budget=8, seed=s).rows)) for s in range(6)}
    assert len(tied) > 1, "equal lengths are ordered by the seed, not by the file"


def test_a_sample_over_the_budget_is_an_error_never_a_split():
    with pytest.raises(DataError, match="longer than the packing budget of 100 tokens") as caught:
        pack([50, 101], budget=100, seed=0)
    assert "max_tokens_per_batch" in caught.value.hint


def test_packed_order_is_a_function_of_the_epoch_heaviest_row_first():
    weights = [10, 50, 30, 90, 20]
    sampler = PackedRowSampler(weights, seed=7, heaviest_first=True)
    first = list(sampler)
    assert first[0] == 3 and sorted(first) == list(range(5))
    assert list(sampler) == first, "the same epoch replays the same order (an exact resume)"
    sampler.set_epoch(1)
    later = list(sampler)
    again = PackedRowSampler(weights, seed=7, heaviest_first=True)
    again.set_epoch(1)
    assert sorted(later) == list(range(5)) and list(again) == later, "epoch 1's order is epoch 1's alone"
    assert heaviest_to_front([0, 1, 2, 3], [1, 9, 2, 3]) == [1, 0, 2, 3]


# --- equivalence, per family ----------------------------------------------------------------------


def three_samples() -> list[Sample]:
    """Different lengths, 0, 1 and 2 images of different sizes."""
    return [
        Sample(
            0,
            [user("Describe both.", 2), assistant("A tall one and a small one, side by side.")],
            [TALL, SMALL],
        ),
        Sample(1, [user("Hello"), assistant("Hi.")], []),
        Sample(2, [user("What is it?", 1), assistant("A large square.")], [BIG]),
    ]


@pytest.fixture(scope="module", params=PACKING)
def family_model(request):
    import torch

    loaded = load.load(
        ModelSection(name=f"tiny:{request.param}", dtype="float32"), QuantizationSection(bits=None), PIXEL_BUDGET,
        "cpu",
    )  # fmt: skip
    model = loaded.model
    model.train()
    model.config.use_cache = False
    assert use_per_sample_attention(model) == SAMPLE_ATTENTION  # what VlmtuneTrainer does for packed rows
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    torch.manual_seed(0)
    collator = VisionCollator(loaded.processor, loaded.family, max_length=None, train_on_responses_only=True)
    return model, loaded.family, collator


def loss_and_grads(model, batches: list[dict]) -> tuple[float, dict]:
    """Forward and backward as the trainer does: loss over the supervised positions of all ``batches``
    (sum / the supervised-token count of them all, as num_items_in_batch under gradient accumulation)."""
    from vlmtune.constants import IGNORE_INDEX
    from vlmtune.training.loss import lm_head_input, logit_transform, supervised_cross_entropy

    items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    model.zero_grad(set_to_none=True)
    total = 0.0
    lm_head = model.get_output_embeddings()
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with lm_head_input(lm_head) as captured:
            model(**inputs, use_cache=False)
        result = supervised_cross_entropy(
            captured.hidden,
            batch["labels"],
            lm_head,
            items,
            **logit_transform(model.config),
        )
        result.loss.backward()
        total += float(result.loss.detach())
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return total, grads


def packed_batch(model, family, collator, samples, positions=None, lengths=None) -> dict:
    batch = PackedCollator(collator, family)(samples)
    inputs = unpacked_keys(
        batch, positions if positions is not None else packed_positions(model, family, batch)
    )
    if lengths is not None:
        inputs[SAMPLE_LENGTHS_KWARG] = lengths
    return inputs


def disagreement(a: tuple[float, dict], b: tuple[float, dict]) -> str | None:
    """None when loss and every gradient agree to RTOL; else what differs.

    A gradient is compared relative to its own norm, with a floor of 1e-3 of the largest gradient's
    norm: some gradients are zero in exact arithmetic (attention key biases, to which softmax is
    blind) and only float32 rounding noise is left of them (1e-9 against norms near 1).
    """
    loss_a, grads_a = a
    loss_b, grads_b = b
    if abs(loss_a - loss_b) > RTOL * abs(loss_a):
        return f"loss {loss_a} vs {loss_b}"
    if set(grads_a) != set(grads_b):
        return f"gradients of different parameters: {sorted(set(grads_a) ^ set(grads_b))[:3]}"
    floor = 1e-3 * max(float(g.norm()) for g in grads_a.values())
    for name, grad in grads_a.items():
        difference = float((grad - grads_b[name]).norm())
        if difference > RTOL * max(float(grad.norm()), floor):
            return f"gradient of {name}: {difference} apart, norm {float(grad.norm())}"
    return None


@pytest.mark.slow
def test_a_packed_row_trains_exactly_like_its_samples_one_by_one(family_model):
    model, family, collator = family_model
    samples = three_samples()
    batch = PackedCollator(collator, family)(samples)
    two, none, one = batch[IMAGES_PER_SAMPLE].tolist()  # images, or their tiles (Idefics3, InternVL)
    assert none == 0 and two >= 2 and one >= 1
    assert len(set(batch[SAMPLE_LENGTHS].tolist())) == 3, "three different lengths"
    assert "attention_mask" not in batch

    unpacked = loss_and_grads(model, [collator([sample]) for sample in samples])
    with sdpa_calls() as queries:
        packed = loss_and_grads(model, [packed_batch(model, family, collator, samples)])
    assert disagreement(unpacked, packed) is None, disagreement(unpacked, packed)
    layers = model.config.get_text_config().num_hidden_layers
    assert queries == batch[SAMPLE_LENGTHS].tolist() * layers, "each layer attends sample by sample"


@contextlib.contextmanager
def sdpa_calls():
    """The query lengths of the sdpa calls the per-sample attention makes (the vision tower's sdpa
    calls go through transformers' registry, not this module attribute, and are not seen)."""
    from transformers.integrations import sdpa_attention

    seen: list[int] = []
    original = sdpa_attention.sdpa_attention_forward

    def recording(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    sdpa_attention.sdpa_attention_forward = recording
    try:
        yield seen
    finally:
        sdpa_attention.sdpa_attention_forward = original


@pytest.mark.slow
def test_the_comparison_fails_when_positions_shift_or_a_boundary_goes(family_model):
    import torch

    model, family, collator = family_model
    samples = three_samples()
    unpacked = loss_and_grads(model, [collator([sample]) for sample in samples])
    batch = PackedCollator(collator, family)(samples)
    right = packed_positions(model, family, batch)
    first, second = (int(n) for n in batch[SAMPLE_LENGTHS][:2])

    shifted = right.clone()  # the image sample's positions from its 6th token on, one further
    if shifted.dim() == 3:
        shifted[1:, :, 5:first] += 1  # its multimodal rows: a wrong rope index
    else:
        shifted[:, 5:first] += 1
    no_boundary = right.clone()  # the text sample's positions continue the image sample's ...
    no_boundary[..., first : first + second] += right[..., first - 1 : first] + 1
    lengths = tuple(batch[SAMPLE_LENGTHS].tolist())
    merged = (first + second, *lengths[2:])  # ... and the attention sees the two as one sample

    for wrong, wrong_lengths in ((shifted, None), (no_boundary, merged)):
        assert not torch.equal(wrong, right)
        packed = loss_and_grads(model, [packed_batch(model, family, collator, samples, wrong, wrong_lengths)])
        assert disagreement(unpacked, packed) is not None


# --- the per-sample attention -------------------------------------------------------------------


class GroupedQueryAttention:  # what sdpa reads of an attention module
    num_key_value_groups = 2
    is_causal = True


def attention_row(lengths: tuple[int, ...]):
    """Queries (4 heads), keys and values (2 heads: grouped-query) of one packed row, and its
    block-causal mask (True: may attend), as transformers builds it for sdpa."""
    import torch

    generator = torch.Generator().manual_seed(0)
    total = sum(lengths)
    query = torch.randn(1, 4, total, 8, generator=generator)
    key, value = (torch.randn(1, 2, total, 8, generator=generator) for _ in range(2))
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = (causal & (sample[:, None] == sample[None, :]))[None, None]
    return query, key, value, mask


def test_per_sample_attention_equals_sdpa_with_the_packed_mask_and_fails_with_a_boundary_removed():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = (5, 9, 3)
    query, key, value, mask = attention_row(lengths)
    module = GroupedQueryAttention()
    whole_row, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.35)
    with_mask, _ = per_sample_sdpa(
        module, query, key, value, mask, scaling=0.35, **{SAMPLE_LENGTHS_KWARG: lengths}
    )
    causal_only, _ = per_sample_sdpa(
        module, query, key, value, None, scaling=0.35, **{SAMPLE_LENGTHS_KWARG: lengths}
    )
    assert with_mask.shape == whole_row.shape == (1, 17, 4, 8)
    torch.testing.assert_close(with_mask, whole_row, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(causal_only, whole_row, rtol=1e-6, atol=1e-6)  # the lengths alone isolate

    merged, _ = per_sample_sdpa(
        module, query, key, value, None, scaling=0.35, **{SAMPLE_LENGTHS_KWARG: (14, 3)}
    )
    assert not torch.allclose(merged[:, 5:14], whole_row[:, 5:14], atol=1e-3), "sample 2 sees sample 1"
    torch.testing.assert_close(merged[:, :5], whole_row[:, :5])  # causal: sample 1 sees nothing after it


def test_per_sample_attention_is_plain_sdpa_for_a_batch_that_is_not_one_packed_row():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value, mask = attention_row((5, 9, 3))
    module = GroupedQueryAttention()
    for lengths in (None, (5, 9)):  # no lengths (evaluation), or lengths of another row: the mask decides
        extra = {} if lengths is None else {SAMPLE_LENGTHS_KWARG: lengths}
        output, _ = per_sample_sdpa(module, query, key, value, mask, scaling=0.35, **extra)
        torch.testing.assert_close(
            output, sdpa_attention_forward(module, query, key, value, mask, scaling=0.35)[0]
        )


def test_flash_attention_is_kept_and_only_the_language_model_is_switched():
    from types import SimpleNamespace

    def model(text: str, vision: str):
        text_config, vision_config = (
            SimpleNamespace(_attn_implementation=text),
            SimpleNamespace(_attn_implementation=vision),
        )
        return SimpleNamespace(
            config=SimpleNamespace(get_text_config=lambda: text_config, vision_config=vision_config)
        )

    flash = model("flash_attention_2", "flash_attention_2")
    assert use_per_sample_attention(flash) == "flash_attention_2"
    assert flash.config.get_text_config()._attn_implementation == "flash_attention_2"
    for first in ("sdpa", "eager", None):
        switched = model(first, "sdpa")
        assert use_per_sample_attention(switched) == SAMPLE_ATTENTION
        assert switched.config.get_text_config()._attn_implementation == SAMPLE_ATTENTION
        assert switched.config.vision_config._attn_implementation == "sdpa", "the vision tower keeps its own"


def test_a_one_row_batch_reaches_lm_head_with_contiguous_strides():
    """A packed row is a batch of one: the last position's slice must not keep the row's stride, or
    the CPU matmul goes through bmm and copies the whole lm_head weight every step."""
    import torch

    from vlmtune.training.loss import lm_head_input

    lm_head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 30, 16, requires_grad=True)
    seen = []
    with lm_head_input(lm_head) as captured:
        lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))  # after its own
        lm_head(hidden)
    assert captured.hidden is hidden
    assert seen == [(16, 16, 1)]


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REFUSED)
def test_a_family_that_cannot_prove_isolation_says_why(name):
    family = get_family(name)
    assert family.packing_refused and "no test proves" not in family.packing_refused
    with pytest.raises(ValueError, match=family.title):
        PackedCollator(object(), family)


def test_lfm2_vls_short_convolutions_reach_across_packed_samples():
    """Why LFM2-VL refuses packing, measured: packed as if it could pack (positions restarting, attention per
    sample), a row's loss differs from its samples' one by one; cut each short convolution to its current-token
    tap and they agree, so the convolutions are what crosses the boundaries."""
    import dataclasses

    import torch

    from vlmtune.model.families import Packing

    loaded = load.load(
        ModelSection(name="tiny:lfm2_vl", dtype="float32"),
        QuantizationSection(bits=None),
        PIXEL_BUDGET,
        "cpu",
    )
    model = loaded.model
    model.train()
    model.config.use_cache = False
    assert use_per_sample_attention(model) == SAMPLE_ATTENTION
    family = dataclasses.replace(loaded.family, packing=Packing())  # what the record would say if it packed
    collator = VisionCollator(loaded.processor, family, max_length=None, train_on_responses_only=True)
    samples = three_samples()

    def packed_and_unpacked():
        unpacked = loss_and_grads(model, [collator([sample]) for sample in samples])
        return unpacked, loss_and_grads(model, [packed_batch(model, family, collator, samples)])

    unpacked, packed = packed_and_unpacked()
    assert abs(unpacked[0] - packed[0]) > 1e-4 * abs(unpacked[0])
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(
                "conv.conv"
            ):  # depthwise Conv1d (channels, 1, 3): keep the current token's weight
                module.weight[..., :-1] = 0
    unpacked, packed = packed_and_unpacked()
    assert abs(unpacked[0] - packed[0]) <= RTOL * abs(unpacked[0]), (unpacked[0], packed[0])


def test_refused_families_are_the_ones_the_docs_name():
    text = (ROOT / "docs" / "performance.md").read_text()
    for family in FAMILIES:
        assert f"| {family.title} | {'yes' if family.packing else 'refused'} |" in text, family.title
    assert set(REFUSED) == {
        "llava_onevision", "gemma3", "mllama", "paligemma", "qwen3_5", "qwen3_5_moe", "minicpmv4_6",
        "llama4", "lfm2_vl",
    }  # fmt: skip


def demo_recipe(folder: Path, model: str, extra: dict | None = None, **train) -> Path:
    from conftest import write_recipe

    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        folder,
        **(extra or {}),
        model={"name": model, "dtype": "float32"},
        quantization={"bits": None},
        lora={"method": "full"},
        data={"train": str(ROOT / "data/demo/train.jsonl"), "max_image_pixels": PIXEL_BUDGET, "max_samples": 6,
              "shuffle": False},
        train={"max_steps": 1, "batch_size": 6, "grad_accum": 1, "lr": 1e-3, "max_length": 256,
               "gradient_checkpointing": False, "logging_steps": 1, **train},
    )  # fmt: skip


@pytest.mark.slow
def test_packing_a_refused_family_is_refused_through_the_cli_naming_it(tmp_path: Path):
    from test_cli import vlmtune

    result = vlmtune(
        "train", str(demo_recipe(tmp_path, "tiny:mllama", packing=True)), "--run-dir", str(tmp_path / "r")
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.packing is not supported for Llama 3.2 Vision: its text attends to the images through " \
           "cross-attention" in " ".join(result.stderr.split())  # fmt: skip


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_packing_is_refused_for_dpo_and_grpo_through_the_cli(tmp_path: Path, objective: str):
    from test_cli import vlmtune

    extra = {"grpo": {"rewards": [{"type": "contains"}], "num_generations": 2}} if objective == "grpo" else {}
    path = demo_recipe(tmp_path, "tiny:qwen2_vl", extra, packing=True, objective=objective)
    result = vlmtune("validate", str(path))
    assert result.returncode == 2
    assert f"train.packing applies to sft only, and train.objective is {objective}" in " ".join(
        result.stderr.split()
    )


def test_a_budget_below_max_length_is_refused(tmp_path: Path):
    from test_cli import vlmtune

    result = vlmtune(
        "validate", str(demo_recipe(tmp_path, "tiny:qwen2_vl", packing=True, max_tokens_per_batch=100))
    )
    assert result.returncode == 2
    assert "max_tokens_per_batch 100 is below max_length 256" in " ".join(result.stderr.split())


# --- through the trainer --------------------------------------------------------------------------


def metrics(run: Path) -> list[dict]:
    import json

    return [
        json.loads(line)
        for line in (run / "3-train/metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]


@pytest.mark.slow
def test_a_packed_run_logs_the_unpacked_runs_loss_with_no_padding(tmp_path: Path):
    """Six samples in one step: one packed row, or one padded batch of six. Same loss, same real tokens."""
    from test_cli import vlmtune

    runs = {}
    for packing in (False, True):
        run = tmp_path / f"packing-{packing}"
        result = vlmtune("train", str(demo_recipe(tmp_path / str(packing), "tiny:qwen2_vl", packing=packing)),
                         "--run-dir", str(run))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (runs[packing],) = metrics(run)
    plain, packed = runs[False], runs[True]
    assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    assert packed["samples"] == plain["samples"] == 6
    assert packed["real_tokens"] == plain["real_tokens"] > 6 * 20
    assert packed["padding_fraction"] == 0 < plain["padding_fraction"]


@pytest.mark.slow
def test_an_interrupted_packed_run_resumes_to_exactly_the_uninterrupted_run(tmp_path: Path):
    """Packed rows over several epochs (their order drawn per epoch, the heaviest row first), killed
    mid-run: the resumed run's every logged figure and its final adapter equal the uninterrupted run's."""
    from test_cli import vlmtune
    from test_resume import assert_same_run, recipe, rows, with_fault

    packed = {"packing": True, "max_tokens_per_batch": 256, "heaviest_first": True}
    baseline = tmp_path / "baseline"
    done = vlmtune("train", str(recipe(tmp_path / "a", **packed)), "--run-dir", str(baseline))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(row["padding_fraction"] == 0 for row in rows(baseline) if "loss" in row)

    run = tmp_path / "run"
    stopped = with_fault(
        "SIGKILL@step:5", "train", str(recipe(tmp_path / "b", **packed)), "--run-dir", str(run)
    )
    assert stopped.returncode != 0
    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from checkpoint-4" in resumed.stdout
    assert_same_run(run, baseline)


def test_validate_says_whether_the_recipes_family_packs(tmp_path: Path):
    from test_cli import vlmtune

    refused = vlmtune("validate", str(demo_recipe(tmp_path / "m", "tiny:mllama", packing=True)))
    assert refused.returncode == 0, refused.stderr
    assert "train.packing: refused for Llama 3.2 Vision: its text attends" in " ".join(refused.stdout.split())
    packs = vlmtune("validate", str(demo_recipe(tmp_path / "q", "tiny:qwen2_vl", packing=True)))
    assert "train.packing: supported for Qwen2-VL (multimodal RoPE per sample" in " ".join(
        packs.stdout.split()
    )


@pytest.mark.slow
def test_inspect_says_whether_the_family_packs():
    import json

    from test_cli import vlmtune

    for name, packs in (("tiny:idefics3", True), ("tiny:gemma3", False)):
        result = vlmtune("inspect", "--model", name, "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout)
        assert report["packing"] is packs
        assert report["packing_note"].startswith("train.packing: " + ("supported" if packs else "refused"))


def test_estimate_memory_sizes_a_packed_batch_by_its_token_budget(tmp_path: Path):
    import json

    from test_cli import vlmtune

    figures = {}
    for name, train in {"plain": {}, "packed": {"packing": True, "max_tokens_per_batch": 4096}}.items():
        path = demo_recipe(tmp_path / name, "tiny:qwen2_vl", batch_size=2, max_length=1024, **train)
        result = vlmtune("estimate-memory", str(path), "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        figures[name] = json.loads(result.stdout)
    plain, packed = figures["plain"], figures["packed"]
    assert plain["inputs"]["batch_size"] * plain["inputs"]["total_tokens"] == 2048  # total_tokens: per sample
    tokens = packed["inputs"]["batch_size"] * packed["inputs"]["total_tokens"]
    assert 4096 - packed["inputs"]["batch_size"] < tokens <= 4096, "a packed row holds the budget"
    assert any("train.packing: one row of up to 4,096 tokens" in note for note in packed["notes"])
    assert packed["peak_bytes"] > plain["peak_bytes"]
