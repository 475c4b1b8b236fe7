"""GroupNorm(+SiLU) and LayerNorm as Triton kernels, forward and backward (imported by kernels/triton.py only when
triton is installed).

Both norms standardize a set of numbers and then scale and shift them per channel:

    μ = mean(x),   σ² = mean((x − μ)²),   x̂ = (x − μ) / √(σ² + ε),   y = x̂ ⊙ w + b

GroupNorm takes the set to be one group of C/G channels of one image (all their pixels); LayerNorm takes one token's
feature vector (the last dimension). Both are memory-bound: the kernels read x as few times as they can, keep every
sum in fp32 whatever the input dtype (bf16 has 8 bits of mantissa: a sum of 40 960 of them in bf16 would be noise),
and write y once, in x's dtype.

The backward pass of a standardization, with g = ∂L/∂x̂ (the incoming gradient times w) and N numbers in the set:

    ∂L/∂x = (1/σ) · (g − mean(g) − x̂ · mean(g ⊙ x̂))          (σ here is √(σ² + ε))
    ∂L/∂w = Σ ∂L/∂y ⊙ x̂,   ∂L/∂b = Σ ∂L/∂y                     (sums over everything that shares the channel)

(the two means are what x̂'s dependence on μ and σ takes back out of g). The forward ops save no statistics: the
backward kernels recompute μ and σ from x, which costs one more read of x and keeps each op a plain one-output
function for autograd and torch.compile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton


def _block(n: int, cap: int) -> int:
    """The tile width: n rounded up to a power of two (tl.arange needs one), at most `cap`."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


def _check_norm_args(name, x, weight, bias, channels, dim_desc):
    if weight.shape != (channels,) or bias.shape != (channels,):
        raise ValueError(f"{name}: weight and bias must have shape ({channels},) ({dim_desc}), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: x.dtype must be float32, bfloat16 or float16, got {x.dtype}")


