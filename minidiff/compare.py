"""Chapter 13 — did fine-tuning help? The same prompts and the same seeds through the base and the tuned model.

A sample of a diffusion model is a deterministic function of (weights, prompt, initial noise z_T, sampler): fix
the prompt, the seed (hence z_T) and the sampler, and the only thing that differs between two images is the
weights. So the grid puts, for every prompt (a row), the base and the tuned image of each seed next to each other:

                 base · seed 0   tuned · seed 0   base · seed 1   tuned · seed 1
    A toucan     [image]         [image]          [image]         [image]
    A horse      ...

Prompts unrelated to the fine-tuning data ("A toucan", "A horse") show what the model forgot; prompts that mix the
new style with new objects ("A water type fridge") show what it learned and how far it generalises.

    minidiff compare --base CompVis/sd-v1-4 --tuned out/ --seeds 0,1 --out grid.png
    grid = compare(base_path, tuned_path, prompts=["A toucan"], seeds=[0, 1])
    grid = make_grid([[im00, im01], [im10, im11]], ["row 0", "row 1"], ["col 0", "col 1"])
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import InputValueError
from .settings import (SEED_MAX, Device, Existing, Int, Ints, Real, Sampler, Text, Texts, check_on_this_machine,
                       check_settings)

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "monograph.txt"
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


# --------------------------------------------------------------------------------------------------- the grid
# fonts with accented Latin letters ("Pokémon"); Pillow's built-in font has none of them
FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
              "/usr/share/fonts/TTF/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf",
              "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
              "/Library/Fonts/Arial.ttf", "/System/Library/Fonts/Supplemental/Arial.ttf", "C:/Windows/Fonts/arial.ttf")


def _font(size: int):
    """A scalable font with accented letters when the system has one, else Pillow's own."""
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)   # a scalable font (Pillow >= 10.1), ASCII only
    except TypeError:
        return ImageFont.load_default()            # older Pillow: the fixed bitmap font


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw, text: str, font, width: int) -> str:
    """Break `text` into lines no wider than `width` pixels (at word boundaries; a too-long word stays whole)."""
    words, lines = text.split(), []
    for w in words:
        if lines and _text_size(draw, lines[-1] + " " + w, font)[0] <= width:
            lines[-1] += " " + w
        else:
            lines.append(w)
    return "\n".join(lines) if lines else ""


def _fit(im: Image.Image, cell: tuple[int, int]) -> Image.Image:
    """Resize to the cell: nearest-neighbour when enlarging (keeps tiny images' pixels crisp), Lanczos otherwise."""
    if im.size == cell:
        return im
    big = cell[0] >= im.size[0] and cell[1] >= im.size[1]
    return im.resize(cell, Image.NEAREST if big else Image.LANCZOS)


