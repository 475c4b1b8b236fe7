"""One guided U-Net step at full SD v1.4 size on the CPU: minidiff vs diffusers, same weights, same process.

    python benchmarks/bench_unet_cpu.py                  # fp32 and bf16, eager, 5 interleaved rounds
    python benchmarks/bench_unet_cpu.py --compiled       # + torch.compile rows (minutes of compiling on 2 cores)
    python benchmarks/bench_unet_cpu.py --extra-rows     # + diffusers with channels-last, minidiff on reference kernels

The step: batch 2 (classifier-free guidance doubles batch 1), 64×64×4 latents (512×512 images), 77×768 text context.
Random weights (PyTorch's default init), created once and shared: minidiff's UNet and diffusers' UNet2DConditionModel
are built on the meta device and given the very same tensors (load_state_dict(assign=True)), so the comparison costs
one copy of the weights per dtype (plus the packed copy of the conv weights that minidiff's oneDNN kernels cache).

diffusers runs as its users run it by default: UNet2DConditionModel with its default attention processor
(AttnProcessor2_0 = torch's SDPA). minidiff runs what `StableDiffusion.generate` runs: its default kernels (minidiff.kernels).
Every variant is timed once per round, round after round (a, b, a, b, ...), so a change in the machine's load hits
all alike; the table gives medians, and ratio = minidiff time / diffusers time (same dtype, same mode).
"""
from __future__ import annotations

import argparse
import gc
import time

from _common import append_section, interleaved, load_average, md_table, median

import torch  # noqa: E402  (after _common put the repo on sys.path)

from minidiff import kernels, speed  # noqa: E402
from minidiff.unet import UNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = 0.9


def build_models(sd: dict, cfg: UNetConfig, extra: bool) -> dict:
    """name -> nn.Module, all sharing the tensors of `sd` (except channels-last conv weights)."""
    from diffusers import UNet2DConditionModel

    def attach(make):
        with torch.device("meta"):
            model = make()
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    diffusers_kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    models = {"diffusers": attach(lambda: UNet2DConditionModel(**diffusers_kwargs))}
    minidiff = attach(lambda: UNet(cfg))
    if extra:
        models["minidiff-reference"] = ReferenceKernels(minidiff)   # the same module on kernels.use("reference")
        d = attach(lambda: UNet2DConditionModel(**diffusers_kwargs))
        models["diffusers+channels_last"] = d.to(memory_format=torch.channels_last)   # its own NHWC copy
    models["minidiff"] = minidiff
    return models


class ReferenceKernels(torch.nn.Module):
    """The same minidiff module, run on the reference kernels (what `pipe.fast = False` runs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        with kernels.use("reference"):
            return self.model(*args)


def call(model, x, t, c):
    out = model(x, t, c)
    return out.sample if hasattr(out, "sample") else out


def measure(models: dict, inputs, n: int) -> tuple[dict, dict, dict]:
    """-> (timings, peak extra memory in bytes, max relative difference to diffusers' output)."""
    ref = None
    peaks, diffs = {}, {}
    with torch.inference_mode():
        for name, model in models.items():       # first call: also the warm-up (and the compilation, if compiled)
            with speed.PeakMemory("cpu") as mem:
                t0 = time.perf_counter()
                out = call(model, *inputs).float()
                first = time.perf_counter() - t0
            peaks[name] = (mem.peak_bytes - mem.base_bytes) if mem.peak_bytes else None
            if ref is None:
                ref = out
            diffs[name] = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"  {name}: first call {first:.1f}s, max |Δ| / max |diffusers| = {diffs[name]:.1e}", flush=True)
        fns = {name: (lambda m=model: call(m, *inputs)) for name, model in models.items()}
        times = interleaved(fns, n, warmup=0)
    return times, peaks, diffs


