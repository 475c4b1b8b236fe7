"""Chapter 10, continued — a whole text-to-image model trained from scratch on a CPU: minidiff's embedded default.

Stable Diffusion is three networks trained one after the other (Rombach et al. 2022): an autoencoder that makes
images small, a text encoder that turns prompts into vectors, and a denoising U-Net that learns to draw in the
autoencoder's latent space while listening to the text. Here each is shrunk until the whole recipe runs in
under 30 minutes on two CPU cores, and trained on the shapes world (minidiff.data.shapes: "a red circle", ...):

  stage    network                                  trained on                      objective
  data     —                                        20,000 rendered 32×32 images    (15 of 18 colour×shape pairs)
  vae      AutoencoderKL 32×32×3 -> 8×8×4           images                          Σ(x − D(z))² + β·KL  (neg. ELBO)
  clip     CLIP text tower + small ViT              (caption, image) pairs          InfoNCE, learned temperature
  latents  the frozen VAE encodes every image; scaling_factor = 1 / std(z), so the U-Net sees unit variance
  unet     U-Net ε_θ(z_t, t, τ(y)) (chapter 7)      frozen latents, frozen text     E‖ε − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t, τ(y))‖²
                                                    10% captions dropped to ""      (so classifier-free guidance works)
  save     minidiff.save(...) as a diffusers folder, then the pixel-detector evaluation (minidiff.shapes_eval);
           MODEL_CARD.md (model_card.py), metrics.json and samples.png are written into the same folder

    minidiff train-tiny --out weights/minidiff-shapes            # the committed model
    minidiff train-tiny --out /tmp/m --quick                     # every stage, very short (< 60 s)
    minidiff train-tiny --out weights/minidiff-shapes --resume   # continue after an interruption

Every stage trains with minidiff.train's one `train_step` (AdamW, the warm-up + cosine schedule of
minidiff.train.optim decaying to a tenth, gradient clipping at 1, EMA, the NaN guard) — the same step
`minidiff finetune` runs — and the U-Net's loss is minidiff.train.objective's diffusion_loss.

Resuming: every stage checkpoints its network, optimizer, LR schedule and step counter into the work folder (default
`<out>.work/`, beside the output, because `minidiff.save` replaces the output folder as a whole) with
minidiff.train.state's save_state (atomic) at least once a minute and when the stage ends; load_state reads it back
with torch.load(weights_only=True). The random batch of step n is drawn from minidiff.train.data.generator(seed,
stage, n) (minidiff's one seed scheme), so a resumed run makes the same batches as an uninterrupted one.

Speed on a shared machine: with two threads on two cores that other processes also use, OpenMP's default
spin-waiting makes each thread burn its core waiting for the other, descheduled one at every barrier (measured here:
a training step 40x slower). `minidiff train-tiny` sets OMP_WAIT_POLICY=PASSIVE before torch loads; calling this
module from Python, set it in the environment before starting the process (or use one thread).

Notebooks 10a–10d train smaller versions of each stage in seconds and probe the committed model (zero-shot CLIP,
a guidance sweep, the held-out pairs).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputValueError
from ..files import atomic_write
from ..settings import (SEED_MAX, Bools, Int, Ints, Output, Real, check_on_this_machine, check_settings)
from ..train import loop
from ..train.data import generator
from ..train.objective import diffusion_loss
from ..train.optim import make_lr_scheduler, make_optimizer
from ..train.state import load_state, save_state
from .model_card import folder_sizes, write_model_card

STAGES = ("data", "vae", "clip", "latents", "unet", "save")


# --------------------------------------------------------------------------------------------------- the recipe
@dataclass
class Recipe:
    """Every number of the training recipe. `Recipe()` is the committed model's, `Recipe.quick()` the smoke test's."""
    seed: int = 0
    n_train: int = 20000                 # images in the training set
    # VAE: 3 levels (32 -> 16 -> 8), so latents are 8×8×4
    vae_channels: tuple = (16, 32, 64)
    vae_layers: int = 1
    vae_groups: int = 8
    kl_weight: float = 1e-4              # β, against a per-image squared error summed over 3072 numbers
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # CLIP: the text tower (its 49,408 × width token table is most of the bytes) and a small ViT
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    image_patch: int = 4
    image_width: int = 64
    image_layers: int = 2
    clip_embed: int = 64
    clip_steps: int = 300
    clip_batch: int = 64
    clip_lr: float = 1e-3
    # U-Net on 8×8×4 latents: 8 -> 4 -> 2, cross-attention on the two lower levels and the middle
    unet_channels: tuple = (32, 64, 96)
    unet_layers: int = 1
    unet_cross: tuple = (False, True, True)
    unet_heads: int = 4
    unet_groups: int = 16
    unet_steps: int = 3600
    unet_batch: int = 64
    unet_lr: float = 8e-4
    caption_dropout: float = 0.1         # P(caption -> ""): the unconditional model ε_θ(z_t, t, τ("")) for CFG
    ema_decay: float = 0.999             # 0 = no EMA
    warmup: int = 100                    # linear LR warm-up steps, then cosine decay to 10%
    # what the finished model is judged on (minidiff.shapes_eval's protocol)
    eval_seeds: int = 8
    eval_steps: int = 20

    def __post_init__(self):
        check_settings(self, RECIPE_FIELDS, RECIPE_RULES)        # the door (minidiff.settings), before any work
        for k in ("vae_channels", "unet_channels", "unet_cross"):
            setattr(self, k, tuple(getattr(self, k)))

    @classmethod
    def quick(cls) -> "Recipe":
        """The whole pipeline in well under a minute: tiny data, a few steps per stage. Not a usable model."""
        return cls(n_train=256, vae_steps=15, vae_batch=16, clip_steps=15, clip_batch=32, unet_steps=20,
                   unet_batch=16, warmup=5, eval_seeds=1, eval_steps=4)

    def configs(self):
        """-> (VAEConfig, CLIPTextConfig, CLIPImageConfig, UNetConfig) of the networks this recipe trains."""
        from ..clip import CLIPImageConfig, CLIPTextConfig
        from ..unet import UNetConfig
        from ..vae import VAEConfig
        vae = VAEConfig(block_out_channels=self.vae_channels, layers_per_block=self.vae_layers, latent_channels=4,
                        norm_num_groups=self.vae_groups, sample_size=32, scaling_factor=1.0)
        text = CLIPTextConfig(hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                              num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                              projection_dim=self.clip_embed)
        image = CLIPImageConfig(image_size=32, patch_size=self.image_patch, hidden_size=self.image_width,
                                intermediate_size=4 * self.image_width, num_hidden_layers=self.image_layers,
                                num_attention_heads=4)
        unet = UNetConfig(block_out_channels=self.unet_channels, layers_per_block=self.unet_layers,
                          cross_attention=self.unet_cross, heads=self.unet_heads, cross_attention_dim=self.text_width,
                          norm_num_groups=self.unet_groups, sample_size=8)
        return vae, text, image, unet


# The door's table of the recipe (minidiff.settings): one row per field. No flag sets them (`minidiff train-tiny` has
# --quick), so the messages name the field alone. The networks' own rules (widths that split into GroupNorm groups
# and heads) are the config classes'; _networks_build runs them.
_NO_FLAG = dict(flag="")
RECIPE_FIELDS = {
    "seed": Int(0, SEED_MAX, **_NO_FLAG), "n_train": Int(1, **_NO_FLAG),
    "vae_channels": Ints(1, **_NO_FLAG), "vae_layers": Int(1, **_NO_FLAG), "vae_groups": Int(1, **_NO_FLAG),
    "kl_weight": Real(0, **_NO_FLAG), "vae_steps": Int(1, **_NO_FLAG), "vae_batch": Int(1, **_NO_FLAG),
    "vae_lr": Real(gt=0, **_NO_FLAG),
    "text_width": Int(1, **_NO_FLAG), "text_layers": Int(1, **_NO_FLAG), "text_heads": Int(1, **_NO_FLAG),
    "image_patch": Int(1, **_NO_FLAG), "image_width": Int(1, **_NO_FLAG), "image_layers": Int(1, **_NO_FLAG),
    "clip_embed": Int(1, **_NO_FLAG), "clip_steps": Int(1, **_NO_FLAG), "clip_batch": Int(1, **_NO_FLAG),
    "clip_lr": Real(gt=0, **_NO_FLAG),
    "unet_channels": Ints(1, **_NO_FLAG), "unet_layers": Int(1, **_NO_FLAG), "unet_cross": Bools(**_NO_FLAG),
    "unet_heads": Int(1, **_NO_FLAG), "unet_groups": Int(1, **_NO_FLAG), "unet_steps": Int(1, **_NO_FLAG),
    "unet_batch": Int(1, **_NO_FLAG), "unet_lr": Real(gt=0, **_NO_FLAG),
    "caption_dropout": Real(0, 1, **_NO_FLAG), "ema_decay": Real(0, lt=1, **_NO_FLAG), "warmup": Int(0, **_NO_FLAG),
    "eval_seeds": Int(1, **_NO_FLAG), "eval_steps": Int(1, **_NO_FLAG),
}


def _networks_build(r):
    """The four networks' configs accept these widths (GroupNorm groups, heads, patches: the config classes' rules)."""
    if 32 % r.image_patch:
        return f"image_patch must divide the 32-pixel images, got {r.image_patch}"
    if r.text_width % r.text_heads:
        return f"text_width {r.text_width} does not split into text_heads={r.text_heads} heads"
    try:
        r.configs()
    except (ValueError, TypeError) as e:                # the config dataclasses' own refusals
        return f"the recipe's networks cannot be built: {e}"


RECIPE_RULES = [_networks_build]
# train()'s paths (the flags of `minidiff train-tiny`)
TRAIN_FIELDS = {"out": Output("folder"), "work": Output("folder", optional=True),
                "data": Output("folder", optional=True)}


# --------------------------------------------------------------------------------------------------- helpers
class Clock:
    """Wall-clock and CPU seconds of a stage, carried across resumes. CPU time counts every thread of the process:
    on a machine shared with other jobs, wall time grows while CPU time stays close to the work actually done."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall0, self.cpu0 = wall, cpu
        self.t, self.c = time.perf_counter(), time.process_time()

    @property
    def wall(self):
        return self.wall0 + time.perf_counter() - self.t

    @property
    def cpu(self):
        return self.cpu0 + time.process_time() - self.c


