"""Training-step throughput of the U-Net: samples/s and peak memory, one speed-up at a time.

    python benchmarks/bench_train.py                          # CPU, a small U-Net (32×32 latents), interleaved
    python benchmarks/bench_train.py --device cuda            # GPU: the full SD v1.4 U-Net at 512² (64×64 latents)

The step is the fine-tuning step (Rombach et al. 2022, eq. 2): z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε, loss = ‖ε − ε_θ(z_t, t, c)‖²,
backward, AdamW — run by minidiff.train.loop.train_step, the one step `minidiff finetune` and `train-tiny` run too. The text context is precomputed (the text encoder is frozen). Variants, each adding one thing:

  baseline           fp32, eager, torch.optim.AdamW (foreach), the VAE encodes the images every step
  + cached latents   z_0 encoded once beforehand (the VAE is frozen: its output never changes)
  + fused AdamW      AdamW(fused=True): one kernel for the whole update instead of a few per parameter group
  + bf16 autocast    matmuls and convolutions in bf16, weights and optimizer state in fp32
  + torch.compile    the U-Net's forward and backward compiled by inductor
  + checkpointing    gradient checkpointing: activations recomputed in the backward (less memory, more time)
  + 8-bit Adam       bitsandbytes' AdamW8bit (CUDA only, if installed): optimizer state in 8 bits

On the CPU the variants run round-robin (interleaved) so the machine's load hits all alike; on CUDA one after the other
(each holds a full U-Net with its optimizer state), with torch.cuda.synchronize around every timed step.
"""
from __future__ import annotations

import argparse
import gc
import time
from contextlib import nullcontext

from _common import PeakMemory, append_section, interleaved, load_average, md_table, median

import torch  # noqa: E402

from minidiff.train import loop  # noqa: E402
from minidiff.train.objective import diffusion_loss  # noqa: E402
from minidiff.unet import UNet, UNetConfig  # noqa: E402
from minidiff.vae import AutoencoderKL, VAEConfig  # noqa: E402

CONFIGS = {
    # a small SD-shaped U-Net that trains at a few steps per second on 2 CPU cores
    "small": dict(unet=UNetConfig(block_out_channels=(64, 128, 256), layers_per_block=1,
                                  cross_attention=(True, True, False), heads=8, cross_attention_dim=256),
                  vae=VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1), latent=32, context=256,
                  batch=4),
    # SD v1.4 at 512×512
    "sd14": dict(unet=UNetConfig(), vae=VAEConfig(), latent=64, context=768, batch=8),
}
VARIANTS = ["baseline", "+ cached latents", "+ fused AdamW", "+ bf16 autocast", "+ torch.compile", "+ checkpointing",
            "+ 8-bit Adam"]
TARGET_SAMPLES_PER_S = 100   # GPU: full U-Net at 512², one H100
TARGET_PEAK_GIB = 24         # GPU: full-U-Net fine-tune with checkpointing


class Trainer:
    """One U-Net + optimizer + data, configured by the variants up to `upto` (cumulative) plus optional extras."""

    def __init__(self, cfg: dict, device, steps_features: set, images, context, latents_cache, vae, seed=0):
        self.f = steps_features
        self.device = device
        torch.manual_seed(seed)
        self.unet = UNet(cfg["unet"]).to(device).train()
        if "+ checkpointing" in self.f:
            self.unet.enable_gradient_checkpointing()
        self.model = torch.compile(self.unet) if "+ torch.compile" in self.f else self.unet
        params = self.params = [p for p in self.unet.parameters()]
        if "+ 8-bit Adam" in self.f:
            import bitsandbytes as bnb
            self.opt = bnb.optim.AdamW8bit(params, lr=1e-5)
        else:
            self.opt = torch.optim.AdamW(params, lr=1e-5, fused="+ fused AdamW" in self.f or None)
        self.images, self.context, self.latents_cache, self.vae = images, context, latents_cache, vae
        alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
        self.alphas = alphas.to(device)
        self.g = torch.Generator(device).manual_seed(seed)

    def loss(self, _batch):
        if "+ cached latents" in self.f:
            z0 = self.latents_cache
        else:
            with torch.no_grad():
                z0 = self.vae.encode(self.images).mode() * self.vae.config.scaling_factor
        B = z0.shape[0]
        t = torch.randint(0, 1000, (B,), generator=self.g, device=self.device)
        eps = torch.randn(z0.shape, generator=self.g, device=self.device)
        a = self.alphas[t].view(B, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if "+ bf16 autocast" in self.f else nullcontext()
        with amp:
            pred = self.model(zt, t, self.context)
        return diffusion_loss(pred, eps, t, self.alphas)

    def step(self):
        # no clipping and no schedule: the benchmark times the forward, backward and optimizer update only
        return loop.train_step([None], self.loss, self.opt, self.params).loss


def data(cfg, device):
    g = torch.Generator().manual_seed(0)
    B, n = cfg["batch"], cfg["latent"]
    f = cfg["vae"].downsample_factor
    images = (torch.rand(B, 3, n * f, n * f, generator=g) * 2 - 1).to(device)
    context = torch.randn(B, 77, cfg["context"], generator=g).to(device)
    vae = AutoencoderKL(cfg["vae"]).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).mode() * vae.config.scaling_factor
    return images, context, latents, vae


def variant_features(name: str, all_names: list[str]) -> set:
    """Cumulative: every variant up to `name` (checkpointing and 8-bit Adam are added on top of the best stack)."""
    order = [v for v in all_names if v not in ("+ checkpointing", "+ 8-bit Adam")]
    if name in order:
        return set(order[: order.index(name) + 1])
    return set(order) | {name}


