"""Images into the pipeline: the start image of image-to-image and the mask of inpainting, prepared exactly as
diffusers' VaeImageProcessor prepares them (so the same inputs give the same latents).

    image  PIL image (or a list of them) | tensor [N, 3, H, W] (or [3, H, W]) in [0, 1]
           -> [N, 3, H', W'] in [-1, 1]: H', W' are H, W rounded DOWN to a multiple of the VAE's factor f (8 for SD),
              or the height/width asked for; PIL images are resized with Lanczos, tensors with nearest-neighbour
    mask   PIL image (any mode; converted to greyscale) | tensor [H, W], [N, H, W] or [N, 1, H, W] in [0, 1]
           -> [N, 1, H', W'] of 0 (keep) and 1 (repaint): white = repaint, thresholded at 0.5

What comes in has passed minidiff.validation.check_generate_args (types, shapes, ranges, sizes, counts): nothing here
checks it again.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def size_of(image) -> tuple[int, int]:
    """(height, width) of a PIL image, a list of PIL images (its first) or an image tensor [..., H, W]."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, Image.Image):
        return first.height, first.width
    return tuple(first.shape[-2:])


def target_size(image, f: int, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The size the pipeline works at: height/width when given, else the image's own, rounded down to a multiple of
    f (diffusers' get_default_height_width)."""
    h, w = size_of(image)
    return height or h - h % f, width or w - w % f


def prepare_image(image, f: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL image(s) or a tensor in [0, 1] -> float32 [N, 3, H, W] in [-1, 1] (see the module docstring)."""
    height, width = target_size(image, f, height, width)
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image                       # [N, 3, H, W]
        x = F.interpolate(x.float(), size=(height, width))  # nearest, as diffusers; the identity at the same size
    else:
        # diffusers: resize (Lanczos; PIL returns a plain copy when the size is unchanged), then RGB, then /255
        pictures = [image] if isinstance(image, Image.Image) else list(image)
        arrays = [np.asarray(i.resize((width, height), resample=Image.LANCZOS).convert("RGB"), dtype=np.float32)
                  for i in pictures]
        x = torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2).float()  # [N, H, W, 3] -> [N, 3, H, W]
    return 2.0 * x - 1.0  # [0, 1] -> [-1, 1], the VAE's range


def prepare_mask(mask, height: int, width: int) -> torch.Tensor:
    """PIL image(s) or a tensor in [0, 1] -> float32 [N, 1, height, width] of 0 and 1 (>= 0.5 -> 1: repaint)."""
    if isinstance(mask, torch.Tensor):
        m = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask  # -> [N, 1, H, W]
        m = F.interpolate(m.float(), size=(height, width))
    else:
        # diffusers' mask processor: resize (Lanczos), then greyscale ("L"), then /255
        masks = [mask] if isinstance(mask, Image.Image) else list(mask)
        arrays = [np.asarray(m.resize((width, height), resample=Image.LANCZOS).convert("L"), dtype=np.float32)
                  for m in masks]
        m = torch.from_numpy(np.stack(arrays) / 255.0)[:, None].float()        # [N, 1, H, W]
    return (m >= 0.5).float()                # binarize: diffusers' threshold
