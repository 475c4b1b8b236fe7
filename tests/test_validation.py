"""minidiff.validation, the door: every argument of generate() is checked in one call of check_generate_args, before
any network runs, and the sampling code checks nothing again; an inpainting U-Net takes the noise with the VAE's
latent channels as explicit latents; config rules live in one place. (tests/test_bad_inputs.py holds the matrix of
refusals and their messages.)"""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import minidiff
import minidiff.pipeline
from minidiff.unet import UNet, UNetConfig
from minidiff.validation import check_config, check_generate_args
from minidiff.vae import VAEConfig

ROOT = Path(__file__).resolve().parent.parent
IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))   # the embedded model draws 32x32
MASK = torch.zeros(1, 1, 32, 32)
MASK[..., 8:24, 8:24] = 1


@pytest.fixture(scope="module")
def pipe():
    return minidiff.load()  # 4-channel U-Net, VAE factor f = 4, latents [N, 4, 8, 8]


def with_unet_inputs(pipe, in_channels):
    """The same pipeline with a U-Net of `in_channels` inputs (9: an inpainting U-Net), random weights."""
    torch.manual_seed(0)
    return dataclasses.replace(pipe, unet=UNet(dataclasses.replace(pipe.unet.config, in_channels=in_channels)).eval())


@pytest.mark.parametrize("kind", ["text", "image", "inpaint"])
def test_generate_enters_the_door_once(pipe, monkeypatch, kind):
    calls = []

    def door(*args, **kwargs):
        calls.append(kwargs)
        return check_generate_args(*args, **kwargs)
    monkeypatch.setattr(minidiff.pipeline, "check_generate_args", door)
    extra = {"text": {}, "image": dict(image=IMAGE, strength=0.5), "inpaint": dict(image=IMAGE, mask_image=MASK)}[kind]
    pipe.generate("a red circle", steps=2, seed=0, progress=False, **extra)
    assert len(calls) == 1
    assert {"image", "strength", "mask_image", "prompt_embeds", "negative_prompt_embeds", "latents"} <= set(calls[0])


@pytest.mark.parametrize("bad", [
    dict(latents=torch.randn(1, 4, 4, 4)),                                   # shape, checked against the image size
    dict(image=IMAGE, mask_image=torch.ones(1, 1, 16, 16)),                  # the mask's size
    dict(image=IMAGE, strength=0.1),                                         # leaves no step
    dict(prompt=["a", "b"], image=torch.rand(3, 3, 32, 32)),                 # picture count
    dict(prompt=None, prompt_embeds=torch.zeros(1, 100, 64)),                # cannot pad "" to 100 positions
], ids=["latents", "mask-size", "strength", "pictures", "embeds-length"])
def test_refused_before_any_network_runs(pipe, bad):
    """Everything that used to be refused mid-way (after the text encoder, or the VAE encoding the image) is refused
    at the door now: no network has run when the error comes."""
    ran = []
    parts = [pipe.text_encoder, pipe.unet, pipe.vae.encoder, pipe.vae.decoder]
    handles = [m.register_forward_pre_hook(lambda module, args: ran.append(type(module).__name__)) for m in parts]
    try:
        with pytest.raises(ValueError):
            pipe.generate(**{"prompt": "a red circle", "steps": 2, "seed": 0, "progress": False, **bad})
    finally:
        for h in handles:
            h.remove()
    assert ran == []


def test_sampling_code_raises_nothing_of_its_own():
    """pipeline.py and images.py take what passed the door as valid: not one `raise` in them (NaN/inf during
    sampling is validation.NaNWatch's)."""
    for name in ("pipeline.py", "images.py"):
        tree = ast.parse((ROOT / "minidiff" / name).read_text())
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Raise)], name


def test_inpainting_unet_takes_the_noise_as_latents(pipe):
    """latents are the noise [N, latent_channels, h, w] for every U-Net (diffusers' rule); the 9-channel U-Net's mask
    and masked-image channels come from image= and mask_image=."""
    pipe9 = with_unet_inputs(pipe, 9)
    kw = dict(prompt="a red circle", image=IMAGE, mask_image=MASK, steps=2)
    check_generate_args(pipe9, **kw, latents=torch.randn(1, 4, 8, 8))           # passes
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\) .* got \(1, 9, 8, 8\)"):
        check_generate_args(pipe9, **kw, latents=torch.randn(1, 9, 8, 8))
    with pytest.raises(ValueError, match="this U-Net has 9 input channels .*: pass image= and mask_image="):
        check_generate_args(pipe9, prompt="a red circle")
    with pytest.raises(ValueError, match="this U-Net has 9 input channels .*: pass image= and mask_image="):
        check_generate_args(pipe9, prompt="a red circle", image=IMAGE)
    with pytest.raises(ValueError, match=r"the U-Net has 5 input channels; minidiff samples with 4 \(SD\) or 9"):
        check_generate_args(with_unet_inputs(pipe, 5), prompt="a red circle")
    out = pipe9.generate(**kw, latents=torch.randn(1, 4, 8, 8), seed=0, output="tensor", progress=False)
    assert out.shape == (1, 3, 32, 32)


def test_strength_is_checked_without_an_image_too(pipe):
    """An argument generate() would ignore is still checked (a typo'd strength=7.5 is not silently dropped)."""
    check_generate_args(pipe, prompt="x", strength=0.0)
    with pytest.raises(ValueError, match=r"strength must be a finite number in \[0, 1\], got 7.5"):
        check_generate_args(pipe, prompt="x", strength=7.5)


def test_a_bool_mask_is_a_mask(pipe):
    """A bool (or 0/1 integer) tensor mask is taken as it always was: only its values are checked."""
    check_generate_args(pipe, prompt="x", image=IMAGE, mask_image=MASK.bool())
    check_generate_args(pipe, prompt="x", image=IMAGE, mask_image=MASK.long()[0, 0])


def test_embeddings_beside_strings_of_the_same_length_pass(pipe):
    """The padding rule's twin: prompt strings of up to 75 tokens fit negative_prompt_embeds of 77 or 154 positions,
    and a 2-chunk prompt fits 154 (the strings are padded with the empty prompt's chunks)."""
    for L in (77, 154):
        check_generate_args(pipe, prompt="a red circle", negative_prompt_embeds=torch.zeros(1, L, 64))
    check_generate_args(pipe, prompt="a " * 100, negative_prompt_embeds=torch.zeros(1, 154, 64))
    check_generate_args(pipe, prompt=None, prompt_embeds=torch.zeros(1, 100, 64), guidance_scale=1.0)  # no negative


def test_groups_rule_lives_with_the_config():
    """The GroupNorm rule (every level's width splits into norm_num_groups) is the config's own: a UNetConfig or
    VAEConfig built in Python refuses it; check_config (types and ranges of a file's keys) does not hold it twice, and
    the loader names the file in front of the config's message (tests/test_bad_inputs.py's CONFIG_CASES)."""
    with pytest.raises(ValueError, match=r"block_out_channels \[32, 48\] do not split into norm_num_groups=32 groups "
                                         r"\(48 % 32 = 16\)"):
        UNetConfig(block_out_channels=(32, 48), cross_attention=(True, True))
    with pytest.raises(ValueError, match=r"block_out_channels \[16, 32\] do not split into norm_num_groups=32 groups"):
        VAEConfig(block_out_channels=(16, 32))
    check_config("unet", {"block_out_channels": [32, 48], "norm_num_groups": 32}, "unet/config.json")
    check_config("vae", {"block_out_channels": [16, 32], "norm_num_groups": 32}, "vae/config.json")
