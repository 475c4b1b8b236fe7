"""minidiff's Triton kernels on a GPU: correctness, speed and torch.compile, in one short run.

For each op (kernels/triton.py: group_norm(+SiLU), layer_norm, geglu, bias_act_residual) at SD v1.4's shapes and in
fp32, bf16, fp16 (weights in the same dtype as the activations, as after `pipe.to(dtype)`):

  * error of the output and of every gradient against the same function in float64 on the same (upcast) inputs:
    max |Δ| / (max |Δ| ÷ max |reference|), ours beside torch's own kernels in that dtype. A row passes when ours is
    within TOLERANCES (atol + rtol·|ref|) or no worse than 2 × torch's error in the same dtype;
  * time, median of triton.testing.do_bench: ours vs torch eager (F.group_norm + F.silu, F.layer_norm, chunk + gelu,
    (y + b) -> gelu -> + residual), forward alone and forward + backward;
  * torch.compile(fullgraph=True) of a small function around the op (on each op's first shape, bf16 by default,
    `--compile-dtypes`): it must compile with no graph break, and its output and gradients must match the eager op.

Prints one markdown table (and writes it to `--out`). Exit code 1 only when a correctness check fails (or could not
run); a timing or compile failure is shown in the table. Each (op, shape, dtype) is its own try block.

    python benchmarks/gpu_kernels_check.py                  # on a CUDA machine: a few minutes, most of it compiling
    python benchmarks/gpu_kernels_check.py --smoke          # on a CPU: Triton's interpreter, tiny shapes, no timing
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

if "--smoke" in sys.argv[1:]:   # the interpreter must be chosen before triton is imported (torch imports it lazily)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import md_table, versions  # noqa: E402  (puts the repository on sys.path)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCES = {"fp32": dict(atol=1e-4, rtol=1e-4), "bf16": dict(atol=2e-2, rtol=2e-2),
              "fp16": dict(atol=5e-3, rtol=5e-3)}

# (op, arguments); shapes: SD v1.4's U-Net at 512² (64×64 latents), batch 2 (classifier-free guidance)
CASES = [
    ("group_norm", dict(shape=(2, 320, 64, 64), groups=32, silu=True)),     # the first ResnetBlocks
    ("group_norm", dict(shape=(2, 1280, 8, 8), groups=32, silu=True)),      # the innermost ones
    ("layer_norm", dict(shape=(2, 4096, 320))),                            # a transformer block at 64×64
    ("geglu", dict(shape=(2, 4096, 2560))),                                # its GEGLU (2 × 4·320)
    ("bias_act_residual", dict(shape=(2, 4096, 320), bias=True, gelu=False, residual=True)),  # out-proj + x
    ("bias_act_residual", dict(shape=(2, 4096, 1280), bias=True, gelu=True, residual=False)),
]
SMOKE_CASES = [
    ("group_norm", dict(shape=(2, 64, 5, 7), groups=32, silu=True)),
    ("group_norm", dict(shape=(2, 6, 11), groups=3, silu=False)),
    ("layer_norm", dict(shape=(2, 5, 37))),
    ("geglu", dict(shape=(2, 5, 74))),
    ("bias_act_residual", dict(shape=(2, 5, 37), bias=True, gelu=False, residual=True)),
    ("bias_act_residual", dict(shape=(2, 5, 37), bias=True, gelu=True, residual=False)),
]


def describe(op, args) -> str:
    shape = "×".join(map(str, args["shape"]))
    if op == "group_norm":
        return f"{shape}, G={args['groups']}" + (", SiLU" if args["silu"] else "")
    if op == "bias_act_residual":
        return shape + "".join(f", {k}" for k in ("bias", "gelu", "residual") if args[k])
    return shape


def make_inputs(op, args, dtype, device):
    """Leaf tensors (None = absent) in `dtype`, with a nonzero mean and spread."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=dtype).requires_grad_()
    shape = args["shape"]
    if op in ("group_norm", "layer_norm"):
        n = shape[1] if op == "group_norm" else shape[-1]
        return [rand(*shape, scale=2, shift=0.5), rand(n, scale=0.5, shift=1), rand(n, scale=0.5)]
    if op == "geglu":
        return [rand(*shape)]
    return [rand(*shape), rand(shape[-1]) if args["bias"] else None, rand(*shape) if args["residual"] else None]


def torch_op(op, args, inputs):
    """The reference: plain torch (run in float64 for the truth, in the input dtype for torch's own error)."""
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


