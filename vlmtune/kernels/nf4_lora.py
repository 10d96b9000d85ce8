"""The fused NF4-dequantize + LoRA matmul of a 4-bit base layer with a LoRA adapter, and its hand-written backward.

Forward: y = x W^T + (s x A^T) B^T (+ bias), where W is bitsandbytes' packed NF4 weight. The kernel
dequantizes each (N, K) tile of W as it reads it (4-bit index -> NF4 code x the block's absmax, the
absmax itself double-quantized: code2[absmax_u8] x absmax2 + offset) and adds the LoRA term in the same
tile's epilogue. Backward: grad_x = g W + (s g B) A, by a second kernel that dequantizes W's tiles again,
and the LoRA gradients grad_A = s (g B)^T x, grad_B = g^T (s x A). No dequantized weight is ever kept:
what autograd saves is x and the small (tokens x r) product s x A.

Packing (bitsandbytes 0.45+, checked against ``dequantize_4bit`` in the tests): the weight flattened
row-major, two 4-bit codes per byte, the first in the high nibble; absmax per ``blocksize`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class NF4Weight:
    """A packed NF4 weight with its quantization state, as flat tensors the kernels read."""

    packed: torch.Tensor  # uint8 (N * K / 2,)
    code: torch.Tensor  # fp32 (16,) the NF4 levels
    absmax: torch.Tensor  # uint8 (blocks,) when nested, else fp32 (blocks,)
    blocksize: int
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    nested: bool
    code2: torch.Tensor  # fp32 (256,) when nested (else a dummy)
    absmax2: torch.Tensor  # fp32 (blocks / blocksize2,) when nested (else a dummy)
    blocksize2: int
    offset: float


def nf4_weight(packed: torch.Tensor, quant_state: Any) -> NF4Weight:
    """Read a bitsandbytes Params4bit's data and quant_state (quant_type nf4)."""
    if getattr(quant_state, "quant_type", "nf4") != "nf4":
        raise ValueError("the fused kernel reads NF4 weights only")
    nested = bool(getattr(quant_state, "nested", False))
    dummy = torch.zeros(1, dtype=torch.float32, device=packed.device)
    state2 = quant_state.state2 if nested else None
    return NF4Weight(
        packed=packed.reshape(-1),
        code=quant_state.code.float().contiguous(),
        absmax=quant_state.absmax.reshape(-1).contiguous()
        if nested
        else quant_state.absmax.float().reshape(-1),
        blocksize=int(quant_state.blocksize),
        shape=(int(quant_state.shape[0]), int(quant_state.shape[1])),
        nested=nested,
        code2=state2.code.float().contiguous() if nested else dummy,
        absmax2=state2.absmax.float().reshape(-1).contiguous() if nested else dummy,
        blocksize2=int(state2.blocksize) if nested else 1,
        offset=float(quant_state.offset) if nested else 0.0,
    )


def dequantize_reference(weight: NF4Weight) -> torch.Tensor:
    """The whole weight in fp32, in torch (what the kernels never build): for the tests and the benchmark."""
    codes = torch.stack([weight.packed >> 4, weight.packed & 15], -1).reshape(-1).long()
    absmax = weight.absmax
    if weight.nested:
        index = torch.arange(absmax.numel(), device=absmax.device) // weight.blocksize2
        absmax = weight.code2[absmax.long()] * weight.absmax2[index] + weight.offset
    scale = absmax.repeat_interleave(weight.blocksize)[: codes.numel()]
    return (weight.code[codes] * scale).reshape(weight.shape)


def nf4_lora_reference(x, weight: NF4Weight, lora_a, lora_b, scaling: float, bias=None):
    """x W^T + s (x A^T) B^T + bias, with W dequantized whole: the torch reference."""
    w = dequantize_reference(weight).to(x.dtype)
    y = x @ w.t() + scaling * (x @ lora_a.t().to(x.dtype)) @ lora_b.t().to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


