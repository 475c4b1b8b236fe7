"""Did the picture follow the prompt? A plain pixel detector for the shapes world, and the quality evaluation of
the tiny text-to-image model built on it.

The detector reads an image the way the dataset drew it (minidiff.data.shapes), with no learning involved:

  1. foreground   pixels far from white. Anti-aliased edges are partly white, so a pixel's "ink" is measured as
                  a = |pixel - white| / |colour - white|  (its coverage, for a pixel mixed from white and colour)
                  and a pixel is foreground when a ≥ ½. The colour comes from step 2 on a first rough mask.
  2. colour       the palette colour nearest (Euclidean RGB) to the per-channel median of the foreground.
  3. shape        the largest 4-connected blob of foreground, and its fill ratio
                      fill = blob pixels / bounding-box pixels ≈ 1 (square), π/4 ≈ 0.785 (circle), 1/2 (triangle)
                  cut at the midpoints: square above 0.89, circle above 0.64, triangle below — unless the blob is
                  a cross (the new concept of the fine-tuning experiment, fill 5/9). Its box split into 3×3 cells,
                      crossness = mean ink of the 5 plus-sign cells − mean ink of the 4 corner cells
                  is 1 for a cross, ≈ 0.42 for a disc, ≈ 0.25 for a triangle, 0 for a square; above 0.7 it is a cross.
  4. clean        the image shows ONE shape: the blob holds ≥ 90% of the foreground and is at least 30 pixels.

An image counts as correct when it is clean and shows the asked colour AND the asked shape. `evaluate` judges a
model on prompts × seeds; `concept_adherence` asks what a fine-tune that taught a new shape learned and forgot.

    minidiff shapes-eval --grid grid.png       # the committed model, 18 prompts × 8 seeds, and a grid of them
    minidiff shapes-eval --model DIR --steps 20 --scheduler ddim --guidance 5
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from .data.shapes import (ALL_PAIRS, COLOURS, CONCEPT_COLOURS, CONCEPT_HELD_OUT_COLOUR, HELD_OUT, TRAIN_PAIRS,
                          caption)

PALETTE = np.array(list(COLOURS.values()), np.float32)    # [6, 3]
NAMES = list(COLOURS)
WHITE = np.array([255, 255, 255], np.float32)
ROUGH_DISTANCE = 60.0   # step 1's first pass: anything this far from white may be ink
SQUARE_ABOVE = (1 + np.pi / 4) / 2                         # 0.893: midway between square and circle
CIRCLE_ABOVE = (np.pi / 4 + 0.5) / 2                       # 0.643: midway between circle and triangle
MIN_PIXELS, MIN_BLOB_SHARE = 30, 0.9
CROSS_ABOVE = 0.7                                          # crossness: between a disc's 0.42 and a cross's 1
PLUS_CELLS = ([0, 1, 1, 1, 2], [1, 0, 1, 2, 1])            # (row, column) indices of the 3×3 cells of a plus sign
CORNER_CELLS = ([0, 0, 2, 2], [0, 2, 0, 2])

# the evaluation protocol: fixed so the numbers in the model card can be reproduced
EVAL = {"steps": 20, "scheduler": "ddim", "guidance_scale": 5.0, "seeds": tuple(range(8))}


def as_array(image) -> np.ndarray:
    """PIL image, uint8 [H, W, 3], or a float tensor / array [3, H, W] in [0, 1] -> float32 [H, W, 3] in 0..255."""
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)                               # [3, H, W] -> [H, W, 3]
    if a.dtype != np.uint8 and a.max() <= 1.0 + 1e-6:
        a = a * 255.0                                          # [0, 1] -> [0, 255]
    return a.astype(np.float32)[..., :3]


def _nearest_colour(rgb: np.ndarray) -> int:
    return int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask [H, W] -> boolean [H, W] (a breadth-first flood fill)."""
    H, W = mask.shape
    label = np.zeros((H, W), np.int32)
    best, best_n, n_labels = 0, 0, 0
    for i0, j0 in zip(*np.nonzero(mask)):
        if label[i0, j0]:
            continue
        n_labels += 1
        label[i0, j0] = n_labels
        queue, count = deque([(i0, j0)]), 0
        while queue:
            i, j = queue.popleft()
            count += 1
            for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= a < H and 0 <= b < W and mask[a, b] and not label[a, b]:
                    label[a, b] = n_labels
                    queue.append((a, b))
        if count > best_n:
            best, best_n = n_labels, count
    return label == best if best else np.zeros_like(mask)


