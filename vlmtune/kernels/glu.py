"""Fused gated activations of the MLP: SwiGLU (silu(gate) * up) and GeGLU (gelu_tanh(gate) * up).

The forward reads gate and up once and writes the product; the backward recomputes the activation
from gate (nothing else is saved) and writes both gradients in one pass. tanh is written with exp,
which the Triton interpreter has (it lacks libdevice's tanh).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("swiglu", "geglu")
_GELU_C = math.sqrt(2.0 / math.pi)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The torch reference: transformers' silu / gelu_pytorch_tanh times up."""
    if activation == "swiglu":
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


@triton.jit
def _activation(g, GELU: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        value = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        s = 1.0 / (1.0 + tl.exp(-g))
        value = g * s
        slope = s * (1.0 + g * (1.0 - s))
    return value, slope


@triton.jit
def _glu_forward(GATE, UP, OUT, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    value, _ = _activation(g, GELU)
    tl.store(OUT + offsets, (value * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward(DOUT, GATE, UP, DGATE, DUP, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    d = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    value, slope = _activation(g, GELU)
    tl.store(DGATE + offsets, (d * u * slope).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offsets, (d * value).to(DUP.dtype.element_ty), mask=mask)


def _block(n: int, device: torch.device) -> int:
    # The interpreter's cost grows with the number of programs: few, large blocks there.
    return 1024 if device.type == "cuda" else max(1024, triton.next_power_of_2(triton.cdiv(n, 4)))


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown gated activation {activation!r}")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        block = _block(n, gate.device)
        _glu_forward[(triton.cdiv(n, block),)](gate, up, out, n, GELU=activation == "geglu", BLOCK=block)
        ctx.save_for_backward(gate, up)
        ctx.gelu = activation == "geglu"
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        block = _block(n, gate.device)
        _glu_backward[(triton.cdiv(n, block),)](dout, gate, up, dgate, dup, n, GELU=ctx.gelu, BLOCK=block)
        return dgate, dup, None


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up through the kernel (activation: swiglu | geglu)."""
    return GLUFunction.apply(gate, up, activation)
