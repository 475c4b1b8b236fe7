"""Chapter 7b — where words land: per-word cross-attention maps (DAAM: Tang et al., "What the DAAM: Interpreting
Stable Diffusion Using Cross Attention", ACL 2023; reference code castorini/daam).

The text reaches the U-Net only through cross-attention (chapter 7). In every `attn2` layer l, at every sampling step
t, each pixel i of the layer's feature map (h_l × w_l) spreads one unit of attention over the context's positions k
(77 per chunk: <start>, the prompt's tokens, <end> and its padding):

    A_t^(l)[head, i, k] = softmax_k(q_i · k_k / √d)               the weight pixel i gives token k

DAAM turns those weights into one heat map per word, at latent resolution h × w:

    R^(l)[head, k] = Σ_t A_t^(l)[head, :, k], reshaped to h_l × w_l      summed over the steps, as they happen
    D[k]          = mean over (l, head) of max(0, bicubic_{h×w}(R^(l)[head, k]))      one map per position k
    D_word        = mean of D[k] over the word's positions k             every token of every occurrence
    display       = bicubic to the image's H × W, then (D − min) / (max − min + 1e-8)     in [0, 1]
    segmentation  = display > 0.4                                        (DAAM's threshold)

    maps = attention_maps(pipe, "a red circle", seed=0, steps=20)
    maps.image                  # the picture pipe.generate(...) gives for the same arguments, bit for bit
    maps.words                  # ["a", "red", "circle"]
    maps.word("circle")         # [H, W] in [0, 1] (display);  maps.latent("circle"): [h, w] (D_word)
    maps.token(0)               # D[0]: the <start> token, where most of the attention goes (an "attention sink")
    maps.overlay("circle"); maps.grid("maps.png")

What is recorded, exactly as DAAM's code does it (daam/trace.py, daam/hook.py, daam/heatmap.py, daam/utils.py):
  * layers: every `attn2` of the down and up blocks — not the mid block (SD v1: the 15 layers at 64², 32², 16²;
    the locator skips the mid block, and the hook would skip its 8×8 maps anyway);
  * the conditional half of the guided batch only ([uncond; cond]: the second half);
  * sums over every step of the sampler, per layer and head (memory grows with the layers, not with the steps);
  * each layer's step-sum upsampled bicubically to the latent size, clamped at 0 (bicubic undershoots), then the
    mean over all (layer, head) pairs; a word's positions are found by searching its tokens in the prompt's tokens
    (a word made of several tokens averages them; a word that appears twice averages every occurrence);
  * display: bicubic to the image size, min-max normalised with 1e-8 in the denominator.
Where DAAM's code and its paper disagree we follow the code: the paper writes the aggregation as a SUM over steps,
layers and heads of maps upsampled to the image; the code averages over layers × heads (a constant factor that the
min-max display removes, but visible in `.latent()`) and upsamples to 64 × 64 first. Where the code only covers SD
at its native size we generalise it, and say so:
  * the code upsamples to a fixed 64 × 64 (96 × 96 for a 768-px model), read from the model's config; here it is the
    latent size of the image being generated (the same for SD v1 at 512²), with any aspect ratio (the code assumes
    square maps, h_l = w_l = √L, and its display resize swaps height and width of a non-square image);
  * the code records only contexts of exactly 77 positions; here a long prompt's chunks are all recorded and each
    word is found in its chunk (position = 77·chunk + 1 + index in the chunk);
  * without guidance the code's "drop the unconditional half" would halve the heads; here all heads are kept.

The probe (minidiff.nn.attention.CrossAttention.controller): while a controller is attached, each cross-attention
layer computes its weights through the chapter's softmax (attention_probs) and calls controller(layer, probs) with
probs [B, heads, L, S]. Returning None only looks: the layer's output is computed as without the probe (the fused
kernel), so the image is unchanged. Returning a tensor replaces the weights (output = new_probs @ V): prompt-to-prompt
(Hertz et al. 2022) injects a source prompt's maps this way (notebook 07b). Nothing swaps a class or copies the
U-Net; with nothing attached the layers run their fast path untouched.
"""
from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, PngImagePlugin

from . import prompts as prompts_mod
from .nn.attention import CrossAttention

THRESHOLD = 0.4   # DAAM's segmentation threshold on the display-normalised map
# DAAM's layers: every cross-attention of the down and up blocks (not the mid block)
DAAM_LAYERS = re.compile(r"(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn2")
ALL_LAYERS = re.compile(r".*\.attn2")   # ... and with the mid block (prompt-to-prompt edits every cross-attention)


