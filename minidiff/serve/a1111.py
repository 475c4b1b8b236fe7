"""What AUTOMATIC1111's web UI API defines, written down once: its sampler names, the fields of its requests with
their defaults, and the shapes of its answers (modules/api/models.py and modules/processing.py of
AUTOMATIC1111/stable-diffusion-webui, read for this file; no code copied).

    samplers_list()       GET /sdapi/v1/samplers, from minidiff.schedulers' table of the names users know
    TXT2IMG_FIELDS        every field of POST /sdapi/v1/txt2img with AUTOMATIC1111's default
    IMG2IMG_FIELDS        the same for POST /sdapi/v1/img2img
    IMPLEMENTED           the fields minidiff acts on; the others are accepted and ignored (IGNORED_*)
    read_request(body)    a JSON object -> a Request, every value checked, errors naming the field (RequestError)
    processed_info(...)   the "info" JSON string of a txt2img / img2img answer (AUTOMATIC1111's Processed.js())
"""
from __future__ import annotations

import datetime
import json
import math
import random
from dataclasses import dataclass, field

from ..schedulers.names import (A1111_ALIASES, A1111_NAMES, A1111_SCHEDULE_TYPES, KARRAS, a1111_label, resolve,
                                split_karras)
from ..validation import show

# The sampler names are minidiff.schedulers' one table (schedulers/names.py): AUTOMATIC1111's labels, their aliases,
# the schedule types. The API lists every label, and "<label> Karras" as the samplers of their own that versions
# before 1.9 listed (clients written for those still send them).
DEFAULT_SAMPLER = "Euler"      # AUTOMATIC1111's API: sampler_name None, sampler_index "Euler"
SCHEDULE_TYPES = tuple(A1111_SCHEDULE_TYPES)   # the `scheduler` field (AUTOMATIC1111 1.9+) minidiff can follow
ANCESTRAL = ("euler_a", "dpm2_a", "dpmpp_sde")  # samplers that draw noise every step (AUTOMATIC1111's uses_ensd)


def sampler_labels() -> list[str]:
    """Every sampler label the API offers, AUTOMATIC1111's order of kinds: each label, then its Karras twin."""
    return [label + k for label, ours in A1111_NAMES.items() for k in ("", " Karras") if not k or ours in KARRAS]


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers: [{"name", "aliases", "options"}] (the minidiff name is added to the aliases)."""
    out = []
    for label in sampler_labels():
        ours = resolve(label)
        aliases = [a for a, target in A1111_ALIASES.items() if target == label] + [ours]
        options = {"scheduler": "karras"} if ours.endswith("_karras") else {}
        if split_karras(ours)[0] in ANCESTRAL:
            options["uses_ensd"] = True
        out.append({"name": label, "aliases": aliases, "options": options})
    return out


# ------------------------------------------------------------------------------------------------ request fields
# AUTOMATIC1111's StableDiffusionProcessing (+ Txt2Img / Img2Img) __init__ fields and the API's extra keys, with their
# defaults (1.6 - 1.10). A request may give any of them; the answer's "parameters" echoes them all.
_COMMON = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "override_settings": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "comments": None,
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "force_task_id": None, "infotext": None,
}
TXT2IMG_FIELDS = {
    **_COMMON, "denoising_strength": 0.75, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "firstpass_image": None,
}
IMG2IMG_FIELDS = {
    **_COMMON, "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": None,
    "mask": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}
IMPLEMENTED = {"prompt", "negative_prompt", "seed", "subseed", "sampler_name", "sampler_index", "scheduler",
               "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "eta", "override_settings",
               "send_images", "force_task_id", "infotext", "init_images", "denoising_strength", "mask", "mask_blur",
               "mask_blur_x", "mask_blur_y", "inpainting_mask_invert", "include_init_images", "save_images",
               "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards"}
IGNORED_TXT2IMG = sorted(set(TXT2IMG_FIELDS) - IMPLEMENTED)
IGNORED_IMG2IMG = sorted(set(IMG2IMG_FIELDS) - IMPLEMENTED)

# Stated limits (the README's "Limits"): one request's images, the pixels of an output, of an input picture
MAX_IMAGES_PER_REQUEST = 100              # batch_size x n_iter
MAX_OUTPUT_PIXELS = 2048 * 2048           # width x height of what is generated
MAX_INPUT_PIXELS = 4096 * 4096            # an init image or mask, before it is resized to width x height


class RequestError(ValueError):
    """A request field with a wrong type or value; the message names the field (HTTP 422)."""


@dataclass
class Request:
    """A txt2img / img2img request, read and checked. `parameters` echoes every field (AUTOMATIC1111's default where
    the client gave none); the rest is what minidiff acts on."""
    mode: str                              # "txt2img" | "img2img"
    parameters: dict
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    sampler: str | None = None             # minidiff scheduler name
    sampler_label: str = DEFAULT_SAMPLER   # AUTOMATIC1111's name, as the infotext writes it
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None               # None: the model's own size (see the README: "sizes")
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    denoising_strength: float = 0.75
    init_images: list = field(default_factory=list)   # base64 strings (decoded by the server)
    mask: str | None = None
    mask_blur: tuple[int, int] = (4, 4)    # Gaussian σ in x and y, pixels
    inpainting_mask_invert: bool = False
    send_images: bool = True
    checkpoint: str | None = None          # override_settings' sd_model_checkpoint
    task_id: str | None = None             # force_task_id


def _integral(v):
    """JSON numbers as Python: an integral float (20.0) is an int, as AUTOMATIC1111's pydantic models take it."""
    return int(v) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else v


