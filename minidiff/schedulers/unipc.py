"""Chapter 9.13 — UniPC: a unified predictor-corrector for the diffusion ODE (Zhao et al. 2023).

Notation (code -> paper), with dpmpp.py's VP symbols:
    sigmas[i]             σ^VE_i at the i-th visited timestep (σ_n = 0 at the end)
    alpha_t, sigma_t      α_t = 1/√(σ_VE²+1), σ_t = σ_VE α_t;  lambda: λ = log(α_t/σ_t)
    h                     λ_{t_i} - λ_{t_{i-1}}, the step in λ
    model_outputs         x_θ of the last `solver_order` steps (the data predictions, "predict_x0"), oldest first
    rks, D1s              r_k = (λ_{s_k} - λ_{s_0}) / h and the divided differences D_k = (x_θ(s_k) - x_θ(s_0)) / r_k
    B_h                   B(h): e^{-h} - 1 for "bh2" (the default; SD's best), -h for "bh1"
    rhos_p, rhos_c        the predictor's and corrector's weights a_k of the D_k, solved from R a = b (Theorem 3.1)
    this_order            p, the order of the step (lower at the start, where history is short, and the end)

Every step is DPM-Solver++'s exponential integrator (dpmpp.py, eq. 9) plus a polynomial correction from past x_θ's:
    UniP-p (predictor):  x̃_t = (σ_t/σ_s) x̃_s - α_t (e^{-h} - 1) x_θ(s) - α_t B(h) Σ_{k<p} a_k D_k
    UniC-p (corrector):  the same step redone once x_θ at the landing point t is known, with one more difference,
                         D_p = x_θ(t) - x_θ(s), in the sum — the corrector is free: x_θ(t) is the network call the
                         next step makes anyway.
The weights solve Σ_k a_k r_k^{m-1} = φ_m(h) m! / B(h) for m = 1..p (R a = b), φ_{m+1}(h) = (φ_m(h) - 1/m!)/h with
h φ_1(h) = e^{h} - 1 (here in -h, the data-prediction form); for p = 2 the predictor's single weight is 1/2, for p = 1
the corrector's. So step i runs: convert ε̂ to x_θ at t_i; correct the sample that step i-1 predicted (UniC); then
predict t_{i+1} (UniP). Orders rise 1, 2, ... up to solver_order, and the final steps drop back (lower_order_final).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, karras_sigmas, per_sample, sigma_to_t


class UniPCMultistepScheduler(Scheduler):
    """UniPC with the data-prediction model (predict_x0) or the noise-prediction one, B(h) "bh1" or "bh2", any
    solver_order (diffusers' UniPCMultistepScheduler). Stateful: keeps the last solver_order x_θ's and the sample the
    predictor made; set_timesteps resets them."""

    class_name = "UniPCMultistepScheduler"
    absent_timestep = "last"      # a timestep not in the list: the last step (as diffusers)
    defaults = {**SCHEDULE_DEFAULTS, "solver_order": 2, "prediction_type": "epsilon", "predict_x0": True,
                "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "use_karras_sigmas": False,
                "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace", "steps_offset": 1,
                "final_sigmas_type": "zero", "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"), "solver_type": ("bh1", "bh2"),
               "timestep_spacing": ("leading", "trailing", "linspace"), "final_sigmas_type": ("zero", "sigma_min")}
    fixed = {"thresholding": False, "solver_p": None, "use_exponential_sigmas": False, "use_beta_sigmas": False,
             "use_flow_sigmas": False, "use_dynamic_shifting": False}

    def __init__(self, **settings):
        super().__init__(**settings)
        if self._settings["solver_order"] < 1:
            raise ValueError(f"UniPCMultistepScheduler: solver_order must be >= 1, got "
                             f"{self._settings['solver_order']}")
        if self._settings["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2 ** -24  # keep σ_T finite
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5     # σ_VE(t), t = 0..T-1
        self._reset()

    def _reset(self):
        self.model_outputs = [None] * self._settings["solver_order"]  # x_θ history, oldest first
        self.lower_order_nums = 0  # steps taken so far (capped at solver_order): how much history exists
        self.last_sample = None    # the sample the last predictor made, before its correction
        self.this_order = None     # the order the last predictor used (the corrector uses it too)
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Sets self.timesteps (LongTensor [n]) and self.sigmas (σ_VE, float32 [n+1]); resets the history."""
        cfg = self._settings
        T, n = self.num_train_timesteps, num_inference_steps
        if cfg["timestep_spacing"] == "linspace":  # n + 1 points from the top, dropping the last (t = 0: the final σ)
            timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:  # trailing
            timesteps = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1

        table = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()   # σ(t), t = 0..T-1
        if cfg["use_karras_sigmas"]:  # Karras eq. 5 between σ_max and σ_min; t from σ, rounded
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else table[0].item()
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else table[-1].item()
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, np.log(table)).round()
            sigma_last = sigmas[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0  # Karras' own σ_min
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
            sigma_last = table[0] if cfg["final_sigmas_type"] == "sigma_min" else 0    # σ(t = 0)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))   # [n+1]
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)          # [n]
        self.num_inference_steps = len(timesteps)
        self._reset()
        self._begin_index = None


    # ------------------------------------------------------------------------------------------------- the maths
    def _alpha_sigma_lambda(self, i: int):
        """(α_t, σ_t, λ_t) at sigmas[i]."""
        sigma = self.sigmas[i]
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        sigma_t = sigma * alpha_t
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The network's output -> x_θ (predict_x0) or ε_θ (not), at the current step. [B,C,H,W] -> [B,C,H,W]."""
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(self._step_index)
        kind = self._settings["prediction_type"]
        if self._settings["predict_x0"]:
            if kind == "epsilon":       # x_θ = (x_t - σ_t ε̂) / α_t
                return (sample - sigma_t * model_output) / alpha_t
            if kind == "v_prediction":  # x_θ = α_t x_t - σ_t v̂
                return alpha_t * sample - sigma_t * model_output
            return model_output
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":      # ε = α_t v̂ + σ_t x_t
            return alpha_t * model_output + sigma_t * sample
        return (sample - alpha_t * model_output) / sigma_t

    def _coefficients(self, t: int, s0: int, order: int):
        """For the step sigmas[s0] -> sigmas[t]: h·φ_1(h), B(h), the r_k, and R and b of R a = b (see the top).
        The history points s_k (k = 1..order-1) are s0 - k; x_θ(s_k) is model_outputs[-(k+1)]."""
        _, _, lambda_s0 = self._alpha_sigma_lambda(s0)
        _, _, lambda_t = self._alpha_sigma_lambda(t)
        h = lambda_t - lambda_s0
        rks = [(self._alpha_sigma_lambda(s0 - k)[2] - lambda_s0) / h for k in range(1, order)] + [torch.ones(())]
        hh = -h if self._settings["predict_x0"] else h  # the data-prediction form integrates in -λ
        h_phi_1 = torch.expm1(hh)                       # h φ_1(h) = e^h - 1
        B_h = hh if self._settings["solver_type"] == "bh1" else torch.expm1(hh)
        h_phi_k, b = h_phi_1 / hh - 1, []              # φ_2 · h ... in the recursion φ_{m+1} = (φ_m - 1/m!) / h
        for m in range(1, order + 1):
            b.append(h_phi_k * math.factorial(m) / B_h)
            h_phi_k = h_phi_k / hh - 1 / math.factorial(m + 1)
        R = torch.stack([torch.stack(rks) ** (m - 1) for m in range(1, order + 1)])  # [order, order]: r_k^{m-1}
        return h_phi_1, B_h, rks, R, torch.stack(b)

    def _exponential_step(self, x, x_model, t: int, s0: int, h_phi_1):
        """DPM-Solver's 1st-order step from s0 to t (dpmpp.py eq. 9), in the data- or noise-prediction form."""
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(t)
        alpha_s0, sigma_s0, _ = self._alpha_sigma_lambda(s0)
        if self._settings["predict_x0"]:
            return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * x_model, alpha_t
        return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * x_model, sigma_t

    def predictor_update(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-p: from the current sample at sigmas[i] to sigmas[i+1] (B-dimensional, [B, C, H, W])."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        h_phi_1, B_h, rks, R, b = self._coefficients(i + 1, i, order)
        x_t, scale = self._exponential_step(sample, m0, i + 1, i, h_phi_1)
        if order == 1:
            return x_t.to(sample.dtype)
        D1s = [(self.model_outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        rhos_p = [torch.tensor(0.5)] if order == 2 else list(torch.linalg.solve(R[:-1, :-1], b[:-1]))
        correction = sum(rho * d for rho, d in zip(rhos_p, D1s))
        return (x_t - scale * B_h * correction).to(sample.dtype)

    def corrector_update(self, this_model_output: torch.Tensor, last_sample: torch.Tensor, order: int):
        """UniC-p: redo the last step (sigmas[i-1] -> sigmas[i]) with x_θ at its landing point, this_model_output."""
        i = self._step_index
        m0 = self.model_outputs[-1]                     # x_θ at the last step's start
        h_phi_1, B_h, rks, R, b = self._coefficients(i, i - 1, order)
        x_t, scale = self._exponential_step(last_sample, m0, i, i - 1, h_phi_1)
        D1s = [(self.model_outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        rhos_c = [torch.tensor(0.5)] if order == 1 else list(torch.linalg.solve(R, b))
        correction = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s)) + rhos_c[-1] * (this_model_output - m0)
        return (x_t - scale * B_h * correction).to(last_sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise=None) -> torch.Tensor:
        """Correct the sample the last step predicted, then predict the next one. [B, C, H, W] -> [B, C, H, W].
        (generator / noise are accepted for a uniform interface; UniPC is deterministic.)"""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg = self._settings
        i = self._step_index
        x_model = self.convert_model_output(model_output, sample)
        if i > 0 and (i - 1) not in cfg["disable_corrector"] and self.last_sample is not None:
            sample = self.corrector_update(x_model, self.last_sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [x_model]  # shift the history window

        order = min(cfg["solver_order"], len(self.timesteps) - i) if cfg["lower_order_final"] else cfg["solver_order"]
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: no more order than history
        self.last_sample = sample
        prev_sample = self.predictor_update(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        self._step_index += 1
        return prev_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The VP forward process x_t = α_t x_0 + σ_t ε, as dpmpp.py's: at integer training timesteps before
        set_timesteps, at the schedule's own σ_VE after it. [B, C, H, W], timesteps [B] -> [B, C, H, W]."""
        if self.num_inference_steps is None:
            return super().add_noise(original_samples, noise, timesteps.long())
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = per_sample(sigmas[self._noise_indices(timesteps.to(self.timesteps.device))], original_samples.ndim)
        alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha_t * original_samples + sigma * alpha_t * noise
