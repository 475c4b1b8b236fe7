"""How the published checkpoint layouts name minidiff's parameters: one short set of rules per layout.

minidiff's own parameter names are today's diffusers / transformers names (`down_blocks.0.resnets.1.conv1.weight`).
Each function here takes one of *our* names and returns the name(s) the same tensor has in a given layout; the first
name is the one `save` writes, the others are older spellings `load` also accepts. Going in this one direction
(ours -> theirs) keeps each layout a handful of rules: the loader builds the reverse table from the model's own
state_dict, so every key of every file is checked, and nothing here needs to be inverted by hand.

Layouts:
  diffusers folder  unet/, vae/, text_encoder/ — today's names, or the 2022 release's
                    (VAE attention `query/key/value/proj_attn`; text keys under `text_model.`)
  CompVis file      one state_dict: `model.diffusion_model.*` (LDM's U-Net names), `first_stage_model.*` (the VAE, attention
                    as 1x1 convs), `cond_stage_model.transformer.text_model.*` (CLIP, transformers' names)
"""
from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------- diffusers folders
_VAE_ATTN_2022 = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def diffusers_unet(key: str) -> list[str]:
    return [key]


def diffusers_vae(key: str) -> list[str]:
    m = re.fullmatch(r"(.*mid_block\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)(\..*)", key)
    if m:  # the 2022 release named the mid-block attention like the original LDM code
        return [key, m[1] + _VAE_ATTN_2022[m[2]] + m[3]]
    return [key]


def diffusers_text(key: str) -> list[str]:
    # transformers 5 writes CLIPTextModel without the `text_model.` prefix; the 2022 release has it
    return [key, "text_model." + key]


# ---------------------------------------------------------------------------------------------- CompVis single file
# LDM's ResBlock: in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv]
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(part: str, table: dict) -> str:
    """Rename the leading module name of `part` ("conv1.weight" -> "in_layers.2.weight") by `table`."""
    for ours, theirs in table.items():
        if part.startswith(ours + "."):
            return theirs + part[len(ours):]
    return part


def compvis_unet(key: str, config) -> list[str]:
    """Our U-Net name -> LDM's `model.diffusion_model.*` name.

    LDM keeps the U-Net as two flat lists. input_blocks[0] is conv_in; then each level contributes `layers_per_block`
    entries [ResBlock, SpatialTransformer?] and, except the last level, one [Downsample]. output_blocks hold
    `layers_per_block + 1` entries per level, deepest first, each [ResBlock, SpatialTransformer?, Upsample?].
    """
    L = config.layers_per_block
    up_has_attn = list(reversed(config.cross_attention))
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    name = None
    for ours, theirs in fixed.items():
        if key.startswith(ours + "."):
            name = theirs + key[len(ours):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        name = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{_rename(m[3], _LDM_RESNET)}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        name = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        name = f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.*)", key):
        name = f"middle_block.{2 * int(m[1])}.{_rename(m[2], _LDM_RESNET)}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        name = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        name = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{_rename(m[3], _LDM_RESNET)}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        name = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])  # the Upsample follows the level's last ResBlock (and its transformer, if the level has one)
        name = f"output_blocks.{i * (L + 1) + L}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
    if name is None:
        raise KeyError(f"no CompVis name for U-Net parameter {key!r}")
    return ["model.diffusion_model." + name]


def compvis_unet_ema(key: str, config) -> list[str]:
    """LitEma stores a copy of every U-Net weight as `model_ema.<name without dots>`."""
    name = compvis_unet(key, config)[0][len("model."):]
    return ["model_ema." + name.replace(".", "")]


def compvis_vae(key: str, config) -> list[str]:
    """Our VAE name -> LDM's `first_stage_model.*` name (the decoder's levels are numbered deepest-last there)."""
    n = len(config.block_out_channels)
    name = key
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):
        which = {("resnets", "0"): "block_1", ("resnets", "1"): "block_2", ("attentions", "0"): "attn_1"}[m[2], m[3]]
        rest = _rename(m[4], _VAE_ATTN if m[2] == "attentions" else _VAE_RESNET)
        name = f"{m[1]}.mid.{which}.{rest}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        name = f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        name = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        name = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        name = f"{m[1]}.norm_out.{m[2]}"
    return ["first_stage_model." + name]


def compvis_text(key: str, config=None) -> list[str]:
    return ["cond_stage_model.transformer.text_model." + key, "cond_stage_model.transformer." + key]


def is_compvis_vae_attention(key: str) -> bool:
    """LDM's VAE attention projections are 1x1 convolutions: weight [C, C, 1, 1] where ours is a Linear [C, C]."""
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key))


# Buffers and counters in CompVis files that are not model weights: the training noise schedule (recomputed from the
# scheduler config), LitEma's bookkeeping, CLIP's position_ids (a constant arange) and LDM's learned-logvar stub.
COMPVIS_SKIP = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|"
    r"model_ema\.decay|model_ema\.num_updates|.*position_ids)$")
DIFFUSERS_SKIP = re.compile(r"^(.*position_ids)$")
