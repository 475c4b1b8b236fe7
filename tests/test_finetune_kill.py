"""Exact resumption under kill -9 (issues 13 and 15): `minidiff finetune` with validation ON, SIGKILLed at three
random steps and once in the middle of writing a checkpoint, resumed with --resume after each kill, ends with weights,
EMA and log BIT-identical to a run that was never stopped."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parent.parent
STEPS = 9
# validation stays on (its default); fewer sampler steps and one unrelated prompt only keep the test short
FLAGS = ["--steps", str(STEPS), "--batch-size", "2", "--resolution", "16", "--checkpoint-every", "2",
         "--keep-last", "2", "--lr", "1e-3", "--ema", "--ema-decay", "0.9", "--random-flip", "--grad-accum", "2",
         "--caption-dropout", "0.3", "--min-snr-gamma", "5", "--noise-offset", "0.05", "--warmup-steps", "2",
         "--lr-schedule", "cosine", "--validation-steps", "3", "--no-progress"]
# run as `python -c KILL_IN_CHECKPOINT ARGS`: the process kills itself (SIGKILL) right after the first file of its
# first checkpoint is written, i.e. with a half-written checkpoint folder on disk
KILL_IN_CHECKPOINT = r"""
import os, signal, sys
from minidiff.train import state
real = state.save_file
def save_then_die(*args, **kw):
    real(*args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)
state.save_file = save_then_die
from minidiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def logged_steps(out: Path) -> list[int]:
    try:
        lines = (out / "train_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def run_until(args, out: Path, kill_after_step: int | None, code: str | None = None) -> int:
    """Start `minidiff finetune ARGS`; SIGKILL it as soon as its log shows step `kill_after_step` (None: let it end).
    -> its return code (-9 when killed)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "minidiff", *args]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while kill_after_step is not None and proc.poll() is None and time.monotonic() < deadline:
        if any(s >= kill_after_step for s in logged_steps(out)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    out_, err = proc.communicate(timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{' '.join(args)} -> {proc.returncode}\n{out_[-2000:]}\n{err[-4000:]}")
    return proc.returncode


def test_sigkill_at_random_steps_and_during_a_checkpoint_write_resumes_bit_identical(tiny, tmp_path):
    base = ["finetune", "--model", tiny["model"], "--data", tiny["data"]]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_until([*base, "--output", str(straight), *FLAGS], straight, None) == 0

    kills = sorted(random.Random(15).sample(range(1, STEPS), 3))
    args = [*base, "--output", str(killed), *FLAGS]
    codes = [run_until(args, killed, kills[0])]
    codes += [run_until([*args, "--resume"], killed, k) for k in kills[1:]]
    assert codes.count(-signal.SIGKILL) >= 2, (kills, codes)           # at least two real kills mid-run
    # a kill while the next checkpoint is being written: the half-written folder must never count as a checkpoint
    before = [p.name for p in (killed / "checkpoints").glob("step-*")]
    assert run_until([*args, "--resume"], killed, None, code=KILL_IN_CHECKPOINT) == -signal.SIGKILL
    assert [p for p in (killed / "checkpoints").glob(".step-*")], "the kill should leave a temporary folder behind"
    assert [p.name for p in (killed / "checkpoints").glob("step-*")] == before
    assert run_until([*args, "--resume"], killed, None) == 0
    assert not list((killed / "checkpoints").glob(".step-*"))          # the resumed run cleaned it up

    wa = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(killed / "unet" / "diffusion_pytorch_model.safetensors"))
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, (f"{len(differ)} tensors differ, e.g. {differ[0]}: max |a - b| = "
                        f"{float((wa[differ[0]] - wb[differ[0]]).abs().max())}; kills after steps {kills}")
    last = f"step-{STEPS:06d}"
    ea, eb = (load_file(str(x / "checkpoints" / last / "ema.safetensors")) for x in (straight, killed))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    la = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in la] == [(r["loss"], r["lr"], r["grad_norm"]) for r in lb]
    assert (killed / "validation" / f"{last}.png").is_file()
