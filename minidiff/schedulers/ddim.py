"""Chapter 9.4 — DDIM: denoising diffusion implicit models (Song et al., 2021).

Notation (code -> paper; the paper writes ᾱ as α):
    alpha_prod_t, alpha_prod_t_prev   ᾱ_t, ᾱ_{t'}   (t' = t - T/n, the next visited t; ᾱ_{-1} = final_alpha_cumprod)
    pred_original_sample              x̂_0 = (x_t - √(1-ᾱ_t) ε_θ) / √ᾱ_t          "predicted x_0"
    pred_epsilon                      ε_θ(x_t, t)
    std_dev_t                         σ_t = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t'})                       (eq. 16)
    eta                               η: 0 = deterministic DDIM, 1 = DDPM's ancestral sampler
    noise                             ε_t ~ N(0, I)

Any family of non-Markovian forward processes with the same marginals q(x_t|x_0) trains the same ε_θ; sampling
one of them gives (eq. 12)
    x_{t'} = √ᾱ_{t'} x̂_0  +  √(1-ᾱ_{t'}-σ_t²) ε_θ  +  σ_t ε_t
              "predicted x_0"   "direction pointing to x_t"   random noise
With η = 0 the map x_T -> x_0 is deterministic (an ODE discretisation, so it survives large strides: 50 steps
instead of 1000) and invertible.
"""
from __future__ import annotations

import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, randn


class DDIMScheduler(Scheduler):
    """DDIM sampler; `eta` is a step() argument (as in diffusers)."""

    class_name = "DDIMScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
                "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"),
               "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {"thresholding": False}

    def __init__(self, **settings):
        super().__init__(**settings)
        # ᾱ after the last step: 1 (a clean image) or ᾱ_0 (what SD v1 was trained with: set_alpha_to_one=False)
        self.final_alpha_cumprod = torch.tensor(1.0) if self._settings["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _variance(self, timestep, prev_timestep):
        """σ_t² / η² = (1-ᾱ_{t'})/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_{t'}): the DDPM posterior variance β̃ of a strided step."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, generator=None,
             noise: torch.Tensor | None = None, use_clipped_model_output: bool = False) -> torch.Tensor:
        """x_t -> x_{t'} (eq. 12). model_output, sample: [B, C, H, W] -> [B, C, H, W].
        noise: ε_t for eta > 0 (drawn from `generator` as diffusers does when None)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        # t' = t - T/n whatever the spacing (as diffusers does)
        prev_timestep = timestep - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        pred_original_sample, pred_epsilon = self._x0_and_eps(model_output, sample, alpha_prod_t)
        if self._settings["clip_sample"]:
            r = self._settings["clip_sample_range"]
            pred_original_sample = pred_original_sample.clamp(-r, r)

        std_dev_t = eta * self._variance(timestep, prev_timestep) ** 0.5            # σ_t, eq. 16
        if use_clipped_model_output:  # re-derive ε from the clipped x̂_0 (as in Glide)
            pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5

        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * pred_epsilon  # √(1-ᾱ_{t'}-σ²) ε_θ
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:  # + σ_t ε_t
            if noise is None:
                noise = randn(model_output.shape, generator=generator, device=model_output.device,
                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample
