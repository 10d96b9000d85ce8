"""Each Triton kernel against its torch reference, forward and backward, on CPU under the Triton interpreter.

fp32 only: the interpreter's bf16 arithmetic is wrong (FACTS.md). Shapes stay small (the interpreter
is 20-2000x slower), but odd: rows and columns that fill no block exactly, so the masks are tested.
"""

from __future__ import annotations

import pytest
import torch

from vlmtune.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def grads(fn, *tensors):
    """fn's output and the gradients of a random projection of it w.r.t. each tensor."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def assert_same(kernel_fn, reference_fn, *tensors, atol=1e-5):
    out_k, grad_k = grads(kernel_fn, *tensors)
    out_r, grad_r = grads(reference_fn, *tensors)
    for a, b in zip(out_k, out_r, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    for a, b in zip(grad_k, grad_r, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["rmsnorm", "gemma_rmsnorm"])
def test_rms_norm_matches_torch_forward_and_backward(offset):
    from vlmtune.kernels.rmsnorm import rms_norm, rms_norm_reference

    torch.manual_seed(0)
    x = torch.randn(3, 7, 96) * 3
    w = torch.randn(96) * 0.5 + (0.0 if offset else 1.0)
    assert_same(
        lambda a, b: rms_norm(a, b, 1e-6, offset), lambda a, b: rms_norm_reference(a, b, 1e-6, offset), x, w
    )


def test_gemma_offset_changes_the_result():
    """The (1 + w) variant is really applied: w = 0 is the identity scale only with the offset."""
    from vlmtune.kernels.rmsnorm import rms_norm, rms_norm_reference

    x, w = torch.randn(4, 32), torch.zeros(32)
    assert torch.count_nonzero(rms_norm(x, w, 1e-6, 0.0)) == 0
    torch.testing.assert_close(rms_norm(x, w, 1e-6, 1.0), rms_norm_reference(x, torch.ones(32), 1e-6))


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_glu_matches_torch_forward_and_backward(activation):
    from vlmtune.kernels.glu import glu, glu_reference

    torch.manual_seed(0)
    gate, up = torch.randn(2, 9, 77) * 3, torch.randn(2, 9, 77)
    assert_same(lambda g, u: glu(g, u, activation), lambda g, u: glu_reference(g, u, activation), gate, up)


@pytest.mark.parametrize("dim", [16, 40])
def test_rotary_matches_transformers_forward_and_backward(dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vlmtune.kernels.rope import apply_rotary

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, dim), torch.randn(2, 2, 5, dim)
    angles = torch.randn(2 if dim == 16 else 1, 5, dim // 2)  # 1: shared by the batch (Gemma 3)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    assert_same(
        lambda a, b: apply_rotary(a, b, cos, sin), lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), q, k
    )


def test_rotary_backward_is_the_exact_transpose_when_halves_differ():
    """No assumption that cos/sin repeat their halves: the backward is the rotation's transpose."""
    from vlmtune.kernels.rope import apply_rotary, rotary_reference

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 32), torch.randn(1, 1, 3, 32)
    cos, sin = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    assert_same(
        lambda a, b: apply_rotary(a, b, cos, sin),
        lambda a, b: (rotary_reference(a, cos, sin), rotary_reference(b, cos, sin)),
        q,
        k,
    )


def rotary_module(family_name: str):
    """The language model's rotary-embedding module of the tiny model of a family, with its config."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.model.tiny import tiny_model_path

    path = tiny_model_path(family_name)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    rotary = model.model.language_model.rotary_emb
    return type(rotary)(rotary.config)


@pytest.mark.parametrize(
    ("family_name", "kind"),
    [("qwen2_vl", "mrope"), ("qwen2_5_vl", "mrope"), ("qwen3_vl", "mrope_interleaved"), ("llava", "default")],
)
def test_cos_sin_kernel_matches_the_family_rotary_module(family_name, kind):
    """Multimodal RoPE: distinct t/h/w position rows give the module's exact cos and sin."""
    from vlmtune.kernels.rope import axis_map, rope_cos_sin
    from vlmtune.model.families import get_family

    assert get_family(family_name).rope == kind
    rotary = rotary_module(family_name)
    half = rotary.inv_freq.numel()
    sections = getattr(rotary, "mrope_section", ())
    seq = 11
    positions = torch.stack([torch.arange(seq), torch.arange(seq) // 3, torch.arange(seq) % 4 + 2])[:, None]
    positions = (
        positions.expand(3, 2, seq).contiguous() if kind != "default" else positions[:1, 0].expand(2, seq)
    )
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = rotary(x, positions)
    rows = positions if positions.dim() == 3 else positions[None]
    cos, sin = rope_cos_sin(rows, rotary.inv_freq, axis_map(kind, half, sections), rotary.attention_scaling)
    torch.testing.assert_close(cos, cos_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, sin_ref, atol=1e-5, rtol=1e-5)
    if kind != "default":  # the sections matter: plain RoPE on the t row alone would differ
        plain_cos, _ = rope_cos_sin(rows, rotary.inv_freq, axis_map("default", half), 1.0)
        assert not torch.allclose(plain_cos, cos_ref)


def quantized(out_features: int, in_features: int, nested: bool):
    import bitsandbytes.functional as bnbf

    from vlmtune.kernels.nf4_lora import nf4_weight

    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * 0.05
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return nf4_weight(packed, state), bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "single_quant"])
def test_nf4_lora_matches_bitsandbytes_dequantize_then_matmul(nested):
    """Forward and all three gradients (x, A, B) against bitsandbytes' own dequantized weight."""
    from vlmtune.kernels.nf4_lora import dequantize_reference, nf4_lora

    weight, dense = quantized(80, 192, nested)
    torch.testing.assert_close(dequantize_reference(weight), dense)  # the packing is read right
    torch.manual_seed(1)
    x, a, b = torch.randn(2, 9, 192), torch.randn(8, 192) * 0.1, torch.randn(80, 8) * 0.1
    bias = torch.randn(80)

    def reference(x, a, b):
        return x @ dense.t() + 2.0 * (x @ a.t()) @ b.t() + bias

    assert_same(lambda x, a, b: nf4_lora(x, weight, a, b, 2.0, bias), reference, x, a, b, atol=1e-4)


def test_nf4_lora_keeps_no_dequantized_weight():
    """What autograd saves for backward is x and the (tokens x r) LoRA product: nothing of W's size."""
    from vlmtune.kernels.nf4_lora import nf4_lora

    weight, _ = quantized(128, 256, True)
    x = torch.randn(4, 256, requires_grad=True)
    a = torch.randn(4, 256, requires_grad=True)
    b = torch.zeros(128, 4, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        nf4_lora(x, weight, a, b, 1.0).sum().backward()
    assert saved and all(shape.numel() < 128 * 256 for shape in saved), saved
    assert x.grad is not None and torch.count_nonzero(b.grad) > 0
