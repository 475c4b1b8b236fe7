"""Chapter 10 — the text-to-image pipeline with classifier-free guidance (Rombach et al. 2022; Ho & Salimans 2022).

    prompt ──tokenizer──▶ ids [B, 77] ──text encoder──▶ context c [B, 77, d]
    z_T ~ N(0, I) · σ_init                                   (latents [B, 4, H/8, W/8])
    for t in the scheduler's timesteps:
        ε_u, ε_c = U-Net(z_t, t, c_negative), U-Net(z_t, t, c)     (one batched call of size 2B)
        ε̂ = ε_u + w · (ε_c − ε_u)                                  (classifier-free guidance, w = guidance_scale)
        z_{t-1} = scheduler.step(ε̂, t, z_t)
    image = VAE.decode(z_0 / 0.18215)                              (the latents were scaled to unit variance in training)

Every step mirrors diffusers' StableDiffusionPipeline, so the same initial latents give the same image.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import kernels
from .schedulers import make_scheduler, scheduler_name

SD_V1_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}


def _on_own_kernels(method):
    """Run a StableDiffusion method on the kernels its `fast` flag asks for ("auto" or "reference")."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with kernels.use("auto" if self.fast else "reference"):
            return method(self, *args, **kwargs)
    return run


@dataclass
class StableDiffusion:
    """The three networks, the tokenizer and the noise schedule of one text-to-image model.

    tokenizer:    str | list[str] -> LongTensor [B, 77]
    text_encoder: ids [B, 77] -> context [B, 77, d]
    unet:         (latents [B, 4, h, w], t, context) -> predicted noise [B, 4, h, w]
    vae:          encode(images [B, 3, H, W]) -> posterior; decode(z [B, 4, h, w]) -> images in [-1, 1]
    scheduler_config: the diffusers scheduler_config.json dict the model was trained with
    fast:         generate() runs on the fastest kernels that apply (minidiff.kernels: oneDNN on the CPU, Triton on CUDA;
                  the same modules and weights, and within rounding the same numbers); False: the reference kernels
    execution_device: where to compute when the networks are offloaded (set by speed.enable_model_offload)
    """
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict = field(default_factory=lambda: dict(SD_V1_SCHEDULER))
    fast: bool = True
    execution_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def to(self, device=None, dtype=None) -> "StableDiffusion":
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    def make_scheduler(self, name: str | None = None):
        """A fresh scheduler of the given kind ("pndm" | "ddim" | "ddpm" | "euler" | "dpmpp") on this model's schedule;
        None: the kind its scheduler_config.json names (PNDM for SD v1.4), as diffusers' pipelines do."""
        return make_scheduler(name or scheduler_name(self.scheduler_config), self.scheduler_config)

    @torch.no_grad()
    def load_embedding(self, path, token: str | None = None) -> str:
        """Teach the model a textual-inversion word from a file (diffusers' learned_embeds.safetensors/.bin, or
        AUTOMATIC1111's .pt/.safetensors): the word is added to the tokenizer, its vectors to the text encoder's
        token table. token: the word to use in prompts (default: the file's own). -> the word."""
        from .formats.embeddings import read_embedding
        word, vectors = read_embedding(path, token)                   # [n, d]
        te = self.text_encoder
        d = te.embeddings.token_embedding.embedding_dim
        if vectors.shape[-1] != d:
            raise ValueError(f"{path}: the embedding has width {vectors.shape[-1]}, this text encoder {d}")
        words = [word] + [f"{word}_{i}" for i in range(1, vectors.shape[0])]
        ids = self.tokenizer.add_tokens(words)
        if len(words) > 1:
            self.tokenizer.multi_vector[word] = " ".join(words)
        table = te.resize_token_embeddings(max(max(ids) + 1, te.embeddings.token_embedding.num_embeddings))
        with torch.no_grad():
            table.weight[ids] = vectors.to(table.weight.device, table.weight.dtype)
        return word

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """list of B strings -> context [B, 77, d]."""
        ids = self.tokenizer(prompts).to(self.device)  # [B, 77]
        return self.text_encoder(ids).to(self.dtype)

    @torch.no_grad()
    @_on_own_kernels
    def generate(self, prompt, negative_prompt=None, steps: int = 50, guidance_scale: float = 7.5,
                 scheduler: str | None = None, seed: int | None = None, latents: torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None, num_images: int = 1, output: str = "pil",
                 generator: torch.Generator | None = None, eta: float = 0.0, progress: bool = True, callback=None):
        """Text to image.

        prompt: a string or a list of B strings; negative_prompt: None (= ""), a string, or a list of B strings.
        scheduler: "pndm" | "ddim" | "ddpm" | "euler" | "dpmpp"; None = the model's own (scheduler_config's class:
        "pndm" for SD v1.4, "ddim" for the embedded shapes model).
        seed / generator: where the initial noise (and DDPM/DDIM-eta noise) comes from; latents: explicit initial
        unit-variance noise [B·num_images, 4, H/8, W/8], scaled by the scheduler's initial sigma as diffusers does.
        callback(step_index, t, latents) is called after every step (latents [N, 4, h, w]).
        Returns a list of B·num_images PIL images, or with output="tensor" a tensor [N, 3, H, W] in [0, 1].
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        B = len(prompts)
        if negative_prompt is None:
            negatives = [""] * B
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * B
        else:
            negatives = list(negative_prompt)
            if len(negatives) != B:
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {B}")
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)

        # text -> context; each prompt repeated num_images times, next to each other: [N, 77, d], N = B·num_images
        guided = guidance_scale > 1.0
        context = self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)
        if guided:  # one batch [negatives; prompts] so the U-Net runs once per step
            uncond = self.encode_prompt(negatives).repeat_interleave(num_images, dim=0)
            context = torch.cat([uncond, context])  # [2N, 77, d]

        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps)
        N = B * num_images
        shape = (N, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=self.dtype)  # drawn on the CPU, as diffusers does
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self.device, self.dtype) * sched.init_noise_sigma

        for i, t in enumerate(tqdm(sched.timesteps, desc="sampling", disable=not progress)):
            x = torch.cat([latents] * 2) if guided else latents            # [2N or N, 4, h, w]
            x = sched.scale_model_input(x, t)
            eps = self.unet(x, t, context)
            if guided:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            else:  # a tensor of our own: PNDM / DPM++ keep past outputs, and a U-Net compiled with CUDA graphs
                eps = eps.clone()  # writes every call's output into the same buffer
            latents = self._step(sched, eps, t, latents, generator, eta)
            if callback is not None:
                callback(i, t, latents)

        images = self.decode_latents(latents)  # [N, 3, H, W] in [0, 1]
        return images if output == "tensor" else to_pil(images)

    @staticmethod
    def _step(sched, eps, t, latents, generator, eta):
        kwargs = {"generator": generator}
        if "eta" in inspect.signature(sched.step).parameters:  # DDIM's η; the other samplers have none (as diffusers)
            kwargs["eta"] = eta
        return sched.step(eps, t, latents, **kwargs)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, 4, h, w] -> images [N, 3, H, W] in [0, 1], decoded in the VAE's own dtype
        (fp32 when the model was loaded in fp16: fp16 activations overflow in the decoder and give black images)."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(latents.to(vae_dtype) / self.latent_scale)
        return (x.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> N PIL images (rounded as diffusers' image processor does)."""
    arr = images.permute(0, 2, 3, 1).cpu().float().numpy()  # [N, H, W, 3]
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
