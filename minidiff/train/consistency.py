"""Training, step 2b — latent consistency distillation into a LoRA (`--train lcm-lora`): from 20 steps to 4.

A sampler walks the probability-flow ODE from noise z_T to an image z_0 in small steps because the ODE's path is
curved: each step follows the direction of the tangent at its start, and a long step along a curved path lands off it.
A consistency function jumps to the end of the path from ANY point of it in one call (Song et al. 2023):

    f_θ(z_t, t) = c_skip(t) · z_t + c_out(t) · x̂₀(ε_θ(z_t, t, c), z_t)          (LCM eq. 6; LCMScheduler)
    c_skip(t) = σ_d² / ((s t)² + σ_d²),  c_out(t) = s t / √((s t)² + σ_d²)      σ_d = 0.5, s = 10
    boundary condition: c_skip(0) = 1, c_out(0) = 0, so f_θ(z, 0) = z for any network

and it is taught by making two neighbouring points of one path agree (self-consistency). Latent consistency
distillation (Luo et al. 2023, Algorithm 1), as LCM-LoRA trains it (Luo et al. 2023b: θ = the base weights, frozen,
plus a LoRA; only the LoRA trains), one micro-batch:

    1. z₀ = the image's latents; t_{n+k} from the solver grid; z_{t_{n+k}} = √ᾱ z₀ + √(1−ᾱ) ε     (forward process)
    2. the teacher (the base U-Net: the LoRA switched off) takes one guided DDIM step of k timesteps:
           ε̂ = ε_θ₀(z, t_{n+k}, ∅) + s · (ε_θ₀(z, t_{n+k}, c) − ε_θ₀(z, t_{n+k}, ∅))      guidance s ~ U[s_min, s_max]
           x̂₀, ε̂ read from the guided output;   ẑ_{t_n} = √ᾱ_{t_n} x̂₀ + √(1−ᾱ_{t_n}) ε̂       (DDIM, η = 0)
    3. the target network θ⁻ (an EMA of the student's LoRA weights) maps the teacher's point to the path's end:
           target = f_{θ⁻}(ẑ_{t_n}, t_n)                                         (no gradient)
    4. the student θ (base + LoRA) maps the starting point:  pred = f_θ(z_{t_{n+k}}, t_{n+k})
    5. L = d(pred, target);  θ ← AdamW step;  θ⁻ ← μ θ⁻ + (1 − μ) θ                (train_step: optimizer, then EMA)

Notation (code -> paper):
    skip              k (--lcm-skip): the solver's step in training timesteps. The grid t = k·m − 1 (m = 1..N, N = T/k:
                      19, 39, ..., 999 for k = 20) is LCMScheduler's `original_inference_steps` grid: the sampler visits
                      only its points, so the distillation trains only on them (as diffusers' script does)
    t_start, t_end    t_{n+k} (a grid point), t_n = max(t_{n+k} − k, 0)   [B] long
    guidance          s, generate's guidance_scale (LCM's ω = s − 1); no w-embedding: LCM-LoRA bakes the guidance
                      into the weights, so the student samples at guidance 1 (one U-Net call per step)
    teacher           ε_θ₀: the same U-Net with every LoRA layer at scale 0 (`teacher`): one model, no copy
    target            θ⁻ = EMA(θ) with decay μ (--lcm-ema-decay; LCM: 0.95). The base weights are frozen, so an EMA of
                      the student's parameters IS the base plus an EMA of its LoRA's A and B; the U-Net is called
                      with the EMA's tensors in place of A and B (torch.func.functional_call: nothing copied).
                      μ = 0 is LCM-LoRA's script: the target is the student itself, without gradient
    d                 pseudo-Huber, mean over elements of √((pred − target)² + c²) − c (--lcm-loss huber, c =
                      --lcm-huber-c; Song & Dhariwal 2023), or the mean squared error (--lcm-loss l2)
    shapes            z, pred, target: [B, C, h, w]; ε̂ of the teacher's two calls: one batch [2B, C, h, w]

Why Huber by default: the loss is ≈ |pred − target| (an L1) wherever the error is above c, so a few latents far off
the teacher's path (an early student, a large guidance) do not dominate the gradient as they do under L2; near zero it
is smooth, unlike L1. Both are measured in docs/few_steps.md.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import InputValueError
from ..nn.lora import lora_layers
from .objective import clean_latents

LCM_LOSSES = ("huber", "l2")
TIMESTEP_SCALING = 10.0   # s of c_skip / c_out: LCMScheduler's default timestep_scaling


def lcm_scheduler(scheduler_config: dict, skip: int):
    """The LCMScheduler that samples what this distillation trains: the model's β schedule and prediction type, the
    solver grid of N = T / k timesteps (original_inference_steps). Raises InputValueError when k does not divide T."""
    from ..schedulers import make_scheduler
    T = scheduler_config.get("num_train_timesteps", 1000)
    if not (1 <= skip < T and T % skip == 0):
        raise InputValueError(f"lcm_skip must divide the model's {T} training timesteps (the solver grid t = k·m − 1 "
                              f"must end at T − 1 = {T - 1}) and be below {T}, e.g. 10, 20 (LCM's), 25, 50; got "
                              f"{skip} (--lcm-skip)", field="lcm_skip")
    return make_scheduler("lcm", scheduler_config, original_inference_steps=T // skip,
                          timestep_scaling=TIMESTEP_SCALING)


def lcm_scheduler_config(lcm_sched) -> dict:
    """The scheduler_config.json of the distilled model: the config of lcm_scheduler's LCMScheduler (its grid)."""
    cfg = dict(lcm_sched.config)
    cfg.pop("_use_default_values", None)
    return cfg


