"""Chapter 1.2: our conv2d / max_pool2d / avg_pool2d (slicing + matmul) equal torch's, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from minidiff.nn import Conv2d, avg_pool2d, conv2d, max_pool2d

TOL = dict(atol=1e-5, rtol=1e-5)

# (B, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 3, 8, 8, 4, 3, 1, 0, 1, 1),                    # plain 3x3
    (1, 3, 9, 7, 5, 3, 1, 1, 1, 1),                    # non-square input, "same" padding
    (2, 4, 10, 11, 6, (3, 5), (2, 1), (1, 2), 1, 1),   # non-square kernel, stride and padding per axis
    (2, 4, 12, 9, 8, 3, 2, 2, 2, 2),                   # dilation and groups
    (1, 6, 7, 13, 6, (2, 3), (1, 3), 0, (2, 1), 6),    # depthwise (groups = C_in), anisotropic dilation
    (3, 2, 5, 5, 3, 1, 1, 0, 1, 1),                    # 1x1 convolution
    (1, 8, 6, 6, 4, 5, 3, 2, 1, 4),                    # 5x5 kernel, stride 3, grouped
]


@pytest.mark.parametrize("B,C,H,W,O,k,s,p,d,g", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv2d_matches_torch(B, C, H, W, O, k, s, p, d, g, with_bias):
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(B, C, H, W, requires_grad=True)
    w = torch.randn(O, C // g, kh, kw).requires_grad_()
    b = torch.randn(O).requires_grad_() if with_bias else None
    ours = conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)
    ref = F.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **TOL)

    g_out = torch.randn_like(ref)  # backprop the same upstream gradient through both
    params = [x, w] + ([b] if with_bias else [])
    grads_ours = torch.autograd.grad(ours, params, g_out)
    grads_ref = torch.autograd.grad(ref, params, g_out)
    for name, a, r in zip(["x", "weight", "bias"], grads_ours, grads_ref):
        torch.testing.assert_close(a, r, **TOL, msg=lambda m: f"grad wrt {name}: {m}")


def test_conv2d_rejects_bad_shapes():
    with pytest.raises(ValueError):
        conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3), groups=1)   # C_in/groups mismatch
    with pytest.raises(ValueError):
        conv2d(torch.randn(1, 3, 4, 4), torch.randn(4, 3, 5, 5))            # kernel larger than the input


POOL_CASES = [
    (2, 3, 8, 8, 2, None, 0),
    (1, 2, 9, 7, 3, 2, 0),              # overlapping windows, non-square input
    (2, 4, 10, 12, (2, 3), (1, 2), 0),  # non-square kernel and stride
    (1, 3, 7, 9, 3, 2, 1),              # padding
    (2, 2, 11, 6, (3, 2), None, (1, 1)),
]


@pytest.mark.parametrize("B,C,H,W,k,s,p", POOL_CASES, ids=[f"case{i}" for i in range(len(POOL_CASES))])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_matches_torch(B, C, H, W, k, s, p, kind):
    ours_fn, ref_fn = (max_pool2d, F.max_pool2d) if kind == "max" else (avg_pool2d, F.avg_pool2d)
    x = torch.randn(B, C, H, W, requires_grad=True)
    ours = ours_fn(x, k, s, p)
    ref = ref_fn(x, k, s, p)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **TOL)
    g_out = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, x, g_out)
    (g_ref,) = torch.autograd.grad(ref, x, g_out)
    torch.testing.assert_close(g_ours, g_ref, **TOL)


def test_conv2d_module_matches_torch_module():
    torch_conv = torch.nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2)
    ours = Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2)
    # same parameter names and shapes: the state_dicts are interchangeable
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in torch_conv.state_dict().items()}
    ours.load_state_dict(torch_conv.state_dict(), strict=True)
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(ours(x), torch_conv(x), **TOL)
    # default init has the same scale as torch's (bound 1/sqrt(fan_in), fan_in = 2*3*2 = 12)
    big = Conv2d(64, 64, 3)
    bound = 1 / (64 * 9) ** 0.5
    assert big.weight.abs().max() <= bound and big.weight.abs().max() > 0.9 * bound
    assert Conv2d(3, 4, 3, bias=False).bias is None
