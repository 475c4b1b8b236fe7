"""From 20 steps to 4: latent consistency distillation (LCM-LoRA) of the embedded model, measured on a CPU in minutes.

The embedded shapes model (weights/minidiff-shapes) samples with DDIM: 20 steps at guidance 5 (two U-Net evaluations
per step) draw the asked shape in the asked colour every time; at 4 steps they do not. `minidiff finetune --train
lcm-lora` distils the model, guided, into a LoRA that samples with LCMScheduler at guidance 1 (one evaluation per step)
from the shapes dataset's images (the 15 trained pairs):

    make_dataset(DIR, n=2000, seed=0)                           2000 images of the 15 trained pairs
    minidiff finetune --train lcm-lora --data DIR ... RECIPE    (see RECIPE; minutes on one thread)

then every model × sampler × step count is judged by the pixel detector of minidiff.shapes_eval (one clean shape, the
asked colour AND the asked shape) on the 15 trained pairs × 8 seeds (the issue's adherence) and the 3 held-out pairs ×
8 seeds, with the same initial noise per seed (the model card's protocol: seed s = torch.Generator().manual_seed(s)):

    base model, DDIM, guidance 5          1, 2, 4, 8, 20 steps        the model as it ships
    base model, LCM, guidance 1           1, 2, 4, 8 steps            the control: LCM's sampler without distillation
    distilled LCM-LoRA, LCM, guidance 1   1, 2, 4, 8 steps

plus the wall time per image (the 120 trained-pair images in batches of 72, one torch thread, VAE decoding included)
and the U-Net evaluations per image. Target (issue #22): 4-step LCM within 5 points of the base model's 20-step DDIM.

    python benchmarks/few_steps.py                                   # distil, measure, print the markdown block
    python benchmarks/few_steps.py --out docs/few_steps.md --json few_steps.json --keep DIR   # + doc, numbers, LoRA
    python benchmarks/few_steps.py --lora weights/minidiff-shapes-lcm-lora/lora.safetensors   # measure a LoRA only

--out replaces the text between `<!-- few-steps:begin -->` and `<!-- few-steps:end -->` in that file (or appends it).
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

BEGIN, END = "<!-- few-steps:begin -->", "<!-- few-steps:end -->"
DATA = dict(n=2000, seed=0)
# The distillation recipe: LoRA on LCM-LoRA's layers, rank 8; AdamW at 1e-3 with batch 32 (latents cached);
# the teacher guided with s ~ U[3, 7] around the model card's 5; LCM's skip (20), target EMA (0.95) and pseudo-Huber.
# No caption dropout: the student learns the guided teacher for the captions it will be asked for.
RECIPE = ["--train", "lcm-lora", "--lora-rank", "8", "--lr", "1e-3", "--batch-size", "32", "--steps", "1000",
          "--cache-latents", "--caption-dropout", "0", "--seed", "0", "--validation-steps", "0", "--no-progress"]
DDIM_STEPS, LCM_STEPS = (1, 2, 4, 8, 20), (1, 2, 4, 8)
GUIDANCE = {"ddim": 5.0, "lcm": 1.0}      # the model card's guidance for DDIM; LCM samples unguided (distilled in)
METHODS = {"ddim": ("base model", "DDIM", DDIM_STEPS), "lcm-base": ("base model (control)", "LCM", LCM_STEPS),
           "lcm-lora": ("distilled LCM-LoRA", "LCM", LCM_STEPS)}


# ------------------------------------------------------------------------------------------------ distilling
def distil_command(data: Path, out: Path, steps: int | None = None, extra: list[str] = ()) -> list[str]:
    """The `minidiff finetune` command line of the recipe (steps overridden for a smoke run; `extra` flags after the
    recipe's, so they win: a variant of the recipe)."""
    flags = list(RECIPE)
    if steps is not None:
        flags[flags.index("--steps") + 1] = str(steps)
    return [sys.executable, "-m", "minidiff", "finetune", "--data", str(data), "--output", str(out),
            "--checkpoint-every", "100000", *flags, *extra]


def distil(data: Path, out: Path, threads: int = 1, steps: int | None = None, extra: list[str] = ()) -> dict:
    """Run the recipe -> {"command", "wall_s", "params", "bytes"} (out/lora.safetensors is the result)."""
    cmd = distil_command(data, out, steps, extra)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise RuntimeError(f"`{shlex.join(cmd[1:])}` failed:\n{run.stderr[-3000:]}")
    from safetensors import safe_open
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".alpha"))
    command = "minidiff " + shlex.join(cmd[3:])                    # the work folder written DIR (the reader's own)
    return {"command": command.replace(str(out.parent), "DIR"), "wall_s": wall, "params": params,
            "bytes": (out / "lora.safetensors").stat().st_size}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------------ measuring
def sampler(method: str) -> str:
    return "ddim" if method == "ddim" else "lcm"


def unet_calls(method: str, steps: int) -> int:
    """U-Net evaluations per image: guidance > 1 runs the prompt and the empty prompt at every step."""
    return steps * (2 if GUIDANCE[sampler(method)] > 1 else 1)


