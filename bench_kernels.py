"""
bench_kernels.py - validate the llm_kernels CUDA kernels (kernels.cu), then time them against PyTorch's
best: scaled_dot_product_attention with the FlashAttention-2 backend, and cuBLAS fp16 matmuls.

Validation comes first and stops the run on failure: attention forward and backward against float64
gpt.naive_attention on small shapes (GQA, window, sinks, ragged T), the forward at the benchmark shape
against SDPA, and every quantized matmul against F.linear with quant.py's dequantized weight. Timing:
CUDA events, `warmup` untimed calls, then the median of `iters` calls.

Attention FLOPs (FlashAttention-2's convention): forward 4 B nh Tq Tk hs, halved when causal; the
backward counts 2.5x the forward (5 matmuls instead of 2). Quantized GEMV bandwidth counts the packed
weight bytes (codes + scales + zero points) read once; the fp16 baseline reads 2 bytes per weight, so a
memory-bound int8 kernel can be at most ~2x and an int4 one ~4x faster than cuBLAS.

Run it (needs a CUDA GPU and the extension: pip install -e . --no-build-isolation)
    python bench_kernels.py
    python bench_kernels.py --T=8192 --quant_shapes=4096x4096 --iters=50
Exit codes: 0 done, 1 validation failed, 2 no CUDA GPU or llm_kernels not built (nothing timed).

Targets (H100; the H200 has the same math rates): attention forward >= 50% and backward >= 30% of
SDPA-flash's throughput at T=4096, hs 64 and 128, bf16, causal; int8 GEMV >= 1.6x and int4 GEMV >= 2.5x
cuBLAS fp16 at M=1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import gpt
import quant

try:
    import llm_kernels  # type: ignore[import-not-found]
except ImportError:
    llm_kernels = None


@dataclass
class BenchConfig:
    T: int = 4096  # sequence length (Tq = Tk)
    tokens: int = 16384  # B = tokens / T (FlashAttention-2's benchmark keeps B T = 16k)
    model_dim: int = 2048  # nh = model_dim / hs (so hs 64 -> 32 heads, hs 128 -> 16 heads)
    head_sizes: str = "64,128"
    causal: bool = True
    quant_shapes: str = "4096x4096,11008x4096,4096x11008"  # N x K (out x in) of the decode matmuls
    quant_m: str = "1,4,8"  # rows of x (M <= 8 takes the GEMV path)
    int4_group: int = 128  # G of int4_g<G>
    warmup: int = 5
    iters: int = 20
    seed: int = 0


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds per call, with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


# -----------------------------------------------------------------------------------------------
# Validation


def validate_attention() -> list[tuple[str, float, float]]:
    """(case, max relative error over output and grads, tolerance) vs float64 naive attention."""
    rows = []
    cases = [dict(B=2, nh=4, nkv=2, T=300, hs=64, causal=True, window=0, sinks=True),
             dict(B=1, nh=8, nkv=1, T=257, hs=128, causal=True, window=100, sinks=False),
             dict(B=2, nh=4, nkv=4, T=129, hs=128, causal=False, window=0, sinks=True)]
    g = torch.Generator().manual_seed(0)
    for c in cases:
        B, nh, nkv, T, hs = c["B"], c["nh"], c["nkv"], c["T"], c["hs"]
        q64 = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64)
        k64, v64 = (torch.randn(B, nkv, T, hs, generator=g, dtype=torch.float64) for _ in range(2))
        do64 = torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64)
        s = torch.randn(nh, generator=g).cuda() if c["sinks"] else None
        q, k, v, do = (t.to("cuda", torch.bfloat16) for t in (q64, k64, v64, do64))
        o, lse = llm_kernels.flash_attn_fwd(q, k, v, s, c["causal"], c["window"])
        dq, dk, dv, ds = llm_kernels.flash_attn_bwd(do, q, k, v, o, lse, s, c["causal"], c["window"])
        xs = [t.double().requires_grad_() for t in (q, k, v)]
        s64 = None if s is None else s.double().requires_grad_()
        ref = gpt.naive_attention(*xs, causal=c["causal"], window=c["window"], sinks=s64)
        ref.backward(do.double())
        pairs = [(o, ref), (dq, xs[0].grad), (dk, xs[1].grad), (dv, xs[2].grad)]
        if s is not None:
            pairs.append((ds, s64.grad))
        err = max(rel_err(a, b) for a, b in pairs)
        name = " ".join(f"{key}={val}" for key, val in c.items())
        rows.append((f"attention bf16 {name}", err, 4e-2))
    return rows


def validate_quant(shapes: list[tuple[int, int]], group: int) -> list[tuple[str, float, float]]:
    rows = []
    g = torch.Generator().manual_seed(1)
    for N, K in [(130, 259)] + shapes[:1]:
        w = torch.randn(N, K, generator=g) * 0.05
        for scheme in ("int8", f"int4_g{group}"):
            packed = quant.SCHEMES[scheme][0](w)
            w_hat = quant.SCHEMES[scheme][1](packed, (N, K)).double().cuda()
            bufs = [packed[n].cuda() for n in sorted(packed)]
            for M in (1, 8, 33):  # GEMV, GEMV, GEMM
                x = torch.randn(M, K, generator=g).to("cuda", torch.float16)
                err = rel_err(llm_kernels.quant_linear(x, scheme, *bufs), F.linear(x.double(), w_hat))
                rows.append((f"quant_linear {scheme} fp16 M={M} N={N} K={K}", err, 5e-3))
    return rows


# -----------------------------------------------------------------------------------------------
# Timing


def bench_attention(bc: BenchConfig, hs: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    nh, B, T = bc.model_dim // hs, max(1, bc.tokens // bc.T), bc.T
    q, k, v, do = (torch.randn(B, nh, T, hs, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    flops_fwd = 4 * B * nh * T * T * hs / (2 if bc.causal else 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=bc.causal)
        o, lse = llm_kernels.flash_attn_fwd(q, k, v, None, bc.causal, 0)
        err = rel_err(o, ref)  # validate at the benchmark shape too
        if not err < 2e-2:
            raise RuntimeError(f"flash_attn_fwd disagrees with SDPA at hs={hs}: relative error {err:.2e}")
        t_sdpa_f = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bc.causal),
                           bc.warmup, bc.iters)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=bc.causal)
        t_sdpa_b = time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True),
                           bc.warmup, bc.iters)
    t_fwd = time_ms(lambda: llm_kernels.flash_attn_fwd(q, k, v, None, bc.causal, 0), bc.warmup, bc.iters)
    t_bwd = time_ms(lambda: llm_kernels.flash_attn_bwd(do, q, k, v, o, lse, None, bc.causal, 0),
                    bc.warmup, bc.iters)
    tf = lambda flops, ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
    return dict(hs=hs, B=B, nh=nh, T=T, err=err,
                fwd_ms=t_fwd, fwd_tflops=tf(flops_fwd, t_fwd), sdpa_fwd_tflops=tf(flops_fwd, t_sdpa_f),
                bwd_ms=t_bwd, bwd_tflops=tf(2.5 * flops_fwd, t_bwd),
                sdpa_bwd_tflops=tf(2.5 * flops_fwd, t_sdpa_b))


def bench_quant(bc: BenchConfig, N: int, K: int, M: int) -> list[dict]:
    w = torch.randn(N, K, device="cuda") * 0.05
    w16 = w.half()
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    t_ref = time_ms(lambda: F.linear(x, w16), bc.warmup, bc.iters)
    rows = [dict(kernel="cuBLAS fp16", N=N, K=K, M=M, ms=t_ref, bytes=2 * N * K, speedup=1.0)]
    for scheme in ("int8", f"int4_g{bc.int4_group}"):
        packed = quant.SCHEMES[scheme][0](w)
        bufs = [packed[n] for n in sorted(packed)]
        t = time_ms(lambda: llm_kernels.quant_linear(x, scheme, *bufs), bc.warmup, bc.iters)
        nbytes = sum(b.numel() * b.element_size() for b in bufs)
        rows.append(dict(kernel=scheme, N=N, K=K, M=M, ms=t, bytes=nbytes, speedup=t_ref / t))
    return rows


# -----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    try:
        bc = gpt.config_from_args(BenchConfig, argv, __doc__, "bench_kernels.py")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to time.")
        return 2
    if llm_kernels is None:
        print("bench_kernels.py needs the llm_kernels extension: pip install -e . --no-build-isolation "
              "(torch with CUDA + nvcc); nothing to time.")
        return 2
    torch.manual_seed(bc.seed)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")

    shapes = [tuple(int(d) for d in s.split("x")) for s in bc.quant_shapes.split(",")]
    print("\nvalidation (max |error| / max |reference|):")
    ok = True
    for name, err, tol in validate_attention() + validate_quant(shapes, bc.int4_group):
        ok &= err < tol
        print(f"  {'ok  ' if err < tol else 'FAIL'} {name}: {err:.1e} (tolerance {tol:.0e})")
    if not ok:
        print("validation failed: not timing a wrong kernel")
        return 1

    print(f"\n| attention bf16 {'causal' if bc.causal else 'full'} | B x nh | T | fwd TFLOP/s | "
          "SDPA-flash fwd | fwd ratio | bwd TFLOP/s | SDPA-flash bwd | bwd ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for hs in (int(h) for h in bc.head_sizes.split(",")):
        r = bench_attention(bc, hs)
        print(f"| hs={hs} | {r['B']} x {r['nh']} | {r['T']} | {r['fwd_tflops']:.0f} | "
              f"{r['sdpa_fwd_tflops']:.0f} | {r['fwd_tflops'] / r['sdpa_fwd_tflops']:.0%} | "
              f"{r['bwd_tflops']:.0f} | "
              f"{r['sdpa_bwd_tflops']:.0f} | {r['bwd_tflops'] / r['sdpa_bwd_tflops']:.0%} |")

    print("\n| quantized matmul | M | N x K | us | GB/s (weights) | speedup vs fp16 cuBLAS |")
    print("|---|---|---|---|---|---|")
    for N, K in shapes:
        for M in (int(m) for m in bc.quant_m.split(",")):
            for r in bench_quant(bc, N, K, M):
                gbs = r["bytes"] / (r["ms"] * 1e-3) / 1e9
                print(f"| {r['kernel']} | {M} | {N} x {K} | {1e3 * r['ms']:.1f} | {gbs:.0f} | "
                      f"{r['speedup']:.2f}x |")
    print("\ntargets (H100): fwd >= 50%, bwd >= 30% of SDPA-flash; int8 >= 1.6x, int4 >= 2.5x at M=1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
