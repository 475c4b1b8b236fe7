"""One guided U-Net step at full SD v1.4 size on the CPU: minidiff vs diffusers (and OpenVINO), same weights, same process.

    python benchmarks/bench_unet_cpu.py                  # fp32 and bf16, eager, 5 interleaved rounds
    python benchmarks/bench_unet_cpu.py --compiled       # + torch.compile rows (minutes of compiling on 2 cores)
    python benchmarks/bench_unet_cpu.py --extra-rows     # + diffusers with channels-last, minidiff on reference kernels
    python benchmarks/bench_unet_cpu.py --no-openvino    # without the OpenVINO rows (they need `pip install openvino`)

The step: batch 2 (classifier-free guidance doubles batch 1), 64×64×4 latents (512×512 images), 77×768 text context.
Random weights (PyTorch's default init), created once and shared: minidiff's UNet and diffusers' UNet2DConditionModel
are built on the meta device and given the very same tensors (load_state_dict(assign=True)), so the comparison costs
one copy of the weights per dtype (plus the packed copy of the conv weights that minidiff's oneDNN kernels cache).

diffusers runs as its users run it by default: UNet2DConditionModel with its default attention processor
(AttnProcessor2_0 = torch's SDPA). minidiff runs what `StableDiffusion.generate` runs: its default kernels (minidiff.kernels).
OpenVINO (optional: used when `import openvino` works) is the CPU runtime a user would pick instead of PyTorch: the
same diffusers U-Net, fp32 weights, converted with `openvino.convert_model` and compiled for the CPU twice, with the
inference-precision hints f32 and bf16. A bf16 hint takes effect only where the CPU has bf16 instructions
(avx512_bf16 / AMX); the table states the precision OpenVINO reports it actually runs (INFERENCE_PRECISION_HINT).

Every variant is timed once per round, round after round (a, b, a, b, ...), so a change in the machine's load hits
all alike; the table gives medians, the ratios are over the diffusers row and the OpenVINO row of the same dtype and
mode, and every output is compared with diffusers' output in the same dtype and with diffusers' fp32 output.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from _common import REPO, PeakMemory, append_section, interleaved, isa_summary, load_average, md_table, median

import torch  # noqa: E402  (after _common put the repo on sys.path)

from minidiff import kernels, speed  # noqa: E402
from minidiff.unet import UNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"fp32": 0.8, "bf16": 0.7}   # minidiff / diffusers (issue 12); and minidiff / OpenVINO < 1 in both dtypes
OV_HINTS = {"fp32": "f32", "bf16": "bf16"}   # OpenVINO's INFERENCE_PRECISION_HINT for each dtype's table


def attach(make, sd: dict):
    """make() built on the meta device, then given the very tensors of `sd` (no copy)."""
    with torch.device("meta"):
        model = make()
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def diffusers_unet(sd: dict, cfg: UNetConfig):
    from diffusers import UNet2DConditionModel
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    return attach(lambda: UNet2DConditionModel(**kwargs), sd)


def build_models(sd: dict, cfg: UNetConfig, extra: bool) -> dict:
    """name -> nn.Module, all sharing the tensors of `sd` (except channels-last conv weights)."""
    models = {"diffusers": diffusers_unet(sd, cfg)}
    minidiff = attach(lambda: UNet(cfg), sd)
    if extra:
        models["minidiff-reference"] = ReferenceKernels(minidiff)   # the same module on kernels.use("reference")
        d = diffusers_unet(sd, cfg)
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


# ------------------------------------------------------------------------------------------------ OpenVINO
class _Sample(torch.nn.Module):
    """diffusers' U-Net as a function of tensors to one tensor (what convert_model traces): (x, t, c) -> .sample."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, c):
        return self.unet(x, t, c).sample