def solver_timesteps(t: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform draw t ∈ {0..T−1} [B] -> (t_{n+k}, t_n) [B]: t moved up to its grid point k·⌈(t+1)/k⌉ − 1 (uniform
    over the N grid points when k divides T) and the point k below it (0 below the first: the boundary)."""
    t_start = (t // skip + 1) * skip - 1
    return t_start, (t_start - skip).clamp(min=0)


def guidance_scales(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The teacher's guidance s = lo + u (hi − lo) for u ~ U[0, 1) [B] -> [B] (lo = hi: a fixed guidance)."""
    return lo + u.float() * (hi - lo)


@contextmanager
def teacher(unet):
    """Inside the block `unet` is its frozen base: every LoRA layer at scale 0, base(x) + 0 · B A x = base(x) (up to
    float rounding: a wrapped layer adds its residual after its kernel, not inside it). The same module and
    weights, no copy; the scales come back after the block."""
    layers = list(lora_layers(unet).values())
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0                   # (never merged while training, so no weight changes)
    try:
        yield unet
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def ddim_solver_step(sched, model_output: torch.Tensor, z: torch.Tensor, t_start: torch.Tensor,
                     t_end: torch.Tensor) -> torch.Tensor:
    """Ψ: one DDIM step (η = 0) from z at t_{n+k} to t_n, per sample: ẑ = √ᾱ_{t_n} x̂₀ + √(1−ᾱ_{t_n}) ε̂, with x̂₀ and
    ε̂ the two readings of the (guided) model output at t_{n+k}. [B, C, h, w] -> [B, C, h, w]."""
    ab = sched.alphas_cumprod.to(z.device)
    a_start = ab[t_start].reshape(-1, 1, 1, 1)                                  # ᾱ_{t_{n+k}} [B, 1, 1, 1]
    a_end = ab[t_end].reshape(-1, 1, 1, 1)                                      # ᾱ_{t_n}
    x0, eps = sched._x0_and_eps(model_output.float(), z, a_start)               # x̂₀, ε̂ (ε, v or x₀ prediction)
    return a_end.sqrt() * x0 + (1 - a_end).sqrt() * eps


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss: str = "huber",
                         huber_c: float = 1e-3) -> torch.Tensor:
    """d(pred, target) -> a scalar (fp32): the mean of √((x − y)² + c²) − c ("huber") or of (x − y)² ("l2")."""
    diff = pred.float() - target.float()
    if loss == "l2":
        return (diff ** 2).mean()
    if loss == "huber":
        return (torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c).mean()
    raise ValueError(f"--lcm-loss must be one of {LCM_LOSSES}, got {loss!r}")


def lcm_micro_step_loss(batch, pipe, model, sched, target_weights: dict, device, autocast, skip: int,
                        guidance: tuple[float, float], loss: str = "huber", huber_c: float = 1e-3):
    """The consistency distillation loss of one micro-batch (the module docstring's steps 1-5) -> (loss, logs).

    batch: data.collate's dict (z₀ from it as objective.py reads it; t; ε = noise; guidance_u); model(z, t, context):
    the U-Net with its LoRA (or its DDP / compiled wrapper); sched: lcm_scheduler(...) (ᾱ, c_skip / c_out, the
    prediction type); target_weights: {U-Net parameter name: tensor} of θ⁻ (the EMA's shadow), or None for the
    student itself; guidance: (s_min, s_max)."""
    unet = pipe.unet
    with torch.no_grad():
        z0 = clean_latents(batch, pipe, device)                                  # [B, C, h, w]
        t_start, t_end = solver_timesteps(batch["t"].to(device), skip)           # [B], [B]
        z = sched.add_noise(z0, batch["noise"].to(device), t_start)              # z_{t_{n+k}}
        B = z.shape[0]
        ids = pipe.tokenizer(list(batch["text"]) + [""] * B).to(device)          # [2B, 77]: prompts, then ∅
        with autocast():
            context = pipe.text_encoder(ids)                                     # [2B, 77, d]
        cond, uncond = context[:B], context[B:]
        s = guidance_scales(batch["guidance_u"].to(device), *guidance).reshape(-1, 1, 1, 1)   # [B, 1, 1, 1]
        with teacher(unet), autocast():                                          # 2. one batch: [∅; c]
            out_u, out_c = model(torch.cat([z, z]), torch.cat([t_start, t_start]), torch.cat([uncond, cond])).chunk(2)
        guided = out_u.float() + s * (out_c.float() - out_u.float())             # ε̂ guided [B, C, h, w]
        z_end = ddim_solver_step(sched, guided, z, t_start, t_end)               # ẑ_{t_n}
        with autocast():                                                         # 3. the target network θ⁻
            if target_weights is None:
                out_target = model(z_end, t_end, cond)
            else:
                out_target = torch.func.functional_call(unet, target_weights, (z_end, t_end, cond))
        target = sched.consistency_output(out_target.float(), t_end, z_end)      # f_{θ⁻}(ẑ_{t_n}, t_n)
    with autocast():
        out = model(z, t_start, cond)                                            # 4. the student, with gradient
    pred = sched.consistency_output(out.float(), t_start, z)                     # f_θ(z_{t_{n+k}}, t_{n+k})
    return consistency_distance(pred, target, loss, huber_c), {"guidance": s.mean()}


__all__ = ["LCM_LOSSES", "TIMESTEP_SCALING", "lcm_scheduler", "lcm_scheduler_config", "solver_timesteps",
           "guidance_scales", "teacher", "ddim_solver_step", "consistency_distance", "lcm_micro_step_loss"]