def measure(pipes: dict, seeds: int = 8, log=print) -> list[dict]:
    """Every method × step count of METHODS on `pipes` ({"base": pipe, "lora": pipe}) -> rows of {"method", "steps",
    "trained", "held_out", "colour", "shape", "clean", "ms_per_image", "unet_calls"}."""
    from minidiff.data.shapes import HELD_OUT, TRAIN_PAIRS
    from minidiff.shapes_eval import evaluate
    rows = []
    for method, (_, _, step_counts) in METHODS.items():
        pipe = pipes["lora" if method == "lcm-lora" else "base"]
        for n in step_counts:
            kw = dict(seeds=range(seeds), steps=n, scheduler=sampler(method), guidance_scale=GUIDANCE[sampler(method)])
            r = evaluate(pipe, TRAIN_PAIRS, **kw)
            h = evaluate(pipe, HELD_OUT, **kw)
            rows.append({"method": method, "steps": n, "trained": r["accuracy"], "held_out": h["accuracy"],
                         "colour": r["colour"], "shape": r["shape"], "clean": r["clean"],
                         "ms_per_image": 1000 * r["seconds"] / r["settings"]["n_images"],
                         "unet_calls": unet_calls(method, n)})
            log(f"{method} {n} steps: {rows[-1]}")
    return rows


def pipes_for(lora: Path) -> dict:
    import minidiff
    from minidiff.lora import apply_lora
    return {"base": minidiff.load(), "lora": apply_lora(minidiff.load(), lora)}


# ------------------------------------------------------------------------------------------------ the report
def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    lines = ["| model | sampler, guidance | steps | U-Net evaluations / image | 15 trained pairs | 3 held-out pairs | "
             "ms / image |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name, kind, _ = METHODS[r["method"]]
        bold = "**" if r["method"] == "lcm-lora" and r["steps"] == 4 or r["method"] == "ddim" and r["steps"] == 20 \
            else ""
        lines.append(f"| {name} | {kind}, {GUIDANCE[sampler(r['method'])]:g} | {r['steps']} | {r['unet_calls']} | "
                     f"{bold}{pct(r['trained'])}{bold} | {pct(r['held_out'])} | {r['ms_per_image']:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    get = {(r["method"], r["steps"]): r for r in rows}
    lcm4, ddim20 = get[("lcm-lora", 4)]["trained"], get[("ddim", 20)]["trained"]
    gap = 100 * (ddim20 - lcm4)
    met = "met" if gap <= 5 else "missed"
    return (f"Target (4-step LCM within 5 points of the base model's 20-step DDIM on the 15 trained pairs): **{met}** "
            f"({pct(lcm4)} vs {pct(ddim20)}, {gap:+.1f} points).")


def report(result: dict, argv: list[str]) -> str:
    d = result.get("distil")
    lines = [BEGIN,
             f"Measured {time.strftime('%Y-%m-%d')} on {cpu_model()} ({os.cpu_count()} cores shared with other jobs, "
             f"load average {load_average()}), torch threads {result['threads']}; {versions()}.",
             f"Command: `python benchmarks/few_steps.py {shlex.join(argv)}`".rstrip(), ""]
    if d:
        lines += [f"Distillation: `{d['command']}` — {d['wall_s']:.0f} s wall, {d['params']:,} LoRA parameters "
                  f"({d['bytes'] / 1024:.0f} KiB file); data `make_dataset(DIR, n={result['data']['n']}, "
                  f"seed={result['data']['seed']})`.", ""]
    else:
        lines += [f"LoRA: `{result['lora']}` (not trained by this run).", ""]
    lines += [table(result["rows"]), "", verdict(result["rows"]), END]
    return "\n".join(lines)


def write_into(path: Path, block: str) -> None:
    """Replace this report's marked block in `path` (or append it); never half written (_common.write_block)."""
    write_block(path, block, BEGIN, END)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", default=None, help="measure this LoRA file instead of distilling one")
    p.add_argument("--out", default=None, help="also write the report into this markdown file (between the markers)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON")
    p.add_argument("--keep", default=None, help="copy the distilled lora.safetensors into this folder")
    p.add_argument("--work", default=None, help="keep the data and the run here (default: a temporary folder)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the distillation (default 1)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's optimizer steps (a smoke run)")
    p.add_argument("--flags", default="", help="extra finetune flags after the recipe's, e.g. \"--lcm-loss l2\" (a "
                                               "variant: docs/few_steps.md's 'what was tried')")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "seeds": args.seeds, "data": DATA}
    if args.lora:
        lora = Path(args.lora)
        result["lora"] = str(lora)
        rows = measure(pipes_for(lora), args.seeds, log=lambda s: print(s, file=sys.stderr))
    else:
        from minidiff.data.shapes import make_dataset
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="minidiff-few-steps-"))
        if args.work and any(work.iterdir() if work.exists() else ()):
            p.error(f"--work {work} is not empty (the run refuses to overwrite it); pick a new folder")
        try:
            data = make_dataset(work / "data", **DATA)
            result["distil"] = distil(data, work / "run", args.threads, args.steps, shlex.split(args.flags))
            print(f"distilled: {result['distil']}", file=sys.stderr)
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(work / "run" / "lora.safetensors", Path(args.keep) / "lora.safetensors")
            rows = measure(pipes_for(work / "run" / "lora.safetensors"), args.seeds,
                           log=lambda s: print(s, file=sys.stderr))
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    result["rows"] = rows
    text = report(result, argv)
    print(text)
    if args.out:
        write_into(Path(args.out), text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
