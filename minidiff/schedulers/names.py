"""The names a sampler goes by: minidiff's own, AUTOMATIC1111's, diffusers' class names — one table.

Every place that lets a user pick a sampler (generate(scheduler=...), every command's --scheduler, the AUTOMATIC1111 API
of `minidiff serve`) sends the name through `resolve`, which accepts, in any case:

    minidiff names        "dpmpp", "dpmpp_karras", "euler_a", ...                      (SCHEDULER_NAMES)
    AUTOMATIC1111 names   "DPM++ 2M", "DPM++ 2M Karras", "Euler a", "UniPC", "LCM", ...  (A1111_NAMES, + " Karras")
    their aliases         "k_dpmpp_2m", "k_euler_a", "k_lms_ka", ...                    (A1111_ALIASES)
    a schedule type       resolve("DPM++ 2M", "Karras") — AUTOMATIC1111 1.9+ sends the sampler and its
                          "Schedule type" apart (A1111_SCHEDULE_TYPES); older versions wrote "DPM++ 2M Karras"

and returns the minidiff name. "<name>_karras" is the sampler on Karras et al.'s σ spacing (use_karras_sigmas=True in
diffusers), offered where diffusers offers it (KARRAS).

What the A1111 names mean here is what diffusers' documentation maps them to (its scheduler table: "DPM++ 2M" is
DPMSolverMultistepScheduler, "DPM++ 2M Karras" the same with use_karras_sigmas=True, "DPM++ 2M SDE" its
algorithm_type="sde-dpmsolver++", ...), and minidiff reproduces diffusers' numbers, not k-diffusion's. Two honest
differences: AUTOMATIC1111 1.9+ runs "DPM++ 2M", "DPM2" and "DPM2 a" on Karras σ's when the schedule type is
"Automatic" (the sampler's own default there); here "Automatic" keeps the plain schedule, so ask for "Karras". And
k-diffusion's SDE samplers draw Brownian-tree noise; diffusers' (and minidiff's) draw Gaussian noise per step.

Pure Python (no torch): the command lines import it to check --scheduler before loading anything.
"""
from __future__ import annotations

# minidiff's names: one per sampler file of this package (minidiff/schedulers/<file>.py holds the class)
SAMPLERS = ("ddim", "ddpm", "dpm2", "dpm2_a", "dpmpp", "dpmpp_sde", "euler", "euler_a", "heun", "lcm", "lms", "pndm",
            "unipc")
# the samplers diffusers offers Karras σ's for (use_karras_sigmas); "<name>_karras" selects them
KARRAS = ("dpm2", "dpm2_a", "dpmpp", "dpmpp_sde", "euler", "heun", "lms", "unipc")
SCHEDULER_NAMES = sorted([*SAMPLERS, *(f"{n}_karras" for n in KARRAS)])

# AUTOMATIC1111's sampler labels (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py),
# spelled as its UI, its API (/sdapi/v1/samplers) and its PNG infotexts write them -> minidiff's name
A1111_NAMES: dict[str, str] = {
    "Euler a": "euler_a", "Euler": "euler", "LMS": "lms", "Heun": "heun", "DPM2": "dpm2", "DPM2 a": "dpm2_a",
    "DPM++ 2M": "dpmpp", "DPM++ 2M SDE": "dpmpp_sde", "DDIM": "ddim", "PLMS": "pndm", "UniPC": "unipc", "LCM": "lcm",
}
# AUTOMATIC1111's aliases for them (the same files), -> the label they stand for ("_ka": the Karras entries of
# versions before 1.9, which listed "LMS Karras", "DPM++ 2M Karras", ... as samplers of their own)
A1111_ALIASES: dict[str, str] = {
    "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS",
    "k_lms_ka": "LMS Karras", "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_ka": "DPM2 Karras", "k_dpm_2_a": "DPM2 a",
    "k_dpm_2_a_ka": "DPM2 a Karras", "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_ka": "DPM++ 2M Karras",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras", "ddim": "DDIM", "plms": "PLMS",
    "unipc": "UniPC", "k_lcm": "LCM",
}
# AUTOMATIC1111's "Schedule type" (modules/sd_schedulers.py) minidiff has: -> the suffix it adds to the name
A1111_SCHEDULE_TYPES: dict[str, str] = {"Automatic": "", "Karras": "_karras"}

