"""The GPU benchmark in one command: SD v1.4 text-to-image, minidiff vs diffusers, then the training rows.

    python benchmarks/bench_gpu.py                      # random weights at full SD v1.4 size, fp16 and bf16, + training
    python benchmarks/bench_gpu.py --model weights/stable-diffusion-v1-4   # the real weights (a folder or a file)
    python benchmarks/bench_gpu.py --no-train --dtypes fp16                # inference rows only, one dtype
    python benchmarks/bench_gpu.py --smoke --device cpu --no-train         # tiny random model on a CPU (< 1 min)
    python benchmarks/bench_gpu.py --placeholder        # measure nothing: append the table with 'not measured yet'

Inference: 512×512, 50 PNDM steps, guidance 7.5, batch 1 (the U-Net runs batch 2: classifier-free guidance), the same
prompt and seed for every row, in each dtype five variants:

  diffusers                    StableDiffusionPipeline as its users run it by default (AttnProcessor2_0 = torch SDPA)
  diffusers + torch.compile    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
  minidiff                     StableDiffusion.generate's default kernels (eager CUDA: PyTorch's own)
  minidiff + compile           minidiff.speed.compile_pipeline (U-Net with CUDA graphs, VAE decoder, text encoder),
                               our Triton ops inside (minidiff.kernels.compiled_triton_ops(): all four by default)
  minidiff + compile (ref.)    the same with kernels.set_compiled_triton_ops("none"): the reference expressions,
                               which inductor fuses into kernels of its own — does each Triton op of ours beat that?

Both libraries read the very same weights: by default a diffusers pipeline with random weights is built from SD v1.4's
published configs, saved to a temporary folder, and loaded from there by diffusers and by minidiff.load.
For every row: one warm-up call (it compiles the compiled variants), then --repeats timed calls, medians reported:
  it/s      = (n − 1) / (t_last − t_first), t_i taken by a per-step callback after torch.cuda.synchronize
  s/image   = the whole call (prompt encoding, the steps, VAE decode), synchronized
  peak GiB  = torch.cuda.max_memory_allocated over the timed calls (_common.PeakMemory)
Then bench_train.main(["--device", "cuda"]) measures training samples/s and peak memory on the full U-Net at 512²
(it appends its own section), and this script appends one section with the inference table and the targets:
≥ 165 it/s on one H100, ≥ 100 training samples/s, a full-U-Net fine-tune under 24 GiB with checkpointing.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from _common import REPO, PeakMemory, append_section, load_average, md_table, median

import torch  # noqa: E402  (after _common put the repo on sys.path)

import bench_train  # noqa: E402
import minidiff  # noqa: E402
from minidiff import kernels, speed  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
# the published SD v1.4 configs and the toy ones, in one place: the tests' random-weight fixtures
from sd_fixtures import (SD14_TEXT, SD14_UNET, SD14_VAE, SD_SCHEDULER, TINY_TEXT, TINY_UNET,  # noqa: E402
                         TINY_VAE)

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")  # newer diffusers say dtype=; older need this
GUIDANCE = 7.5
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ["diffusers", "diffusers + torch.compile", "minidiff", "minidiff + compile",
            "minidiff + compile (reference ops)"]
COMPILED = {"diffusers + torch.compile", "minidiff + compile", "minidiff + compile (reference ops)"}
LABELS = {"diffusers": "diffusers (SDPA processor, default)",
          "diffusers + torch.compile": "diffusers + torch.compile (reduce-overhead, fullgraph)",
          "minidiff": "**minidiff** (generate() default kernels)",
          "minidiff + compile": "**minidiff + compile** (speed.compile_pipeline; our Triton ops)",
          "minidiff + compile (reference ops)": "**minidiff + compile, reference ops** (inductor fuses them)"}
TARGET_IT_S = 165                                     # one H100, 512², 50 PNDM steps, batch 1
TARGET_SAMPLES_PER_S = bench_train.TARGET_SAMPLES_PER_S
TARGET_PEAK_GIB = bench_train.TARGET_PEAK_GIB
NOT_MEASURED = "not measured yet"
COMMAND = "python benchmarks/bench_gpu.py"



# ------------------------------------------------------------------------------------------------------ the weights
def random_model_folder(folder: Path, smoke: bool) -> Path:
    """A diffusers StableDiffusionPipeline with random weights, saved to `folder`: the one set of weights both
    libraries then load, so every difference in the table is the code's, not the weights'."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # --smoke: SD v1's layout at toy width (the tests' TINY_* configs), so every code path runs in seconds on a CPU
    unet_cfg, vae_cfg, text_cfg = (TINY_UNET, TINY_VAE, TINY_TEXT) if smoke else (SD14_UNET, SD14_VAE, SD14_TEXT)
    vocab = REPO / "weights" / "clip-tokenizer"
    torch.manual_seed(0)
    dpipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet_cfg), vae=AutoencoderKL(**vae_cfg),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        tokenizer=CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77),
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    if smoke:  # diffusers initialises norms to exactly 1/0: jitter every weight so the parity check means something
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for part in ("unet", "vae", "text_encoder"):
                for p in dpipe.components[part].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    dpipe.save_pretrained(str(folder))
    return folder