def openvino_model(sd32: dict, cfg: UNetConfig, inputs32, cache=None):
    """diffusers' U-Net with the fp32 weights, converted to OpenVINO's model; None without openvino.
    cache: a folder for the converted model (unet.xml + .bin, fp32: compress_to_fp16=False), read instead of converting
    again when it is there (converting traces the whole U-Net: 5-20 minutes on 2 busy cores). The weights are the same
    in every run (torch.manual_seed(0)), so the cached conversion is the same model."""
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed (pip install openvino): no OpenVINO rows", flush=True)
        return None
    t0 = time.perf_counter()
    xml = Path(cache) / f"unet-seed0-ov{ov.__version__.split('-')[0]}.xml" if cache else None
    if xml is not None and xml.is_file():
        model = ov.Core().read_model(str(xml))
        print(f"openvino {ov.__version__}: read the converted model {xml} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        return model
    with torch.no_grad():
        model = ov.convert_model(_Sample(diffusers_unet(sd32, cfg)), example_input=inputs32)
    print(f"openvino {ov.__version__}: convert_model {time.perf_counter() - t0:.0f}s", flush=True)
    if xml is not None:
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(xml), compress_to_fp16=False)
    return model


class OpenVINOUNet:
    """A model compiled by OpenVINO for the CPU with one precision hint, called like the torch models: (x, t, c) ->
    torch tensor. Its inputs are always fp32 (the model was converted in fp32; the hint picks the inner precision):
    the bf16 table's bf16 inputs are widened back, so every bf16 contender sees the same rounded inputs."""

    def __init__(self, ov_model, hint: str):
        import openvino as ov
        t0 = time.perf_counter()
        self.compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        self.compile_s = time.perf_counter() - t0
        self.hint = hint
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")   # what it really runs in: an ov.Type
        self.actual = actual.get_type_name() if hasattr(actual, "get_type_name") else str(actual)   # "f32" | "bf16"
        self.request = self.compiled.create_infer_request()

    def __call__(self, x, t, c):
        out = self.request.infer([x.float().numpy(), t.numpy(), c.float().numpy()])   # copies of the outputs
        return torch.from_numpy(out[0])


# --------------------------------------------------------------------------------------------------- measuring
def call(model, x, t, c):
    out = model(x, t, c)
    return out.sample if hasattr(out, "sample") else out


def measure(models: dict, inputs, n: int, ref32=None) -> tuple[dict, dict, dict, object]:
    """-> (timings, peak extra memory in bytes, {name: (max rel. difference to diffusers' output in this dtype, the
    same to diffusers' fp32 output)}, diffusers' output). `ref32`: diffusers' fp32 output (None: this is fp32)."""
    ref = None
    peaks, diffs = {}, {}
    with torch.inference_mode():
        for name, model in models.items():       # first call: also the warm-up (and the compilation, if compiled)
            with PeakMemory("cpu") as mem:
                t0 = time.perf_counter()
                out = call(model, *inputs).float()
                first = time.perf_counter() - t0
            peaks[name] = (mem.peak_bytes - mem.base_bytes) if mem.peak_bytes else None
            if ref is None:   # the first model is diffusers
                ref = out
            r32 = ref if ref32 is None else ref32
            diffs[name] = tuple(((out - r).abs().max() / r.abs().max()).item() for r in (ref, r32))
            print(f"  {name}: first call {first:.1f}s, max |Δ| / max |diffusers| = {diffs[name][0]:.1e} "
                  f"(vs diffusers fp32: {diffs[name][1]:.1e})", flush=True)
        fns = {name: (lambda m=model: call(m, *inputs)) for name, model in models.items()}
        times = interleaved(fns, n, warmup=0)
    return times, peaks, diffs, ref


def label(name: str, mode: str, ov=None) -> str:
    if name == "openvino":
        return (f"OpenVINO (convert_model of the diffusers U-Net; hint {ov.hint}, runs {ov.actual})"
                if mode == "eager" else "OpenVINO (the same compiled model as in eager)")
    return {"diffusers": "diffusers (SDPA processor, default)",
            "diffusers+channels_last": "diffusers + channels_last",
            "minidiff-reference": "minidiff on the reference kernels (fast=False)",
            "minidiff": "**minidiff** (the default kernels: oneDNN)"}[name]


