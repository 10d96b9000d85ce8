"""Rotary position embedding: cos/sin straight from position ids (multimodal RoPE included) and the rotation of q and k.

``rope_cos_sin`` replaces a rotary-embedding module's forward: one kernel reads each position's
(t, h, w) ids and writes cos and sin, each frequency taking its position from the axis the family's
layout gives it (``axis_map``): one axis for plain RoPE, Qwen2/2.5-VL's sections (t | h | w blocks of
the frequencies), Qwen3-VL's interleaved sections (t h w t h w ...). ``apply_rotary`` rotates q and k
by them (transformers' rotate_half convention); its backward is the transposed rotation, nothing saved
but cos and sin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

ROPE_KINDS = ("default", "mrope", "mrope_interleaved")


def axis_map(kind: str, half: int, sections: Sequence[int] = ()) -> torch.Tensor:
    """For each of the ``half`` frequencies, which row of the position ids (0 = t/text, 1 = h, 2 = w) it reads."""
    axes = torch.zeros(half, dtype=torch.int32)
    if kind == "mrope":  # transformers: freq.split(mrope_section) -> chunk i reads axis i % 3
        start = 0
        for i, size in enumerate(sections):
            axes[start : start + size] = i % 3
            start += size
    elif (
        kind == "mrope_interleaved"
    ):  # Qwen3-VL: h at 1, 4, 7 ... < 3*sections[1]; w at 2, 5, ... < 3*sections[2]
        for axis in (1, 2):
            axes[axis : sections[axis] * 3 : 3] = axis
    elif kind != "default":
        raise ValueError(f"unknown rope kind {kind!r}")
    return axes


def rope_cos_sin_reference(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, axes: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: position_ids (axes, batch, seq) -> cos, sin (batch, seq, 2 * half) in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (A, b, s, half)
    picked = freqs.gather(0, axes.long().view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    emb = torch.cat((picked, picked), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, cos/sin (batch, seq, dim) broadcast over heads (dim 1)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@triton.jit
def _cos_sin(
    POS, INV_FREQ, AXES, COS, SIN, rows, half, axis_stride, scaling, ROWS: tl.constexpr, HALF: tl.constexpr
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, HALF)[None, :]
    mask = (row < rows) & (col < half)
    axis = tl.load(AXES + col, mask=col < half, other=0)
    position = tl.load(POS + axis * axis_stride + row, mask=mask, other=0).to(tl.float32)
    angle = position * tl.load(INV_FREQ + col, mask=col < half, other=0.0).to(tl.float32)
    c = (tl.cos(angle) * scaling).to(COS.dtype.element_ty)
    s = (tl.sin(angle) * scaling).to(SIN.dtype.element_ty)
    out = row * (2 * half) + col
    tl.store(COS + out, c, mask=mask)
    tl.store(COS + out + half, c, mask=mask)
    tl.store(SIN + out, s, mask=mask)
    tl.store(SIN + out + half, s, mask=mask)


def rope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    axes: torch.Tensor,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (axes, batch, seq) -> cos, sin (batch, seq, 2 * half) in ``dtype``, one kernel."""
    positions = position_ids.contiguous()
    _, batch, seq = positions.shape
    half = inv_freq.numel()
    cos = torch.empty(batch, seq, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    rows = batch * seq
    block_rows = 32 if positions.is_cuda else max(16, triton.next_power_of_2(rows))
    _cos_sin[(triton.cdiv(rows, block_rows),)](
        positions,
        inv_freq.float().contiguous(),
        axes.to(device=positions.device, dtype=torch.int32).contiguous(),
        cos,
        sin,
        rows,
        half,
        batch * seq,
        float(scaling),
        ROWS=block_rows,
        HALF=max(16, triton.next_power_of_2(half)),
    )
    return cos, sin


@triton.jit
def _rotate(
    X, COS, SIN, Y, rows, heads, seq, half, trig_batch_stride,
    TRANSPOSE: tl.constexpr, ROWS: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, HALF)[None, :]
    mask = (row < rows) & (col < half)
    # x is (batch, heads, seq, 2*half) contiguous; cos/sin are (batch or 1, seq, 2*half)
    trig = (row // (heads * seq)) * trig_batch_stride + (row % seq) * (2 * half) + col
    at = row * (2 * half) + col
    x1 = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + at + half, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + trig, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + trig + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + trig, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + trig + half, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:  # the gradient: the transpose of [[c1, -s1], [s2, c2]]
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + at, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + at + half, y2.to(Y.dtype.element_ty), mask=mask)


def _rotate_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    x = x.contiguous()
    batch, heads, seq, dim = x.shape
    y = torch.empty_like(x)
    rows = batch * heads * seq
    block_rows = 16 if x.is_cuda else max(16, triton.next_power_of_2(triton.cdiv(rows, 4)))
    _rotate[(triton.cdiv(rows, block_rows),)](
        x,
        cos,
        sin,
        y,
        rows,
        heads,
        seq,
        dim // 2,
        0 if cos.shape[0] == 1 else seq * dim,  # one cos/sin row shared by the batch (Gemma 3)
        TRANSPOSE=transpose,
        ROWS=block_rows,
        HALF=max(16, triton.next_power_of_2(dim // 2)),
    )
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate_launch(q, cos, sin, False), _rotate_launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_launch(dq, cos, sin, True), _rotate_launch(dk, cos, sin, True), None, None


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` for q, k (batch, heads, seq, dim)."""
    if unsqueeze_dim != 1:
        raise ValueError("apply_rotary expects q and k as (batch, heads, seq, dim)")
    if cos.dim() == 2:  # (seq, dim) shared by the batch
        cos, sin = cos[None], sin[None]
    if cos.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"cos/sin batch {cos.shape[0]} fits neither 1 nor q's {q.shape[0]}")
    return RotaryFunction.apply(q, k, cos.to(q.dtype), sin.to(q.dtype))
