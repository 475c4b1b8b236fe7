"""Data-parallel fine-tuning: `torchrun --nproc_per_node 2 -m minidiff finetune` on the CPU (gloo) ends with the same
weights as one process that takes the whole global batch."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from minidiff.train import train
from tiny_runs import EQUIV, cfg_for, read_log, unet_weights


def test_two_processes_match_one(tiny, tmp_path):
    # one process: 4 samples per micro-step, 2 micro-steps per optimizer step
    one = tmp_path / "one"
    train(cfg_for(tiny, one, steps=3, batch_size=4, grad_accum=2, checkpoint_every=2, random_flip=True,
                  caption_dropout=0.3, **EQUIV))
    # two processes: 2 samples each per micro-step -> the same global batch of 4 (x 2 micro-steps)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minidiff", "finetune", "--model", tiny["model"], "--data", tiny["data"], "--output", str(two),
           "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--resolution", "16",
           "--checkpoint-every", "2", "--random-flip", "--caption-dropout", "0.3", "--adam-eps", str(EQUIV["adam_eps"]),
           "--validation-steps", "2", "--no-progress"]   # validation on (rank 0 renders, as users run it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    wa, wb = unet_weights(one), unet_weights(two)
    base = load_file(str(os.path.join(tiny["model"], "unet", "diffusion_pytorch_model.safetensors")))
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    moved = max(float((wa[k] - base[k]).abs().max()) for k in wa)
    assert worst <= 1e-5 < moved, (worst, moved)
    # rank 0 alone wrote: one log line per step, the logged (all-reduced) loss equal to the single process's
    la, lb = read_log(one), read_log(two)
    assert [r["step"] for r in lb] == [1, 2, 3]
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"])
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert json.loads((two / "finetune_config.json").read_text())["_world"] == 2
    assert torch.load(two / "checkpoints" / "step-000003" / "state.pt", weights_only=True)["config"]["_world"] == 2