def crossness(box: np.ndarray) -> float:
    """How much a boolean mask cropped to its bounding box [h, w] looks like a plus sign: split it into 3×3 cells
    (cell edges at the thirds, rounded down) -> mean ink of the 5 plus-sign cells − mean ink of the 4 corners."""
    h, w = box.shape
    if h < 3 or w < 3:
        return 0.0
    ink = np.array([[box[i * h // 3:(i + 1) * h // 3, j * w // 3:(j + 1) * w // 3].mean() for j in range(3)]
                    for i in range(3)])                         # [3, 3] fraction of each cell that is ink
    return float(ink[PLUS_CELLS].mean() - ink[CORNER_CELLS].mean())


def masks(image) -> tuple[int | None, np.ndarray, np.ndarray]:
    """Steps 1-3's masks of one image -> (palette index of its colour or None, foreground [H, W] bool, the largest
    blob [H, W] bool: where the shape is drawn)."""
    x = as_array(image)                                         # [H, W, 3]
    dist = np.sqrt(((x - WHITE) ** 2).sum(-1))                  # [H, W] distance from white
    rough = dist > ROUGH_DISTANCE
    if not rough.any():
        return None, rough, rough
    k = _nearest_colour(np.median(x[rough], axis=0))            # step 2 on the rough mask
    ink = dist / np.linalg.norm(PALETTE[k] - WHITE)             # coverage estimate a
    fg = ink >= 0.5                                             # [H, W] foreground
    if fg.any():                                                # step 2 again on the final mask
        k = _nearest_colour(np.median(x[fg], axis=0))
    return k, fg, largest_blob(fg)


def detect(image) -> dict:
    """Judge one image -> {"colour": name | None, "shape": name | None, "fill": float, "crossness": float,
    "pixels": int, "blob_share": float, "clean": bool, "bbox": (top, left, bottom, right) | None}."""
    k, fg, blob = masks(image)
    if k is None:
        return {"colour": None, "shape": None, "fill": 0.0, "crossness": 0.0, "pixels": 0, "blob_share": 0.0,
                "clean": False, "bbox": None}
    n, total = int(blob.sum()), int(fg.sum())
    if n == 0:
        return {"colour": NAMES[k], "shape": None, "fill": 0.0, "crossness": 0.0, "pixels": 0, "blob_share": 0.0,
                "clean": False, "bbox": None}
    rows, cols = np.nonzero(blob)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    fill = n / float((bottom - top) * (right - left))
    plus = crossness(blob[top:bottom, left:right])              # [h, w] crop of the blob
    if plus > CROSS_ABOVE:
        shape = "cross"
    else:
        shape = "square" if fill > SQUARE_ABOVE else "circle" if fill > CIRCLE_ABOVE else "triangle"
    share = n / total
    return {"colour": NAMES[k], "shape": shape, "fill": fill, "crossness": plus, "pixels": n, "blob_share": share,
            "clean": bool(n >= MIN_PIXELS and share >= MIN_BLOB_SHARE),
            "bbox": (int(top), int(left), int(bottom), int(right))}


def judge(image, colour: str, shape: str) -> dict:
    """detect(image) plus whether it is what was asked: colour_ok, shape_ok, correct (= clean and both)."""
    d = detect(image)
    d["colour_ok"] = d["colour"] == colour
    d["shape_ok"] = d["shape"] == shape
    d["correct"] = bool(d["clean"] and d["colour_ok"] and d["shape_ok"])
    return d


# ------------------------------------------------------------------------------------------------ evaluation
def generate_grid(pipe, pairs=ALL_PAIRS, seeds=EVAL["seeds"], steps: int = EVAL["steps"],
                  scheduler: str = EVAL["scheduler"], guidance_scale: float = EVAL["guidance_scale"],
                  batch: int = 72, words: dict | None = None):
    """Images for every (pair, seed): the initial noise of seed s is torch.randn([1, 4, h, w], Generator(s)), so with
    a deterministic sampler (DDIM, PNDM, Euler, ...) an image equals pipe.generate(prompt, seed=s) on its own. A sampler
    that draws noise between steps (LCM, Euler a, DPM++ 2M SDE, ...) draws it from Generator(i) for the batch that
    starts at image i: the same images on every call. `words` renames a shape in the prompts ({"cross": "<cross>"}: a
    textual-inversion placeholder). -> (float tensor [P·S, 3, H, W] in [0, 1], prompts list)."""
    import torch
    c = pipe.unet.config
    shape = (1, c.in_channels, c.sample_size, c.sample_size)
    words = words or {}
    prompts, noise = [], []
    for colour, shape_name in pairs:
        for s in seeds:
            prompts.append(caption(colour, words.get(shape_name, shape_name)))
            noise.append(torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))))
    noise = torch.cat(noise)                                                    # [P·S, 4, h, w]
    out = []
    for i in range(0, len(prompts), batch):
        out.append(pipe.generate(prompts[i:i + batch], steps=steps, guidance_scale=guidance_scale,
                                 scheduler=scheduler, latents=noise[i:i + batch], output="tensor", progress=False,
                                 generator=torch.Generator().manual_seed(i)))
    return torch.cat(out), prompts


