"""minidiff.ema: the exponential moving average of the trained weights, against diffusers' EMAModel."""
import torch

from minidiff.ema import EMA


def test_ema_matches_diffusers_emamodel():
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours, theirs = EMA(params, decay=0.9), EMAModel(params, decay=0.9)
    for _ in range(30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ours.update(params)
        theirs.step(params)
    for a, b in zip(ours.shadow.values(), theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    trained = [p.detach().clone() for p in params]
    with ours.swapped_in(params):                       # validation renders with the average ...
        assert all(torch.equal(p, s) for p, s in zip(params, ours.shadow.values()))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))   # ... and training goes on from its own weights
    state = ours.state_dict()
    again = EMA(params, decay=0.5)
    again.load_state_dict(state)
    assert again.num_updates == 30 and again.decay == 0.9
