"""Chapter 9.6 — DPM-Solver++(2M): a second-order multistep solver for the diffusion ODE (Lu et al., 2022).

Notation (code -> paper):
    sigmas[i]                   σ^VE_i = √((1-ᾱ)/ᾱ) at the i-th visited timestep (σ_n = 0 at the end), as in Euler
    alpha_t, sigma_t            α_t = 1/√(σ_VE²+1) = √ᾱ_t,   σ_t = σ_VE α_t = √(1-ᾱ_t)   (VP: x_t = α_t x_0 + σ_t ε)
    lambda_t                    λ_t = log(α_t/σ_t), half the log-SNR; it increases as the sample gets cleaner
    h                           h_i = λ_{t_i} - λ_{t_{i-1}}   the step in λ
    model_outputs[-1], [-2]     x_θ(x̃_{t_{i-1}}), x_θ(x̃_{t_{i-2}}): the data predictions of this and the last step
    r0                          r_i = h_{i-1} / h_i
    D0, D1                      x_θ of this step, and its divided difference (x_θ,i-1 - x_θ,i-2) / r_i

The network's ε̂ becomes a data prediction x_θ = (x_t - σ_t ε̂) / α_t ("++": solving for x_0 is stabler under
guidance than solving for ε). Integrating the ODE exactly in λ with x_θ held constant gives the 1st-order update
(= DDIM):
    x̃_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x̃_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) x_θ                           (eq. 9)
and with x_θ extrapolated linearly from the previous step (Algorithm 2, "2M", one network call per step):
    x̃_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x̃_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) (D0 + D1/2)
            = ... - α_{t_i} (e^{-h_i} - 1) ((1 + 1/(2r_i)) x_θ,i-1 - 1/(2r_i) x_θ,i-2)
The first step has no history and is 1st order; so is the last (lower_order_final / final σ = 0), which keeps
few-step sampling stable.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, karras_sigmas, per_sample, sigma_to_t


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ multistep, order 1 or 2 (diffusers' DPMSolverMultistepScheduler with algorithm_type dpmsolver++).
    Stateful: keeps the last `solver_order` data predictions in `model_outputs`; set_timesteps resets them."""

    class_name = "DPMSolverMultistepScheduler"
    absent_timestep = "last"      # a timestep not in the list: the last step (as diffusers)
    defaults = {**SCHEDULE_DEFAULTS, "solver_order": 2, "prediction_type": "epsilon", "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero",
                "lambda_min_clipped": -float("inf"), "timestep_spacing": "linspace", "steps_offset": 1,
                "rescale_betas_zero_snr": False}
    choices = {"solver_order": (1, 2), "prediction_type": ("epsilon", "v_prediction", "sample"),
               "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "heun"),
               "final_sigmas_type": ("zero", "sigma_min"), "timestep_spacing": ("leading", "trailing", "linspace")}
    fixed = {"algorithm_type": "dpmsolver++", "thresholding": False, "variance_type": None, "use_lu_lambdas": False,
             "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
             "use_dynamic_shifting": False}

    def __init__(self, **settings):
        super().__init__(**settings)
        if self._settings["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2 ** -24  # keep σ_T finite
        self.lambda_t = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5     # σ_VE(t), t = 0..T-1
        T = self.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self._reset()

    def _reset(self):
        self.model_outputs = [None] * self._settings["solver_order"]  # x_θ history, oldest first
        self.lower_order_nums = 0  # steps taken so far (capped at solver_order): how much history exists
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Sets self.timesteps (LongTensor [n]) and self.sigmas (σ_VE, float32 [n+1]); resets the history."""
        cfg = self._settings
        T, n = self.num_train_timesteps, num_inference_steps
        # timesteps whose λ is below lambda_min_clipped are never visited (-inf: all are)
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg["lambda_min_clipped"])
        last_timestep = (T - clipped_idx).numpy().item()
        # n + 1 points from the top, dropping the last (t = 0 is reached by the final σ instead)
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:  # trailing
            timesteps = np.arange(last_timestep, 0, -T / n).round().copy().astype(np.int64) - 1

        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(sigmas)
        if cfg["use_karras_sigmas"]:  # Karras eq. 5 spacing in σ; t from σ, rounded to training timesteps
            sigmas = np.flip(sigmas).copy()
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)

        if cfg["final_sigmas_type"] == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))  # [n+1]
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)           # [n]
        self.num_inference_steps = len(timesteps)
        self._reset()
        self._begin_index = None


    @staticmethod
    def _alpha_sigma(sigma):
        """σ_VE -> (α_t, σ_t) = (1/√(σ²+1), σ/√(σ²+1))."""
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The network's output -> the data prediction x_θ(x_t, t) at the current step. [B,C,H,W] -> [B,C,H,W]."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        kind = self._settings["prediction_type"]
        if kind == "epsilon":       # x_θ = (x_t - σ_t ε̂) / α_t
            return (sample - sigma_t * model_output) / alpha_t
        if kind == "v_prediction":  # x_θ = α_t x_t - σ_t v̂
            return alpha_t * sample - sigma_t * model_output
        return model_output         # "sample"

    def first_order_update(self, x0_pred: torch.Tensor, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """eq. 9 (= a DDIM step): x̃_t = (σ_t/σ_s) x̃_s - α_t (e^{-h} - 1) x_θ."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index + 1])  # t: where we go
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[self._step_index])      # s: where we are
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0_pred

    def second_order_update(self, model_output_list: list, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """Algorithm 2 (2M): x̃_t = (σ_t/σ_s0) x̃_s0 - α_t (e^{-h} - 1) (D0 + D1/2)   ("midpoint")
        or ... - α_t (e^{-h} - 1) D0 + α_t ((e^{-h} - 1)/h + 1) D1                        ("heun")."""
        i = self._step_index
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if self._settings["solver_type"] == "midpoint":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1)

    def _noise(self, model_output, generator, noise):
        """The step's fresh noise: none for the ODE solver (dpmpp_sde.py draws one per step)."""
        return None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise=None) -> torch.Tensor:
        """x̃_{t_{i-1}} -> x̃_{t_i}. model_output, sample: [B, C, H, W] -> [B, C, H, W].
        (generator / noise are accepted for a uniform interface; the ODE solver is deterministic.)"""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self._settings
        n = len(self.timesteps)
        # the last step drops to 1st order: always when it ends at σ = 0, and for short schedules (< 15 steps)
        lower_order_final = self._step_index == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero")

        x0_pred = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]  # shift the history window
        sample = sample.to(torch.float32)
        noise = self._noise(model_output, generator, noise)
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.first_order_update(x0_pred, sample, noise)
        else:
            prev_sample = self.second_order_update(self.model_outputs, sample, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        self._step_index += 1
        return prev_sample.to(model_output.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The VP forward process x_t = α_t x_0 + σ_t ε. Before set_timesteps: at integer training timesteps t
        (α_t = √ᾱ_t, σ_t = √(1-ᾱ_t)); after it, at the schedule's own σ_VE (with Karras σ's they lie between the
        integer t's), chosen as Scheduler._noise_indices says. [B, C, H, W], timesteps [B] -> [B, C, H, W]."""
        if self.num_inference_steps is None:
            return super().add_noise(original_samples, noise, timesteps.long())
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = per_sample(sigmas[self._noise_indices(timesteps.to(self.timesteps.device))], original_samples.ndim)
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
