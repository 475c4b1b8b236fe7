"""The models a server was started with (`--model PATH ...`; none: the embedded model), as AUTOMATIC1111 lists
checkpoints: a title "name [short hash]", a model name, a SHA-256. A request can switch only among these — a name,
title, short hash or the path exactly as given on the command line — never load a path it sends.

One model is loaded at a time (SD v1 weighs 2-4 GB); switching loads the next one in the worker thread, between jobs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import DEFAULT_MODEL
from ..infotext import model_hash

@dataclass
class Checkpoint:
    """One model the server may use. path: what --model gave (None: the embedded model)."""
    path: str | None
    filename: str                       # absolute path of the file or folder
    name: str                           # file name with extension, or folder name (AUTOMATIC1111's "name")
    model_name: str                     # without the extension
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """SHA-256 of the file (AUTOMATIC1111's "sha256"); for a diffusers folder, of its config and weight files'
        relative paths and bytes, in sorted order. Computed once, on first use."""
        if self._sha256 is None:
            self._sha256 = model_hash(self.filename)
        return self._sha256

    @property
    def short_hash(self) -> str:       # AUTOMATIC1111's "Model hash" / shorthash: the first 10 hex digits
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]"

    def names(self) -> set[str]:
        """Every string that selects this model (AUTOMATIC1111's checkpoint aliases, and the --model argument)."""
        return {self.title, self.name, self.model_name, self.short_hash, self.sha256, self.filename,
                *([self.path] if self.path else [])}

    def item(self) -> dict:
        """An entry of GET /sdapi/v1/sd-models."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": self.filename, "config": None}


def checkpoint(path: str | None) -> Checkpoint:
    p = Path(path).resolve() if path is not None else Path(DEFAULT_MODEL).resolve()
    name = p.name
    stem = p.stem if p.is_file() else p.name
    return Checkpoint(path=path, filename=str(p), name=name, model_name=stem)


class Registry:
    """The checkpoints, the one loaded StableDiffusion, and the embeddings loaded into it."""

    def __init__(self, paths=(), embeddings=(), device="cpu", dtype=torch.float32, loader=None):
        self.checkpoints = [checkpoint(p) for p in (paths or [None])]
        for c in self.checkpoints:
            if not Path(c.filename).exists():
                raise FileNotFoundError(f"--model {c.path}: no such file or folder")
        self.embedding_paths = list(embeddings)
        self.device, self.dtype = device, dtype
        self.current = self.checkpoints[0]          # what sd_model_checkpoint says
        self._loaded: tuple[Checkpoint, object] | None = None
        self.embeddings: dict = {"loaded": {}, "skipped": {}}
        self._lock = threading.Lock()
        self._loader = loader

    def find(self, name: str) -> Checkpoint | None:
        """The checkpoint `name` selects (title, name, model name, short hash, sha256, or the --model path)."""
        for c in self.checkpoints:
            if name in c.names():
                return c
        for c in self.checkpoints:                  # AUTOMATIC1111 also takes a title without its " [hash]"
            if name.split(" [")[0] in (c.name, c.model_name):
                return c
        return None

    def loaded(self) -> tuple[Checkpoint, object] | None:
        return self._loaded

    def pipe(self, ckpt: Checkpoint | None = None):
        """The StableDiffusion of `ckpt` (default: the current one), loading it (and dropping the other) if needed."""
        ckpt = ckpt or self.current
        with self._lock:
            if self._loaded is not None and self._loaded[0] is ckpt:
                return self._loaded[1]
            self._loaded = None                        # free the old model's memory before loading the next
            load = self._loader
            if load is None:
                import minidiff
                load = minidiff.load
            pipe = load(ckpt.path, device=self.device, dtype=self.dtype)
            self.embeddings = self._load_embeddings(pipe)
            self._loaded = (ckpt, pipe)
            return pipe

    def _load_embeddings(self, pipe) -> dict:
        """AUTOMATIC1111's GET /sdapi/v1/embeddings shape: {"loaded": {name: item}, "skipped": {name: item}}."""
        from ..formats.embeddings import read_embedding
        out = {"loaded": {}, "skipped": {}}
        for path in self.embedding_paths:
            token, vectors = read_embedding(path)
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": int(vectors.shape[1]), "vectors": int(vectors.shape[0])}
            try:
                pipe.load_embedding(path)
                out["loaded"][token] = item
            except ValueError:                           # another model's width, or a token already taken
                out["skipped"][token] = item
        return out
