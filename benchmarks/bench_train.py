"""Training-step throughput of the U-Net: samples/s and peak memory, eager vs compiled, minidiff vs diffusers.

    python benchmarks/bench_train.py                  # CPU: the tiny recipe's U-Net and a small SD-layout U-Net, fp32
    python benchmarks/bench_train.py --device cuda    # GPU: the full SD v1.4 U-Net at 512² (64×64 latents), batch 8,
                                                      #      bf16: diffusers' step vs minidiff's, ± compile,
                                                      #      ± gradient checkpointing
    python benchmarks/bench_train.py --ablation       # one speed-up at a time (the cumulative variants below)

The step is the fine-tuning step (Rombach et al. 2022, eq. 2): z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε,
loss = ‖ε − ε_θ(z_t, t, c)‖², backward, clipping at 1, AdamW — with the latents cached and the text context precomputed (the VAE and the text
encoder are frozen), so the U-Net's forward, backward and update are what is timed. Two libraries run it:

  minidiff    minidiff.train.loop.train_step (the one step `minidiff finetune` and `train-tiny` run), the optimizer of
              train.optim.make_optimizer (AdamW, fused where torch has a fused kernel: CUDA and CPU); `compile` is
              `minidiff finetune --compile`: loop.compile_for_training (inductor, fullgraph; CUDA graphs on CUDA)
  diffusers   the core of diffusers' examples/text_to_image/train_text_to_image.py on UNet2DConditionModel with the
              same weights: DDPMScheduler.add_noise, F.mse_loss(pred.float(), target.float()), backward,
              clip_grad_norm_(1.0), torch.optim.AdamW with its defaults (foreach), lr_scheduler.step(), zero_grad(),
              and its loss logging (`train_loss += loss.item()`, one host sync); `compile`: torch.compile(unet) with
              the same options as minidiff's

The rows: each library eager and compiled, without and (CUDA) with gradient checkpointing, under autocast in the
chosen precision. --ablation instead adds one thing at a time to minidiff's step (each on top of the rows above it):

  baseline           fp32, eager, torch.optim.AdamW (not fused), the VAE encodes the images every step
  + cached latents   z_0 encoded once beforehand (the VAE is frozen: its output never changes)
  + fused AdamW      AdamW(fused=True): one kernel for the whole update instead of a few per tensor
  + bf16 autocast    matmuls and convolutions in bf16, weights and optimizer state in fp32
  + channels-last    the U-Net's weights and activations in NHWC (the layout cuDNN's and oneDNN's convolutions prefer)
  + torch.compile    loop.compile_for_training, as `minidiff finetune --compile`
  + checkpointing    gradient checkpointing: activations recomputed in the backward (less memory, more time)
  + 8-bit Adam       bitsandbytes' AdamW8bit (CUDA only, if installed): optimizer state in 8 bits

On the CPU the rows run round-robin (interleaved) so the machine's load hits all alike; on CUDA one after the other
(each holds a U-Net with its optimizer state), with torch.cuda.synchronize after every timed step.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from contextlib import nullcontext

from _common import PeakMemory, append_section, interleaved, load_average, md_table, median

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minidiff.train import loop  # noqa: E402
from minidiff.train.objective import diffusion_loss  # noqa: E402
from minidiff.train.optim import make_optimizer  # noqa: E402
from minidiff.unet import UNet, UNetConfig  # noqa: E402
from minidiff.vae import AutoencoderKL, VAEConfig  # noqa: E402


def _tiny_recipe():
    from minidiff.recipes.tiny import Recipe
    r = Recipe()
    vae, text, _, unet = r.configs()
    return dict(unet=unet, vae=vae, latent=8, context=text.hidden_size, batch=r.unet_batch)


CONFIGS = {
    # the U-Net of `minidiff train-tiny` (minidiff.recipes.tiny.Recipe: 8×8 latents, batch 64)
    "tiny": _tiny_recipe,
    # a small SD-shaped U-Net that trains at a few steps per second on 2 CPU cores
    "small": lambda: dict(unet=UNetConfig(block_out_channels=(64, 128, 256), layers_per_block=1,
                                          cross_attention=(True, True, False), heads=8, cross_attention_dim=256),
                          vae=VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1), latent=32,
                          context=256, batch=4),
    # the smallest SD-layout U-Net (one level, cross-attention): gpu_session.py --dry-run's rows, compiled in a minute
    "toy": lambda: dict(unet=UNetConfig(block_out_channels=(32,), layers_per_block=1, cross_attention=(True,), heads=2,
                                        cross_attention_dim=32, norm_num_groups=8),
                        vae=VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8), latent=8,
                        context=32, batch=2),
    # SD v1.4 at 512×512
    "sd14": lambda: dict(unet=UNetConfig(), vae=VAEConfig(), latent=64, context=768, batch=8),
}
ABLATION = ["baseline", "+ cached latents", "+ fused AdamW", "+ bf16 autocast", "+ channels-last", "+ torch.compile",
            "+ checkpointing", "+ 8-bit Adam"]
LR = 1e-5
TARGET_SAMPLES_PER_S = 100   # GPU: full U-Net at 512², one H100
TARGET_PEAK_GIB = 24         # GPU: full-U-Net fine-tune with checkpointing
TARGET_VS_DIFFUSERS = 1.3    # GPU: minidiff's best row over diffusers' best row, same run


def alphas_cumprod(device):
    """SD v1's ᾱ_t (scaled_linear β from 0.00085 to 0.012, T = 1000) [T]."""
    return torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0).to(device)


