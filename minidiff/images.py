"""Images into the pipeline: the start image of image-to-image and the mask of inpainting, prepared exactly as
diffusers' VaeImageProcessor prepares them (so the same inputs give the same latents).

    image  PIL image (or a list of them) | tensor [N, 3, H, W] (or [3, H, W]) in [0, 1]
           -> [N, 3, H', W'] in [-1, 1]: H', W' are H, W rounded DOWN to a multiple of the VAE's factor f (8 for SD),
              or the height/width asked for; PIL images are resized with Lanczos, tensors with nearest-neighbour
    mask   PIL image (any mode; converted to greyscale) | tensor [H, W], [N, H, W] or [N, 1, H, W] in [0, 1]
           -> [N, 1, H', W'] of 0 (keep) and 1 (repaint): white = repaint, thresholded at 0.5
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an image tensor [..., H, W]."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(image.shape[-2:])


def _as_list(image, name):
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(i, Image.Image) for i in image):
            raise TypeError(f"{name} must be a PIL image, a list of PIL images or a tensor; got a list of "
                            f"{sorted({type(i).__name__ for i in image}) or 'nothing'}")
        sizes = {i.size for i in image}
        if len(sizes) > 1:
            raise ValueError(f"{name}: the PIL images have different sizes {sorted(sizes)}; give them one size")
        return list(image)
    return image


def target_size(image, f: int, height: int | None = None, width: int | None = None, name: str = "image"):
    """The size the pipeline works at: height/width when given, else the image's own, rounded down to a multiple of
    f (diffusers' get_default_height_width). Raises if that leaves less than one latent pixel."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    h, w = _size(first)
    height = height or h - h % f
    width = width or w - w % f
    if height < f or width < f:
        raise ValueError(f"{name} is {w}x{h} pixels; it must be at least {f}x{f} (one latent pixel)")
    return height, width


def prepare_image(image, f: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL image(s) or a tensor in [0, 1] -> float32 [N, 3, H, W] in [-1, 1] (see the module docstring)."""
    image = _as_list(image, "image")
    height, width = target_size(image, f, height, width)
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, list):
        # diffusers: resize (Lanczos; PIL returns a plain copy when the size is unchanged), then RGB, then /255
        arrays = [np.asarray(i.resize((width, height), resample=Image.LANCZOS).convert("RGB"), dtype=np.float32)
                  for i in image]
        x = torch.from_numpy(np.stack(arrays) / 255.0).permute(0, 3, 1, 2).float()  # [N, H, W, 3] -> [N, 3, H, W]
    elif isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must have shape [N, 3, H, W] or [3, H, W], got {tuple(image.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"image tensor must be floating point with values in [0, 1], got dtype {x.dtype}")
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"image tensor values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                             "(convert a [-1, 1] image with (x + 1) / 2)")
        x = F.interpolate(x.float(), size=(height, width))  # nearest, as diffusers; the identity at the same size
    else:
        raise TypeError(f"image must be a PIL image or a tensor [N, 3, H, W] in [0, 1], got {type(image).__name__}")
    return 2.0 * x - 1.0  # [0, 1] -> [-1, 1], the VAE's range


def prepare_mask(mask, height: int, width: int) -> torch.Tensor:
    """PIL image(s) or a tensor in [0, 1] -> float32 [N, 1, height, width] of 0 and 1 (>= 0.5 -> 1: repaint)."""
    mask = _as_list(mask, "mask_image")
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, list):
        # diffusers' mask processor: resize (Lanczos), then greyscale ("L"), then /255
        arrays = [np.asarray(m.resize((width, height), resample=Image.LANCZOS).convert("L"), dtype=np.float32)
                  for m in mask]
        m = torch.from_numpy(np.stack(arrays) / 255.0)[:, None].float()        # [N, 1, H, W]
    elif isinstance(mask, torch.Tensor):
        m = mask
        if m.ndim == 2:
            m = m[None, None]                # [H, W] -> [1, 1, H, W]
        elif m.ndim == 3:
            m = m[:, None]                   # [N, H, W] -> [N, 1, H, W]
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"mask_image tensor must have shape [H, W], [N, H, W] or [N, 1, H, W], "
                             f"got {tuple(mask.shape)}")
        lo, hi = m.min().item(), m.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"mask_image values must lie in [0, 1] (1 = repaint), got [{lo:.3g}, {hi:.3g}]")
        m = F.interpolate(m.float(), size=(height, width))
    else:
        raise TypeError(f"mask_image must be a PIL image or a tensor in [0, 1], got {type(mask).__name__}")
    return (m >= 0.5).float()                # binarize: diffusers' threshold


def check_same_size(image, mask) -> None:
    """The mask must cover the image pixel for pixel (before any resizing)."""
    first_i = image[0] if isinstance(image, (list, tuple)) else image
    first_m = mask[0] if isinstance(mask, (list, tuple)) else mask
    (ih, iw), (mh, mw) = _size(first_i), _size(first_m)
    if (ih, iw) != (mh, mw):
        raise ValueError(f"mask_image is {mw}x{mh} pixels but image is {iw}x{ih}: they must have the same size")
