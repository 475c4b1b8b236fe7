"""The shapes dataset: one coloured shape on a white 32×32 canvas, captioned "a {colour} {shape}".

The tiny text-to-image model (minidiff.recipes.tiny) is trained from scratch on it in minutes on a CPU. It is small
enough to learn quickly and structured enough to ask real questions of a text-to-image model: does the picture
follow the caption's colour AND shape, and can the model draw a pair it never saw together?

    6 colours × 3 shapes = 18 (colour, shape) pairs; 3 of them never appear in training (HELD_OUT):
    purple triangle, orange circle, green square — every colour and every shape is still seen, only not together.

Each image: white background, one filled shape whose bounding box is `size` × `size` pixels (12 ≤ size ≤ 24),
its top-left corner (x, y) anywhere that keeps it fully inside the canvas.

    circle    the disc inscribed in the box                  area / box = π/4 ≈ 0.785
    square    the box itself                                 area / box = 1
    triangle  upright: apex at the top middle, base at the bottom edge of the box    area / box = 1/2
    cross     (the new concept, not in make_dataset's data) a plus sign: the middle third of the box's rows and
              of its columns                                 area / box = 2/3 - 1/9 = 5/9

Edges are anti-aliased by 4×4 supersampling (a pixel is coloured in proportion to how much of it the shape
covers), which makes the images a little smoother for the VAE to reconstruct.

    make_dataset("data/shapes", n=20000, seed=0)   # PNGs + metadata.jsonl (Hugging Face "imagefolder" layout)
    images, captions = load_dataset("data/shapes") # uint8 [N, 32, 32, 3], list of N strings

A fourth shape, the **cross** (a plus sign: two bars a third of the box wide, area / box = 5/9), is drawn the same way
but is not part of the data above: the embedded model never saw it. It is the new concept that the fine-tuning
experiment teaches (benchmarks/new_concept.py, docs/finetuning.md):

    make_concept_dataset("data/cross", concept="cross", n=96, seed=0)   # crosses in 5 colours + replayed old pairs

(Why a shape and not a colour: the tiny VAE was trained on six colours and decodes a seventh as the nearest of them
— a pink disc comes back purple — and what the frozen autoencoder cannot draw, no U-Net can learn to ask for.)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 12, 24
WHITE = (255, 255, 255)
COLOURS = {  # name -> RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
HELD_OUT = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)                 # 18
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)             # 15
CONCEPT_SHAPES = ("cross",)      # drawable, but never in the embedded model's training data: new concepts to teach
CROSS_BAR = 1 / 3                # the cross's bar width, as a fraction of its box
CONCEPT_COLOURS = ("red", "blue", "yellow", "purple", "orange")   # the colours a concept dataset shows it in
CONCEPT_HELD_OUT_COLOUR = "green"                                   # ... and the one kept out (does it compose?)
SUPERSAMPLE = 4  # anti-aliasing: each pixel is the mean of 4×4 sub-pixel samples


def caption(colour: str, shape: str) -> str:
    """The caption of an image, exactly "a {colour} {shape}"."""
    return f"a {colour} {shape}"


def parse_caption(text: str) -> tuple[str, str]:
    """"a red circle" -> ("red", "circle"); ValueError for anything else."""
    words = text.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"not a shapes caption: {text!r}")
    return words[1], words[2]


# ------------------------------------------------------------------------------------------------ rendering
def coverage(shape: str, size: int, x: float, y: float, image_size: int = IMAGE_SIZE,
             antialias: bool = True) -> np.ndarray:
    """The fraction of each pixel that the shape covers -> float32 [H, W] in [0, 1] (0/1 only without antialias).

    The bounding box is [x, x+size) × [y, y+size) in pixel units; pixel (i, j) spans [j, j+1) × [i, i+1).
    `shape` is one of SHAPES or CONCEPT_SHAPES."""
    if shape not in SHAPES + CONCEPT_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES + CONCEPT_SHAPES}")
    k = SUPERSAMPLE if antialias else 1
    c = (np.arange(image_size * k) + 0.5) / k          # sample points: sub-pixel centres, [H·k]
    px, py = c[None, :], c[:, None]                    # [1, W·k] and [H·k, 1], broadcast to [H·k, W·k]
    s = float(size)
    if shape == "square":
        inside = (px >= x) & (px < x + s) & (py >= y) & (py < y + s)
    elif shape == "circle":
        inside = (px - (x + s / 2)) ** 2 + (py - (y + s / 2)) ** 2 <= (s / 2) ** 2
    elif shape == "cross":  # inside the box, and within half a bar of its vertical or horizontal centre line
        in_box = (px >= x) & (px < x + s) & (py >= y) & (py < y + s)
        half = CROSS_BAR * s / 2
        inside = in_box & ((np.abs(px - (x + s / 2)) < half) | (np.abs(py - (y + s / 2)) < half))
    else:  # upright triangle: at height py the half-width grows linearly from 0 (apex) to s/2 (base)
        depth = (py - y) / s                           # 0 at the apex row, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(px - (x + s / 2)) <= depth * s / 2)
    cov = inside.astype(np.float32).reshape(image_size, k, image_size, k)  # [H·k, W·k] -> [H, k, W, k]
    return cov.mean(axis=(1, 3))                                           # [H, W]


def render_shape(colour: str, shape: str, size: int, x: float, y: float, image_size: int = IMAGE_SIZE,
                 antialias: bool = True) -> np.ndarray:
    """One image -> uint8 [H, W, 3] (`PIL.Image.fromarray(...)` makes it a picture).

    pixel = (1 - a)·white + a·colour, a = the pixel's coverage by the shape."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from {tuple(COLOURS)}")
    if not (0 <= x and 0 <= y and x + size <= image_size and y + size <= image_size):
        raise ValueError(f"a {size}px shape at ({x}, {y}) does not fit a {image_size}px canvas")
    a = coverage(shape, size, x, y, image_size, antialias)[..., None]   # [H, W, 1]
    rgb = (1 - a) * np.array(WHITE, np.float32) + a * np.array(COLOURS[colour], np.float32)
    return np.round(rgb).astype(np.uint8)                                # [H, W, 3]