class Trainer:
    """minidiff's step on a fresh U-Net: `features` picks what is on (the ablation's names, or the compare rows')."""

    def __init__(self, cfg: dict, device, features: set, data: dict, seed=0):
        self.f, self.device, self.data = features, device, data
        torch.manual_seed(seed)
        self.unet = UNet(cfg["unet"]).to(device).train()
        if "+ checkpointing" in features:
            self.unet.enable_gradient_checkpointing()
        if "+ channels-last" in features:
            self.unet.to(memory_format=torch.channels_last)
        self.model = loop.compile_for_training(self.unet, device) if "+ torch.compile" in features else self.unet
        self.params = list(self.unet.parameters())
        if "+ 8-bit Adam" in features:
            import bitsandbytes as bnb
            self.opt = bnb.optim.AdamW8bit(self.params, lr=LR)
        elif "+ fused AdamW" in features:
            self.opt = make_optimizer(self.params, LR, device)      # what minidiff finetune runs: fused where it can
        else:
            self.opt = torch.optim.AdamW(self.params, lr=LR, fused=False)
        self.alphas = alphas_cumprod(device)
        self.g = torch.Generator(device).manual_seed(seed)
        precision = "bf16" if "+ bf16 autocast" in features else "no"
        self.autocast = loop.autocast_for(device, precision)
        self.clip = 1.0 if "clip" in features else None

    def loss(self, _batch):
        data = self.data
        if "+ cached latents" in self.f:
            z0 = data["latents"]
        else:
            with torch.no_grad():
                z0 = data["vae"].encode(data["images"]).mode() * data["vae"].config.scaling_factor
        B = z0.shape[0]
        t = torch.randint(0, 1000, (B,), generator=self.g, device=self.device)
        eps = torch.randn(z0.shape, generator=self.g, device=self.device)
        a = self.alphas[t].view(B, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = self.model(zt, t, data["context"])          # train_step runs this under self.autocast
        return diffusion_loss(pred, eps, t, self.alphas)

    def step(self):
        return loop.train_step([None], self.loss, self.opt, self.params, autocast=self.autocast,
                               max_grad_norm=self.clip).loss


class DiffusersTrainer:
    """The core of diffusers' train_text_to_image.py, on the same weights as Trainer's U-Net (same seed)."""

    def __init__(self, cfg: dict, device, features: set, data: dict, seed=0):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        self.device, self.data = device, data
        torch.manual_seed(seed)
        weights = UNet(cfg["unet"]).state_dict()                 # minidiff's names are diffusers' names
        kwargs = {k: v for k, v in cfg["unet"].to_diffusers().items() if not k.startswith("_")}
        self.unet = UNet2DConditionModel(**kwargs)
        self.unet.load_state_dict(weights)
        self.unet.to(device).train()
        if "+ checkpointing" in features:
            self.unet.enable_gradient_checkpointing()
        self.model = torch.compile(self.unet, **loop.training_compile_options(device)) \
            if "+ torch.compile" in features else self.unet
        self.noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000)
        self.params = list(self.unet.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)   # "constant"
        self.g = torch.Generator(device).manual_seed(seed)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
            if "+ bf16 autocast" in features else nullcontext
        self.train_loss = 0.0

    def step(self):
        latents, context = self.data["latents"], self.data["context"]
        noise = torch.randn(latents.shape, generator=self.g, device=self.device)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, 1000, (bsz,), generator=self.g, device=self.device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.autocast():
            model_pred = self.model(noisy_latents, timesteps, context, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        self.train_loss += loss.detach().mean().item()           # the script's logging: avg_loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad()
        return self.train_loss


def make_data(cfg, device):
    g = torch.Generator().manual_seed(0)
    B, n = cfg["batch"], cfg["latent"]
    f = cfg["vae"].downsample_factor
    images = (torch.rand(B, 3, n * f, n * f, generator=g) * 2 - 1).to(device)
    context = torch.randn(B, 77, cfg["context"], generator=g).to(device)
    vae = AutoencoderKL(cfg["vae"]).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).mode() * vae.config.scaling_factor
    return dict(images=images, context=context, latents=latents, vae=vae)


