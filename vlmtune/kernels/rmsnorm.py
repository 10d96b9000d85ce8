"""Fused RMSNorm, forward and backward, with Gemma's ``(1 + w)`` weight as an option.

y = x / sqrt(mean(x^2) + eps) * w' where w' = w (Llama, Qwen, Mistral) or 1 + w (Gemma). One program
normalises a run of rows; the backward recomputes x_hat from x and the saved 1/rms, and each program
sums its rows' weight gradient into one partial row (summed by torch), so no per-row dW is kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """The torch reference (fp32 arithmetic, result in x's dtype)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (weight.float() + offset)).to(x.dtype)


@triton.jit
def _rms_forward(X, W, Y, RSTD, rows, cols, eps, offset, ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    w = tl.load(W + offsets, mask=mask, other=0.0).to(tl.float32) + offset
    for i in range(ROWS_PER_PROGRAM):
        row = program * ROWS_PER_PROGRAM + i
        if row < rows:
            x = tl.load(X + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / cols + eps)
            tl.store(RSTD + row, rstd)
            tl.store(Y + row * cols + offsets, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_backward(
    DY, X, W, RSTD, DX, DW, rows, cols, offset, ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr
):
    program = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < cols
    w = tl.load(W + offsets, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = program * ROWS_PER_PROGRAM + i
        if row < rows:
            x = tl.load(X + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * cols + offsets, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            wdy = w * dy
            dx = rstd * (wdy - x_hat * (tl.sum(x_hat * wdy, axis=0) / cols))
            tl.store(DX + row * cols + offsets, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
    tl.store(DW + program * cols + offsets, dw, mask=mask)


def _warps(block: int) -> int:
    """More warps for wider rows (a 4,096-wide row is 16 elements per thread at 8 warps)."""
    return min(16, max(1, block // 512))


def _launch_shape(rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program): a few programs per SM on CUDA, few large ones in the interpreter."""
    programs = (
        torch.cuda.get_device_properties(device).multi_processor_count * 4 if device.type == "cuda" else 4
    )
    per_program = triton.cdiv(rows, min(programs, rows))
    return triton.cdiv(rows, per_program), per_program


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        programs, per_program = _launch_shape(rows, x.device)
        block = triton.next_power_of_2(cols)
        _rms_forward[(programs,)](
            x2,
            weight,
            y,
            rstd,
            rows,
            cols,
            float(eps),
            float(offset),
            ROWS_PER_PROGRAM=per_program,
            BLOCK=block,
            num_warps=_warps(block),
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape, ctx.launch = float(offset), shape, (programs, per_program, block)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        programs, per_program, block = ctx.launch
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        dw_partial = torch.empty(programs, cols, dtype=torch.float32, device=x2.device)
        _rms_backward[(programs,)](
            dy2,
            x2,
            weight,
            rstd,
            dx,
            dw_partial,
            rows,
            cols,
            ctx.offset,
            ROWS_PER_PROGRAM=per_program,
            BLOCK=block,
            num_warps=_warps(block),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.reshape(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm through the kernel; ``offset=1.0`` is Gemma's ``(1 + w)``."""
    return RMSNormFunction.apply(x, weight, eps, offset)
