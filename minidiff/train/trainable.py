"""Training, step 3 — what trains. Everything is frozen, then one of four things is unfrozen (or added):

  unet             every U-Net weight (the most capacity; the whole 3.4 GB U-Net is the result)
  last-up-blocks   the last N up-blocks of the U-Net, nearest the pixels (style and texture, less forgetting)
  lora             low-rank adapters (minidiff.lora; Hu et al. 2021) where a LyCORIS preset puts them: the attention
                   projections (attn-only), + the transformers' MLP and proj_in/out (attn-mlp), + the ResNet and
                   sampling convolutions (full, LoCon); with lora_text_encoder also on the text encoder's
                   attention (and MLP, but for attn-only)
  lcm-lora         latent consistency distillation into a LoRA (consistency.py): LoRA where LCM-LoRA puts it,
                   on every layer of the U-Net's transformers, its ResNets (convolutions, time_emb_proj) and its
                   down/up-samplers (LCM_LORA_TARGETS; --lora-preset is --train lora's)
  textual-inversion  one new word (Gal et al. 2022): a placeholder token "<pika>" is added to the vocabulary and
                   only its embedding row(s) e* ∈ R^{n×d} train; the U-Net, VAE and every other weight of the text
                   encoder stay bit-identical. The concept must then be reachable by the frozen model from one (or n)
                   vectors in the text encoder's input space:  e* = argmin_e E‖ε − ε_θ(z_t, t, τ_θ(y; e))‖²

The trained tensors come back as {name: Parameter}: U-Net names as in unet.named_parameters(), text-encoder ones
prefixed "text_encoder.". They are what a checkpoint saves and what the optimizer updates.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import InputValueError
from ..formats.embeddings import token_names
from ..lora import UNET_RESNET_TARGETS, UNET_TARGETS

TRAIN_MODES = ("unet", "last-up-blocks", "lora", "textual-inversion", "lcm-lora")

# The layers LCM-LoRA trains (diffusers' train_lcm_distill_lora_sd_wds.py's default targets, the modules of the public
# lcm-lora-sdv1-5): the transformers' attention, feed-forward and proj_in/out, the ResNets' convolutions, shortcuts
# and time_emb_proj, the down/up-samplers — LyCORIS' "full" preset without conv_in / conv_out and the time embedding.
LCM_LORA_TARGETS = UNET_TARGETS + UNET_RESNET_TARGETS


class PlaceholderEmbedding(nn.Module):
    """The token table with a few new rows that train: ids [B, L] -> [B, L, d].

    base: the frozen nn.Embedding [V, d] (never changed, so every old token's vector stays bit-identical);
    learned: Parameter [n, d], the vectors of the new ids `ids` (>= V: ids the tokenizer gave the placeholder)."""

    def __init__(self, base: nn.Embedding, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.ids = [int(i) for i in ids]
        self.learned = nn.Parameter(init.detach().clone().float().reshape(len(ids), -1))   # [n, d]

    def forward(self, ids):
        V = self.base.num_embeddings
        out = self.base(ids.clamp(max=V - 1))                                   # [B, L, d]; new ids are patched below
        for j, tid in enumerate(self.ids):
            out = torch.where((ids == tid)[..., None], self.learned[j].to(out.dtype), out)
        return out


def add_placeholder(pipe, token: str, initializer: str, num_vectors: int = 1) -> PlaceholderEmbedding:
    """Add `token` (n vectors) to pipe's tokenizer and wrap the text encoder's token table in a PlaceholderEmbedding
    whose new rows start at the initializer word's vector. Raises ValueError for a token already in the vocabulary
    or an initializer that is not exactly one token."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    init_ids = tok.encode(initializer)[1:-1]                                  # drop <bos>, <eos>
    if len(init_ids) != 1:
        raise InputValueError(f"--initializer-token must be one token of the vocabulary; {initializer!r} is "
                              f"{len(init_ids)} tokens {tok.convert_ids_to_tokens(init_ids)}: pick a single word",
                              field="initializer_token")
    names = token_names(token, num_vectors)              # diffusers' names: "<pika>", "<pika>_1", ...
    original = copy.deepcopy(tok)                        # the tokenizer the exported model keeps (without the word)
    try:
        ids = tok.add_tokens(names)
    except ValueError as e:
        raise InputValueError(f"--placeholder-token {token!r}: {e}", field="placeholder_token") from None
    base = te.embeddings.token_embedding
    init = base.weight[init_ids[0]].detach()[None].expand(num_vectors, -1)   # [n, d]
    layer = PlaceholderEmbedding(base, ids, init)
    layer.original_tokenizer = original
    te.embeddings.token_embedding = layer
    return layer


def remove_placeholder(pipe) -> torch.Tensor | None:
    """Put the original token table and tokenizer back; -> the learned vectors [n, d] (None if there were none)."""
    layer = pipe.text_encoder.embeddings.token_embedding
    if not isinstance(layer, PlaceholderEmbedding):
        return None
    pipe.text_encoder.embeddings.token_embedding = layer.base
    pipe.tokenizer = layer.original_tokenizer
    return layer.learned.detach().clone()


def select_trainable(pipe, cfg) -> dict:
    """Freeze the whole model, then unfreeze (or add) what this run trains. -> {name: Parameter}."""
    unet, te = pipe.unet, pipe.text_encoder
    for part in (unet, te, pipe.vae):
        part.requires_grad_(False)
    if cfg.train == "unet":
        unet.requires_grad_(True)
    elif cfg.train == "last-up-blocks":
        n = len(unet.up_blocks)
        if not 1 <= cfg.up_blocks <= n:
            raise InputValueError(f"--up-blocks must be in 1..{n} (this U-Net has {n} up-blocks), got "
                                  f"{cfg.up_blocks}", field="up_blocks")
        for block in unet.up_blocks[n - cfg.up_blocks:]:   # the blocks nearest the output
            block.requires_grad_(True)
    elif cfg.train == "lora":
        from ..lora import LORA_PRESETS, inject_lora
        preset = LORA_PRESETS[cfg.lora_preset]             # where LoRA goes (LyCORIS' presets, minidiff/lora.py)
        inject_lora(unet, cfg.lora_rank, cfg.lora_alpha, preset.unet, cfg.lora_conv_rank, cfg.lora_conv_alpha)
        if cfg.lora_text_encoder:                        # CLIP's projections too (attn-only: attention; else + MLP)
            inject_lora(te, cfg.lora_rank, cfg.lora_alpha, targets=preset.text_encoder)
    elif cfg.train == "textual-inversion":
        add_placeholder(pipe, cfg.placeholder_token, cfg.initializer_token, cfg.num_vectors)
    elif cfg.train == "lcm-lora":
        from ..lora import inject_lora
        inject_lora(unet, cfg.lora_rank, cfg.lora_alpha, targets=LCM_LORA_TARGETS)
    else:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {cfg.train!r}")
    out = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    out.update({f"text_encoder.{name}": p for name, p in te.named_parameters() if p.requires_grad})
    return out


def text_encoder_trains(trainable: dict) -> bool:
    return any(name.startswith("text_encoder.") for name in trainable)


__all__ = ["TRAIN_MODES", "LCM_LORA_TARGETS", "PlaceholderEmbedding", "add_placeholder",
           "remove_placeholder", "select_trainable", "text_encoder_trains"]