def load_diffusers(model: Path, dtype, device, converted: dict):
    from diffusers import StableDiffusionPipeline

    if model.is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, safety_checker=None)
    else:
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(model), torch_dtype=dtype, safety_checker=None)
        except Exception as e:  # noqa: BLE001  offline, from_single_file cannot fetch the reference config it needs
            if "folder" not in converted:
                print(f"  diffusers.from_single_file failed ({type(e).__name__}: {str(e)[:200]}); diffusers reads "
                      "minidiff's conversion of the file to a diffusers folder instead", flush=True)
                converted["folder"] = Path(converted["tmp"]) / "converted"
                minidiff.save(minidiff.load(model), converted["folder"], format="diffusers")
            pipe = StableDiffusionPipeline.from_pretrained(str(converted["folder"]), torch_dtype=dtype,
                                                           safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def free(device):
    gc.collect()
    torch._dynamo.reset()  # drop compiled graphs (and their CUDA-graph memory pools) before the next variant
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------- measuring
def diffusers_call(pipe, steps, size):
    def run(on_step):
        def cb(p, i, t, kwargs):  # diffusers' per-step hook must hand back the tensors it was given
            on_step()
            return kwargs
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt",
                    callback_on_step_end=cb).images
    return run


def minidiff_call(pipe, steps, size):
    def run(on_step):
        return pipe.generate(PROMPT, steps=steps, guidance_scale=GUIDANCE, height=size, width=size, seed=SEED,
                             output="tensor", progress=False, callback=lambda i, t, z: on_step())
    return run


def measure(run, device, repeats: int) -> dict:
    """One warm-up call, then `repeats` timed calls (0: the warm-up only, to fill the compile caches: see
    gpu_session.py). -> it/s, s/image (medians), peak bytes, warm-up s, the image."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stamps = []

    def on_step():  # after every denoising step: wait for the GPU, so the stamp is when the step really finished
        sync()
        stamps.append(time.perf_counter())

    def timed():
        stamps.clear()
        sync()
        t0 = time.perf_counter()
        image = run(on_step)
        sync()
        return image, time.perf_counter() - t0

    image, warmup = timed()
    if repeats == 0:
        print(f"    warm-up {warmup:.1f}s (warm-only)", flush=True)
        return dict(it_s=float("nan"), s_image=float("nan"), peak=None, warmup=warmup, image=image.float().cpu())
    its, secs = [], []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            _, s = timed()
            secs.append(s)
            its.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    # CUDA: the allocator's peak (weights included); CPU: peak resident size minus the size before the calls
    peak = mem.peak_bytes if cuda else (mem.peak_bytes - mem.base_bytes if mem.peak_bytes else None)
    print(f"    warm-up {warmup:.1f}s, {median(its):.2f} it/s, {median(secs):.2f} s/image", flush=True)
    return dict(it_s=median(its), s_image=median(secs), peak=peak, warmup=warmup, image=image.float().cpu())


def run_variant(results: dict, name: str, make_run, device, repeats):
    """Measure one variant; a failure (a graph break under fullgraph=True, out of memory) is recorded, not fatal."""
    print(f"  {name}:", flush=True)
    try:
        results[name] = measure(make_run(), device, repeats)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        results[name] = dict(error=f"failed: {type(e).__name__}")


def inference(args, device, model: Path, converted: dict) -> dict:
    """-> {dtype name: {variant: result}}; each library's pipeline is loaded, measured and freed in turn."""
    out = {}
    wanted = args.variants.split(",") if args.variants else VARIANTS
    repeats = 0 if args.warm_only else args.repeats
    for dname in args.dtypes.split(","):
        compile_ok = (device.type == "cuda" or args.compile_on_cpu) and (
            args.compile_dtypes is None or dname in args.compile_dtypes.split(","))
        dtype, res = DTYPES[dname], {}
        out[dname] = res
        print(f"{dname}:", flush=True)

        def want(name):
            return name in wanted and (compile_ok or name not in COMPILED) and not (args.warm_only and
                                                                                     name not in COMPILED)
        if want("diffusers") or want("diffusers + torch.compile"):
            pipe = load_diffusers(model, dtype, device, converted)
            if want("diffusers"):
                run_variant(res, "diffusers", lambda: diffusers_call(pipe, args.steps, args.size), device, repeats)
            if want("diffusers + torch.compile"):
                pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
                run_variant(res, "diffusers + torch.compile", lambda: diffusers_call(pipe, args.steps, args.size),
                            device, repeats)
            del pipe
            free(device)

        if any(want(n) for n in VARIANTS if n.startswith("minidiff")):
            pipe = minidiff.load(model, device=device, dtype=dtype)
            if want("minidiff"):
                run_variant(res, "minidiff", lambda: minidiff_call(pipe, args.steps, args.size), device, repeats)
            for name, ops in (("minidiff + compile", "all"), ("minidiff + compile (reference ops)", "none")):
                if want(name):
                    torch._dynamo.reset()                      # retrace with this choice of ops
                    kernels.set_compiled_triton_ops(ops)
                    speed.compile_pipeline(pipe)
                    try:
                        run_variant(res, name, lambda: minidiff_call(pipe, args.steps, args.size), device, repeats)
                    finally:
                        kernels.set_compiled_triton_ops("all")
            del pipe
            free(device)
        for name in VARIANTS:
            res.setdefault(name, dict(error="not run (--variants)" if name not in wanted else
                                      "not run (--compile-dtypes)" if device.type == "cuda" else
                                      "skipped on CPU (--compile-on-cpu)"))
    return out


