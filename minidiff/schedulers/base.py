"""Chapter 9.1 — the noise schedule that every sampler shares.

Training (Ho et al., 2020) corrupts an image x_0 in T = 1000 small Gaussian steps,
    q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I),
and because Gaussians compose, any x_t can be drawn from x_0 in one shot (DDPM eq. 4):
    q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I),   ᾱ_t = ∏_{s≤t} (1-β_s),
i.e.  x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε,  ε ~ N(0, I).                           <- `add_noise`

Notation shared by all schedulers (code name -> symbol):
    betas[t]           β_t                 noise added by forward step t (t = 0..T-1, 0-based as in diffusers)
    alphas[t]          α_t = 1 - β_t
    alphas_cumprod[t]  ᾱ_t = ∏ α_s          how much signal is left at t; SNR(t) = ᾱ_t / (1 - ᾱ_t)
    timesteps          the decreasing subsequence of 0..T-1 a sampler visits (e.g. 981, 961, ..., 1 for 50 steps)
    model_output       ε_θ(x_t, t), the network's guess of ε ("epsilon"), or v = √ᾱ_t ε - √(1-ᾱ_t) x_0
                       ("v_prediction", Salimans & Ho 2022), or x_0 itself ("sample")

The schedulers differ only in how they walk back from x_T to x_0 given ε_θ; this file holds what they share:
the β schedules, the timestep spacings, add_noise / get_velocity, diffusers-style config parsing and noise drawing.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# SD v1.4's scheduler_config.json: the defaults of every minidiff scheduler (diffusers' classes default to other
# values, e.g. beta_schedule="linear"; a full scheduler_config.json gives the same result either way).
SD_V1_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}

# the settings of the β schedule itself, common to all schedulers
SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "trained_betas": None}


# ---------------------------------------------------------------------------------------------------- β schedules
def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17), "squaredcos_cap_v2":
    ᾱ(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008, and β_i = 1 - ᾱ((i+1)/T) / ᾱ(i/T), capped at max_beta
    so the last step does not destroy everything at once. -> [T] float32."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that √ᾱ_T = 0 (pure noise at the last step, SNR(T) = 0)
    while √ᾱ_0 stays put. [T] -> [T]."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])  # undo the cumulative product
    return 1 - alphas


def make_betas(cfg: dict) -> torch.Tensor:
    """β_t for t = 0..T-1 from a config dict -> [T] float32."""
    T = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":  # DDPM's pixel-space schedule, 1e-4 .. 0.02
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":  # latent diffusion: linear in √β
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(T)
    else:
        raise NotImplementedError(f"beta_schedule {cfg['beta_schedule']!r} is not implemented "
                                  "(linear | scaled_linear | squaredcos_cap_v2)")
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


# ------------------------------------------------------------------------------------------------- timestep spacing
def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0):
    """Which n of the T training timesteps a sampler visits, in decreasing order -> int64 numpy array [n].

    Lin et al. 2023, Table 2 (T = 1000, n = 10):
      "leading"  (SD1's default)   0, 100, ..., 900, plus steps_offset      -> 901, 801, ..., 1
      "trailing"                   T, T - T/n, ... minus 1                  -> 999, 899, ..., 99
      "linspace"                   round(linspace(0, T-1, n))              -> 999, 888, ..., 0
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported (leading | trailing | linspace)")
    return ts


# ------------------------------------------------------------------------------- σ (noise-to-signal) helpers, Karras
def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep t at which σ(t) = sigma, interpolating linearly in log σ between the two
    neighbouring integer timesteps. sigma: [n], log_sigmas: [T] increasing in t -> t [n] (float)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]                                      # [T, n]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)  # last index below
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def sigma_schedule(alphas_cumprod: torch.Tensor, n: int, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """The n timesteps a σ-sampler (Euler, LMS, Heun, DPM2) visits and their σ's, before the final one:
    -> (t [n] float32, or float64 when found from Karras σ's; σ [n] float64), both decreasing.

    σ(t) = √((1-ᾱ_t)/ᾱ_t) at the spaced timesteps ("linspace": fractional t, σ interpolated linearly in t). With
    use_karras_sigmas the σ's follow Karras eq. 5 between the same σ_max and σ_min (or the config's sigma_max /
    sigma_min) and each t is found back from its σ (interpolated in log σ)."""
    T = len(alphas_cumprod)
    if cfg["timestep_spacing"] == "linspace":  # fractional timesteps, not rounded
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    else:
        timesteps = spaced_timesteps(n, T, cfg["timestep_spacing"], cfg["steps_offset"]).astype(np.float32)
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # σ(t), t = 0..T-1
    log_sigmas = np.log(sigmas)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)   # σ at (fractional) t, linear in t
    if cfg.get("use_karras_sigmas"):
        lo = cfg["sigma_min"] if cfg.get("sigma_min") is not None else sigmas[-1].item()
        hi = cfg["sigma_max"] if cfg.get("sigma_max") is not None else sigmas[0].item()
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, log_sigmas)
    return timesteps, sigmas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n-1.
    ρ = 7 spends more steps at low noise, where the image's detail is decided. -> [n] decreasing."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


