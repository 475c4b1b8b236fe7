"""Chapter 10 — the text-to-image pipeline with classifier-free guidance (Rombach et al. 2022; Ho & Salimans 2022).

    prompt ──tokenizer──▶ ids [B, 77] ──text encoder──▶ context c [B, 77, d]
    z_T ~ N(0, I) · σ_init                                   (latents [B, 4, H/8, W/8])
    for t in the scheduler's timesteps:
        ε_u, ε_c = U-Net(z_t, t, c_negative), U-Net(z_t, t, c)     (one batched call of size 2B)
        ε̂ = ε_u + w · (ε_c − ε_u)                                  (classifier-free guidance, w = guidance_scale)
        z_{t-1} = scheduler.step(ε̂, t, z_t)
    image = VAE.decode(z_0 / 0.18215)                              (the latents were scaled to unit variance in training)

Image to image (SDEdit, Meng et al. 2022) runs the same loop from a noised image instead of pure noise:
    z_0 = 0.18215 · sample of VAE.encode(image),   z_t = add_noise(z_0, ε, t_s)   (t_s: the step `strength` picks)
and only the steps from t_s down. Inpainting adds a mask m (1 = repaint) at latent resolution:
    4-channel U-Net (SD v1.4):  after every step  z ← (1 - m) · add_noise(z_0, ε, t_next) + m · z
    9-channel inpainting U-Net: its input is [z_t | m | latents of the masked image]  (no blending)

Every step mirrors diffusers' StableDiffusionPipeline / Img2ImgPipeline / InpaintPipeline, random draws included,
so the same seed gives the same image. Prompts longer than 75 tokens and "(word:1.3)" weights: minidiff.prompts;
image and mask preparation: minidiff.images.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import images, kernels
from . import prompts as prompts_mod
from .schedulers import SD_V1_CONFIG, make_scheduler, scheduler_name
from .validation import NaNWatch, check_finite_images, check_generate_args


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
    scheduler_config: dict = field(default_factory=lambda: dict(SD_V1_CONFIG))
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

    @property
    def is_inpainting(self) -> bool:
        """An inpainting U-Net (sd-v1-5-inpainting's layout): its input is [z_t | mask | masked image's latents]."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def image_size(self, image=None, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels of what generate() draws: as asked; else the start image's size rounded down to
        a multiple of the VAE's factor f; else the U-Net's sample_size · f (512 for SD v1.4)."""
        if image is not None:
            return images.target_size(image, self.vae_scale_factor, height, width)
        size = self.unet.config.sample_size
        return height or size * self.vae_scale_factor, width or size * self.vae_scale_factor

    def to(self, device=None, dtype=None) -> "StableDiffusion":
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    def make_scheduler(self, name: str | None = None):
        """A fresh scheduler of the given kind (any name minidiff.schedulers.resolve accepts: minidiff's or
        AUTOMATIC1111's, any case) on this model's schedule; None: the kind its scheduler_config.json names (PNDM for
        SD v1.4), as diffusers' pipelines do (with a warning when it names a class minidiff lacks)."""
        return make_scheduler(name or scheduler_name(self.scheduler_config), self.scheduler_config)

    def load_embedding(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (diffusers learned_embeds.safetensors / .bin, A1111 .pt / .safetensors):
        its word then works in prompts and negative prompts. token: overrides the name stored in the file.
        Returns the tokens added (tok, tok_1, ... for a multi-vector embedding). See minidiff/formats/embeddings.py."""
        from .formats.embeddings import load_embedding
        return load_embedding(self, path, token)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], weighting: bool = True) -> torch.Tensor:
        """B strings -> context [B, k·77, d]: prompts over 75 tokens in k chunks, "(word:1.3)" weighting, all padded
        to the longest with the empty prompt (minidiff.prompts). Up to 75 tokens, unweighted: diffusers' [B, 77, d]."""
        context = prompts_mod.encode_batch(self.tokenizer, self.text_encoder, list(prompts), self.device, weighting)
        return context.to(self.dtype)

    @torch.no_grad()
    @_on_own_kernels
    def generate(self, prompt=None, negative_prompt=None, steps: int = 50, guidance_scale: float = 7.5,
                 scheduler: str | None = None, seed: int | None = None, latents: torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None, num_images: int = 1, output: str = "pil",
                 generator: torch.Generator | None = None, eta: float = 0.0, progress: bool = True, callback=None,
                 image=None, strength: float = 0.75, mask_image=None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None):
        """Text to image; with `image`, image to image (SDEdit); with `image` and `mask_image`, inpainting.

        prompt: a string or a list of B strings (longer than 75 tokens: encoded in chunks; "(word:1.3)", "(word)",
        "[word]" weight words, see minidiff.prompts); negative_prompt: None (= ""), a string, or B strings.
        prompt_embeds / negative_prompt_embeds: contexts [B, L, d] given instead of the strings (as diffusers).
        scheduler: a sampler name, any case: minidiff's (minidiff.schedulers.SCHEDULER_NAMES: "pndm", "ddim",
        "ddpm", "euler", "euler_a", "lms", "heun", "dpm2", "dpm2_a", "dpmpp", "dpmpp_sde", "unipc", "lcm", and
        "<name>_karras" for Karras σ's where diffusers offers them) or AUTOMATIC1111's ("DPM++ 2M Karras", "Euler a",
        "UniPC", ...: minidiff.schedulers.A1111_NAMES); None = the model's own (its scheduler_config's class: "pndm"
        for SD v1.4, "ddim" for the embedded shapes model). "lcm" is for LCM models and LCM-LoRAs, with
        guidance_scale=1 and 2-8 steps.
        seed / generator: where every random number comes from, drawn in diffusers' order (VAE posterior sample of
        `image`, then the noise, then the masked image's posterior, then the samplers' own draws).
        latents: explicit unit-variance noise [B·num_images, latent_channels (4), H/8, W/8] instead of drawing it,
        for every U-Net (an inpainting U-Net's extra inputs come from image and mask_image), as diffusers takes it:
        scaled by the scheduler's initial sigma (text to image, inpainting at strength 1: diffusers' image), or added
        to the image's latents at the step `strength` picks (image to image, inpainting below strength 1, where
        diffusers' inpainting pipeline instead starts from the scaled noise alone when given latents).
        image: a PIL image (or list) or a tensor [1 or B, 3, H, W] in [0, 1]; the output has its size rounded down
        to a multiple of 8 (or height x width when given). Image i goes with prompt i (one image: with all).
        strength: in [0, 1], how much of the schedule is run, i.e. how far from the image the result may go; the
        last int(steps·strength) of the `steps` steps run. mask_image: PIL image or tensor [H, W] / [N, 1, H, W]
        in [0, 1], the image's size; white (>= 0.5) = repaint. A 4-channel U-Net (SD v1.4) repaints by putting the
        known region back after every step; a 9-channel inpainting U-Net also sees the mask and the masked image.
        callback(step_index, t, latents) is called after every step (latents [N, 4, h, w]).
        Returns a list of B·num_images PIL images, or with output="tensor" a tensor [N, 3, H, W] in [0, 1].
        Bad arguments raise TypeError / ValueError naming them (minidiff.validation); NaN/inf latents during
        sampling raise validation.NonFiniteError naming the step, instead of returning a blank image.
        """
        check_generate_args(self, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                            guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, latents=latents,
                            height=height, width=width, num_images=num_images, output=output, generator=generator,
                            eta=eta, progress=progress, callback=callback, image=image, strength=strength,
                            mask_image=mask_image, prompt_embeds=prompt_embeds,
                            negative_prompt_embeds=negative_prompt_embeds)
        # every argument is valid from here on
        inpaint_unet = self.is_inpainting
        f = self.vae_scale_factor
        height, width = self.image_size(image, height, width)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)

        # text -> context: each prompt repeated num_images times, next to each other: [N, L, d], N = B·num_images
        guided = guidance_scale > 1.0
        context, uncond = self._contexts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided)
        B = context.shape[0]
        N = B * num_images
        context = context.repeat_interleave(num_images, dim=0)
        if guided:  # one batch [negatives; prompts] so the U-Net runs once per step
            context = torch.cat([uncond.repeat_interleave(num_images, dim=0), context])  # [2N, L, d]

        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps)
        step_kwargs = {"generator": generator}   # decided once: DDIM's step takes η, the others have none (diffusers)
        if "eta" in inspect.signature(sched.step).parameters:
            step_kwargs["eta"] = eta
        shape = (N, self.vae.config.latent_channels, height // f, width // f)
        if image is None:  # text to image: z_T = σ_init · ε
            timesteps = sched.timesteps
            noise = latents if latents is not None else torch.randn(shape, generator=generator, dtype=self.dtype)
            latents = noise.to(self.device, self.dtype) * sched.init_noise_sigma  # drawn on the CPU, as diffusers
            start = None
        else:  # start part-way down: only the last int(steps·strength) steps run (diffusers' get_timesteps)
            timesteps = strength_timesteps(sched, steps, strength)
            start = self._start_from_image(image, mask_image, strength, sched, timesteps, shape, num_images, latents,
                                           generator)
            latents = start.latents
        blend = start is not None and start.mask is not None and not inpaint_unet  # 4-channel inpainting
        if inpaint_unet:  # the U-Net's extra input, doubled like the latents under guidance: [2N or N, 1 + 4, h, w]
            extra = torch.cat([start.mask, start.masked_latents], dim=1)
            extra = torch.cat([extra] * 2) if guided else extra

        watch = NaNWatch(len(timesteps), guidance_scale)   # non-finite latents raise, naming the step
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress)):
            x = torch.cat([latents] * 2) if guided else latents            # [2N or N, 4, h, w]
            x = sched.scale_model_input(x, t)
            if inpaint_unet:  # diffusers: [scaled z_t | mask | masked-image latents] -> 9 channels
                x = torch.cat([x, extra], dim=1)
            eps = self.unet(x, t, context)
            if guided:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            else:  # a tensor of our own: PNDM / DPM++ keep past outputs, and a U-Net compiled with CUDA graphs
                eps = eps.clone()  # writes every call's output into the same buffer
            latents = sched.step(eps, t, latents, **step_kwargs)
            if blend:  # 4-channel inpainting: the known region is the image noised to the NEXT timestep's level
                # (diffusers' add_noise(z_0, ε, timesteps[i+1])), and the clean image after the last step
                known = start.image_latents if i == len(timesteps) - 1 else \
                    sched.add_noise(start.image_latents, start.noise, timesteps[i + 1:i + 2])
                latents = (1 - start.mask) * known + start.mask * latents
            watch.update(i, t, latents)
            if callback is not None:
                callback(i, t, latents)

        watch.check()
        images_out = self.decode_latents(latents)  # [N, 3, H, W] in [0, 1]
        check_finite_images(images_out)
        return images_out if output == "tensor" else to_pil(images_out)

    def _contexts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided):
        """-> (context [B, L, d], negative context [B, L, d] or None without guidance), from strings or given
        embeddings (as diffusers' encode_prompt takes them). Strings are encoded in one batch, so a prompt and its
        negative are padded to the same number of chunks."""
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        B = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = [""] * B if negative_prompt is None else [negative_prompt] * B \
            if isinstance(negative_prompt, str) else list(negative_prompt)

        def given(e):
            return e.to(self.device, self.dtype)

        if not guided:
            return (given(prompt_embeds) if prompts is None else self.encode_prompt(prompts)), None
        if prompts is not None and negative_prompt_embeds is None:  # both from strings: one batch, one length
            both = self.encode_prompt(prompts + negatives)
            return both[:B], both[B:]
        # one side given: the strings are padded with empty-prompt chunks to its length
        length = (prompt_embeds if prompts is None else negative_prompt_embeds).shape[1]
        encode = partial(prompts_mod.encode_batch, self.tokenizer, self.text_encoder, device=self.device, length=length)
        context = given(prompt_embeds) if prompts is None else encode(prompts).to(self.dtype)
        uncond = given(negative_prompt_embeds) if negative_prompt_embeds is not None else encode(negatives).to(self.dtype)
        return context, uncond

    def _start_from_image(self, image, mask_image, strength, sched, timesteps, shape, num_images, noise,
                          generator) -> "Start":
        """The initial latents of image to image and inpainting, drawing random numbers in diffusers' order."""
        N, _, h, w = shape
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        x = images.prepare_image(image, self.vae_scale_factor, height, width)  # [B_img, 3, H, W] in [-1, 1]

        def per_output(t):  # [1 or B, ...] -> [N, ...]: picture i goes with prompt i, repeated num_images times
            return t.repeat(N, 1, 1, 1) if t.shape[0] == 1 else t.repeat_interleave(num_images, dim=0)

        mask = None
        if mask_image is not None:
            mask = images.prepare_mask(mask_image, height, width)            # [B_m, 1, H, W] of 0/1
        inpaint_unet = self.is_inpainting
        # 1. the image's latents: a SAMPLE of the VAE posterior drawn with the generator (diffusers'
        #    retrieve_latents(sample_mode="sample")), not its mean. Inpainting at strength 1 with a 9-channel U-Net
        #    starts from pure noise and never needs them, so diffusers skips this draw there.
        image_latents = None
        if mask is None or not inpaint_unet or strength < 1:
            image_latents = per_output(self._encode_image(x, generator))
        # 2. the noise ε, drawn on the CPU with the generator
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=self.dtype)
        noise = noise.to(self.device, self.dtype)
        # strength 1 inpainting starts from pure noise z_T = σ_init ε (diffusers' is_strength_max); everything
        # else from the image noised to the first remaining timestep: x_t = add_noise(z_0, ε, t_start), which for
        # the σ-samplers is z_0 + σ ε (no σ_init factor)
        if mask is not None and strength == 1.0:
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(N))
        start = Start(latents=latents, noise=noise, image_latents=image_latents)
        if mask is not None:
            # 3. the masked image (the repaint region set to 0, i.e. grey in [-1, 1]) and ITS posterior sample,
            #    drawn for every U-Net as diffusers does (a 4-channel U-Net never reads it, but the generator moves)
            masked = x * (mask < 0.5)                                        # [B_img, 3, H, W]
            start.masked_latents = per_output(self._encode_image(masked, generator))
            # the mask at latent resolution: nearest-neighbour (F.interpolate's default, as diffusers)
            start.mask = per_output(F.interpolate(mask, size=(h, w))).to(self.device, self.dtype)  # [N, 1, h, w]
        return start

    def _encode_image(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] -> scaled latents [n, 4, H/8, W/8]: z = scaling_factor · (μ + σ ε)."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(x.to(self.device, vae_dtype))
        return (posterior.sample(generator) * self.latent_scale).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, 4, h, w] -> images [N, 3, H, W] in [0, 1], decoded in the VAE's own dtype
        (fp32 when the model was loaded in fp16: fp16 activations overflow in the decoder and give black images)."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(latents.to(vae_dtype) / self.latent_scale)
        return (x.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class Start:
    """Where image to image / inpainting begins. latents [N, 4, h, w]: the noised start; noise: its ε;
    image_latents: the image's (scaled) latents; mask [N, 1, h, w] and masked_latents [N, 4, h, w]: inpainting."""
    latents: torch.Tensor
    noise: torch.Tensor
    image_latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    masked_latents: torch.Tensor | None = None


def strength_timesteps(sched, steps: int, strength: float) -> torch.Tensor:
    """The timesteps image to image runs (diffusers' get_timesteps): the last int(steps·strength) of `steps`.

    t_start = steps - int(steps·strength) steps are cut from the top of sched.timesteps: t_start · order entries, as
    a 2nd-order sampler (Heun, DPM2: order 2) lists each step's timestep once per network call. Samplers that keep a
    step index start at that entry (set_begin_index). The cut is made in sched.timesteps itself, so PNDM, whose
    list holds one timestep twice (the Heun start, n + 1 entries, order 1), keeps one more entry than
    `steps - t_start` and runs its warm-up on the first two of them, exactly as diffusers does."""
    t_start = steps - min(int(steps * strength), steps)
    sched.set_begin_index(t_start * sched.order)
    return sched.timesteps[t_start * sched.order:]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> N PIL images (rounded as diffusers' image processor does)."""
    arr = images.permute(0, 2, 3, 1).cpu().float().numpy()  # [N, H, W, 3]
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