# -------------------------------------------------------------------------------------------------------- the tables
def inference_headers(cuda: bool) -> list[str]:
    return ["dtype", "variant", "it/s (denoising loop)", "s/image", "it/s ÷ diffusers", "peak GiB" if cuda else
            "peak extra GiB", "max abs Δ vs diffusers image", "warm-up s"]


def inference_rows(results: dict | None, dtypes: list[str]) -> list[list]:
    """results None: the placeholder rows, every number cell 'not measured yet'."""
    rows = []
    for dname in dtypes:
        res = results[dname] if results else {}
        ref = res.get("diffusers", {})
        for name in VARIANTS:
            r = res.get(name)
            if r is None:
                rows.append([dname, LABELS[name]] + [NOT_MEASURED] * 6)
            elif "error" in r:
                rows.append([dname, LABELS[name]] + [r["error"]] + ["—"] * 5)
            else:
                ratio = f"{r['it_s'] / ref['it_s']:.2f}×" if "it_s" in ref else "—"
                diff = "(reference)" if name == "diffusers" else (
                    f"{(r['image'] - ref['image']).abs().max().item():.1e}" if "image" in ref else "—")
                peak = f"{r['peak'] / 2 ** 30:.2f}" if r["peak"] is not None else "n/a"
                rows.append([dname, LABELS[name], f"{r['it_s']:.2f}", f"{r['s_image']:.2f}", ratio, peak, diff,
                             f"{r['warmup']:.1f}"])
    return rows


def verdict(ok: bool | None, judge: bool = True) -> str:
    if not judge:  # a CPU or --smoke run: the targets are for the full model on one GPU
        return "— (not a full-size GPU run)"
    return NOT_MEASURED if ok is None else ("met" if ok else "**NOT met**")


