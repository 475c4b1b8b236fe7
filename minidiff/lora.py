"""Chapter 12.2 — LoRA for the user: put LoRA layers on a model, train them, merge them, save and share them.

The layer itself — h = W₀ x + (α/r) · B A x with a frozen W₀, its notation and its merge — is minidiff/nn/lora.py;
the files (diffusers/PEFT, kohya/A1111, LoCon) are minidiff/formats/lora.py. This module puts them together over
whole models, a network or a StableDiffusion (its U-Net and text encoder):

    lora = inject_lora(pipe.unet, rank=4, alpha=4)     # wraps the attention projections; returns the new layers
    inject_lora(pipe.unet, 8, targets=LORA_PRESETS["full"].unet, conv_rank=4)   # LyCORIS' "full" (LoCon) preset
    ...train the parameters of lora_parameters(pipe.unet)...
    save_lora(pipe, "lora.safetensors")                # only A and B (diffusers/PEFT names; format="kohya" for A1111)
    merge_lora(pipe.unet)                              # W₀ += (α/r) B A, wrappers removed: plain nn.Linear again
    apply_lora(base_pipe, "lora.safetensors", scale=1.0)   # the same on a freshly loaded base model
    load_lora(base_pipe, "lora.safetensors"); set_lora_scale(base_pipe, 0.5)   # kept as layers: the strength can move
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .formats import lora as lora_files
from .formats.lora import LORA_NETWORKS, apply_lora, load_lora, read_lora
from .networks import networks
from .nn.lora import LoRAConv2d, LoRALayer, LoRALinear, lora_class, lora_layers, unwrap_layer, wrap_layer

# Where LoRA goes. A target matches a Linear / Conv2d whose module path is the target or ends with "." + target.
# The U-Net's attention projections (self- and cross-attention), as LoRA's paper does for W_q, W_k, W_v, W_o
# (sec. 4.2): what inject_lora wraps when it is given no targets.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FF_TARGETS = ("ff.net.0.proj", "ff.net.2")             # the transformer blocks' GEGLU MLP
UNET_PROJ_TARGETS = ("proj_in", "proj_out")                 # the spatial transformers' 1×1 convs (LoCon) in SD v1
UNET_TARGETS = TARGETS + UNET_FF_TARGETS + UNET_PROJ_TARGETS   # every layer of the transformers (kohya's default set)
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # ResNets (LoCon)
UNET_RESNET_TARGETS = UNET_CONV_TARGETS + ("time_emb_proj",)  # every layer of the ResNet and down/up-sampling blocks
UNET_EDGE_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")  # LyCORIS' "full"
TEXT_ENCODER_ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")   # CLIP's attention projections
TEXT_ENCODER_TARGETS = TEXT_ENCODER_ATTN_TARGETS + ("fc1", "fc2")          # CLIP: attention and MLP


class LoRAPreset(NamedTuple):
    """Where a preset puts LoRA: module-path endings in the U-Net and in the text encoder (--lora-text-encoder)."""
    unet: tuple
    text_encoder: tuple


# The presets of `minidiff finetune --lora-preset`: LyCORIS' names and meanings (KohakuBlueleaf/LyCORIS,
# lycoris/config.py `PRESET`, which selects diffusers module classes), written as minidiff's module names:
#
#   attn-only  LyCORIS: U-Net "CrossAttention" (diffusers' Attention), text encoder "CLIPAttention"
#              -> to_q, to_k, to_v, to_out.0 of every attn1/attn2;                  CLIP q/k/v/out_proj
#   attn-mlp   LyCORIS: U-Net "Transformer2DModel", text encoder "CLIPAttention", "CLIPMLP"
#              -> + the feed-forward ff.net.0.proj, ff.net.2 and the 1×1 proj_in, proj_out;   CLIP + fc1, fc2
#              (also kohya sd-scripts' networks/lora.py default: UNET_TARGET_REPLACE_MODULE = Transformer2DModel)
#   full       LyCORIS: + "ResnetBlock2D", "Downsample2D", "Upsample2D" (enable_conv) and, by name, conv_in,
#              conv_out, time_embedding.linear_1, time_embedding.linear_2
#              -> + every ResNet's conv1, conv2, conv_shortcut, time_emb_proj, downsamplers.0.conv,
#                 upsamplers.0.conv, and the U-Net's first and last conv and its time-embedding MLP
#              (kohya's conv_dim adds the same ResNet and sampler layers: UNET_TARGET_REPLACE_MODULE_CONV2D_3X3;
#              the public LCM-LoRA for SD v1.5 trains this set without conv_in/conv_out/time_embedding)
#
# Ranks as in kohya and LyCORIS: a Linear or a 1×1 conv takes (rank, alpha); a k×k conv (k > 1: conv1, conv2, the
# samplers, conv_in, conv_out) takes (conv_rank, conv_alpha), by default the same (LyCORIS: conv_dim = network_dim,
# conv_alpha = network_alpha).
LORA_PRESETS = {
    "attn-only": LoRAPreset(unet=TARGETS, text_encoder=TEXT_ENCODER_ATTN_TARGETS),
    "attn-mlp": LoRAPreset(unet=UNET_TARGETS, text_encoder=TEXT_ENCODER_TARGETS),
    "full": LoRAPreset(unet=UNET_TARGETS + UNET_RESNET_TARGETS + UNET_EDGE_TARGETS, text_encoder=TEXT_ENCODER_TARGETS),
}


def _target_paths(model: nn.Module, targets=TARGETS) -> list[str]:
    """The names of the nn.Linear / nn.Conv2d layers whose path ends with one of `targets` (e.g. '...attn2.to_out.0')."""
    return [name for name, m in model.named_modules()
            if lora_class(m) and any(name == t or name.endswith("." + t) for t in targets)]


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=TARGETS,
                conv_rank: int | None = None, conv_alpha: float | None = None) -> dict[str, LoRALayer]:
    """Wrap every target nn.Linear / nn.Conv2d of `model` in a LoRA layer (in place) and freeze everything else.

    targets: TARGETS (the U-Net's attention, default), UNET_TARGETS (+ feed-forward and proj_in/proj_out),
    LORA_PRESETS[name].unet / .text_encoder, TEXT_ENCODER_TARGETS (for pipe.text_encoder), UNET_CONV_TARGETS, or any
    tuple of module-path endings. rank, alpha: of every Linear and 1×1 conv; conv_rank, conv_alpha: of the k×k convs
    (k > 1), None = rank, alpha (kohya's conv_dim / conv_alpha). alpha None: α = the layer's rank (α/r = 1).
    Returns {module path: layer}. The model's output is unchanged until B moves away from zero. Note the
    state_dict keys change while wrapped ('to_q.weight' -> 'to_q.base.weight'): merge_lora() undoes that."""
    paths = _target_paths(model, targets)
    if not paths:
        raise ValueError(f"no nn.Linear or nn.Conv2d named {targets} in {type(model).__name__}: "
                         f"nothing to put LoRA on")
    model.requires_grad_(False)
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    out = {}
    for path in paths:
        spatial = getattr(model.get_submodule(path), "kernel_size", (1, 1)) != (1, 1)   # a k×k conv, k > 1
        out[path] = wrap_layer(model, path, conv_rank if spatial else rank, conv_alpha if spatial else alpha)
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors: every A and B (nothing else)."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def set_lora_scale(model, scale: float):
    """Every LoRA layer of `model` (a network or a StableDiffusion) at strength `scale` (merged layers are
    re-merged). Returns model."""
    for net in networks(model, LORA_NETWORKS).values():
        for m in lora_layers(net).values():
            m.set_scale(scale)
    return model


@torch.no_grad()
def merge_lora(model, unload: bool = True):
    """Fold every LoRA layer of `model` (a network or a StableDiffusion) into its base layer, W₀ ← W₀ + ΔW (in place).

    unload=True (default): put the plain nn.Linear / nn.Conv2d back — the model has its original state_dict keys and
    no LoRA cost at inference, and the LoRA is gone. unload=False: keep the wrappers (merged), so unmerge_lora can
    take ΔW out again and set_lora_scale can change it."""
    for net in networks(model, LORA_NETWORKS).values():
        for path, m in lora_layers(net).items():
            m.merge()
            if unload:
                unwrap_layer(net, path)
    return model


@torch.no_grad()
def unmerge_lora(model):
    """Take ΔW out of every merged (still wrapped) LoRA layer: W₀ ← W₀ − ΔW. Returns model."""
    for net in networks(model, LORA_NETWORKS).values():
        for m in lora_layers(net).values():
            m.unmerge()
    return model


# ---------------------------------------------------------------------------------------------- files
# apply_lora, load_lora and read_lora are minidiff/formats/lora.py's own (imported above).
def save_lora(model, path, format: str = "diffusers", extra_metadata: dict | None = None):
    """Write the LoRA layers `model` carries (a StableDiffusion: U-Net and text encoder; a U-Net: its own) to one
    .safetensors file. format: "diffusers" (PEFT names, what diffusers' load_lora_weights reads) or "kohya"
    (lora_unet_… / lora_te_…, what AUTOMATIC1111 and ComfyUI read). `save_lora(unet, path, {"k": "v"})` (metadata
    as third argument) is the older call and still works. Returns the path."""
    if isinstance(format, dict):   # save_lora(unet, path, extra_metadata): minidiff finetune's first call
        format, extra_metadata = "diffusers", format
    return lora_files.save_lora(model, path, format=format, extra_metadata=extra_metadata)


__all__ = ["TARGETS", "UNET_FF_TARGETS", "UNET_PROJ_TARGETS", "UNET_TARGETS", "UNET_CONV_TARGETS",
           "UNET_RESNET_TARGETS", "UNET_EDGE_TARGETS", "TEXT_ENCODER_ATTN_TARGETS", "TEXT_ENCODER_TARGETS",
           "LoRAPreset", "LORA_PRESETS", "LORA_NETWORKS", "LoRALayer", "LoRALinear", "LoRAConv2d",
           "inject_lora", "wrap_layer", "unwrap_layer", "lora_layers", "lora_parameters", "set_lora_scale",
           "save_lora", "merge_lora", "unmerge_lora", "read_lora", "apply_lora", "load_lora"]
