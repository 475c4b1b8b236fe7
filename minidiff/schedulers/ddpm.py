"""Chapter 9.2 — DDPM: ancestral sampling (Ho et al., 2020).

Notation (code -> paper):
    alpha_prod_t         ᾱ_t            alpha_prod_t_prev   ᾱ_{t'}  (t' = the previous visited timestep; t-1 with all T)
    current_alpha_t      α_t = ᾱ_t / ᾱ_{t'}    current_beta_t  β_t = 1 - α_t   (one "strided" step t -> t')
    pred_original_sample x̂_0            model_output        ε_θ(x_t, t)
    variance             σ_t²           noise               z ~ N(0, I)

Reverse step = sample the posterior q(x_{t'} | x_t, x_0) with x_0 replaced by the network's estimate x̂_0:
    x̂_0 = (x_t - √(1-ᾱ_t) ε_θ) / √ᾱ_t                                                    (eq. 15)
    μ̃_t = √ᾱ_{t'} β_t / (1-ᾱ_t) · x̂_0  +  √α_t (1-ᾱ_{t'}) / (1-ᾱ_t) · x_t                 (eq. 7)
    x_{t'} = μ̃_t + σ_t z          (no noise at the last step, t = 0)
    σ_t² = β̃_t = (1-ᾱ_{t'}) / (1-ᾱ_t) · β_t   "fixed_small" (the true posterior variance)  (sec. 3.2)
    σ_t² = β_t                                "fixed_large" (the prior's; same results for DDPM, sec. 3.2)
DDPM is stochastic and needs many steps (the posterior is only Gaussian for small β_t); few-step sampling is DDIM's job.
"""
from __future__ import annotations

import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, randn


class DDPMScheduler(Scheduler):
    """Ancestral DDPM sampler; also the usual scheduler for training (add_noise / get_velocity)."""

    class_name = "DDPMScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "variance_type": "fixed_small", "clip_sample": False, "clip_sample_range": 1.0,
                "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
                "rescale_betas_zero_snr": False}
    choices = {"variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
               "prediction_type": ("epsilon", "v_prediction", "sample"),
               "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {"thresholding": False}

    def previous_timestep(self, t):
        """t' — the timestep after t in self.timesteps (-1 after the last one); t - 1 before set_timesteps."""
        if self.num_inference_steps is None:
            return t - 1
        i = (self.timesteps == t).nonzero(as_tuple=True)[0][0]
        return torch.tensor(-1) if i == len(self.timesteps) - 1 else self.timesteps[i + 1]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t -> x_{t'}. model_output, sample: [B, C, H, W] -> [B, C, H, W].
        noise: the z of this step (drawn from `generator` as diffusers does when None)."""
        t = timestep
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]                                                  # ᾱ_t
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one           # ᾱ_{t'}
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev                # 1-ᾱ_t, 1-ᾱ_{t'}
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev                                     # α_t
        current_beta_t = 1 - current_alpha_t                                                   # β_t

        pred_original_sample, _ = self._x0_and_eps(model_output, sample, alpha_prod_t)         # x̂_0, eq. 15
        if self._settings["clip_sample"]:  # pixel-space models: x_0 lives in [-1, 1]
            r = self._settings["clip_sample_range"]
            pred_original_sample = pred_original_sample.clamp(-r, r)

        # μ̃_t, eq. 7
        pred_original_sample_coeff = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        if t > 0:  # + σ_t z
            if noise is None:
                noise = randn(model_output.shape, generator=generator, device=model_output.device,
                              dtype=model_output.dtype)
            prev_sample = prev_sample + self._std(current_beta_t, alpha_prod_t, alpha_prod_t_prev) * noise
        return prev_sample

    def _std(self, current_beta_t, alpha_prod_t, alpha_prod_t_prev):
        """σ_t for the configured variance_type."""
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t  # β̃_t
        variance = torch.clamp(variance, min=1e-20)  # β̃ is 0 at t = 0; keep the log finite
        kind = self._settings["variance_type"]
        if kind == "fixed_small":
            return variance ** 0.5
        if kind == "fixed_small_log":  # the same σ, computed through the log as in the original code
            return torch.exp(0.5 * torch.log(variance))
        return current_beta_t ** 0.5   # fixed_large: σ_t² = β_t