def target_rows(inf: dict | None, train: dict | None, dtypes: list[str], judge: bool) -> list[list]:
    """The issue's three targets and the training peaks with and without the memory savers.
    inf / train None: not measured (placeholder); train may also be {"error": why}; judge: give met / NOT met."""
    best = None
    if inf:
        measured = [(r["it_s"], d, n) for d in dtypes for n, r in inf[d].items() if n.startswith("minidiff")
                    and "it_s" in r]
        best = max(measured, default=None)
    it_cell = f"{best[0]:.1f} ({best[1]}, {best[2]})" if best else (NOT_MEASURED if inf is None else "no minidiff row")
    rows = [[f"inference ≥ {TARGET_IT_S} it/s (best minidiff row; one H100)", it_cell,
             verdict(None if best is None else best[0] >= TARGET_IT_S, judge)]]

    if train is None or "error" in train:
        why = NOT_MEASURED if train is None else train["error"]
        sps = ck = plain = adam8 = (why, verdict(None) if train is None else "—")
    else:   # bench_train's compare rows: "<library> <eager|compiled>[ + checkpointing]"
        gib = {name: r["peak"] / 2 ** 30 for name, r in train["results"].items() if r["peak"] is not None}
        mini = {k: v for k, v in train["samples_per_s"].items() if k.startswith("minidiff")}
        best_name, best_sps = max(mini.items(), key=lambda kv: kv[1])

        def peak(names, target=None):
            found = [(gib[n], n) for n in names if n in gib]
            if not found:
                return "not run", "—"
            g, n = min(found)
            return f"{g:.2f} ({n})", "—" if target is None else verdict(g < target, judge)
        sps = f"{best_sps:.1f} ({best_name})", verdict(best_sps >= TARGET_SAMPLES_PER_S, judge)
        ck = peak(["minidiff compiled + checkpointing", "minidiff eager + checkpointing"], TARGET_PEAK_GIB)
        plain, adam8 = peak(["minidiff compiled", "minidiff eager"]), ("not run", "—")
    rows += [[f"training ≥ {TARGET_SAMPLES_PER_S} samples/s (full U-Net, 512², best variant)", *sps],
             [f"training peak GiB with checkpointing < {TARGET_PEAK_GIB}", *ck],
             ["training peak GiB, full stack without checkpointing (AdamW)", *plain],
             ["training peak GiB, full stack + 8-bit Adam (no checkpointing)", *adam8]]
    return rows


def tables(cuda: bool, inf, train, dtypes, judge: bool = True) -> str:
    return (md_table(inference_headers(cuda), inference_rows(inf, dtypes)) + "\n\n"
            + md_table(["target", "measured", "verdict"], target_rows(inf, train, dtypes, judge)))


def notes_for(args, model_desc: str, cuda: bool = True) -> list[str]:
    notes = [
        f"weights: {model_desc}; prompt {PROMPT!r}, seed {SEED} (initial noise drawn on the CPU, as both libraries "
        f"do), {args.size}×{args.size}, {args.steps} PNDM steps, guidance {GUIDANCE}, batch 1 (the U-Net runs "
        "batch 2: classifier-free guidance)",
        "diffusers: StableDiffusionPipeline (default AttnProcessor2_0 = torch SDPA); + torch.compile: "
        "`pipe.unet = torch.compile(pipe.unet, mode=\"reduce-overhead\", fullgraph=True)`; minidiff: "
        "`generate()`'s default kernels (Triton on CUDA); + compile: `speed.compile_pipeline` (U-Net "
        "reduce-overhead = CUDA graphs, VAE decoder and text encoder default mode)",
        "it/s = (n − 1) / (t_last − t_first) over the per-step callbacks (diffusers `callback_on_step_end`, "
        "minidiff `generate(callback=)`), each stamp after torch.cuda.synchronize (both libraries pay that sync "
        f"alike); s/image = the whole call, synchronized; medians of {args.repeats} calls after one warm-up call "
        "(which compiles); it/s ÷ diffusers = over the diffusers (SDPA) row of the same dtype",
        ("peak GiB = torch.cuda.max_memory_allocated over the timed calls (weights included)" if cuda else
         "peak extra GiB = peak resident memory during the timed calls minus the resident memory before them")
        + "; max abs Δ = largest absolute difference of the output image (values in [0, 1]) from the diffusers (SDPA) "
        "image of the same dtype",
    ]
    if "fp16" in args.dtypes.split(","):
        notes.append("fp16: minidiff keeps the VAE in fp32 (fp16 decoder activations overflow with the real "
                     "weights: black images), diffusers' StableDiffusionPipeline decodes in fp16; this is in s/image, "
                     "not in it/s")
    notes.append("training not run (--no-train)" if args.no_train else
                 f"training: `bench_train.main([\"--device\", \"{args.device}\"])`, the full SD v1.4 U-Net at 512² "
                 "(64×64 latents), batch 8; its per-variant rows are in the section 'Training step, sd14 U-Net on "
                 "cuda' that it appends just before this one")
    return notes


