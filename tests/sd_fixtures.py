"""Tiny random-weight Stable Diffusion models built with diffusers/transformers (the oracles), and writers for every
published checkpoint layout. The real SD v1.4 weights cannot be downloaded here; these files have exactly its layouts."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
VOCAB_DIRS = [ROOT / "weights" / "clip-tokenizer", ROOT.parent / "shared" / "clip-tokenizer"]
VOCAB = next((d for d in VOCAB_DIRS if (d / "vocab.json").is_file()), VOCAB_DIRS[-1])

SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}

# the published configs of CompVis/stable-diffusion-v1-4
SD14_UNET = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD14_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)

# SD v1's layout at toy width: cross-attention on every level but the deepest, 2 ResBlocks per level, 8 U-Net heads
# and 64-wide CLIP heads (a CompVis file has no config: the loader reads those two from SD v1's conventions)
TINY_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=32, sample_size=16)
TINY_TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)


def _jitter(model, seed):
    """diffusers initialises some weights to constants (norms to 1/0); randomise everything so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_diffusers_pipe(seed: int = 0, in_channels: int = 4):
    """in_channels=9: the U-Net of an inpainting model (sd-v1-5-inpainting's layout: latents + mask + masked image)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = _jitter(UNet2DConditionModel(**{**TINY_UNET, "in_channels": in_channels}), seed)
    vae = _jitter(AutoencoderKL(**TINY_VAE), seed + 1)
    text = _jitter(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), seed + 2)
    tok = CLIPTokenizer(str(VOCAB / "vocab.json"), str(VOCAB / "merges.txt"), model_max_length=77)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def diffusers_scheduler(name: str, config: dict):
    """diffusers' scheduler for a minidiff sampler name ("heun_karras", "dpmpp_sde", ...) on a scheduler config."""
    import diffusers

    from minidiff.schedulers import SCHEDULERS, split_karras
    base, karras = split_karras(name)
    extra = {"use_karras_sigmas": True} if karras else {}
    if base == "dpmpp_sde":  # DPMSolverMultistepScheduler's SDE variant
        extra["algorithm_type"] = "sde-dpmsolver++"
    return getattr(diffusers, SCHEDULERS[base].class_name).from_config({**config, **extra})


def write_diffusers(dpipe, folder: Path, safetensors: bool = True) -> Path:
    dpipe.save_pretrained(str(folder), safe_serialization=safetensors)
    if not safetensors:  # transformers 5 writes safetensors regardless; the .bin folders in the wild have pytorch_model.bin
        for st in folder.glob("*/model.safetensors"):
            torch.save(load_file(str(st)), st.with_name("pytorch_model.bin"))
            st.unlink()
    return folder


def to_2022_spelling(folder: Path) -> Path:
    """Rewrite a saved folder the way the 2022 SD v1.4 release spelled it: VAE mid-block attention as
    query/key/value/proj_attn, text encoder keys under `text_model.` (in .safetensors or, as that release shipped
    them, .bin files)."""
    def rewrite(stem: Path, rename):
        st, pt = stem.with_suffix(".safetensors"), stem.with_suffix(".bin")
        if st.exists():
            save_file({rename(k): v for k, v in load_file(str(st)).items()}, str(st))
        else:
            torch.save({rename(k): v for k, v in torch.load(pt, weights_only=True).items()}, pt)

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def vae_name(k):
        for new, o in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        return k
    rewrite(folder / "vae" / "diffusion_pytorch_model", vae_name)
    text = "model" if (folder / "text_encoder" / "model.safetensors").exists() else "pytorch_model"
    rewrite(folder / "text_encoder" / text, lambda k: k if k.startswith("text_model.") else "text_model." + k)
    return folder


def compvis_state_dict(dpipe, ema_unet: dict | None = None) -> dict:
    """The diffusers pipeline's weights in the CompVis single-file layout, with the non-weight buffers real files carry.

    The names come from minidiff.formats.keymaps; tests/test_checkpoint.py checks them against diffusers' own
    single-file converter, so this fixture is not taking the code under test on faith."""
    from minidiff.formats import keymaps
    from minidiff.unet import UNetConfig
    from minidiff.vae import VAEConfig

    ucfg = UNetConfig.from_diffusers(dict(dpipe.unet.config))
    vcfg = VAEConfig.from_diffusers(dict(dpipe.vae.config))
    sd = {}
    for k, v in dpipe.unet.state_dict().items():
        sd[keymaps.compvis_unet(k, ucfg)[0]] = v.clone()
    for k, v in dpipe.vae.state_dict().items():
        name = keymaps.compvis_vae(k, vcfg)[0]
        sd[name] = v[:, :, None, None].clone() if keymaps.is_compvis_vae_attention(name) else v.clone()
    for k, v in dpipe.text_encoder.state_dict().items():
        sd[keymaps.compvis_text(k.removeprefix("text_model."))[0]] = v.clone()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd["betas"] = betas
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    sd["alphas_cumprod_prev"] = torch.cat([torch.ones(1), sd["alphas_cumprod"][:-1]])
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    if ema_unet is not None:
        for k, v in ema_unet.items():
            sd[keymaps.compvis_unet_ema(k, ucfg)[0]] = v.clone()
    return sd


def diffusers_configs(dpipe) -> dict:
    return {"unet": dict(dpipe.unet.config), "vae": dict(dpipe.vae.config)}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path
