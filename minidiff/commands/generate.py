"""`minidiff generate PROMPT --out FILE.png`: text to image on the embedded default model, or on any model minidiff loads;
with `--image in.png [--strength 0.6]` image to image, with `--mask mask.png` too inpainting (white = repaint)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import SCHEDULER_HELP, scheduler_name

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default=None,
                   help="a diffusers folder or CompVis .ckpt/.safetensors (default: the embedded tiny shapes model)")
    p.add_argument("--out", default="out.png", help="output PNG; with several images: out.png, out-1.png, ...")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default=None, type=scheduler_name, metavar="NAME",
                   help=f"the sampler: {SCHEDULER_HELP}; default: the model's own (pndm for SD v1.4, ddim for the "
                        "embedded model)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the networks first")
    p.add_argument("--ema", action="store_true", help="CompVis files: use the EMA weights")
    p.add_argument("--image", default=None, help="start from this picture (image to image); the output takes its size")
    p.add_argument("--strength", type=float, default=0.75,
                   help="with --image: how much of the schedule runs, 0..1 (1 = ignore the picture's content)")
    p.add_argument("--mask", default=None, help="with --image: inpaint where this mask is white (same size as --image)")
    p.add_argument("--upscale", type=int, default=0,
                   help="nearest-neighbour enlargement for viewing (default: small images are enlarged to >= 256 px)")


def output_paths(out: str, n: int) -> list[Path]:
    out = Path(out)
    return [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def run(args) -> int:
    import torch
    from PIL import Image

    import minidiff
    from minidiff.files import atomic_write

    from minidiff.validation import NonFiniteError

    if args.mask and not args.image:
        raise SystemExit("minidiff generate: --mask needs --image (the picture to inpaint)")
    pictures = {}
    for flag, path in (("image", args.image), ("mask_image", args.mask)):
        if path:
            try:
                pictures[flag] = Image.open(path)
                pictures[flag].load()
            except (OSError, ValueError) as e:
                raise SystemExit(f"minidiff generate: --{'mask' if flag == 'mask_image' else 'image'} {path}: "
                                 f"cannot read it as an image ({e})") from None
    if pictures:
        pictures["strength"] = args.strength
    try:  # bad input (a CheckpointError is a ValueError too) and NaN sampling: one clear line, no traceback
        pipe = minidiff.load(args.model, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                             compile=args.compile, ema=args.ema)
        images = pipe.generate(args.prompt, negative_prompt=args.negative, steps=args.steps,
                               guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed,
                               height=args.height, width=args.width, num_images=args.num_images, **pictures)
    except (ValueError, NonFiniteError) as e:
        print(f"minidiff generate: error: {e}", file=sys.stderr)
        return 2
    for image, path in zip(images, output_paths(args.out, len(images))):
        k = args.upscale or max(1, -(-256 // max(image.size)))  # ceil(256 / side)
        if k > 1:
            image = image.resize((image.width * k, image.height * k), Image.NEAREST)
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format=Image.registered_extensions().get(
            path.suffix.lower(), "PNG")))
        print(path)
    return 0
