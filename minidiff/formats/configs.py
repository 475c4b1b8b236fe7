"""Config translation: the published config.json files <-> minidiff's config dataclasses.

    diffusers     unet/config.json          UNet2DConditionModel's arguments   <->  UNetConfig       (minidiff/unet.py)
    diffusers     vae/config.json           AutoencoderKL's arguments          <->  VAEConfig        (minidiff/vae.py)
    transformers  text_encoder/config.json  CLIPTextConfig (or a CLIPConfig)   <->  CLIPTextConfig   (minidiff/clip.py)
    transformers  CLIPVisionConfig          (or a CLIPConfig's vision half)    <->  CLIPImageConfig  (minidiff/clip.py)

Reading is strict: minidiff builds SD v1's architecture, so a key asking for another one (SD 2.x's linear
projections, SDXL's added embeddings, other block types, ...) is a ValueError that names it, never silently dropped.
A key a config leaves out means what the other library would build without it (its default), not SD's value.

The dataclasses are the architecture: what minidiff builds, with defaults that are SD v1's. They keep the public
names — `UNetConfig.from_diffusers(d)`, `cfg.to_diffusers()`, `CLIPTextConfig.from_transformers(d)`, ... — as
one-line delegations to the functions here, which are given the class to build (`cls`) instead of importing it: this
module imports no model, so the model files call it without an import running upwards or in a circle
(tests/test_imports.py).
"""
from __future__ import annotations

import dataclasses


# --------------------------------------------------------------------------------------------------- U-Net
def _same(v):
    """An int, or a list of one value per level that is the same everywhere (else None)."""
    return v if isinstance(v, int) else (v[0] if isinstance(v, (list, tuple)) and len(set(v)) == 1 else None)


def _off(v) -> bool:
    """A feature left switched off."""
    return v in (None, False)


