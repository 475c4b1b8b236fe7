"""Door checks: bad input is refused where it comes in, with a message that names the argument, the value and what is
allowed — never a raw error from deep inside torch, never a silently wrong image.

    check_generate_args(pipe, prompt=..., steps=..., ...)   every argument of StableDiffusion.generate, all of them
                                                             once, before any work: prompts or their embeddings,
                                                             sampler settings, the start image, its mask and strength,
                                                             the size and the explicit latents
    check_config("unet", d, where)                           a config.json dict, before any model is built
    NaNWatch                                                 NaN / inf latents during sampling -> NonFiniteError

Wrong type -> TypeError, right type but out of range -> ValueError (CheckpointError, a ValueError, for files): each
raised as minidiff.errors' InputTypeError / InputValueError, whose .field names the argument, so that a command prints
it as one line naming its flag while a TypeError from inside torch keeps its traceback. The settings of a run
(FinetuneConfig, the tiny recipe, compare(), each command's flags) have their door beside this one: minidiff.settings.
Non-finite numbers during sampling raise NonFiniteError (a FloatingPointError) naming the step: a NaN image is never
returned. The choice to raise (not warn) is deliberate: a NaN never heals, so every later step would be wasted work.
"""
from __future__ import annotations

import math

import torch
from PIL import Image

from . import images
from . import prompts as prompts_mod
from .errors import InputTypeError, InputValueError, MinidiffError
from .settings import SEED_MAX, is_int, is_real, show
from .schedulers import known_names, resolve

class NonFiniteError(MinidiffError, FloatingPointError):
    """Sampling produced NaN or inf (NaN weights, a huge guidance_scale, fp16 overflow, ...)."""


# ------------------------------------------------------------------------------------------------ small checks
def _int(name: str, v, lo: int, hi: int | None = None) -> None:
    allowed = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
    if not is_int(v):
        raise InputTypeError(f"{name} must be {allowed}, got {show(v)}", field=name)
    if v < lo or (hi is not None and v > hi):
        raise InputValueError(f"{name} must be {allowed}, got {v}", field=name)


def _real(name: str, v, lo: float | None = None, hi: float | None = None) -> None:
    rng = "" if lo is None and hi is None else f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
    if not is_real(v):
        raise InputTypeError(f"{name} must be a finite number{rng}, got {show(v)}", field=name)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputValueError(f"{name} must be a finite number{rng}, got {v}", field=name)