def sample_specs(n: int, seed: int | np.random.Generator = 0, pairs=TRAIN_PAIRS,
                 image_size: int = IMAGE_SIZE) -> list[dict]:
    """n random shape descriptions {colour, shape, size, x, y, text}: the pair uniform over `pairs`, size uniform
    in 12..24, the top-left corner uniform over the integer positions that keep the shape inside the canvas."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        colour, shape = pairs[rng.integers(len(pairs))]
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        x, y = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
        specs.append({"colour": colour, "shape": shape, "size": size, "x": x, "y": y, "text": caption(colour, shape)})
    return specs


def render_specs(specs: list[dict], image_size: int = IMAGE_SIZE, antialias: bool = True) -> np.ndarray:
    """The images of a list of specs -> uint8 [N, H, W, 3]."""
    out = np.empty((len(specs), image_size, image_size, 3), np.uint8)
    for i, s in enumerate(specs):
        out[i] = render_shape(s["colour"], s["shape"], s["size"], s["x"], s["y"], image_size, antialias)
    return out


def random_images(n: int, seed: int | np.random.Generator = 0, pairs=TRAIN_PAIRS):
    """n fresh (not on disk) images and captions: (uint8 [n, 32, 32, 3], list of n captions)."""
    specs = sample_specs(n, seed, pairs)
    return render_specs(specs), [s["text"] for s in specs]


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1] (what the VAE and CLIP's image tower read)."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # [N, H, W, 3] -> [N, 3, H, W]
    return x.float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ on disk
def _metadata_io():
    """(write_metadata, read_metadata) from minidiff.data.imagefolder when it exists, else the plain equivalents:
    metadata.jsonl, one JSON object per line with "file_name" plus the columns (Hugging Face's imagefolder)."""
    try:
        from .imagefolder import read_metadata, write_metadata
        return write_metadata, read_metadata
    except ImportError:
        pass

    def write(folder, rows):
        with open(Path(folder) / "metadata.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def read(folder):
        with open(Path(folder) / "metadata.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]

    return write, read


def make_dataset(out_dir, n: int, seed: int = 0, pairs=TRAIN_PAIRS) -> Path:
    """Write n images as out_dir/images/00000.png ... and out_dir/metadata.jsonl with one row per image:
    {"file_name": "images/00000.png", "text": "a red circle", "colour", "shape", "size", "x", "y"}.
    The same (n, seed) writes the same files. Held-out pairs are absent unless `pairs` includes them."""
    return _write_imagefolder(out_dir, sample_specs(n, seed, pairs))


def _write_imagefolder(out_dir, specs: list[dict]) -> Path:
    """out_dir/images/00000.png ... (one rendered spec each) + out_dir/metadata.jsonl ({"file_name", **spec})."""
    from PIL import Image
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    width = max(5, len(str(len(specs) - 1)))
    for i, s in enumerate(specs):
        name = f"images/{i:0{width}d}.png"
        Image.fromarray(render_shape(s["colour"], s["shape"], s["size"], s["x"], s["y"])).save(out / name)
        rows.append({"file_name": name, **s})
    write_metadata, _ = _metadata_io()
    write_metadata(out, rows)
    return out


def make_concept_dataset(out_dir, concept: str = "cross", n: int = 96, seed: int = 0, replay: float = 0.5,
                         word: str | None = None, colours=CONCEPT_COLOURS) -> Path:
    """A small captioned set that teaches a new concept: an imagefolder like make_dataset's.

    round(n·(1 − replay)) images of the concept — "a {colour} {word}", the colour cycling through `colours` (green is
    left out by default, to ask afterwards whether the new word composes with a colour it was never shown with),
    size and position drawn as sample_specs does — then the rest *replayed* from the old world (TRAIN_PAIRS, drawn
    by sample_specs with seed + 1). Without the replay every step only says "draw crosses" and the model drifts
    away from what it knew (catastrophic forgetting).

    `word` is the concept's word in the captions (default: the concept's name); textual inversion passes its
    placeholder ("<cross>") so that only the new token carries the concept. Rows as make_dataset's, plus
    "concept": true/false. The same arguments write the same files."""
    if concept not in CONCEPT_SHAPES:
        raise ValueError(f"unknown concept {concept!r}; choose from {CONCEPT_SHAPES} (a shape the embedded model "
                         f"never saw)")
    if not 0 <= replay < 1:
        raise ValueError(f"replay must be in [0, 1), got {replay}")
    bad = [c for c in colours if c not in COLOURS]
    if not colours or bad:
        raise ValueError(f"colours must be a non-empty list of {tuple(COLOURS)}, got {list(colours)}")
    word = word or concept
    n_new = round(n * (1 - replay))
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n_new):
        colour, size = colours[i % len(colours)], int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
        specs.append({"colour": colour, "shape": concept, "size": size, "x": x, "y": y,
                      "text": f"a {colour} {word}", "concept": True})
    specs += [{**s, "concept": False} for s in sample_specs(n - n_new, seed + 1)]
    return _write_imagefolder(out_dir, specs)


def load_dataset(folder) -> tuple[np.ndarray, list[str]]:
    """An imagefolder written by make_dataset (or any folder of 32×32 images + metadata.jsonl with a "text" column)
    -> (uint8 [N, H, W, 3], list of N captions)."""
    from PIL import Image
    folder = Path(folder)
    _, read_metadata = _metadata_io()
    rows = read_metadata(folder)
    images = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows])
    return images, [r["text"] for r in rows]


__all__ = ["ALL_PAIRS", "COLOURS", "CONCEPT_COLOURS", "CONCEPT_HELD_OUT_COLOUR", "CONCEPT_SHAPES", "CROSS_BAR", "HELD_OUT", "IMAGE_SIZE", "MAX_SIZE", "MIN_SIZE", "SHAPES", "TRAIN_PAIRS",
           "caption", "coverage", "load_dataset", "make_concept_dataset", "make_dataset", "parse_caption", "random_images", "render_shape",
           "render_specs", "sample_specs", "to_tensor"]
