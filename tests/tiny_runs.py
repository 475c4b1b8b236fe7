"""The tiny world every training test stands on: a random SD v1-layout model at toy width, a captioned folder of
small images, the FinetuneConfig that trains one on the other in seconds, and readers of what a run wrote. The
`tiny` fixture (tests/conftest.py) writes the model and the dataset once per test module."""
import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import minidiff
from minidiff.train import FinetuneConfig


def build_tiny_pipe(seed: int = 0, prediction_type: str | None = None):
    """SD v1's layout at toy width (tests/sd_fixtures' TINY_* configs), built with minidiff's classes (no diffusers
    import, so it is fast), weights jittered so nothing is a round constant."""
    from sd_fixtures import SD_SCHEDULER, TINY_TEXT, TINY_UNET, TINY_VAE

    from minidiff.clip import CLIPTextConfig, CLIPTextTransformer
    from minidiff.pipeline import StableDiffusion
    from minidiff.tokenizer import CLIPTokenizer
    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = [UNet(UNetConfig.from_diffusers(TINY_UNET)), AutoencoderKL(VAEConfig.from_diffusers(TINY_VAE)),
                 CLIPTextTransformer(CLIPTextConfig.from_transformers(TINY_TEXT))]
    with torch.no_grad():
        for m in parts:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            m.eval().requires_grad_(False)
    sched = dict(SD_SCHEDULER)
    if prediction_type:
        sched["prediction_type"] = prediction_type
    return StableDiffusion(tokenizer=CLIPTokenizer(), text_encoder=parts[2], unet=parts[0], vae=parts[1],
                           scheduler_config=sched)


def write_tiny_model(folder, seed: int = 0, prediction_type: str | None = None):
    minidiff.save(build_tiny_pipe(seed, prediction_type), folder)
    return folder


def write_tiny_dataset(folder, n: int = 6, seed: int = 0):
    """n small random images of uneven sizes (so crops matter) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (18 + 2 * i, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture of thing {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def cfg_for(tiny, out, **kw):
    base = dict(model=tiny["model"], data=tiny["data"], output=str(out), steps=4, batch_size=2, lr=1e-3,
                resolution=16, checkpoint_every=100, validation_steps=2, progress=False)
    # validation stays ON (the default: 2 dataset captions + 2 unrelated prompts at every checkpoint); only its
    # sampler steps are turned down, like the other size knobs
    return FinetuneConfig(**{**base, **kw})


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


# Equivalence tests (accumulation, cached latents, DDP) compare runs whose gradients agree to float rounding. Some
# gradients are exactly zero in exact arithmetic (a bias just before a GroupNorm whose groups are single channels: the
# norm removes it), so both runs hold rounding noise there, ~1e-9, and Adam's g / (√v + ε) with ε = 1e-8 turns noise of
# either sign into a full ±lr step. ε = 1e-4 scales such steps down by 1e4 and leaves real gradients' steps as they are.
EQUIV = dict(adam_eps=1e-4)


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
