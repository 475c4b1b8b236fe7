"""Training, step 2 — the objective: noise, timestep sampling, the ε / v target, min-SNR weighting.

The objective SD was trained with (Rombach et al. 2022, eq. 2; Ho et al. 2020, eq. 14): encode an image into
latents z₀ = s · E(x) (s = 0.18215), draw a timestep t ~ U{0..T-1} and noise ε ~ N(0, I), noise the latents with
the forward process, and teach the U-Net to find the noise again, given the caption y:

    z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε                                          (DDPM eq. 4, DDPMScheduler.add_noise)
    L   = E_{z₀, y, t, ε} [ w(t) · ‖ target − ε_θ(z_t, t, τ(y)) ‖² ]
    target = ε                         for an ε-prediction model (SD v1)
    target = v = √ᾱ_t ε − √(1−ᾱ_t) z₀  when the scheduler config says prediction_type = "v_prediction"

Three optional tweaks of the loss:
  * min-SNR-γ weighting (Hang et al. 2023): SNR(t) = ᾱ_t / (1−ᾱ_t); low-noise timesteps (high SNR) have easy,
    tiny losses that still pull the gradient in their own direction; cap their weight:
        w(t) = min(SNR(t), γ) / SNR(t)          (ε-prediction),      min(SNR(t), γ) / (SNR(t) + 1)   (v-prediction)
    γ = 5 is the paper's choice.
  * noise offset (Guttenberg 2023): ε ← ε + o · δ, δ ~ N(0, I) of shape [B, C, 1, 1] — a per-channel constant shift
    the model must also remove, which lets it learn very dark or very bright images.
  * caption dropout (drawn in data.SampleStream): with probability p the caption is replaced by "" — the model keeps
    learning the unconditional ε_θ(z_t, t, τ("")) that classifier-free guidance subtracts (Ho & Salimans 2022).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for timesteps t [B] -> [B]."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weights(alphas_cumprod, t, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Hang et al. 2023: w(t) = min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1) for v. [B] -> [B]."""
    s = snr(alphas_cumprod, t)
    capped = torch.clamp(s, max=gamma)
    return capped / (s + 1) if prediction_type == "v_prediction" else capped / s


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   min_snr_gamma: float | None = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """The (weighted) MSE of one batch. pred, target [B, C, h, w]; t [B] -> a scalar (fp32)."""
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))   # [B]
    return (per_sample * min_snr_weights(alphas_cumprod, t, min_snr_gamma, prediction_type)).mean()


@torch.no_grad()
def clean_latents(batch, pipe, device) -> torch.Tensor:
    """z₀ = s · (μ + σ · η) of a micro-batch: a sample of the frozen VAE's posterior (η = batch["posterior_eps"]),
    from cached moments or by encoding the pixels (in fp32, no autocast). -> [B, C, h, w]."""
    from ..vae import DiagonalGaussian
    if "moments" in batch:                                   # cached: the VAE posterior's moments
        posterior = DiagonalGaussian(_put(batch["moments"], device))
    else:
        posterior = pipe.vae.encode(_put(batch["pixel_values"], device))
    return (posterior.mean + posterior.std * _put(batch["posterior_eps"], device)) * pipe.latent_scale


def _put(x, device):
    """Host -> device without waiting for the GPU (the DataLoader pins host memory on CUDA)."""
    return x.to(device, non_blocking=True)


def micro_step_loss(batch, pipe, model, noise_sched, alphas_cumprod, prediction_type, device, autocast,
                    noise_offset: float = 0.0, min_snr_gamma: float | None = None, text_trains: bool = False):
    """One forward pass on one micro-batch -> the loss (fp32 scalar, not yet divided by grad_accum).

    batch: data.collate's dict; model(z_t, t, context) is the U-Net (or its DDP / compiled wrapper); noise_offset o
    and min_snr_gamma γ: the tweaks of the module docstring (0 / None: off). The frozen VAE runs in fp32 without
    gradients; the text encoder runs with gradients only when part of it trains (LoRA on it, textual inversion)."""
    with torch.no_grad():
        z0 = clean_latents(batch, pipe, device)                                    # [B, C, h, w], unit variance
        noise = _put(batch["noise"], device)                                       # ε [B, C, h, w]
        if noise_offset:
            noise = noise + noise_offset * _put(batch["offset"], device)           # + o · δ [B, C, 1, 1]
        t = _put(batch["t"], device)                                               # [B]
        zt = noise_sched.add_noise(z0, noise, t)                                   # √ᾱ z₀ + √(1−ᾱ) ε
        texts = [pipe.tokenizer.expand_multi_vector(t) for t in batch["text"]]     # "<w>" -> "<w> <w>_1 ..." (TI)
        ids = _put(pipe.tokenizer(texts), device)                                  # [B, 77]; "" when dropped
        target = noise_sched.get_velocity(z0, noise, t) if prediction_type == "v_prediction" else noise
    with (nullcontext() if text_trains else torch.no_grad()), autocast():
        context = pipe.text_encoder(ids)                                           # [B, 77, d]
    with autocast():
        pred = model(zt, t, context)                                               # ε_θ(z_t, t, τ(y))
    return diffusion_loss(pred, target, t, alphas_cumprod, min_snr_gamma, prediction_type)


__all__ = ["snr", "min_snr_weights", "diffusion_loss", "clean_latents", "micro_step_loss"]