def _text(name: str, s: str) -> None:
    """A str that tokenizers can take: it must encode as UTF-8 (a lone surrogate, e.g. from a non-UTF-8 argv, cannot)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputValueError(f"{name} contains {s[e.start:e.end]!r} at position {e.start}, which is not valid "
                              f"Unicode text (a lone surrogate: was it read from a non-UTF-8 file or command line?); "
                              f"pass text that encodes as UTF-8", field=name.split("[")[0]) from None


def _prompts(name: str, v, n: int | None = None) -> int:
    """A str or a non-empty list of str (of length n when given) -> how many prompts."""
    if isinstance(v, str):
        _text(name, v)
        return 1
    if not isinstance(v, (list, tuple)):
        raise InputTypeError(f"{name} must be a str or a list of str, got {show(v)}", field=name)
    if not v:
        raise InputValueError(f"{name} must be a str or a non-empty list of str, got an empty {type(v).__name__}",
                              field=name)
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise InputTypeError(f"{name}[{i}] must be a str, got {show(s)}", field=name)
        _text(f"{name}[{i}]", s)
    if n is not None and len(v) != n:
        raise InputValueError(f"{name} has {len(v)} entries but prompt has {n}: give one per prompt, or a single str",
                              field=name)
    return len(v)


# ------------------------------------------------------------------------------------------------ generate()
def check_generate_args(pipe, *, prompt=None, negative_prompt=None, steps=50, guidance_scale=7.5, scheduler=None,
                        seed=None, latents=None, height=None, width=None, num_images=1, output="pil",
                        generator=None, eta=0.0, progress=True, callback=None, image=None, strength=0.75,
                        mask_image=None, prompt_embeds=None, negative_prompt_embeds=None) -> None:
    """Refuse any argument of StableDiffusion.generate that cannot give the image asked for (see the module doc).
    The one place generate()'s arguments are checked, all of them before any work: the sampling code takes what
    passes as valid."""
    B = _check_text(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale)
    cfg = pipe.scheduler_config or {}
    T, offset = cfg.get("num_train_timesteps", 1000), cfg.get("steps_offset", 1)  # minidiff's schedulers' defaults
    max_steps = T - (offset if is_int(offset) else 0)  # "leading" spacing adds the offset: t = T would not exist
    _int("steps", steps, 1, max_steps)
    _real("guidance_scale", guidance_scale, lo=0)
    if scheduler is not None:  # minidiff's sampler names or AUTOMATIC1111's (minidiff.schedulers.names)
        if not isinstance(scheduler, str):
            raise InputTypeError(f"scheduler must be None or one of {known_names()}, got {show(scheduler)}",
                                 field="scheduler")
        try:
            resolve(scheduler)
        except ValueError:
            raise InputValueError(f"scheduler must be one of {known_names()} (any case), got {scheduler!r}",
                                  field="scheduler") from None
    if seed is not None:
        _int("seed", seed, 0, SEED_MAX)
        if generator is not None:
            raise InputValueError("pass seed= or generator=, not both (the generator would win and the seed be "
                                  "ignored)", field="seed")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputTypeError(f"generator must be a torch.Generator, got {show(generator)}", field="generator")
    _int("num_images", num_images, 1)
    if output not in ("pil", "tensor"):
        raise InputValueError(f"output must be 'pil' or 'tensor', got {show(output)}", field="output")
    _real("eta", eta, 0, 1)  # DDIM's η: 0 = deterministic, 1 = DDPM's variance; > 1 asks for a negative variance
    if not isinstance(progress, bool):
        raise InputTypeError(f"progress must be True or False, got {show(progress)}", field="progress")
    if callback is not None and not callable(callback):
        raise InputTypeError(f"callback must be callable (step_index, t, latents) or None, got {show(callback)}",
                             field="callback")
    _check_unet_inputs(pipe, image, mask_image)
    _real("strength", strength, 0, 1)  # how much of the schedule image to image runs
    if image is not None:
        pictures = _check_image(image, B)
        if int(steps * strength) < 1:
            raise InputValueError(f"strength={strength} with steps={steps} leaves no step to run "
                                  f"(int(steps * strength) = 0); raise strength or steps", field="strength")
        if mask_image is not None:
            _check_mask(mask_image, image, pictures)
    _check_size(pipe, height, width, image)
    if latents is not None:
        _check_latents(pipe, latents, B * num_images, *pipe.image_size(image, height, width))


def _check_text(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale) -> int:
    """The prompts, as strings or as contexts [B, L, d] (as diffusers' encode_prompt takes them) -> B, how many."""
    if (prompt is None) == (prompt_embeds is None):
        raise InputValueError("pass either prompt or prompt_embeds (exactly one of them)", field="prompt")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InputValueError("pass either negative_prompt or negative_prompt_embeds, not both",
                              field="negative_prompt")
    d = pipe.unet.config.cross_attention_dim
    for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if e is None:
            continue
        if not isinstance(e, torch.Tensor):
            raise InputTypeError(f"{name} must be a tensor [B, L, {d}], got {show(e)}", field=name)
        if e.ndim != 3 or e.shape[-1] != d or 0 in e.shape:
            raise InputValueError(f"{name} must be a tensor [B, L, {d}], got {tuple(e.shape)}", field=name)
        if not e.is_floating_point():
            raise InputTypeError(f"{name} must be a floating-point tensor, got dtype {e.dtype}", field=name)
        if not torch.isfinite(e).all():
            raise InputValueError(f"{name} must be finite, got {int((~torch.isfinite(e)).sum())} NaN/inf values",
                                  field=name)
    B = _prompts("prompt", prompt) if prompt is not None else prompt_embeds.shape[0]
    if negative_prompt is not None:
        _prompts("negative_prompt", negative_prompt, None if isinstance(negative_prompt, str) else B)
    if negative_prompt_embeds is not None:
        if prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise InputValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                                  f"{tuple(negative_prompt_embeds.shape)} must have the same shape",
                                  field="negative_prompt_embeds")
        if negative_prompt_embeds.shape[0] != B:
            raise InputValueError(f"negative_prompt_embeds has {negative_prompt_embeds.shape[0]} rows but prompt has "
                                  f"{B}", field="negative_prompt_embeds")
    guided = is_real(guidance_scale) and guidance_scale > 1
    given = prompt_embeds if prompt_embeds is not None else negative_prompt_embeds
    if guided and given is not None and (prompt is not None or negative_prompt_embeds is None):
        # one side strings, the other a context: the strings are padded to its length with 77-position chunks
        strings = prompt if prompt is not None else negative_prompt or ""   # no negative prompt: ""
        texts = [strings] if isinstance(strings, str) else list(strings)
        n = pipe.tokenizer.model_max_length
        need = n * max(prompts_mod.chunk_count(pipe.tokenizer, t) for t in texts)
        L = given.shape[1]
        if L % n or L < need:
            which = "prompt" if prompt is not None else "negative_prompt"
            raise InputValueError(f"{'negative_' * (prompt is not None)}prompt_embeds have {L} positions, but the "
                                  f"{which} strings beside them are encoded in {n}-position chunks ({need} positions "
                                  f"for the longest) and padded to that length: give embeddings of a multiple of {n} "
                                  f"positions, >= {need}, or both sides as embeddings")
    return B


