"""Chapter 9.14 — LCM: sampling a latent consistency model in 1-8 steps (Song et al. 2023; Luo et al. 2023).

Notation (code -> paper; LCM writes ᾱ as α):
    consistency function   f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0(x_t, t): maps ANY point of an ODE trajectory to
                           the trajectory's start, the clean image (Song et al. 2023, eq. 3; LCM eq. 6)
    c_skip, c_out          c_skip(t) = σ_d² / ((s t)² + σ_d²),  c_out(t) = s t / √((s t)² + σ_d²)
                           σ_d = sigma_data = 0.5, s = timestep_scaling = 10: c_skip(0) = 1, c_out(0) = 0, so
                           f_θ(x, 0) = x (the boundary condition) however the network is trained
    pred_original_sample   x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t (or from v, or the output itself)
    denoised               f_θ(x_t, t), the model's answer: the clean image
    original_inference_steps   N: the distillation's grid of timesteps, t = T/N·k - 1 (k = 1..N; 19, 39, ..., 999)

A consistency model was trained (distilled, see minidiff/train) so that f_θ gives the same clean image from every
point of one ODE trajectory. One call then samples: x_0 = f_θ(x_T, T). More steps trade time for quality the
"multistep consistency sampling" way (Song et al. 2023, Algorithm 1; LCM Algorithm 3):
    x_0 ← f_θ(x_{τ_k}, τ_k);   x_{τ_{k+1}} = √ᾱ_{τ_{k+1}} x_0 + √(1-ᾱ_{τ_{k+1}}) z,  z ~ N(0, I)   (fresh noise)
and the last step returns f_θ itself. The n timesteps τ_k are n evenly spaced entries (by index) of the grid of N,
from its top: 4 of 50 -> 999, 759, 499, 259. With scale t·10, c_skip(t) is already ~0 for t ≥ 1 (2.5e-3 at t = 1,
1e-4 at t = 5): the boundary condition only matters at t = 0, and f_θ is x̂_0 wherever the sampler looks.

LCM-LoRA (Luo et al. 2023b) is a LoRA whose change to SD's U-Net turns it into such an f_θ's ε̂; it samples with this
scheduler at guidance 1 (the guidance was distilled in: no classifier-free guidance, one U-Net call per step).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, per_sample, randn


def consistency_scalings(timestep, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency function at timestep t (an int, a float or a tensor [B] of them):
        c_skip = σ_d² / ((s t)² + σ_d²),   c_out = s t / √((s t)² + σ_d²)
    with c_skip = 1, c_out = 0 at t = 0 (the boundary condition f(x, 0) = x). Tensors in, float32 tensors out."""
    scaled = torch.as_tensor(timestep).float() * timestep_scaling          # s t
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def lcm_timesteps(num_inference_steps: int, original_inference_steps: int, num_train_timesteps: int,
                  strength: float = 1.0) -> np.ndarray:
    """The n timesteps LCM samples at -> int64 [n], decreasing: n evenly spaced entries (by index, from the top) of
    the distillation grid t_k = T/N·k - 1, k = 1..N·strength (N = original_inference_steps)."""
    T, N, n = num_train_timesteps, original_inference_steps, num_inference_steps
    if N > T:
        raise ValueError(f"original_inference_steps={N} cannot exceed num_train_timesteps={T}")
    if n > N:
        raise ValueError(f"LCM samples at most original_inference_steps={N} steps (its distillation grid), got "
                         f"{n}")
    grid = (np.arange(1, int(N * strength) + 1) * (T // N) - 1)[::-1]                # 999, 979, ..., 19 for N = 50
    if len(grid) < n:
        raise ValueError(f"the LCM grid of N·strength = {len(grid)} timesteps has fewer than {n} steps")
    picks = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
    return grid[picks].copy()


class LCMScheduler(Scheduler):
    """Multistep consistency sampling (diffusers' LCMScheduler). Stochastic between steps: pass a generator (or
    explicit noise) for repeatable results. Keeps its position in the schedule (step_index)."""

    class_name = "LCMScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"),
               "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {"thresholding": False}
    sigma_data = 0.5  # σ_d of the consistency scalings (LCM keeps Song et al.'s value)

    def __init__(self, **settings):
        super().__init__(**settings)
        # ᾱ after the last step (set_alpha_to_one: a clean image); LCM's steps never reach it, diffusers keeps it
        self.final_alpha_cumprod = torch.tensor(1.0) if self._settings["set_alpha_to_one"] else self.alphas_cumprod[0]
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int, device=None, original_inference_steps: int | None = None,
                      strength: float = 1.0):
        """Sets self.timesteps (LongTensor [n]) from the grid of original_inference_steps (default: the config's)."""
        N = original_inference_steps or self._settings["original_inference_steps"]
        ts = lcm_timesteps(num_inference_steps, N, self.num_train_timesteps, strength)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None


    def consistency_output(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0: the clean image the consistency model gives.
        model_output, sample: [B, C, H, W]; timestep: an int or a LongTensor [B] (one t per sample, as in
        distillation) -> [B, C, H, W]."""
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device)
        alpha_prod_t = self.alphas_cumprod[t]                                       # ᾱ_t: a scalar, or [B]
        c_skip, c_out = consistency_scalings(t, self.sigma_data, self._settings["timestep_scaling"])
        if t.ndim:  # one t per sample: [B] -> [B, 1, 1, 1]
            alpha_prod_t, c_skip, c_out = (per_sample(v, sample.ndim) for v in (alpha_prod_t, c_skip, c_out))
        alpha_prod_t, c_skip, c_out = (v.to(sample.device) for v in (alpha_prod_t, c_skip, c_out))
        pred_original_sample, _ = self._x0_and_eps(model_output, sample, alpha_prod_t)
        if self._settings["clip_sample"]:
            r = self._settings["clip_sample_range"]
            pred_original_sample = pred_original_sample.clamp(-r, r)
        return c_out * pred_original_sample + c_skip * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{τ_k} -> x_{τ_{k+1}} = √ᾱ f_θ + √(1-ᾱ) z (see the top); the last step returns f_θ(x_{τ_k}, τ_k).
        model_output, sample: [B, C, H, W] -> [B, C, H, W]. noise: z (drawn from `generator` as diffusers does
        when None). The clean image of every step is kept in self.denoised."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        self.denoised = denoised = self.consistency_output(model_output, timestep, sample)
        if self._step_index == self.num_inference_steps - 1:
            prev_sample = denoised
        else:
            alpha_prod_next = self.alphas_cumprod[self.timesteps[self._step_index + 1]]   # ᾱ_{τ_{k+1}}
            if noise is None:
                noise = randn(model_output.shape, generator=generator, device=model_output.device,
                              dtype=denoised.dtype)
            prev_sample = alpha_prod_next.sqrt() * denoised + (1 - alpha_prod_next).sqrt() * noise
        self._step_index += 1
        return prev_sample
