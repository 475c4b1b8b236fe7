"""minidiff.schedulers — chapter 9: walking back from noise to an image.

Every scheduler reads a diffusers scheduler_config.json dict and reproduces the matching diffusers class:

    s = make_scheduler("ddim", cfg)         # or DDIMScheduler.from_config(cfg); or "DPM++ 2M Karras", "Euler a", ...
    s.set_timesteps(50)
    x = unit_noise * s.init_noise_sigma
    for t in s.timesteps:                   # Heun and DPM2 list each step twice (two network calls, s.order = 2)
        eps = unet(s.scale_model_input(x, t), t, context)
        x = s.step(eps, t, x, generator=g)

    base.py   β schedules, ᾱ, add_noise (training), config parsing      ddpm.py   ancestral sampling (Ho et al. 2020)
    pndm.py   PLMS / F-PNDM (Liu et al. 2022), SD v1's default           ddim.py   DDIM, eta (Song et al. 2021)
    euler.py  Euler on the σ ODE (Karras et al. 2022)                    dpmpp.py  DPM-Solver++(2M) (Lu et al. 2022)
    euler_a.py  Euler ancestral (k-diffusion)                            lms.py    linear multistep on σ (k-diffusion)
    heun.py   Heun, 2nd order (Karras et al. 2022, Alg. 1)               dpm2.py   DPM2, the midpoint method on σ
    dpm2_a.py DPM2 ancestral (k-diffusion)                               dpmpp_sde.py  DPM-Solver++(2M) SDE
    unipc.py  UniPC predictor-corrector (Zhao et al. 2023)               lcm.py    latent consistency (Luo et al. 2023)
    names.py  the names users know (AUTOMATIC1111's, diffusers' classes) -> minidiff's
"""
from __future__ import annotations

import warnings

from .base import SD_V1_CONFIG, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm2 import KDPM2DiscreteScheduler
from .dpm2_a import KDPM2AncestralDiscreteScheduler
from .dpmpp import DPMSolverMultistepScheduler
from .dpmpp_sde import DPMSolverMultistepSDEScheduler
from .euler import EulerDiscreteScheduler
from .euler_a import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler, consistency_scalings, lcm_timesteps
from .lms import LMSDiscreteScheduler
from .names import (A1111_ALIASES, A1111_NAMES, A1111_SCHEDULE_TYPES, DIFFUSERS_CLASSES, KARRAS, SAMPLERS,
                    SCHEDULER_NAMES, a1111_label, known_names, resolve, split_karras)
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "lms": LMSDiscreteScheduler,
              "dpmpp": DPMSolverMultistepScheduler, "dpmpp_sde": DPMSolverMultistepSDEScheduler,
              "heun": HeunDiscreteScheduler, "dpm2": KDPM2DiscreteScheduler, "dpm2_a": KDPM2AncestralDiscreteScheduler,
              "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler}


def make_scheduler(name: str, config: dict | None = None, **overrides) -> Scheduler:
    """A fresh scheduler of kind `name` on the schedule of `config` (a diffusers scheduler_config.json dict of any
    scheduler class; None = SD v1.4's). `name`: any name `resolve` accepts — minidiff's (SCHEDULER_NAMES),
    AUTOMATIC1111's ("DPM++ 2M Karras") or its aliases, any case. `overrides` win over the config."""
    key, karras = split_karras(resolve(name))
    if karras:  # "<name>_karras": Karras et al.'s σ spacing (eq. 5, ρ = 7), use_karras_sigmas=True in diffusers
        overrides = {**overrides, "use_karras_sigmas": True}
    config = SD_V1_CONFIG if config is None else config
    # DPM++ 2M and DPM++ 2M SDE are one diffusers class: switching between them is choosing its algorithm_type
    # (an algorithm_type minidiff lacks, e.g. "dpmsolver", is left for from_config to refuse)
    algorithms = {n: SCHEDULERS[n].defaults["algorithm_type"] for n in ("dpmpp", "dpmpp_sde")}
    if key in algorithms and config.get("algorithm_type") in algorithms.values():
        overrides = {"algorithm_type": algorithms[key], **overrides}
    return SCHEDULERS[key].from_config(config, **overrides)


def scheduler_name(config: dict | None) -> str:
    """The SCHEDULERS key of the sampler a scheduler_config.json names (its `_class_name`; DPMSolverMultistepScheduler
    with algorithm_type "sde-dpmsolver++" is "dpmpp_sde"). A class minidiff does not implement (or none named) falls
    back to "pndm", SD v1.4's own, with a warning saying so."""
    config = config or {}
    class_name = config.get("_class_name")
    if class_name in DIFFUSERS_CLASSES:
        name = DIFFUSERS_CLASSES[class_name]
        return "dpmpp_sde" if name == "dpmpp" and config.get("algorithm_type") == "sde-dpmsolver++" else name
    warnings.warn(f"the model's scheduler_config.json names {class_name!r}, which minidiff does not implement; "
                  f"sampling with PNDMScheduler ('pndm', SD v1.4's default) instead. Pass scheduler= one of "
                  f"{', '.join(SCHEDULER_NAMES)} to choose.", stacklevel=2)
    return "pndm"


__all__ = ["a1111_label", "A1111_ALIASES", "A1111_NAMES", "A1111_SCHEDULE_TYPES", "DDIMScheduler", "DDPMScheduler",
           "DIFFUSERS_CLASSES", "DPMSolverMultistepSDEScheduler", "DPMSolverMultistepScheduler",
           "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KARRAS",
           "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler",
           "PNDMScheduler", "SAMPLERS", "SCHEDULERS", "SCHEDULER_NAMES", "SD_V1_CONFIG", "Scheduler",
           "UniPCMultistepScheduler", "consistency_scalings", "known_names", "lcm_timesteps", "make_scheduler",
           "resolve", "scheduler_name", "split_karras"]