# the diffusers class each sampler reproduces (the `_class_name` of a scheduler_config.json) -> minidiff's name.
# DPMSolverMultistepScheduler is two samplers: its algorithm_type "sde-dpmsolver++" is "dpmpp_sde" (see from_config)
DIFFUSERS_CLASSES: dict[str, str] = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_a", "DPMSolverMultistepScheduler": "dpmpp",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
    "LCMScheduler": "lcm", "LMSDiscreteScheduler": "lms", "PNDMScheduler": "pndm", "UniPCMultistepScheduler": "unipc",
}


def known_names() -> str:
    """Every accepted name, for error messages."""
    return (f"{', '.join(SCHEDULER_NAMES)}, or an AUTOMATIC1111 name: {', '.join(A1111_NAMES)} "
            f"(+ ' Karras' for {', '.join(n for n, m in A1111_NAMES.items() if m in KARRAS)})")


def resolve(name: str, schedule_type: str | None = None) -> str:
    """A sampler name users know -> minidiff's name (one of SCHEDULER_NAMES). Any case; surrounding spaces ignored.

    name: a minidiff name, an AUTOMATIC1111 label ("DPM++ 2M", "DPM++ 2M Karras") or alias ("k_dpmpp_2m_ka").
    schedule_type: AUTOMATIC1111's separate "Schedule type" field: None, "" or "Automatic" (the sampler's plain
    schedule) or "Karras". A " Karras" in the name wins, as in AUTOMATIC1111. Unknown names raise ValueError listing
    the known ones; Karras asked of a sampler diffusers offers no Karras σ's for raises too."""
    if not isinstance(name, str):
        raise TypeError(f"a sampler name must be a str, got {type(name).__name__}")
    text = name.strip().lower()
    aliases = {k.lower(): v for k, v in A1111_ALIASES.items()}
    text = aliases.get(text, text).lower()
    labels = {k.lower(): v for k, v in A1111_NAMES.items()}
    karras = False
    if text not in SCHEDULER_NAMES and text not in labels and text.endswith(" karras"):  # "DPM++ 2M Karras"
        text, karras = text[:-len(" karras")], True
    found = text if text in SCHEDULER_NAMES else labels.get(text)
    if found is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {known_names()} (any case)")
    types = {k.lower(): v for k, v in A1111_SCHEDULE_TYPES.items()}
    if schedule_type is not None and schedule_type.strip().lower() not in ("", *types):
        raise ValueError(f"unknown schedule type {schedule_type!r}; minidiff has {', '.join(A1111_SCHEDULE_TYPES)}")
    karras = karras or (schedule_type or "").strip().lower() == "karras"
    if karras and not found.endswith("_karras"):
        if found not in KARRAS:
            raise ValueError(f"sampler {name!r} has no Karras σ's (diffusers offers them for "
                             f"{', '.join(KARRAS)}); drop 'Karras'")
        found += "_karras"
    return found


def a1111_label(name: str) -> str:
    """A minidiff name -> the label AUTOMATIC1111 writes for it (its infotexts, /sdapi/v1/samplers):
    "dpmpp_karras" -> "DPM++ 2M Karras", "euler_a" -> "Euler a". The inverse of resolve on minidiff's names; a sampler
    AUTOMATIC1111 lacks (DDPM) keeps its minidiff name, which resolve reads back."""
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"{name!r} is not a minidiff sampler name; choose one of {', '.join(SCHEDULER_NAMES)}")
    base, karras = split_karras(name)
    label = next((k for k, v in A1111_NAMES.items() if v == base), None)
    return name if label is None else label + (" Karras" if karras else "")


def split_karras(name: str) -> tuple[str, bool]:
    """A minidiff name -> (the sampler's name, whether it runs on Karras σ's): "dpmpp_karras" -> ("dpmpp", True)."""
    if name.endswith("_karras") and name[:-len("_karras")] in KARRAS:
        return name[:-len("_karras")], True
    return name, False


__all__ = ["A1111_ALIASES", "A1111_NAMES", "A1111_SCHEDULE_TYPES", "DIFFUSERS_CLASSES", "KARRAS", "SAMPLERS",
           "SCHEDULER_NAMES", "a1111_label", "known_names", "resolve", "split_karras"]
