"""Did the fine-tune teach it anything? The new-concept experiment, measured on a CPU in minutes.

The embedded shapes model (weights/minidiff-shapes) knows 6 colours × 3 shapes and has never seen a **cross** (a plus
sign; minidiff.data.shapes.CONCEPT_SHAPES). Each method is taught the cross from the same small captioned set,

    make_concept_dataset(DIR, concept="cross", n=384, seed=0)   192 crosses in red/blue/yellow/purple/orange
                                                                + 192 replayed images of the old 15 pairs

through the command users run (`minidiff finetune --train ...`), and judged by the pixel detector of
minidiff.shapes_eval (one clean shape, the asked colour AND the asked shape; crosses by their 3×3 "crossness"):

    new concept      "a {colour} cross" for the 5 taught colours × 8 seeds          (before and after)
    held-out colour  "a green cross" × 8 seeds: green crosses are not in the data     (does the word compose?)
    original pairs   the 15 trained "a {colour} {shape}" pairs × 8 seeds              (forgetting = before − after)

plus the trained parameters (elements of the trained file), the wall time of the finetune command, and the size of
what a user keeps: the U-Net for full, the trained blocks for last-N, lora.safetensors, learned_embeds.safetensors.
Sampling as the model card's evaluation: DDIM, 20 steps, guidance 5, seed s = torch.Generator().manual_seed(s).

    python benchmarks/new_concept.py                                   # all methods; prints the markdown table
    python benchmarks/new_concept.py --methods full,lora --out docs/finetuning.md   # + writes it into the doc

--out replaces the text between `<!-- new-concept:begin -->` and `<!-- new-concept:end -->` in that file (or appends
the block when the markers are absent).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, cpu_model, load_average, versions, write_block
from minidiff.shapes_eval import EVAL

BEGIN, END = "<!-- new-concept:begin -->", "<!-- new-concept:end -->"
CONCEPT = "cross"
PLACEHOLDER = "<cross>"
DATA = dict(n=384, seed=0, replay=0.5)
# one recipe per method: finetune flags beyond --data/--output. Chosen so each run takes a few minutes on 2 cores.
COMMON = ["--batch-size", "16", "--warmup-steps", "10", "--lr-schedule", "cosine", "--cache-latents", "--random-flip",
          "--seed", "0", "--validation-steps", "0", "--no-progress"]
# LoRA: diffusers' recommended settings (train_text_to_image_lora: rank 4, α = r, lr 1e-4 at batch 1), the learning
# rate scaled to batch 16 by the square root, 1e-4 · √16 = 4e-4 (Adam's rule, Malladi et al. 2022), or linearly,
# 1e-4 · 16 = 1.6e-3 (diffusers' --scale_lr). LORA_LR is the one the measurements chose (docs/finetuning.md §6).
LORA_STEPS = "1200"
LORA_LR = "1.6e-3"


def lora_recipe(preset: str, rank: int = 4, lr: str = LORA_LR, conv_rank: int | None = None) -> list[str]:
    """The flags of a LoRA row: a LyCORIS preset at rank r (α = r), conv rank for preset full's k×k convolutions."""
    conv = ["--lora-conv-rank", str(conv_rank)] if conv_rank else []
    return ["--train", "lora", "--lora-preset", preset, "--lora-rank", str(rank), *conv, "--lora-export", "separate",
            "--steps", LORA_STEPS, "--lr", lr]