def _check_unet_inputs(pipe, image, mask_image) -> None:
    """SD's U-Net takes the latents alone (latent_channels); an inpainting U-Net also the mask and the masked image's
    latents (2·latent_channels + 1) and so needs image= and mask_image=."""
    c, latent = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
    if mask_image is not None and image is None:
        raise InputValueError("mask_image needs image= (the picture to inpaint)", field="mask_image")
    if c == 2 * latent + 1:
        if mask_image is None:
            raise InputValueError(f"this U-Net has {c} input channels (an inpainting model): pass image= and "
                                  f"mask_image=", field="mask_image")
    elif c != latent:
        raise InputValueError(f"the U-Net has {c} input channels; minidiff samples with {latent} (SD) or "
                              f"{2 * latent + 1} (an inpainting U-Net)")


def _pictures(name: str, v, what: str):
    """A PIL image, a non-empty list of PIL images of one size, or a tensor -> the list of PIL images or the tensor."""
    if isinstance(v, Image.Image) or isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (list, tuple)):
        if not v or not all(isinstance(i, Image.Image) for i in v):
            raise InputTypeError(f"{name} must be a PIL image, a list of PIL images or a tensor; got a list of "
                                 f"{sorted({type(i).__name__ for i in v}) or 'nothing'}", field=name)
        sizes = {i.size for i in v}
        if len(sizes) > 1:
            raise InputValueError(f"{name}: the PIL images have different sizes {sorted(sizes)}; give them one size",
                                  field=name)
        return list(v)
    raise InputTypeError(f"{name} must be a PIL image or a tensor {what} in [0, 1], got {type(v).__name__}", field=name)


def _unit_range(x: torch.Tensor, message: str) -> None:
    """x's values must lie in [0, 1]; message: the ValueError's text, with {lo} and {hi}."""
    lo, hi = x.min().item(), x.max().item()
    if not (lo >= 0 and hi <= 1):  # NaN fails too
        raise InputValueError(message.format(lo=f"{lo:.3g}", hi=f"{hi:.3g}"))