def unet_from_diffusers(cls, d: dict):
    """A diffusers `unet/config.json` dict (or a UNet2DConditionModel's `.config`) -> cls (UNetConfig).

    Only SD v1's architecture is built; anything else (SD 2.x's linear projections and per-level heads, SDXL's added
    embeddings, class embeddings, ...) raises ValueError naming every offending key."""
    d = dict(d)
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"_class_name={d['_class_name']!r}: only UNet2DConditionModel is supported")
    bad, seen = [], set()

    def check(key, ok, why):
        seen.add(key)
        if key in d and not ok(d[key]):
            bad.append(f"{key}={d[key]!r} ({why})")

    # SD 2.x
    check("use_linear_projection", _off, "SD 2.x linear proj_in/proj_out not supported")
    check("attention_head_dim", lambda v: _same(v) is not None, "SD 2.x per-level head counts not supported")
    check("upcast_attention", _off, "SD 2.x fp32-upcast attention not supported")
    check("num_attention_heads", _off, "SD v1 gives the number of heads as attention_head_dim")
    # SDXL and other extra conditioning
    check("transformer_layers_per_block", lambda v: _same(v) is not None,
          "SDXL-style per-level transformer depths not supported")
    check("reverse_transformer_layers_per_block", _off, "asymmetric U-Nets not supported")
    for k in ("addition_embed_type", "addition_time_embed_dim", "class_embed_type", "num_class_embeds",
              "projection_class_embeddings_input_dim", "class_embeddings_concat", "encoder_hid_dim",
              "encoder_hid_dim_type"):
        check(k, _off, "extra conditioning (SDXL, unCLIP, ...) not supported")
    check("addition_embed_type_num_heads", lambda v: True, "")  # only used with addition_embed_type
    # attention variants
    check("only_cross_attention", lambda v: not any(v) if isinstance(v, (list, tuple)) else not v,
          "attn1 must be self-attention")
    check("mid_block_only_cross_attention", _off, "attn1 must be self-attention")
    check("dual_cross_attention", _off, "not supported")
    check("cross_attention_norm", _off, "not supported")
    check("attention_type", lambda v: v == "default", "no GLIGEN")
    check("cross_attention_dim", lambda v: _same(v) is not None, "one text width for all levels")
    # everything else SD v1 fixes
    check("act_fn", lambda v: v == "silu", "only SiLU")
    check("center_input_sample", _off, "input centring not supported")
    check("time_embedding_type", lambda v: v == "positional", "only the sinusoidal timestep embedding")
    check("time_embedding_dim", lambda v: v in (None, 4 * list(d.get("block_out_channels", [320]))[0]),
          "only 4 x block_out_channels[0]")
    for k in ("time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim"):
        check(k, _off, "no extra timestep-embedding layers")
    check("mid_block_type", lambda v: v == "UNetMidBlock2DCrossAttn", "only UNetMidBlock2DCrossAttn")
    check("downsample_padding", lambda v: v == 1, "only SD's padding 1")
    check("mid_block_scale_factor", lambda v: v == 1, "only 1")
    check("resnet_time_scale_shift", lambda v: v == "default", "only an added timestep embedding")
    check("resnet_skip_time_act", _off, "not supported")
    check("resnet_out_scale_factor", lambda v: v == 1, "only 1")
    check("dropout", lambda v: v == 0, "no dropout layers here")
    check("conv_in_kernel", lambda v: v == 3, "only 3x3")
    check("conv_out_kernel", lambda v: v == 3, "only 3x3")
    check("norm_num_groups", lambda v: isinstance(v, int), "GroupNorm required")
    check("layers_per_block", lambda v: _same(v) is not None, "the same count on every level")
    check("sample_size", lambda v: v is None or isinstance(v, int), "a single int")
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    check("down_block_types", lambda v: all(b in kinds for b in v), "only CrossAttnDownBlock2D / DownBlock2D")
    cross = tuple(kinds.get(b, False) for b in down)
    mirror = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)]
    check("up_block_types", lambda v: list(v) == mirror, f"must mirror down_block_types: {mirror}")
    seen |= {"in_channels", "out_channels", "block_out_channels", "norm_eps", "flip_sin_to_cos", "freq_shift"}
    bad += [f"{k}={d[k]!r} (unknown key)" for k in d if k not in seen and not k.startswith("_") and d[k] is not None]
    if bad:
        raise ValueError("unsupported U-Net config (minidiff builds SD v1's architecture only): " + "; ".join(bad))

    # NB diffusers' SD v1 config calls the number of heads `attention_head_dim` (diffusers issue #2011)
    return cls(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
               block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
               layers_per_block=_same(d.get("layers_per_block", 2)),
               cross_attention=cross, heads=_same(d.get("attention_head_dim", 8)),
               cross_attention_dim=_same(d.get("cross_attention_dim", 1280)),  # diffusers' default is 1280
               norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
               flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
               sample_size=d.get("sample_size"), transformer_layers=_same(d.get("transformer_layers_per_block", 1)))


def unet_to_diffusers(config) -> dict:
    """A UNetConfig -> the config.json dict of the same model; diffusers' UNet2DConditionModel(**d) builds it."""
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": config.heads,
            "block_out_channels": list(config.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": config.cross_attention_dim,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention],
            "downsample_padding": 1, "flip_sin_to_cos": config.flip_sin_to_cos, "freq_shift": config.freq_shift,
            "in_channels": config.in_channels, "layers_per_block": config.layers_per_block,
            "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": config.norm_eps,
            "norm_num_groups": config.norm_num_groups, "out_channels": config.out_channels,
            "sample_size": config.sample_size, "transformer_layers_per_block": config.transformer_layers,
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention)],
            "use_linear_projection": False, "upcast_attention": False}


