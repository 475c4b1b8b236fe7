"""Training, step 1 — data: the training set as an endless stream of samples, each with all its randomness.

One seed scheme for everything minidiff trains: every random draw comes from a torch.Generator seeded by
`stream_seed(seed, purpose, ...)`, a hash of the run's seed and the draw's place (a sample's position in the stream,
a stage name and a step number, ...), never from a shared RNG stream. So a resumed run, or one of several DDP
processes, draws exactly what an uninterrupted single process would have drawn for the same place.

Exact resumption of the data: the samples of optimizer step s are a function of s (`positions`), so the data
position of a run is its step counter and needs no extra state in a checkpoint.
"""
from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm


def stream_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings: independent generators for independent purposes."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by stream_seed(*parts): e.g. generator(seed, "vae", step) for one training step."""
    return torch.Generator().manual_seed(stream_seed(*parts))


class SampleStream(torch.utils.data.Dataset):
    """The training data as an endless stream of samples: position p -> everything random about sample p.

    Epoch e = p // N visits the images in the order torch.randperm(N) under seed (seed, "epoch", e). A sample's
    crop, flip, caption dropout, timestep and noises come from a generator seeded by (seed, p) (the image's crop and
    flip by (seed, e, index), so cached latents see the same flips). Item p:
        pixel_values [3, R, R] (or moments [2C, h, w] with cached latents), text, t (long []), noise [C, h, w],
        offset [C, 1, 1], posterior_eps [C, h, w], guidance_u [] (drawn last, so the draws before it never move)

    dataset: items {"pixel_values", "text"} (an ImageFolderDataset); T = num_train_timesteps; latent_shape (C, h, w);
    caption_dropout: P(text -> ""); random_flip: left-right flips; cache: cache_latents' dict, or None.
    """

    def __init__(self, dataset, num_train_timesteps: int, latent_shape: tuple, seed: int, caption_dropout: float = 0.0,
                 random_flip: bool = False, cache=None):
        self.ds, self.T, self.latent_shape, self.cache = dataset, num_train_timesteps, latent_shape, cache
        self.seed, self.caption_dropout, self.random_flip = seed, caption_dropout, random_flip
        self.n = len(dataset)
        self._perms: dict[int, torch.Tensor] = {}

    def index(self, p: int) -> tuple[int, int]:
        """Position -> (epoch, dataset index)."""
        e = p // self.n
        if e not in self._perms:
            self._perms = {e: torch.randperm(self.n, generator=generator(self.seed, "epoch", e))}
        return e, int(self._perms[e][p % self.n])

    def __len__(self):
        return 2 ** 62   # endless; the sampler decides which positions are read

    def __getitem__(self, p: int) -> dict:
        epoch, i = self.index(p)
        aug = generator(self.seed, "augment", epoch, i)
        flip = bool(self.random_flip and torch.rand((), generator=aug) < 0.5)
        item = {}
        if self.cache is not None:
            item["moments"] = self.cache["moments"][int(flip)][i]          # [2C, h, w]
            item["text"] = self.cache["text"][i]
        else:
            with torch.random.fork_rng(devices=[]):                         # the dataset's random crop uses torch's RNG
                torch.manual_seed(stream_seed(self.seed, "crop", epoch, i))
                sample = self.ds[i]
            pixels = sample["pixel_values"]                                 # [3, R, R] in [-1, 1]
            item["pixel_values"] = pixels.flip(-1) if flip else pixels      # left-right flip
            item["text"] = sample["text"]
        g = generator(self.seed, "sample", p)
        item["posterior_eps"] = torch.randn(self.latent_shape, generator=g)  # z₀ = μ + σ · this
        item["noise"] = torch.randn(self.latent_shape, generator=g)          # ε
        item["offset"] = torch.randn((self.latent_shape[0], 1, 1), generator=g)
        item["t"] = torch.randint(0, self.T, (), generator=g)
        if torch.rand((), generator=g) < self.caption_dropout:
            item["text"] = ""
        item["guidance_u"] = torch.rand((), generator=g)   # u ~ U[0, 1): the guidance of LCM distillation
        return item


def positions(start_step: int, end_step: int, batch_size: int, grad_accum: int = 1, rank: int = 0, world: int = 1):
    """The stream positions this process reads for optimizer steps [start_step, end_step), in order.

    Each optimizer step reads A = grad_accum micro-batches. Global micro-batch k holds positions [k·B·W, (k+1)·B·W);
    process r takes every W-th one from r (as DistributedSampler does), so W processes of batch B see the samples of
    one process with batch B·W."""
    B, W, A = batch_size, world, grad_accum
    for k in range(start_step * A, end_step * A):
        for j in range(B):
            yield k * B * W + j * W + rank


def collate(items: list[dict]) -> dict:
    out = {"text": [it["text"] for it in items]}
    for key in items[0]:
        if key != "text":
            out[key] = torch.stack([it[key] for it in items])
    return out


@torch.no_grad()
def cache_latents(dataset, vae, device, flip: bool, batch: int = 8, progress: bool = True) -> dict:
    """Encode every image once with the frozen VAE: {"moments": [unflipped [N, 2C, h, w], flipped (or the same)],
    "text": [N captions]}. The moments are the posterior's (mean | log σ²); a latent is sampled from them each
    time it is used, exactly as an uncached step would. Kept on the CPU."""
    moments, flipped, texts = [], [], []
    for s in tqdm(range(0, len(dataset), batch), desc="caching latents", disable=not progress):
        items = [dataset[i] for i in range(s, min(s + batch, len(dataset)))]
        x = torch.stack([it["pixel_values"] for it in items]).to(device)        # [b, 3, R, R]
        moments.append(vae.encode(x).moments.float().cpu())                     # [b, 2C, h, w]
        if flip:
            flipped.append(vae.encode(x.flip(-1)).moments.float().cpu())
        texts += [it["text"] for it in items]
    m = torch.cat(moments)
    return {"moments": [m, torch.cat(flipped) if flip else m], "text": texts}


def default_validation_prompts(dataset, unrelated=("A toucan", "A horse")) -> list[str]:
    """Two distinct captions of the dataset (what it should learn) + prompts that have nothing to do with it (what it
    may forget)."""
    seen = []
    for row in dataset.rows:
        if row["text"] and row["text"] not in seen:
            seen.append(row["text"])
        if len(seen) == 2:
            break
    return seen + list(unrelated)


__all__ = ["stream_seed", "generator", "SampleStream", "positions", "collate", "cache_latents",
           "default_validation_prompts"]
