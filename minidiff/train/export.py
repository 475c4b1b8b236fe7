"""Training, step 8 — export: the result as files other tools read.

  OUT/                     a diffusers model folder (minidiff.load, diffusers' StableDiffusionPipeline)
  OUT/lora.safetensors     --train lora --lora-export separate: the LoRA (the U-Net's, and the text encoder's with
                           --lora-text-encoder) in the diffusers/PEFT layout (load_lora_weights;
                           minidiff.lora.apply_lora on the base) ...
  OUT/lora_kohya.safetensors   ... and the same in the kohya layout (AUTOMATIC1111, ComfyUI)
  OUT/learned_embeds.safetensors      --train textual-inversion: {token: [d] or [n, d]} (diffusers)
  OUT/<token>.pt, OUT/<token>.safetensors   the same vectors in AUTOMATIC1111's form
  OUT/model.safetensors    --export-compvis: the same model in the CompVis single-file layout

For textual inversion the model folder IS the base model, bit for bit: the new word lives in the embedding files
(`pipe.load_embedding(OUT / "learned_embeds.safetensors")` adds it to any copy of the model).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .trainable import remove_placeholder


def embedding_file_stem(token: str) -> str:
    """A file name for a token: "<pika>" -> "pika" (A1111 names the word after its file)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", token.strip("<>")) or "embedding"
    return stem


def export_embeddings(out, token: str, vectors) -> list[Path]:
    from ..formats.embeddings import save_embedding
    out, stem = Path(out), embedding_file_stem(token)
    flat = vectors[0] if len(vectors) == 1 else vectors                 # diffusers' file: [d] for one vector, [n, d]
    return [save_embedding(out / "learned_embeds.safetensors", token, flat, format="diffusers"),
            save_embedding(out / f"{stem}.pt", token, vectors, format="a1111"),
            save_embedding(out / f"{stem}.safetensors", token, vectors, format="a1111")]


def export_model(pipe, out, placeholder_token: str | None = None, lora_export: str = "merge", base_model=None,
                 export_compvis: bool = False, lora_preset: str | None = None) -> Path:
    """Write the model into OUT as a diffusers folder without touching OUT's logs and checkpoints: saved whole into
    a temporary OUT/.export-*, then each part renamed into place, model_index.json last.

    placeholder_token: textual inversion's word (its vectors go to the embedding files); lora_export "separate" also
    writes OUT/lora.safetensors and OUT/lora_kohya.safetensors (their metadata name base_model and lora_preset) before
    the LoRA is merged; export_compvis: also OUT/model.safetensors."""
    from ..checkpoint import save
    from ..lora import lora_layers, merge_lora, save_lora

    out = Path(out)
    learned = remove_placeholder(pipe)                 # textual inversion: the base token table goes back
    if learned is not None:
        export_embeddings(out, placeholder_token, learned)
    if lora_layers(pipe.unet) or lora_layers(pipe.text_encoder):
        if lora_export == "separate":       # the U-Net's LoRA layers and the text encoder's, if it has any
            note = {"base_model": str(base_model or "embedded"), "preset": lora_preset}
            save_lora(pipe, out / "lora.safetensors", extra_metadata=note)
            save_lora(pipe, out / "lora_kohya.safetensors", format="kohya", extra_metadata=note)
        merge_lora(pipe)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        save(pipe, staging / "model", format="diffusers")
        parts = sorted(p for p in (staging / "model").iterdir() if p.name != "model_index.json")
        for part in [*parts, staging / "model" / "model_index.json"]:
            target = out / part.name
            if target.is_dir():
                old = staging / f"old-{part.name}"
                os.replace(target, old)
            os.replace(part, target)
        if export_compvis:
            save(pipe, out / "model.safetensors", format="compvis")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


__all__ = ["export_model", "export_embeddings", "embedding_file_stem"]
