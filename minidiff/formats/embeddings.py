"""Textual-inversion embeddings (Gal et al. 2022): a new word's vector(s) for the text encoder's token table.

The files SD v1 users share hold one tensor [d] or [n, d] (d = 768 for SD v1; n vectors for one word) and a name:

  diffusers   learned_embeds.safetensors / learned_embeds.bin     {"<cat-toy>": [768] or [n, 768]}
  A1111 .pt   a pickle {"string_to_param": {"*": [n, 768]}, "name": "cat-toy", "string_to_token": {"*": 265},
              "step": ..., "sd_checkpoint": ..., "sd_checkpoint_name": ...}
  A1111 / kohya .safetensors   {"emb_params": [n, 768]}; the word is the file's name (A1111 names every embedding
              after its file)

Loading one (StableDiffusion.load_embedding) adds its word to the tokenizer and its vectors to the text encoder, the way
diffusers' load_textual_inversion does: a word of n vectors becomes the n tokens `tok, tok_1, ..., tok_{n-1}`, and the
prompt (and negative prompt) are rewritten by plain string replacement, "a tok" -> "a tok tok_1 ... tok_{n-1}"
(CLIPTokenizer.expand_multi_vector). `token=` overrides the stored name; a name already in the vocabulary is an error.
Files are read by minidiff/formats/weights.py: pickles with torch's weights-only unpickler, which runs no code.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_write
from .weights import PICKLE_SUFFIXES, UNREADABLE, CheckpointError, read_state_dict, unpickle

FORMATS = ("diffusers", "a1111")


class EmbeddingError(ValueError):
    """A file that is not a textual-inversion embedding minidiff can read; the message names the file."""


def _read(path: Path):
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return read_state_dict(path)[0]
        except CheckpointError as e:
            raise EmbeddingError(str(e)) from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise EmbeddingError(f"{path}: unknown embedding file type {path.suffix!r} "
                             f"(expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)})")
    try:   # not read_state_dict: an A1111 .pt holds a name, a step and a dict of tensors, not a state_dict
        return unpickle(path)
    except pickle.UnpicklingError as e:
        raise EmbeddingError(
            f"{path}: the pickle holds more than tensors, dicts, strings and numbers, so it is not loaded (unpickling "
            f"it could run code; the original textual-inversion code saved an nn.ParameterDict). Re-save it as "
            f"{{'<token>': tensor}} in a trusted Python session. Detail: {str(e).splitlines()[0]}") from None
    except UNREADABLE as e:
        raise EmbeddingError(f"{path}: not a readable embedding file (truncated or corrupt?): {e}") from None


def read_embedding(path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """An embedding file -> (token, vectors [n, d] float32). token: overrides the name stored in the file."""
    path = Path(path)
    data = _read(path)
    name = None
    if isinstance(data, torch.Tensor):                                    # a bare tensor: the caller names it
        vectors = data
    elif isinstance(data, dict) and "string_to_param" in data:            # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: A1111 embedding whose string_to_param is not one tensor: {params!r:.200}")
        vectors = next(iter(params.values()))
        name = data.get("name")                                           # (diffusers' choice; A1111 uses the file name)
    elif isinstance(data, dict) and {"clip_l", "clip_g"} <= set(data):
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l and clip_g); minidiff loads SD v1 embeddings")
    elif isinstance(data, dict) and len(data) == 1:
        (key, vectors), = data.items()
        name = path.stem if key == "emb_params" else key                  # A1111/kohya .safetensors | diffusers
    else:
        keys = list(data)[:5] if isinstance(data, dict) else type(data).__name__
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected one tensor {{'<token>': [n, d]}}, "
                             f"A1111's 'string_to_param' or 'emb_params'; found {keys})")
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise EmbeddingError(f"{path}: the embedding must be a tensor [d] or [n, d], got {shape}")
    token = token or name
    if not token:
        raise EmbeddingError(f"{path}: the file names no token; pass token='<name>'")
    return token, vectors.detach().reshape(-1, vectors.shape[-1]).float()   # [n, d]


def token_names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding, as diffusers names them: tok, tok_1, ..., tok_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


@torch.no_grad()
def load_embedding(pipe, path, token: str | None = None) -> list[str]:
    """Add a textual-inversion embedding to a StableDiffusion: its tokens to pipe.tokenizer, its vectors as new rows
    of pipe.text_encoder's token embedding (at the same ids). Returns the tokens added."""
    token, vectors = read_embedding(path, token)
    d = pipe.text_encoder.embeddings.token_embedding.embedding_dim
    if vectors.shape[1] != d:
        raise EmbeddingError(f"{path}: vectors of width {vectors.shape[1]}, this text encoder's are {d} wide "
                             f"(an embedding for another model: SD v1 is 768, SD 2 1024)")
    rows = pipe.text_encoder.embeddings.token_embedding.num_embeddings
    if pipe.tokenizer.vocab_size != rows:
        raise EmbeddingError(f"the tokenizer has {pipe.tokenizer.vocab_size} tokens but the text encoder "
                             f"{rows} embedding rows; they must agree to add a token")
    names = token_names(token, len(vectors))
    ids = pipe.tokenizer.add_tokens(names)   # ValueError if a name is already a token, before anything changes
    assert ids == list(range(rows, rows + len(names))), ids
    pipe.text_encoder.add_token_embeddings(vectors)
    return names


def save_embedding(path, token: str, vectors: torch.Tensor, format: str = "diffusers") -> Path:
    """Write an embedding other tools read. vectors: [d] or [n, d].

    format="diffusers": {token: vectors} as .safetensors (learned_embeds.safetensors) or .bin, what diffusers'
    load_textual_inversion reads. format="a1111": a .pt with string_to_param / name, or a .safetensors with
    emb_params (then the file's name is the word A1111 shows: name it "<token>.safetensors").
    Written to a temporary name, then renamed."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    vectors = vectors.detach().cpu().contiguous()
    if vectors.dim() not in (1, 2):
        raise ValueError(f"vectors must be [d] or [n, d], got {tuple(vectors.shape)}")
    matrix = vectors.reshape(-1, vectors.shape[-1])                   # [n, d]
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"{path}: an embedding is written as .safetensors or .pt/.bin")
    if format == "diffusers":
        obj = {token: vectors}
    elif path.suffix == ".safetensors":
        obj = {"emb_params": matrix}
    else:  # the fields AUTOMATIC1111's Embedding.save writes
        obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": matrix}, "name": token, "step": 0,
               "sd_checkpoint": None, "sd_checkpoint_name": None}
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file(obj, str(tmp), metadata={"format": "pt"}))
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
