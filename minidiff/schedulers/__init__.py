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
"""
from .base import SD_V1_CONFIG, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmpp import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .pndm import PNDMScheduler

SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
              "dpmpp": DPMSolverMultistepScheduler}


def make_scheduler(name: str, config: dict | None = None, **overrides) -> Scheduler:
    """A fresh scheduler of kind `name` (a key of SCHEDULERS) on the schedule of `config` (a diffusers
    scheduler_config.json dict of any scheduler class; None = SD v1.4's). `overrides` win over the config.
    The name is case-insensitive ("DDIM" is "ddim")."""
    if not isinstance(name, str) or name.lower() not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(sorted(SCHEDULERS))} (any case)")
    return SCHEDULERS[name.lower()].from_config(SD_V1_CONFIG if config is None else config, **overrides)


def scheduler_name(config: dict | None) -> str:
    """The SCHEDULERS key of the class a scheduler_config.json names (its `_class_name`); "pndm" when it names none
    we have (SD v1.4's own config names PNDMScheduler)."""
    by_class = {cls.__name__: name for name, cls in SCHEDULERS.items()}
    return by_class.get((config or {}).get("_class_name"), "pndm")


__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
           "SCHEDULERS", "SD_V1_CONFIG", "Scheduler", "make_scheduler", "scheduler_name"]