def rows_for(dtype_name, mode, times, peaks, diffs, first_calls=None):
    base = median(times["diffusers"]["wall"])
    base_cpu = median(times["diffusers"]["cpu"])
    rows, ratios = [], {}
    for name, t in times.items():
        wall, cpu = median(t["wall"]), median(t["cpu"])
        ratio = wall / base
        if name == "minidiff":
            ratios[(dtype_name, mode)] = ratio
        peak = f"{peaks[name] / 2 ** 30:.2f}" if peaks.get(name) is not None else "n/a"
        label = {"diffusers": "diffusers (SDPA processor, default)",
                 "diffusers+channels_last": "diffusers + channels_last",
                 "minidiff-reference": "minidiff on the reference kernels (fast=False)",
                 "minidiff": "**minidiff** (the default kernels: oneDNN)"}[name]
        rows.append([dtype_name, mode, label, f"{wall:.2f}", f"{min(t['wall']):.2f}", f"**{ratio:.2f}×**"
                     if name == "minidiff" else f"{ratio:.2f}×", f"{cpu:.1f}", f"{cpu / base_cpu:.2f}×", peak,
                     f"{diffs[name]:.0e}"])
    return rows, ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5, help="timed rounds per variant (median reported)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compiled", action="store_true", help="also torch.compile both (compiling takes minutes)")
    p.add_argument("--no-eager", action="store_true", help="only the compiled rows")
    p.add_argument("--extra-rows", action="store_true",
                   help="also diffusers + channels_last and minidiff's reference modules")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    cfg = UNetConfig()  # SD v1.4
    torch.manual_seed(0)
    print("building the SD v1.4 U-Net with random weights ...", flush=True)
    master = UNet(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 4, 64, 64, generator=g)
    c32 = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500, 500])

    headers = ["dtype", "mode", "model", "median s/step", "min s", "ratio (wall)", "CPU s", "ratio (CPU)",
               "peak extra GiB", "max rel Δ vs diffusers"]
    all_rows, ratios, compile_times = [], {}, {}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        sd = {k: v.to(dtype) for k, v in master.items()}
        if dname == args.dtypes.split(",")[-1]:
            del master  # the last dtype: the fp32 master copy is no longer needed
            gc.collect()
        inputs = (x32.to(dtype), t, c32.to(dtype))
        models = build_models(sd, cfg, args.extra_rows)
        if not args.no_eager:
            print(f"{dname}, eager:", flush=True)
            times, peaks, diffs = measure(models, inputs, args.n)
            rows, r = rows_for(dname, "eager", times, peaks, diffs)
            all_rows += rows
            ratios.update(r)
        if args.compiled:
            print(f"{dname}, torch.compile (the first call compiles):", flush=True)
            torch._dynamo.reset()
            compiled = {"diffusers": torch.compile(models["diffusers"]),
                        "minidiff": torch.compile(models["minidiff"], **speed.compile_options("cpu"))}
            times, peaks, diffs = measure(compiled, inputs, args.n)
            rows, r = rows_for(dname, "compiled", times, peaks, diffs)
            all_rows += rows
            ratios.update(r)
            del compiled
            torch._dynamo.reset()
        del models, sd
        gc.collect()

    table = md_table(headers, all_rows)
    print("\n" + table + "\n")
    verdict = []
    for (dname, mode), r in ratios.items():
        verdict.append(f"{dname} {mode}: minidiff/diffusers = {r:.2f}× — target ≤ {TARGET}×: "
                       f"{'met' if r <= TARGET else 'NOT met'}")
    print("\n".join(verdict))
    notes = [
        "one guided U-Net step: batch 2, latents 2×4×64×64, context 2×77×768, timestep 500; full SD v1.4 U-Net "
        "(859.5 M parameters), random weights shared by both libraries (load_state_dict(assign=True))",
        "diffusers: UNet2DConditionModel as users run it by default (AttnProcessor2_0 = torch SDPA); minidiff: "
        "its default kernels (minidiff.kernels: oneDNN linears with fused epilogues, stacked QKV, packed "
        "channels-last convolutions), the same modules `StableDiffusion.generate` runs",
        "variants timed round-robin (interleaved), medians of the rounds; ratio = minidiff / diffusers in the same "
        "dtype and mode; CPU s = process CPU time over all threads (less sensitive to other processes' load)",
        "peak extra GiB = peak resident memory during the first call minus the resident memory before it "
        "(activations and workspace, not the weights); minidiff's eager first call also makes its cached oneDNN copy "
        "of the convolution weights (a cache beside the weights, kept, so it counts again in no later row)",
        "compiled rows: diffusers with torch.compile defaults; minidiff with speed.compile_options('cpu'), the options "
        "compile_pipeline uses" if args.compiled else "compiled rows not run this time (--compiled)",
        "the machine is shared with other engineers' tests and training jobs: see the load average line; wall-clock "
        "medians move with it, the ratios of interleaved runs much less",
        *verdict,
    ]
    if not args.no_append:
        append_section("CPU: one guided SD v1.4 U-Net step, minidiff vs diffusers", table, notes, load_before)


if __name__ == "__main__":
    main()
