"""minidiff.train's one training step: `minidiff finetune`, the tiny recipe's stages and benchmarks/bench_train.py all
go through minidiff.train.loop.train_step; what it does (accumulation, clipping, NaN guard) is checked here."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from minidiff.train import loop
from tiny_runs import cfg_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def counted(monkeypatch):
    """Replace train_step by a wrapper that records who called it, and still trains."""
    real, calls = loop.train_step, []

    def counting(*args, **kw):
        calls.append(sys._getframe(1).f_globals["__name__"])
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", counting)
    return calls


def test_finetune_tiny_recipe_and_benchmark_run_the_same_train_step(counted, tiny, tmp_path):
    from minidiff.train import train
    from minidiff.recipes.tiny import Recipe, train_vae
    train(cfg_for(tiny, tmp_path / "ft", steps=2))
    assert counted == ["minidiff.train.finetune"] * 2

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    recipe = Recipe(n_train=8, vae_steps=3, vae_batch=2, warmup=1)
    train_vae(recipe, images, tmp_path / "work", resume=False, progress=False)
    assert counted[2:] == ["minidiff.recipes.tiny"] * 3

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from minidiff.unet import UNetConfig
    from minidiff.vae import VAEConfig
    cfg = dict(unet=UNetConfig(block_out_channels=(8, 16), layers_per_block=1, cross_attention=(True, False),
                               heads=2, cross_attention_dim=8, norm_num_groups=4),
               vae=VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4), latent=4, context=8,
               batch=2)
    cpu = torch.device("cpu")
    trainer = bench_train.Trainer(cfg, cpu, {"baseline"}, bench_train.make_data(cfg, cpu))
    assert math.isfinite(float(trainer.step()))
    assert counted[5:] == ["bench_train"]


def test_accumulation_clipping_and_the_nan_guard():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(4, 3)

    def loss_fn(rows):
        return ((x[rows] @ w) ** 2).mean()

    # two micro-batches of 2 rows == one batch of 4 rows (equal sizes: the mean of means is the mean)
    opt = torch.optim.SGD([w], lr=0.1)
    w0 = w.detach().clone()
    r = loop.train_step([[0, 1], [2, 3]], loss_fn, opt, [w])
    one = w0 - 0.1 * torch.func.grad(lambda v: ((x @ v) ** 2).mean())(w0)
    torch.testing.assert_close(w.detach(), one, rtol=1e-6, atol=1e-7)
    assert r.loss == pytest.approx(float(((x @ w0) ** 2).mean()), rel=1e-6) and r.lr == 0.1
    # clipping: the step is lr * g * c / |g| when |g| > c, and the norm before clipping is reported
    w1 = w.detach().clone()
    g = torch.func.grad(lambda v: ((x @ v) ** 2).mean())(w1)
    r = loop.train_step([[0, 1, 2, 3]], loss_fn, opt, [w], max_grad_norm=1e-3)
    assert r.grad_norm == pytest.approx(float(g.norm()), rel=1e-5)
    torch.testing.assert_close(w.detach(), w1 - 0.1 * g * 1e-3 / g.norm(), rtol=1e-5, atol=1e-8)
    # a NaN loss stops before the optimizer step: the weights are untouched
    w2 = w.detach().clone()
    with pytest.raises(loop.TrainingDiverged, match=r"step 7: the loss is nan.*Last good checkpoint: ckpt-5"):
        loop.train_step([[0]], lambda rows: loss_fn(rows) * float("nan"), opt, [w], step=7,
                        last_checkpoint="ckpt-5")
    assert torch.equal(w.detach(), w2) and w.grad is None


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (on a GPU each one waits for the queued work)."""
    READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_one_host_sync_per_step():
    """Loss, gradient norm and a logged tensor of two micro-batches, clipping and EMA: one read of the device per
    step."""
    from minidiff.ema import EMA
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-2, fused=True)
    ema = EMA(params, decay=0.9)
    x = torch.randn(4, 3)

    def loss_fn(rows):
        y = model(x[rows])
        return (y ** 2).mean(), {"mean_abs": y.abs().mean(), "rows": len(rows)}

    for _ in range(2):
        with HostReads() as counted:
            r = loop.train_step([[0, 1], [2, 3]], loss_fn, opt, list(params.values()), ema=ema, ema_params=params,
                                max_grad_norm=1.0)
        assert counted.reads == ["tolist"], counted.reads
        assert set(r.logs) == {"mean_abs", "rows"} and r.logs["rows"] == 2.0 and r.grad_norm > 0
        assert all(type(v) is float for v in (r.loss, r.grad_norm, *r.logs.values()))
