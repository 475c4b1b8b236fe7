"""minidiff.train.optim: THE learning-rate schedule — equal to diffusers' schedules (final = 0), and decaying to
`final` × lr (the tiny recipe's tenth) — and the torch scheduler that runs it."""
import numpy as np
import pytest
import torch

from minidiff.train.optim import lr_factor, make_lr_scheduler


@pytest.mark.parametrize("schedule,theirs", [("constant", "constant_with_warmup"), ("cosine", "cosine"),
                                             ("linear", "linear")])
def test_lr_schedules_match_diffusers(schedule, theirs):
    from diffusers.optimization import get_scheduler
    total, warmup = 40, 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(theirs, opt, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ours = [lr_factor(s, schedule, warmup, total) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_schedule_decays_to_final():
    """The tiny recipe's schedule: warm-up from 0 over 10 steps, then a cosine from 1 down to 0.1 at step 100."""
    f = [lr_factor(s, "cosine", 10, 100, final=0.1) for s in range(101)]
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)          # half-way through the cosine: half-way from 1 to 0.1
    assert f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))     # never rises after the warm-up
    assert lr_factor(55, "linear", 10, 100, final=0.1) == pytest.approx(0.55)
    assert lr_factor(100, "constant", 10, 100, final=0.1) == 1.0
    # the LambdaLR every run steps gives lr · lr_factor(s) at step s
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_lr_scheduler(opt, "cosine", 10, 100, final=0.1)
    seen = []
    for _ in range(101):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [2.0 * x for x in f], rtol=1e-12, atol=0)
