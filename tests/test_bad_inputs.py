"""Bad input gets a clear error — the type (TypeError / ValueError / CheckpointError) and a message naming the argument
or file key, the value and what is allowed — never a raw traceback from deep inside, never a silently wrong image.

Three matrices, each parametrized, on the embedded tiny model (weights/minidiff-shapes, loads in a second):
  GENERATE_CASES  every argument of StableDiffusion.generate          (pipe.generate(**kwargs) -> error)
  CONFIG_CASES    every field of unet / vae / text_encoder / scheduler config files, at load
  COMPVIS_CASES   CompVis files whose shapes or dtypes do not fit SD v1
plus sampling that goes non-finite (NaN weights, huge guidance) and the CLI's missing-torch message.
docs/promises.md quotes the counts; test_matrix_counts keeps them honest.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

import minidiff
from minidiff import CheckpointError, cli
from minidiff.errors import InputTypeError, InputValueError
from minidiff.checkpoint import DEFAULT_MODEL
from minidiff.validation import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
SCHEDULER_LIST = re.escape(
    "ddim, ddpm, dpm2, dpm2_a, dpm2_a_karras, dpm2_karras, dpmpp, dpmpp_karras, dpmpp_sde, dpmpp_sde_karras, euler, "
    "euler_a, euler_karras, heun, heun_karras, lcm, lms, lms_karras, pndm, unipc, unipc_karras, or an AUTOMATIC1111 "
    "name: Euler a, Euler, LMS, Heun, DPM2, DPM2 a, DPM++ 2M, DPM++ 2M SDE, DDIM, PLMS, UniPC, LCM (+ ' Karras' for "
    "Euler, LMS, Heun, DPM2, DPM2 a, DPM++ 2M, DPM++ 2M SDE, UniPC)")


@pytest.fixture(scope="module")
def pipe():
    p = minidiff.load()  # 32x32 images (latents 8x8, f = 4), DDIM by default
    p.generate("warm-up", steps=1, seed=0, progress=False)  # builds the kernels' caches once, outside the cases
    return p


def run(pipe, **kwargs):
    kwargs = {"prompt": "a red circle", "steps": 2, "seed": 0, "progress": False, **kwargs}
    return pipe.generate(**kwargs)


# ---------------------------------------------------------------------------------------------- generate()
IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))   # a start image in [0, 1]
PIL_32, PIL_16 = Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))
CONTEXT = torch.zeros(1, 77, 64)                                                # prompt_embeds [B, L, d]

# (kwargs, exception, regex the message must match)
GENERATE_CASES = [
    # prompt / negative_prompt
    (dict(prompt=5), TypeError, r"prompt must be a str or a list of str, got 5"),
    (dict(prompt=None), ValueError, r"pass either prompt or prompt_embeds \(exactly one of them\)"),
    (dict(prompt=b"a cat"), TypeError, r"prompt must be a str or a list of str, got b'a cat' \(bytes\)"),
    (dict(prompt=[]), ValueError, r"prompt must be a str or a non-empty list of str, got an empty list"),
    (dict(prompt=["a cat", 3]), TypeError, r"prompt\[1\] must be a str, got 3"),
    (dict(prompt="caf\udce9"), ValueError, r"prompt contains '\\udce9' at position 3, which is not valid Unicode"),
    (dict(prompt=["ok", "\ud800"]), ValueError, r"prompt\[1\] contains '\\ud800' at position 0"),
    (dict(negative_prompt=7), TypeError, r"negative_prompt must be a str or a list of str, got 7"),
    (dict(negative_prompt=["a", "b"]), ValueError, r"negative_prompt has 2 entries but prompt has 1"),
    (dict(negative_prompt="\udcff"), ValueError, r"negative_prompt contains '\\udcff'"),
    # steps
    (dict(steps=0), ValueError, r"steps must be an int in \[1, 999\], got 0"),
    (dict(steps=-1), ValueError, r"steps must be an int in \[1, 999\], got -1"),
    (dict(steps=1000), ValueError, r"steps must be an int in \[1, 999\], got 1000"),
    (dict(steps=2.5), TypeError, r"steps must be an int in \[1, 999\], got 2.5"),
    (dict(steps=2.0), TypeError, r"steps must be an int in \[1, 999\], got 2.0"),
    (dict(steps=True), TypeError, r"steps must be an int in \[1, 999\], got True \(bool\)"),
    (dict(steps="10"), TypeError, r"steps must be an int in \[1, 999\], got '10'"),
    (dict(steps=None), TypeError, r"steps must be an int in \[1, 999\], got None"),
    # guidance_scale
    (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be a finite number >= 0, got nan"),
    (dict(guidance_scale=float("inf")), ValueError, r"guidance_scale must be a finite number >= 0, got inf"),
    (dict(guidance_scale=-1.0), ValueError, r"guidance_scale must be a finite number >= 0, got -1.0"),
    (dict(guidance_scale="7.5"), TypeError, r"guidance_scale must be a finite number >= 0, got '7.5'"),
    (dict(guidance_scale=None), TypeError, r"guidance_scale must be a finite number >= 0, got None"),
    (dict(guidance_scale=torch.tensor([1.0, 2.0])), TypeError, r"guidance_scale must be a finite number"),
    # scheduler
    (dict(scheduler="dpm fast"), ValueError, rf"scheduler must be one of {SCHEDULER_LIST} \(any case\), got 'dpm "
                                             r"fast'"),
    (dict(scheduler="Euler a Karras"), ValueError, rf"scheduler must be one of {SCHEDULER_LIST} \(any case\), got "
                                                   r"'Euler a Karras'"),   # diffusers' Euler a has no Karras σ's
    (dict(scheduler=""), ValueError, rf"scheduler must be one of {SCHEDULER_LIST} \(any case\), got ''"),
    (dict(scheduler=3), TypeError, rf"scheduler must be None or one of {SCHEDULER_LIST}, got 3"),
    # seed / generator
    (dict(seed=2 ** 64), ValueError, r"seed must be an int in \[0, 18446744073709551615\], got 18446744073709551616"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 18446744073709551615\], got -1"),
    (dict(seed=1.5), TypeError, r"seed must be an int in \[0, 18446744073709551615\], got 1.5"),
    (dict(seed="0"), TypeError, r"seed must be an int .* got '0'"),
    (dict(seed=0, generator=torch.Generator()), ValueError, r"pass seed= or generator=, not both"),
    (dict(seed=None, generator=5), TypeError, r"generator must be a torch.Generator, got 5"),
    # height / width (f = 4 for the embedded model)
    (dict(height=0), ValueError, r"height must be a positive multiple of 4 \(pixels\), got 0"),
    (dict(height=-32), ValueError, r"height must be a positive multiple of 4 \(pixels\), got -32"),
    (dict(height=30), ValueError, r"height must be a positive multiple of 4 \(pixels\), got 30"),
    (dict(height=32.0), TypeError, r"height must be a positive multiple of 4 \(pixels\), got 32.0"),
    (dict(width=0), ValueError, r"width must be a positive multiple of 4 \(pixels\), got 0"),
    (dict(width="32"), TypeError, r"width must be a positive multiple of 4 \(pixels\), got '32'"),
    # num_images / output
    (dict(num_images=0), ValueError, r"num_images must be an int >= 1, got 0"),
    (dict(num_images=-1), ValueError, r"num_images must be an int >= 1, got -1"),
    (dict(num_images=1.0), TypeError, r"num_images must be an int >= 1, got 1.0"),
    (dict(output="png"), ValueError, r"output must be 'pil' or 'tensor', got 'png'"),
    (dict(output=None), ValueError, r"output must be 'pil' or 'tensor', got None"),
    # eta (DDIM's), progress, callback
    (dict(eta=-0.1), ValueError, r"eta must be a finite number in \[0, 1\], got -0.1"),
    (dict(eta=1.5), ValueError, r"eta must be a finite number in \[0, 1\], got 1.5"),
    (dict(eta=float("nan")), ValueError, r"eta must be a finite number in \[0, 1\], got nan"),
    (dict(eta="0"), TypeError, r"eta must be a finite number in \[0, 1\], got '0'"),
    (dict(progress="yes"), TypeError, r"progress must be True or False, got 'yes'"),
    (dict(callback=5), TypeError, r"callback must be callable .* got 5"),
    # latents [N, 4, 8, 8]
    (dict(latents=torch.randn(1, 4, 16, 16)), ValueError,
     r"latents must have shape \(1, 4, 8, 8\) .* got \(1, 4, 16, 16\)"),
    (dict(latents=torch.randn(1, 4, 8, 8), num_images=2), ValueError, r"latents must have shape \(2, 4, 8, 8\)"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), ValueError,
     r"latents must be finite, got 256 NaN/inf values of 256"),
    (dict(latents=torch.randn(1, 4, 8, 8).index_fill_(3, torch.tensor([0]), float("inf"))), ValueError,
     r"latents must be finite, got 32 NaN/inf values"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), TypeError,
     r"latents must be a floating-point tensor, got dtype torch.int64"),
    (dict(latents=[[0.0]]), TypeError, r"latents must be a torch.Tensor of shape \(1, 4, 8, 8\), got \[\[0.0\]\]"),
    (dict(image=IMAGE, latents=torch.randn(1, 4, 4, 4)), ValueError, r"latents must have shape \(1, 4, 8, 8\)"),
    # prompt_embeds / negative_prompt_embeds ([B, L, 64] for this model)
    (dict(prompt_embeds=CONTEXT), ValueError, r"pass either prompt or prompt_embeds \(exactly one of them\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77)), ValueError,
     r"prompt_embeds must be a tensor \[B, L, 64\], got \(1, 77\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32)), ValueError,
     r"prompt_embeds must be a tensor \[B, L, 64\], got \(1, 77, 32\)"),
    (dict(prompt=None, prompt_embeds=[[0.0]]), TypeError,
     r"prompt_embeds must be a tensor \[B, L, 64\], got \[\[0.0\]\]"),
    (dict(prompt=None, prompt_embeds=CONTEXT.long()), TypeError,
     r"prompt_embeds must be a floating-point tensor, got dtype torch.int64"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 77, 64), float("nan"))), ValueError,
     r"prompt_embeds must be finite, got 4928 NaN/inf values"),
    (dict(negative_prompt="x", negative_prompt_embeds=CONTEXT), ValueError,
     r"pass either negative_prompt or negative_prompt_embeds, not both"),
    (dict(prompt=None, prompt_embeds=CONTEXT, negative_prompt_embeds=torch.zeros(1, 154, 64)), ValueError,
     r"prompt_embeds \(1, 77, 64\) and negative_prompt_embeds \(1, 154, 64\) must have the same shape"),
    (dict(prompt=["a", "b"], negative_prompt_embeds=CONTEXT), ValueError,
     r"negative_prompt_embeds has 1 rows but prompt has 2"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 100, 64)), ValueError,
     r"prompt_embeds have 100 positions, but the negative_prompt strings beside them are encoded in 77-position "
     r"chunks \(77 positions for the longest\)"),
    (dict(prompt="a " * 100, negative_prompt_embeds=CONTEXT), ValueError,
     r"negative_prompt_embeds have 77 positions, but the prompt strings .* \(154 positions for the longest\)"),
    # image (image to image, inpainting)
    (dict(image=IMAGE.numpy()), TypeError,
     r"image must be a PIL image or a tensor \[N, 3, H, W\] in \[0, 1\], got ndarray"),
    (dict(image=[PIL_32, 3]), TypeError,
     r"image must be a PIL image, a list of PIL images or a tensor; got a list of \['Image', 'int'\]"),
    (dict(image=[]), TypeError, r"image must be a PIL image, a list of PIL images or a tensor; got a list of nothing"),
    (dict(image=[PIL_32, PIL_16]), ValueError,
     r"image: the PIL images have different sizes \[\(16, 16\), \(32, 32\)\]"),
    (dict(image=IMAGE * 2 - 1), ValueError,
     r"image tensor values must lie in \[0, 1\], got \[-1.*\(convert a \[-1, 1\] image with \(x \+ 1\) / 2\)"),
    (dict(image=torch.full((1, 3, 32, 32), float("nan"))), ValueError,
     r"image tensor values must lie in \[0, 1\], got \[nan, nan\]"),
    (dict(image=torch.rand(1, 4, 32, 32)), ValueError,
     r"image tensor must have shape \[N, 3, H, W\] or \[3, H, W\], got \(1, 4, 32, 32\)"),
    (dict(image=torch.ones(1, 3, 32, 32, dtype=torch.uint8)), TypeError,
     r"image tensor must be floating point with values in \[0, 1\], got dtype torch.uint8"),
    (dict(image=torch.rand(1, 3, 3, 3)), ValueError,
     r"image is 3x3 pixels; it must be at least 4x4 \(one latent pixel\)"),
    (dict(prompt=["a", "b"], image=torch.rand(3, 3, 32, 32)), ValueError,
     r"image has 3 pictures but prompt has 2: give 1 \(for all\) or 2"),
    # strength
    (dict(image=IMAGE, strength=1.5), ValueError, r"strength must be a finite number in \[0, 1\], got 1.5"),
    (dict(image=IMAGE, strength="0.5"), TypeError, r"strength must be a finite number in \[0, 1\], got '0.5'"),
    (dict(strength=-0.5), ValueError, r"strength must be a finite number in \[0, 1\], got -0.5"),
    (dict(image=IMAGE, strength=0.2), ValueError,
     r"strength=0.2 with steps=2 leaves no step to run \(int\(steps \* strength\) = 0\); raise strength or steps"),
    # mask_image (inpainting)
    (dict(mask_image=torch.ones(32, 32)), ValueError, r"mask_image needs image= \(the picture to inpaint\)"),
    (dict(image=IMAGE, mask_image=torch.ones(1, 1, 32, 16)), ValueError,
     r"mask_image is 16x32 pixels but image is 32x32: they must have the same size"),
    (dict(image=IMAGE, mask_image=torch.full((32, 32), 255.0)), ValueError,
     r"mask_image values must lie in \[0, 1\] \(1 = repaint\), got \[255, 255\]"),
    (dict(image=IMAGE, mask_image=torch.ones(1, 2, 32, 32)), ValueError,
     r"mask_image tensor must have shape \[H, W\], \[N, H, W\] or \[N, 1, H, W\], got \(1, 2, 32, 32\)"),
    (dict(image=IMAGE, mask_image="mask.png"), TypeError,
     r"mask_image must be a PIL image or a tensor \[H, W\] / \[N, 1, H, W\] in \[0, 1\], got str"),
    (dict(image=IMAGE, mask_image=torch.ones(2, 32, 32)), ValueError,
     r"mask_image has 2 masks but image has 1 pictures"),
]


@pytest.mark.parametrize("kwargs,exc,match", GENERATE_CASES, ids=[f"{k}" for k, _, _ in GENERATE_CASES])
def test_generate_refuses(pipe, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        run(pipe, **kwargs)
    # the door's own error (minidiff.errors: what the commands print as one line), not a TypeError / ValueError
    # raised from deep inside
    assert type(info.value) is {TypeError: InputTypeError, ValueError: InputValueError}[exc]


def test_generate_needs_a_size_when_the_config_has_none(pipe, monkeypatch):
    monkeypatch.setattr(pipe.unet.config, "sample_size", None)
    with pytest.raises(ValueError, match=r"height=None means the model's own size, but its U-Net config has "
                                         r"sample_size=None; pass height= and width="):
        run(pipe)
    assert run(pipe, height=32, width=32)[0].size == (32, 32)  # with a size it works


def test_edges_that_are_allowed(pipe):
    """The twins of the refusals: the boundary values work, and scheduler names are case-insensitive."""
    ref = run(pipe, output="tensor")
    torch.testing.assert_close(run(pipe, scheduler="DDIM", output="tensor"), ref, rtol=0, atol=0)
    torch.testing.assert_close(run(pipe, scheduler="Ddim", output="tensor"), ref, rtol=0, atol=0)
    torch.testing.assert_close(run(pipe, scheduler="DDIM ", output="tensor"), ref, rtol=0, atol=0)  # A1111's label
    assert run(pipe, steps=1, output="tensor").shape == (1, 3, 32, 32)
    assert run(pipe, seed=2 ** 64 - 1, output="tensor").shape == (1, 3, 32, 32)
    assert run(pipe, guidance_scale=0, output="tensor").shape == (1, 3, 32, 32)
    assert run(pipe, height=36, width=4, output="tensor").shape == (1, 3, 36, 4)
    assert run(pipe, prompt="", negative_prompt=["x"], eta=1.0, output="tensor").isfinite().all()
    assert len(run(pipe, prompt=("a", "b"), num_images=2)) == 4


# ---------------------------------------------------------------------------------------------- non-finite sampling
def test_nan_unet_weights_raise_naming_the_step(pipe):
    bad = minidiff.load()  # a fresh copy: the shared `pipe` must keep its weights
    with torch.no_grad():
        next(bad.unet.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"sampling produced NaN/inf latents at step 1 of 2 \(timestep \d+\);"
                                             r" the image would be blank.*NaN/inf weights"):
        run(bad)


def test_huge_guidance_raises_naming_the_step(pipe):
    with pytest.raises(NonFiniteError, match=r"NaN/inf latents at step \d of 3 .*guidance_scale too large "
                                             r"\(this run: 1e\+38\)"):
        run(pipe, steps=3, guidance_scale=1e38)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "ddpm", "euler", "dpmpp", "heun", "dpmpp_sde", "lcm"])
def test_nan_weights_raise_with_every_scheduler(pipe, scheduler):
    bad = minidiff.load()  # a fresh copy: the shared `pipe` must keep its weights
    with torch.no_grad():
        for p in bad.unet.parameters():
            p.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"at step 1 of"):
        run(bad, scheduler=scheduler)


def test_nan_vae_weights_raise(pipe):
    bad = minidiff.load()  # a fresh copy: the shared `pipe` must keep its weights
    with torch.no_grad():
        for p in bad.vae.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the VAE decoder produced NaN/inf pixels from finite latents"):
        run(bad)


def test_finite_run_is_untouched_by_the_watch(pipe):
    """The check only looks: a normal run's latents pass through it, and the callback sees every step."""
    seen = []
    images = run(pipe, steps=3, output="tensor", callback=lambda i, t, x: seen.append(i))
    assert seen == [0, 1, 2] and images.isfinite().all()


