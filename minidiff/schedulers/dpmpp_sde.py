"""Chapter 9.12 — DPM-Solver++(2M) SDE: the multistep solver of dpmpp.py for the reverse SDE (Lu et al. 2022, sec. 5
and Appendix; k-diffusion's sample_dpmpp_2m_sde, AUTOMATIC1111's "DPM++ 2M SDE").

Notation (code -> paper), as in dpmpp.py:
    alpha_t, sigma_t     α_t = √ᾱ_t, σ_t = √(1-ᾱ_t) of where the step goes; sigma_s: of where it starts
    h                    λ_t - λ_s, the step in half-log-SNR λ = log(α/σ)
    D0, D1               the data prediction x_θ of this step, and its divided difference with the last one
    noise                z ~ N(0, I), fresh at every step

The ODE of dpmpp.py moves every sample deterministically. The reverse SDE adds noise as it goes and removes more
"signal-noise" in exchange; solved exactly in λ with x_θ held constant it gives the 1st-order step
    x̃_t = (σ_t/σ_s) e^{-h} x̃_s + α_t (1 - e^{-2h}) x_θ + σ_t √(1 - e^{-2h}) z
— the ODE step's weights with e^{-h} in place of 1 on the sample, and e^{-2h} in place of e^{-h} on x_θ — and the
2M step adds the multistep correction α_t (1 - e^{-2h}) D1 / 2 ("midpoint"; "heun": α_t ((1 - e^{-2h})/(-2h) + 1) D1).
The injected noise forgets some of the starting point at every step: like the ancestral samplers, more steps give a
different picture, not a sharper one; in return errors of earlier steps are forgiven. The noise is drawn at every
step, the last one included (where σ_t = 0 multiplies it away), so a generator advances as diffusers' does.
"""
from __future__ import annotations

import torch

from .base import randn
from .dpmpp import DPMSolverMultistepScheduler


class DPMSolverMultistepSDEScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++(2M) SDE: diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" (the class
    its scheduler_config.json names). Stochastic: pass a generator (or explicit noise) for repeatable results."""

    defaults = {**DPMSolverMultistepScheduler.defaults, "algorithm_type": "sde-dpmsolver++"}
    choices = {**DPMSolverMultistepScheduler.choices, "algorithm_type": ("sde-dpmsolver++",)}
    fixed = {**DPMSolverMultistepScheduler.fixed, "algorithm_type": "sde-dpmsolver++"}

    def __init__(self, **settings):
        super().__init__(**settings)
        # written out in .config even when defaulted: diffusers' class defaults to "dpmpp++", and reads a setting
        # listed in `_use_default_values` as its own default
        self._given.add("algorithm_type")

    def _noise(self, model_output, generator, noise):
        """z of this step, fp32 (drawn from `generator` as diffusers does when not given)."""
        if noise is None:
            return randn(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
        return noise.to(device=model_output.device, dtype=torch.float32)

    def _step_size(self, i_from: int):
        """(α_t, σ_t, σ_s, h) of the step from sigmas[i_from] to sigmas[i_from + 1]."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i_from + 1])
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i_from])
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
        return alpha_t, sigma_t, sigma_s, h

    def first_order_update(self, x0_pred: torch.Tensor, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """x̃_t = (σ_t/σ_s) e^{-h} x̃_s + α_t (1 - e^{-2h}) x_θ + σ_t √(1 - e^{-2h}) z."""
        alpha_t, sigma_t, sigma_s, h = self._step_size(self._step_index)
        return ((sigma_t / sigma_s * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0_pred
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def second_order_update(self, model_output_list: list, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """The 1st-order step on D0, plus α_t (1 - e^{-2h}) D1/2 ("midpoint") or α_t ((1 - e^{-2h})/(-2h) + 1) D1
        ("heun"); D1 = (x_θ,i-1 - x_θ,i-2) / r, r = h_{i-1} / h_i."""
        i = self._step_index
        alpha_t, sigma_t, sigma_s0, h = self._step_size(i)
        h_0 = self._step_size(i - 1)[3]                        # the previous step's size in λ
        m0, m1 = model_output_list[-1], model_output_list[-2]
        D0, D1 = m0, (1.0 / (h_0 / h)) * (m0 - m1)
        if self._settings["solver_type"] == "midpoint":
            correction = 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
        else:
            correction = (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        return ((sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
                + correction + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
