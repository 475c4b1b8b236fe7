"""`minidiff generate PROMPT --out FILE.png`: text to image on the embedded default model, or on any model minidiff loads;
with `--image in.png [--strength 0.6]` image to image, with `--mask mask.png` too inpainting (white = repaint);
with `--attention-maps maps.png` also the grid of the prompt's word maps (minidiff.explain, DAAM)."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from ..settings import Device, Existing, File, Int, Output
from . import SCHEDULER_HELP, check_flags, load_model, scheduler_name

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# generate()'s arguments whose flag has another name (minidiff/cli.py names the flag in an error about them)
FLAGS = {"guidance_scale": "--guidance", "mask_image": "--mask"}
# the flags checked here, before the model loads; generate()'s own door (minidiff.validation) checks the rest
FLAGS_FIELDS = {
    "model": Existing(what="a diffusers folder or a CompVis .ckpt/.safetensors file", optional=True),
    "out": Output("file"),
    "image": File(what="an image file", optional=True),
    "mask": File(what="an image file (white = repaint)", optional=True),
    "attention_maps": Output("file", optional=True),
    "upscale": Int(0),
    "device": Device(),
}


def _mask_needs_image(args):
    if args.mask and not args.image:
        return "--mask needs --image (the picture to inpaint)"


def _maps_draw_one_image(args):
    if args.attention_maps and args.num_images != 1:
        return "--attention-maps maps one image: leave --num-images at 1"


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
    p.add_argument("--attention-maps", default=None, metavar="PNG",
                   help="also write where each word of the prompt lands: the image and one heat-map overlay per word "
                        "(DAAM cross-attention maps, minidiff.explain); one image only")
    p.add_argument("--upscale", type=int, default=0,
                   help="nearest-neighbour enlargement for viewing (default: small images are enlarged to >= 256 px)")


def output_paths(out: str, n: int) -> list[Path]:
    out = Path(out)
    return [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def run(args) -> int:
    import torch
    from PIL import Image

    from minidiff import infotext
    from minidiff.errors import InputValueError
    from minidiff.files import atomic_write

    check_flags(args, FLAGS_FIELDS, [_mask_needs_image, _maps_draw_one_image])
    pictures = {}
    for field, flag, path in (("image", "--image", args.image), ("mask_image", "--mask", args.mask)):
        if path:
            try:
                pictures[field] = Image.open(path)
                pictures[field].load()
            except (OSError, ValueError, SyntaxError) as e:   # what PIL raises for a file that is not an image
                raise InputValueError(f"{flag} {path}: cannot read it as an image ({e})", field=field) from None
    if pictures:
        pictures["strength"] = args.strength
    if args.seed is None:   # drawn here, not inside generate(), so the PNG's infotext can say which seed it was
        args.seed = random.randrange(2 ** 32)
    # bad input to generate() (minidiff.validation) and NaN while sampling raise minidiff's own errors, which
    # minidiff/cli.py prints as one line naming the flag
    pipe = load_model(args.model, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]), compile=args.compile,
                      ema=args.ema)
    kwargs = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                  scheduler=args.scheduler, seed=args.seed, height=args.height, width=args.width, **pictures)
    if args.attention_maps:   # the same picture generate() gives, recorded on the way
        from minidiff.explain import attention_maps
        maps = attention_maps(pipe, args.prompt, **kwargs)
        images = [maps.image]
    else:
        images = pipe.generate(args.prompt, num_images=args.num_images, **kwargs)
    texts = infotexts(args, pipe, images)
    for image, path, text in zip(images, output_paths(args.out, len(images)), texts):
        k = args.upscale or max(1, -(-256 // max(image.size)))  # ceil(256 / side)
        if k > 1:
            image = image.resize((image.width * k, image.height * k), Image.NEAREST)
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        atomic_write(path, lambda tmp, image=image, fmt=fmt, text=text: image.save(
            tmp, format=fmt, **({"pnginfo": infotext.png_info(text)} if fmt == "PNG" else {})))
        print(path)
    if args.attention_maps:
        maps.grid(args.attention_maps)
        print(args.attention_maps)
    return 0


def infotexts(args, pipe, images) -> list[str]:
    """AUTOMATIC1111's `parameters` text of each image (minidiff.infotext), written into the PNG: the settings that
    make it again, the size the model drew (before --upscale)."""
    from minidiff import infotext
    from minidiff.schedulers import a1111_label, scheduler_name
    from minidiff.checkpoint import DEFAULT_MODEL

    model = Path(args.model) if args.model else DEFAULT_MODEL
    sha = infotext.model_hash(model)
    sampler = a1111_label(args.scheduler or scheduler_name(pipe.scheduler_config))
    n = len(images)
    return [infotext.format(args.prompt, args.negative or "", steps=args.steps, sampler_name=sampler,
                            cfg_scale=args.guidance, seed=args.seed, width=image.width, height=image.height,
                            model_hash=sha[:10], model=model.stem if model.is_file() else model.name,
                            denoising_strength=args.strength if args.image else None,
                            extras={"Batch size": n, "Batch pos": i} if n > 1 else None)
            for i, image in enumerate(images)]