def ablation_features(name: str, names: list[str]) -> set:
    """Cumulative: every variant up to `name` (checkpointing and 8-bit Adam are added on top of the full stack)."""
    order = [v for v in names if v not in ("+ checkpointing", "+ 8-bit Adam")]
    if name in order:
        return set(order[: order.index(name) + 1])
    return set(order) | {name}


def compare_rows(device, precision: str, libraries: list[str], checkpointing: bool) -> dict:
    """{row name: (library, features)} of the compare table: each library eager and compiled (± checkpointing)."""
    base = {"+ cached latents", "+ fused AdamW", "clip"} | ({"+ bf16 autocast"} if precision == "bf16" else set())
    rows = {}
    for ck in ([False, True] if checkpointing else [False]):
        for lib in libraries:
            for compiled in (False, True):
                feats = set(base) | ({"+ torch.compile"} if compiled else set())
                feats |= {"+ checkpointing"} if ck else set()
                name = f"{lib} {'compiled' if compiled else 'eager'}{' + checkpointing' if ck else ''}"
                rows[name] = (lib, feats)
    if "minidiff" in libraries and device.type == "cuda":   # not minidiff's default yet: measured beside it
        rows["minidiff compiled + channels-last"] = ("minidiff", base | {"+ torch.compile", "+ channels-last"})
    return rows