# ------------------------------------------------------------------------------------------------------ noise
def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor`: a CPU generator draws on the CPU and the
    result moves to `device` (so a seed gives the same numbers on every machine); a list of generators draws
    one batch item from each."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    gen_device = (generator[0] if isinstance(generator, list) else generator).device if generator is not None else None
    rand_device = torch.device("cpu") if gen_device is not None and gen_device.type == "cpu" else device
    if isinstance(generator, list):
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def denoised_ve(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """The σ-samplers' denoiser D(x; σ) (Karras et al. 2022, Table 1): the clean image the network's output implies
    at x = x_0 + σ n. sample, model_output: [B, C, H, W] -> [B, C, H, W].
        "epsilon":       D = x - σ ε̂
        "v_prediction":  D = -σ/√(σ²+1) v̂ + x/(σ²+1)   (v in VP units, converted to VE)
        "sample":        D = the output itself"""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


def sigma_init_noise(sigmas: torch.Tensor, spacing: str) -> float:
    """Std of x_N for the σ-samplers (Euler, Heun, DPM2, ...): σ_max, or √(σ_max² + 1) for "leading" spacing, whose
    first timestep is below T - 1 (as diffusers)."""
    max_sigma = sigmas.max()
    if spacing in ("linspace", "trailing"):
        return float(max_sigma)
    return float((max_sigma ** 2 + 1) ** 0.5)


def per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-sample coefficient [B] (or a scalar) -> [B, 1, ..., 1] with `ndim` dims, to broadcast over an image."""
    v = v.flatten()
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))  # [B] -> [B, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------- base class
class Scheduler:
    """What all schedulers share: the config (in diffusers' key names), the β/ᾱ tables, add_noise, get_velocity.

    Subclasses declare
        class_name  the diffusers class whose config and numbers they reproduce
        defaults    {setting: default} — every setting the class understands, in diffusers' key names
        choices     {setting: allowed values} for the string settings
        fixed       diffusers settings this class reads but implements only at their default value
                    (a config asking for anything else raises NotImplementedError instead of being ignored)
    """

    class_name = "Scheduler"
    # a timestep that is not in self.timesteps: "raise", or "last" (the last step, as diffusers' multistep solvers
    # DPM-Solver++ and UniPC take it)
    absent_timestep = "raise"
    order = 1               # network calls per step: 2 for Heun and DPM2, whose timesteps list each step twice
    init_noise_sigma = 1.0  # std of x_T: unit Gaussian for the variance-preserving (VP) samplers
    defaults: dict = dict(SCHEDULE_DEFAULTS)
    choices: dict = {}
    fixed: dict = {}

    def __init__(self, **settings):
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown settings {unknown}; known: {sorted(self.defaults)}")
        cfg = {**self.defaults, **settings}
        for key, allowed in self.choices.items():
            if cfg[key] not in allowed:
                raise ValueError(f"{type(self).__name__}: {key}={cfg[key]!r} is not supported; choose from {allowed}")
        self._settings = cfg
        self._given = set(settings)  # the rest took defaults: diffusers' `_use_default_values`
        self._extra = {}             # other schedulers' keys of a loaded config, carried along as diffusers does
        self.num_train_timesteps = cfg["num_train_timesteps"]
        self.betas = make_betas(cfg)                              # β_t      [T]
        self.alphas = 1.0 - self.betas                            # α_t      [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)   # ᾱ_t      [T]
        self.one = torch.tensor(1.0)                              # ᾱ before the first step (t = -1): no noise yet
        self.num_inference_steps = None
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)  # until set_timesteps: every t

    # ------------------------------------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: dict | None = None, **overrides):
        """Build from a diffusers scheduler_config.json dict (of any scheduler class, as diffusers' from_config).

        Keys this class does not know (e.g. `_class_name`, or `skip_prk_steps` given to DDIM) are ignored but kept in
        `.config`; keys listed in the config's `_use_default_values` were defaults of the class that wrote it and do
        not carry over; `overrides` win over the config.
        """
        config = dict(config or {})
        used_defaults = set(config.pop("_use_default_values", []))
        config = {k: v for k, v in config.items() if k not in used_defaults}
        config.update(overrides)
        for key, only in cls.fixed.items():
            if key in config and config[key] not in (only, None):
                raise NotImplementedError(f"{cls.__name__}: {key}={config[key]!r} is not implemented "
                                          f"(only {only!r})")
        sched = cls(**{k: v for k, v in config.items() if k in cls.defaults})
        sched._extra = {k: v for k, v in config.items() if k not in cls.defaults and not k.startswith("_")}
        return sched

    @property
    def config(self) -> dict:
        """The settings in diffusers' key names, ready to be written back as scheduler_config.json."""
        cfg = {"_class_name": self.class_name, **self._settings, **self._extra}
        defaulted = sorted(set(self._settings) - self._given)
        if defaulted:
            cfg["_use_default_values"] = defaulted
        return cfg

    def __repr__(self):
        return f"{type(self).__name__}({self._settings})"

    def __len__(self):
        return self.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the n timesteps to visit, spaced by the `timestep_spacing` setting; sets self.timesteps
        (LongTensor [n], decreasing). DDPM and DDIM use this as is; PNDM, Euler and DPM-Solver++ add their own."""
        T = self.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} cannot exceed num_train_timesteps={T}")
        self.num_inference_steps = num_inference_steps
        cfg = self._settings
        ts = spaced_timesteps(num_inference_steps, T, cfg["timestep_spacing"], cfg["steps_offset"])
        self.timesteps = torch.from_numpy(ts).to(device)

    # ------------------------------------------------------------------- starting mid-schedule (image-to-image)
    # Samplers that keep a position in a σ table (Euler, Euler ancestral, LMS, Heun, DPM2, DPM-Solver++, UniPC, LCM)
    # count steps from `step_index`. Image-to-image starts part-way down the schedule; diffusers' pipelines then call
    # set_begin_index(i) so the first step (and add_noise before it) use entry i instead of searching for t.
    _begin_index = None
    _step_index = None      # None until the first step (or set_timesteps) places it

    @property
    def step_index(self):
        """How many steps this schedule has taken (the next σ's position), or None before the first."""
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """Position of `timestep` in self.timesteps: the second match if it occurs twice (as diffusers: a sampler that
        starts mid-schedule must not take the step before it); an absent one per `absent_timestep`."""
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(self.timesteps.device)
        idx = (self.timesteps == timestep).nonzero()
        if len(idx) == 0:
            if self.absent_timestep == "last":
                return len(self.timesteps) - 1
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
        return idx[1 if len(idx) > 1 else 0].item()

    def _init_step_index(self, timestep):
        """The position of the first step: begin_index when set, else where `timestep` sits in self.timesteps."""
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _noise_indices(self, timesteps) -> list[int]:
        """Which σ add_noise uses for each t, as diffusers' σ-schedulers choose it: the position of t (no begin
        index: training, or a pipeline that never set one); the current step (inpainting, after a step);
        begin_index (image-to-image, before the first step)."""
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        return [self._begin_index if self._step_index is None else self._step_index] * len(timesteps)

    # --------------------------------------------------------------------------------------- shared maths
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """What the network is fed at timestep t. Identity for the VP samplers (x_t already has unit variance)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process, DDPM eq. 4: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.
        x_0, ε: [B, C, H, W]; timesteps: LongTensor [B] (one t per sample) -> x_t [B, C, H, W]."""
        ab = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        ab_t = ab[timesteps.to(original_samples.device)]
        n = original_samples.ndim
        return per_sample(ab_t ** 0.5, n) * original_samples + per_sample((1 - ab_t) ** 0.5, n) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The "v" target (Salimans & Ho 2022, sec. 4): v = √ᾱ_t ε - √(1-ᾱ_t) x_0.
        sample (= x_0), noise: [B, C, H, W]; timesteps: [B] -> [B, C, H, W]."""
        ab = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        ab_t = ab[timesteps.to(sample.device)]
        n = sample.ndim
        return per_sample(ab_t ** 0.5, n) * noise - per_sample((1 - ab_t) ** 0.5, n) * sample

    def _x0_and_eps(self, model_output, sample, alpha_prod_t):
        """Both readings of the network's output at x_t: the clean-image estimate x̂_0 and the noise estimate ε̂,
        whichever of them (or v) the network was trained to predict (DDPM eq. 15; v-param: Salimans & Ho sec. 4)."""
        a, b = alpha_prod_t, 1 - alpha_prod_t  # ᾱ_t, 1 - ᾱ_t
        kind = self._settings["prediction_type"]
        if kind == "epsilon":       # x̂_0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t
            return (sample - b ** 0.5 * model_output) / a ** 0.5, model_output
        if kind == "v_prediction":  # x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v̂,  ε̂ = √ᾱ_t v̂ + √(1-ᾱ_t) x_t
            return a ** 0.5 * sample - b ** 0.5 * model_output, a ** 0.5 * model_output + b ** 0.5 * sample
        if kind == "sample":        # the output is x̂_0 itself; ε̂ = (x_t - √ᾱ_t x̂_0) / √(1-ᾱ_t)
            return model_output, (sample - a ** 0.5 * model_output) / b ** 0.5
        raise ValueError(f"prediction_type {kind!r} is not supported")