def train_stage(name: str, model: torch.nn.Module, params, steps: int, lr: float, step_fn, work: Path, resume: bool,
                seed: int, warmup: int, ema=None, save_every: float = 60.0, progress: bool = True) -> dict:
    """Every stage's training: minidiff.train's one train_step (AdamW, warm-up + cosine LR, gradient clipping at 1,
    optional EMA of model's named parameters, NaN guard) and atomic checkpoints into work/{name}.pt.
    step_fn(generator) runs one forward pass -> (loss, {name: float}).
    Returns the stage record {"step", "wall", "cpu", "last": {...}} (the models are updated in place)."""
    path = work / f"{name}.pt"
    params = list(params)
    opt = make_optimizer(params, lr, torch.device("cpu"), weight_decay=0.0)
    sched = make_lr_scheduler(opt, "cosine", warmup, steps, final=0.1)
    state = load_state(path) if resume else None
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if state.get("sched") is not None:
            sched.load_state_dict(state["sched"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step = state["step"]
    clock = Clock(*(state["wall"], state["cpu"]) if state else (0.0, 0.0))
    last_save, last = time.perf_counter(), dict(state.get("last", {})) if state else {}
    ema_params = dict(model.named_parameters()) if ema is not None else None

    def checkpoint(done: bool):
        save_state({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None, "step": step, "done": done,
                    "wall": clock.wall, "cpu": clock.cpu, "last": last}, path)

    model.train()
    bar = tqdm(total=steps, initial=step, desc=name, disable=not progress, dynamic_ncols=True)
    while step < steps:
        r = loop.train_step([generator(seed, name, step)], step_fn, opt, params, lr_scheduler=sched, ema=ema,
                            ema_params=ema_params, max_grad_norm=1.0, step=step + 1, last_checkpoint=path)
        step += 1
        last = {"loss": r.loss, **r.logs}
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()}, refresh=False)
        if time.perf_counter() - last_save > save_every and step < steps:
            checkpoint(False)
            last_save = time.perf_counter()
    bar.close()
    model.eval()
    checkpoint(True)
    return {"step": step, "wall": clock.wall, "cpu": clock.cpu, "last": last}


