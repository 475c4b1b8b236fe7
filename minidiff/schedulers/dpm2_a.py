"""Chapter 9.11 — DPM2 ancestral: the midpoint step of dpm2.py, aimed below the next σ, plus fresh noise
(k-diffusion's sample_dpm_2_ancestral).

Notation (code -> symbol), as in dpm2.py and euler_a.py:
    sigmas[k]                σ_k (σ_n = 0)                        sample   x = x_0 + σ n
    sigmas_up, sigmas_down   σ_up, σ_down of the step σ_k -> σ_{k+1}: σ_up² = σ_{k+1}² (σ_k² - σ_{k+1}²) / σ_k²,
                             σ_down = √(σ_{k+1}² - σ_up²)   (the DDPM posterior's split, as in euler_a.py)
    sigmas_mid[k]            √(σ_k σ_down): the midpoint in log σ of the deterministic part

As Euler ancestral does with Euler, the ODE part of the step goes only down to σ_down, by the midpoint method, and
fresh noise z ~ N(0, I) brings the total back up to σ_{k+1}:
    x_mid   = x_k + (σ_mid - σ_k) · d(x_k; σ_k)
    x_{k+1} = x_k + (σ_down - σ_k) · d(x_mid; σ_mid) + σ_up z
One z per step, drawn at its second call (none at the last step, a plain Euler step to σ = 0). The timesteps list
is dpm2.py's with these midpoints: t_0, t_mid 0, t_1, ..., t_mid n-2, t_{n-1}.
"""
from __future__ import annotations

import torch

from .base import denoised_ve, randn
from .dpm2 import KDPM2DiscreteScheduler, log_midpoint


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """DPM2 ancestral (k-diffusion's "DPM2 a", diffusers' KDPM2AncestralDiscreteScheduler). Stochastic: pass a
    generator (or explicit noise) for repeatable results."""

    class_name = "KDPM2AncestralDiscreteScheduler"

    def _midpoints(self) -> torch.Tensor:
        """σ_up, σ_down [n] of every step (kept), and the σ_mid [n] between σ_k and σ_down (returned)."""
        sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]                                    # σ_k, σ_{k+1}
        self.sigmas_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        self.sigmas_down = (sigma_next ** 2 - self.sigmas_up ** 2) ** 0.5
        return log_midpoint(sigma, self.sigmas_down)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """One network call: x_k -> x_mid, or x_mid -> x_{k+1} with fresh noise (see the top).
        [B, C, H, W] -> [B, C, H, W]. noise: z of the second call (drawn from `generator` as diffusers does when
        None)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index // 2
        sigma, sigma_mid = self.sigmas[k], self.sigmas_mid[k]
        kind = self._settings["prediction_type"]
        if self.state_in_first_order:  # x_mid = x_k + (σ_mid - σ_k) d(x_k; σ_k)
            derivative = (sample - denoised_ve(model_output, sample, sigma, kind)) / sigma
            self.sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:                          # x_{k+1} = x_k + (σ_down - σ_k) d(x_mid; σ_mid) + σ_up z
            derivative = (sample - denoised_ve(model_output, sample, sigma_mid, kind)) / sigma_mid
            prev_sample = self.sample + derivative * (self.sigmas_down[k] - sigma)
            self.sample = None
            if noise is None:
                noise = randn(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                              generator=generator)
            prev_sample = prev_sample + noise * self.sigmas_up[k]
        self._step_index += 1
        return prev_sample