def rows_for(dtype_name, mode, times, peaks, diffs, ov=None):
    """Table rows, and {(dtype, mode): (minidiff / diffusers, minidiff / OpenVINO or None)} (median wall times)."""
    base = median(times["diffusers"]["wall"])
    base_cpu = median(times["diffusers"]["cpu"])
    base_ov = median(times["openvino"]["wall"]) if "openvino" in times else None
    rows = []
    for name, t in times.items():
        wall, cpu = median(t["wall"]), median(t["cpu"])
        ratio, ratio_ov = wall / base, (f"{wall / base_ov:.2f}×" if base_ov else "n/a")
        peak = f"{peaks[name] / 2 ** 30:.2f}" if peaks.get(name) is not None else "n/a"
        bold = (lambda s: f"**{s}**") if name == "minidiff" else (lambda s: s)
        rows.append([dtype_name, mode, label(name, mode, ov), f"{wall:.2f}", f"{min(t['wall']):.2f}",
                     bold(f"{ratio:.2f}×"), bold(ratio_ov), f"{cpu:.1f}", f"{cpu / base_cpu:.2f}×", peak,
                     f"{diffs[name][0]:.0e}", f"{diffs[name][1]:.0e}"])
    mini = median(times["minidiff"]["wall"])
    return rows, {(dtype_name, mode): (mini / base, mini / base_ov if base_ov else None)}


def verdicts(ratios: dict) -> list[str]:
    out = []
    for (dname, mode), (r, r_ov) in ratios.items():
        t = TARGETS[dname]
        line = f"{dname} {mode}: minidiff/diffusers = {r:.2f}× — target ≤ {t}×: {'met' if r <= t else 'NOT met'}"
        if r_ov is not None:
            line += f"; minidiff/OpenVINO = {r_ov:.2f}× — target < 1×: {'met' if r_ov < 1 else 'NOT met'}"
        else:
            line += "; minidiff/OpenVINO: not measured (openvino not installed or --no-openvino)"
        out.append(line)
    return out


# ------------------------------------------------------------------------------------------------ profiling
# torch.profiler's op names -> what the step spends its time on (self time: a custom op's children are counted once).
# (category, substrings of the name, exact names), first match wins
CATEGORIES = [
    ("attention", ("scaled_dot_product", "flash_attention", "softmax", "bmm"), ()),
    ("matmul / conv", ("linear", "conv", "addmm", "matmul", "mkldnn", "onednn"), ("mm",)),
    ("GroupNorm", ("group_norm",), ()),
    ("LayerNorm", ("layer_norm",), ()),
    ("dtype / layout copies", ("copy", "contiguous", "clone", "permute", "transpose", "view", "reshape", "as_strided",
                               "expand"), ("to",)),
    ("elementwise", ("silu", "gelu", "sigmoid", "rsqrt"),
     ("add", "add_", "mul", "mul_", "sub", "div", "cat", "exp", "cos", "sin", "neg", "pow", "chunk", "split",
      "fill_", "zero_", "where", "arange", "slice", "select", "baddbmm")),
]


def category(op: str) -> str:
    name = op.split("::")[-1]
    for cat, parts, exact in CATEGORIES:
        if name in exact or any(k in name for k in parts):
            return cat
    return "other"