# last-up-blocks 2: the last block (8×8, no attention) cannot read the prompt; the one before it has cross-attention.
# The LoRA rows: each preset at rank 4, and preset full at rank 8 (the recommended recipe, `minidiff finetune`'s
# default preset and rank).
METHODS = {
    "full": ["--train", "unet", "--steps", "800", "--lr", "5e-4"],
    "last-n": ["--train", "last-up-blocks", "--up-blocks", "2", "--steps", "800", "--lr", "5e-4"],
    "ti": ["--train", "textual-inversion", "--placeholder-token", PLACEHOLDER, "--initializer-token", "square",
           "--steps", "600", "--lr", "1e-2"],
    "lora": lora_recipe("attn-only"),
    "lora-attn-mlp": lora_recipe("attn-mlp"),
    "lora-full": lora_recipe("full"),
    "lora-full-r8": lora_recipe("full", rank=8),
}
DEFAULT_METHODS = tuple(METHODS)
# the measurements behind the choices (not run by default): the rank sweep of preset full, another seed, the
# learning-rate scaling, and the recipe of the first documented run (rank 16, lr 5e-3: the forgetting of issue #27)
METHODS.update({
    "lora-full-r2": lora_recipe("full", rank=2),
    "lora-full-r16": lora_recipe("full", rank=16),
    "lora-full-r4-conv8": lora_recipe("full", rank=4, conv_rank=8),
    "lora-full-r8-conv4": lora_recipe("full", rank=8, conv_rank=4),
    "lora-full-r8-seed1": [*lora_recipe("full", rank=8), "--seed", "1"],   # the same recipe, another seed
    "lora-sqrt-lr": lora_recipe("attn-only", lr="4e-4"),
    "lora-full-sqrt-lr": lora_recipe("full", lr="4e-4"),
    "lora-r16-lr5e-3": ["--train", "lora", "--lora-preset", "attn-only", "--lora-rank", "16", "--lora-export",
                        "separate", "--steps", LORA_STEPS, "--lr", "5e-3"],
})
LABELS = {"full": "full U-Net", "last-n": "last 2 up-blocks", "ti": f"textual inversion `{PLACEHOLDER}`"}


def label(method: str) -> str:
    """The table's name of a row: LoRA rows say preset, rank (conv rank) and lr."""
    if method in LABELS:
        return LABELS[method]
    f = METHODS[method]
    arg = lambda flag: f[f.index(flag) + 1] if flag in f else None   # noqa: E731
    conv = f", conv r={arg('--lora-conv-rank')}" if arg("--lora-conv-rank") else ""
    seed = f", seed {arg('--seed')}" if arg("--seed") else ""
    return f"LoRA {arg('--lora-preset')} r={arg('--lora-rank')}{conv}, lr {arg('--lr')}{seed}"


# ------------------------------------------------------------------------------------------------ one method
def finetune_command(method: str, data: Path, out: Path, steps: int | None = None) -> list[str]:
    """The `minidiff finetune` command line of a method (steps overridden for a smoke run)."""
    flags = list(METHODS[method])
    if steps is not None:
        flags[flags.index("--steps") + 1] = str(steps)
    return [sys.executable, "-m", "minidiff", "finetune", "--data", str(data), "--output", str(out),
            "--checkpoint-every", flags[flags.index("--steps") + 1], *COMMON, *flags]


def trained_file(method: str, out: Path) -> Path | None:
    """The file a user keeps after the run: what holds exactly the trained tensors."""
    if method == "full":
        return out / "unet" / "diffusion_pytorch_model.safetensors"
    if method.startswith("lora"):
        return out / "lora.safetensors"
    if method == "ti":
        return out / "learned_embeds.safetensors"
    found = sorted(out.glob("checkpoints/step-*/trainable.safetensors"))   # last-n: only the trained blocks
    return found[-1] if found else None


