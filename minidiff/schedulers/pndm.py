"""Chapter 9.3 — PNDM / PLMS: pseudo numerical methods (Liu et al., 2022). SD v1's default sampler.

Notation (code -> paper):
    alpha_prod_t, alpha_prod_t_prev   ᾱ_t, ᾱ_{t-δ}      (the paper writes ᾱ as α; δ = T / n, the stride)
    model_output / ets[i]             ε_θ(x_t, t) — `ets` keeps the last four, e_{t}, e_{t+δ}, e_{t+2δ}, e_{t+3δ}
    _get_prev_sample                  the transfer φ(x_t, e, t, t-δ)                                        (eq. 9)
    final_alpha_cumprod               ᾱ used after the last step: 1 (set_alpha_to_one) or ᾱ_0

The transfer part moves x_t to x_{t-δ} along the DDIM path, given a noise estimate e:
    x_{t-δ} = √(ᾱ_{t-δ}/ᾱ_t) x_t - (ᾱ_{t-δ} - ᾱ_t) e / (√ᾱ_t (√((1-ᾱ_{t-δ}) ᾱ_t) + √((1-ᾱ_t) ᾱ_{t-δ})))   (eq. 9)
The gradient part chooses e like a linear multistep ODE solver, from the estimates already made (eq. 12, PLMS):
    e' = (55 e_t - 59 e_{t+δ} + 37 e_{t+2δ} - 9 e_{t+3δ}) / 24         (4th-order Adams–Bashforth)
so each step costs one network call, yet is 4th-order accurate.
The first steps have no history. The paper's F-PNDM spends 3 Runge–Kutta steps (4 calls each) on it ("PRK",
eq. 13, skip_prk_steps=False); SD uses crowsonkb's PLMS start (skip_prk_steps=True): step 1 is a Heun step
(e = (e_t + e_{t-δ})/2, which costs a second call at the same t-δ), then Adams–Bashforth of order 2 and 3:
    e' = (3 e_t - e_{t+δ}) / 2,    e' = (23 e_t - 16 e_{t+δ} + 5 e_{t+2δ}) / 12
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULE_DEFAULTS, Scheduler, spaced_timesteps


class PNDMScheduler(Scheduler):
    """PLMS (skip_prk_steps=True, SD's setting) or F-PNDM (Runge–Kutta warm-up, skip_prk_steps=False).
    Stateful: keeps the past noise estimates in `ets`; set_timesteps resets it."""

    class_name = "PNDMScheduler"
    defaults = {**SCHEDULE_DEFAULTS, "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon",
                "timestep_spacing": "leading", "steps_offset": 1}
    choices = {"prediction_type": ("epsilon", "v_prediction"),
               "timestep_spacing": ("leading", "trailing", "linspace")}
    pndm_order = 4

    def __init__(self, **settings):
        super().__init__(**settings)
        self.final_alpha_cumprod = torch.tensor(1.0) if self._settings["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = None
        self._reset()

    def _reset(self):
        self.ets = []                 # past ε estimates, oldest first
        self.counter = 0              # network calls seen since set_timesteps
        self.cur_model_output = 0     # PRK: running weighted sum of the 4 Runge–Kutta slopes
        self.cur_sample = None        # the x_t a multi-call step started from

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Sets self.timesteps (LongTensor, decreasing). PLMS visits n + 1 timesteps (the second one twice, for the
        Heun start); PRK mode visits 12 Runge–Kutta points and then n - 3 PLMS ones. Resets the history."""
        self.num_inference_steps = n = num_inference_steps
        cfg = self._settings
        T = self.num_train_timesteps
        ts = spaced_timesteps(n, T, cfg["timestep_spacing"], cfg["steps_offset"])[::-1].copy()  # increasing [n]
        if cfg["skip_prk_steps"]:
            # [t_0 < t_1 < ... < t_{n-1}] -> t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            # each of the top 4 timesteps t and its midpoint t + δ/2, each visited twice (the 4 slopes of RK4),
            # trimmed to the 3 full RK steps that lead from t_{n-1} down to t_{n-4}
            prk = ts[-self.pndm_order:].repeat(2) + np.tile(np.array([0, T // n // 2]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ts[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise=None) -> torch.Tensor:
        """One call of the network -> the next sample. model_output, sample: [B, C, H, W] -> [B, C, H, W].
        (generator / noise are accepted for a uniform interface; PNDM is deterministic.)"""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self.counter < len(self.prk_timesteps) and not self._settings["skip_prk_steps"]:
            return self.step_prk(model_output, timestep, sample)
        return self.step_plms(model_output, timestep, sample)

    def step_prk(self, model_output, timestep, sample):
        """Runge–Kutta (eq. 13): from x_t, slopes e1 at t, e2 and e3 at the midpoint t - δ/2, e4 at t - δ;
        x_{t-δ} = φ(x_t, (e1 + 2 e2 + 2 e3 + e4)/6, t, t-δ). Each call lands on the next evaluation point."""
        half = self.num_train_timesteps // self.num_inference_steps // 2
        diff_to_prev = 0 if self.counter % 2 else half
        prev_timestep = timestep - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]  # the t this RK step started from

        phase = self.counter % 4
        if phase == 0:    # e1: also the first entry of the PLMS history
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):  # e2, e3
            self.cur_model_output += 1 / 3 * model_output
        else:             # e4: the weighted mean is complete
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def step_plms(self, model_output, timestep, sample):
        """Linear multistep (eq. 12), with the Heun / lower-order start described at the top of the file."""
        if not self._settings["skip_prk_steps"] and len(self.ets) < 3:
            raise ValueError("PNDM in PRK mode must run its 12 Runge–Kutta calls before PLMS steps")
        stride = self.num_train_timesteps // self.num_inference_steps  # δ
        prev_timestep = timestep - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # the Heun corrector: evaluated at t-δ, but the step is redone from t
            prev_timestep = timestep
            timestep = timestep + stride

        if len(self.ets) == 1 and self.counter == 0:    # 1st call: Euler (DDIM) step, remember x_t
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:  # 2nd call: Heun, e = (e_t + e_{t-δ})/2, again from x_t
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        """The transfer φ(x_t, e, t, t-δ), eq. 9. sample, model_output: [B, C, H, W] -> x_{t-δ} [B, C, H, W]."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        if self._settings["prediction_type"] == "v_prediction":  # ε̂ = √ᾱ_t v̂ + √(1-ᾱ_t) x_t
            model_output = (alpha_prod_t ** 0.5) * model_output + (beta_prod_t ** 0.5) * sample
        # √(ᾱ_{t-δ}/ᾱ_t): eq. 9's x_t coefficient, 1 + (ᾱ_{t-δ}-ᾱ_t)/(√ᾱ_t(√ᾱ_{t-δ}+√ᾱ_t)) simplified
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        # eq. 9's denominator of e:  √ᾱ_t (√((1-ᾱ_{t-δ}) ᾱ_t) + √((1-ᾱ_t) ᾱ_{t-δ}))
        model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** 0.5 + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
