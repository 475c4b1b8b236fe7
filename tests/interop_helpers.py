"""The tiny random-weight SD model in one diffusers folder that both minidiff and diffusers load, and one image from
each with the same initial noise: what the LoRA / embedding / export parity tests compare."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

import minidiff
from sd_fixtures import make_diffusers_pipe, write_diffusers

STEPS = 3
TOL = dict(rtol=1e-4, atol=1e-4)


def latents(n: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def make_folder(root):
    """The tiny model (random weights, built by diffusers) saved as a diffusers folder; -> its path."""
    return write_diffusers(make_diffusers_pipe(0), root / "sd")


_SHARED = []


def shared_folder():
    """One such folder for the whole test session (the tests only read it), removed at exit."""
    if not _SHARED:
        root = Path(tempfile.mkdtemp(prefix="minidiff-interop-"))
        atexit.register(shutil.rmtree, root, True)
        _SHARED.append(make_folder(root))
    return _SHARED[0]


def load_diffusers(folder):
    from diffusers import StableDiffusionPipeline
    dpipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    dpipe.set_progress_bar_config(disable=True)
    return dpipe


def ours(pipe, prompt="a toucan", negative=None, fast=True, n=1) -> torch.Tensor:
    """minidiff's image [n, 3, 16, 16] in [0, 1], PNDM (the folder's scheduler), guidance 7.5."""
    pipe.fast = fast
    return pipe.generate(prompt, negative_prompt=negative, steps=STEPS, latents=latents(n), output="tensor",
                         progress=False)


def theirs(dpipe, prompt="a toucan", negative=None, n=1) -> torch.Tensor:
    """diffusers' image for the same prompt and initial noise."""
    return dpipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, latents=latents(n),
                 output_type="pt").images


def base_pair(folder):
    return minidiff.load(folder), load_diffusers(folder)
