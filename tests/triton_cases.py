"""The four Triton ops' cases, shared by tests/test_triton_kernels.py (the interpreter on the CPU) and
benchmarks/gpu_kernels_check.py (a GPU): each op called as ours, and its plain-torch reference."""
import torch


def reference_op(op, args, inputs):
    """The plain-torch function (float64 in for the truth; the input dtype for torch's own error)."""
    F = torch.nn.functional
    if op == "group_norm":
        x, w, b = inputs
        y = F.group_norm(x, args["groups"], w, b, 1e-5)
        return F.silu(y) if args["silu"] else y
    if op == "layer_norm":
        x, w, b = inputs
        return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)
    if op == "geglu":
        a, gate = inputs[0].chunk(2, dim=-1)
        return a * F.gelu(gate)
    y, bias, res = inputs
    z = y if bias is None else y + bias
    z = F.gelu(z) if args["gelu"] else z
    return z if res is None else z + res


def triton_op(K, op, args, inputs):
    """The same call on minidiff.kernels.triton (K)."""
    if op == "group_norm":
        return K.group_norm(*inputs, args["groups"], 1e-5, args["silu"])
    if op == "layer_norm":
        return K.layer_norm(*inputs, 1e-5)
    if op == "geglu":
        return K.geglu(inputs[0])
    y, bias, res = inputs
    return K.bias_act_residual(y, bias, args["gelu"], res)
