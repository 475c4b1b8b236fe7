"""Chapter 9.9 — Heun: Euler with a correction, the 2nd-order solver of Karras et al. 2022 (Algorithm 1).

Notation (code -> paper), as in euler.py:
    sigmas[k]            σ_k, the noise level of step k (k = 0..n-1), then σ_n = 0
    sample               x = x_0 + σ n, the variance-exploding variable
    derivative           d_k = (x_k - D(x_k; σ_k)) / σ_k, the ODE's slope dx/dσ at the start of the step
    dt                   σ_{k+1} - σ_k
    prev_derivative      d_k, kept for the corrector;  self.sample: x_k, kept too

Euler takes the slope at the start of a step and walks the whole step on it. Heun walks it once (the predictor,
x̃ = x_k + (σ_{k+1} - σ_k) d_k), asks the network for the slope d'_k there, and redoes the step on the average slope
(the trapezoidal rule, Algorithm 1 lines 5-8):
    x_{k+1} = x_k + (σ_{k+1} - σ_k) · (d_k + d'_k) / 2,     d'_k = (x̃ - D(x̃; σ_{k+1})) / σ_{k+1}
That costs two network calls per step and is 2nd-order accurate: the error per step falls as h³, not h². The last
step ends at σ = 0, where d' is undefined, so it is a plain Euler step (Algorithm 1, line 9): n steps, 2n - 1 calls.

A 2nd-order sampler in diffusers' pipelines (order = 2): `timesteps` lists each step's timestep once per network
call, t_0, t_1, t_1, t_2, t_2, ..., t_{n-1}, t_{n-1}; the corrector of step k evaluates the network at t_{k+1}, the
time of the predictor's landing point. Call j of that list works at σ_{(j+1)//2}: that is what scale_model_input and
add_noise read. Image to image cuts whole steps, 2·t_start entries (diffusers' get_timesteps: t_start · order).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, denoised_ve, per_sample, sigma_init_noise, sigma_schedule


def interleave(first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """[a_0] + [b_1, c_1, b_2, c_2, ...]: the predictor's and the corrector's entries of a 2nd-order timestep list.
    first: [1]; later: [n-1, 2] (b_k, c_k per row) -> [2n-1]."""
    return torch.cat([first, later.flatten()])  # [n-1, 2] -> [2(n-1)]: b_1, c_1, b_2, c_2, ...


class SecondOrderDiscreteScheduler(Scheduler):
    """What Heun and DPM2 share: Euler's σ table (k-diffusion's discrete σ's, Karras optional), 2 network calls per
    step in one interleaved timestep list, the position `step_index` in that list, and x = x_0 + σ n."""

    order = 2
    round_karras_timesteps = False  # Karras σ's: t = the σ's fractional t (Heun), or rounded to an integer (DPM2)
    defaults = {**SCHEDULE_DEFAULTS, "prediction_type": "epsilon", "use_karras_sigmas": False,
                "timestep_spacing": "linspace", "steps_offset": 1}
    choices = {"prediction_type": ("epsilon", "v_prediction"), "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def __init__(self, **settings):
        super().__init__(**settings)
        self.set_timesteps(self.num_train_timesteps)  # until set_timesteps is called: every t (as diffusers)
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self) -> float:
        """Std of x_N: σ_max, or √(σ_max² + 1) for "leading" (as diffusers)."""
        return sigma_init_noise(self.sigmas, self._settings["timestep_spacing"])

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a step's first (the predictor), False when it is the corrector."""
        return self.sample is None

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(t [n] float32, σ [n+1] float32 ending in 0) of the n steps."""
        timesteps, sigmas = sigma_schedule(self.alphas_cumprod, n, self._settings)
        if self.round_karras_timesteps and self._settings["use_karras_sigmas"]:
            timesteps = timesteps.round()
        return timesteps.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)


    def _call_sigma(self, j: int) -> torch.Tensor:
        """σ of the step call j of the interleaved list belongs to: σ_{(j+1)//2} (see the top of heun.py)."""
        return self.sigmas[(j + 1) // 2]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x_0 + σ n at the σ of the call chosen as Scheduler._noise_indices says. [B, C, H, W] -> [B, C, H, W]."""
        idx = self._noise_indices(timesteps.to(self.timesteps.device))
        sigma = torch.stack([self._call_sigma(j) for j in idx]).to(original_samples.device, original_samples.dtype)
        return original_samples + noise * per_sample(sigma, original_samples.ndim)


class HeunDiscreteScheduler(SecondOrderDiscreteScheduler):
    """Heun's 2nd-order sampler on SD's discrete σ's (diffusers' HeunDiscreteScheduler). timesteps are float.
    Stateful: between a step's two calls it keeps x_k, d_k and the step size; set_timesteps resets it."""

    class_name = "HeunDiscreteScheduler"
    defaults = {**SecondOrderDiscreteScheduler.defaults, "clip_sample": False, "clip_sample_range": 1.0}
    choices = {**SecondOrderDiscreteScheduler.choices,
               "prediction_type": ("epsilon", "v_prediction", "sample")}

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Sets self.sigmas (σ_0..σ_{n-1}, 0: float32 [n+1]) and self.timesteps (float32 [2n-1]: t_0, then each
        later t twice). Resets the state."""
        self.num_inference_steps = n = num_inference_steps
        timesteps, sigmas = self._schedule(n)
        self.sigmas = torch.from_numpy(sigmas)                                        # [n+1], kept on the CPU
        t = torch.from_numpy(timesteps)
        self.timesteps = interleave(t[:1], t[1:, None].repeat(1, 2)).to(device)     # [2n-1]
        self.sample, self.prev_derivative, self.dt = None, None, None
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x -> x / √(σ²+1) at the call's σ (the corrector's: σ_{k+1}). [B, C, H, W] -> [B, C, H, W]."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return sample / ((self._call_sigma(self._step_index) ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise=None) -> torch.Tensor:
        """One network call: the predictor (x_k -> x̃) or the corrector (x̃ -> x_{k+1}), see the top.
        model_output, sample: [B, C, H, W] -> [B, C, H, W]. (generator / noise: a uniform interface; Heun is
        deterministic.)"""
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index // 2                                  # the step this call belongs to
        sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]     # σ_k, σ_{k+1}
        cfg = self._settings
        at = sigma if self.state_in_first_order else sigma_next    # where the network looked at `sample`
        pred_original_sample = denoised_ve(model_output, sample, at, cfg["prediction_type"])
        if cfg["clip_sample"]:
            pred_original_sample = pred_original_sample.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])

        if self.state_in_first_order:  # predictor: x̃ = x_k + (σ_{k+1} - σ_k) d_k
            derivative = (sample - pred_original_sample) / sigma
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            prev_sample = sample + derivative * self.dt
        else:                          # corrector: x_{k+1} = x_k + (σ_{k+1} - σ_k) (d_k + d'_k) / 2
            derivative = (sample - pred_original_sample) / sigma_next
            prev_sample = self.sample + (self.prev_derivative + derivative) / 2 * self.dt
            self.sample, self.prev_derivative, self.dt = None, None, None
        self._step_index += 1
        return prev_sample