# ---------------------------------------------------------------------------------------------- config files
@pytest.fixture
def model_dir(tmp_path):
    """The embedded model's folder: config files copied (to be damaged), weights and tokenizer linked."""
    d = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (d / part).mkdir(parents=True)
        for f in (DEFAULT_MODEL / part).iterdir():
            if f.suffix == ".json":
                shutil.copy(f, d / part / f.name)
            else:
                os.symlink(f, d / part / f.name)
    os.symlink(DEFAULT_MODEL / "tokenizer", d / "tokenizer")
    shutil.copy(DEFAULT_MODEL / "model_index.json", d / "model_index.json")
    return d


def config_file(part):
    return f"{part}/scheduler_config.json" if part == "scheduler" else f"{part}/config.json"


# (file, {key: value} to set, regex) -- every one must raise CheckpointError naming the file, key and value
CONFIG_CASES = [
    ("unet", {"in_channels": "4"}, r"'in_channels' is '4'; expected an int >= 1"),
    ("unet", {"out_channels": 0}, r"'out_channels' is 0; expected an int >= 1"),
    ("unet", {"norm_num_groups": "32"}, r"'norm_num_groups' is '32'; expected an int >= 1"),
    ("unet", {"norm_num_groups": 0}, r"'norm_num_groups' is 0; expected an int >= 1"),
    ("unet", {"norm_eps": "1e-5"}, r"'norm_eps' is '1e-5'; expected a finite number > 0"),
    ("unet", {"norm_eps": -1}, r"'norm_eps' is -1; expected a finite number > 0"),
    ("unet", {"block_out_channels": [32, "64", 96]}, r"'block_out_channels' is \[32, '64', 96\] \(list\); expected a "
                                                     r"non-empty list of ints >= 1"),
    ("unet", {"block_out_channels": []}, r"'block_out_channels' is \[\] \(list\); expected a non-empty list"),
    ("unet", {"block_out_channels": [32, 64, 100]}, r"block_out_channels \[32, 64, 100\] do not split into "
                                                    r"norm_num_groups=16 groups \(100 % 16 = 4\)"),
    ("unet", {"layers_per_block": 0}, r"'layers_per_block' is 0; expected an int >= 1 or a list of them"),
    ("unet", {"attention_head_dim": "4"}, r"'attention_head_dim' is '4'; expected an int >= 1"),
    ("unet", {"attention_head_dim": 5}, r"unsupported model configuration: 32 channels do not split into heads=5"),
    ("unet", {"cross_attention_dim": 64.0}, r"'cross_attention_dim' is 64.0; expected an int >= 1"),
    ("unet", {"flip_sin_to_cos": "true"}, r"'flip_sin_to_cos' is 'true'; expected true or false"),
    ("unet", {"freq_shift": -1}, r"'freq_shift' is -1; expected an int >= 0"),
    ("unet", {"sample_size": "8"}, r"'sample_size' is '8'; expected an int >= 1 or null"),
    ("unet", {"down_block_types": "DownBlock2D"}, r"'down_block_types' is 'DownBlock2D'; expected a list of strings"),
    ("vae", {"scaling_factor": "x"}, r"'scaling_factor' is 'x'; expected a finite number > 0"),
    ("vae", {"scaling_factor": float("nan")}, r"'scaling_factor' is nan; expected a finite number > 0"),
    ("vae", {"scaling_factor": 0}, r"'scaling_factor' is 0; expected a finite number > 0"),
    ("vae", {"sample_size": None}, r"'sample_size' is None; expected an int >= 1 or \[height, width\]"),
    ("vae", {"latent_channels": "4"}, r"'latent_channels' is '4'; expected an int >= 1"),
    ("vae", {"norm_num_groups": 32}, r"block_out_channels \[16, 32, 64\] do not split into norm_num_groups=32 groups"),
    ("vae", {"use_quant_conv": 1}, r"'use_quant_conv' is 1; expected true or false"),
    ("vae", {"layers_per_block": [1, 1, 1]}, r"'layers_per_block' is \[1, 1, 1\] \(list\); expected an int >= 1"),
    ("text_encoder", {"layer_norm_eps": "1e-5"}, r"'layer_norm_eps' is '1e-5'; expected a finite number > 0"),
    ("text_encoder", {"hidden_size": "64"}, r"'hidden_size' is '64'; expected an int >= 1"),
    ("text_encoder", {"num_attention_heads": 0}, r"'num_attention_heads' is 0; expected an int >= 1"),
    ("text_encoder", {"num_attention_heads": 3}, r"hidden_size 64 does not split into num_attention_heads=3 heads"),
    ("text_encoder", {"vocab_size": -5}, r"'vocab_size' is -5; expected an int >= 1"),
    ("text_encoder", {"max_position_embeddings": None}, r"'max_position_embeddings' is None; expected an int >= 1"),
    ("text_encoder", {"eos_token_id": "</s>"}, r"'eos_token_id' is '</s>'; expected an int >= 0 or null"),
    ("text_encoder", {"hidden_act": "relu"}, r"unsupported hidden_act 'relu'"),
    ("scheduler", {"num_train_timesteps": "1000"}, r"'num_train_timesteps' is '1000'; expected an int >= 1"),
    ("scheduler", {"num_train_timesteps": 0}, r"'num_train_timesteps' is 0; expected an int >= 1"),
    ("scheduler", {"beta_start": "x"}, r"'beta_start' is 'x'; expected a finite number > 0"),
    ("scheduler", {"beta_start": 0.1, "beta_end": 0.01}, r"beta_start=0.1 and beta_end=0.01 must satisfy "
                                                         r"0 < beta_start < beta_end < 1"),
    ("scheduler", {"beta_schedule": 5}, r"'beta_schedule' is 5; expected a string"),
    ("scheduler", {"beta_schedule": "cosine"}, r"beta_schedule 'cosine' is not implemented"),
    ("scheduler", {"steps_offset": -1}, r"'steps_offset' is -1; expected an int >= 0"),
    ("scheduler", {"trained_betas": [0.5, 2]}, r"'trained_betas' is \[0.5, 2\] \(list\); expected null or a "
                                               r"non-empty list of numbers in \(0, 1\)"),
    ("scheduler", {"prediction_type": "noise"}, r"prediction_type='noise' is not supported"),
    ("scheduler", {"clip_sample": "no"}, r"'clip_sample' is 'no'; expected true or false"),
]