def _check_image(image, B: int) -> int:
    """The start picture(s): PIL image(s) or a tensor [N, 3, H, W] / [3, H, W] in [0, 1], one for all prompts or one
    per prompt -> N, how many pictures."""
    image = _pictures("image", image, "[N, 3, H, W]")
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3 or 0 in x.shape:
            raise InputValueError(f"image tensor must have shape [N, 3, H, W] or [3, H, W], got {tuple(image.shape)}",
                                  field="image")
        if not x.is_floating_point():
            raise InputTypeError(f"image tensor must be floating point with values in [0, 1], got dtype {x.dtype}",
                                 field="image")
        _unit_range(x, "image tensor values must lie in [0, 1], got [{lo}, {hi}] "
                       "(convert a [-1, 1] image with (x + 1) / 2)")
        n = x.shape[0]
    else:
        n = 1 if isinstance(image, Image.Image) else len(image)
    if n not in (1, B):
        raise InputValueError(f"image has {n} pictures but prompt has {B}: give 1 (for all) or {B}", field="image")
    return n


def _check_mask(mask, image, pictures: int) -> None:
    """The inpainting mask: PIL image(s) or a tensor [H, W] / [N, H, W] / [N, 1, H, W] in [0, 1] (1 = repaint), the
    image's size, one for all pictures or one per picture."""
    mask = _pictures("mask_image", mask, "[H, W] / [N, 1, H, W]")
    if isinstance(mask, torch.Tensor):
        m = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
        if m.ndim != 4 or m.shape[1] != 1 or 0 in m.shape:
            raise InputValueError(f"mask_image tensor must have shape [H, W], [N, H, W] or [N, 1, H, W], "
                                  f"got {tuple(mask.shape)}", field="mask_image")
        _unit_range(m.float(), "mask_image values must lie in [0, 1] (1 = repaint), got [{lo}, {hi}]")  # bool too
        n = m.shape[0]
    else:
        n = 1 if isinstance(mask, Image.Image) else len(mask)
    (ih, iw), (mh, mw) = images.size_of(image), images.size_of(mask)
    if (ih, iw) != (mh, mw):
        raise InputValueError(f"mask_image is {mw}x{mh} pixels but image is {iw}x{ih}: they must have the same size",
                              field="mask_image")
    if n not in (1, pictures):
        raise InputValueError(f"mask_image has {n} masks but image has {pictures} pictures", field="mask_image")


def _check_size(pipe, height, width, image) -> None:
    """height/width: None (the start image's size, else the model's own) or positive multiples of the VAE's factor
    f; the start image must keep at least one latent pixel when its size is rounded down to a multiple of f."""
    f = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size
    for name, v in (("height", height), ("width", width)):
        if v is None:
            if image is None and not is_int(size):
                raise InputValueError(f"{name}=None means the model's own size, but its U-Net config has sample_size="
                                      f"{size!r}; pass height= and width= (positive multiples of {f})", field=name)
            continue
        if not is_int(v):
            raise InputTypeError(f"{name} must be a positive multiple of {f} (pixels), got {show(v)}", field=name)
        if v <= 0 or v % f:
            raise InputValueError(f"{name} must be a positive multiple of {f} (pixels), got {v}", field=name)
    if image is not None and (height is None or width is None):
        h, w = images.size_of(image)
        if (height is None and h < f) or (width is None and w < f):
            raise InputValueError(f"image is {w}x{h} pixels; it must be at least {f}x{f} (one latent pixel)",
                                  field="image")