# ------------------------------------------------------------------------------------------------------ GroupNorm
# One program per (image, channel), B·C of them (640 at SD's [2, 320, 64, 64], 2 560 at [2, 1280, 8, 8]): enough to
# fill a GPU, where one program per (image, group) would make only B·32 = 64. A group's statistics are then combined
# from its channels' (Chan, Golub & LeVeque's parallel variance): with S pixels per channel, channel means m_c and
# centered sums of squares M_c = Σ (x − m_c)², over the group's C/G channels
#
#     μ = mean_c(m_c),   σ² = (Σ_c M_c + S · Σ_c (m_c − μ)²) / N,   N = (C/G) · S
#
# which is stable in fp32 (no E[x²] − μ² cancellation). Forward: a stats kernel, then a normalize kernel (x read
# from memory twice, y written once; the stats kernel's second pass over a channel reads it from cache).
@triton.jit
def _channel_stats_kernel(x_ptr, stats_ptr, S, BLOCK_S: tl.constexpr):
    """stats[p] = (m_c, M_c) of the S pixels of channel p = b · C + c of x [B, C, S]: the mean, then the centered
    sum of squares."""
    p = tl.program_id(0)
    base = p.to(tl.int64) * S               # int64: B·C·S may pass 2³¹ for big VAE decodes
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        acc += tl.load(x_ptr + base + offs, mask=offs < S, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / S
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        x = tl.load(x_ptr + base + offs, mask=offs < S, other=0.0).to(tl.float32)
        d = tl.where(offs < S, x - mean, 0.0)
        acc += d * d
    tl.store(stats_ptr + 2 * p, mean)
    tl.store(stats_ptr + 2 * p + 1, tl.sum(acc, axis=0))


@triton.jit
def _group_of(p, C, cpg, BLOCK_G: tl.constexpr):
    """The channels (as indices b · C + c, a [BLOCK_G] vector and its mask) of the group that channel p belongs to."""
    first = p - (p % C) % cpg               # the group's first channel: its channels are contiguous
    k = tl.arange(0, BLOCK_G)
    return first + k, k < cpg


@triton.jit
def _group_moments(stats_ptr, p, C, S, cpg, eps, BLOCK_G: tl.constexpr):
    """μ and 1/√(σ² + ε) of channel p's group, from its channels' (m_c, M_c) (the formula above)."""
    chans, mask = _group_of(p, C, cpg, BLOCK_G)
    m = tl.load(stats_ptr + 2 * chans, mask=mask, other=0.0)
    m2 = tl.load(stats_ptr + 2 * chans + 1, mask=mask, other=0.0)
    mean = tl.sum(m, axis=0) / cpg
    d = tl.where(mask, m - mean, 0.0)
    var = (tl.sum(m2, axis=0) + S * tl.sum(d * d, axis=0)) / (cpg * S)
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _group_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, stats_ptr, y_ptr, C, S, cpg, eps, SILU: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr):
    """y = SiLU?(x̂ w[c] + b[c]) over the S pixels of channel p = b · C + c (w[c], b[c]: two scalars)."""
    p = tl.program_id(0)
    mean, rstd = _group_moments(stats_ptr, p, C, S, cpg, eps, BLOCK_G)
    w = tl.load(w_ptr + p % C).to(tl.float32)
    b = tl.load(b_ptr + p % C).to(tl.float32)
    base = p.to(tl.int64) * S
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        mask = offs < S
        z = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd * w + b
        if SILU:
            z = z * tl.sigmoid(z)           # SiLU(z) = z σ(z)
        tl.store(y_ptr + base + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _x_hat_and_dz(x_ptr, dy_ptr, at, mask, mean, rstd, w, b, SILU: tl.constexpr):
    """x̂ and dz = ∂L/∂z at the positions `at` (z = x̂ w + b; masked positions give dz = 0)."""
    x_hat = (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dz = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        s = tl.sigmoid(x_hat * w + b)
        dz = dz * s * (1.0 + (x_hat * w + b) * (1.0 - s))   # d/dz z σ(z) = σ(z)(1 + z(1 − σ(z)))
    return x_hat, dz


# Backward, with z = x̂ w + b, dz = ∂L/∂z (= dy, or through the SiLU) and g = dz · w[c] = ∂L/∂x̂:
#   kernel A, per channel:  Σ dz and Σ dz x̂ over its pixels -> db_part[b, c], dw_part[b, c]
#   kernel B, per channel:  mean(g) = Σ_c w[c] Σ dz / N,  mean(g x̂) = Σ_c w[c] Σ dz x̂ / N over its group (from A's
#                           sums), then dx = rstd · (g − mean(g) − x̂ · mean(g x̂)) over its pixels
# and the host sums dw_part, db_part over the images ([B, C]: cheap and deterministic, unlike atomics).
@triton.jit
def _group_norm_bwd_sums_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, stats_ptr, dw_part_ptr, db_part_ptr, C, S, cpg, eps,
                                SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr):
    """Kernel A: Σ dz, Σ dz x̂ over channel p's pixels."""
    p = tl.program_id(0)
    mean, rstd = _group_moments(stats_ptr, p, C, S, cpg, eps, BLOCK_G)
    w = tl.load(w_ptr + p % C).to(tl.float32)
    b = tl.load(b_ptr + p % C).to(tl.float32)
    base = p.to(tl.int64) * S
    acc_dz = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK_S], dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        x_hat, dz = _x_hat_and_dz(x_ptr, dy_ptr, base + offs, offs < S, mean, rstd, w, b, SILU)
        acc_dz += dz                        # masked lanes have dz = 0: they add nothing
        acc_dzx += dz * x_hat
    tl.store(db_part_ptr + p, tl.sum(acc_dz, axis=0))
    tl.store(dw_part_ptr + p, tl.sum(acc_dzx, axis=0))