def profile_step(model, inputs) -> tuple[dict, dict, float]:
    """One call under torch.profiler -> ({category: self s}, {op: (self s, calls)}, wall s)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(model, *inputs)
        wall = time.perf_counter() - t0
    cats, ops = {}, {}
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6
        if s > 0:
            cats[category(e.key)] = cats.get(category(e.key), 0.0) + s
            ops[e.key] = (s, e.count)
    return cats, ops, wall


# OpenVINO's node types (its CPU plugin's profiling info) -> the same categories
OV_CATEGORIES = {"attention": ("ScaledDotProductAttention", "Softmax", "SDPA"),
                 "matmul / conv": ("Convolution", "MatMul", "FullyConnected", "GroupConvolution", "Deconvolution"),
                 "GroupNorm": ("GroupNormalization",), "LayerNorm": ("MVN", "NormalizeL2", "LayerNorm"),
                 "dtype / layout copies": ("Reorder", "Convert", "Transpose", "Reshape", "Broadcast", "Gather",
                                           "StridedSlice", "Split", "VariadicSplit", "Concat"),
                 "elementwise": ("Eltwise", "Add", "Multiply", "Subtract", "Divide", "Swish", "Gelu", "Sigmoid",
                                 "Interpolate", "Power", "Exp", "Sin", "Cos")}


def openvino_profile(ov_model, hint: str, inputs, rounds: int) -> tuple[dict, dict, float]:
    """OpenVINO's own per-node timings (PERF_COUNT), summed per category, medians over rounds."""
    import openvino as ov
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    feed = [inputs[0].float().numpy(), inputs[1].numpy(), inputs[2].float().numpy()]
    request.infer(feed)                                            # warm-up
    runs = []
    for r in range(rounds):
        t0 = time.perf_counter()
        request.infer(feed)
        wall = time.perf_counter() - t0
        cats, ops = {}, {}
        for info in request.get_profiling_info():
            sec = info.real_time.total_seconds()
            kind = next((c for c, types in OV_CATEGORIES.items() if info.node_type in types), "other")
            cats[kind] = cats.get(kind, 0.0) + sec
            key = f"{info.node_type} ({info.exec_type})"
            ops[key] = (ops.get(key, (0.0, 0))[0] + sec, ops.get(key, (0.0, 0))[1] + 1)
        runs.append((cats, ops, wall))
        print(f"  round {r + 1}: OpenVINO {wall:.2f} s", flush=True)
    cats = {c: median([r[0].get(c, 0.0) for r in runs]) for c in {c for r in runs for c in r[0]}}
    ops = {o: (median([r[1].get(o, (0.0, 0))[0] for r in runs]), runs[0][1].get(o, (0, 0))[1])
           for o in {o for r in runs for o in r[1]}}
    return cats, ops, median([r[2] for r in runs])


def profile_rounds(models: dict, inputs, rounds: int) -> dict:
    """Each model profiled once per round, round-robin, after one warm-up call each (oneDNN's packing, first-call
    work) -> {name: (median {category: s}, median {op: (s, calls)}, median wall s)}. Medians over rounds: on a shared
    2-core machine a thread descheduled at one of the ~600 parallel regions of a step stalls that op, so single
    profiles of the small ops (norms, elementwise) are inflated at random; the median of a few rounds is not."""
    with torch.inference_mode():
        for m in models.values():
            call(m, *inputs)
    runs = {name: [] for name in models}
    for r in range(rounds):
        for name, m in models.items():
            runs[name].append(profile_step(m, inputs))
            print(f"  round {r + 1}: {name} {runs[name][-1][2]:.2f} s under the profiler", flush=True)
    out = {}
    for name, rs in runs.items():
        cats = {c: median([r[0].get(c, 0.0) for r in rs]) for c in {c for r in rs for c in r[0]}}
        ops = {o: (median([r[1].get(o, (0.0, 0))[0] for r in rs]), rs[0][1].get(o, (0, 0))[1])
               for o in {o for r in rs for o in r[1]}}
        out[name] = (cats, ops, median([r[2] for r in rs]))
    return out