def _check_latents(pipe, latents, n: int, height: int, width: int) -> None:
    """latents: the starting noise, a finite float tensor [n, latent_channels, height/f, width/f] for every U-Net
    (an inpainting U-Net's extra inputs are built from image= and mask_image=), as diffusers takes it."""
    f = pipe.vae_scale_factor
    shape = (n, pipe.vae.config.latent_channels, height // f, width // f)
    if not isinstance(latents, torch.Tensor):
        raise InputTypeError(f"latents must be a torch.Tensor of shape {shape}, got {show(latents)}", field="latents")
    if not latents.is_floating_point():
        raise InputTypeError(f"latents must be a floating-point tensor, got dtype {latents.dtype}", field="latents")
    if tuple(latents.shape) != shape:
        raise InputValueError(f"latents must have shape {shape} (prompts x num_images, latent channels, height/{f}, "
                              f"width/{f}), got {tuple(latents.shape)}", field="latents")
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise InputValueError(f"latents must be finite, got {bad} NaN/inf values of {latents.numel()}", field="latents")


# ------------------------------------------------------------------------------------------------ during sampling
class NaNWatch:
    """Notes the first sampling step whose latents hold NaN or inf, and raises NonFiniteError naming it.

    On the CPU it checks at once (and stops the wasted steps); on an accelerator it keeps one flag per step on the
    device and looks once, at the end, so sampling never waits for a device-to-host copy mid-loop."""

    HINT = ("the likely causes are NaN/inf weights in the model, a guidance_scale too large "
            "(this run: {g}), or float16 overflow (try dtype=torch.float32 or torch.bfloat16)")

    def __init__(self, steps: int, guidance_scale: float):
        self.steps, self.guidance_scale = steps, guidance_scale
        self.flags: list[tuple[int, object, torch.Tensor]] = []  # (step index, t, finite? [] bool on device)

    def update(self, i: int, t, latents: torch.Tensor) -> None:
        finite = torch.isfinite(latents).all()
        if latents.device.type == "cpu":
            if not finite:
                self._raise(i, t)
        else:
            self.flags.append((i, t, finite))

    def check(self) -> None:
        """Call after the loop (a no-op on the CPU, where update() already raised)."""
        if self.flags and not bool(torch.stack([f for _, _, f in self.flags]).all()):
            i, t, _ = next(x for x in self.flags if not bool(x[2]))
            self._raise(i, t)

    def _raise(self, i, t):
        t = t.item() if isinstance(t, torch.Tensor) else t
        raise NonFiniteError(f"sampling produced NaN/inf latents at step {i + 1} of {self.steps} (timestep {t}); "
                             "the image would be blank. " + self.HINT.format(g=self.guidance_scale))


def check_finite_images(images: torch.Tensor) -> None:
    """The VAE's output: NaN here (with finite latents) means NaN/inf weights in the VAE decoder."""
    if not torch.isfinite(images).all():
        raise NonFiniteError("the VAE decoder produced NaN/inf pixels from finite latents; its weights are likely "
                             "NaN/inf (or float16 overflowed: the VAE should run in float32)")


# ------------------------------------------------------------------------------------------------ config files
def _pos_int(v):
    return is_int(v) and v >= 1


def _nonneg_int(v):
    return is_int(v) and v >= 0


def _pos_real(v):
    return is_real(v) and math.isfinite(v) and v > 0


def _ints(v):
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_pos_int(c) for c in v)


def _int_or_ints(v):
    return _pos_int(v) or _ints(v)


def _strs(v):
    return isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)


def _opt(pred):
    return lambda v: v is None or pred(v)


POS_INT = (_pos_int, "an int >= 1")
NONNEG_INT = (_nonneg_int, "an int >= 0")
POS_REAL = (_pos_real, "a finite number > 0")
BOOL = (lambda v: isinstance(v, bool), "true or false")
STR = (lambda v: isinstance(v, str), "a string")
INTS = (_ints, "a non-empty list of ints >= 1")
INT_OR_INTS = (_int_or_ints, "an int >= 1 or a list of them")
STRS = (_strs, "a list of strings")