def evaluate(pipe, pairs=ALL_PAIRS, seeds=EVAL["seeds"], steps: int = EVAL["steps"],
             scheduler: str = EVAL["scheduler"], guidance_scale: float = EVAL["guidance_scale"],
             words: dict | None = None) -> dict:
    """Generate every pair × seed and judge it. -> {"accuracy": over all images, "trained": accuracy, "held_out":
    accuracy, "per_pair": {prompt: accuracy}, "colour": acc, "shape": acc, "images": tensor, "judgements": list,
    "settings": dict}. Accuracies are fractions of images judged correct (asked colour AND shape, one clean shape).
    A pair may use a concept shape (("red", "cross")); `words` as generate_grid's."""
    t0 = time.perf_counter()
    images, prompts = generate_grid(pipe, pairs, seeds, steps, scheduler, guidance_scale, words=words)
    seconds = time.perf_counter() - t0
    asked = [pair for pair in pairs for _ in seeds]                             # prompts' order: pair-major
    judgements = []
    for img, p, (colour, shape) in zip(images, prompts, asked):
        judgements.append({"prompt": p, "held_out": (colour, shape) in HELD_OUT, **judge(img, colour, shape)})
    per_pair = {}
    for j in judgements:
        per_pair.setdefault(j["prompt"], []).append(j["correct"])

    def acc(keep):
        xs = [j["correct"] for j in judgements if keep(j)]
        return float(np.mean(xs)) if xs else float("nan")

    return {"accuracy": acc(lambda j: True), "trained": acc(lambda j: not j["held_out"]),
            "held_out": acc(lambda j: j["held_out"]),
            "per_pair": {p: float(np.mean(v)) for p, v in per_pair.items()},
            "colour": float(np.mean([j["colour_ok"] for j in judgements])),
            "shape": float(np.mean([j["shape_ok"] for j in judgements])),
            "clean": float(np.mean([j["clean"] for j in judgements])),
            "images": images, "judgements": judgements, "seconds": seconds,
            "settings": {"steps": steps, "scheduler": scheduler, "guidance_scale": guidance_scale,
                         "seeds": list(seeds), "n_images": len(prompts)}}


def concept_adherence(pipe, concept: str = "cross", seeds=EVAL["seeds"], steps: int = EVAL["steps"],
                      words: dict | None = None) -> dict:
    """Did a fine-tune teach `concept` (one of CONCEPT_SHAPES), and what did it forget? Adherence — the fraction of
    images judged correct by evaluate — on three prompt sets (seeds: an int n is range(n)):

        "concept"          "a {colour} {concept}" for the 5 CONCEPT_COLOURS the concept dataset shows it in
        "held_out_colour"  "a green {concept}": the colour make_concept_dataset keeps out (does the word compose?)
        "original"         the 15 TRAIN_PAIRS the embedded model learned (forgetting = base model's − this)

    plus "concept_shape" (the concept's images whose shape alone is right) and "seconds" (generating and judging).
    words: a textual-inversion placeholder for the concept ({"cross": "<cross>"}), used in its prompts only.
    Sampling: EVAL's (DDIM, guidance 5); `steps` fewer than its 20 only for a smoke run."""
    seeds = range(seeds) if isinstance(seeds, int) else seeds
    new = evaluate(pipe, [(c, concept) for c in CONCEPT_COLOURS], seeds=seeds, steps=steps, words=words)
    held = evaluate(pipe, [(CONCEPT_HELD_OUT_COLOUR, concept)], seeds=seeds, steps=steps, words=words)
    old = evaluate(pipe, TRAIN_PAIRS, seeds=seeds, steps=steps)
    return {"concept": new["accuracy"], "concept_shape": new["shape"], "held_out_colour": held["accuracy"],
            "original": old["accuracy"], "seconds": new["seconds"] + held["seconds"] + old["seconds"]}


def samples_grid(r: dict, scale: int = 2):
    """evaluate's images as one labelled PIL image (compare.make_grid): a row per prompt in per_pair's order, a
    column per seed, each image enlarged `scale` times (nearest neighbour: the pixels stay visible)."""
    from .compare import make_grid
    from .pipeline import to_pil
    seeds = r["settings"]["seeds"]
    images = to_pil(r["images"])                                   # pair-major: all seeds of a prompt, then the next
    side = max(images[0].size)
    return make_grid(images, list(r["per_pair"]), [f"seed {s}" for s in seeds], cell=scale * side)


def format_report(r: dict) -> str:
    s = r["settings"]
    lines = [f"{s['n_images']} images: {s['scheduler']}, {s['steps']} steps, guidance {s['guidance_scale']}, "
             f"seeds {s['seeds'][0]}..{s['seeds'][-1]} ({r['seconds']:.1f} s)",
             f"trained pairs:  {100 * r['trained']:.1f}% correct (target >= 90%)",
             f"held-out pairs: {100 * r['held_out']:.1f}% correct (target >= 60%)",
             f"colour right {100 * r['colour']:.1f}%, shape right {100 * r['shape']:.1f}%, "
             f"one clean shape {100 * r['clean']:.1f}%"]
    held = {caption(*p) for p in HELD_OUT}
    for p, a in r["per_pair"].items():
        lines.append(f"  {p:<20s} {100 * a:5.1f}%{'   (held out)' if p in held else ''}")
    return "\n".join(lines)