def finish_stage(work: Path, name: str, record: dict, metrics: dict):
    """Mark a stage done with its metrics (work/{name}.pt keeps the weights, work/{name}.json the numbers)."""
    state = load_state(work / f"{name}.pt")
    state.update(done=True, metrics=metrics, wall=record["wall"], cpu=record["cpu"])
    save_state(state, work / f"{name}.pt")
    atomic_write(work / f"{name}.json", json.dumps({"metrics": metrics, "wall_s": record["wall"],
                                                    "cpu_s": record["cpu"], "steps": record["step"]}, indent=2))


def finished_stage(work: Path, name: str):
    """The finished stage's state dict, or None when the stage has not completed."""
    state = load_state(work / f"{name}.pt")
    return state if state is not None and state.get("done") and "metrics" in state else None


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: 10·log10(1 / MSE), per image. [B, 3, H, W] -> [B]."""
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


# --------------------------------------------------------------------------------------------------- the stages
def load_training_data(recipe: Recipe, work: Path, data_dir: str | None, log=print):
    """Stage `data`: the imagefolder (written by make_dataset unless it exists) -> (uint8 [N, 3, 32, 32], captions)."""
    from ..data.shapes import load_dataset, make_dataset
    folder = Path(data_dir) if data_dir else work / "data"
    if not (folder / "metadata.jsonl").is_file():
        t = time.perf_counter()
        make_dataset(folder, recipe.n_train, seed=recipe.seed)
        log(f"data: wrote {recipe.n_train} images to {folder} in {time.perf_counter() - t:.1f} s")
    images, captions = load_dataset(folder)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()    # [N, 32, 32, 3] -> [N, 3, 32, 32] uint8
    return x, captions


def _to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0                             # uint8 0..255 -> [-1, 1]


def train_vae(recipe: Recipe, images, work: Path, resume: bool, progress: bool = True):
    """Stage `vae`: the negative ELBO with a Gaussian decoder, mean_B[ Σ (x − D(z))² + β KL(q(z|x) ‖ N(0, I)) ],
    z = μ + σε. -> (vae, metrics {"psnr_db": on 512 fresh images of all 18 pairs, ...}).

    Why squared error and not LDM's L1 (AutoencoderKL.loss): L1's gradient is ±1 per number, so a whole shape
    decoded in the wrong colour pulls no harder than a slightly soft edge. In our runs green — 2 of the 15 pairs —
    stayed decoded as yellow for 500+ steps with L1 (once for the whole run); with the squared error every colour
    is right within ~300 steps, and the PSNR after 600 steps went from 25.8 to 33.8 dB."""
    from ..data.shapes import ALL_PAIRS, random_images, to_tensor
    from ..vae import AutoencoderKL
    cfg = recipe.configs()[0]
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(cfg)
    done = finished_stage(work, "vae") if resume else None
    if done:
        vae.load_state_dict(done["model"])
        return vae.eval(), done["metrics"], done
    N = images.shape[0]

    def step_fn(g):
        x = _to_float(images[torch.randint(N, (recipe.vae_batch,), generator=g)])   # [B, 3, 32, 32]
        y, posterior = vae(x, sample_posterior=True, generator=g)                   # decode z = μ + σε
        rec = ((x - y) ** 2).sum(dim=(1, 2, 3)).mean()                               # Σ (x − D(z))²
        kl = posterior.kl().mean()
        return rec + recipe.kl_weight * kl, {"mse": rec / (3 * 32 * 32), "kl": kl}

    rec = train_stage("vae", vae, list(vae.parameters()), recipe.vae_steps, recipe.vae_lr, step_fn, work, resume,
                      recipe.seed, recipe.warmup, progress=progress)
    fresh, _ = random_images(512, seed=recipe.seed + 101, pairs=ALL_PAIRS)   # never-seen images, held-out pairs too
    x = to_tensor(fresh)
    with torch.no_grad():
        post = vae.encode(x)
        y = vae.decode(post.mode())
    p = psnr((y / 2 + 0.5).clamp(0, 1), x / 2 + 0.5)
    metrics = {"psnr_db": float(p.mean()), "psnr_db_min": float(p.min()),
               "latent_std": float(post.mean.std()), "posterior_sigma_mean": float(post.std.mean()),
               "params": sum(q.numel() for q in vae.parameters())}
    finish_stage(work, "vae", rec, metrics)
    return vae, metrics, finished_stage(work, "vae")


def clip_zero_shot(model, tokenizer, n_per_pair: int = 30, seed: int = 202) -> dict:
    """Zero-shot classification of fresh images among the 18 prompts "a {colour} {shape}" (CLIP §3.1.2); colour and
    shape accuracy read off the chosen prompt, for the trained and the held-out pairs separately."""
    from ..clip import zero_shot_classify
    from ..data.shapes import ALL_PAIRS, HELD_OUT, caption, render_specs, sample_specs, to_tensor
    prompts = [caption(c, s) for c, s in ALL_PAIRS]
    out = {}
    for split, pairs in (("trained", [p for p in ALL_PAIRS if p not in HELD_OUT]), ("held_out", list(HELD_OUT))):
        specs = [s for i, p in enumerate(pairs) for s in sample_specs(n_per_pair, seed + i, pairs=(p,))]
        probs = zero_shot_classify(model, tokenizer, to_tensor(render_specs(specs)), prompts)  # [n, 18]
        pred = [ALL_PAIRS[k] for k in probs.argmax(dim=1).tolist()]
        out[f"{split}_colour_acc"] = float(np.mean([p[0] == s["colour"] for p, s in zip(pred, specs)]))
        out[f"{split}_shape_acc"] = float(np.mean([p[1] == s["shape"] for p, s in zip(pred, specs)]))
        out[f"{split}_pair_acc"] = float(np.mean([p == (s["colour"], s["shape"]) for p, s in zip(pred, specs)]))
    return out


def train_clip(recipe: Recipe, images, captions, tokenizer, work: Path, resume: bool, progress: bool = True):
    """Stage `clip`: both towers from scratch with the (multi-positive) InfoNCE loss and a learned temperature
    exp(logit_scale), clipped at 100 as in CLIP §2.5. -> (CLIPModel, metrics)."""
    from ..clip import CLIPModel, multi_positive_infonce
    _, text_cfg, image_cfg, _ = recipe.configs()
    torch.manual_seed(recipe.seed + 1)
    model = CLIPModel(text_cfg, image_cfg, embed_dim=recipe.clip_embed)
    done = finished_stage(work, "clip") if resume else None
    if done:
        model.load_state_dict(done["model"])
        return model.eval(), done["metrics"], done
    unique = sorted(set(captions))
    ids = tokenizer(unique)                                          # [U, 77]: every distinct caption, once
    label = torch.tensor([unique.index(c) for c in captions])       # [N] caption id of each image
    N = images.shape[0]

    def step_fn(g):
        idx = torch.randint(N, (recipe.clip_batch,), generator=g)
        t = model.encode_text(ids)[label[idx]]                       # [U, e] -> [B, e] unit vectors
        v = model.encode_image(_to_float(images[idx]))               # [B, e]
        logits = model.logit_scale.exp() * t @ v.t()                 # [B, B] texts × images
        loss = multi_positive_infonce(logits, label[idx])
        model.logit_scale.data.clamp_(max=math.log(100))
        return loss, {"loss": loss, "T": model.logit_scale.exp()}

    rec = train_stage("clip", model, list(model.parameters()), recipe.clip_steps, recipe.clip_lr, step_fn, work, resume,
                      recipe.seed, recipe.warmup, progress=progress)
    model.logit_scale.data.clamp_(max=math.log(100))
    metrics = clip_zero_shot(model, tokenizer)
    metrics["logit_scale_exp"] = float(model.logit_scale.detach().exp())
    metrics["text_params"] = sum(q.numel() for q in model.text_model.parameters())
    finish_stage(work, "clip", rec, metrics)
    return model, metrics, finished_stage(work, "clip")


@torch.no_grad()
def encode_latents(vae, images, work: Path, resume: bool, batch: int = 500):
    """Stage `latents`: the frozen VAE's posterior of every training image, and scaling_factor = 1 / std(z), z ~ q(z|x)
    (SD's 0.18215 was found the same way, Rombach et al. 2022 §4.3.2) so that the U-Net sees unit-variance latents.
    -> {"mean", "std": [N, 4, 8, 8], "scaling_factor": float}."""
    path = work / "latents.pt"
    if resume and path.is_file():
        return load_state(path)
    clock = Clock()
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(_to_float(images[i:i + batch]))
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)                   # [N, 4, 8, 8] each
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    out = {"mean": mean, "std": std, "scaling_factor": float(1.0 / z.std()),
           "wall": clock.wall, "cpu": clock.cpu}
    save_state(out, path)
    return out


def train_unet(recipe: Recipe, latents: dict, captions, text_encoder, tokenizer, work: Path, resume: bool,
               progress: bool = True):
    """Stage `unet`: ε-prediction on the SD v1 noise schedule (scaled_linear β 0.00085 -> 0.012, T = 1000):

        z_0 = scaling_factor · (μ + σ ε'),  t ~ U{0..999},  z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε,  loss = ‖ε − ε_θ(z_t, t, c)‖²

    c = the frozen text tower's last hidden state [B, 77, d] of the caption, or of "" for 10% of the batch.
    -> (the U-Net to ship: the EMA weights when ema_decay > 0, metrics)."""
    from ..ema import EMA
    from ..schedulers import SD_V1_CONFIG, make_scheduler
    from ..unet import UNet
    unet_cfg = recipe.configs()[3]
    torch.manual_seed(recipe.seed + 2)
    unet = UNet(unet_cfg)
    ema = EMA(dict(unet.named_parameters()), decay=recipe.ema_decay) if recipe.ema_decay > 0 else None

    def shipped():  # the weights to ship: the EMA average, in a copy of the U-Net
        if ema is None:
            return unet.eval()
        out = copy.deepcopy(unet).eval()
        ema.copy_to(dict(out.named_parameters()))
        return out

    done = finished_stage(work, "unet") if resume else None
    if done:
        unet.load_state_dict(done["model"])
        if ema is not None:
            ema.load_state_dict(done["ema"])
        return shipped(), done["metrics"], done
    sched = make_scheduler("ddpm", SD_V1_CONFIG)
    unique = sorted(set(captions))
    with torch.no_grad():                                           # frozen: one context per distinct caption
        context = text_encoder(tokenizer(unique + [""]))           # [U + 1, 77, d]; the last row is ""
    empty = len(unique)
    label = torch.tensor([unique.index(c) for c in captions])      # [N]
    mean, std, scale = latents["mean"], latents["std"], latents["scaling_factor"]
    N, T = mean.shape[0], sched.num_train_timesteps

    def step_fn(g):
        B = recipe.unet_batch
        idx = torch.randint(N, (B,), generator=g)
        z0 = scale * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))   # [B, 4, 8, 8]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(T, (B,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        drop = torch.rand(B, generator=g) < recipe.caption_dropout
        c = torch.where(drop, torch.full_like(label[idx], empty), label[idx])
        loss = diffusion_loss(unet(zt, t, context[c]), noise, t, sched.alphas_cumprod)   # ‖ε − ε_θ‖²
        return loss, {"loss": loss}

    rec = train_stage("unet", unet, list(unet.parameters()), recipe.unet_steps, recipe.unet_lr, step_fn, work, resume,
                      recipe.seed, recipe.warmup, ema=ema, progress=progress)
    metrics = {"final_loss": rec["last"].get("loss"), "params": sum(q.numel() for q in unet.parameters()),
               "ema": recipe.ema_decay > 0}
    finish_stage(work, "unet", rec, metrics)
    return shipped(), metrics, finished_stage(work, "unet")


# --------------------------------------------------------------------------------------------------- everything
def train(out, recipe: Recipe | None = None, work=None, data=None, resume: bool = False, stop_after: str | None = None,
          progress: bool = True, evaluate: bool = True, command: str | None = None, log=print) -> dict:
    """Run the recipe into `out` (a diffusers folder + MODEL_CARD.md + metrics.json + samples.png).
    -> the report dict (metrics and seconds per stage). stop_after: a stage name, to stop early (resume later)."""
    from ..clip import CLIPTextTransformer
    from ..pipeline import StableDiffusion
    from ..schedulers import SD_V1_CONFIG
    from ..tokenizer import CLIPTokenizer
    from types import SimpleNamespace
    check_on_this_machine(SimpleNamespace(out=out, work=work, data=data), TRAIN_FIELDS)   # before any folder is made
    if stop_after is not None and stop_after not in STAGES:
        raise InputValueError(f"stop_after must be one of {STAGES}, got {stop_after!r} (--stop-after)",
                              field="stop_after")
    recipe = recipe or Recipe()
    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(work / "recipe.json", json.dumps(dataclasses.asdict(recipe), indent=2))
    report = {"recipe": dataclasses.asdict(recipe), "stages": {}}
    times = report["stages"]
    total = Clock()

    t = Clock()
    images, captions = load_training_data(recipe, work, data, log)
    times["data"] = {"wall_s": t.wall, "cpu_s": t.cpu, "n": len(captions)}
    if stop_after == "data":
        return report
    tokenizer = CLIPTokenizer()

    vae, m, st = train_vae(recipe, images, work, resume, progress)
    times["vae"] = {"wall_s": st["wall"], "cpu_s": st["cpu"], "steps": st["step"], "metrics": m}
    log(f"vae: PSNR {m['psnr_db']:.2f} dB on fresh images ({st['wall']:.0f} s wall, {st['cpu']:.0f} s CPU)")
    if stop_after == "vae":
        return report

    clip, m, st = train_clip(recipe, images, captions, tokenizer, work, resume, progress)
    times["clip"] = {"wall_s": st["wall"], "cpu_s": st["cpu"], "steps": st["step"], "metrics": m}
    log(f"clip: zero-shot colour {m['trained_colour_acc']:.3f} / shape {m['trained_shape_acc']:.3f} (trained pairs), "
        f"colour {m['held_out_colour_acc']:.3f} / shape {m['held_out_shape_acc']:.3f} (held-out pairs) "
        f"({st['wall']:.0f} s wall, {st['cpu']:.0f} s CPU)")
    if stop_after == "clip":
        return report

    lat = encode_latents(vae, images, work, resume)
    vae.config.scaling_factor = lat["scaling_factor"]
    times["latents"] = {"wall_s": lat["wall"], "cpu_s": lat["cpu"], "scaling_factor": lat["scaling_factor"]}
    log(f"latents: scaling_factor = {lat['scaling_factor']:.4f}")
    if stop_after == "latents":
        return report

    text_encoder = CLIPTextTransformer(clip.text_model.config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    unet, m, st = train_unet(recipe, lat, captions, text_encoder, tokenizer, work, resume, progress)
    times["unet"] = {"wall_s": st["wall"], "cpu_s": st["cpu"], "steps": st["step"], "metrics": m}
    log(f"unet: final loss {m['final_loss']:.4f} ({st['wall']:.0f} s wall, {st['cpu']:.0f} s CPU)")
    if stop_after == "unet":
        return report

    # SD v1's noise schedule, but DDIM as the model's own sampler: PLMS (SD's PNDM) extrapolates from the last four
    # ε predictions, and this small U-Net's guided predictions at 7.5 swing too much for that (colours flip).
    pipe = StableDiffusion(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                           scheduler_config=dict(SD_V1_CONFIG, _class_name="DDIMScheduler"))
    ship(pipe, out, recipe, report, evaluate, command or f"minidiff train-tiny --out {out}", log)
    report["total_wall_s"] = total.wall
    atomic_write(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    report["sizes"] = folder_sizes(out)
    log(f"saved {out} ({report['sizes']['total_bytes'] / 1e6:.1f} MB); stage times (wall / CPU s): " +
        ", ".join(f"{k} {v['wall_s']:.0f}/{v['cpu_s']:.0f}" for k, v in times.items()))
    return report


def ship(pipe, out: Path, recipe: Recipe, report: dict, evaluate: bool, command: str, log=print) -> None:
    """Stage `save`: the diffusers folder; then (evaluate) the pixel-detector evaluation of minidiff.shapes_eval on
    the model as loaded back from it, with its images as samples.png. Adds the numbers to `report`."""
    from ..checkpoint import load, save
    from ..shapes_eval import evaluate as judge_all, format_report, samples_grid
    times = report["stages"]
    t = Clock()
    save(pipe, out, format="diffusers")
    times["save"] = {"wall_s": t.wall, "cpu_s": t.cpu}
    report["train_wall_s"] = sum(s["wall_s"] for s in times.values())
    report["train_cpu_s"] = sum(s["cpu_s"] for s in times.values())
    report["sizes"] = folder_sizes(out)
    report["command"] = command
    if evaluate:
        t = Clock()
        r = judge_all(load(out), seeds=tuple(range(recipe.eval_seeds)), steps=recipe.eval_steps)
        times["eval"] = {"wall_s": t.wall, "cpu_s": t.cpu}
        grid = samples_grid(r)
        atomic_write(out / "samples.png", lambda tmp: grid.save(tmp, format="PNG"))
        report["eval"] = {k: v for k, v in r.items() if k not in ("images", "judgements")}
        log(format_report(r))
