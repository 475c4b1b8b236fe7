"""The whole models on a CUDA GPU, Triton kernels against the reference kernels: one command, one table.

    python benchmarks/gpu_model_check.py [--out FILE.md]

For the SD v1.4 U-Net (random weights, full size, batch 2 at 64×64 latents), the VAE decoder and the text encoder:
  * inference: the default kernels (Triton on CUDA) vs kernels.use("reference"), in fp32 / bf16 / fp16,
    max |a − b| / max |b|;
  * training: the gradients of one U-Net loss through the Triton kernels vs the reference kernels (fp32, bf16);
  * torch.compile(fullgraph=True) of the U-Net with the Triton ops inside: graph breaks (must be 0) and the compiled
    output vs eager;
  * time per U-Net call, Triton vs reference kernels, eager (torch.cuda.Event medians).
Exit status 1 when a correctness row fails its bound (the per-dtype tolerances of tests/kernel_fixtures.py TOL).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidiff import kernels  # noqa: E402
from minidiff.clip import CLIPTextConfig, CLIPTextTransformer  # noqa: E402
from minidiff.unet import UNet, UNetConfig  # noqa: E402
from minidiff.vae import AutoencoderKL, VAEConfig  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}   # as tests/kernel_fixtures.py (+ fp16: 11 bits)
TOL_GRAD = {torch.float32: 1e-3, torch.bfloat16: 1e-1}


class _Skip(Exception):
    pass


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def jitter(model, scale=0.02):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale)
    return model


def timed(fn, n=10):
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="a small U-Net (a quick check of the script)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (oneDNN vs reference, no timing)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    # fp32 means fp32 here: cuDNN's convolutions and cuBLAS's matmuls default to TF32 on this GPU (10-bit mantissa),
    # which alone puts two kernel families ~1e-3 apart
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type == "cuda":
        assert kernels.TRITON, "Triton kernels not available"
    else:   # smoke: the script's own wiring on the CPU
        global timed
        timed = lambda fn, n=0: float("nan")  # noqa: E731
    rows, ok = [], True
    cfg = (UNetConfig(block_out_channels=(64, 128), cross_attention=(True, True), heads=4, cross_attention_dim=64,
                      norm_num_groups=32, sample_size=16) if args.small else UNetConfig())
    unet = jitter(UNet(cfg)).to(dev).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    s = cfg.sample_size
    x = torch.randn(2, 4, s, s, generator=g).to(dev)
    c = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(dev)
    t = torch.tensor([10, 700], device=dev)

    def row(what, dtype, value, bound, extra=""):
        nonlocal ok
        good = value < bound
        ok &= good
        rows.append([what, str(dtype).replace("torch.", ""), f"{value:.1e}", f"< {bound:.0e}", "ok" if good else
                     "**FAIL**", extra])
        print(rows[-1], flush=True)

    for dtype in (torch.float32, torch.bfloat16, torch.float16) if dev.type == "cuda" else (torch.float32,):
        try:
            m = unet.to(dtype)
            xi, ci = x.to(dtype), c.to(dtype)
            with torch.no_grad(), kernels.use("triton"):   # eager calls take the reference on CUDA: force ours
                out = m(xi, t, ci)
                ms = timed(lambda: m(xi, t, ci))
            with torch.no_grad(), kernels.use("reference"):
                ref = m(xi, t, ci)
                ms_ref = timed(lambda: m(xi, t, ci))
            row("U-Net inference: Triton vs reference kernels (eager)", dtype, rel(out, ref), TOL[dtype],
                f"{ms:.1f} ms Triton vs {ms_ref:.1f} ms reference per call")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(["U-Net inference", str(dtype), f"failed: {type(e).__name__}: {str(e)[:120]}", "", "**FAIL**", ""])
            ok = False
    unet.to(torch.float32)

    for dtype in (torch.float32, torch.bfloat16):
        try:
            m = unet.to(dtype).train().requires_grad_(True)
            grads = []
            for backend in ("triton", "reference"):
                m.zero_grad()
                with kernels.use(backend):
                    m(x.to(dtype), t, c.to(dtype)).float().square().mean().backward()
                grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
            row("U-Net training gradients: Triton vs reference", dtype, rel(*grads), TOL_GRAD[dtype])
            m.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(["U-Net training", str(dtype), f"failed: {type(e).__name__}: {str(e)[:120]}", "", "**FAIL**", ""])
            ok = False
    unet.to(torch.float32).eval().requires_grad_(False)

    try:   # torch.compile sees into the triton_ops: one graph, no breaks
        if args.no_compile:
            raise _Skip
        m = unet.to(torch.float16)
        xi, ci = x.half(), c.half()
        torch._dynamo.reset()
        with torch.no_grad():
            explanation = torch._dynamo.explain(m)(xi, t, ci)
            torch._dynamo.reset()
            compiled = torch.compile(m, fullgraph=True)
            out_c, out_e = compiled(xi, t, ci), m(xi, t, ci)
            ms_c, ms_e = timed(lambda: compiled(xi, t, ci)), timed(lambda: m(xi, t, ci))
        rows.append(["U-Net torch.compile(fullgraph=True): graph breaks", "float16",
                     str(explanation.graph_break_count), "= 0", "ok" if explanation.graph_break_count == 0 else
                     "**FAIL**", "; ".join(r.reason.splitlines()[0] for r in explanation.break_reasons)[:200]])
        ok &= explanation.graph_break_count == 0
        row("U-Net compiled vs eager", torch.float16, rel(out_c, out_e), TOL[torch.float16],
            f"{ms_c:.1f} ms compiled vs {ms_e:.1f} ms eager")
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(["U-Net torch.compile", "float16", f"failed: {type(e).__name__}: {str(e)[:160]}", "", "**FAIL**", ""])
        ok = False
    del unet
    torch.cuda.empty_cache()

    try:   # the VAE decoder and the text encoder, fp16 / fp32
        vae = jitter(AutoencoderKL(VAEConfig() if not args.small else VAEConfig(block_out_channels=(32, 64))))
        vae = vae.to(dev).eval().requires_grad_(False)
        text = jitter(CLIPTextTransformer(CLIPTextConfig() if not args.small else CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))).to(dev).eval().requires_grad_(False)
        z = torch.randn(1, 4, 64 if not args.small else 8, 64 if not args.small else 8, generator=g).to(dev)
        ids = torch.randint(0, 49408, (2, 77), generator=g).to(dev)
        for dtype in (torch.float32, torch.float16) if dev.type == "cuda" else (torch.float32,):
            with torch.no_grad():
                with kernels.use("triton"):
                    d = vae.to(dtype).decode(z.to(dtype))
                    e = text.to(dtype)(ids)
                with kernels.use("reference"):
                    d_ref, e_ref = vae.decode(z.to(dtype)), text(ids)
            row("VAE decode: Triton vs reference", dtype, rel(d, d_ref), TOL[dtype])
            row("text encoder: Triton vs reference", dtype, rel(e, e_ref), TOL[dtype])
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(["VAE / text encoder", "", f"failed: {type(e).__name__}: {str(e)[:160]}", "", "**FAIL**", ""])
        ok = False

    head = ["check", "dtype", "value", "bound", "verdict", "notes"]
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    text = (f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {__import__('triton').__version__}\n\n{table}\n") if dev.type == "cuda" else table
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
