"""The prepared GPU session (issue 24): the GPU numbers the project still lacks, in one command sized for a short lease.

    bash benchmarks/gpu_session.sh                    # on the GPU machine: all parts, within --budget seconds
    bash benchmarks/gpu_session.sh --dry-run          # here, on a CPU: every part on toy shapes (~15-25 min on 2 cores)
    bash benchmarks/gpu_session.sh --parts seed-job   # one part (training | seed-job | inference): a second call

The parts, in the order they run (the most wanted first: the lease may end before the last):
  training    bench_train.py --device cuda: full SD v1.4 U-Net, 512², batch 8, bf16 — diffusers' train_text_to_image
              step core and minidiff's train_step, each eager and compiled, without and with gradient checkpointing:
              samples/s, peak memory (targets: ≥ 100 samples/s on an H100, ≥ 1.3× diffusers in the same run)
  seed-job    seed_job.py --device cuda: `minidiff finetune --preset pokemon --compile` at full size with random weights
              on the carried Pokémon set, ~100 steps with a checkpoint, a SIGKILL and a resume, the export,
              `minidiff compare` base vs tuned; the resumed run against the uninterrupted one
  inference   bench_gpu.py --no-train: 512², 50 PNDM steps, fp16 and bf16: diffusers eager / + compile, minidiff eager
              / + compile with our Triton ops / + compile with the reference ops — it/s, s/image, peak memory, image Δ

Compiling is most of the cost (inductor writes and builds the kernels of a full U-Net's forward and backward: minutes,
on the CPU side of the machine, while the GPU idles). So the session first runs every compiled variant's first
steps *at the same time* in background processes (--warm-only: `torch.compile` fills inductor's on-disk caches,
nothing is timed), up to the GPU memory they need together; the timed parts then run one after another and find
their kernels compiled. Their "warm-up s" columns are therefore cache hits (dynamo's trace + CUDA-graph capture),
not first compiles; the warm jobs' logs hold those.

Every part is a subprocess with a time limit cut from --budget (what is left when it starts); a part whose estimate no
longer fits is skipped and listed as "not run (budget)" — run it in a second call with --parts. Everything a part
writes goes to $OUT (logs/, seed_job/, docs/benchmarks.md with the appended sections, session.md).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PARTS = ("training", "seed-job", "inference")            # `all`, in this order
EXTRA = ("checks",)                                      # only when named: the Triton kernels' and models' checks
# seconds each part needs at least once its kernels are compiled (one H100; guesses until a session has measured them)
NEEDS = {"training": 120, "seed-job": 150, "inference": 150, "checks": 300}
# GPU memory each warm job holds (GiB, guesses): a full U-Net with AdamW at batch 8 ~ 18-22; inference ~ 4
WARM_GIB = {"training": 22, "seed-job": 18, "inference": 5}


def sh(cmd: list[str], log: Path, timeout: float) -> tuple[object, float]:
    """Run cmd with its output into log (and the last lines echoed). -> (exit code | "timeout", wall s)."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = "timeout"
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace").splitlines()[-12:]
    print(f"[{log.stem}] exit {code} after {wall:.0f} s\n    " + "\n    ".join(tail), flush=True)
    return code, wall