@pytest.mark.parametrize("part,change,match", CONFIG_CASES,
                         ids=[f"{p}-{'-'.join(c)}" for p, c, _ in CONFIG_CASES])
def test_config_refused_at_load(model_dir, part, change, match):
    path = model_dir / config_file(part)
    d = json.loads(path.read_text())
    d.update(change)
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=match) as info:
        minidiff.load(model_dir)
    assert str(info.value).startswith(str(path))  # names the file first


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "scheduler"])
def test_config_not_an_object(model_dir, part):
    (model_dir / config_file(part)).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"expected a JSON object, got \[1, 2\] \(list\)"):
        minidiff.load(model_dir)


def test_undamaged_configs_load(model_dir, pipe):
    """The control: the same folder with its configs untouched loads and draws what the embedded model draws."""
    torch.testing.assert_close(run(minidiff.load(model_dir), output="tensor"), run(pipe, output="tensor"))


def test_unet_without_sample_size_loads_and_asks_for_a_size(model_dir):
    path = model_dir / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sample_size": None}))
    p = minidiff.load(model_dir)  # diffusers allows it too
    with pytest.raises(ValueError, match="pass height= and width="):
        run(p)


def test_bad_config_in_compvis_metadata(tmp_path, pipe):
    path = minidiff.save(pipe, tmp_path / "m.safetensors", format="compvis")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["minidiff"])
    meta["vae"]["scaling_factor"] = "x"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "minidiff": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"m.safetensors \(metadata 'minidiff', 'vae'\): 'scaling_factor' is "
                                              r"'x'; expected a finite number > 0"):
        minidiff.load(path)