def measure(device, cfg, rows: dict, steps: int, warmup: int = 2) -> dict:
    """{name: {"times", "peak", "first"}}: CPU interleaved rounds of one step each; CUDA one row after another.
    steps = 0: the warm-up steps only (compilation: fills inductor's caches for a later run, see gpu_session.py)."""
    data = make_data(cfg, device)
    make = {"minidiff": Trainer, "diffusers": DiffusersTrainer}
    results = {}
    if device.type == "cuda":
        for name, (lib, feats) in rows.items():
            trainer = make[lib](cfg, device, feats, data)
            t0 = time.perf_counter()
            for _ in range(warmup):
                trainer.step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            if steps == 0:
                print(f"  {name}: warm-up {first:.1f}s (warm-only)", flush=True)
                del trainer
                gc.collect()
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                continue
            with PeakMemory(device) as mem:
                times = interleaved({name: trainer.step}, steps, warmup=0, sync=torch.cuda.synchronize,
                                    progress=False)[name]
            results[name] = dict(times=times, peak=mem.peak_bytes, first=first)
            print(f"  {name}: {cfg['batch'] / median(times['wall']):.1f} samples/s, peak "
                  f"{mem.peak_bytes / 2 ** 30:.1f} GiB, warm-up {first:.1f}s", flush=True)
            del trainer
            gc.collect()
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        return results
    trainers, peaks, firsts = {}, {}, {}
    for name, (lib, feats) in rows.items():
        trainers[name] = trainer = make[lib](cfg, device, feats, data)
        t0 = time.perf_counter()   # warm-up (and compilation); the first call's peak memory
        for _ in range(warmup - 1):
            trainer.step()
        with PeakMemory("cpu") as mem:
            trainer.step()
        firsts[name] = time.perf_counter() - t0
        peaks[name] = (mem.peak_bytes - mem.base_bytes) if mem.peak_bytes else None
        print(f"  {name}: warm-up {firsts[name]:.1f}s", flush=True)
    if steps == 0:
        return results
    timed = interleaved({k: tr.step for k, tr in trainers.items()}, steps, warmup=0)
    for name in rows:
        results[name] = dict(times=timed[name], peak=peaks[name], first=firsts[name])
    return results


def table_rows(results: dict, batch: int, config: str, precision: str) -> tuple[list, dict]:
    rows, sps_of, base = [], {}, None
    for name, r in results.items():
        wall = median(r["times"]["wall"])
        sps = batch / wall
        sps_of[name] = sps
        base = base or sps
        peak = f"{r['peak'] / 2 ** 30:.2f}" if r["peak"] is not None else "n/a"
        rows.append([config, precision, name, f"{wall:.3f}", f"{sps:.2f}", f"{sps / base:.2f}×",
                     f"{median(r['times']['cpu']):.2f}", peak, f"{r['first']:.1f}"])
    return rows, sps_of


