"""The networks a text-to-image model is made of, by the names every layout gives them.

A StableDiffusion (minidiff/pipeline.py) holds its text encoder, U-Net and VAE as `.text_encoder`, `.unet`, `.vae`;
a diffusers folder has them as text_encoder/, unet/, vae/, and LoRA files prefix their keys "unet." and
"text_encoder.". The functions that take "a model" (LoRA: minidiff/lora.py, minidiff/formats/lora.py; speed:
minidiff/speed.py) take a whole pipe or one network alone; `networks` gives them both in one shape.

    networks(pipe)                          {"text_encoder": ..., "unet": ..., "vae": ...}
    networks(pipe, ("unet", "text_encoder"))  the two a LoRA changes, in that order
    networks(pipe.unet)                     {"unet": pipe.unet}
"""
from __future__ import annotations

from torch import nn

from .clip import CLIPTextTransformer
from .unet import UNet
from .vae import AutoencoderKL

NAMES = ("text_encoder", "unet", "vae")    # the order a pipe runs them in
_BY_CLASS = {CLIPTextTransformer: "text_encoder", UNet: "unet", AutoencoderKL: "vae"}


def network_name(net: nn.Module) -> str:
    """"text_encoder", "unet" or "vae" by the network's class; any other network counts as a U-Net (the part a
    LoRA changes when nothing says otherwise)."""
    return next((name for cls, name in _BY_CLASS.items() if isinstance(net, cls)), "unet")


def networks(model, names=NAMES) -> dict[str, nn.Module]:
    """{name: network} for those of `names` that `model` (a StableDiffusion, or anything with these attributes)
    has, in the order of `names`; a lone network (an nn.Module) is returned as itself: {network_name(model): model}."""
    if isinstance(model, nn.Module):
        return {network_name(model): model}
    return {name: getattr(model, name) for name in names if getattr(model, name, None) is not None}


__all__ = ["NAMES", "network_name", "networks"]
