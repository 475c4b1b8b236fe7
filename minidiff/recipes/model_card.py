"""The tiny model's MODEL_CARD.md: what it was trained on, how, what it scores, what it cost, how to reproduce it —
written from the report dict of minidiff.recipes.tiny.train (also saved as metrics.json beside it).

    write_model_card(out, report)        # -> out/MODEL_CARD.md (atomically)
    text = model_card(report)
"""
from __future__ import annotations

from pathlib import Path

from ..data.shapes import HELD_OUT, caption
from ..files import atomic_write

HEADER = [
    "# minidiff-shapes — a tiny text-to-image model trained from scratch on a CPU", "",
    "minidiff's embedded default model (`minidiff.load()` with no path, `minidiff generate \"a red circle\"`): "
    "the Stable Diffusion v1 architecture — KL autoencoder, CLIP text transformer with the real 49,408-token "
    "CLIP vocabulary, cross-attention U-Net, SD v1 noise schedule — shrunk to draw 32×32 images of one coloured "
    "shape. It is a teaching model: it knows 6 colours and 3 shapes and nothing else.", ""]


def folder_sizes(folder) -> dict:
    """{"total_bytes": int, "files": {relative path: bytes}} of every file under `folder`."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"total_bytes": sum(files.values()), "files": files}


def write_model_card(out: Path, report: dict) -> Path:
    """MODEL_CARD.md in the model folder: data, recipe, metrics, stage times, sizes, the reproduce command."""
    return atomic_write(Path(out) / "MODEL_CARD.md", model_card(report))


def model_card(report: dict) -> str:
    lines = HEADER + data_section(report) + recipe_section(report) + metrics_section(report) + cost_section(report)
    return "\n".join(lines)


def data_section(report: dict) -> list[str]:
    r = report["recipe"]
    held = ", ".join(caption(*p) for p in HELD_OUT)
    return [
        "## Data", "",
        f"{r['n_train']:,} images rendered by `minidiff.data.shapes.make_dataset(dir, n={r['n_train']}, "
        f"seed={r['seed']})` (imagefolder + metadata.jsonl): 32×32 RGB, white background, one filled circle, "
        "square or upright triangle, bounding box 12–24 px anywhere inside the canvas, anti-aliased (4×4 "
        "supersampling). Colours red, green, blue, yellow, purple, orange. Caption exactly `a {colour} {shape}`. "
        f"Three pairs never appear in training (held out): {held}.", "",
    ]


def recipe_section(report: dict) -> list[str]:
    r, st = report["recipe"], report["stages"]
    mv, mc = st["vae"]["metrics"], st["clip"]["metrics"]
    return [
        "## Recipe (`minidiff.recipes.tiny.Recipe`)", "",
        "| stage | network | parameters | training |", "|---|---|---|---|",
        f"| vae | AutoencoderKL, channels {list(r['vae_channels'])}, {r['vae_layers']} ResnetBlock/level, "
        f"latents 8×8×4 | {mv['params']:,} | {r['vae_steps']} steps × batch {r['vae_batch']}, AdamW lr "
        f"{r['vae_lr']}, loss Σ(x−D(z))² + {r['kl_weight']}·KL, z = μ + σε |",
        f"| clip | text: width {r['text_width']}, {r['text_layers']} layers, {r['text_heads']} heads; image: ViT "
        f"patch {r['image_patch']}, width {r['image_width']}, {r['image_layers']} layers; embed {r['clip_embed']} "
        f"| text tower {mc['text_params']:,} (of which 49,408×{r['text_width']} token table) | "
        f"{r['clip_steps']} steps × batch {r['clip_batch']}, AdamW lr {r['clip_lr']}, symmetric InfoNCE "
        f"(same-caption pairs are all positives), learned temperature clipped at 100 |",
        f"| unet | U-Net channels {list(r['unet_channels'])}, {r['unet_layers']} ResnetBlock/level, "
        f"cross-attention {list(r['unet_cross'])}, {r['unet_heads']} heads, context width {r['text_width']} | "
        f"{st['unet']['metrics']['params']:,} | {r['unet_steps']} steps × batch {r['unet_batch']}, AdamW lr "
        f"{r['unet_lr']}, ε-prediction MSE, SD v1 schedule (scaled_linear 0.00085→0.012, 1000 steps), "
        f"{int(100 * r['caption_dropout'])}% captions → \"\", EMA {r['ema_decay']} |", "",
        f"All stages: linear warm-up ({r['warmup']} steps), cosine decay to 10%, gradient clipping at 1, seed "
        f"{r['seed']}. The VAE and text tower are frozen for the U-Net. Latents are z·{st['latents']['scaling_factor']:.4f} "
        "(`vae/config.json` scaling_factor = 1/std of the training latents). The model's own sampler "
        "(`scheduler/scheduler_config.json`) is DDIM on the SD v1 schedule: PLMS (SD v1.4's PNDM) extrapolates from "
        "the last four ε predictions, and this small U-Net's guided predictions swing too much for that at guidance 7.5.",
        "",
    ]


def metrics_section(report: dict) -> list[str]:
    mv, mc = report["stages"]["vae"]["metrics"], report["stages"]["clip"]["metrics"]
    lines = [
        "## Metrics", "",
        f"- VAE reconstruction on 512 fresh images (all 18 pairs): PSNR {mv['psnr_db']:.2f} dB "
        f"(worst image {mv['psnr_db_min']:.2f} dB).",
        f"- CLIP zero-shot (18 prompts `a {{colour}} {{shape}}`, 30 fresh images per pair): trained pairs colour "
        f"{100 * mc['trained_colour_acc']:.1f}%, shape {100 * mc['trained_shape_acc']:.1f}%, both "
        f"{100 * mc['trained_pair_acc']:.1f}%; held-out pairs colour {100 * mc['held_out_colour_acc']:.1f}%, shape "
        f"{100 * mc['held_out_shape_acc']:.1f}%, both {100 * mc['held_out_pair_acc']:.1f}%; "
        f"learned temperature exp(logit_scale) = {mc['logit_scale_exp']:.1f}.",
    ]
    if "eval" in report:
        e, s = report["eval"], report["eval"]["settings"]
        lines += [
            f"- Text-to-image, judged by the pixel detector `minidiff.shapes_eval` (foreground far from white; colour "
            f"= palette colour nearest the foreground median; shape = fill ratio of the largest blob's bounding box): "
            f"{s['n_images']} images = 18 prompts × seeds {s['seeds'][0]}–{s['seeds'][-1]}, {s['scheduler']} "
            f"{s['steps']} steps, guidance {s['guidance_scale']}:",
            f"  - **trained pairs: {100 * e['trained']:.1f}%** correct (asked colour AND shape; target ≥ 90%)",
            f"  - **held-out pairs: {100 * e['held_out']:.1f}%** correct (target ≥ 60%)",
            f"  - colour right {100 * e['colour']:.1f}%, shape right {100 * e['shape']:.1f}%, one clean shape "
            f"{100 * e['clean']:.1f}%", "",
            "| prompt | correct |", "|---|---|"]
        heldc = {caption(*p) for p in HELD_OUT}
        lines += [f"| {p}{' (held out)' if p in heldc else ''} | {100 * a:.0f}% |" for p, a in e["per_pair"].items()]
        lines += ["", "`samples.png`: the evaluated images, one row per prompt in the table's order, one column per seed."]
    return lines + [""]


def cost_section(report: dict) -> list[str]:
    """Stage times, file sizes and the commands that reproduce the model."""
    st = report["stages"]
    weights = {k: v for k, v in report["sizes"]["files"].items() if k.endswith(".safetensors")}
    lines = ["## Stage times", "",
             "Measured on the development machine: 2 CPU cores shared with other jobs, torch threads = 2. CPU seconds "
             "count both threads; wall seconds include waiting for the shared cores.", "",
             "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} |" for k, v in st.items()]
    lines += [f"| **training total (data → save)** | **{report['train_wall_s']:.0f}** | **{report['train_cpu_s']:.0f}** |",
              "", "## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in weights.items()]
    lines += [f"| whole folder (weights, configs, tokenizer, card, samples) | ≈ {report['sizes']['total_bytes'] / 1e6:.1f} MB |",
              "", "## Reproduce", "", "```", report["command"], "minidiff shapes-eval", "```", "",
              "Same code and seed give the same batches (the batch of step n is drawn from a generator seeded by "
              "(seed, stage, n)); bit-for-bit equality of the weights across machines is not promised (float "
              "summation order differs between CPUs and thread counts). `--resume` continues an interrupted run from "
              "the work folder `<out>.work/`.", ""]
    return lines


__all__ = ["folder_sizes", "write_model_card", "model_card"]