@triton.jit
def _dequant_tile(
    PACKED, CODE, ABSMAX, CODE2, ABSMAX2, n, k, N, K, blocksize, blocksize2, offset, NESTED: tl.constexpr
):
    """The fp32 values of W[n, k] for broadcastable index blocks n, k (0 outside the matrix)."""
    inside = (n < N) & (k < K)
    flat = n * K + k
    byte = tl.load(PACKED + flat // 2, mask=inside, other=0).to(tl.int32)
    index = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(CODE + index, mask=inside, other=0.0)
    block = flat // blocksize
    if NESTED:
        scale_u8 = tl.load(ABSMAX + block, mask=inside, other=0).to(tl.int32)
        scale = (
            tl.load(CODE2 + scale_u8, mask=inside, other=0.0)
            * tl.load(ABSMAX2 + block // blocksize2, mask=inside, other=0.0)
            + offset
        )
    else:
        scale = tl.load(ABSMAX + block, mask=inside, other=0.0)
    return tl.where(inside, value * scale, 0.0)


@triton.jit
def _forward(
    X, PACKED, CODE, ABSMAX, CODE2, ABSMAX2, XA, B, Y,
    M, N, K, R, blocksize, blocksize2, offset,
    NESTED: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]  # (BM, 1)
    n = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]  # (1, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kx = k0 + tl.arange(0, BK)[None, :]  # (1, BK)
        x = tl.load(X + m * K + kx, mask=(m < M) & (kx < K), other=0.0)
        kw = k0 + tl.arange(0, BK)[:, None]  # (BK, 1): the transposed tile W[n, k]^T
        w = _dequant_tile(
            PACKED, CODE, ABSMAX, CODE2, ABSMAX2, n, kw, N, K, blocksize, blocksize2, offset, NESTED
        )
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    r_row = tl.arange(0, BR)[None, :]
    r_col = tl.arange(0, BR)[:, None]
    xa = tl.load(XA + m * R + r_row, mask=(m < M) & (r_row < R), other=0.0)
    b = tl.load(B + n * R + r_col, mask=(n < N) & (r_col < R), other=0.0)  # B^T tile (BR, BN)
    acc += tl.dot(xa, b.to(xa.dtype), input_precision=PRECISION)
    tl.store(Y + m * N + n, acc.to(Y.dtype.element_ty), mask=(m < M) & (n < N))


@triton.jit
def _backward_input(
    G, PACKED, CODE, ABSMAX, CODE2, ABSMAX2, GB, A, DX,
    M, N, K, R, blocksize, blocksize2, offset,
    NESTED: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]  # (BM, 1)
    k = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]  # (1, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ng = n0 + tl.arange(0, BN)[None, :]
        g = tl.load(G + m * N + ng, mask=(m < M) & (ng < N), other=0.0)
        nw = n0 + tl.arange(0, BN)[:, None]  # (BN, 1): the tile W[n, k]
        w = _dequant_tile(
            PACKED, CODE, ABSMAX, CODE2, ABSMAX2, nw, k, N, K, blocksize, blocksize2, offset, NESTED
        )
        acc += tl.dot(g, w.to(g.dtype), input_precision=PRECISION)
    r_row = tl.arange(0, BR)[None, :]
    r_col = tl.arange(0, BR)[:, None]
    gb = tl.load(GB + m * R + r_row, mask=(m < M) & (r_row < R), other=0.0)
    a = tl.load(A + r_col * K + k, mask=(r_col < R) & (k < K), other=0.0)  # A tile (BR, BK)
    acc += tl.dot(gb, a.to(gb.dtype), input_precision=PRECISION)
    tl.store(DX + m * K + k, acc.to(DX.dtype.element_ty), mask=(m < M) & (k < K))


def _blocks(rows: int, device: torch.device, r: int) -> tuple[int, int, int, int]:
    br = max(16, triton.next_power_of_2(r))
    if device.type == "cuda":
        return 64, 64, 64, br
    # the interpreter: as few programs and loop steps as the shapes allow
    return max(16, min(128, triton.next_power_of_2(rows))), 64, 64, br


def _state_args(weight: NF4Weight) -> tuple:
    return (weight.packed, weight.code, weight.absmax, weight.code2, weight.absmax2)


def _scalar_args(weight: NF4Weight) -> tuple:
    return (weight.blocksize, weight.blocksize2, weight.offset)


class NF4LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight: NF4Weight, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        (m, k), (n, r) = x2.shape, lora_b.shape
        xa = ((x2.to(lora_a.dtype) @ lora_a.t()) * scaling).to(x2.dtype).contiguous()
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        bm, bn, bk, br = _blocks(m, x2.device, r)
        precision = "ieee" if x2.dtype == torch.float32 else "tf32"
        _forward[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, *_state_args(weight), xa, lora_b.to(x2.dtype).contiguous(), y,
            m, n, k, r, *_scalar_args(weight),
            NESTED=weight.nested, PRECISION=precision, BM=bm, BN=bn, BK=bk, BR=br,
        )  # fmt: skip
        ctx.save_for_backward(x2, xa, lora_a, lora_b)
        ctx.weight, ctx.scaling, ctx.shape, ctx.precision = weight, scaling, shape, precision
        return y.reshape(*shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b = ctx.saved_tensors
        weight, scaling = ctx.weight, ctx.scaling
        (m, k), (n, r) = x2.shape, lora_b.shape
        g = dy.reshape(m, n).contiguous().to(x2.dtype)
        gb = ((g.to(lora_b.dtype) @ lora_b) * scaling).contiguous()  # (M, r) = s g B
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(m, k, dtype=x2.dtype, device=x2.device)
            bm, bn, bk, br = _blocks(m, x2.device, r)
            _backward_input[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
                g, *_state_args(weight), gb.to(x2.dtype), lora_a.to(x2.dtype).contiguous(), dx,
                m, n, k, r, *_scalar_args(weight),
                NESTED=weight.nested, PRECISION=ctx.precision, BM=bm, BN=bn, BK=bk, BR=br,
            )  # fmt: skip
            dx = dx.reshape(ctx.shape)
        grad_a = (gb.t() @ x2.to(gb.dtype)).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        grad_b = (g.t().to(xa.dtype) @ xa).to(lora_b.dtype) if ctx.needs_input_grad[2] else None
        return dx, grad_a, grad_b, None, None


def nf4_lora(x, weight: NF4Weight, lora_a, lora_b, scaling: float, bias=None) -> torch.Tensor:
    """x W^T + s (x A^T) B^T (+ bias) through the fused kernels; lora_a (r, K), lora_b (N, r)."""
    y = NF4LoRAFunction.apply(x, lora_a, lora_b, weight, float(scaling))
    return y if bias is None else y + bias.to(y.dtype)