def config_note(config, cfg) -> str:
    u = cfg["unet"]
    n = sum(p.numel() for p in UNet(u).parameters()) / 1e6
    return (f"{config} U-Net: block_out_channels={u.block_out_channels}, layers_per_block={u.layers_per_block}, "
            f"cross_attention={u.cross_attention}, {n:.1f} M parameters; latents {cfg['batch']}×4×{cfg['latent']}×"
            f"{cfg['latent']}, context {cfg['batch']}×77×{cfg['context']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=None,
                   help=f"comma-separated from {list(CONFIGS)} (default: tiny,small on the CPU, sd14 on CUDA)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="autocast (default: fp32 CPU, bf16 CUDA)")
    p.add_argument("--libraries", default=None, help="minidiff,diffusers (default: both)")
    p.add_argument("--no-checkpointing", action="store_true", help="CUDA: leave out the gradient-checkpointing rows")
    p.add_argument("--checkpointing", action="store_true", help="CPU: add the gradient-checkpointing rows")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of the rows, by name (e.g. 'minidiff compiled')")
    p.add_argument("--warm-only", action="store_true",
                   help="only the warm-up steps (compilation fills inductor's caches); nothing measured or appended")
    p.add_argument("--ablation", action="store_true", help="minidiff only, one speed-up at a time")
    p.add_argument("--variants", default=None, help="--ablation: comma-separated subset of: " + ", ".join(ABLATION))
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 5 CPU, 20 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: the config's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda asked for, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    configs = (args.config or ("sd14" if cuda else "tiny,small")).split(",")
    precision = args.precision or ("bf16" if cuda else "fp32")
    steps = args.steps or (20 if cuda else 5)
    libraries = (args.libraries or "minidiff,diffusers").split(",")
    load_before = load_average()
    all_rows, summary, notes, results_all = [], {}, [], {}
    for config in configs:
        cfg = CONFIGS[config]()
        if args.batch:
            cfg["batch"] = args.batch
        if args.ablation:
            names = args.variants.split(",") if args.variants else list(ABLATION)
            if "+ 8-bit Adam" in names and not cuda:
                names.remove("+ 8-bit Adam")
                print("skipping 8-bit Adam (bitsandbytes runs on CUDA only)")
            rows = {n: ("minidiff", ablation_features(n, names)) for n in names}
        else:
            rows = compare_rows(device, precision, libraries,
                                checkpointing=(cuda or args.checkpointing) and not args.no_checkpointing)
        if args.rows:
            unknown = set(args.rows.split(",")) - set(rows)
            if unknown:
                raise SystemExit(f"bench_train: unknown rows {sorted(unknown)}; the rows are {list(rows)}")
            rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
        print(f"training bench: {config} U-Net on {args.device}, {precision}, rows: {', '.join(rows)}", flush=True)
        torch._dynamo.reset()
        results = measure(device, cfg, rows, 0 if args.warm_only else steps)
        if args.warm_only:
            continue
        results_all[config] = results
        table, sps = table_rows(results, cfg["batch"], config, "per row" if args.ablation else precision)
        all_rows += table
        summary[config] = sps
        notes.append(config_note(config, cfg))
    if args.warm_only:
        print("(--warm-only: warm-up steps ran; nothing measured, nothing appended)")
        return [], {}
    headers = ["U-Net", "precision", "row", "median s/step", "samples/s", "÷ first row", "CPU s/step",
               "peak GiB" if cuda else "peak extra GiB", "warm-up s (incl. compile)"]
    table = md_table(headers, all_rows)
    print("\n" + table)
    notes += [
        "rows: " + ("--ablation: cumulative down to '+ torch.compile'; '+ checkpointing' and '+ 8-bit Adam' each on "
                    "that full stack" if args.ablation else
                    "each library eager and compiled; minidiff = train.loop.train_step with make_optimizer's AdamW "
                    "(fused) and clipping at 1; compiled = loop.compile_for_training (`finetune --compile`); "
                    "+ channels-last: the U-Net's weights in NHWC too (not a default: measured here); diffusers = "
                    "train_text_to_image.py's step core (AdamW foreach, clip_grad_norm_, loss.item() per step), "
                    "compiled with the same torch.compile options; latents cached and text context precomputed for "
                    "both"),
        ("peak GiB = torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer state, "
         "activations)") if cuda else
        ("peak extra GiB = peak resident memory during one step minus the resident memory before it (activations, "
         "gradients, transient buffers; weights and optimizer state were allocated before)"),
        "CPU: rows interleaved, one step each per round, medians; CPU s/step = this process's CPU time (all threads), "
        "less sensitive to other processes' load; the machine is shared (see the load average)" if not cuda else
        f"CUDA: rows one after another, each after {2} warm-up steps (compilation), synchronized; targets: ≥ "
        f"{TARGET_SAMPLES_PER_S} samples/s, ≥ {TARGET_VS_DIFFUSERS}× diffusers' best row, < {TARGET_PEAK_GIB} GiB with "
        "checkpointing",
        f"torch threads {torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    ]
    if cuda and not args.ablation:
        for config, sps in summary.items():
            best_m = max((v, k) for k, v in sps.items() if k.startswith("minidiff"))
            best_d = max(((v, k) for k, v in sps.items() if k.startswith("diffusers")), default=None)
            line = (f"{config}: best minidiff row {best_m[1]!r} {best_m[0]:.1f} samples/s (target ≥ "
                    f"{TARGET_SAMPLES_PER_S}: {'met' if best_m[0] >= TARGET_SAMPLES_PER_S else 'NOT met'})")
            if best_d:
                r = best_m[0] / best_d[0]
                line += (f"; ÷ diffusers' best row {best_d[1]!r} ({best_d[0]:.1f}) = {r:.2f}× (target ≥ "
                         f"{TARGET_VS_DIFFUSERS}: {'met' if r >= TARGET_VS_DIFFUSERS else 'NOT met'})")
            notes.append(line)
    for n in notes:
        print("-", n)
    if not args.no_append:
        what = "ablation" if args.ablation else "eager vs compiled, minidiff vs diffusers"
        append_section(f"Training step ({what}), {'/'.join(configs)} U-Net on {args.device}", table, notes,
                       load_before)
    return all_rows, results_all


if __name__ == "__main__":
    main()