def count_elements(path: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def train_method(method: str, data: Path, out: Path, threads: int, steps: int | None = None) -> dict:
    """Run `minidiff finetune` for one method -> {"command", "wall_s", "file", "bytes", "params"}."""
    cmd = finetune_command(method, data, out, steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise RuntimeError(f"{method}: `{shlex.join(cmd[1:])}` failed:\n{run.stderr[-3000:]}")
    f = trained_file(method, out)
    return {"command": "minidiff " + shlex.join(cmd[3:]), "wall_s": wall, "file": str(f.relative_to(out)) if f else None,
            "bytes": f.stat().st_size if f else None, "params": count_elements(f) if f else None}


def tuned_pipe(method: str, out: Path):
    """The fine-tuned model as a user loads it, and the prompt words it understands."""
    import minidiff
    if method == "ti":
        pipe = minidiff.load()
        pipe.load_embedding(str(out / "learned_embeds.safetensors"))
        return pipe, {CONCEPT: PLACEHOLDER}
    if method.startswith("lora"):
        from minidiff.lora import apply_lora
        return apply_lora(minidiff.load(), out / "lora.safetensors"), {}
    return minidiff.load(str(out)), {}


def lora_change(out: Path) -> dict[str, float]:
    """{module path: ‖ΔW‖ / ‖W₀‖} of a run's LoRA on the base model's weights (Frobenius norms): how far each layer
    moved from what the model knew."""
    import minidiff
    from minidiff.formats.lora import parse_lora, read_file
    base = minidiff.load()
    tensors, header = read_file(out / "lora.safetensors")
    parts = {"unet": base.unet, "text_encoder": base.text_encoder}
    change = {}
    for e in parse_lora(base, tensors, header):
        w = parts[e.part].get_submodule(e.path).weight
        change[f"{e.part}.{e.path}"] = round(float(e.delta().norm() / w.norm()), 4)
    return change


# ------------------------------------------------------------------------------------------------ measuring
def measure(pipe, words: dict | None = None, seeds: int = 8, steps: int = EVAL["steps"]) -> dict:
    """Adherence (fraction of images judged correct) on the new concept, the held-out colour and the old pairs
    (minidiff.shapes_eval.concept_adherence; sampler steps: the model card's 20, fewer only in a smoke run)."""
    from minidiff.shapes_eval import concept_adherence
    r = concept_adherence(pipe, CONCEPT, seeds=seeds, steps=steps, words=words)
    return {**{k: v for k, v in r.items() if k != "seconds"}, "eval_s": r["seconds"]}


def run_experiment(methods, work: Path, threads: int = 1, seeds: int = 8, steps: int | None = None,
                   log=print, jobs: int = 1, n: int | None = None, eval_steps: int = EVAL["steps"]) -> dict:
    """Build the data, measure the base model, train each method (`jobs` finetune commands at once), then measure
    each (`n`, `eval_steps`: smaller, for a smoke run). -> {"base": ..., "rows": {...}}."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    import torch
    import minidiff
    from minidiff.data.shapes import make_concept_dataset
    torch.set_num_threads(threads)
    spec = {**DATA, "n": n or DATA["n"]}
    data = make_concept_dataset(work / "data", concept=CONCEPT, **spec)
    data_ti = make_concept_dataset(work / "data-ti", concept=CONCEPT, word=PLACEHOLDER, **spec)
    load_start = load_average()
    base = measure(minidiff.load(), seeds=seeds, steps=eval_steps)
    log(f"base: {base}")
    rows = {}
    steps_of = {m: int(METHODS[m][METHODS[m].index("--steps") + 1]) for m in METHODS}
    todo = sorted(methods, key=lambda m: -steps_of[m])             # the longest runs first
    with ThreadPoolExecutor(max(1, jobs)) as pool:                 # each job is a subprocess: threads suffice
        futures = {pool.submit(train_method, m, data_ti if m == "ti" else data, work / m, threads, steps): m
                   for m in todo}
        for done in as_completed(futures):                         # measured here as each run ends
            m, trained = futures[done], done.result()               # (a failed run raises here)
            pipe, words = tuned_pipe(m, work / m)
            before = measure(minidiff.load(), words, seeds, eval_steps) if m == "ti" else base   # no "<cross>" yet
            rows[m] = {**trained, "before": before, "after": measure(pipe, words, seeds, eval_steps)}
            if m.startswith("lora"):
                rows[m]["change"] = lora_change(work / m)
            log(f"{m}: {rows[m]}")
    return {"base": base, "rows": {m: rows[m] for m in methods}, "seeds": seeds, "threads": threads,
            "jobs": jobs, "data": spec, "eval_steps": eval_steps,
            "measured": {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
                         "load_average_start": load_start, "load_average_end": load_average(),
                         "versions": versions()}}


GRID_PROMPTS = ["a red cross", "a blue cross", "a purple cross", "a green cross", "a red circle", "a yellow square",
                "a blue triangle"]


def method_grid(work, methods, seeds=(0, 1, 2), cell: int = 64, by_method: bool = False):
    """The base model and each trained method (found in `work`, a folder or a list of them) on the GRID_PROMPTS
    (textual inversion's prompts say "<cross>"), the same seeds for every model. by_method=False: one row per prompt,
    for each seed a column per model; True: one row per model, a column per prompt and seed. -> a PIL image."""
    import minidiff
    from minidiff.compare import make_grid
    from minidiff.shapes_eval import EVAL
    kw = dict(steps=EVAL["steps"], scheduler=EVAL["scheduler"], guidance_scale=EVAL["guidance_scale"], progress=False)
    works = [Path(w) for w in (work if isinstance(work, (list, tuple)) else [work])]
    found = {m: next((w / m for w in works if (w / m / "model_index.json").exists()), None) for m in methods}
    models = [("base", minidiff.load(), {})] + [(m, *tuned_pipe(m, out)) for m, out in found.items() if out]

    def image(pipe, words, prompt, s):
        p = prompt.replace(f" {CONCEPT}", f" {words[CONCEPT]}") if CONCEPT in words else prompt
        return pipe.generate(p, seed=s, **kw)[0]

    if by_method:
        rows = [[image(pipe, words, p, s) for p in GRID_PROMPTS for s in seeds] for _, pipe, words in models]
        names = ["base model" if m == "base" else label(m) for m, _, _ in models]
        return make_grid(rows, names, [f"{p} s{s}" for p in GRID_PROMPTS for s in seeds], cell=cell)
    rows = [[image(pipe, words, p, s) for s in seeds for _, pipe, words in models] for p in GRID_PROMPTS]
    return make_grid(rows, GRID_PROMPTS, [f"{name} s{s}" for s in seeds for name, _, _ in models], cell=cell)


# ------------------------------------------------------------------------------------------------ the report
def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def size(n: int) -> str:
    return f"{n:,} B" if n < 10240 else f"{n / 1024:,.0f} KiB"


def table(result: dict) -> str:
    lines = ["| method | trained parameters | new concept before → after | green cross (held-out colour) after | "
             "original 15 pairs after (forgetting) | wall time | file | size |",
             "|---|---|---|---|---|---|---|---|"]
    base = result["base"]
    for m, r in result["rows"].items():
        b, a = r["before"], r["after"]
        forget = 100 * (base["original"] - a["original"])
        lines.append(f"| {label(m)} | {r['params']:,} | {pct(b['concept'])} → **{pct(a['concept'])}** | "
                     f"{pct(a['held_out_colour'])} | {pct(a['original'])} ({forget:+.1f} points) | "
                     f"{r['wall_s']:.0f} s | `{r['file']}` | {size(r['bytes'])} |")
    return "\n".join(lines)


def machine_line(result: dict) -> str:
    """Where and how a result was measured (date, CPU, load average at the start and the end, parallel runs)."""
    m = result["measured"]
    return (f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores shared with other jobs, load average "
            f"{m['load_average_start']} at the start, {m['load_average_end']} at the end), torch threads "
            f"{result['threads']}, {result['jobs']} finetune run(s) at a time; {m['versions']}.")


def merge(result: dict, earlier: dict) -> dict:
    """`result` plus the rows of an `earlier` result (its --json) that it did not re-run, each marked with where it
    was measured (the base model's numbers must agree: the same model, seeds and sampler). Merging several earlier
    results one after the other keeps each one's provenance."""
    if (earlier["base"]["concept"], earlier["base"]["original"]) != (result["base"]["concept"],
                                                                      result["base"]["original"]):
        raise ValueError(f"the earlier result's base model measured {earlier['base']}, this one {result['base']}")
    source = {k: v for k, v in earlier.items() if k not in ("rows", "base", "sources")}
    sources = result.get("sources", [])
    kept = {m: {**r, "source": len(sources)} for m, r in earlier["rows"].items() if m not in result["rows"]}
    rows = sorted({**kept, **result["rows"]}.items(), key=lambda mr: list(METHODS).index(mr[0]))   # METHODS' order
    return {**result, "rows": dict(rows), "sources": [*sources, source]}


def report(result: dict) -> str:
    base = result["base"]
    n = result["seeds"]
    cmds = "\n".join(f"{m}: `{r['command']}`" + "  " for m, r in result["rows"].items() if "command" in r)
    head = [machine_line(result), f"Command: `{result['measured']['command']}`"]
    for i, e in enumerate(result.get("sources", [])):
        kept = [label(m) for m, r in result["rows"].items() if r.get("source") == i]
        if kept:
            head += ["", f"Rows {', '.join(kept)}: from an earlier run — " + machine_line(e)
                     + (f" Command: `{e['measured']['command']}`." if "command" in e["measured"] else "")]
    return "\n".join([
        BEGIN, *head,
        "",
        f"Base model: new concept {pct(base['concept'])}, green cross {pct(base['held_out_colour'])}, original 15 pairs "
        f"{pct(base['original'])} ({n} seeds each; {5 * n} concept images, {15 * n} original images per model).",
        "",
        table(result),
        "",
        "The runs:  ",
        cmds,
        END])


def write_into(path: Path, block: str) -> None:
    """Replace this report's marked block in `path` (or append it); never half written (_common.write_block)."""
    write_block(path, block, BEGIN, END)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", default=None, help="also write the report into this markdown file (between the markers)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON")
    p.add_argument("--grid", default=None, help="also write a PNG: the grid prompts × seeds × (base, each method)")
    p.add_argument("--work", default=None, help="keep the data and the runs here (default: a temporary folder)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt in the evaluation (default: 8)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, here and in the finetune runs (default 1: the fastest for these tiny models "
                        "on a shared CPU)")
    p.add_argument("--steps", type=int, default=None, help="override every method's steps (a smoke run)")
    p.add_argument("--jobs", type=int, default=1, help="finetune runs at a time (default 1; wall times then include "
                                                       "waiting for each other)")
    p.add_argument("--merge", nargs="+", default=(), metavar="JSON",
                   help="keep the rows of earlier runs (their --json) that this one does not re-run, with where each "
                        "was measured (the first file's row wins)")
    p.add_argument("--grid-rows", choices=("prompts", "methods"), default="prompts",
                   help="the --grid's rows: one per prompt (a column per seed and model) or one per model")
    p.add_argument("--grid-only", action="store_true",
                   help="train and measure nothing: draw --grid from the runs already in --work (comma-separated "
                        "folders)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad or methods}; choose from {','.join(METHODS)}")
    if args.grid_only:
        if not (args.grid and args.work):
            p.error("--grid-only needs --grid and --work")
        method_grid(args.work.split(","), methods, by_method=args.grid_rows == "methods").save(args.grid)
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="minidiff-new-concept-"))
    if args.work and any(work.iterdir() if work.exists() else ()):
        p.error(f"--work {work} is not empty (the runs refuse to overwrite each other); pick a new folder")
    try:
        result = run_experiment(methods, work, args.threads, args.seeds, args.steps,
                                log=lambda s: print(s, file=sys.stderr), jobs=args.jobs)
        if args.grid:
            method_grid(work, methods, by_method=args.grid_rows == "methods").save(args.grid)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["measured"]["command"] = f"python benchmarks/new_concept.py {shlex.join(argv)}"
    for earlier in args.merge:
        result = merge(result, json.loads(Path(earlier).read_text()))
    text = report(result)
    print(text)
    if args.out:
        write_into(Path(args.out), text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