# key of the config file -> (test, what is allowed). Only the keys present are checked; unknown keys are the
# config classes' business (they refuse what they do not build).
CONFIG_SPECS = {
    "unet": {
        "in_channels": POS_INT, "out_channels": POS_INT, "block_out_channels": INTS,
        "layers_per_block": INT_OR_INTS, "attention_head_dim": INT_OR_INTS, "cross_attention_dim": INT_OR_INTS,
        "transformer_layers_per_block": INT_OR_INTS, "norm_num_groups": POS_INT, "norm_eps": POS_REAL,
        "flip_sin_to_cos": BOOL, "freq_shift": NONNEG_INT, "down_block_types": STRS, "up_block_types": STRS,
        "sample_size": (_opt(_pos_int), "an int >= 1 or null"), "act_fn": STR,
    },
    "vae": {
        "in_channels": POS_INT, "out_channels": POS_INT, "latent_channels": POS_INT, "block_out_channels": INTS,
        "layers_per_block": POS_INT, "norm_num_groups": POS_INT, "scaling_factor": POS_REAL,
        "sample_size": (lambda v: _pos_int(v) or (_ints(v) and len(v) == 2), "an int >= 1 or [height, width]"),
        "use_quant_conv": BOOL, "use_post_quant_conv": BOOL, "force_upcast": BOOL, "act_fn": STR,
        "down_block_types": STRS, "up_block_types": STRS,
    },
    "text_encoder": {
        "vocab_size": POS_INT, "hidden_size": POS_INT, "intermediate_size": POS_INT, "num_hidden_layers": POS_INT,
        "num_attention_heads": POS_INT, "max_position_embeddings": POS_INT, "projection_dim": POS_INT,
        "layer_norm_eps": POS_REAL, "hidden_act": STR, "pad_token_id": (_opt(_nonneg_int), "an int >= 0 or null"),
        "bos_token_id": (_opt(_nonneg_int), "an int >= 0 or null"),
        "eos_token_id": (_opt(_nonneg_int), "an int >= 0 or null"),
    },
    "scheduler": {
        "num_train_timesteps": POS_INT, "beta_start": POS_REAL, "beta_end": POS_REAL, "beta_schedule": STR,
        "trained_betas": (_opt(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and
                                         all(is_real(b) and 0 < b < 1 for b in v)),
                          "null or a non-empty list of numbers in (0, 1)"),
        "steps_offset": NONNEG_INT, "clip_sample": BOOL, "clip_sample_range": POS_REAL, "set_alpha_to_one": BOOL,
        "skip_prk_steps": BOOL, "prediction_type": STR, "timestep_spacing": STR, "rescale_betas_zero_snr": BOOL,
        "thresholding": BOOL, "variance_type": (_opt(lambda v: isinstance(v, str)), "a string or null"),
        "use_karras_sigmas": BOOL, "sigma_min": (_opt(_pos_real), "a finite number > 0 or null"),
        "sigma_max": (_opt(_pos_real), "a finite number > 0 or null"), "solver_order": POS_INT,
        "lower_order_final": BOOL, "euler_at_final": BOOL, "final_sigmas_type": STR, "solver_type": STR,
        "lambda_min_clipped": (lambda v: is_real(v) and not math.isnan(v), "a number (-inf allowed)"),
    },
}


def check_config(kind: str, d, where) -> None:
    """Check a config dict ("unet" | "vae" | "text_encoder" | "scheduler") by type and range, key by key, and the
    rules between keys that no config class holds (the text encoder's heads, the β range). Raises ValueError naming
    `where` (the file), the key, its value and what is allowed. Runs before the config classes see the dict, so nothing
    fails later with a raw TypeError; the rules of the U-Net's and VAE's architecture (widths that split into heads
    and GroupNorm groups) live with their configs (UNetConfig / VAEConfig.__post_init__), which run for a config
    built in Python too, and the loader names the file in front of their messages."""
    if not isinstance(d, dict):
        raise InputValueError(f"{where}: expected a JSON object, got {show(d)}")
    if kind == "text_encoder" and d.get("model_type") == "clip" and isinstance(d.get("text_config"), dict):
        d = d["text_config"]  # a whole CLIPModel config: the text tower's part
    for key, (ok, allowed) in CONFIG_SPECS[kind].items():
        if key in d and not ok(d[key]):
            raise InputValueError(f"{where}: {key!r} is {show(d[key])}; expected {allowed}")
    if kind == "text_encoder":
        width, heads = d.get("hidden_size", 512), d.get("num_attention_heads", 8)  # transformers' CLIP defaults
        if width % heads:
            raise InputValueError(f"{where}: hidden_size {width} does not split into num_attention_heads={heads} heads")
    if kind == "scheduler" and d.get("trained_betas") is None and "beta_start" in d and "beta_end" in d:
        if d["beta_start"] >= d["beta_end"] or d["beta_end"] >= 1:
            raise InputValueError(f"{where}: beta_start={d['beta_start']} and beta_end={d['beta_end']} must satisfy "
                                  f"0 < beta_start < beta_end < 1")