def run(device: str, config: str, variants: list[str], steps: int, batch: int | None = None, warmup: int = 2):
    """-> (rows, summary dict). CPU: interleaved rounds of one step each; CUDA: sequential."""
    device = torch.device(device)
    cfg = dict(CONFIGS[config])
    if batch:
        cfg["batch"] = batch
    images, context, latents, vae = data(cfg, device)
    B = cfg["batch"]
    results = {}
    if device.type == "cuda":
        for name in variants:
            feats = variant_features(name, variants)
            trainer = Trainer(cfg, device, feats, images, context, latents, vae)
            t0 = time.perf_counter()
            for _ in range(warmup):
                trainer.step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            with PeakMemory(device) as mem:
                times = interleaved({name: trainer.step}, steps, warmup=0, sync=torch.cuda.synchronize,
                                    progress=False)[name]
            results[name] = dict(times=times, peak=mem.peak_bytes, first=first)
            print(f"  {name}: {B / median(times['wall']):.1f} samples/s, peak {mem.peak_bytes / 2 ** 30:.1f} GiB",
                  flush=True)
            del trainer
            gc.collect()
            torch.cuda.empty_cache()
    else:
        trainers, peaks, firsts = {}, {}, {}
        for name in variants:
            trainers[name] = Trainer(cfg, device, variant_features(name, variants), images, context, latents, vae)
        for name, trainer in trainers.items():  # warm-up (and compilation); the first call's peak memory
            t0 = time.perf_counter()
            for _ in range(warmup - 1):
                trainer.step()
            with PeakMemory("cpu") as mem:
                trainer.step()
            firsts[name] = time.perf_counter() - t0
            peaks[name] = (mem.peak_bytes - mem.base_bytes) if mem.peak_bytes else None
            print(f"  {name}: warm-up {firsts[name]:.1f}s", flush=True)
        timed = interleaved({k: tr.step for k, tr in trainers.items()}, steps, warmup=0)
        for name in variants:
            results[name] = dict(times=timed[name], peak=peaks[name], first=firsts[name])
    rows, base = [], None
    for name in variants:
        r = results[name]
        wall = median(r["times"]["wall"])
        sps = B / wall
        base = base or sps
        peak = f"{r['peak'] / 2 ** 30:.2f}" if r["peak"] is not None else "n/a"
        rows.append([name, f"{wall:.3f}", f"{sps:.2f}", f"{sps / base:.2f}×", peak, f"{r['first']:.1f}"])
    return rows, results, cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=None, choices=list(CONFIGS), help="default: small on CPU, sd14 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 5 CPU, 20 CUDA)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda asked for, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    config = args.config or ("sd14" if cuda else "small")
    steps = args.steps or (20 if cuda else 5)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if "+ 8-bit Adam" in variants:
        try:
            import bitsandbytes  # noqa: F401
            if not cuda:
                raise ImportError("CPU")
        except ImportError:
            variants.remove("+ 8-bit Adam")
            print("skipping 8-bit Adam (bitsandbytes not installed, or not on CUDA)")
    load_before = load_average()
    print(f"training bench: {config} U-Net on {args.device}, variants: {', '.join(variants)}", flush=True)
    rows, results, cfg = run(args.device, config, variants, steps, args.batch)
    headers = ["variant (cumulative)", "median s/step", "samples/s", "speed-up", "peak GiB" if cuda else
               "peak extra GiB", "warm-up s"]
    table = md_table(headers, rows)
    print("\n" + table)
    u = cfg["unet"]
    notes = [f"U-Net {config}: block_out_channels={u.block_out_channels}, layers_per_block={u.layers_per_block}, "
             f"{sum(p.numel() for p in UNet(u).parameters()) / 1e6:.1f} M parameters; latents "
             f"{cfg['batch']}×4×{cfg['latent']}×{cfg['latent']}, context {cfg['batch']}×77×{cfg['context']}",
             "variants are cumulative down to '+ torch.compile'; '+ checkpointing' and '+ 8-bit Adam' are each added "
             "to that full stack",
             ("peak GiB = torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer state, "
              "activations)") if cuda else
             ("peak extra GiB = peak resident memory during one step minus the resident memory before it (activations,"
              " gradients, transient buffers; weights and optimizer state were allocated before)"),
             "CPU: variants interleaved, one step each per round; the machine is shared (see load average)"
             if not cuda else f"targets: ≥ {TARGET_SAMPLES_PER_S} samples/s; < {TARGET_PEAK_GIB} GiB peak with "
                              "checkpointing"]
    if cuda:
        best = max(cfg["batch"] / median(r["times"]["wall"]) for r in results.values())
        ck = results.get("+ checkpointing")
        notes.append(f"best samples/s {best:.1f} (target ≥ {TARGET_SAMPLES_PER_S}: "
                     f"{'met' if best >= TARGET_SAMPLES_PER_S else 'NOT met'})")
        if ck:
            gib = ck["peak"] / 2 ** 30
            notes.append(f"peak with checkpointing {gib:.1f} GiB (target < {TARGET_PEAK_GIB}: "
                         f"{'met' if gib < TARGET_PEAK_GIB else 'NOT met'})")
    for n in notes:
        print("-", n)
    if not args.no_append:
        append_section(f"Training step, {config} U-Net on {args.device}", table, notes, load_before)
    return rows, results


if __name__ == "__main__":
    main()
