"""The live preview: what the model believes the finished image is, at every step of sampling.

At step t the U-Net predicts the noise ε̂ in its input z_t; the clean image it implies is (DDIM eq. 12)

    x̂₀ = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t  =  z_t·√(1+σ_t²) − σ_t·ε̂,      σ_t² = (1−ᾱ_t) / ᾱ_t

Notation:  z_t   the U-Net's input, in variance-preserving form (every minidiff sampler scales its latents to it
                 with scale_model_input), [N, 4, h, w];  ε̂  the guided prediction ε_u + w (ε_c − ε_u);
           σ_t   the noise-to-signal ratio at timestep t; a σ-sampler's Karras timesteps are fractional, and
                 σ(t) is then read off log σ by the same linear interpolation the samplers use to make t from σ.
For a v-prediction model (v = √ᾱ ε − √(1−ᾱ) x₀):  x̂₀ = √ᾱ_t z_t − √(1−ᾱ_t) v̂.

Why a forward hook: StableDiffusion.generate's callback receives (step, t, latents) AFTER the step, and x̂₀
needs ε̂, which is made inside the loop. The hook reads the U-Net's input and output where they are made (the
callback then combines them), so the pipeline's signature stays as it is; the hook is registered for one job and
removed after it.

x̂₀ becomes a picture two ways (AUTOMATIC1111's "Full" and "Approx cheap" live previews):
    the model's own VAE decoder      when the VAE is small (<= PREVIEW_VAE_MAX_PARAMETERS: the embedded model's)
    a fixed linear map latent->RGB   otherwise: one 4x3 matrix per pixel (AUTOMATIC1111's cheap_approximation,
                                     fitted to SD v1's VAE), costs nothing, shows colours and layout
"""
from __future__ import annotations

import numpy as np
import torch

PREVIEW_VAE_MAX_PARAMETERS = 5_000_000   # the embedded model's VAE has 0.7 M; SD v1's 84 M (a decode: seconds)

# SD v1's latent channels -> RGB in [-1, 1] (rows: latent channel, columns: R, G, B), AUTOMATIC1111's
# modules/sd_vae_approx.py cheap_approximation (from a least-squares fit on the Hugging Face forum)
CHEAP_LATENT_TO_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def cheap_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [N, 4, h, w] -> images [N, 3, h, w] in [0, 1] by the linear map above (no upsampling)."""
    x = torch.einsum("nlhw,lr->nrhw", latents.float().cpu(), CHEAP_LATENT_TO_RGB)   # [N, 3, h, w] in ~[-1, 1]
    return (x / 2 + 0.5).clamp(0, 1)


def sigma_at(t, alphas_cumprod: torch.Tensor) -> float:
    """σ(t) = √((1−ᾱ_t)/ᾱ_t), interpolated linearly in log σ for a fractional t (as the σ-samplers' t was made)."""
    log_sigmas = (0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)).double().numpy()   # [T], increasing
    t = float(t.item() if isinstance(t, torch.Tensor) else t)
    return float(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)))


class X0Probe:
    """Records the U-Net's input and output during one generate() call; predicted_x0() turns the latest into x̂₀.

        with X0Probe(pipe, guidance_scale) as probe:
            pipe.generate(..., callback=lambda i, t, z: show(probe.predicted_x0(t)))
    """

    def __init__(self, pipe, guidance_scale: float):
        self.pipe, self.guidance_scale = pipe, float(guidance_scale)
        self.alphas_cumprod = pipe.make_scheduler("ddpm").alphas_cumprod      # ᾱ of the model's own β schedule
        self.prediction = (pipe.scheduler_config or {}).get("prediction_type", "epsilon")
        self.latent_channels = pipe.vae.config.latent_channels
        self.z = self.out = None
        self._handle = None

    def __enter__(self):
        self._handle = self.pipe.unet.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self.z = self.out = None

    def _record(self, module, args, output):
        self.z, self.out = args[0][:, :self.latent_channels], output   # a 9-channel inpainting input: z_t first

    @torch.no_grad()
    def predicted_x0(self, t) -> torch.Tensor | None:
        """x̂₀ [N, 4, h, w] from the last U-Net call (at timestep t), or None before the first."""
        if self.z is None:
            return None
        z, out = self.z.float(), self.out.float()
        if self._guided(out, z):
            uncond, cond = out.chunk(2)                       # [negatives; prompts], as the pipeline batches them
            out = uncond + self.guidance_scale * (cond - uncond)
            z = z.chunk(2)[0]
        sigma = sigma_at(t, self.alphas_cumprod)
        alpha_bar = 1.0 / (1.0 + sigma ** 2)
        if self.prediction == "v_prediction":
            return alpha_bar ** 0.5 * z - (1 - alpha_bar) ** 0.5 * out
        if self.prediction == "sample":
            return out
        return z * (1 + sigma ** 2) ** 0.5 - sigma * out

    def _guided(self, out, z) -> bool:
        """Under classifier-free guidance the pipeline runs [negatives; prompts] as one batch of 2N."""
        return self.guidance_scale > 1.0 and out.shape[0] % 2 == 0 and torch.equal(*z.chunk(2))


def uses_vae(pipe) -> bool:
    """Preview with the model's VAE (small) or with the cheap linear map (big, 4 latent channels)?"""
    n = sum(p.numel() for p in pipe.vae.parameters())
    return n <= PREVIEW_VAE_MAX_PARAMETERS or pipe.vae.config.latent_channels != 4


@torch.no_grad()
def to_rgb(pipe, x0: torch.Tensor) -> torch.Tensor:
    """x̂₀ (scaled latents) [N, 4, h, w] -> images [N, 3, H or h, W or w] in [0, 1]."""
    return pipe.decode_latents(x0.to(pipe.dtype)) if uses_vae(pipe) else cheap_rgb(x0)
