"""Chapter 9.10 — DPM2: the midpoint method on the σ ODE (k-diffusion's sample_dpm_2; DPM-Solver-2, Lu et al. 2022).

Notation (code -> symbol), as in euler.py and heun.py:
    sigmas[k]        σ_k, the noise level of step k (σ_n = 0)        sample   x = x_0 + σ n
    sigmas_mid[k]    σ_mid = √(σ_k σ_{k+1}): the step's midpoint in log σ (0 for the last step)
    derivative       d = (x - D(x; σ)) / σ, the ODE's slope dx/dσ      self.sample: x_k, kept for the second call

Heun averages the slopes at both ends of a step; the midpoint method uses the slope in the middle instead:
    x_mid   = x_k + (σ_mid - σ_k) · d(x_k; σ_k)              first call: half a step (in log σ) with Euler
    x_{k+1} = x_k + (σ_{k+1} - σ_k) · d(x_mid; σ_mid)         second call: the whole step on the midpoint's slope
Also 2nd order for two network calls per step. The midpoint is the geometric mean of the step's ends, the middle in
log σ: a schedule's σ's are spread roughly evenly in log σ, so that is the middle of the step as the sampler walks
it (and, as λ = -log σ here, DPM-Solver-2's midpoint in half-log-SNR). The last step (to σ = 0) has no midpoint and
is a plain Euler step, so n steps cost 2n - 1 calls. The timesteps list has each midpoint's (fractional)
t between the steps': t_0, t_mid 0, t_1, t_mid 1, ..., t_{n-1}; call j works at σ_{(j+1)//2} for add_noise.
"""
from __future__ import annotations

import torch

from .base import denoised_ve, sigma_to_t
from .heun import SecondOrderDiscreteScheduler, interleave


def log_midpoint(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """exp((log σ_a + log σ_b) / 2) = √(σ_a σ_b): the midpoint in log σ, 0 where either is 0. Elementwise.
    (A lerp of the logs, with diffusers' argument order, so that the rounding is diffusers' bit for bit.)"""
    mid = torch.lerp(sigma_a.log(), sigma_b.log(), 0.5).exp()
    return torch.where((sigma_a == 0) | (sigma_b == 0), torch.zeros_like(mid), mid)


class KDPM2DiscreteScheduler(SecondOrderDiscreteScheduler):
    """DPM2 (k-diffusion's "DPM2", diffusers' KDPM2DiscreteScheduler). timesteps are float. Stateful: keeps x_k
    between a step's two calls; set_timesteps resets it."""

    class_name = "KDPM2DiscreteScheduler"
    round_karras_timesteps = True

    def _midpoints(self) -> torch.Tensor:
        """σ_mid of every step [n] (the last, to σ = 0, is 0)."""
        return log_midpoint(self.sigmas[1:], self.sigmas[:-1])

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Sets self.sigmas (float32 [n+1]), self.sigmas_mid (float32 [n]) and self.timesteps (float32 [2n-1]: t_0,
        then the midpoint's t and the next step's t for each later step). Resets the state."""
        self.num_inference_steps = n = num_inference_steps
        timesteps, sigmas = self._schedule(n)
        self.sigmas = torch.from_numpy(sigmas)                                         # [n+1], kept on the CPU
        self.sigmas_mid = self._midpoints()                                            # [n]
        log_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).log().numpy()
        t_mid = torch.from_numpy(sigma_to_t(self.sigmas_mid[:-1].numpy(), log_sigmas)).float()  # [n-1]
        t = torch.from_numpy(timesteps)
        self.timesteps = interleave(t[:1], torch.stack([t_mid, t[1:]], dim=1)).to(device)  # [2n-1]
        self.sample = None
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x -> x / √(σ²+1) at the call's σ: σ_k, or σ_mid for the second call. [B, C, H, W] -> [B, C, H, W]."""
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index // 2
        sigma = self.sigmas[k] if self.state_in_first_order else self.sigmas_mid[k]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise=None) -> torch.Tensor:
        """One network call: x_k -> x_mid, or x_mid -> x_{k+1} (see the top). [B, C, H, W] -> [B, C, H, W].
        (generator / noise: a uniform interface; DPM2 is deterministic.)"""
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index // 2
        sigma, sigma_mid, sigma_next = self.sigmas[k], self.sigmas_mid[k], self.sigmas[k + 1]
        kind = self._settings["prediction_type"]
        if self.state_in_first_order:  # x_mid = x_k + (σ_mid - σ_k) d(x_k; σ_k)
            derivative = (sample - denoised_ve(model_output, sample, sigma, kind)) / sigma
            self.sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:                          # x_{k+1} = x_k + (σ_{k+1} - σ_k) d(x_mid; σ_mid)
            derivative = (sample - denoised_ve(model_output, sample, sigma_mid, kind)) / sigma_mid
            prev_sample = self.sample + derivative * (sigma_next - sigma)
            self.sample = None
        self._step_index += 1
        return prev_sample