def profile_main(args):
    """--profile: where one guided step's time goes, minidiff beside diffusers, in each dtype of --dtypes."""
    cfg = UNetConfig()
    torch.manual_seed(0)
    master = UNet(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    x32, c32, t = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor([500, 500])
    load_before = load_average()
    tables, notes = [], []
    ov_model = None if args.no_openvino else openvino_model(
        master, cfg, (x32, t, c32), REPO / args.openvino_cache if args.openvino_cache else None)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        sd = {k: v.to(dtype) for k, v in master.items()}
        models = build_models(sd, cfg, extra=False)
        inputs = (x32.to(dtype), t, c32.to(dtype))
        print(f"{dname}:", flush=True)
        res = profile_rounds({n: models[n] for n in ("minidiff", "diffusers")}, inputs, args.n)
        if ov_model is not None:
            res["OpenVINO"] = openvino_profile(ov_model, OV_HINTS[dname], inputs, args.n)
        names = list(res)
        cats = [c for c, _, _ in CATEGORIES] + ["other"]
        rows = []
        for c in cats:
            cells = []
            for name in names:
                total = sum(res[name][0].values())
                v = res[name][0].get(c, 0.0)
                cells += [f"{v:.2f}", f"{100 * v / total:.0f}%"]
            rows.append([dname, c, *cells])
        rows.append([dname, "**total**", *[x for n in names for x in (f"{sum(res[n][0].values()):.2f}", "100%")]])
        rows.append([dname, "wall time of the profiled call", *[x for n in names for x in (f"{res[n][2]:.2f}", "")]])
        tables.append(md_table(["dtype", "category", *[x for n in names for x in (f"{n} s", "share")]], rows))
        for name in names:
            top = sorted(((n, s, c) for n, (s, c) in res[name][1].items()), key=lambda o: -o[1])[:10]
            cat = category if name != "OpenVINO" else (lambda n: next(
                (c for c, types in OV_CATEGORIES.items() if n.split(" (")[0] in types), "other"))
            tables.append(md_table(["dtype", f"{name}'s top ops", "s", "calls", "category"],
                                   [[dname, f"`{n}`", f"{s:.3f}", c, cat(n)] for n, s, c in top]))
        del models, sd
        gc.collect()
    table = "\n\n".join(tables)
    print("\n" + table)
    notes += [
        "one guided step (batch 2, 64×64×4 latents, 77×768 context), full SD v1.4 U-Net with random weights; each "
        f"model called once to warm up, then profiled (torch.profiler, CPU activities) in {args.n} interleaved "
        "rounds; self time per op summed per category by the op's name (bench_unet_cpu.py CATEGORIES; a custom "
        "op's children are counted once); medians over the rounds",
        "OpenVINO: its CPU plugin's own per-node timings (PERF_COUNT, real time) of the converted diffusers U-Net "
        "(bench_unet_cpu.py OV_CATEGORIES maps node types to the categories; fused nodes count where their main op is)"
        if ov_model is not None else "OpenVINO: not profiled (not installed, or --no-openvino)",
        "the profiler's own overhead and the machine's load inflate the seconds; the shares are what to read",
    ]
    if not args.no_append:
        append_section("CPU profile: where one guided SD v1.4 U-Net step spends its time", table, notes, load_before)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5, help="timed rounds per variant (median reported)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compiled", action="store_true", help="also torch.compile both (compiling takes minutes)")
    p.add_argument("--no-eager", action="store_true", help="only the compiled rows")
    p.add_argument("--extra-rows", action="store_true",
                   help="also diffusers + channels_last and minidiff's reference modules")
    p.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO rows (used when installed)")
    p.add_argument("--openvino-cache", default="runs/openvino", help="folder for the converted OpenVINO model, reused "
                                                                     "by later runs ('' = convert every time)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: one step of minidiff and diffusers under torch.profiler, per dtype: the "
                        "share of attention, GroupNorm, elementwise ops, the matmuls and convolutions")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        return profile_main(args)
    load_before = load_average()
    print(f"CPU: {isa_summary()}; torch threads {torch.get_num_threads()}; load average {load_before}", flush=True)
    cfg = UNetConfig()  # SD v1.4
    torch.manual_seed(0)
    print("building the SD v1.4 U-Net with random weights ...", flush=True)
    master = UNet(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 4, 64, 64, generator=g)
    c32 = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500, 500])
    dtypes = args.dtypes.split(",")
    ov_cache = REPO / args.openvino_cache if args.openvino_cache else None
    ov_model = None if args.no_openvino else openvino_model(master, cfg, (x32, t, c32), ov_cache)
    ref32 = None   # diffusers' fp32 output: every row is compared with it too
    if "fp32" not in dtypes:
        with torch.inference_mode():
            ref32 = call(diffusers_unet(master, cfg), x32, t, c32).float()

    headers = ["dtype", "mode", "model", "median s/step", "min s", "ratio vs diffusers", "ratio vs OpenVINO", "CPU s",
               "CPU ratio vs diffusers", "peak extra GiB", "max rel Δ vs diffusers (same dtype)",
               "max rel Δ vs diffusers fp32"]
    all_rows, ratios, ov_notes = [], {}, []
    for dname in dtypes:
        dtype = DTYPES[dname]
        sd = {k: v.to(dtype) for k, v in master.items()}
        if dname == dtypes[-1] and ov_model is None:
            del master  # the last dtype: the fp32 master copy is no longer needed (OpenVINO's model may share it)
            gc.collect()
        inputs = (x32.to(dtype), t, c32.to(dtype))
        models = build_models(sd, cfg, args.extra_rows)
        ov = None
        if ov_model is not None:
            ov = OpenVINOUNet(ov_model, OV_HINTS[dname])
            ov_notes.append(f"OpenVINO, {dname} table: INFERENCE_PRECISION_HINT {ov.hint!r} requested, "
                            f"{ov.actual!r} reported by the compiled model; compile_model took {ov.compile_s:.0f} s")
            print(ov_notes[-1], flush=True)
            models = {"diffusers": models.pop("diffusers"), "openvino": ov, **models}
        if not args.no_eager:
            print(f"{dname}, eager:", flush=True)
            times, peaks, diffs, ref = measure(models, inputs, args.n, ref32)
            if dname == "fp32":
                ref32 = ref
            rows, r = rows_for(dname, "eager", times, peaks, diffs, ov)
            all_rows += rows
            ratios.update(r)
        if args.compiled:
            print(f"{dname}, torch.compile (the first call compiles):", flush=True)
            torch._dynamo.reset()
            compiled = {"diffusers": torch.compile(models["diffusers"]),
                        "minidiff": torch.compile(models["minidiff"], **speed.compile_options("cpu"))}
            if ov is not None:   # OpenVINO is compiled already: timed again beside the compiled torch models
                compiled = {"diffusers": compiled["diffusers"], "openvino": ov, "minidiff": compiled["minidiff"]}
            times, peaks, diffs, ref = measure(compiled, inputs, args.n, ref32)
            if dname == "fp32" and ref32 is None:
                ref32 = ref
            rows, r = rows_for(dname, "compiled", times, peaks, diffs, ov)
            all_rows += rows
            ratios.update(r)
            del compiled
            torch._dynamo.reset()
        del models, sd, ov
        gc.collect()

    table = md_table(headers, all_rows)
    print("\n" + table + "\n")
    verdict = verdicts(ratios)
    print("\n".join(verdict))
    notes = [
        "one guided U-Net step: batch 2, latents 2×4×64×64, context 2×77×768, timestep 500; full SD v1.4 U-Net "
        "(859.5 M parameters), random weights shared by both libraries (load_state_dict(assign=True))",
        "diffusers: UNet2DConditionModel as users run it by default (AttnProcessor2_0 = torch SDPA); minidiff: "
        "its default kernels (minidiff.kernels: oneDNN linears with fused epilogues, stacked QKV, packed "
        "channels-last convolutions), the same modules `StableDiffusion.generate` runs",
        "OpenVINO: the same diffusers U-Net with the fp32 weights, `openvino.convert_model(..., example_input=(x, t, "
        "c))`, compiled for the CPU with INFERENCE_PRECISION_HINT f32 (fp32 table) and bf16 (bf16 table); fp32 inputs "
        "(in the bf16 table the bf16-rounded inputs widened back); CPU flags in the machine line: the bf16 hint runs "
        "bf16 only with avx512_bf16 or AMX" if ov_model is not None else "OpenVINO rows not run (not installed or "
        "--no-openvino)",
        *ov_notes,
        "variants timed round-robin (interleaved), medians of the rounds; ratios = median wall time over the "
        "diffusers row and over the OpenVINO row in the same dtype and mode; CPU s = process CPU time over all "
        "threads (less sensitive to other processes' load)",
        "max rel Δ = max |out − ref| / max |ref|, ref = diffusers' output in the row's dtype, and diffusers' fp32 output",
        "peak extra GiB = peak resident memory during the first call minus the resident memory before it "
        "(activations and workspace, not the weights); minidiff's eager first call also makes its cached oneDNN copy "
        "of the convolution weights (a cache beside the weights, kept, so it counts again in no later row); "
        "OpenVINO's copy of the weights is made by compile_model, before its first call",
        "compiled rows: diffusers with torch.compile defaults; minidiff with speed.compile_options('cpu'), the options "
        "compile_pipeline uses" if args.compiled else "compiled rows not run this time (--compiled)",
        "the machine is shared with other engineers' tests and training jobs: see the load average line; wall-clock "
        "medians move with it, the ratios of interleaved runs much less",
        *verdict,
    ]
    if not args.no_append:
        append_section("CPU: one guided SD v1.4 U-Net step, minidiff vs diffusers and OpenVINO", table, notes,
                       load_before)


if __name__ == "__main__":
    main()
