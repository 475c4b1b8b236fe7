"""minidiff.schedulers — chapter 9: walking back from noise to an image.

Every scheduler reads a diffusers scheduler_config.json dict and reproduces the matching diffusers class:

    s = make_scheduler("ddim", cfg)         # or DDIMScheduler.from_config(cfg)
    s.set_timesteps(50)
    x = unit_noise * s.init_noise_sigma
    for t in s.timesteps:
        eps = unet(s.scale_model_input(x, t), t, context)
        x = s.step(eps, t, x, generator=g)

    base.py   β schedules, ᾱ, add_noise (training), config parsing      ddpm.py   ancestral sampling (Ho et al. 2020)
    pndm.py   PLMS / F-PNDM (Liu et al. 2022), SD v1's default           ddim.py   DDIM, eta (Song et al. 2021)
    euler.py  Euler on the σ ODE (Karras et al. 2022)                    dpmpp.py  DPM-Solver++(2M) (Lu et al. 2022)
    euler_a.py  Euler ancestral (k-diffusion)                            lms.py    linear multistep on σ (k-diffusion)
"""
from __future__ import annotations

import warnings

from .base import SD_V1_CONFIG, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmpp import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_a import EulerAncestralDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler

SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "lms": LMSDiscreteScheduler,
              "dpmpp": DPMSolverMultistepScheduler}
# "<name>_karras": the same sampler on Karras et al.'s σ spacing (eq. 5, ρ = 7), use_karras_sigmas=True in diffusers
# ("DPM++ 2M Karras" in AUTOMATIC1111's list is "dpmpp_karras")
KARRAS = ("euler", "lms", "dpmpp")
SCHEDULER_NAMES = sorted([*SCHEDULERS, *(f"{n}_karras" for n in KARRAS)])


def make_scheduler(name: str, config: dict | None = None, **overrides) -> Scheduler:
    """A fresh scheduler of kind `name` (one of SCHEDULER_NAMES, any case) on the schedule of `config` (a diffusers
    scheduler_config.json dict of any scheduler class; None = SD v1.4's). `overrides` win over the config."""
    key = name.lower() if isinstance(name, str) else name
    if isinstance(key, str) and key.endswith("_karras") and key[:-len("_karras")] in KARRAS:
        key, overrides = key[:-len("_karras")], {**overrides, "use_karras_sigmas": True}
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULER_NAMES)}")
    return SCHEDULERS[key].from_config(SD_V1_CONFIG if config is None else config, **overrides)


def scheduler_name(config: dict | None) -> str:
    """The SCHEDULERS key of the class a scheduler_config.json names (its `_class_name`). A class minidiff does not
    implement (or none named) falls back to "pndm", SD v1.4's own, with a warning saying so."""
    by_class = {cls.__name__: name for name, cls in SCHEDULERS.items()}
    class_name = (config or {}).get("_class_name")
    if class_name in by_class:
        return by_class[class_name]
    warnings.warn(f"the model's scheduler_config.json names {class_name!r}, which minidiff does not implement; "
                  f"sampling with PNDMScheduler ('pndm', SD v1.4's default) instead. Pass scheduler= one of "
                  f"{', '.join(SCHEDULER_NAMES)} to choose.", stacklevel=2)
    return "pndm"


__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
           "EulerDiscreteScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "SCHEDULERS", "SCHEDULER_NAMES",
           "SD_V1_CONFIG", "Scheduler", "make_scheduler", "scheduler_name"]
