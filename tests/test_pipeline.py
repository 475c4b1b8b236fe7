"""generate() equals diffusers' StableDiffusionPipeline given the same weights and initial latents, for every scheduler."""
import json
from pathlib import Path

import pytest
import torch

import minidiff
from sd_fixtures import diffusers_scheduler, make_diffusers_pipe, write_diffusers

DIFFUSERS_SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
                        "euler": "EulerDiscreteScheduler", "dpmpp": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    folder = write_diffusers(make_diffusers_pipe(0), tmp_path_factory.mktemp("sd") / "sd")
    dpipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)  # both read the same folder
    dpipe.set_progress_bar_config(disable=True)
    return minidiff.load(folder), dpipe


def _diffusers_generate(dpipe, scheduler, prompt, negative, latents, steps, guidance, seed, num_images=1):
    """diffusers' pipeline with its scheduler built from the same scheduler_config.json minidiff read."""
    config = json.loads((Path(dpipe.name_or_path) / "scheduler" / "scheduler_config.json").read_text())
    dpipe.scheduler = diffusers_scheduler(scheduler, config)
    if isinstance(prompt, list) and isinstance(negative, str):  # diffusers wants the same type for both
        negative = [negative] * len(prompt)
    return dpipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                 latents=None if latents is None else latents.clone(), generator=torch.Generator().manual_seed(seed), output_type="pt",
                 num_images_per_prompt=num_images).images


@pytest.mark.parametrize("negative", [None, "blurry, low quality"], ids=["no-negative", "negative"])
@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_generate_matches_diffusers(pipes, scheduler, negative):
    pipe, dpipe = pipes
    prompts = ["a toucan", "A Pokémon cellphone"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = pipe.generate(prompts, negative_prompt=negative, steps=6, scheduler=scheduler, seed=7, latents=latents,
                         output="tensor", progress=False)
    ref = _diffusers_generate(dpipe, scheduler, prompts, negative, latents, 6, 7.5, seed=7)
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["heun", "dpm2", "dpm2_a", "dpmpp_sde", "unipc", "lcm", "heun_karras",
                                       "dpm2_a_karras"])
def test_new_samplers_match_diffusers(pipes, scheduler):
    """Heun and DPM2 (two U-Net calls per step), DPM2 ancestral, DPM++ 2M SDE and LCM (their own noise from the
    seed), UniPC: the same image as diffusers' pipeline with that scheduler, from the seed alone."""
    pipe, dpipe = pipes
    ours = pipe.generate(["a toucan", "a horse"], negative_prompt="blurry", steps=5, scheduler=scheduler, seed=4,
                         output="tensor", progress=False)
    ref = _diffusers_generate(dpipe, scheduler, ["a toucan", "a horse"], "blurry", None, 5, 7.5, seed=4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,minidiff_name", [("DPM++ 2M Karras", "dpmpp_karras"), ("k_heun", "heun"),
                                                ("Euler a", "euler_a"), ("DPM2 a Karras", "dpm2_a_karras")])
def test_a1111_names_in_generate(pipes, name, minidiff_name):
    """generate(scheduler=) takes AUTOMATIC1111's names: the image of the minidiff name they stand for."""
    pipe, _ = pipes
    kw = dict(steps=3, seed=2, output="tensor", progress=False)
    assert torch.equal(pipe.generate("x", scheduler=name, **kw), pipe.generate("x", scheduler=minidiff_name, **kw))


def test_seeded_noise_and_several_images_match_diffusers(pipes):
    """Without explicit latents: the seed draws the initial noise exactly as diffusers does (CPU generator)."""
    pipe, dpipe = pipes
    ref = _diffusers_generate(dpipe, "pndm", ["a red circle"], None, None, 4, 3.0, seed=11, num_images=2)
    ours = pipe.generate("a red circle", steps=4, guidance_scale=3.0, num_images=2, seed=11, output="tensor",
                         progress=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours[0], ours[1])  # two different noises


def test_no_guidance_matches_diffusers(pipes):
    pipe, dpipe = pipes
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = pipe.generate("a horse", guidance_scale=1.0, steps=5, scheduler="ddim", latents=latents, output="tensor",
                         progress=False)
    ref = _diffusers_generate(dpipe, "ddim", "a horse", None, latents, 5, 1.0, seed=0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_pil_output_and_size(pipes):
    pipe, _ = pipes
    images = pipe.generate(["a", "b"], steps=2, seed=0, height=32, width=24, progress=False)
    assert len(images) == 2 and images[0].size == (24, 32) and images[0].mode == "RGB"
    again = pipe.generate(["a", "b"], steps=2, seed=0, height=32, width=24, progress=False)
    assert list(images[0].getdata()) == list(again[0].getdata())  # same seed, same image


def test_callback_sees_every_step(pipes):
    pipe, _ = pipes
    seen = []
    pipe.generate("x", steps=3, seed=0, output="tensor", progress=False, scheduler="ddim",
                  callback=lambda i, t, z: seen.append((i, int(t), tuple(z.shape))))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 8, 8)


def test_bad_arguments(pipes):
    pipe, _ = pipes
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 2 \(pixels\), got 17"):
        pipe.generate("x", height=17, steps=1, progress=False)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt has 2"):
        pipe.generate(["a", "b"], negative_prompt=["c"], steps=1, progress=False)
    with pytest.raises(ValueError, match="output"):
        pipe.generate("x", output="numpy", steps=1, progress=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe.generate("x", latents=torch.zeros(1, 4, 3, 3), steps=1, progress=False)
    with pytest.raises(ValueError, match="pndm"):
        pipe.generate("x", scheduler="dpm_fast", steps=1, progress=False)


def test_model_folders_naming_the_new_samplers_load_them(pipes, tmp_path):
    """A diffusers folder whose scheduler_config.json (as diffusers writes it) names HeunDiscreteScheduler, ...,
    LCMScheduler, or DPMSolverMultistepScheduler with algorithm_type "sde-dpmsolver++", samples with that sampler by
    default: no warning, no fallback to PNDM."""
    import shutil
    import warnings
    pipe, dpipe = pipes
    folder = shutil.copytree(dpipe.name_or_path, tmp_path / "sd")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    for name in ("heun", "dpm2", "dpm2_a", "dpmpp_sde", "unipc", "lcm"):
        sched_file.write_text(diffusers_scheduler(name, pipe.scheduler_config).to_json_string())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = minidiff.load(folder)
            sched = model.make_scheduler()
        assert type(sched) is type(pipe.make_scheduler(name)), name
        assert sched.config["beta_schedule"] == "scaled_linear"


def test_default_scheduler_is_the_models_own(pipes):
    """scheduler=None takes the class the model's scheduler_config.json names, as diffusers' pipelines do."""
    import dataclasses
    pipe, _ = pipes
    assert type(pipe.make_scheduler()).__name__ == "PNDMScheduler"  # SD v1.4's config names PNDM
    ddim_model = dataclasses.replace(pipe, scheduler_config=dict(pipe.scheduler_config, _class_name="DDIMScheduler"))
    a = ddim_model.generate("x", steps=3, seed=0, output="tensor", progress=False)
    b = pipe.generate("x", steps=3, seed=0, output="tensor", progress=False, scheduler="ddim")
    c = pipe.generate("x", steps=3, seed=0, output="tensor", progress=False)
    assert torch.equal(a, b) and not torch.equal(b, c)
