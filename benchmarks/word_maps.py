"""Where do the words land? DAAM's word maps of the embedded shapes model, scored against where the shape is drawn.

For every (colour, shape) pair of the shapes world — the 15 trained pairs and the 3 held out — and seeds 0..7, with
the model card's sampling (DDIM, 20 steps, guidance 5), `minidiff.explain.attention_maps` draws the image and
records the maps. The pixel detector of minidiff.shapes_eval finds the drawn shape (the largest blob of foreground:
the ground truth, from the generated image itself). Each map is thresholded at DAAM's 0.4 (after its min-max display
normalisation) and compared with the shape's pixels by intersection over union:

    shape word      the map of "circle" / "square" / "triangle"
    colour word     the map of "red", "green", ...
    "a"             the article, a word that names nothing in the picture
    1 − "a"         its complement (1 − map > 0.4): the article's attention turned out to sit on the background
    <start>         position 0, the attention sink
    whole image     the baseline "everything is the shape"
    centred disc    the baseline "a disc of the dataset's mean size (18 px across) in the middle"

mIoU = the mean IoU over the images in which the detector found a shape. The shape word is also scored from the 4×4
layers alone and the 2×2 layers alone (the tiny U-Net attends only at those two resolutions), and from the first
5 of the 20 steps alone (the layout is decided early). Where the attention goes: the fraction of all recorded weight on
<start>, on the prompt's words and on <end> + padding, per resolution.

    python benchmarks/word_maps.py                          # prints the markdown table (about 2 minutes on 2 cores)
    python benchmarks/word_maps.py --out docs/explain.md --picture docs/word_maps.png

--out replaces the text between `<!-- word-maps:begin -->` and `<!-- word-maps:end -->` in that file (or appends the
block when the markers are absent); --picture writes a few examples as a small PNG.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import command_line, cpu_model, git_commit, load_average, write_block

BEGIN, END = "<!-- word-maps:begin -->", "<!-- word-maps:end -->"
DISC_DIAMETER = 18   # the dataset's mean shape size: bounding boxes of 12..24 px, uniformly drawn


def centred_disc(h: int, w: int, diameter: float = DISC_DIAMETER) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2 <= (diameter / 2) ** 2


def measure(seeds, steps, scheduler, guidance, early_steps, examples):
    import torch

    import minidiff
    from minidiff import explain
    from minidiff.data.shapes import ALL_PAIRS, HELD_OUT, caption
    from minidiff.shapes_eval import masks

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = minidiff.load()
    rows, mass, picked = [], {}, []
    t0 = time.perf_counter()
    for colour, shape in ALL_PAIRS:
        prompt = caption(colour, shape)
        for seed in seeds:
            kw = dict(seed=seed, steps=steps, guidance_scale=guidance, scheduler=scheduler)
            maps = explain.attention_maps(pipe, prompt, **kw)
            early = explain.attention_maps(pipe, prompt, record_steps=range(early_steps), **kw)
            _, _, drawn = masks(maps.image)                                     # [H, W] bool: the shape's pixels
            H, W = drawn.shape
            by_size = {}
            for name, r in maps.layers.items():
                by_size.setdefault(tuple(r.shape[-2:]), []).append(name)

            def heat(m, word=None):   # the display-normalised map [H, W] of a word, or of <start>
                return (m.word(word) if word is not None else explain.display(m.token(0), (H, W))).numpy()

            def seg(m, word=None):
                return heat(m, word) > explain.THRESHOLD

            row = {"prompt": prompt, "seed": seed, "held_out": (colour, shape) in HELD_OUT,
                   "found": bool(drawn.any()), "pixels": int(drawn.sum())}
            if row["found"]:
                row.update({
                    "shape word": explain.iou(seg(maps, shape), drawn),
                    "colour word": explain.iou(seg(maps, colour), drawn),
                    '"a"': explain.iou(seg(maps, "a"), drawn),
                    '1 − "a"': explain.iou(1 - heat(maps, "a") > explain.THRESHOLD, drawn),
                    "<start>": explain.iou(seg(maps), drawn),
                    "whole image": explain.iou(np.ones_like(drawn), drawn),
                    "centred disc": explain.iou(centred_disc(H, W), drawn),
                    "early": explain.iou(seg(early, shape), drawn),
                    **{f"{h}x{w}": explain.iou(seg(maps.select(layers=names), shape), drawn)
                       for (h, w), names in sorted(by_size.items(), reverse=True)}})
                row["heat"] = {k: heat(maps, w) for k, w in (("shape word", shape), ("colour word", colour),
                                                             ('"a"', "a"), ("<start>", None))}
                row["drawn"] = drawn
            rows.append(row)
            for size, f in maps.attention_mass().items():
                for k, v in f.items():
                    mass.setdefault(size, {}).setdefault(k, []).append(v)
            if (prompt, seed) in examples:
                picked.append((maps, drawn, seg(maps, shape)))
    seconds = time.perf_counter() - t0
    # threshold-free: mean map value inside the drawn shape / outside it (1 = no preference), on the image's own
    # shape and, as a control, on the shape drawn in the next image of the list (another pair or seed)
    found = [r for r in rows if r["found"]]
    for i, r in enumerate(found):
        other = found[(i + 1) % len(found)]["drawn"]
        for k, m in r.pop("heat").items():
            r[f"ratio {k}"] = _ratio(m, r["drawn"])
            r[f"control {k}"] = _ratio(m, other)
    for r in found:
        r["drawn"] = None
    return rows, {s: {k: float(np.mean(v)) for k, v in f.items()} for s, f in mass.items()}, picked, seconds, \
        sorted(by_size, reverse=True)


def _ratio(heat, mask):
    return float(heat[mask].mean() / max(heat[~mask].mean(), 1e-8)) if mask.any() and (~mask).any() else float("nan")


COLUMNS = ["shape word", "colour word", '"a"', '1 − "a"', "<start>", "whole image", "centred disc"]


def table(rows, mass, sizes, early_steps, steps) -> str:
    def miou(keep, col):
        xs = [r[col] for r in rows if r["found"] and keep(r)]
        return f"{100 * np.mean(xs):.1f}" if xs else "n/a"

    groups = [("trained pairs", lambda r: not r["held_out"]), ("held-out pairs", lambda r: r["held_out"]),
              ("all", lambda r: True)]
    found = {g: sum(r["found"] for r in rows if keep(r)) for g, keep in groups}
    total = {g: sum(1 for r in rows if keep(r)) for g, keep in groups}
    lines = ["| mIoU (%) with the drawn shape | " + " | ".join(COLUMNS) + " | images |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for g, keep in groups:
        lines.append(f"| {g} | " + " | ".join(miou(keep, c) for c in COLUMNS) + f" | {found[g]} of {total[g]} |")
    size_cols = [f"{h}x{w}" for h, w in sizes]
    lines += ["", "| shape word's mIoU (%) from | all layers, all steps | " +
              " | ".join(f"{c.replace('x', '×')} layers only" for c in size_cols) +
              f" | steps 1–{early_steps} of {steps} only |", "|---|" + "---:|" * (len(size_cols) + 2)]
    for g, keep in groups:
        lines.append(f"| {g} | {miou(keep, 'shape word')} | " + " | ".join(miou(keep, c) for c in size_cols) +
                     f" | {miou(keep, 'early')} |")
    words = ["shape word", "colour word", '"a"', "<start>"]
    lines += ["", "| mean map inside the shape ÷ outside it | " + " | ".join(words) + " |",
              "|---|" + "---:|" * len(words)]
    for label, prefix in (("on the image's own shape", "ratio"), ("on another image's shape (control)", "control")):
        lines.append(f"| {label} | " + " | ".join(
            f"{np.nanmean([r[f'{prefix} {w}'] for r in rows if r['found']]):.2f}" for w in words) + " |")
    lines += ["", "| attention weight (% of all) at | on `<start>` | on the prompt's words | on `<end>` and padding |",
              "|---|---:|---:|---:|"]
    for (h, w), f in sorted(mass.items(), reverse=True):
        lines.append(f"| {h}×{w} | {100 * f['start']:.1f} | {100 * f['words']:.1f} | {100 * f['end']:.1f} |")
    return "\n".join(lines)


def picture(picked, path):
    from PIL import Image

    from minidiff.compare import make_grid
    cells, labels = [], []
    for maps, drawn, seg in picked:
        words = maps.prompt.split()
        mask = Image.fromarray((drawn * 255).astype(np.uint8)).convert("RGB")
        thr = Image.fromarray((seg * 255).astype(np.uint8)).convert("RGB")
        cells.append([maps.image, maps.overlay(words[1]), maps.overlay(words[2]), mask, thr])
        labels.append(maps.prompt)
    grid = make_grid(cells, labels, ["image", "colour word", "shape word", "drawn shape", "shape word > 0.4"],
                     cell=64, font_size=10)
    grid.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(path, optimize=True)   # small for the docs
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-7", help="seed range a-b (default 0-7)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--early-steps", type=int, default=5, help="the early window: steps 1..N (default 5)")
    p.add_argument("--out", default=None, help="write the table into this markdown file (between the markers)")
    p.add_argument("--picture", default=None, help="write example rows as a PNG")
    p.add_argument("--json", default=None, help="write every image's scores as JSON")
    args = p.parse_args(argv)
    a, _, b = args.seeds.partition("-")
    seeds = list(range(int(a), int(b or a) + 1))
    examples = {("a red circle", 0), ("a blue square", 1), ("a yellow triangle", 2), ("a orange circle", 0),
                ("a purple triangle", 3)}
    rows, mass, picked, seconds, sizes = measure(seeds, args.steps, args.scheduler, args.guidance,
                                                 args.early_steps, examples)
    import torch
    body = table(rows, mass, sizes, args.early_steps, args.steps)
    block = "\n".join([
        BEGIN,
        f"Measured with `{command_line()}` at commit {git_commit()} on {cpu_model()} (load average "
        f"{load_average()}; torch {torch.__version__}): 18 pairs × seeds {seeds[0]}–{seeds[-1]}, "
        f"{args.scheduler} {args.steps} steps, "
        f"guidance {args.guidance}; {len(rows)} images in {seconds:.0f} s (each generated twice: all steps and the "
        f"first {args.early_steps}).",
        "", body, END])
    print(block)
    if args.json:
        rows_out = [{k: v for k, v in r.items() if k != "drawn"} for r in rows]
        mass_out = {f"{h}x{w}": f for (h, w), f in mass.items()}
        Path(args.json).write_text(json.dumps({"rows": rows_out, "mass": mass_out}, indent=1))
    if args.picture:
        print(picture(picked, args.picture))
    if args.out:
        write_block(args.out, block, BEGIN, END)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
