"""Chapter 9.8 — LMS: a linear multistep solver for the σ ODE (Karras et al., 2022; k-diffusion's sample_lms).

Notation (code -> symbol), as in euler.py:
    sigmas[i]        σ_i (σ_n = 0)                    sample   x = x_0 + σ n
    derivatives      d_i, d_{i-1}, ..., the slopes dx/dσ = (x - D(x; σ)) / σ of the last `order` steps (oldest first)
    lms_coefficient  c_ij = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ

Euler uses only the current slope. A linear multistep method fits a polynomial through the last k slopes, as a
function of σ, and integrates it exactly over the step (Adams–Bashforth on a non-uniform grid):
    x_{i+1} = x_i + Σ_{j<k} c_ij d_{i-j},    ℓ_j(σ) = Π_{m<k, m≠j} (σ - σ_{i-m}) / (σ_{i-j} - σ_{i-m})
(ℓ_j is the Lagrange basis polynomial that is 1 at σ_{i-j} and 0 at the other nodes). k = min(i + 1, 4): order 4
once four slopes exist. The integrand is a polynomial, so the integral is exact here; diffusers calls
scipy.integrate.quad (also exact to rounding for a cubic).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS
from .euler import EulerDiscreteScheduler


class LMSDiscreteScheduler(EulerDiscreteScheduler):
    """Linear multistep sampler (diffusers' LMSDiscreteScheduler). Euler's σ table and timesteps (Karras σ's too);
    stateful: keeps the last `order` slopes, reset by set_timesteps."""

    class_name = "LMSDiscreteScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "use_karras_sigmas": False, "prediction_type": "epsilon",
                "timestep_spacing": "linspace", "steps_offset": 1}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"),
               "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def __init__(self, **settings):
        super().__init__(**settings)
        self.derivatives = []

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.derivatives = []

    def lms_coefficient(self, order: int, i: int, j: int) -> float:
        """c_ij = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ for the nodes σ_i, σ_{i-1}, ..., σ_{i-order+1} (see the top)."""
        s = self.sigmas.double().numpy()
        basis = np.poly1d([1.0])
        for m in range(order):
            if m != j:  # ℓ_j(σ) *= (σ - σ_{i-m}) / (σ_{i-j} - σ_{i-m})
                basis = basis * np.poly1d([1.0, -s[i - m]]) / (s[i - j] - s[i - m])
        antiderivative = basis.integ()
        return float(antiderivative(s[i + 1]) - antiderivative(s[i]))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, noise=None,
             order: int = 4) -> torch.Tensor:
        """x_i -> x_{i+1} = x_i + Σ_j c_ij d_{i-j}. model_output, sample: [B, C, H, W] -> [B, C, H, W].
        (generator / noise are accepted for a uniform interface; LMS is deterministic.)"""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        kind = self._settings["prediction_type"]
        if kind == "epsilon":
            pred_original_sample = sample - sigma * model_output
        elif kind == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        else:
            pred_original_sample = model_output

        self.derivatives.append((sample - pred_original_sample) / sigma)  # d_i = (x - D) / σ_i
        self.derivatives = self.derivatives[-order:]
        # k counts from the absolute step index, as diffusers does: started mid-schedule (image-to-image,
        # i = begin_index > 0) the first steps use order-k weights with fewer than k slopes (zip stops early)
        k = min(i + 1, order)
        coeffs = [self.lms_coefficient(k, i, j) for j in range(k)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        return prev_sample
