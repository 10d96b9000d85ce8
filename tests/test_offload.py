"""train.offload_activations: the saved activations go through host memory, and nothing else changes.

On CPU the tensors are already in host memory, so what this proves is the hook's reach (with gradient
checkpointing: the checkpointed blocks' inputs) and that loss and gradients are identical; the memory
and step-time effect on CUDA is bench/gpu.py's `offload` part.
"""

from __future__ import annotations

import json

import pytest
import torch

from vlmtune.training.offload import HostOffload, activation_offload

from conftest import PIXEL_BUDGET, ROOT, write_recipe


def tiny_checkpointed():
    from transformers import AutoModelForImageTextToText

    from vlmtune.model.tiny import tiny_model_path

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path("qwen2_vl"), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step(model, batch, context):
    model.zero_grad(set_to_none=True)
    with context:
        loss = model(**batch).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_offloaded_step_gives_identical_loss_and_gradients():
    model = tiny_checkpointed()
    torch.manual_seed(0)
    ids = torch.randint(10, 60, (2, 64))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss_ref, grads_ref = step(model, batch, activation_offload(False))
    offload = activation_offload(True)
    assert isinstance(offload, HostOffload)
    loss, grads = step(model, batch, offload)
    layers = model.config.get_text_config().num_hidden_layers
    hidden = model.config.get_text_config().hidden_size
    # at least each checkpointed decoder block's input (2 x 64 x hidden fp32) went through the hook
    assert offload.tensors >= layers and offload.bytes >= layers * 2 * 64 * hidden * 4, vars(offload)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ref[name]), name


def test_parameters_and_small_tensors_stay_put():
    offload = HostOffload(pin_memory=False)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    with offload:
        (torch.randn(8, 64, requires_grad=True) @ weight).sum().backward()  # saves x (512) and weight
    assert offload.tensors == 0


@pytest.mark.slow
def test_a_run_records_its_speed_switches(tmp_path):
    """kernels: auto and offload_activations: true train on CPU; no kernel is used there, and the run says so."""
    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe
    from vlmtune.runs import rundir

    path = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(ROOT / "data/demo/train.jsonl"), "max_image_pixels": PIXEL_BUDGET},
        train={
            "max_steps": 2,
            "batch_size": 1,
            "grad_accum": 1,
            "max_length": 256,
            "kernels": "auto",
            "offload_activations": True,
        },
    )
    recipe = load_recipe(path)
    pipeline.run(recipe, path.read_text(), "switches", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    switches = summary[rundir.SPEED_SWITCHES]
    assert switches["kernels"] == "auto" and switches["offload_activations"] is True
    assert switches["kernels_used"]["patched"] == {}  # never on CPU
    assert summary["status"] == "done"
