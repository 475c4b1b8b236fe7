"""Chapter 9.7 — Euler ancestral: Euler on the σ ODE plus fresh noise at every step (Karras et al., 2022; k-diffusion).

Notation (code -> symbol), as in euler.py:
    sigmas[i]            σ_i, the noise level of the i-th visited timestep (σ_n = 0)
    sample               x = x_0 + σ n, the variance-exploding variable
    pred_original_sample D(x; σ_i) = x - σ_i ε_θ        the denoiser
    sigma_up, sigma_down σ_up, σ_down: the step to σ_{i+1} split into a deterministic part and fresh noise

An ancestral step goes *below* the target noise level with the ODE and then adds noise back up to it. The variance of
the DDPM posterior from σ_i to σ_{i+1} (Ho et al. 2020, eq. 7, in σ's) is
    σ_up² = σ_{i+1}² (σ_i² - σ_{i+1}²) / σ_i²,        σ_down = √(σ_{i+1}² - σ_up²)
so that  x_{i+1} = x_i + (σ_down - σ_i) d_i + σ_up z,   d_i = (x_i - D(x_i; σ_i)) / σ_i,   z ~ N(0, I),
which lands at total noise √(σ_down² + σ_up²) = σ_{i+1}. The fresh z keeps the sampler from converging: more steps
give a different picture, not a sharper one. diffusers draws z at every step, the last one (σ_up = 0) included, so
the generator advances the same way.
"""
from __future__ import annotations

import torch

from .base import SCHEDULE_DEFAULTS, randn
from .euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral sampling on SD's discrete σ's (diffusers' EulerAncestralDiscreteScheduler). Stochastic: pass a
    generator (or explicit noise) for repeatable results. The σ table and timesteps are Euler's (no Karras option,
    as in diffusers)."""

    class_name = "EulerAncestralDiscreteScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 1,
                "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction"),
               "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {}

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_i -> x_{i+1} = x_i + (σ_down - σ_i) d_i + σ_up z. model_output, sample: [B, C, H, W] -> [B, C, H, W].
        noise: z (drawn from `generator` as diffusers does when None)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma_from, sigma_to = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]  # σ_i, σ_{i+1}
        if self._settings["prediction_type"] == "epsilon":  # D = x - σ ε_θ
            pred_original_sample = sample - sigma_from * model_output
        else:  # v_prediction: D = -σ/√(σ²+1) v̂ + x/(σ²+1)
            pred_original_sample = (model_output * (-sigma_from / (sigma_from ** 2 + 1) ** 0.5)
                                    + sample / (sigma_from ** 2 + 1))

        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        derivative = (sample - pred_original_sample) / sigma_from          # d_i
        prev_sample = sample + derivative * (sigma_down - sigma_from)      # the ODE, down to σ_down
        if noise is None:
            noise = randn(model_output.shape, generator=generator, device=model_output.device,
                          dtype=model_output.dtype)
        prev_sample = prev_sample + noise * sigma_up                       # fresh noise, back up to σ_{i+1}
        self._step_index += 1
        return prev_sample.to(model_output.dtype)