def cross_attention_layers(unet, pattern: re.Pattern = DAAM_LAYERS) -> dict[str, CrossAttention]:
    """{module path: layer} of the U-Net's cross-attention layers whose path matches `pattern`, in forward order."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, CrossAttention) and pattern.fullmatch(name)}


@contextlib.contextmanager
def attached(controller, layers: dict[str, CrossAttention]):
    """`with attached(controller, cross_attention_layers(pipe.unet)): pipe.generate(...)` — every layer in `layers`
    calls controller(layer, probs) inside the block (see the module docstring); detached after it, even on error."""
    busy = [name for name, m in layers.items() if m.controller is not None]
    if busy:
        raise RuntimeError(f"a controller is already attached to {busy[0]}")
    try:
        for m in layers.values():
            m.controller = controller
        yield controller
    finally:
        for m in layers.values():
            m.controller = None


def level_size(latent_size: tuple[int, int], n_pixels: int) -> tuple[int, int]:
    """The h_l × w_l of the U-Net level whose maps have n_pixels = h_l·w_l queries: each level halves the latent's
    h × w, rounding up (a stride-2 3×3 convolution with padding 1)."""
    h, w = latent_size
    while h * w > n_pixels and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n_pixels:
        raise ValueError(f"{n_pixels} attention queries match no level of a {latent_size[0]}x{latent_size[1]} latent")
    return h, w


class HeatMapRecorder:
    """DAAM's accumulator, as an attention controller. For each layer it adds the conditional row's weights
    [heads, L, S] to a running sum [heads, S, h_l, w_l] (float32), so memory does not grow with the steps.

    names: {id(layer): name}; row: the batch row that holds the prompt's conditional pass (1 under guidance's
    [uncond; cond] batch of one prompt, else 0); record_steps: the step indices to sum (None: all).
    The pipeline's callback calls `next_step` after each step; the U-Net's pre-hook `see_latents` gives h × w."""

    def __init__(self, names: dict[int, str], row: int, record_steps=None):
        self.names, self.row = names, row
        self.record_steps = None if record_steps is None else set(int(s) for s in record_steps)
        self.sums: dict[str, torch.Tensor] = {}
        self.step, self.calls = 0, 0
        self.latent_size = None

    def see_latents(self, unet, args):
        self.latent_size = tuple(args[0].shape[-2:])   # U-Net input [B, C, h, w]

    def next_step(self, *args):
        self.step += 1

    def __call__(self, layer, probs):
        if self.record_steps is not None and self.step not in self.record_steps:
            return None
        name = self.names[id(layer)]
        p = probs[self.row].float()                                          # [heads, L, S]
        h, w = level_size(self.latent_size, p.shape[1])
        p = rearrange(p, "heads (h w) s -> heads s h w", h=h, w=w)           # one map per head and position
        if name in self.sums:
            self.sums[name].add_(p)
        else:
            self.sums[name] = p.clone()
        self.calls += name == next(iter(self.sums))                          # U-Net calls seen (first layer's)
        return None


@torch.no_grad()
def attention_maps(pipe, prompt: str, seed: int | None = 0, steps: int = 20, guidance_scale: float = 7.5,
                   scheduler: str | None = None, height: int | None = None, width: int | None = None,
                   negative_prompt: str | None = None, *, image=None, mask_image=None, strength: float = 0.75,
                   record_steps=None) -> "AttentionMaps":
    """Generate one image and DAAM's per-word heat maps of it (see the module docstring).

    The arguments are pipe.generate's (one prompt, one image): maps.image is exactly generate's picture for them.
    image / mask_image / strength: image to image and inpainting, as in generate. record_steps: the step indices
    (0 = the noisiest) whose attention is summed, e.g. range(5) for the first five; None = every step (DAAM).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"attention_maps takes one prompt (a str), got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
    layers = cross_attention_layers(pipe.unet)
    if not layers:
        raise ValueError("this U-Net has no cross-attention layer in its down or up blocks")
    recorder = HeatMapRecorder({id(m): n for n, m in layers.items()}, row=1 if guidance_scale > 1.0 else 0,
                               record_steps=record_steps)
    hook = pipe.unet.register_forward_pre_hook(recorder.see_latents)
    try:
        with attached(recorder, layers):
            out = pipe.generate(prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                                scheduler=scheduler, seed=seed, height=height, width=width, num_images=1,
                                image=image, mask_image=mask_image, strength=strength, progress=False,
                                callback=recorder.next_step)
    finally:
        hook.remove()
    sums = {n: recorder.sums[n].cpu() for n in layers if n in recorder.sums}
    return AttentionMaps(out[0], prompt, pipe.tokenizer, sums, recorder.latent_size, recorder.calls)