def kill_group(proc):
    """SIGKILL a part and everything it started (seed_job.py's finetune runs, inductor's compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def plan(args, model: Path, out: Path) -> tuple[dict, dict]:
    """-> ({part: [timed commands]}, {part: [warm commands]}) for the device (or the --dry-run's toy shapes)."""
    dev = "cpu" if args.dry_run else "cuda"
    seed = [PY, "benchmarks/seed_job.py", "--device", dev, "--model", str(model), "--work", str(out / "seed_job")]
    if args.dry_run:
        train = [PY, "benchmarks/bench_train.py", "--device", "cpu", "--config", "toy", "--steps", "2",
                 "--checkpointing", "--no-append"]
        seed += ["--tiny", "--no-append"]
        infer = [PY, "benchmarks/bench_gpu.py", "--smoke", "--device", "cpu", "--compile-on-cpu", "--dtypes", "fp32",
                 "--steps", "3", "--repeats", "1", "--no-train", "--model", str(model)]
    else:
        train = [PY, "benchmarks/bench_train.py", "--device", "cuda", "--steps", "10"]
        seed += ["--parallel"]
        infer = [PY, "benchmarks/bench_gpu.py", "--model", str(model), "--dtypes", "fp16,bf16", "--repeats", "1",
                 "--no-train"]
    smoke = ["--smoke"] if args.dry_run else []
    checks = [[PY, "benchmarks/gpu_kernels_check.py", *smoke, "--out", str(out / "kernels.md")],
              [PY, "benchmarks/gpu_model_check.py", *(["--small", "--device", "cpu"] if args.dry_run else []),
               "--out", str(out / "model.md")]]
    timed = {"training": [train], "seed-job": [seed], "inference": [infer], "checks": checks}
    warm = {
        "training": [[*train, "--warm-only", "--rows", rows] for rows in
                     ("minidiff compiled,minidiff compiled + checkpointing",
                      "diffusers compiled,diffusers compiled + checkpointing")],
        "seed-job": [[*seed, "--warm-only"]],
        "inference": [[*infer, "--warm-only", "--variants", v] for v in
                      ("minidiff + compile", "minidiff + compile (reference ops)", "diffusers + torch.compile")],
        "checks": [],
    }
    return timed, warm


def warm_up(jobs: list[tuple[str, list[str]]], logs: Path, deadline: float, capacity_gib: float) -> list[str]:
    """Start the warm jobs side by side, as many at a time as `capacity_gib` of GPU memory holds; wait for all (or the
    deadline: the rest are killed — their part then compiles in its timed run). -> lines for the summary."""
    pending, running, lines = list(jobs), [], []
    while pending or running:
        used = sum(WARM_GIB[part] for part, _, _, _ in running)
        while pending and (not running or used + WARM_GIB[pending[0][0]] <= capacity_gib):
            part, cmd = pending.pop(0)
            log = logs / f"warm-{part}-{len(jobs) - len(pending)}.log"
            f = open(log, "w")
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            running.append((part, proc, log, time.perf_counter()))
            used += WARM_GIB[part]
            print(f"[warm] started {log.name}: {' '.join(cmd[1:])}", flush=True)
        time.sleep(1)
        for job in list(running):
            part, proc, log, t0 = job
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    kill_group(proc)
                running.remove(job)
                lines.append(f"{log.name}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s")
                print(f"[warm] {lines[-1]}", flush=True)
    return lines


def gpu_memory_gib() -> float:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return float(out[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="all", help=f"comma-separated from {PARTS + EXTRA}, or all (= {PARTS})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole session, setup included (default 450 on a GPU; --dry-run: 3600)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, toy shapes: that every part runs end to end")
    p.add_argument("--no-warm", action="store_true", help="no parallel warm-up: each part compiles in its timed run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out"))
    args = p.parse_args(argv)
    t_start = time.monotonic()
    budget = args.budget or (3600 if args.dry_run else 450)
    deadline = t_start + budget
    parts = list(PARTS) if args.parts == "all" else args.parts.split(",")
    unknown = set(parts) - set(PARTS + EXTRA)
    if unknown:
        raise SystemExit(f"gpu_session: unknown parts {sorted(unknown)}; choose from {PARTS + EXTRA}")
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary = [f"# GPU session ({'dry run on the CPU' if args.dry_run else 'device'}): parts {', '.join(parts)}, "
               f"budget {budget:.0f} s", ""]

    if not args.dry_run and not (REPO / "data" / "pokemon" / "metadata.jsonl").is_file() and "seed-job" in parts:
        summary.append("- data/pokemon is missing (build it with `minidiff data pokemon data/pokemon` and carry it): "
                       "the seed job is skipped")
        parts.remove("seed-job")
    model = out / ("sd-tiny" if args.dry_run else "sd14-random")
    smoke = ["--smoke"] if args.dry_run else []
    code, wall = sh([PY, "benchmarks/bench_gpu.py", "--save-random", str(model), *smoke], logs / "setup-weights.log",
                    deadline - time.monotonic())
    summary.append(f"- random-weight model folder {model.name}: exit {code}, {wall:.0f} s")
    timed, warm = plan(args, model, out)

    if not args.no_warm:
        jobs = [(part, cmd) for part in parts for cmd in warm[part]]
        capacity = 0.85 * gpu_memory_gib() if not args.dry_run else 1e9
        concurrency_note = f"{capacity:.0f} GiB of GPU memory for the warm jobs" if not args.dry_run else "dry run"
        t0 = time.monotonic()
        # keep time for each part's timed run after the warm-up
        warm_deadline = deadline - sum(NEEDS[p] for p in parts)
        lines = warm_up(jobs, logs, warm_deadline, capacity if capacity > 0 else 1e9)
        summary.append(f"- warm-up ({concurrency_note}), {time.monotonic() - t0:.0f} s: " + "; ".join(lines))

    for part in parts:
        left = deadline - time.monotonic()
        if left < NEEDS[part] and not args.dry_run:
            summary.append(f"- {part}: not run (budget: {left:.0f} s left, it needs ~{NEEDS[part]} s); "
                           f"`bash benchmarks/gpu_session.sh --parts {part}`")
            print(summary[-1], flush=True)
            continue
        for i, cmd in enumerate(timed[part]):
            code, wall = sh(cmd, logs / f"{part}{'-' + str(i + 1) if i else ''}.log", deadline - time.monotonic())
            summary.append(f"- {part}: exit {code}, {wall:.0f} s — `{' '.join(cmd[1:])}`")

    summary.append(f"- total {time.monotonic() - t_start:.0f} s of the {budget:.0f} s budget")
    text = "\n".join(summary) + "\n"
    print("\n" + text, flush=True)
    (out / "session.md").write_text(text)
    if (REPO / "docs" / "benchmarks.md").is_file():
        (out / "docs").mkdir(exist_ok=True)
        shutil.copy(REPO / "docs" / "benchmarks.md", out / "docs" / "benchmarks.md")
    shutil.rmtree(model, ignore_errors=True)            # random weights: not worth bringing back
    for f in out.rglob("*"):                            # the runs' weights and checkpoints (GBs): logs, tables stay
        if f.is_file() and (f.suffix in (".safetensors", ".pt", ".ckpt") or f.stat().st_size > 20 * 2 ** 20):
            f.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
