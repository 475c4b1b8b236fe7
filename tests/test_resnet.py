"""Chapter 1.3: ResNet blocks — shapes, the vanishing gradient they cure (measured), and diffusers parity."""
import pytest
import torch
from torch import nn

from minidiff.nn import BasicBlock, ResnetBlock



def test_basic_block_shapes():
    x = torch.randn(2, 16, 9, 7)
    assert BasicBlock(16)(x).shape == (2, 16, 9, 7)
    block = BasicBlock(16, 32)                     # channel change: 1x1 projection on the shortcut
    assert isinstance(block.shortcut, nn.Conv2d)
    y = block(x)
    assert y.shape == (2, 32, 9, 7) and (y >= 0).all()  # ends in a ReLU


@pytest.mark.parametrize("c_in,c_out,temb", [(32, 32, None), (32, 32, 64), (32, 64, 64), (64, 32, None)])
def test_resnet_block_shapes(c_in, c_out, temb):
    block = ResnetBlock(c_in, c_out, temb_channels=temb)
    x = torch.randn(2, c_in, 8, 6)
    t = torch.randn(2, temb) if temb else None
    assert block(x, t).shape == (2, c_out, 8, 6)
    assert hasattr(block, "conv_shortcut") == (c_in != c_out)
    assert hasattr(block, "time_emb_proj") == (temb is not None)
    if temb:  # the time embedding really enters: a different temb changes the output
        assert not torch.allclose(block(x, t), block(x, torch.randn(2, temb)))


def test_resnet_block_is_identity_plus_a_correction():
    # y = x + F(x): with F's last layer zeroed the block is exactly the identity, and so is its Jacobian
    # (the gradient reaches x untouched). This is why deep stacks of them start out well-conditioned.
    block = ResnetBlock(32, 32, temb_channels=16)
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    y = block(x, torch.randn(2, 16))
    assert torch.equal(y, x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g)


def _first_and_last_grad_norms(depth, width, act, residual):
    """A stack of `depth` layers h <- act(W h + b) (plain) or h <- h + act(W h + b) (residual), PyTorch's default
    Linear init; returns ‖∂L/∂W‖ of the first and of the last layer for L = mean(h_out²)."""
    layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
    h = torch.randn(64, width)
    for layer in layers:
        h = h + act(layer(h)) if residual else act(layer(h))
    h.pow(2).mean().backward()
    return layers[0].weight.grad.norm().item(), layers[-1].weight.grad.norm().item()


@pytest.mark.parametrize("act", [torch.tanh, torch.relu], ids=["tanh", "relu"])
def test_plain_deep_stack_gradient_vanishes_residual_does_not(act):
    # Backprop multiplies the gradient by Wᵀ·diag(act') once per layer. With the default init
    # (W ~ U(±1/√fan_in), so Var(w)·fan_in = 1/3) and |act'| <= 1 each factor shrinks it by ~1/√3 or more:
    # after 40 layers that is (1/√3)^40 ≈ 3e-10. A residual layer's Jacobian is I + Wᵀ·diag(act'): the identity
    # carries the gradient down unchanged, whatever the branch does.
    depth = 40
    torch.manual_seed(0)
    plain_first, plain_last = _first_and_last_grad_norms(depth, 64, act, residual=False)
    torch.manual_seed(0)
    res_first, res_last = _first_and_last_grad_norms(depth, 64, act, residual=True)
    # measured here: tanh plain ratio ~1e-10, residual ~2; relu plain ~1e-15, residual ~0.2
    assert plain_first / plain_last < 1e-6, (plain_first, plain_last)   # vanished: >= 6 orders of magnitude
    assert res_first / res_last > 1e-2, (res_first, res_last)           # same order of magnitude as the top
    assert res_first > 1e4 * plain_first


DIFFUSERS_CASES = [  # (c_in, c_out, temb_channels, eps)
    (32, 32, 64, 1e-6),
    (32, 64, 64, 1e-6),     # channel change: conv_shortcut
    (64, 32, None, 1e-5),   # no time embedding (as in the VAE)
]


@pytest.mark.parametrize("c_in,c_out,temb,eps", DIFFUSERS_CASES)
def test_resnet_block_matches_diffusers(c_in, c_out, temb, eps):
    from diffusers.models.resnet import ResnetBlock2D

    ref = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=temb, groups=32, eps=eps).eval()
    ours = ResnetBlock(c_in, c_out, temb_channels=temb, groups=32, eps=eps).eval()
    with torch.no_grad():  # give the norms non-trivial affine parameters so they are really compared
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical parameter names
    x = torch.randn(2, c_in, 8, 8)
    t = torch.randn(2, temb) if temb else None
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-5, atol=1e-5)
