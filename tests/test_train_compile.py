"""`minidiff finetune --compile` (loop.compile_for_training): the compiled U-Net's forward and backward give the
eager run's losses and weights within fp32 rounding, in one graph compiled once per run, for the whole U-Net, its
last up-block and LoRA; and a compiled run killed and resumed ends bit-identical to an uninterrupted compiled one.

Compiling costs time on a CPU (inductor writes and builds C++ for the forward and the backward: 30-60 s of CPU for
even the smallest U-Net), so the U-Net here is one level deep, every run is cached for the module, and inductor runs
once by default: the whole U-Net, whose resumed runs then find their graph in inductor's cache. What the other modes
change is what the traced graph differentiates (frozen blocks, LoRA's extra layers): dynamo's trace of each is checked
for graph breaks by default (seconds), their compiled runs against eager under `-m slow`.

The tolerances, derived (u = 2⁻²⁴ ≈ 6e-8, fp32's unit roundoff). Inductor computes the same function in another order
(fused loops, its own reductions, vectorised exp/erf): every op's result may differ by a few u. Along the longest path
of this U-Net (~60 ops: convolutions, GroupNorms, attention, GEGLU, the skip concatenations), with reductions of
K ≤ 1024 terms that each add up to log₂K ≈ 10 roundings, the relative difference of the prediction, and so of the
loss, stays below LOSS_RTOL = 60 · 10 · u ≈ 4e-5 (5e-5 below); the backward runs the path twice: the gradient differs
by at most GRAD_RTOL = 1e-4 of its norm ‖g‖ (the log's grad_norm). The weights: AdamW's step is lr · m̂ / (√v̂ + ε);
with ε = 1 (these runs) it moves at most 1/ε = 1 per unit change of the gradient (≤ 4 with the momentum terms of a
few steps), so after S steps |θ_compiled − θ_eager| ≤ S · lr · 4 · GRAD_RTOL · max ‖g‖. (With the usual ε = 1e-8 a
gradient that is zero in exact arithmetic is pure rounding noise, and Adam turns noise of either sign into a full ±lr
step: the runs would differ by ~lr for reasons that are no error of the compiler.)
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff.train import train
from tiny_runs import build_tiny_pipe, cfg_for, write_tiny_dataset

LOSS_RTOL = 5e-5
GRAD_RTOL = 1e-4
STEPS, LR = 3, 1e-3
MODES = {"unet": {}, "last-up-blocks": dict(up_blocks=1), "lora": dict(lora_rank=2)}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny fixture's VAE and text encoder with a one-level U-Net (cross-attention, one ResNet block): every kind
    of layer the SD U-Net has, in the fewest kernels to compile."""
    from minidiff.unet import UNet, UNetConfig
    root = tmp_path_factory.mktemp("compile")
    pipe = build_tiny_pipe()
    torch.manual_seed(0)
    pipe.unet = UNet(UNetConfig(block_out_channels=(32,), layers_per_block=1, cross_attention=(True,), heads=2,
                                cross_attention_dim=64, norm_num_groups=8, sample_size=8))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    minidiff.save(pipe, root / "model")
    return {"model": str(root / "model"), "data": str(write_tiny_dataset(root / "data")), "root": root, "runs": {}}


def run(small, name, **kw):
    """train() once per name for the module (cached): ε = 1 (see the module docstring), no validation grids.
    -> (output folder, log rows, dynamo's counters of this run)."""
    from torch._dynamo.utils import counters
    if name not in small["runs"]:
        out = small["root"] / name
        counters.clear()
        train(cfg_for(small, out, **{"steps": STEPS, "lr": LR, "adam_eps": 1.0, "validation_prompts": [], **kw}))
        rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        small["runs"][name] = (out, rows, {k: dict(v) for k, v in counters.items()})
    return small["runs"][name]


def trained(out):
    return load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))


@pytest.mark.parametrize("mode", [m if m == "unet" else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_compiled_step_matches_eager_in_one_graph(small, mode):
    kw = dict(train=mode, **MODES[mode])
    eager_out, eager, _ = run(small, f"{mode}-eager", **kw)
    out, compiled, counts = run(small, f"{mode}-compiled", compile=True, **kw)

    # compiled: one graph, no break, compiled once for the whole run (not again at every step)
    assert counts.get("graph_break", {}) == {}, counts["graph_break"]
    assert counts["stats"]["unique_graphs"] == 1, counts["stats"]

    np.testing.assert_allclose([r["loss"] for r in compiled], [r["loss"] for r in eager], rtol=LOSS_RTOL)
    grad_norms = [r["grad_norm"] for r in eager]
    np.testing.assert_allclose([r["grad_norm"] for r in compiled], grad_norms, rtol=GRAD_RTOL)
    a, b = trained(eager_out), trained(out)
    assert a.keys() == b.keys() and len(a) > 0
    bound = STEPS * LR * 4 * GRAD_RTOL * max(grad_norms)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= bound, (worst, bound)
    moved = max(float((a[k] - w).abs().max()) for k, w in trained_start(small, a).items())
    assert moved > 10 * bound           # the runs did train: their steps are far above the tolerance


def trained_start(small, names):
    """The base model's values of the trained tensors (LoRA's B starts at 0, A at its seeded init: not in the base
    model, so compared with 0 — B moved from 0 is what a LoRA step does)."""
    base = minidiff.load(small["model"]).unet.state_dict()
    return {k: base.get(k, torch.zeros_like(names[k])) for k in names if k in base or "lora_B" in k}


def test_compiled_run_killed_and_resumed_is_bit_identical(small):
    """A compiled run stopped after step 1 (as by a kill: max_steps_this_run, one step past its checkpoint) and resumed
    with --compile ends with the very weights, and logs the very losses, of the uninterrupted compiled run."""
    out, straight, _ = run(small, "unet-compiled", compile=True, train="unet")
    killed = small["root"] / "killed"
    kw = dict(steps=STEPS, lr=LR, adam_eps=1.0, validation_prompts=[], compile=True, checkpoint_every=1)
    train(cfg_for(small, killed, max_steps_this_run=1, **kw))
    train(cfg_for(small, killed, resume=True, **kw))
    a, b = trained(out), trained(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == [(r["step"], r["loss"], r["grad_norm"])
                                                                        for r in straight]


@pytest.mark.parametrize("mode", list(MODES))
def test_no_graph_break_in_any_training_mode(small, mode):
    """dynamo's trace of the U-Net as each mode trains it (what requires a gradient, LoRA's layers): one graph."""
    from minidiff.train.trainable import select_trainable
    from minidiff.train import FinetuneConfig
    pipe = minidiff.load(small["model"])
    select_trainable(pipe, FinetuneConfig(data=small["data"], output="-", train=mode, **MODES[mode]))
    unet = pipe.unet.train()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 64)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(unet)(x, t, c)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