def make_grid(images, row_labels=None, col_labels=None, cell: int | None = None, title: str | None = None,
              font_size: int | None = None, pad: int = 4) -> Image.Image:
    """Images in a labelled table -> one RGB PIL image. minidiff's one image-grid writer: the comparison grid, the
    validation grids of `minidiff finetune` (train/reports.py) and the shapes evaluation's samples (shapes_eval.py).

    images:     a list of rows, each a list of PIL images, or a flat list of rows × cols images (row-major)
    row_labels: one string per row, written left of the row (wrapped); col_labels: one per column, above it
    cell:       side of each cell in pixels (None: the largest image's size; smaller images are resized to it)
    The layout is kept in `grid.info["minidiff_grid"]` = {"x0", "y0", "cell_w", "cell_h", "pad", "rows", "cols"}:
    cell (r, c) starts at (x0 + c·(cell_w + pad), y0 + r·(cell_h + pad)).
    """
    if images and not isinstance(images[0], (list, tuple)):
        cols = len(col_labels) if col_labels else len(images) // max(1, len(row_labels or [1]))
        if cols == 0 or len(images) % cols:
            raise ValueError(f"{len(images)} images do not fill rows of {cols} columns")
        images = [list(images[i:i + cols]) for i in range(0, len(images), cols)]
    rows, cols = len(images), max((len(r) for r in images), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("make_grid needs at least one image")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    if cell is None:
        cw = max(im.size[0] for r in images for im in r)
        ch = max(im.size[1] for r in images for im in r)
    else:
        cw = ch = int(cell)

    fs = font_size or max(10, min(24, cw // 8))
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # the label column: wide enough for ~18 characters, never narrower than a cell
    label_w = max(cw, _text_size(probe, "x" * 18, font)[0]) if row_labels else 0
    row_text = [_wrap(probe, str(t), font, label_w - 2 * pad) for t in row_labels] if row_labels else []
    col_text = [_wrap(probe, str(t), font, cw) for t in col_labels] if col_labels else []
    title_text = _wrap(probe, title, font, label_w + cols * (cw + pad)) if title else ""
    title_h = _text_size(probe, title_text, font)[1] + 2 * pad if title else 0
    header_h = max((_text_size(probe, t, font)[1] for t in col_text), default=0) + 2 * pad if col_labels else 0

    x0 = label_w + pad
    y0 = title_h + header_h + pad
    W = x0 + cols * (cw + pad)
    H = y0 + rows * (ch + pad)
    grid = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.multiline_text((pad, pad), title_text, fill=INK, font=font)
    for c, text in enumerate(col_text):   # centred above its column
        tw, _ = _text_size(draw, text, font)
        draw.multiline_text((x0 + c * (cw + pad) + (cw - tw) // 2, title_h + pad), text, fill=INK, font=font,
                            align="center")
    for r, text in enumerate(row_text):   # vertically centred left of its row
        _, th = _text_size(draw, text, font)
        draw.multiline_text((pad, y0 + r * (ch + pad) + max(0, (ch - th) // 2)), text, fill=INK, font=font)
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            grid.paste(_fit(im.convert("RGB"), (cw, ch)), (x0 + c * (cw + pad), y0 + r * (ch + pad)))
    grid.info["minidiff_grid"] = {"x0": x0, "y0": y0, "cell_w": cw, "cell_h": ch, "pad": pad, "rows": rows,
                                  "cols": cols}
    return grid


def readable_cell(side: int, at_least: int = 128) -> int:
    """A cell side for images of `side` pixels: enlarged by a whole factor to >= at_least (tiny models' 32 px
    images become 128 px, pixels kept square and crisp); large images keep their size."""
    return side * max(1, -(-at_least // side))


def grid_cell(grid: Image.Image, r: int, c: int) -> Image.Image:
    """Crop cell (r, c) back out of a grid made by make_grid."""
    g = grid.info["minidiff_grid"]
    x, y = g["x0"] + c * (g["cell_w"] + g["pad"]), g["y0"] + r * (g["cell_h"] + g["pad"])
    return grid.crop((x, y, x + g["cell_w"], y + g["cell_h"]))


# --------------------------------------------------------------------------------------------------- prompts
def read_prompts(path=None) -> list[str]:
    """One prompt per line (UTF-8); blank lines and lines starting with '#' are skipped. None = the monograph's 15."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give a text file, one prompt "
                              f"per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputValueError(f"{path}: no prompts (one per line)")
    return prompts


# --------------------------------------------------------------------------------------------------- comparing
def render(model, prompts, seeds, steps: int = 50, guidance: float = 7.5, scheduler: str | None = None, height=None,
           width=None, negative_prompt=None, device="cpu", dtype=None, progress: bool = True) -> dict:
    """{(prompt, seed): PIL image} — each one exactly `pipe.generate(prompt, seed=seed, ...)`.

    model: a loaded StableDiffusion, or anything minidiff.load takes (a path, or None = the embedded model)."""
    import torch
    from tqdm.auto import tqdm

    from .checkpoint import load

    pipe = model if hasattr(model, "generate") else load(model, device=device, dtype=dtype or torch.float32)
    out = {}
    jobs = [(p, s) for p in prompts for s in seeds]
    for prompt, seed in tqdm(jobs, desc="images", disable=not progress):
        out[(prompt, seed)] = pipe.generate(prompt, negative_prompt=negative_prompt, steps=steps,
                                            guidance_scale=guidance, scheduler=scheduler, seed=seed, height=height,
                                            width=width, progress=False)[0]
    return out


# The door's table of compare()'s settings (minidiff.settings), with the flags of `minidiff compare`. A model given as
# a loaded StableDiffusion is not a path and is not looked at here.
COMPARE_FIELDS = {
    "base": Existing(what="a diffusers folder or a CompVis .ckpt/.safetensors file", optional=True),
    "tuned": Existing(what="a diffusers folder or a CompVis .ckpt/.safetensors file"),
    "prompts": Texts(nonempty=True, optional=True),
    "seeds": Ints(0, SEED_MAX),
    "steps": Int(1),
    "guidance": Real(0),
    "scheduler": Sampler(optional=True),
    "height": Int(1, optional=True),                 # and a multiple of the model's VAE factor: generate() checks
    "width": Int(1, optional=True),
    "negative_prompt": Text(nonempty=False, optional=True, flag="--negative"),
    "device": Device(),
    "labels": Texts(n=2),
    "cell": Int(1, optional=True),
}


def check_compare_args(**args) -> None:
    """compare()'s arguments by COMPARE_FIELDS: types and ranges, then the model paths and the device (a loaded
    model is taken as it is). Raises InputTypeError / InputValueError before any model loads."""
    from types import SimpleNamespace
    settings = SimpleNamespace(**args)
    fields = {k: v for k, v in COMPARE_FIELDS.items() if not hasattr(getattr(settings, k, None), "generate")}
    check_settings(settings, fields)
    check_on_this_machine(settings, fields)


def compare(base, tuned, prompts=None, seeds=(0, 1), steps: int = 50, guidance: float = 7.5,
            scheduler: str | None = None, height=None, width=None, negative_prompt=None, device="cpu", dtype=None,
            labels=("base", "tuned"), cell: int | None = None, title: str | None = None,
            progress: bool = True) -> Image.Image:
    """The comparison grid: rows = prompts; columns = (base, tuned) for each seed, the same seed side by side.

    base, tuned: loaded StableDiffusion objects or paths (loaded one after the other, so only one model is in
    memory at a time when paths are given). prompts: a list, or None for the monograph's prompts.
    scheduler: a sampler name, or None for each model's own (the class its scheduler_config.json names).
    cell: the cell side in pixels (None: the images' size, enlarged to >= 128 px for tiny models).
    Every argument is checked before any model loads (COMPARE_FIELDS); generate() checks the rest on each model."""
    from .formats.weights import CheckpointError
    check_compare_args(base=base, tuned=tuned, prompts=prompts, seeds=seeds, steps=steps, guidance=guidance,
                       scheduler=scheduler, height=height, width=width, negative_prompt=negative_prompt,
                       device=device, labels=labels, cell=cell)
    prompts = read_prompts() if prompts is None else list(prompts)
    seeds = list(seeds)
    rendered = []
    for name, model in (("base", base), ("tuned", tuned)):
        try:
            rendered.append(render(model, prompts, seeds, steps, guidance, scheduler, height, width, negative_prompt,
                                   device, dtype, progress))
        except CheckpointError as e:                  # say which of the two models it is (--base / --tuned)
            raise CheckpointError(str(e), field=name) from None
    rows = [[rendered[k][(p, s)] for s in seeds for k in (0, 1)] for p in prompts]
    cols = [f"{labels[k]} · seed {s}" for s in seeds for k in (0, 1)]
    if cell is None:
        cell = readable_cell(max(rows[0][0].size))
    return make_grid(rows, prompts, cols, cell=cell, title=title)


__all__ = ["make_grid", "readable_cell", "grid_cell", "read_prompts", "render", "COMPARE_FIELDS", "check_compare_args",
           "compare", "DEFAULT_PROMPTS"]
