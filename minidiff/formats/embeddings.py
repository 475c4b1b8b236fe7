"""Textual-inversion embeddings: the learned vectors of a placeholder word, in the two files the world uses.

  diffusers   learned_embeds.safetensors (or .bin)  {"<pika>": [d]} or {"<pika>": [n, d]}
              what diffusers' `pipe.load_textual_inversion(path)` and its textual_inversion.py write and read
  a1111       <token>.pt        {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, d]}, "name": token,
                                 "step": int}                      (AUTOMATIC1111's embeddings/ folder)
              <token>.safetensors  {"emb_params": [n, d]}
d = 768 for SD v1. Reading never unpickles code: a .pt is loaded with torch.load(weights_only=True).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_write

FORMATS = ("diffusers", "a1111")


def save_embedding(path, token: str, vectors: torch.Tensor, format: str = "diffusers", step: int | None = None) -> Path:
    """Write the vectors [n, d] (or [d]) of `token` as `format` (see the module docstring). diffusers' file holds
    [d] for one vector, [n, d] for several; A1111's always [n, d]. The format of .pt / .safetensors follows the
    path's suffix. Written atomically."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    v = vectors.detach().float().cpu().contiguous()
    v2 = v.reshape(-1, v.shape[-1]).contiguous()                        # [n, d]
    if format == "diffusers":
        tensors = {token: v2[0].clone() if v2.shape[0] == 1 else v2}
        if path.suffix == ".safetensors":
            return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file({"emb_params": v2}, str(tmp)))
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v2}, "name": token,
            "step": int(step or 0), "sd_checkpoint": None, "sd_checkpoint_name": None}
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def read_embedding(path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """Any of the files above -> (token, vectors [n, d]). token=None: the file's own (diffusers' key, A1111's name or
    the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embedding file at {path}")
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:                                      # A1111 .pt
        vec = next(iter(data["string_to_param"].values()))
        name = data.get("name") or path.stem
    elif "emb_params" in data:                                         # A1111 .safetensors
        vec, name = data["emb_params"], path.stem
    elif len(data) == 1 and torch.is_tensor(next(iter(data.values()))):   # diffusers {token: tensor}
        name, vec = next(iter(data.items()))
    else:
        raise ValueError(f"{path}: not a textual-inversion embedding (keys {sorted(data)[:5]}); expected diffusers' "
                         "{token: tensor} or A1111's string_to_param / emb_params")
    vec = vec.detach().float()
    return (token or name), vec.reshape(-1, vec.shape[-1])


__all__ = ["FORMATS", "save_embedding", "read_embedding"]