def _int(body, name, lo=None, hi=None) -> int:
    v = _integral(body[name])
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name} must be an int, got {show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be an int {allowed}, got {v}")
    return v


def _float(body, name, lo=None, hi=None) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{name} must be a finite number, got {show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"{name} must be a number in [{lo}, {hi}], got {v}")
    return float(v)


def _str(body, name, optional=False) -> str | None:
    v = body[name]
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise RequestError(f"{name} must be a string{' or null' if optional else ''}, got {show(v)}")
    return v


def _bool(body, name) -> bool:
    v = body[name]
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false, got {show(v)}")
    return v


def read_request(body, mode: str, infotext_parse=None) -> Request:
    """Check a txt2img / img2img JSON body field by field (types, AUTOMATIC1111's ranges, minidiff's limits) and fill
    AUTOMATIC1111's defaults. Raises RequestError naming the field. What the model decides (steps' upper bound, sizes
    that divide by its VAE factor, prompt tokens) is checked next by minidiff.validation, at submission."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {show(body)}")
    defaults = TXT2IMG_FIELDS if mode == "txt2img" else IMG2IMG_FIELDS
    given = {k: v for k, v in body.items() if k in defaults and v is not None}
    if "infotext" in given:   # AUTOMATIC1111 1.7+: settings from an infotext, for the fields the request leaves out
        text = _str(given, "infotext")
        from ..infotext import parse
        for k, v in _from_infotext(parse(text)).items():
            given.setdefault(k, v)
    params = {**defaults, **{k: v for k, v in body.items() if k in defaults}}
    b = {**defaults, **given}
    r = Request(mode=mode, parameters=params)
    r.prompt = _str(b, "prompt")
    r.negative_prompt = _str(b, "negative_prompt")
    r.seed = _int(b, "seed")
    r.subseed = _int(b, "subseed")
    r.steps = _integral(b["steps"])          # range and type: minidiff.validation (it knows the model's limit)
    r.cfg_scale = b["cfg_scale"]            # type and range: minidiff.validation (guidance_scale)
    r.batch_size = _int(b, "batch_size", 1)
    r.n_iter = _int(b, "n_iter", 1)
    if r.batch_size * r.n_iter > MAX_IMAGES_PER_REQUEST:
        raise RequestError(f"batch_size x n_iter must be at most {MAX_IMAGES_PER_REQUEST} images, got "
                           f"{r.batch_size} x {r.n_iter}")
    for name in ("width", "height"):         # not given: the model's own size (README), else checked by the library
        setattr(r, name, _integral(given[name]) if name in given else None)
    if isinstance(r.width, int) and isinstance(r.height, int) and r.width * r.height > MAX_OUTPUT_PIXELS:
        raise RequestError(f"width x height must be at most {MAX_OUTPUT_PIXELS} pixels "
                           f"({MAX_OUTPUT_PIXELS / 1e6:.1f} megapixels), got {r.width}x{r.height}")
    if b["eta"] is not None:
        r.eta = _float(b, "eta", 0, 1)
    r.sampler, r.sampler_label = _sampler(b)
    r.send_images = _bool(b, "send_images")
    r.task_id = _str(b, "force_task_id", optional=True)
    overrides = b["override_settings"]
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise RequestError(f"override_settings must be an object, got {show(overrides)}")
        ckpt = overrides.get("sd_model_checkpoint")
        if ckpt is not None and not isinstance(ckpt, str):
            raise RequestError(f"override_settings.sd_model_checkpoint must be a string, got {show(ckpt)}")
        r.checkpoint = ckpt
    if mode == "img2img":
        _read_img2img(b, r)
    return r


def _sampler(b) -> tuple[str, str]:
    name = b["sampler_name"] if b["sampler_name"] is not None else b["sampler_index"]
    field_name = "sampler_name" if b["sampler_name"] is not None else "sampler_index"
    if not isinstance(name, str):
        raise RequestError(f"{field_name} must be a string, got {show(name)}")
    schedule = b["scheduler"]
    if schedule is not None and (not isinstance(schedule, str) or schedule.capitalize() not in SCHEDULE_TYPES):
        raise RequestError(f"scheduler must be one of {', '.join(SCHEDULE_TYPES)} (minidiff has no other schedule "
                           f"type), got {show(schedule)}")
    try:
        ours = resolve(name, schedule)
    except ValueError as e:
        raise RequestError(f"{field_name}: {e}") from None
    return ours, a1111_label(ours)


def _read_img2img(b, r: Request) -> None:
    images = b["init_images"]
    if not isinstance(images, list) or not images:
        raise RequestError(f"init_images must be a non-empty list of base64 PNG strings, got {show(images)}")
    for i, s in enumerate(images):
        if not isinstance(s, str):
            raise RequestError(f"init_images[{i}] must be a base64 string, got {show(s)}")
    r.init_images = images
    r.denoising_strength = _float(b, "denoising_strength", 0, 1)
    r.mask = _str(b, "mask", optional=True)
    if b["mask_blur"] is not None:
        r.mask_blur = (_int(b, "mask_blur", 0, 64),) * 2
    else:
        r.mask_blur = (_int(b, "mask_blur_x", 0, 64), _int(b, "mask_blur_y", 0, 64))
    invert = _integral(b["inpainting_mask_invert"])
    if invert not in (0, 1):    # 0 / 1 (True / False too, as pydantic's int takes them)
        raise RequestError(f"inpainting_mask_invert must be 0 (inpaint the white) or 1 (the black), got {show(invert)}")
    r.inpainting_mask_invert = bool(invert)
    if not b["include_init_images"]:
        r.parameters["init_images"] = None
        r.parameters["mask"] = None


def _from_infotext(d: dict) -> dict:
    """parse()'s names -> the request's fields."""
    out = {k: d[k] for k in ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width",
                             "height", "denoising_strength") if k in d and d[k] not in ("", None)}
    return out


def fixed_seed(seed: int) -> int:
    """AUTOMATIC1111's get_fixed_seed: -1 draws a random seed (in [0, 4294967294)), anything else stays."""
    return random.randrange(4294967294) if seed == -1 else seed


# ------------------------------------------------------------------------------------------------ answers
def processed_info(r: Request, *, seed: int, subseed: int, n: int, width: int, height: int, infotexts: list[str],
                   model_name: str, model_hash: str) -> str:
    """The "info" string of a txt2img / img2img answer: AUTOMATIC1111's Processed.js() as JSON text."""
    obj = {
        "prompt": r.prompt, "all_prompts": [r.prompt] * n,
        "negative_prompt": r.negative_prompt, "all_negative_prompts": [r.negative_prompt] * n,
        "seed": seed, "all_seeds": [seed + i for i in range(n)],
        "subseed": subseed, "all_subseeds": [subseed + i for i in range(n)], "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": r.sampler_label, "cfg_scale": float(r.cfg_scale),
        "steps": r.steps, "batch_size": r.batch_size, "restore_faces": None, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": r.denoising_strength if r.mode == "img2img" else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "minidiff",
    }
    return json.dumps(obj)
