"""`minidiff generate PROMPT --out FILE.png`: text to image on the embedded default model, or on any model minidiff loads."""
from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default=None,
                   help="a diffusers folder or CompVis .ckpt/.safetensors (default: the embedded tiny shapes model)")
    p.add_argument("--out", default="out.png", help="output PNG; with several images: out.png, out-1.png, ...")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default=None, choices=["pndm", "ddim", "ddpm", "euler", "dpmpp"],
                   help="default: the model's own (pndm for SD v1.4, ddim for the embedded model)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the networks first")
    p.add_argument("--ema", action="store_true", help="CompVis files: use the EMA weights")
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

    pipe = minidiff.load(args.model, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                         compile=args.compile, ema=args.ema)
    images = pipe.generate(args.prompt, negative_prompt=args.negative, steps=args.steps,
                           guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed,
                           height=args.height, width=args.width, num_images=args.num_images)
    for image, path in zip(images, output_paths(args.out, len(images))):
        k = args.upscale or max(1, -(-256 // max(image.size)))  # ceil(256 / side)
        if k > 1:
            image = image.resize((image.width * k, image.height * k), Image.NEAREST)
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format=Image.registered_extensions().get(
            path.suffix.lower(), "PNG")))
        print(path)
    return 0
