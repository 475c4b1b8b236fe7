"""Chapter 9.5 — Euler: the probability-flow ODE in σ, with SD's discrete noise levels (Karras et al., 2022).

Notation (code -> paper):
    sigmas[i]            σ_i = √((1-ᾱ_t)/ᾱ_t) at the i-th visited t, then σ_n = 0 — the noise-to-signal ratio
    sample               x = x_t / √ᾱ_t = x_0 + σ n      the "variance-exploding" variable (Karras eq. 1 with s(t) = 1)
    scale_model_input    c_in(σ) = 1/√(σ²+1): gives the network back its VP input x_t = √ᾱ_t x (Table 1)
    pred_original_sample D(x; σ) = x - σ ε_θ(c_in x, t)   the denoiser
    derivative           d = (x - D(x; σ)) / σ = ε_θ      the ODE's slope dx/dσ                          (eq. 3)
    dt                   σ_{i+1} - σ̂_i
    gamma, sigma_hat     γ_i, σ̂_i = (1+γ_i) σ_i         optional "churn" (Algorithm 2); 0 by default

Dividing x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε by √ᾱ_t gives x = x_0 + σ ε, so denoising becomes the ODE
    dx/dσ = (x - D(x; σ)) / σ
and one Euler step is (Algorithm 2, without the Heun correction)
    x_{i+1} = x_i + (σ_{i+1} - σ̂_i) · d_i
starting from x_N = σ_max · n (init_noise_sigma = σ_max for the "linspace"/"trailing" spacings). The σ of a
fractional t (spacing "linspace" lands between training timesteps) is interpolated linearly in t; with
use_karras_sigmas the σ_i follow Karras eq. 5 instead and t is found from σ (interpolated in log σ).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, denoised_ve, per_sample, randn, sigma_init_noise, sigma_schedule


class EulerDiscreteScheduler(Scheduler):
    """Euler sampler on SD's discrete σ's (diffusers' EulerDiscreteScheduler). timesteps are float.
    Stateful: remembers its position in the schedule (step_index); set_timesteps resets it."""

    class_name = "EulerDiscreteScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 1,
                "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero",
                "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"),
               "timestep_spacing": ("leading", "trailing", "linspace"),
               "final_sigmas_type": ("zero", "sigma_min")}
    fixed = {"interpolation_type": "linear", "timestep_type": "discrete", "use_exponential_sigmas": False,
             "use_beta_sigmas": False}

    def __init__(self, **settings):
        super().__init__(**settings)
        if self._settings.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2 ** -24  # ᾱ_T = 0 would make σ_T infinite: keep it huge but finite
        T = self.num_train_timesteps
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)          # [T], σ(T-1) .. σ(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])                                    # [T+1]
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).float()
        self._step_index = None

    @property
    def init_noise_sigma(self) -> float:
        """Std of x_N: σ_max, or √(σ_max² + 1) for "leading" (as diffusers)."""
        return sigma_init_noise(self.sigmas, self._settings["timestep_spacing"])

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Sets self.timesteps (float32 [n]) and self.sigmas (float32 [n+1], ending in 0 or σ_min)."""
        self.num_inference_steps = n = num_inference_steps
        cfg = self._settings
        timesteps, sigmas = sigma_schedule(self.alphas_cumprod, n, cfg)
        if cfg.get("final_sigmas_type") == "sigma_min":  # stop at σ(0) instead of 0
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)                                          # [n+1], kept on the CPU
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)  # [n]
        self._step_index = None
        self._begin_index = None


    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x -> c_in x = x / √(σ²+1): the network was trained on variance-preserving x_t. [B,C,H,W] -> [B,C,H,W]."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise: torch.Tensor | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
        """x_i -> x_{i+1} = x_i + (σ_{i+1} - σ̂_i) d_i. model_output, sample: [B, C, H, W] -> [B, C, H, W].
        s_churn > 0 first adds noise to raise σ_i to σ̂_i (Algorithm 2); `noise` / `generator` are used then."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)  # the ODE is integrated in fp32 even for a fp16 model
        sigma = self.sigmas[self._step_index]

        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)                                    # σ̂_i = (1 + γ_i) σ_i
        if gamma > 0:  # x̂_i = x_i + √(σ̂² - σ²) ε
            if noise is None:
                noise = randn(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                              generator=generator)
            sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5

        kind = self._settings["prediction_type"]
        # D(x; σ̂) (diffusers reads a v-prediction at σ, not σ̂: the same while churn is off)
        pred_original_sample = denoised_ve(model_output, sample, sigma if kind == "v_prediction" else sigma_hat, kind)

        derivative = (sample - pred_original_sample) / sigma_hat           # d_i = (x - D) / σ̂  (eq. 3)
        dt = self.sigmas[self._step_index + 1] - sigma_hat                  # σ_{i+1} - σ̂_i  (< 0)
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        return prev_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process in this sampler's variable: x = x_0 + σ_t n, for t among self.timesteps (before
        set_timesteps: any integer 0..T-1); which σ when a begin index is set: see Scheduler._noise_indices.
        x_0, noise: [B, C, H, W]; timesteps: [B] -> [B, C, H, W]."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        idx = self._noise_indices(timesteps.to(self.timesteps.device))
        return original_samples + noise * per_sample(sigmas[idx], original_samples.ndim)

    def get_velocity(self, sample, noise, timesteps):
        """v = √ᾱ_t ε - √(1-ᾱ_t) x_0 for integer training timesteps t. [B, C, H, W] -> [B, C, H, W]."""
        return super().get_velocity(sample, noise, timesteps.long())
