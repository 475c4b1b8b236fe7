"""GEGLU and the matmul epilogue (bias, GELU, residual) as Triton kernels, forward and backward (imported by
kernels/triton.py only when triton is installed).

Both are elementwise: each output number depends on one or two input numbers, so a kernel is one read of the inputs
and one write of the output, the math in fp32 registers in between. The GELU is the exact (erf) one, as F.gelu:

    GELU(u)  = u Φ(u) = u · ½ (1 + erf(u / √2))
    GELU'(u) = Φ(u) + u φ(u),   φ(u) = exp(−u² / 2) / √(2π)

Every kernel here works on a [BLOCK_R, BLOCK_N] tile of a row-major [R, N] matrix (the leading dimensions flattened
into rows): 16 rows × up to 128 columns, 2 048 numbers for 4 warps. A 2-D tile gives each number its row and column
without an integer division (a flat index would need i // N and i % N for every number: dozens of instructions
each on a GPU, in a kernel that should do nothing but move memory), a row of 128 neighbours is one coalesced read,
and a column sum (∂L/∂bias) is one tl.sum over the tile's rows. At SD's [2, 4096, 320] that is 512 × 3 programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

BLOCK_R = 16


def _grid(R: int, N: int):
    """(the launch grid, BLOCK_N) for tiles of BLOCK_R rows × BLOCK_N columns over an [R, N] matrix."""
    block_n = min(triton.next_power_of_2(N), 128)
    return (triton.cdiv(R, BLOCK_R), triton.cdiv(N, block_n)), block_n


@triton.jit
def _tile(R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows [BLOCK_R], columns [BLOCK_N] and in-bounds mask [BLOCK_R, BLOCK_N]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, (rows[:, None] < R) & (cols[None, :] < N)


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))          # u Φ(u); 0.7071… = 1/√2


@triton.jit
def _gelu_grad(u):
    phi = tl.exp(-0.5 * u * u) * 0.3989422804014327                  # φ(u); 0.3989… = 1/√(2π)
    return 0.5 * (1.0 + tl.erf(u * 0.7071067811865476)) + u * phi     # Φ(u) + u φ(u)


def _check_dtype(name, t):
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: dtype must be float32, bfloat16 or float16, got {t.dtype}")


# ------------------------------------------------------------------------------------------------------------ GEGLU
@triton.jit
def _geglu_fwd_kernel(h_ptr, out_ptr, R, n, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r, j] = a · GELU(gate) with a = h[r, j], gate = h[r, n + j]: h is [R, 2n], out is [R, n]."""
    rows, cols, mask = _tile(R, n, BLOCK_R, BLOCK_N)
    at_h = rows[:, None].to(tl.int64) * (2 * n) + cols[None, :]      # the value half of h; the gate is n further
    at_out = rows[:, None].to(tl.int64) * n + cols[None, :]
    a = tl.load(h_ptr + at_h, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + at_h + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + at_out, (a * _gelu(gate)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(dout_ptr, h_ptr, dh_ptr, R, n, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """∂L/∂a = dout · GELU(gate),  ∂L/∂gate = dout · a · GELU'(gate); the same tiles as the forward kernel."""
    rows, cols, mask = _tile(R, n, BLOCK_R, BLOCK_N)
    at_h = rows[:, None].to(tl.int64) * (2 * n) + cols[None, :]
    at_out = rows[:, None].to(tl.int64) * n + cols[None, :]
    a = tl.load(h_ptr + at_h, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + at_h + n, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + at_out, mask=mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + at_h, (dout * _gelu(gate)).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + at_h + n, (dout * a * _gelu_grad(gate)).to(dh_ptr.dtype.element_ty), mask=mask)


@triton_op("minidiff::geglu", mutates_args={})
def geglu(h: Tensor) -> Tensor:
    """GEGLU's gating, after its projection: h [..., 2n] -> h[..., :n] · GELU(h[..., n:]) [..., n]
    (= `a, gate = h.chunk(2, -1); a * F.gelu(gate)`: the first half is the value, the second the gate)."""
    _check_dtype("geglu", h)
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu: h's last dimension must be even (value and gate halves), got {tuple(h.shape)}")
    h = h.contiguous()
    n = h.shape[-1] // 2
    out = h.new_empty((*h.shape[:-1], n))
    R = out.numel() // n                    # rows: [..., 2n] -> [R, 2n]
    grid, block_n = _grid(R, n)
    wrap_triton(_geglu_fwd_kernel)[grid](h, out, R, n, BLOCK_R=BLOCK_R, BLOCK_N=block_n, num_warps=4)
    return out


@triton_op("minidiff::geglu_backward", mutates_args={})
def geglu_backward(grad: Tensor, h: Tensor) -> Tensor:
    """∂L/∂h [..., 2n] of geglu, given grad = ∂L/∂out [..., n]."""
    grad, h = grad.contiguous(), h.contiguous()
    dh = torch.empty_like(h)
    n = h.shape[-1] // 2
    R = grad.numel() // n
    grid, block_n = _grid(R, n)
    wrap_triton(_geglu_bwd_kernel)[grid](grad, h, dh, R, n, BLOCK_R=BLOCK_R, BLOCK_N=block_n, num_warps=4)
    return dh


def _geglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _geglu_bwd(ctx, grad):
    (h,) = ctx.saved_tensors
    return geglu_backward(grad, h)


geglu.register_autograd(_geglu_bwd, setup_context=_geglu_setup)


# -------------------------------------------------------------------------------------------- bias, GELU, residual
@triton.jit
def _bias_act_residual_fwd_kernel(y_ptr, bias_ptr, res_ptr, out_ptr, R, N, HAS_BIAS: tl.constexpr,
                                  GELU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr,
                                  BLOCK_N: tl.constexpr):
    """out = act(y + bias) + residual on a tile of y [R, N]. The flags are constexpr: each combination compiles to
    its own kernel with no branch left in it."""
    rows, cols, mask = _tile(R, N, BLOCK_R, BLOCK_N)
    at = rows[:, None].to(tl.int64) * N + cols[None, :]                # [BLOCK_R, BLOCK_N]
    z = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]   # one row, broadcast
    if GELU:
        z = _gelu(z)
    if HAS_RES:
        z += tl.load(res_ptr + at, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(dout_ptr, y_ptr, bias_ptr, dy_ptr, dbias_part_ptr, R, N, HAS_BIAS: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = dout · GELU'(y + bias) on a tile; ∂L/∂y = dz, and the tile's column sums of dz go to
    dbias_part[tile row, columns] (the host sums those rows: ∂L/∂bias = Σ_r dz[r, :], deterministic, no atomics)."""
    rows, cols, mask = _tile(R, N, BLOCK_R, BLOCK_N)
    at = rows[:, None].to(tl.int64) * N + cols[None, :]                # [BLOCK_R, BLOCK_N]
    z = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    dz = tl.load(dout_ptr + at, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(z)
    tl.store(dy_ptr + at, dz.to(dy_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + tl.program_id(0) * N + cols, tl.sum(dz, axis=0), mask=cols < N)   # masked dz are 0


def _check_bias_act_residual(y, bias, residual):
    _check_dtype("bias_act_residual", y)
    if y.dim() == 0:
        raise ValueError("bias_act_residual: y must have at least one dimension, got a scalar")
    if bias is not None and bias.shape != y.shape[-1:]:
        raise ValueError(f"bias_act_residual: bias must have shape ({y.shape[-1]},) (y's last dimension), got "
                         f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"bias_act_residual: residual must have y's shape {tuple(y.shape)}, got "
                         f"{tuple(residual.shape)}")


@triton_op("minidiff::bias_act_residual", mutates_args={})
def bias_act_residual(y: Tensor, bias: Tensor | None = None, gelu: bool = False,
                      residual: Tensor | None = None) -> Tensor:
    """The epilogue after a matmul y = x Wᵀ: out = act(y + bias) + residual, act = GELU (erf) when gelu else identity.

    y [..., N], bias [N] | None, residual [..., N] (y's shape) | None -> [..., N] in y's dtype (math in fp32)."""
    _check_bias_act_residual(y, bias, residual)
    y = y.contiguous()
    out = torch.empty_like(y)
    N = y.shape[-1]
    R = y.numel() // N                      # rows: [..., N] -> [R, N]
    grid, block_n = _grid(R, N)
    wrap_triton(_bias_act_residual_fwd_kernel)[grid](
        y, y if bias is None else bias.contiguous(), y if residual is None else residual.contiguous(), out, R, N,
        HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=residual is not None, BLOCK_R=BLOCK_R, BLOCK_N=block_n,
        num_warps=4)
    return out   # (an absent bias / residual passes y as a placeholder pointer the kernel never reads)


@triton_op("minidiff::bias_gelu_backward", mutates_args={})
def bias_gelu_backward(grad: Tensor, y: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(∂L/∂y, ∂L/∂bias) through GELU(y + bias), given grad = ∂L/∂out; ∂L/∂bias is an empty tensor when bias is None.
    (The residual's gradient is grad itself, and without the GELU ∂L/∂y is grad too: no kernel needed for those.)"""
    grad, y = grad.contiguous(), y.contiguous()
    N = y.shape[-1]
    R = y.numel() // N                      # rows: [..., N] -> [R, N]
    dy = torch.empty_like(y)
    grid, block_n = _grid(R, N)             # [2, 4096, 320]: 512 × 3 programs, dbias_part [512, 320]
    has_bias = bias is not None
    # without a bias, y and dy stand in for the pointers the kernel then never touches
    dbias_part = torch.empty((grid[0], N), dtype=torch.float32, device=y.device) if has_bias else dy
    wrap_triton(_bias_gelu_bwd_kernel)[grid](grad, y, bias.contiguous() if has_bias else y, dy, dbias_part, R, N,
                                             HAS_BIAS=has_bias, BLOCK_R=BLOCK_R, BLOCK_N=block_n, num_warps=4)
    dbias = dbias_part.sum(0).to(bias.dtype) if has_bias else y.new_empty(0)
    return dy, dbias


def _bias_act_residual_setup(ctx, inputs, output):
    y, bias, gelu, residual = inputs
    ctx.gelu = gelu
    ctx.has_bias = bias is not None
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(y if gelu else None, bias if gelu else None)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_act_residual_bwd(ctx, grad):
    if ctx.gelu:
        y, bias = ctx.saved_tensors
        dy, dbias = bias_gelu_backward(grad, y, bias)
    else:                                   # identity: ∂L/∂y = grad, ∂L/∂bias = grad summed over the rows
        dy = grad
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32) if ctx.has_bias else None
    dbias = dbias.to(ctx.bias_dtype) if ctx.has_bias else None
    dres = None if ctx.res_dtype is None else grad.to(ctx.res_dtype)
    return dy, dbias, None, dres


bias_act_residual.register_autograd(_bias_act_residual_bwd, setup_context=_bias_act_residual_setup)