@triton.jit
def _group_norm_bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, stats_ptr, dw_part_ptr, db_part_ptr, dx_ptr, C, S, cpg,
                              eps, SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr):
    """Kernel B: ∂L/∂x over channel p's pixels."""
    p = tl.program_id(0)
    mean, rstd = _group_moments(stats_ptr, p, C, S, cpg, eps, BLOCK_G)
    chans, gmask = _group_of(p, C, cpg, BLOCK_G)
    w_g = tl.load(w_ptr + chans % C, mask=gmask, other=0.0).to(tl.float32)   # the group's weights
    N = cpg * S
    mean_g = tl.sum(w_g * tl.load(db_part_ptr + chans, mask=gmask, other=0.0), axis=0) / N
    mean_gx = tl.sum(w_g * tl.load(dw_part_ptr + chans, mask=gmask, other=0.0), axis=0) / N
    w = tl.load(w_ptr + p % C).to(tl.float32)
    b = tl.load(b_ptr + p % C).to(tl.float32)
    base = p.to(tl.int64) * S
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        mask = offs < S
        x_hat, dz = _x_hat_and_dz(x_ptr, dy_ptr, base + offs, mask, mean, rstd, w, b, SILU)
        dx = rstd * (dz * w - mean_g - x_hat * mean_gx)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _group_norm_launch(x, num_groups):
    """(B, C, S, the launch grid, the block sizes and warps) shared by the forward and backward ops, and the
    per-channel statistics of x [B·C, 2] (the first kernel of both)."""
    B, C = x.shape[:2]
    S = x[0, 0].numel()                     # pixels per channel
    block_s = _block(S, 1024)               # SD: 64 (8×8) to 4 096 (64×64) pixels, in ≤ 1024-wide tiles
    meta = dict(BLOCK_S=block_s, num_warps=max(1, min(4, block_s // 256)))
    stats = torch.empty((B * C, 2), dtype=torch.float32, device=x.device)
    wrap_triton(_channel_stats_kernel)[(B * C,)](x, stats, S, **meta)
    meta["BLOCK_G"] = triton.next_power_of_2(C // num_groups)   # a group's channels as one vector (SD: 10 to 40)
    return B, C, S, stats, meta


def _check_group_norm(x, weight, bias, num_groups):
    if x.dim() < 2:
        raise ValueError(f"group_norm: x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must be positive and divide the {C} channels")
    _check_norm_args("group_norm", x, weight, bias, C, "one per channel")


@triton_op("minidiff::group_norm", mutates_args={})
def group_norm(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, silu: bool) -> Tensor:
    """GroupNorm(x) (then SiLU(·) when silu) = F.group_norm(x, num_groups, weight, bias, eps) [+ F.silu].

    x [B, C, *spatial] (fp32 / bf16 / fp16; sums in fp32), weight, bias [C] -> [B, C, *spatial] in x's dtype."""
    _check_group_norm(x, weight, bias, num_groups)
    x = x.contiguous()                      # [B, C, *spatial] seen as [B·C, S]: one row per (image, channel)
    B, C, S, stats, meta = _group_norm_launch(x, num_groups)
    y = torch.empty_like(x)
    wrap_triton(_group_norm_fwd_kernel)[(B * C,)](x, weight.contiguous(), bias.contiguous(), stats, y, C, S,
                                                  C // num_groups, eps, SILU=silu, **meta)
    return y


@triton_op("minidiff::group_norm_backward", mutates_args={})
def group_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float,
                        silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂x, ∂L/∂weight, ∂L/∂bias) of group_norm, given grad = ∂L/∂y (the statistics are recomputed)."""
    grad, x, weight, bias = grad.contiguous(), x.contiguous(), weight.contiguous(), bias.contiguous()
    B, C, S, stats, meta = _group_norm_launch(x, num_groups)
    dw_part = torch.empty((B, C), dtype=torch.float32, device=x.device)   # per image; summed below
    db_part = torch.empty((B, C), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    cpg = C // num_groups
    wrap_triton(_group_norm_bwd_sums_kernel)[(B * C,)](grad, x, weight, bias, stats, dw_part, db_part, C, S, cpg,
                                                       eps, SILU=silu, **meta)
    wrap_triton(_group_norm_bwd_dx_kernel)[(B * C,)](grad, x, weight, bias, stats, dw_part, db_part, dx, C, S, cpg,
                                                     eps, SILU=silu, **meta)
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(bias.dtype)


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (num_groups, eps, silu)


def _group_norm_bwd(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = group_norm_backward(grad, x, weight, bias, *ctx.args)
    return dx, dw, db, None, None, None


group_norm.register_autograd(_group_norm_bwd, setup_context=_group_norm_setup)


# ------------------------------------------------------------------------------------------------------ LayerNorm
@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
    """y = x̂ ⊙ w + b for one row (token) of N features per program; the whole row sits in registers (BLOCK ≥ N),
    so x is read once."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, (d * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, db_part_ptr, M, N, eps,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """∂L/∂x for ROWS consecutive rows per program, and those rows' share of ∂L/∂w = Σ dy x̂, ∂L/∂b = Σ dy
    (accumulated in registers across the rows, stored as one row of dw_part / db_part; the host sums the
    programs' rows). With g = dy ⊙ w: dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        if row < M:
            at = row.to(tl.int64) * N + offs
            x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / N
            d = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
            x_hat = d * rstd
            g = dy * w
            mean_g = tl.sum(g, axis=0) / N
            mean_gx = tl.sum(g * x_hat, axis=0) / N
            dx = rstd * (g - mean_g - x_hat * mean_gx)
            tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            acc_dw += dy * x_hat
            acc_db += dy
    tl.store(dw_part_ptr + pid * N + offs, acc_dw, mask=mask)
    tl.store(db_part_ptr + pid * N + offs, acc_db, mask=mask)


LAYER_NORM_MAX_N = 16384   # a row lives in registers: 16 384 fp32 numbers is 64 KiB per program, the practical limit


def _check_layer_norm(x, weight, bias):
    N = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or not 0 < N <= LAYER_NORM_MAX_N:
        raise ValueError(f"layer_norm: x's last dimension must be 1..{LAYER_NORM_MAX_N} (one row in registers), "
                         f"got shape {tuple(x.shape)}")
    _check_norm_args("layer_norm", x, weight, bias, N, "the last dimension")


@triton_op("minidiff::layer_norm", mutates_args={})
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dimension = F.layer_norm(x, (N,), weight, bias, eps).

    x [..., N] (fp32 / bf16 / fp16; sums in fp32), weight, bias [N] -> [..., N] in x's dtype."""
    _check_layer_norm(x, weight, bias)
    x = x.contiguous()
    N = x.shape[-1]
    M = x.numel() // N                      # rows: [..., N] -> [M, N]
    y = torch.empty_like(x)
    block = _block(N, LAYER_NORM_MAX_N)     # ≥ N: the whole row; SD's widths 320..1280 -> 512..2048
    wrap_triton(_layer_norm_fwd_kernel)[(M,)](x, weight.contiguous(), bias.contiguous(), y, N, eps, BLOCK=block,
                                              num_warps=min(max(block // 256, 1), 8))
    return y


@triton_op("minidiff::layer_norm_backward", mutates_args={})
def layer_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂x, ∂L/∂weight, ∂L/∂bias) of layer_norm, given grad = ∂L/∂y."""
    grad, x = grad.contiguous(), x.contiguous()
    N = x.shape[-1]
    M = x.numel() // N
    dx = torch.empty_like(x)
    # 16 rows a program: [2, 4096, 320] (M = 8192) runs 512 programs, and the partial sums are a [512, N] tensor
    rows = 16
    programs = triton.cdiv(M, rows)
    dw_part = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    block = _block(N, LAYER_NORM_MAX_N)
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](grad, x, weight.contiguous(), dx, dw_part, db_part, M, N, eps,
                                                     ROWS=rows, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype


def _layer_norm_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, db = layer_norm_backward(grad, x, weight, ctx.eps)
    return dx, dw, db.to(ctx.bias_dtype), None


layer_norm.register_autograd(_layer_norm_bwd, setup_context=_layer_norm_setup)