# ---------------------------------------------------------------------------------------------- CompVis files
def _compvis_file(tmp_path, unet=None, vae=None, text=None, damage=None):
    """A tiny CompVis-layout file built by diffusers/transformers with the given config overrides."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_fixtures import TINY_TEXT, TINY_UNET, TINY_VAE, compvis_state_dict

    class Parts:  # what compvis_state_dict reads off a diffusers pipeline
        pass
    dp = Parts()
    dp.unet = UNet2DConditionModel(**{**TINY_UNET, **(unet or {})})
    dp.vae = AutoencoderKL(**{**TINY_VAE, **(vae or {})})
    dp.text_encoder = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **(text or {})}))
    sd = compvis_state_dict(dp)
    if damage:
        damage(sd)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


P, V, T = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
COMPVIS_CASES = [
    # U-Net widths 16/32: SD v1's 32 GroupNorm groups cannot split 16 channels (was torch's GroupNorm message)
    (dict(unet=dict(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8)),
     rf"'{P}input_blocks.1.0.out_layers.3.weight' has shape \(16, 16, 3, 3\): its width 16 is not a multiple of 32"),
    # VAE width 16
    (dict(vae=dict(block_out_channels=(16, 32), norm_num_groups=8)),
     rf"'{V}encoder.down.0.block.0.conv2.weight' has shape \(16, 16, 3, 3\): its width 16 is not a multiple of 32"),
    # text width 96: not a multiple of 64-wide heads (was: silently 1 head of 96)
    (dict(text=dict(hidden_size=96, num_attention_heads=2), unet=dict(cross_attention_dim=96)),
     rf"'{T}embeddings.token_embedding.weight' has shape \(49408, 96\): its width 96 is not a multiple of 64 "
     r"\(SD v1's CLIP text encoder has 64-wide heads\)"),
    # weights in an integer dtype
    (dict(damage=lambda sd: sd.update({P + "out.2.weight": sd[P + "out.2.weight"].to(torch.int64)})),
     rf"'{P}out.2.weight' has dtype torch.int64; a weight must be floating point"),
    (dict(damage=lambda sd: sd.update({T + "final_layer_norm.bias": sd[T + "final_layer_norm.bias"].bool()})),
     rf"'{T}final_layer_norm.bias' has dtype torch.bool; a weight must be floating point"),
    # a tensor with the wrong number of dimensions where a width is read
    (dict(damage=lambda sd: sd.update({T + "embeddings.token_embedding.weight": torch.zeros(64)})),
     rf"'{T}embeddings.token_embedding.weight' has shape \(64,\): its width None is not a multiple of 64"),
]


@pytest.mark.parametrize("build,match", COMPVIS_CASES, ids=["unet-16", "vae-16", "text-96", "int64", "bool", "1d"])
def test_compvis_shapes_that_do_not_fit_sd_v1(tmp_path, build, match):
    path = _compvis_file(tmp_path, **build)
    with pytest.raises(CheckpointError, match=match) as info:
        minidiff.load(path)
    assert str(info.value).startswith(str(path))


def test_int_weights_in_a_diffusers_folder(model_dir):
    file = DEFAULT_MODEL / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(file))
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"].to(torch.int32)
    target = model_dir / "vae" / file.name
    target.unlink()
    save_file(sd, str(target))
    with pytest.raises(CheckpointError, match=r"'decoder.conv_out.weight' has dtype torch.int32; a weight must be "
                                              r"floating point"):
        minidiff.load(model_dir)


# ---------------------------------------------------------------------------------------------- command line
def test_cli_prints_bad_input_as_one_line(capsys):
    assert cli.main(["generate", "a red circle", "--steps", "0", "--out", os.devnull]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minidiff generate: error: steps must be an int in [1, 999], got 0")
    assert "Traceback" not in err


def test_cli_scheduler_is_case_insensitive(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red circle", "--steps", "1", "--seed", "0", "--scheduler", "DDIM",
                     "--out", str(out)]) == 0
    assert out.is_file()


BLOCK_TORCH = """
import runpy, sys
class BlockTorch:  # as if torch were not installed: every import of torch fails
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, BlockTorch())
sys.argv = ["minidiff"] + sys.argv[1:]
runpy.run_module("minidiff", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("argv", [["generate", "a red circle"], ["finetune", "--help"], []],
                         ids=["generate", "finetune", "bare"])
def test_cli_without_torch_says_what_to_install(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *argv], capture_output=True, text=True, timeout=60,
                       env=env, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "minidiff: error: torch is not installed in this Python" in r.stderr
    assert "pip install torch" in r.stderr and "make demo" in r.stderr


def test_cli_help_without_torch_still_works():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "--help"], capture_output=True, text=True, timeout=60,
                       env=env, cwd=ROOT)
    assert r.returncode == 0 and "generate" in r.stdout and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------- the counts
def test_matrix_counts():
    """docs/promises.md states these counts; change both together."""
    assert (len(GENERATE_CASES), len(CONFIG_CASES), len(COMPVIS_CASES)) == (89, 43, 6)
