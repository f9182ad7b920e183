"""Tests for kernels.cu (the llm_kernels CUDA extension).

On every machine with nvcc (CI included, no GPU needed): kernels.cu compiles against this torch's
headers without a warning from our own code. On a GPU with the extension built: every kernel against
an independent reference - float64 gpt.naive_attention (output, log-sum-exp, every gradient) and
F.linear with quant.py's dequantized weights - over shapes, dtypes and masking options; clear errors
for bad inputs; and a short bf16 training run with the CUDA attention that follows the SDPA run."""

import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attention_flash as af
import gpt
import quant
from conftest import requires_cuda, tiny_config, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]

try:
    import llm_kernels  # type: ignore[import-not-found]
except ImportError:
    llm_kernels = None

# GPU tests carry both marks: requires_cuda (conftest) and this one.
requires_kernels = pytest.mark.skipif(
    llm_kernels is None, reason="needs the llm_kernels extension (pip install -e . --no-build-isolation)")


# -----------------------------------------------------------------------------------------------
# Compile check: kernels.cu against this torch's headers (runs without a GPU and without CUDA torch)


def find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = shutil.which("nvcc")
    if nvcc is None and CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    return nvcc


@pytest.mark.slow
def test_kernels_cu_compiles_with_nvcc(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor in CUDA_HOME): cannot compile kernels.cu")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    includes = list(include_paths())
    # CPU builds of torch ship c10/cuda's headers but not the one CMake generates for CUDA builds;
    # it only says whether c10_cuda is a shared library, so a stand-in is enough to compile against.
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / generated).exists() for p in includes):
        shim = tmp_path / "shim"
        (shim / generated).parent.mkdir(parents=True)
        (shim / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(shim))
    # One architecture (sm_90, the H100 the targets are set on) and the flags torch's own
    # CUDAExtension passes; host code at -O0, since only the compiler's verdict matters here.
    cmd = [nvcc, "-c", str(ROOT / "kernels.cu"), "-o", str(tmp_path / "kernels.o"), "-std=c++20",
           "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "-Xcompiler", "-O0",
           "-DTORCH_EXTENSION_NAME=llm_kernels", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-I{sysconfig.get_paths()['include']}", *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    print(f"nvcc compiled kernels.cu in {time.perf_counter() - t0:.0f} s")
    assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{out[-20000:]}"
    ours = [line for line in out.splitlines() if "kernels.cu" in line and re.search(r"warning", line, re.I)]
    assert not ours, "warnings in kernels.cu:\n" + "\n".join(ours)
    assert (tmp_path / "kernels.o").stat().st_size > 0


def test_bench_without_cuda_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run")
    r = subprocess.run([sys.executable, str(ROOT / "bench_kernels.py")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stdout + r.stderr, r.stdout + r.stderr


# -----------------------------------------------------------------------------------------------
# Flash attention: the kernel vs float64 naive attention. Inputs are drawn in float64, rounded to the
# test dtype, and the reference gets the *rounded* values in float64, so the only differences are the
# kernel's own roundings: P and dS rounded to 16 bits before the tensor-core products (relative 2^-9
# bf16, 2^-12 fp16) and the 16-bit output. Errors are measured relative to each tensor's largest
# entry; a wrong index or mask gives errors of order 1.

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def attn_inputs(B, nh, nkv, Tq, Tk, hs, dtype, sinks, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, Tq, hs, generator=g, dtype=torch.float64)
    k = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    v = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    do = torch.randn(B, nh, Tq, hs, generator=g, dtype=torch.float64)
    s = torch.randn(nh, generator=g, dtype=torch.float64) if sinks else None
    cast = lambda t: None if t is None else t.to("cuda", dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), (None if s is None else s.float().cuda()), cast(do)


def ref_lse(q, k, causal, window, sinks):
    """log sum_j exp(s_j) over the visible keys (and the sink), float64, (B, nh, Tq); +inf if empty."""
    B, nh, Tq, hs = q.shape
    kk = k.double().repeat_interleave(nh // k.shape[1], dim=1)
    S = q.double() @ kk.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, Tq, Tk)
    mask = gpt.attention_mask(Tq, k.shape[2], causal, window, q.device)
    if mask is not None:
        S = S.masked_fill(~mask, -math.inf)
    if sinks is not None:
        S = torch.cat([S, sinks.double().view(1, nh, 1, 1).expand(B, nh, Tq, 1)], dim=-1)
    lse = torch.logsumexp(S, dim=-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


def check_forward(B, nh, nkv, Tq, Tk, hs, causal, window, sinks, dtype):
    q, k, v, s, _ = attn_inputs(B, nh, nkv, Tq, Tk, hs, dtype, sinks)
    o, lse = llm_kernels.flash_attn_fwd(q, k, v, s, causal, window)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == (B, nh, Tq) and lse.dtype == torch.float32
    ref = gpt.naive_attention(q.double(), k.double(), v.double(), causal=causal, window=window,
                              sinks=None if s is None else s.double())
    assert torch.isfinite(o).all()
    assert rel_err(o, ref) < TOL[dtype], rel_err(o, ref)
    lref = ref_lse(q, k, causal, window, s)
    assert torch.equal(torch.isinf(lse), torch.isinf(lref))  # rows with nothing to see: +inf
    fin = torch.isfinite(lref)
    if fin.any():  # fp32 sums of exactly representable products: far below 1e-3
        assert (lse[fin].double() - lref[fin]).abs().max().item() < 1e-3


@requires_cuda
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [0, 48])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("T", [1, 7, 64, 129, 1000])
def test_flash_fwd_matches_naive(T, hs, heads, causal, window, sinks, dtype):
    check_forward(2, *heads, T, T, hs, causal, window, sinks, dtype)


@requires_cuda
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq, Tk", [(1, 100), (7, 300), (64, 67), (130, 70), (200, 1000)])
def test_flash_fwd_bottom_right_aligned(Tq, Tk, causal, window, sinks, dtype):
    check_forward(1, 4, 2, Tq, Tk, 64, causal, window, sinks, dtype)  # Tq > Tk: early rows see nothing


def check_backward(B, nh, nkv, Tq, Tk, hs, causal, window, sinks, dtype):
    q, k, v, s, do = attn_inputs(B, nh, nkv, Tq, Tk, hs, dtype, sinks, seed=1)
    o, lse = llm_kernels.flash_attn_fwd(q, k, v, s, causal, window)
    dq, dk, dv, ds = llm_kernels.flash_attn_bwd(do, q, k, v, o, lse, s, causal, window)
    assert (ds is None) == (s is None)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    s64 = None if s is None else s.double().requires_grad_()
    ref = gpt.naive_attention(*xs, causal=causal, window=window, sinks=s64)
    ref.backward(do.double())
    for name, got, want in (("dq", dq, xs[0].grad), ("dk", dk, xs[1].grad), ("dv", dv, xs[2].grad)) + (
            (("dsinks", ds, s64.grad),) if s is not None else ()):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        assert rel_err(got, want) < 2 * TOL[dtype], (name, rel_err(got, want))


@requires_cuda
@requires_kernels
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [0, 48])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("T", [1, 7, 64, 129, 1000])
def test_flash_bwd_matches_naive(T, hs, heads, causal, window, sinks):
    check_backward(2, *heads, T, T, hs, causal, window, sinks, torch.bfloat16)


@requires_cuda
@requires_kernels
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("T", [7, 129, 1000])
def test_flash_bwd_fp16(T, hs):
    check_backward(2, 4, 2, T, T, hs, True, 0, True, torch.float16)


@requires_cuda
@requires_kernels
@pytest.mark.parametrize("Tq, Tk", [(1, 100), (64, 67), (130, 70), (200, 1000)])
@pytest.mark.parametrize("causal, window", [(True, 0), (True, 20), (False, 20), (False, 0)])
def test_flash_bwd_bottom_right_aligned(Tq, Tk, causal, window):
    check_backward(1, 4, 2, Tq, Tk, 128, causal, window, True, torch.bfloat16)


@requires_cuda
@requires_kernels
def test_flash_attention_dispatches_to_the_kernel_and_matches_pytorch_path():
    q, k, v, s, do = attn_inputs(2, 8, 2, 300, 300, 64, torch.bfloat16, True)
    outs = {}
    for use in (True, False):
        xs = [t.clone().requires_grad_() for t in (q, k, v, s)]
        o = af.flash_attention(*xs[:3], sinks=xs[3], causal=True, window=100, use_cuda_kernel=use)
        o.backward(do)
        outs[use] = [o] + [t.grad for t in xs]
    for a, b in zip(outs[True], outs[False]):
        assert rel_err(a, b) < 2 * TOL[torch.bfloat16]


@requires_cuda
@requires_kernels
def test_attention_bad_inputs_raise_clear_errors():
    q, k, v, _, _ = attn_inputs(1, 4, 2, 16, 16, 64, torch.bfloat16, False)
    fwd = llm_kernels.flash_attn_fwd
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        fwd(q.cpu(), k.cpu(), v.cpu(), None, True, 0)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        fwd(q.float(), k.float(), v.float(), None, True, 0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        fwd(q, k.half(), v, None, True, 0)
    with pytest.raises(RuntimeError, match="head size must be 64 or 128"):
        fwd(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), None, True, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(q.transpose(1, 2), k, v, None, True, 0)
    with pytest.raises(RuntimeError, match="multiple of nkv"):
        fwd(q[:, :3].contiguous(), k, v, None, True, 0)
    with pytest.raises(RuntimeError, match="sinks must have shape"):
        fwd(q, k, v, torch.zeros(3, device="cuda"), True, 0)
    with pytest.raises(RuntimeError, match="window"):
        fwd(q, k, v, None, True, -1)


# -----------------------------------------------------------------------------------------------
# Quantized matmul: the kernel vs F.linear(x, W_hat) in float64, with W_hat = quant.py's dequantized
# weight. The GEMV path (M <= 8) accumulates W_hat exactly in fp32; the GEMM path rounds W_hat to x's
# dtype first, as the PyTorch path does. The remaining error is the 16-bit output (and fp32 sums).

QTOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def quant_case(scheme, N, K, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    packed = quant.SCHEMES[scheme][0](w)
    names = sorted(packed)
    bufs = [packed[n].cuda() for n in names]
    w_hat = quant.SCHEMES[scheme][1](packed, (N, K)).double()  # (N, K)
    x = torch.randn(M, K, generator=g).to("cuda", dtype)
    return x, bufs, w_hat.cuda()


@requires_cuda
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, K", [(64, 256), (33, 100), (130, 259), (256, 4096)])
@pytest.mark.parametrize("M", [1, 4, 8, 17, 256])
@pytest.mark.parametrize("scheme", ["int8", "int4_g32", "int4_g64", "int4_g128", "awq_g128"])
def test_quant_linear_matches_dequantized_linear(scheme, M, N, K, dtype):
    x, bufs, w_hat = quant_case(scheme, N, K, M, dtype)
    y = llm_kernels.quant_linear(x, scheme, *bufs)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = F.linear(x.double(), w_hat)  # (M, N)
    assert rel_err(y, ref) < QTOL[dtype], rel_err(y, ref)


@requires_cuda
@requires_kernels
def test_quant_linear_keeps_leading_dims_and_quantlinear_dispatches():
    lin = torch.nn.Linear(96, 40, bias=True)
    for scheme in ("int8", "int4_g32"):
        ql = quant.QuantLinear(lin, scheme).cuda()
        x = torch.randn(3, 5, 96, device="cuda", dtype=torch.bfloat16)
        y = ql(x)  # the kernel, then the bias
        ref = F.linear(x.double(), ql.dequantize().double(), ql.bias.double())
        assert y.shape == (3, 5, 40) and rel_err(y, ref) < QTOL[torch.bfloat16]


@requires_cuda
@requires_kernels
def test_quant_bad_inputs_raise_clear_errors():
    x, bufs, _ = quant_case("int4_g32", 16, 64, 2, torch.float16)
    ql = llm_kernels.quant_linear
    with pytest.raises(RuntimeError, match="supports the schemes"):
        ql(x, "nf4", *bufs)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ql(x.cpu(), "int4_g32", *bufs)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ql(x.float(), "int4_g32", *bufs)
    with pytest.raises(RuntimeError, match="groups per row"):
        ql(x[:, :32].contiguous(), "int4_g32", *bufs)
    with pytest.raises(RuntimeError, match="takes 3 buffers"):
        ql(x, "int4_g32", *bufs[:2])
    with pytest.raises(RuntimeError, match="contiguous"):
        ql(torch.randn(64, 2, device="cuda", dtype=torch.float16).t(), "int4_g32", *bufs)
    x8, bufs8, _ = quant_case("int8", 16, 64, 2, torch.float16)
    with pytest.raises(RuntimeError, match="int8: q must be int8"):
        ql(x8[:, :60].contiguous(), "int8", *bufs8)


# -----------------------------------------------------------------------------------------------
# Training: a bf16 model whose attention runs on the kernel follows the SDPA run


@requires_cuda
@requires_kernels
def test_training_with_cuda_attention_matches_sdpa(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(af, "_announced", set())  # so that the dispatcher announces its path again
    # hs = 128 / 2 = 64, the kernel's size; bf16 autocast on CUDA (gpt.train's default there)
    cfg = dict(n_embd=128, n_head=2, n_kv_head=1, block_size=128, sinks=True, window=48)
    tc = dict(max_iters=31, stop_at=30, log_interval=1, eval_interval=30, eval_tokens=4096, warmup_iters=5,
              lr=3e-3, device="cuda")
    runs = {}
    for impl in ("sdpa", "flash"):
        runs[impl] = gpt.train(tiny_config(attn_impl=impl, **cfg), tiny_train_config(tmp_path / impl, **tc),
                               verbose=False)
    assert "CUDA kernel" in capsys.readouterr().out  # the flash run really used llm_kernels
    losses = {i: [h["train_loss"] for h in r["history"] if "train_loss" in h] for i, r in runs.items()}
    # Both runs compute attention in bf16 with fp32 accumulation, in different orders: the losses
    # agree to bf16 noise, not bit for bit.
    diffs = [abs(a - b) for a, b in zip(losses["flash"], losses["sdpa"])]
    assert len(losses["flash"]) == 30 and max(diffs) < 3e-2, diffs
    assert losses["flash"][-1] < losses["flash"][0] - 0.5  # it learns
