"""The attention of SD's largest layer on the CPU, bf16: torch's fused kernel against what Python can build around it.

    python benchmarks/attention_cpu.py            # 2 × 8 heads × 4096 tokens × 40, the 64×64 self-attention
    python benchmarks/attention_cpu.py --unet     # then what the kept variant buys in one whole guided U-Net step

Why: in one guided SD v1.4 U-Net step in bf16 on a CPU without AMX, torch's SDPA (its CPU flash-attention kernel,
what minidiff and diffusers both call) takes about half the time, and OpenVINO's fused attention ("Subgraph" in its
profile) does the same work 2-3× faster (docs/benchmarks.md, the CPU profile). Could minidiff's attention, built from
torch ops, close that? Each variant below computes softmax(QKᵀ/√d) V of the same bf16 q, k, v; the error is against
float64 (the flash kernel keeps the scores in fp32; a bf16 score matrix loses ~3 decimal digits of the logits):

  sdpa              F.scaled_dot_product_attention (torch's CPU flash kernel), head width 40
  sdpa, d padded    the same with q, k, v zero-padded to 48 / 64 wide (scale kept 1/√40): GEMM-friendlier tiles
  oneDNN fp32       per head and chunk of queries: scores by oneDNN's fp32 matmul, softmax, then P V (fp32)
  mm bf16 scores    per head and chunk: torch.mm in bf16 (scores rounded to bf16), softmax, P V
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import append_section, interleaved, load_average, md_table, median

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

B, H, L, D = 2, 8, 4096, 40


def variants(q, k, v):
    scale = D ** -0.5
    lin = torch.ops.mkldnn._linear_pointwise

    def padded(n):
        qp, kp, vp = (F.pad(x, (0, n - D)) for x in (q, k, v))
        return lambda: F.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :D]

    def chunked(chunk, dtype, onednn):
        def run():
            qq = (q.to(dtype) * scale).reshape(B * H, L, D)              # [BH, L, d]
            kk = k.to(dtype).reshape(B * H, L, D)                        # [BH, S, d]: a linear layer's weight = kᵀ
            vt = v.to(dtype).reshape(B * H, L, D).transpose(1, 2).contiguous()   # [BH, d, S]
            out = torch.empty(B * H, L, D, dtype=q.dtype)
            for b in range(B * H):
                for i in range(0, L, chunk):
                    if onednn:
                        s = lin(qq[b, i:i + chunk], kk[b], None, "none", [], "")          # [c, S]
                        out[b, i:i + chunk] = lin(torch.softmax(s, -1), vt[b], None, "none", [], "")
                    else:
                        s = torch.mm(qq[b, i:i + chunk], kk[b].T)                           # [c, S]
                        out[b, i:i + chunk] = torch.softmax(s, -1) @ vt[b].T
            return out.reshape(B, H, L, D)
        return run

    return {"sdpa (torch's CPU flash kernel), d = 40": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa, d padded to 48": padded(48), "sdpa, d padded to 64": padded(64),
            "oneDNN fp32 matmuls, 1024-query chunks": chunked(1024, torch.float32, True),
            "torch.mm bf16 (bf16 scores), 512-query chunks": chunked(512, torch.bfloat16, False)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5, help="interleaved rounds")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--unet", action="store_true", help="also time a full SD v1.4 U-Net step (random weights) with "
                   "minidiff's long-sequence matmul path (kernels.onednn.attention) on and off")
    args = p.parse_args(argv)
    load_before = load_average()
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(B, H, L, D, generator=g) * 2).bfloat16() for _ in range(3))   # logits of a few units
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    fns = variants(q, k, v)
    times = interleaved(fns, args.n, warmup=1)
    base = median(times[next(iter(fns))]["wall"])
    rows = []
    for name, f in fns.items():
        t = median(times[name]["wall"])
        err = float((f().double() - ref).abs().max())
        rows.append([name, f"{1e3 * t:.0f}", f"{1e3 * min(times[name]['wall']):.0f}", f"{t / base:.2f}×", f"{err:.1e}"])
    table = md_table(["variant", "median ms", "min ms", "÷ sdpa", "max abs error vs float64"], rows)
    print("\n" + table)
    notes = [f"q, k, v: {B}×{H}×{L}×{D} bf16 (SD's 64×64 self-attention, batch 2 = one guided step), entries N(0, 4); "
             f"{args.n} interleaved rounds after a warm-up, torch threads {torch.get_num_threads()}"]
    if not args.no_append:
        append_section("CPU attention, bf16: torch's flash kernel vs variants built from torch ops", table, notes,
                       load_before)
    if args.unet:
        unet_step(args)


def unet_step(args):
    """One guided U-Net step (batch 2, 64×64 latents, SD v1.4 size, random weights) in bf16, minidiff's default
    kernels, with kernels.onednn.attention taking the long self-attentions (the default) and with torch's flash kernel
    for all. (fp32 takes the flash kernel by default: the matmul path showed no gain there, kernels/onednn.py.)"""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from sd_fixtures import SD14_UNET

    from minidiff.kernels import onednn
    from minidiff.unet import UNet, UNetConfig

    load_before = load_average()
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_diffusers(SD14_UNET)).eval().requires_grad_(False)
    default = onednn.ATTENTION_MIN_TOKENS
    rows = []
    for dtype in (torch.bfloat16,):
        unet.to(dtype)
        x, c = torch.randn(2, 4, 64, 64, dtype=dtype), torch.randn(2, 77, 768, dtype=dtype)
        t, outs = torch.tensor([500, 500]), {}

        def step(name, min_tokens):
            def run():
                onednn.ATTENTION_MIN_TOKENS = min_tokens
                with torch.no_grad():
                    outs[name] = unet(x, t, c).double()
            return run
        fns = {"oneDNN matmuls for ≥ 2048 tokens (default)": step("on", default),
               "torch's flash kernel everywhere": step("off", 10 ** 9)}
        times = interleaved(fns, args.n, warmup=1)
        onednn.ATTENTION_MIN_TOKENS = default
        on, off = (median(times[k]["wall"]) for k in fns)
        diff = float((outs["on"] - outs["off"]).abs().max() / outs["off"].abs().max())
        rows.append([str(dtype).replace("torch.", ""), f"{on:.2f}", f"{off:.2f}", f"{on / off:.3f}×", f"{diff:.1e}"])
    table = md_table(["dtype", "default s/step", "flash everywhere s/step", "ratio", "max rel Δ of the output"], rows)
    print("\n" + table)
    notes = [f"one guided SD v1.4 U-Net step, random weights, batch 2, latents 64×64; {args.n} interleaved rounds after "
             f"a warm-up, medians; torch threads {torch.get_num_threads()}; the 5 self-attentions at 64×64 (4096 "
             f"tokens) take the matmul path, the 32×32 ones (1024) and every cross-attention stay on the flash kernel"]
    if not args.no_append:
        append_section("CPU attention in the whole U-Net step: oneDNN matmuls vs torch's flash kernel", table, notes,
                       load_before)


if __name__ == "__main__":
    main()