# ------------------------------------------------------------------------------------------------ words -> positions
def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the text encoder sees them (no <start>/<end>; weights syntax removed, multi-vector
    embeddings expanded), in order. Token j sits at context position 77·(j // 75) + 1 + j % 75."""
    return prompts_mod.tokenize_weighted(tokenizer, tokenizer.expand_multi_vector(prompt), weighting=True)[0]


def token_position(j: int, per_chunk: int = 75) -> int:
    """Context position of the prompt's j-th token: chunk j // 75 starts at 77·chunk, its <start> comes first."""
    return (per_chunk + 2) * (j // per_chunk) + 1 + j % per_chunk


def split_words(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Group token ids into words -> [(word, [token indices])]. CLIP's BPE marks a word's last token with "</w>";
    an added (textual-inversion) token is a word by itself, and `tok_1`, `tok_2`, ... of a multi-vector embedding
    join the word `tok`."""
    added = {i: t for t, i in tokenizer.added_tokens.items()}
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words, current = [], []
    for j, (tid, piece) in enumerate(zip(ids, pieces)):
        if tid in added:
            if current:
                words.append(current)
                current = []
            base = re.fullmatch(r"(.+)_\d+", added[tid])
            if base and words and ids[words[-1][0]] in added and added[ids[words[-1][0]]] == base.group(1):
                words[-1].append(j)   # tok_1 after tok: the same word
            else:
                words.append([j])
            continue
        current.append(j)
        if piece.endswith("</w>"):
            words.append(current)
            current = []
    if current:
        words.append(current)
    return [(added[ids[g[0]]] if ids[g[0]] in added else tokenizer.decode([ids[j] for j in g]), g) for g in words]


# ------------------------------------------------------------------------------------------------------ the maps
class AttentionMaps:
    """The result of attention_maps: the image, the prompt's words and DAAM's heat maps of them.

    layers: {layer name: [heads, S, h_l, w_l]} the conditional attention weights summed over the recorded steps
    (DAAM's raw heat maps); latent_size: (h, w); steps: the number of U-Net calls summed."""

    def __init__(self, image: Image.Image, prompt: str, tokenizer, layers: dict, latent_size, steps: int):
        self.image, self.prompt, self.tokenizer = image, prompt, tokenizer
        self.layers, self.latent_size, self.steps = layers, tuple(latent_size), steps
        self.ids = prompt_tokens(tokenizer, prompt)
        self.per_chunk = tokenizer.model_max_length - 2
        self._words = split_words(tokenizer, self.ids)
        self._heat = None

    @property
    def words(self) -> list[str]:
        """The prompt's words, in order (punctuation included: it is attended to like any token)."""
        return [w for w, _ in self._words]

    def select(self, layers=None, heads=None) -> "AttentionMaps":
        """The same maps from a subset: layers (names of self.layers) and/or heads (indices). DAAM's
        compute_global_heat_map(layer_idx=, head_idx=) filters the same way; e.g. one resolution's layers."""
        names = list(self.layers) if layers is None else list(layers)
        missing = [n for n in names if n not in self.layers]
        if missing or not names:
            raise ValueError(f"no recorded layer {missing[0] if missing else '(none given)'}; recorded: "
                             f"{', '.join(self.layers)}")
        sub = {n: self.layers[n] if heads is None else self.layers[n][list(heads)] for n in names}
        return AttentionMaps(self.image, self.prompt, self.tokenizer, sub, self.latent_size, self.steps)

    def heat_maps(self) -> torch.Tensor:
        """D: one map per context position, [S, h, w] — each layer's step-sum bicubic-upsampled to the latent size,
        clamped at 0, averaged over all (layer, head) pairs (DAAM's compute_global_heat_map)."""
        if self._heat is None:
            total, count = 0.0, 0
            for r in self.layers.values():                                    # [heads, S, h_l, w_l]
                up = F.interpolate(r, size=self.latent_size, mode="bicubic").clamp_(min=0)   # [heads, S, h, w]
                total, count = total + up.sum(0), count + r.shape[0]
            self._heat = total / count                                        # [S, h, w]
        return self._heat

    def positions(self, word: str) -> list[int]:
        """The context positions DAAM averages for `word`: its tokens, searched in the prompt's tokens, at every
        occurrence (daam.utils.compute_token_merge_indices). Raises ValueError naming the prompt's words."""
        target = prompt_tokens(self.tokenizer, word) if isinstance(word, str) else []
        n = len(target)
        found = [j for start in range(len(self.ids) - n + 1) if n and self.ids[start:start + n] == target
                 for j in range(start, start + n)]
        if not found:
            raise ValueError(f"{word!r} is not a word of the prompt {self.prompt!r}; its words are: "
                             f"{', '.join(repr(w) for w in self.words) or '(none)'}")
        return [token_position(j, self.per_chunk) for j in found]

    def latent(self, word: str) -> torch.Tensor:
        """D_word [h, w]: the mean of the heat maps of the word's positions (DAAM's word heat map, unnormalised)."""
        return self.heat_maps()[self.positions(word)].mean(0)

    def token(self, i: int) -> torch.Tensor:
        """D[i] [h, w] for context position i (0 = <start>, the attention sink; 1.. the prompt's tokens)."""
        S = self.heat_maps().shape[0]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < S:
            raise ValueError(f"token position must be an int in [0, {S - 1}], got {i!r}")
        return self.heat_maps()[i]

    def word(self, word: str) -> torch.Tensor:
        """The word's map at image resolution [H, W], in [0, 1] (DAAM's display normalisation)."""
        return display(self.latent(word), (self.image.height, self.image.width))

    def overlay(self, word: str) -> Image.Image:
        """The image with the word's map as a heat overlay (DAAM's plot: jet colours under the image, the image's
        opacity 1 − map)."""
        return overlay(self.image, self.word(word))

    def grid(self, path=None, cell: int | None = None) -> Image.Image:
        """The image and one captioned overlay per word, in one row; written as PNG when `path` is given (the layout
        and the words in its "minidiff_grid" text chunk). cell: panel side in pixels (default: the image's side,
        enlarged to at least 128)."""
        from .compare import make_grid
        side = max(self.image.size)
        cell = cell or side * max(1, -(-128 // side))
        panels = [self.image] + [self.overlay(w) for w, _ in self._words]
        grid = make_grid([panels], col_labels=["image"] + self.words, cell=cell, title=self.prompt)
        if path is not None:
            from .files import atomic_write
            info = PngImagePlugin.PngInfo()
            info.add_text("minidiff_grid", json.dumps({**grid.info["minidiff_grid"], "words": self.words}))
            atomic_write(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
        return grid

    def attention_mass(self) -> dict:
        """Where the attention goes: {(h_l, w_l): {"start": f, "words": f, "end": f}}, the fraction of all recorded
        weight on <start>, on the prompt's tokens and on <end> + padding, per resolution (every chunk counted)."""
        out = {}
        for r in self.layers.values():                                         # [heads, S, h_l, w_l]
            mass = r.sum(dim=(0, 2, 3))                                        # [S]
            key = tuple(r.shape[-2:])
            out[key] = out.get(key, 0) + mass
        words = [token_position(j, self.per_chunk) for j in range(len(self.ids))]
        starts = list(range(0, len(next(iter(out.values()))), self.per_chunk + 2))
        fractions = {}
        for key, mass in out.items():
            total = float(mass.sum())
            start, word = float(mass[starts].sum()), float(mass[words].sum())
            fractions[key] = {"start": start / total, "words": word / total, "end": 1 - (start + word) / total}
        return fractions

    def __repr__(self):
        return (f"AttentionMaps({self.prompt!r}, words={self.words}, layers={len(self.layers)}, "
                f"latent={self.latent_size[0]}x{self.latent_size[1]}, steps={self.steps})")


def display(latent_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DAAM's display normalisation: [h, w] -> bicubic to size (H, W) -> (m − min) / (max − min + 1e-8), [H, W]."""
    m = F.interpolate(latent_map[None, None].float(), size=size, mode="bicubic")[0, 0]   # [H, W]
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """image (PIL, H × W) and a map [H, W] in [0, 1] -> (1 − m)·image + m·jet(m), as DAAM's plot_overlay_heat_map
    draws the image with opacity 1 − m over the jet-coloured map."""
    from matplotlib import colormaps
    m = heat.clamp(0, 1).numpy()[..., None]                                    # [H, W, 1]
    jet = colormaps["jet"](m[..., 0])[..., :3]                                 # [H, W, 3] in [0, 1]
    rgb = np.asarray(image.convert("RGB"), np.float32) / 255                   # [H, W, 3]
    return Image.fromarray(np.round(((1 - m) * rgb + m * jet) * 255).astype(np.uint8))


def iou(a, b) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


__all__ = ["attention_maps", "AttentionMaps", "HeatMapRecorder", "attached", "cross_attention_layers", "display",
           "overlay", "iou", "prompt_tokens", "split_words", "token_position", "level_size", "THRESHOLD",
           "DAAM_LAYERS", "ALL_LAYERS"]
