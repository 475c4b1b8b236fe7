"""minidiff's Triton kernels (minidiff/kernels/triton*.py) against plain PyTorch, forward and every gradient, in
fp32 / bf16 / fp16, on small odd shapes — on a CPU, in Triton's interpreter.

TRITON_INTERPRET=1 must be in the environment before triton is imported, so the kernels run in a subprocess (this
file run as a script) with that variable set; the rest of the suite keeps its ordinary triton (torch.compile's
inductor imports it on the CPU too). The subprocess runs every case once and prints, per case and tensor, the largest
error and the largest error as a fraction of the tolerance; the tests below assert on those numbers.

The reference is the same function in plain torch, evaluated in float64 on the very values the kernel received
(bf16 inputs upcast exactly), with autograd through it on float64 leaves: so the only differences are the kernel's
fp32 arithmetic and the rounding of its outputs to the input dtype.
Not tested here: torch.compile over the triton_ops (with CPU tensors it fails in fake-tensor tracing, a known
limit); benchmarks/gpu_kernels_check.py checks compile, and the speed, on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# |ours − reference| ≤ atol + rtol · |reference|, per dtype of the inputs. fp32: the kernels' fp32 sums in another
# order than float64's; bf16 (8-bit mantissa) and fp16 (11-bit): one rounding of the output to that dtype (half an
# ulp: 2⁻⁹ resp. 2⁻¹² relative) plus the fp32 math, with room for a value rounded the other way.
TOLERANCES = {
    "float32": dict(atol=1e-5, rtol=1e-5),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
    "float16": dict(atol=5e-3, rtol=5e-3),
}

# (op, label, arguments): shapes are odd on purpose (masks, partial tiles), and a few are big enough that a kernel's
# loop takes two tiles (1200 pixels a channel > 1024; 70 rows > 16, 130 columns > 128).
CASES = [
    ("group_norm", "2x64x5x7,G32,silu", dict(shape=(2, 64, 5, 7), groups=32, silu=True)),  # the slow one: 128 programs
    ("group_norm", "2x6x11,G3", dict(shape=(2, 6, 11), groups=3, silu=False)),
    ("group_norm", "2x6x11,G3,silu", dict(shape=(2, 6, 11), groups=3, silu=True)),
    ("group_norm", "1x4x40x30,G2,silu", dict(shape=(1, 4, 40, 30), groups=2, silu=True)),
    ("layer_norm", "2x5x37", dict(shape=(2, 5, 37))),
    ("layer_norm", "2x17x320", dict(shape=(2, 17, 320))),   # 34 rows: 3 backward programs, the last one partial
    ("geglu", "2x5x(2*37)", dict(shape=(2, 5, 74))),
    ("geglu", "3x(2*600)", dict(shape=(3, 1200))),
    *[("bias_act_residual", f"2x5x37{',bias' * b}{',gelu' * g}{',residual' * r}",
       dict(shape=(2, 5, 37), bias=b, gelu=g, residual=r))
      for g in (False, True) for b in (False, True) for r in (False, True)],
    ("bias_act_residual", "70x130,bias,gelu,residual", dict(shape=(70, 130), bias=True, gelu=True, residual=True)),
]
DTYPES = list(TOLERANCES)


# ----------------------------------------------------------------------------------- the checks (in the subprocess)
def _reference(op, args, inputs):
    """The plain-torch function (float64 in, float64 out)."""
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


def _ours(K, op, args, inputs):
    if op == "group_norm":
        return K.group_norm(*inputs, args["groups"], 1e-5, args["silu"])
    if op == "layer_norm":
        return K.layer_norm(*inputs, 1e-5)
    if op == "geglu":
        return K.geglu(inputs[0])
    y, bias, res = inputs
    return K.bias_act_residual(y, bias, args["gelu"], res)


def _inputs(op, args, dtype):
    """Input tensors in `dtype` (weights and biases in fp32, as a module under autocast keeps them); None = absent."""
    shape = args["shape"]
    x = torch.randn(shape).to(dtype) * 2 + 0.5      # a mean and a spread that are not 0 and 1
    if op in ("group_norm", "layer_norm"):
        n = shape[1] if op == "group_norm" else shape[-1]
        return [x, 1 + 0.5 * torch.randn(n), 0.5 * torch.randn(n)]
    if op == "geglu":
        return [x]
    return [x, torch.randn(shape[-1]) if args["bias"] else None, torch.randn(shape).to(dtype) if args["residual"]
            else None]


def run_checks() -> list[dict]:
    from minidiff.kernels import triton as K
    assert K.AVAILABLE, "triton is importable, yet minidiff.kernels.triton says AVAILABLE = False"
    records = []
    for op, label, args in CASES:
        for dname in DTYPES:
            torch.manual_seed(0)
            dtype, tol = getattr(torch, dname), TOLERANCES[dname]
            inputs = [t if t is None else t.requires_grad_() for t in _inputs(op, args, dtype)]
            ref_in = [t if t is None else t.detach().double().requires_grad_() for t in inputs]
            out, ref = _ours(K, op, args, inputs), _reference(op, args, ref_in)
            grad = torch.randn(ref.shape).to(dtype)
            leaves = [i for i, t in enumerate(inputs) if t is not None]
            got = torch.autograd.grad(out, [inputs[i] for i in leaves], grad)
            want = torch.autograd.grad(ref, [ref_in[i] for i in leaves], grad.double())
            pairs = [("out", out, ref, inputs[0].dtype)] + [
                (f"grad[{i}]", g, w, inputs[i].dtype) for i, g, w in zip(leaves, got, want)]
            for name, a, b, want_dtype in pairs:
                wrong = [] if a.dtype == want_dtype else [f"dtype {a.dtype}, not {want_dtype}"]
                if a.shape != b.shape:
                    wrong.append(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
                    err = ratio = float("inf")
                else:
                    d = (a.double() - b).abs()
                    err = d.max().item()
                    ratio = (d / (tol["atol"] + tol["rtol"] * b.abs())).max().item()
                records.append(dict(op=op, label=label, dtype=dname, tensor=name, max_abs=err, ratio=ratio,
                                    wrong=wrong))
    return records


# ------------------------------------------------------------------------------------------- the tests (in pytest)
@pytest.fixture(scope="module")
def records():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e .[test] installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"the interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,label", [(op, label) for op, label, _ in CASES])
def test_forward_and_gradients_match_torch(records, op, label, dtype):
    mine = [r for r in records if (r["op"], r["label"], r["dtype"]) == (op, label, dtype)]
    expected = 1 + {"group_norm": 3, "layer_norm": 3, "geglu": 1}.get(op, 0)
    if op == "bias_act_residual":
        expected = 2 + (",bias" in label) + (",residual" in label)
    assert [r["tensor"] for r in mine][:1] == ["out"] and len(mine) == expected, mine
    for r in mine:
        assert not r["wrong"], f"{op} {label} {dtype} {r['tensor']}: {r['wrong']}"
        assert r["ratio"] <= 1, (f"{op} {label} {dtype} {r['tensor']}: max |Δ| {r['max_abs']:.3g}, "
                                 f"{r['ratio']:.3g}× the tolerance {TOLERANCES[dtype]}")


def test_bad_input_errors():
    """The checks at each op's door (they run before any kernel, so no interpreter is needed)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from minidiff.kernels import triton as K
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"group_norm: num_groups=4 must be positive and divide the 6 channels"):
        K.group_norm(x, torch.ones(6), torch.zeros(6), 4, 1e-5, False)
    with pytest.raises(ValueError, match=r"group_norm: weight and bias must have shape \(6,\)"):
        K.group_norm(x, torch.ones(5), torch.zeros(6), 3, 1e-5, True)
    with pytest.raises(TypeError, match=r"layer_norm: x.dtype must be float32, bfloat16 or float16, got torch.float64"):
        K.layer_norm(x.double(), torch.ones(3), torch.zeros(3), 1e-5)
    with pytest.raises(ValueError, match=r"geglu: h's last dimension must be even"):
        K.geglu(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"bias_act_residual: bias must have shape \(5,\)"):
        K.bias_act_residual(torch.randn(2, 5), torch.randn(4))
    with pytest.raises(ValueError, match=r"bias_act_residual: residual must have y's shape \(2, 5\)"):
        K.bias_act_residual(torch.randn(2, 5), None, True, torch.randn(1, 5))


def test_imports_without_triton():
    """On a machine without triton the module imports and says AVAILABLE = False (the kernels layer then never
    picks it)."""
    code = ("import sys; sys.modules['triton'] = None\n"   # a None entry makes `import triton` raise ImportError
            "from minidiff.kernels import triton as K\n"
            "assert K.AVAILABLE is False and not hasattr(K, 'group_norm'), vars(K).keys()\nprint('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


if __name__ == "__main__":   # the subprocess: run every case in the interpreter, print the records as one JSON line
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest (it sets TRITON_INTERPRET=1 before triton is imported)")
    torch.set_num_threads(1)
    print(json.dumps(run_checks()))