# --------------------------------------------------------------------------------------------------- VAE
# What a diffusers config may say but this architecture has one way of doing (key -> the only value allowed).
# Per-level block types are checked separately (a list of one name, as long as block_out_channels).
VAE_FIXED = {"act_fn": "silu", "mid_block_add_attention": True,
             "shift_factor": None, "latents_mean": None, "latents_std": None}  # SD3/Flux-style latent shifts: no
VAE_IGNORED = {"force_upcast"}  # a dtype policy for pipelines, not part of the network
# diffusers' own defaults where they differ from SD's: a key missing from a config means what diffusers would build
VAE_DIFFUSERS_DEFAULTS = {"block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}
VAE_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


def vae_from_diffusers(cls, d: dict):
    """A diffusers `vae/config.json` dict (or `AutoencoderKL.config`) -> cls (VAEConfig), whose fields are
    AutoencoderKL's arguments of the same names. Raises ValueError naming the key for anything minidiff does not
    build."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(VAE_DIFFUSERS_DEFAULTS)
    for key, value in d.items():
        if key.startswith("_") or key in VAE_IGNORED:  # _class_name, _diffusers_version, _use_default_values
            continue
        if key in fields:
            kwargs[key] = value
        elif key in VAE_FIXED:
            if value != VAE_FIXED[key]:
                raise ValueError(f"VAE config: unsupported {key}={value!r} (minidiff supports {VAE_FIXED[key]!r})")
        elif key not in VAE_BLOCKS:
            raise ValueError(f"VAE config: unknown key {key!r}")
    config = cls(**kwargs)
    levels = len(config.block_out_channels)
    for key, name in VAE_BLOCKS.items():
        types = list(d.get(key, [name] * levels))
        if any(t != name for t in types):
            raise ValueError(f"VAE config: unsupported {key}={types!r} (minidiff builds {name} only)")
        if len(types) != levels:
            raise ValueError(f"VAE config: {key} has {len(types)} entries but block_out_channels has {levels}")
    return config


def vae_to_diffusers(config) -> dict:
    """A VAEConfig -> a dict diffusers' `AutoencoderKL(**d)` / `AutoencoderKL.from_config(d)` accepts (what
    config.json holds)."""
    d = dataclasses.asdict(config)
    levels = len(config.block_out_channels)
    d["block_out_channels"] = list(config.block_out_channels)
    if isinstance(config.sample_size, tuple):
        d["sample_size"] = list(config.sample_size)
    return {"_class_name": "AutoencoderKL", **d, **VAE_FIXED,
            **{key: [name] * levels for key, name in VAE_BLOCKS.items()}, "force_upcast": True}


# --------------------------------------------------------------------------------------------------- CLIP
# transformers' names for each tower: (model_type, architecture, the key of its config inside a whole CLIPConfig)
CLIP_TOWERS = {"text": ("clip_text_model", "CLIPTextModel", "text_config"),
               "image": ("clip_vision_model", "CLIPVisionModel", "vision_config")}


def clip_from_transformers(cls, d: dict, tower: str):
    """A transformers config dict of one CLIP tower ("text" | "image"), or a whole CLIPConfig's (the tower's part is
    taken) -> cls (CLIPTextConfig | CLIPImageConfig), whose fields are transformers' names; other keys are ignored."""
    sub_config = CLIP_TOWERS[tower][2]
    if d.get("model_type") == "clip" and sub_config in d:  # a whole CLIPModel config: take our tower
        d = d[sub_config]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def clip_to_transformers(config, tower: str) -> dict:
    """A CLIPTextConfig / CLIPImageConfig -> the config.json dict transformers' CLIPTextConfig / CLIPVisionConfig
    reads."""
    model_type, architecture, _ = CLIP_TOWERS[tower]
    return {**dataclasses.asdict(config), "architectures": [architecture], "model_type": model_type}


__all__ = ["unet_from_diffusers", "unet_to_diffusers", "vae_from_diffusers", "vae_to_diffusers",
           "clip_from_transformers", "clip_to_transformers", "CLIP_TOWERS", "VAE_FIXED"]