def our_op(K, op, args, inputs):
    if op == "group_norm":
        return K.group_norm(*inputs, args["groups"], 1e-5, args["silu"])
    if op == "layer_norm":
        return K.layer_norm(*inputs, 1e-5)
    if op == "geglu":
        return K.geglu(inputs[0])
    return K.bias_act_residual(inputs[0], inputs[1], args["gelu"], inputs[2])


def forward_backward(fn, inputs, grad):
    """-> (output, gradients of the present inputs)."""
    leaves = [t for t in inputs if t is not None]
    out = fn(inputs)
    return out, torch.autograd.grad(out, leaves, grad)


def errors(got, want) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |want|) of a tensor against its float64 reference."""
    d = (got.double() - want).abs().max().item()
    return d, d / max(want.abs().max().item(), 1e-30)


def within(got, want, tol) -> bool:
    return bool(((got.double() - want).abs() <= tol["atol"] + tol["rtol"] * want.abs()).all())


def fmt_err(e) -> str:
    return f"{e[0]:.1e} / {e[1]:.1e}"


def correctness(K, op, args, dname, device) -> tuple[list[str], bool]:
    """-> ([fwd ours, fwd torch, bwd ours (worst gradient), bwd torch], passed)."""
    dtype = DTYPES[dname]
    inputs = make_inputs(op, args, dtype, device)
    grad = torch.randn(torch_op(op, args, inputs).shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    want = forward_backward(lambda i: torch_op(op, args, i), ref_in, grad.double())
    ours = forward_backward(lambda i: our_op(K, op, args, i), inputs, grad)
    theirs = forward_backward(lambda i: torch_op(op, args, i), inputs, grad)
    tol, ok = TOLERANCES[dname], True
    cells = []
    for part in (0, 1):   # 0: the output, 1: the gradients (the worst one shown)
        o_list = [ours[0]] if part == 0 else list(ours[1])
        t_list = [theirs[0]] if part == 0 else list(theirs[1])
        w_list = [want[0]] if part == 0 else list(want[1])
        e_ours = max((errors(o, w) for o, w in zip(o_list, w_list)), key=lambda e: e[1])
        e_torch = max((errors(t, w) for t, w in zip(t_list, w_list)), key=lambda e: e[1])
        for o, t, w in zip(o_list, t_list, w_list):
            if o.shape != w.shape or o.dtype != t.dtype:
                ok = False
            elif not within(o, w, tol) and errors(o, w)[0] > 2 * errors(t, w)[0]:
                ok = False
        cells += [fmt_err(e_ours), fmt_err(e_torch)]
    return cells, ok


def timing(K, op, args, dname, device) -> list[str]:
    """-> [fwd ours ms, fwd torch ms, fwd ×, fwd+bwd ours ms, fwd+bwd torch ms, fwd+bwd ×] (× = torch ÷ ours)."""
    import triton.testing
    inputs = make_inputs(op, args, DTYPES[dname], device)
    grad = torch.randn_like(torch_op(op, args, inputs))
    cells = []
    for backward in (False, True):
        ms = []
        for fn in (lambda i: our_op(K, op, args, i), lambda i: torch_op(op, args, i)):
            if backward:
                call = lambda fn=fn: forward_backward(fn, inputs, grad)  # noqa: E731
            else:
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(inputs)
            ms.append(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
        cells += [f"{ms[0]:.3f}", f"{ms[1]:.3f}", f"{ms[1] / ms[0]:.2f}×"]
    return cells


def compiled(K, op, args, dname, device) -> tuple[str, bool]:
    """torch.compile(fullgraph=True) of x -> op(x) · 2 against the eager op: (cell, matched)."""
    torch._dynamo.reset()
    inputs = make_inputs(op, args, DTYPES[dname], device)

    def f(*i):
        return our_op(K, op, args, list(i)) * 2
    cf = torch.compile(f, fullgraph=True)   # a graph break raises here
    grad = torch.randn_like(f(*inputs))
    want = forward_backward(lambda i: f(*i), inputs, grad)
    got = forward_backward(lambda i: cf(*i), inputs, grad)
    tol = TOLERANCES[dname]
    pairs = [(got[0], want[0])] + list(zip(got[1], want[1]))
    worst = max((g.double() - w.double()).abs().max().item() for g, w in pairs)
    ok = all(((g.double() - w.double()).abs() <= tol["atol"] + tol["rtol"] * w.double().abs()).all() for g, w in pairs)
    return (f"ok, max Δ vs eager {worst:.1e}" if ok else f"**MISMATCH** {worst:.1e}"), ok


def check_case(K, op, cargs, dname, device, smoke: bool, do_compile: bool, why_not_compiled: str):
    """One table row: correctness, then timing, then the compile check, each in its own try block.
    -> (row, correctness failures, timing/compile errors)."""
    row, failed, broken = [op, describe(op, cargs), dname], 0, 0
    try:
        cells, ok = correctness(K, op, cargs, dname, device)
        row += cells + ["ok" if ok else "**FAIL**"]
        failed += not ok
    except Exception as e:  # noqa: BLE001  (one failure must not end the run)
        traceback.print_exc()
        row += [f"error: {type(e).__name__}"] + ["—"] * 3 + ["**FAIL**"]
        failed += 1
    if smoke:
        row += ["— (--smoke)"] * 6
    else:
        try:
            row += timing(K, op, cargs, dname, device)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row += [f"error: {type(e).__name__}"] + ["—"] * 5
            broken += 1
    if smoke:
        row.append("— (--smoke: compile needs CUDA)")
    elif not do_compile:
        row.append(why_not_compiled)
    else:
        try:
            cell, ok = compiled(K, op, cargs, dname, device)
            failed += not ok
        except Exception as e:  # noqa: BLE001  (a graph break under fullgraph=True lands here)
            traceback.print_exc()
            cell, broken = f"**error: {type(e).__name__}: {str(e).splitlines()[0][:80]}**", broken + 1
        row.append(cell)
    return row, failed, broken


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU: Triton's interpreter, tiny shapes, no timing/compile")
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument("--compile-dtypes", default="bf16", help="dtypes to run the torch.compile check in ('' = none)")
    p.add_argument("--ops", default=None, help="a comma-separated subset of group_norm,layer_norm,geglu,"
                   "bias_act_residual")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this path")
    args = p.parse_args(argv)

    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_kernels_check: no CUDA device (torch.cuda.is_available() is False); on a CPU: --smoke")
    from minidiff.kernels import triton as K
    if not K.AVAILABLE:
        raise SystemExit("gpu_kernels_check: triton is not installed (minidiff.kernels.triton.AVAILABLE is False)")
    import triton

    cases = SMOKE_CASES if args.smoke else CASES
    if args.ops:
        cases = [c for c in cases if c[0] in args.ops.split(",")]
    dtypes = args.dtypes.split(",")
    compile_dtypes = [d for d in args.compile_dtypes.split(",") if d]
    rows, failed, broken, compile_now = [], 0, 0, set()
    start = time.perf_counter()
    for op, cargs in cases:
        for dname in dtypes:
            print(f"{op} {describe(op, cargs)} {dname} ...", flush=True)
            if not args.smoke and dname in compile_dtypes and (op, dname) not in compile_now:
                compile_now.add((op, dname))            # the compile check: once per op and dtype, on its first shape
                do_compile = True
            else:
                do_compile = False
            row, f, b = check_case(K, op, cargs, dname, device, args.smoke, do_compile,
                                   "not run (once per op and dtype)" if dname in compile_dtypes else
                                   "not run (--compile-dtypes)")
            rows.append(row)
            failed, broken = failed + f, broken + b
            print(f"  {time.perf_counter() - start:.0f} s: " + md_table([], [row]).splitlines()[-1], flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    headers = ["op", "shape", "dtype", "fwd err ours (max abs / rel)", "fwd err torch", "bwd err ours (worst grad)",
               "bwd err torch", "correct", "fwd ms ours", "fwd ms torch", "fwd speed-up", "fwd+bwd ms ours",
               "fwd+bwd ms torch", "fwd+bwd speed-up", "torch.compile(fullgraph=True)"]
    where = "Triton interpreter on the CPU (--smoke)" if args.smoke else torch.cuda.get_device_name()
    text = "\n".join([
        f"Triton kernels check — {where}; {versions()}, triton {triton.__version__}",
        "",
        md_table(headers, rows),
        "",
        "- err = max |Δ| / (max |Δ| ÷ max |reference|) against the same function in float64 on the same inputs; "
        "bwd = the worst of the gradients; torch = torch's own kernels in that dtype, for scale",
        f"- correct: within {TOLERANCES} (atol + rtol·|ref|), or no worse than 2 × torch's error",
        "- ms: triton.testing.do_bench medians; speed-up = torch eager ÷ ours; compile: "
        "torch.compile(fullgraph=True) of op(...) · 2, output and gradients against the eager op",
        f"- summary: {failed} correctness failure(s), {broken} timing/compile error(s); "
        f"{time.perf_counter() - start:.0f} s in all",
    ])
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
