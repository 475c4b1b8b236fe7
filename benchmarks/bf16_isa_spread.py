"""How far bf16 lands from fp32 under each oneDNN ISA this CPU offers: the numbers behind the bf16 bounds of
tests/test_kernels.py (the op tolerance TOL and the network budget √n·2⁻⁸ of tests/kernel_fixtures.py).

oneDNN picks its kernels by the CPU's instruction set (AVX2, AVX-512, AVX-512 with bf16 instructions, AMX), and
ONEDNN_MAX_CPU_ISA caps that choice, so one machine can show what several CPUs would compute. For each cap this runs,
in a fresh process (the cap is read once, when oneDNN starts), the bf16 checks of tests/test_kernels.py on their tiny
models and prints the errors next to their bounds:

  linear / conv   max |fast − reference| / max |reference| over the op cases (bound: TOL 3e-2)
  U-Net           the same for one U-Net call, fast vs reference kernels (bound: 2·√n·2⁻⁸, n = its bf16 roundings)
  pipeline        worst pixel |bf16 − fp32| of a 3-step generate(), fast and reference kernels, over --seeds model
                  seeds (the test uses seed 0; bound √n·2⁻⁸), and ‖bf16 − fp32‖ / ‖fp32‖

    python benchmarks/bf16_isa_spread.py             # prints the table; --append adds it to docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import REPO, append_section, cpu_flags, load_average, md_table

ISAS = ["AVX2", "AVX512_CORE", "AVX512_CORE_BF16", "AVX512_CORE_AMX", None]   # None: no cap (oneDNN's own choice)


def measure(seeds: int) -> dict:
    """The bf16 errors in this process (under whatever ONEDNN_MAX_CPU_ISA it was started with)."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    import torch.nn.functional as F

    from kernel_fixtures import (UNET, bf16_budget, count_bf16_roundings, generate, jitter, norm_rel, rel, tiny_pipe,
                                 unet_inputs)
    from minidiff import kernels
    from minidiff.nn.layers import Conv2d
    from minidiff.unet import UNet

    bf16 = torch.bfloat16
    out = {"onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 10, 16, 24, generator=g)[..., 0, :].to(bf16)
        w, b = torch.randn(12, 24, generator=g).to(bf16), torch.randn(12, generator=g).to(bf16)
        other = torch.randn(2, 12, 10, generator=g).to(bf16).transpose(1, 2)
        y = F.linear(x, w, b)
        h = torch.randn(2, 5, 24, generator=g).to(bf16)
        out["linear"] = max(rel(kernels.linear(x, w, b), y), rel(kernels.linear(x, w, b, gelu=True), F.gelu(y)),
                            rel(kernels.linear(x, w, b, mul=other), y * other),
                            rel(kernels.linear(x, w, b, add=other), other + y),
                            rel(kernels.geglu(h, w, b),
                                F.linear(h, w[:6], b[:6]) * F.gelu(F.linear(h, w[6:], b[6:]))))
        conv_err = 0.0
        for geometry in [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1)]:
            conv = jitter(Conv2d(8, 16, **geometry)).to(bf16)
            for shape in [(2, 8, 12, 12), (1, 8, 7, 9)]:
                xc = torch.randn(shape, generator=g).to(bf16)
                conv_err = max(conv_err, rel(conv(xc), F.conv2d(xc, conv.weight, conv.bias, conv.stride, conv.padding)))
        out["conv"] = conv_err
        model = jitter(UNet(UNET)).to(bf16)
        xu, t, c = (a.to(bf16) if a.is_floating_point() else a for a in unet_inputs())
        fast = model(xu, t, c)
        with kernels.use("reference"):
            ref, n = count_bf16_roundings(model, xu, t, c)
        out["unet"], out["unet_bound"] = rel(fast, ref), 2 * bf16_budget(n)
    rows = []
    for seed in range(seeds):
        out32 = generate(tiny_pipe(seed))
        out16 = generate(tiny_pipe(seed).to(dtype=bf16))
        ref16, n = count_bf16_roundings(generate, tiny_pipe(seed, fast=False).to(dtype=bf16))
        rows.append(dict(fast=(out16 - out32).abs().max().item(), ref=(ref16 - out32).abs().max().item(),
                         fast_norm=norm_rel(out16, out32), ref_norm=norm_rel(ref16, out32), bound=bf16_budget(n)))
    out["pipeline"] = rows
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="model seeds of the pipeline check (the test uses seed 0)")
    ap.add_argument("--append", action="store_true", help="append the table to docs/benchmarks.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.seeds)))
        return
    load_before = load_average()
    has_amx = "amx_bf16" in cpu_flags()
    rows = []
    for isa in ISAS:
        if isa == "AVX512_CORE_AMX" and not has_amx:
            continue
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        r = subprocess.run([sys.executable, __file__, "--child", "--seeds", str(args.seeds)], env=env,
                           capture_output=True, text=True, cwd=REPO)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            rows.append([isa or "(no cap)", "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]] + [""] * 6)
            continue
        m = json.loads(line[len("RESULT "):])
        p = m["pipeline"]
        rows.append([isa or "(no cap)", "oneDNN" if m["onednn_bf16"] else "reference",
                     f"{m['linear']:.4f} / {m['conv']:.4f}", f"{m['unet']:.4f} (≤ {m['unet_bound']:.3f})",
                     f"{p[0]['fast']:.4f} / {p[0]['ref']:.4f}",
                     f"{max(q['fast'] for q in p):.4f} / {max(q['ref'] for q in p):.4f}",
                     f"{min(min(q['fast_norm'], q['ref_norm']) for q in p):.4f}–"
                     f"{max(max(q['fast_norm'], q['ref_norm']) for q in p):.4f}", f"{p[0]['bound']:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    table = md_table(["ONEDNN_MAX_CPU_ISA", "bf16 fast kernels", "linear / conv (≤ 0.03)", "U-Net fast vs ref",
                      "pipeline worst pixel, seed 0: fast / ref", f"… worst of {args.seeds} seeds: fast / ref",
                      "‖Δ‖/‖fp32‖", "pipeline bound √n·2⁻⁸"], rows)
    print(table)
    if args.append:
        append_section("bf16 against fp32 under each oneDNN ISA", table, [
            "errors of the bf16 checks of tests/test_kernels.py; linear / conv / U-Net: fast vs reference kernels "
            "(max |Δ| / max |ref|), pipeline: |bf16 − fp32| in pixels (images in [0, 1])",
            "the bounds: bf16 rounds each result to 8 bits (≤ 2⁻⁸ of it); n roundings of independent sign add like a "
            "random walk, √n·2⁻⁸, with n counted on the reference kernels (tests/kernel_fixtures.py)"],
            load_before=load_before)


if __name__ == "__main__":
    main()
