"""Image to image and inpainting: generate(image=..., strength=..., mask_image=...) equals diffusers'
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline given the same weights and the same seed (so every
random draw — VAE posterior sample, noise, masked-image posterior, the samplers' own — comes in the same order), for
every scheduler; prompt_embeds as diffusers takes them; a 9-channel inpainting U-Net in both checkpoint layouts.
Tolerance 2e-3 on images in [0, 1] (fp32)."""
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import minidiff
from minidiff.schedulers import SCHEDULER_NAMES, SCHEDULERS
from sd_fixtures import compvis_state_dict, diffusers_scheduler, make_diffusers_pipe, write_diffusers

diffusers.utils.logging.set_verbosity_error()
TOL = dict(rtol=0, atol=2e-3)
H, W = 16, 24  # the tiny VAE downsamples by 2: latents 8 x 12


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(minidiff pipe, folder) of the tiny 4-channel model."""
    folder = write_diffusers(make_diffusers_pipe(0), tmp_path_factory.mktemp("sd") / "sd")
    return minidiff.load(folder), folder


@pytest.fixture(scope="module")
def sd9(tmp_path_factory):
    """(minidiff pipe, folder, diffusers pipe) of a tiny inpainting model (9-channel U-Net)."""
    dpipe = make_diffusers_pipe(1, in_channels=9)
    folder = write_diffusers(dpipe, tmp_path_factory.mktemp("sd9") / "sd9")
    return minidiff.load(folder), folder, dpipe


def reference(cls_name, folder, scheduler):
    """diffusers' pipeline `cls_name` on the folder, with the named scheduler built from the folder's config."""
    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers_scheduler(scheduler, config)
    return pipe


def rand_image(seed, n=1, h=H, w=W):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def box_mask(h=H, w=W):
    """1 (repaint) on a box in the middle, 0 elsewhere; a soft edge to exercise the 0.5 threshold. [1, 1, h, w]"""
    m = torch.zeros(1, 1, h, w)
    m[..., h // 4:3 * h // 4, w // 4:3 * w // 4] = 1.0
    m[..., h // 4 - 1, :] = 0.6   # >= 0.5: repaint
    m[..., 3 * h // 4, :] = 0.4   # < 0.5: keep
    return m


# ----------------------------------------------------------------------------------------------- image to image
# every sampler; the Karras σ's of the newer ones are left to tests/test_schedulers.py (mid-schedule starts)
IMG2IMG_SCHEDULERS = [n for n in SCHEDULER_NAMES if n not in ("heun_karras", "dpm2_karras", "dpm2_a_karras",
                                                              "dpmpp_sde_karras", "unipc_karras")]


@pytest.mark.parametrize("scheduler", IMG2IMG_SCHEDULERS)
def test_img2img_matches_diffusers(sd, scheduler):
    pipe, folder = sd
    ref_pipe = reference("StableDiffusionImg2ImgPipeline", folder, scheduler)
    image = rand_image(1)
    ref = ref_pipe("a toucan", image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                   negative_prompt="blurry", generator=torch.Generator().manual_seed(3), output_type="pt").images
    ours = pipe.generate("a toucan", image=image, strength=0.6, steps=10, negative_prompt="blurry",
                         scheduler=scheduler, seed=3, output="tensor", progress=False)
    assert ours.shape == ref.shape == (1, 3, H, W)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("strength,steps", [(1.0, 6), (0.15, 10), (0.5, 7)], ids=["full", "one-step", "odd"])
def test_img2img_strength_rule_with_pndm_matches_diffusers(sd, strength, steps):
    """steps - int(steps·strength) entries cut from the top of PNDM's timesteps, its repeated one included."""
    pipe, folder = sd
    ref_pipe = reference("StableDiffusionImg2ImgPipeline", folder, "pndm")
    image = rand_image(2)
    ref = ref_pipe("a red circle", image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    seen = []
    ours = pipe.generate("a red circle", image=image, strength=strength, steps=steps, guidance_scale=5.0,
                         scheduler="pndm", generator=torch.Generator().manual_seed(0), output="tensor",
                         progress=False, callback=lambda i, t, z: seen.append(int(t)))
    torch.testing.assert_close(ours, ref, **TOL)
    sched = pipe.make_scheduler("pndm")
    sched.set_timesteps(steps)
    assert seen == sched.timesteps[steps - int(steps * strength):].tolist()


@pytest.mark.parametrize("strength,steps", [(1.0, 4), (0.15, 10), (0.5, 7)], ids=["full", "one-step", "odd"])
def test_img2img_second_order_cuts_whole_steps(sd, strength, steps, scheduler="heun"):
    """Two U-Net calls per step: t_start · 2 entries are cut (diffusers' get_timesteps: t_start · order), so the
    last int(steps·strength) steps run with 2 calls each but the final one."""
    pipe, folder = sd
    ref_pipe = reference("StableDiffusionImg2ImgPipeline", folder, scheduler)
    image = rand_image(3)
    ref = ref_pipe("a red circle", image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    seen = []
    ours = pipe.generate("a red circle", image=image, strength=strength, steps=steps, guidance_scale=5.0,
                         scheduler=scheduler, seed=0, output="tensor", progress=False,
                         callback=lambda i, t, z: seen.append(float(t)))
    torch.testing.assert_close(ours, ref, **TOL)
    sched = pipe.make_scheduler(scheduler)
    sched.set_timesteps(steps)
    assert seen == sched.timesteps[2 * (steps - int(steps * strength)):].tolist()
    assert len(seen) == 2 * int(steps * strength) - 1


def test_img2img_pil_input_batches_and_sizes(sd):
    """A PIL image of odd size is cut down to the VAE's multiple (Lanczos, as diffusers); one image serves every
    prompt and num_images; the output has the image's size, not the model's default."""
    pipe, folder = sd
    arr = (rand_image(4, h=21, w=30)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(arr)                                      # 30 x 21 -> 30 x 20
    ref_pipe = reference("StableDiffusionImg2ImgPipeline", folder, "euler_a")
    ref = ref_pipe(["a toucan", "a horse"], image=image, strength=0.7, num_inference_steps=8, num_images_per_prompt=2,
                   generator=torch.Generator().manual_seed(5), output_type="pt").images
    ours = pipe.generate(["a toucan", "a horse"], image=image, strength=0.7, steps=8, num_images=2,
                         scheduler="euler_a", seed=5, output="tensor", progress=False)
    assert ours.shape == ref.shape == (4, 3, 20, 30)
    torch.testing.assert_close(ours, ref, **TOL)
    pils = pipe.generate("a toucan", image=image, strength=0.5, steps=4, seed=0, progress=False)
    assert pils[0].size == (30, 20)


def test_img2img_one_image_per_prompt_matches_diffusers(sd):
    pipe, folder = sd
    images = rand_image(6, n=2)
    ref_pipe = reference("StableDiffusionImg2ImgPipeline", folder, "ddim")
    ref = ref_pipe(["a toucan", "a horse"], image=images, strength=0.8, num_inference_steps=5,
                   generator=torch.Generator().manual_seed(2), output_type="pt").images
    ours = pipe.generate(["a toucan", "a horse"], image=images, strength=0.8, steps=5, scheduler="ddim", seed=2,
                         output="tensor", progress=False)
    torch.testing.assert_close(ours, ref, **TOL)


# --------------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "ddpm", "euler", "euler_a", "lms", "dpmpp", "dpmpp_karras",
                                       "heun", "dpm2_a", "lcm"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_4_channel_matches_diffusers(sd, scheduler, strength):
    """SD v1.4's own U-Net: the known region is put back (noised to the next step's level) after every step."""
    pipe, folder = sd
    ref_pipe = reference("StableDiffusionInpaintPipeline", folder, scheduler)
    image, mask = rand_image(7), box_mask()
    ref = ref_pipe("a toucan", image=image, mask_image=mask, height=H, width=W, strength=strength,
                   num_inference_steps=8, generator=torch.Generator().manual_seed(1), output_type="pt").images
    ours = pipe.generate("a toucan", image=image, mask_image=mask, strength=strength, steps=8, scheduler=scheduler,
                         seed=1, output="tensor", progress=False)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("scheduler", ["pndm", "ddpm", "euler", "euler_a", "dpmpp"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_9_channel_matches_diffusers(sd9, scheduler, strength):
    """An inpainting U-Net: input [z_t | mask | masked-image latents]; no image draw at strength 1 (diffusers)."""
    pipe, folder, _ = sd9
    assert pipe.unet.config.in_channels == 9
    ref_pipe = reference("StableDiffusionInpaintPipeline", folder, scheduler)
    image, mask = rand_image(8, n=2), box_mask()
    prompts = ["a toucan", "a horse"]
    ref = ref_pipe(prompts, image=image, mask_image=mask, height=H, width=W, strength=strength, negative_prompt=["x", "y"],
                   num_inference_steps=7, generator=torch.Generator().manual_seed(4), output_type="pt").images
    ours = pipe.generate(prompts, image=image, mask_image=mask, strength=strength, steps=7, negative_prompt=["x", "y"],
                         scheduler=scheduler, seed=4, output="tensor", progress=False)
    torch.testing.assert_close(ours, ref, **TOL)


def test_inpaint_9_channel_explicit_latents_match_diffusers(sd9):
    """Explicit latents for an inpainting U-Net are the noise [N, 4, h, w] (the VAE's latent channels, not the U-Net's
    9), as StableDiffusionInpaintPipeline takes them: the same latents give its image."""
    pipe, folder, _ = sd9
    ref_pipe = reference("StableDiffusionInpaintPipeline", folder, "euler")
    image, mask = rand_image(10), box_mask()
    prompts = ["a toucan", "a horse"]
    latents = torch.randn(2 * 2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(6))  # [N, 4, 8, 12]
    ref = ref_pipe(prompts, image=image, mask_image=mask, height=H, width=W, strength=1.0, num_inference_steps=6,
                   num_images_per_prompt=2, latents=latents.clone(), generator=torch.Generator().manual_seed(2),
                   output_type="pt").images
    ours = pipe.generate(prompts, image=image, mask_image=mask, strength=1.0, steps=6, num_images=2,
                         latents=latents, scheduler="euler", seed=2, output="tensor", progress=False)
    assert ours.shape == ref.shape == (4, 3, H, W)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("mode", ["L", "RGB", "1"])
def test_inpaint_pil_mask_matches_diffusers(sd9, mode):
    """A PIL mask of any mode: resized (Lanczos), made greyscale, thresholded at 0.5, as diffusers' mask processor."""
    pipe, folder, _ = sd9
    image = Image.fromarray((rand_image(9)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    mask = Image.fromarray((box_mask()[0, 0].numpy() * 255).astype(np.uint8)).convert(mode)
    ref_pipe = reference("StableDiffusionInpaintPipeline", folder, "ddim")
    ref = ref_pipe("a toucan", image=image, mask_image=mask, height=H, width=W, num_inference_steps=5,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = pipe.generate("a toucan", image=image, mask_image=mask, strength=1.0, steps=5, scheduler="ddim", seed=0,
                         output="tensor", progress=False)
    torch.testing.assert_close(ours, ref, **TOL)


def test_inpaint_4_channel_ends_on_the_image_outside_the_mask(sd):
    """4-channel blending: after the last step the latents outside the mask are the image's own latents, a sample
    of the VAE posterior with the generator's FIRST draw: 0.18215 · (μ + σ ε) — written out here."""
    pipe, _ = sd
    image, mask = rand_image(3), box_mask()
    seen = {}
    pipe.generate("a toucan", image=image, mask_image=mask, strength=1.0, steps=4, seed=0, output="tensor",
                  progress=False, callback=lambda i, t, z: seen.update(z=z))
    with torch.no_grad():
        post = pipe.vae.encode(image * 2 - 1)
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    z0 = 0.18215 * (post.mean + post.std * eps)                                  # [1, 4, 8, 12]
    keep = (torch.nn.functional.interpolate(mask, size=(H // 2, W // 2)) == 0).expand_as(z0)
    assert keep.any() and not keep.all()
    torch.testing.assert_close(seen["z"][keep], z0[keep], rtol=0, atol=1e-5)
    assert not torch.allclose(seen["z"][~keep], z0[~keep], atol=1e-2)  # inside, something new was drawn


def test_nine_channel_unet_loads_in_both_layouts(sd9, tmp_path):
    """diffusers folder (config in_channels 9) and CompVis file (conv_in weight [C, 9, 3, 3]) give one model."""
    pipe, _, dpipe = sd9
    path = tmp_path / "inpaint.safetensors"
    save_file(compvis_state_dict(dpipe), str(path))
    single = minidiff.load(path)
    assert single.unet.config.in_channels == 9 and single.unet.conv_in.weight.shape[1] == 9
    kw = dict(image=rand_image(0), mask_image=box_mask(), strength=1.0, steps=3, scheduler="ddim", seed=0,
              output="tensor", progress=False)
    torch.testing.assert_close(single.generate("a toucan", **kw), pipe.generate("a toucan", **kw), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- prompt embeddings
def test_prompt_embeds_match_diffusers(sd):
    pipe, folder = sd
    ref_pipe = reference("StableDiffusionPipeline", folder, "euler")
    d = pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(2, 77, d, generator=g), torch.randn(2, 77, d, generator=g)
    kw = dict(num_inference_steps=5, output_type="pt")
    ref = ref_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(1),
                   **kw).images
    ours = pipe.generate(prompt_embeds=embeds, negative_prompt_embeds=negative, steps=5, scheduler="euler", seed=1,
                         output="tensor", progress=False)
    torch.testing.assert_close(ours, ref, **TOL)
    # embeddings for the prompt, a string for the negative (encoded as diffusers encodes it)
    ref = ref_pipe(prompt_embeds=embeds[:1], negative_prompt="blurry", generator=torch.Generator().manual_seed(1),
                   **kw).images
    ours = pipe.generate(prompt_embeds=embeds[:1], negative_prompt="blurry", steps=5, scheduler="euler", seed=1,
                         output="tensor", progress=False)
    torch.testing.assert_close(ours, ref, **TOL)


def test_prompt_embeds_of_the_prompt_give_the_same_image(sd):
    pipe, _ = sd
    kw = dict(steps=4, seed=0, output="tensor", progress=False, negative_prompt="blurry")
    embeds = pipe.encode_prompt(["a toucan"])
    torch.testing.assert_close(pipe.generate(prompt_embeds=embeds, **kw), pipe.generate("a toucan", **kw),
                               rtol=0, atol=1e-6)


def test_long_prompt_matches_diffusers_given_the_hand_built_chunks(sd):
    """A 120-token prompt is two framed chunks encoded separately and concatenated; the short negative is padded
    with the empty prompt's chunk. Built here from transformers' tokenizer and text encoder, fed to diffusers as
    prompt_embeds, and compared with minidiff given the plain strings."""
    pipe, folder = sd
    ref_pipe = reference("StableDiffusionPipeline", folder, "dpmpp")
    tok, enc = ref_pipe.tokenizer, ref_pipe.text_encoder
    prompt = " ".join(f"word{i}" for i in range(40))          # "word", digit(s): about 120 tokens
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert 75 < len(ids) <= 150
    bos, eos = tok.bos_token_id, tok.eos_token_id

    def framed(part):
        return [bos] + part + [eos] * (76 - len(part))

    with torch.no_grad():
        chunks = torch.tensor([framed(ids[:75]), framed(ids[75:])])
        context = enc(chunks)[0].reshape(1, 154, -1)                          # [2, 77, d] -> [1, 154, d]
        neg = tok(["blurry"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        uncond = torch.cat([enc(neg)[0], enc(empty)[0]], dim=1)                  # [1, 154, d]
    ref = ref_pipe(prompt_embeds=context, negative_prompt_embeds=uncond, num_inference_steps=5,
                   generator=torch.Generator().manual_seed(2), output_type="pt").images
    with _no_truncation_warning():
        ours = pipe.generate(prompt, negative_prompt="blurry", steps=5, scheduler="dpmpp", seed=2, output="tensor",
                             progress=False)
    torch.testing.assert_close(ours, ref, **TOL)


class _no_truncation_warning:
    """Fails if a truncation warning is raised inside (generate never truncates)."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self._log if "dropped" in str(w.message)]


# ------------------------------------------------------------------------------------------------ bad arguments
# (the image, mask and strength refusals are in tests/test_bad_inputs.py's matrix, the door itself in
# tests/test_validation.py)
def test_scheduler_names_at_the_door(sd):
    pipe, _ = sd
    with pytest.raises(ValueError, match="scheduler must be one of ddim, ddpm, dpm2, dpm2_a"):
        pipe.generate("x", scheduler="dpm fast", steps=1, progress=False)
    a = pipe.generate("x", scheduler="Euler_A", steps=2, seed=0, output="tensor", progress=False)
    b = pipe.generate("x", scheduler="euler_a", steps=2, seed=0, output="tensor", progress=False)
    assert torch.equal(a, b)
    assert set(SCHEDULERS) <= set(SCHEDULER_NAMES)