# ------------------------------------------------------------------------------------------------------------- main
def training(args) -> dict:
    """bench_train's rows (it appends its own section) -> {"results", "samples_per_s"} or {"error": why}."""
    argv = ["--device", args.device]
    if args.smoke:  # a small U-Net, eager rows: the wiring is what a smoke run checks
        argv += ["--config", "tiny", "--steps", "2", "--batch", "2", "--libraries", "minidiff"]
    if args.no_append or args.smoke:
        argv.append("--no-append")
    print("training: bench_train.main(" + repr(argv) + ")", flush=True)
    try:
        rows, results = bench_train.main(argv)
    except Exception as e:  # noqa: BLE001  (keep the inference rows of a long run)
        traceback.print_exc()
        return {"error": f"failed: {type(e).__name__}"}
    config = next(iter(results))
    return {"results": results[config], "samples_per_s": {r[2]: float(r[4]) for r in rows if r[0] == config}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="an SD v1.4 diffusers folder or single file (default: random weights at full SD v1.4 size, "
                        "built into a temporary folder; `python benchmarks/bench_gpu.py --save-random DIR` keeps one)")
    p.add_argument("--save-random", type=Path, default=None,
                   help="only write the random-weight model folder to this path (--smoke: the toy one) and exit")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; --smoke: 32)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dtypes", default=None, help="comma-separated fp16,bf16,fp32 (default fp16,bf16; --smoke: fp32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median reported)")
    p.add_argument("--no-train", action="store_true", help="skip the training rows (bench_train)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random model, to check the script end to end on a CPU (never appends)")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the compiled variants on the CPU too (slow)")
    p.add_argument("--compile-dtypes", default=None,
                   help="comma-separated dtypes that get the compiled variants (default: all; compiling takes minutes)")
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--warm-only", action="store_true",
                   help="only the compiled variants' first calls (fills inductor's caches; appends nothing)")
    p.add_argument("--placeholder", action="store_true",
                   help="measure nothing; append the section with every number 'not measured yet'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    args.dtypes = args.dtypes or ("fp32" if args.smoke else "fp16,bf16")
    args.size = args.size or (32 if args.smoke else 512)
    dtypes = args.dtypes.split(",")
    title = "GPU: SD v1.4 at 512², minidiff vs diffusers (inference it/s, s/image, memory) and training"

    if args.save_random:
        if not (args.save_random / "model_index.json").is_file():
            random_model_folder(args.save_random, args.smoke)
        print(args.save_random)
        return

    if args.placeholder:
        notes = [f"not measured yet: no CUDA GPU on the machine that wrote this section (the machine and versions "
                 f"lines above are that machine's). To measure, run `{COMMAND}` on a CUDA machine (one H100 for the "
                 "targets); it appends this section with numbers, after the training section bench_train appends",
                 *notes_for(args, "random weights at full SD v1.4 size (or `--model PATH`)")]
        text = tables(True, None, None, dtypes)
        if args.no_append:
            print(text + "\n\n" + "\n".join("- " + n for n in notes))
        else:
            append_section(title + " (not measured yet)", text, notes)
        return

    if args.steps < 2:
        raise SystemExit("bench_gpu: --steps must be at least 2 (it/s needs two step stamps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_gpu: --device {args.device} asked for, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}); without a GPU: --smoke --device cpu, or --placeholder")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        converted = {"tmp": tmp}
        if args.model is None:
            print("building random weights at " + ("smoke" if args.smoke else "full SD v1.4") + " size ...", flush=True)
            model = random_model_folder(Path(tmp) / "sd", args.smoke)
            model_desc = ("a tiny random SD-shaped model (--smoke)" if args.smoke else
                          "random weights at full SD v1.4 size (diffusers' default init), saved once, read by both")
        else:
            model, model_desc = args.model, f"`{args.model}`"
        inf = inference(args, device, model, converted)
        if "folder" in converted:
            model_desc += " (diffusers read minidiff's conversion of it: from_single_file failed)"
    if args.warm_only:
        print("(--warm-only: the compiled variants' first calls ran; nothing measured, nothing appended)")
        return
    train = {"error": "not run (--no-train)"} if args.no_train else training(args)

    cuda = device.type == "cuda"
    text = tables(cuda, inf, train, dtypes, judge=cuda and not args.smoke)
    print("\n" + text + "\n")
    notes = notes_for(args, model_desc, cuda)
    for n in notes:
        print("-", n)
    if args.smoke:
        print("(--smoke: a toy model, not a benchmark; nothing appended)")
    elif not args.no_append:
        append_section(title, text, notes, load_before)


if __name__ == "__main__":
    main()
