"""
quant.py - weight quantization, from int8 down to 4 bits: how each format stores numbers, what it
costs in bits per weight, and what it does to a trained model's perplexity.

A quantizer replaces a float weight matrix by small integers (or tiny floats) plus a few scales that
map them back. Every format below is a pure pair `quantize_X(w) -> dict of packed tensors` /
`dequantize_X(q, shape) -> w_hat`, with its exact byte layout written above it; bits per weight are
*counted from those bytes*, never assumed. A `QuantLinear` holds the packed tensors as buffers and
dequantizes on the fly; `quantize_model` swaps the nn.Linears of a gpt.py model. Writing the Q8_0 /
Q4_0 / Q4_1 blocks into a llama.cpp GGUF file (which llama.cpp loads and runs) is pretrained.py's job.

References
- LLM.int8(): Dettmers et al. 2022, arXiv:2208.07339 (absmax int8, section 3.1; outliers, section 3.2).
- SpQR: Dettmers et al. 2023, arXiv:2306.03078 (keep a small set of salient weights in high precision).
- GGML / llama.cpp: ggml-quants.c, quantize_row_q8_0_ref, quantize_row_q4_0_ref, quantize_row_q4_1_ref,
  quantize_row_mxfp4_ref (the "reference implementation for deterministic creation of model files").
- OCP Microscaling Formats (MX) v1.0 spec, 2023: MXFP4 = 32 FP4 E2M1 elements + one E8M0 scale
  (section 5.3: shared exponent = floor(log2(amax)) - emax_elem, emax_elem = 2 for E2M1). gpt-oss ships in it.
- AWQ: Lin et al. 2023, arXiv:2306.00978 (section 3.2: s = s_X^alpha, alpha searched on [0, 1]).
- QLoRA / NF4: Dettmers et al. 2023, arXiv:2305.14314 (section 3: NormalFloat, double quantization).
- DeepSeek-V3: arXiv:2412.19437, section 3.3.2 (FP8 E4M3, 128x128 weight blocks, 1x128 activation tiles).
- GGUF: github.com/ggml-org/ggml/blob/master/docs/gguf.md (file layout); gpt-fast's quantize.py
  (the QuantLinear + swap pattern).

Run it
    python quant.py                        # train a small gpt.py model (or reuse it), quantize it 14 ways
    python quant.py --ckpt=out/ckpt.pt     # quantize a checkpoint written by `python gpt.py`
    python pretrained.py export --ckpt=out/quant/ckpt.pt --dtype=Q4_0   # a llama.cpp file of it
    python pretrained.py quant             # this table on a real model, SmolLM2-135M

Not covered: GPTQ / error-feedback rounding (Hessian-aware), k-quants and i-quants (Q4_K, IQ2...;
pretrained.py dequantizes Q4_K/Q5_K/Q6_K), quantized KV caches, quantization-aware training, int4/FP8
matmul on the CPU (the PyTorch path dequantizes, then multiplies; on CUDA, QuantLinear.forward
dispatches int8 and int4 to kernels.cu's fused dequantize-matmul when the extension is built).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt

try:  # the CUDA extension built from kernels.cu (setup.py); optional, CUDA tensors only
    import llm_kernels
except ImportError:
    llm_kernels = None

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class QuantConfig:
    """The `python quant.py` demo."""

    ckpt: str = ""  # a gpt.py checkpoint; "" = train the default gpt.py model into out_dir (or reuse it)
    out_dir: str = "out/quant"  # where the trained model and the size-check files go
    train_iters: int = 600  # iterations for that model (gpt.py's default schedule: ~4.5 min on 2 cores)
    schemes: str = "all"  # comma-separated subset of SCHEMES, or all
    eval_tokens: int = 65536  # validation tokens per perplexity (the same tokens for every scheme)
    calib_seqs: int = 16  # AWQ calibration: TinyStories train windows of block_size tokens
    awq_grid: int = 20  # alpha in {0, 1/grid, ..., 1} (AWQ section 3.2 uses a grid of 20)
    outlier_frac: float = 0.005  # int8_outlier: fraction of each matrix's weights kept in fp16
    decode_tokens: int = 128  # greedy tokens generated to time decoding
    seed: int = 1337


# -----------------------------------------------------------------------------------------------
# Helpers shared by the formats


def _check_finite(w: torch.Tensor, fmt: str) -> None:
    """A NaN or Inf would poison its block's scale and every weight sharing it: refuse loudly."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = np.unravel_index(int(bad.flatten().nonzero()[0]), tuple(w.shape))
        raise ValueError(f"{fmt}: the weight has {int(bad.sum())} non-finite value(s) (first at index "
                         f"{tuple(int(i) for i in first)}); a NaN/Inf scale would turn the whole block "
                         "into garbage. Fix the model before quantizing it.")


def _check_fp16_scale(scale: torch.Tensor, fmt: str) -> None:
    """Refuse a scale (or kept value) that becomes fp16 infinity. The fp32 -> fp16 conversion rounds to
    nearest even, as ggml's GGML_FP32_TO_FP16 does, so anything below 65520 (65504 + half of fp16's
    top step of 32) is stored as a finite fp16, at most 65504 (bits 0x7BFF); 65520 and above is inf."""
    if bool(torch.isinf(scale.half()).any()):
        raise ValueError(f"{fmt}: a value of {float(scale.abs().max()):.7g} overflows the fp16 scale/value "
                         f"field (>= 65520 rounds to fp16 inf): the weights are too large for this format")


def _blocks(w: torch.Tensor, size: int, fmt: str) -> torch.Tensor:
    """A (N, K) weight as (N*K/size, size) blocks along K, the row-major order GGML stores."""
    N, K = w.shape
    if K % size:
        raise ValueError(f"{fmt}: in_features={K} must be a multiple of the block size {size}")
    return w.float().reshape(-1, size)  # (nb, size)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), as ggml uses; torch.round rounds ties to even.
    floor(|x| + 0.5) would be wrong for |x| = 0.49999997 (the sum rounds up to 1.0 in fp32)."""
    a = x.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).float(), x)


def pack_halves(q: torch.Tensor) -> torch.Tensor:
    """GGML nibble order: block (nb, 32) of 4-bit codes -> (nb, 16) bytes, element j in the low
    nibble and element j+16 in the high nibble of byte j."""
    h = q.shape[-1] // 2
    return (q[..., :h] | (q[..., h:] << 4)).to(torch.uint8)  # (nb, 16)


def unpack_halves(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p & 0x0F, p >> 4], dim=-1)  # (nb, 32)


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """Our own formats' nibble order: flatten, pad to even, element 2i low / 2i+1 high nibble."""
    q = q.flatten().to(torch.uint8)
    q = F.pad(q, (0, q.numel() % 2))
    return q[0::2] | (q[1::2] << 4)  # (ceil(n/2),)


def unpack_pairs(p: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([p & 0x0F, p >> 4], dim=-1).flatten()[:n]  # (n,)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().view(torch.uint8).view(-1, 2)  # (nb, 2), little-endian like ggml_half


# -----------------------------------------------------------------------------------------------
# int8, per output channel (LLM.int8() section 3.1, "vector-wise" absmax)
# Layout: q int8 (N, K); scale fp32 (N,) with w_hat[n, k] = q[n, k] * scale[n], scale = amax_n / 127.
# bits/weight = 8 + 32 / K.


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    _check_finite(w, "int8")
    w = w.float()
    scale = w.abs().amax(dim=1) / 127  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return dict(q=q, scale=scale)


def dequantize_int8(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    return q["q"].float() * q["scale"][:, None]  # (N, K)


# int8 with outliers kept in fp16 (the idea of LLM.int8() section 3.2 and SpQR section 4.1: a few
# large weights set the absmax scale and waste the int8 grid on everyone else; keep those few exactly
# and give the rest a finer grid). We pick the `frac` largest |w| of the matrix (magnitude as the
# saliency; SpQR uses a Hessian-based one). Layout: the int8 part above computed *without* the
# outliers (their int8 slot holds 0), plus a sparse list idx int32 (n_out,) flat indices and
# val fp16 (n_out,). bits/weight = 8 + 32 / K + 48 * frac.


def quantize_int8_outlier(w: torch.Tensor, frac: float = 0.005) -> dict[str, torch.Tensor]:
    _check_finite(w, "int8_outlier")
    w = w.float()
    n_out = int(round(frac * w.numel()))
    idx = torch.topk(w.abs().flatten(), n_out).indices.sort().values.to(torch.int32)  # (n_out,)
    _check_fp16_scale(w.flatten()[idx.long()], "int8_outlier")  # the kept values are fp16 too
    inliers = w.flatten().index_fill(0, idx.long(), 0.0).view_as(w)  # (N, K)
    q = quantize_int8(inliers)
    return dict(q=q["q"], scale=q["scale"], idx=idx, val=w.flatten()[idx.long()].half())


def dequantize_int8_outlier(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    w = dequantize_int8(q, shape).flatten()
    return w.index_copy(0, q["idx"].long(), q["val"].float()).view(shape)  # (N, K)


# -----------------------------------------------------------------------------------------------
# GGML Q8_0 (block_q8_0 in ggml-common.h): 32 weights -> 34 bytes
#   bytes 0-1: d, fp16 little-endian, d = amax / 127
#   bytes 2-33: qs[32], int8, qs[j] = roundf(x[j] / d)   (computed with the fp32 d, stored as fp16)
# The fp16 d is rounded to nearest even: any d < 65520 is stored finite (up to 65504 = 0x7BFF, as ggml
# writes it); a larger d would be stored as inf, and quantize_q8_0 refuses it (so does Q4_0).
# bits/weight = 34 * 8 / 32 = 8.5.  Byte-identical to quantize_row_q8_0_ref.


def quantize_q8_0(w: torch.Tensor) -> dict[str, torch.Tensor]:
    _check_finite(w, "Q8_0")
    x = _blocks(w, 32, "Q8_0")  # (nb, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127  # (nb, 1) fp32, as in the C code
    _check_fp16_scale(d, "Q8_0")
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))  # id = d ? 1/d : 0
    qs = round_half_away(x * inv).to(torch.int8)  # (nb, 32)
    return dict(blocks=torch.cat([_fp16_bytes(d), qs.view(torch.uint8)], dim=1))  # (nb, 34)


def dequantize_q8_0(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    b = q["blocks"]  # (nb, 34)
    d = b[:, :2].contiguous().view(torch.float16).float()  # (nb, 1)
    return (b[:, 2:].contiguous().view(torch.int8).float() * d).view(shape)  # (N, K)


# GGML Q4_0 (block_q4_0): 32 weights -> 18 bytes
#   bytes 0-1: d, fp16, d = max / -8 where max is the weight of largest |x| *with its sign*
#   bytes 2-17: qs[16], q = min(15, (int8)(x / d + 8.5)), weight j in the low nibble of byte j,
#               weight j+16 in the high nibble; w_hat = (q - 8) * d
# Dividing by -8 maps the extreme weight exactly onto code 0 (= -8 * d), using the asymmetric end of
# the signed range [-8, 7]; a weight of the same magnitude but opposite sign clips to code 15 (= 7d).
# bits/weight = 18 * 8 / 32 = 4.5.  Byte-identical to quantize_row_q4_0_ref (and to the gguf Python
# package; a compiler that fuses x*id + 8.5 into one FMA can differ on exact ties).


def quantize_q4_0(w: torch.Tensor) -> dict[str, torch.Tensor]:
    _check_finite(w, "Q4_0")
    x = _blocks(w, 32, "Q4_0")  # (nb, 32)
    imax = x.abs().argmax(dim=1, keepdim=True)  # first index of the largest |x|, as the C loop's `<`
    d = x.gather(1, imax) / -8  # (nb, 1)
    _check_fp16_scale(d, "Q4_0")
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp((x * inv + 8.5).trunc(), max=15).to(torch.uint8)  # (nb, 32), (int8) cast truncates
    return dict(blocks=torch.cat([_fp16_bytes(d), pack_halves(q)], dim=1))  # (nb, 18)


def dequantize_q4_0(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    b = q["blocks"]  # (nb, 18)
    d = b[:, :2].contiguous().view(torch.float16).float()  # (nb, 1)
    return ((unpack_halves(b[:, 2:]).float() - 8) * d).view(shape)  # (N, K)


# GGML Q4_1 (block_q4_1): 32 weights -> 20 bytes, asymmetric (a scale *and* an offset per block)
#   bytes 0-1: d, fp16, d = (max - min) / 15
#   bytes 2-3: m, fp16, m = min (the block's smallest weight, with its sign)
#   bytes 4-19: qs[16], q = min(15, (int8)((x - min) / d + 0.5)), GGML nibble order (weight j low,
#               weight j+16 high nibble of byte j); w_hat = q * d + m
# The 16 codes span [min, max] exactly instead of [-amax, amax]: a block that is all positive (or
# offset from 0) wastes no codes, at the price of one more fp16 per block. (x - min)/d >= 0, so the
# (int8) cast of x + 0.5 is round-half-up. Quantization uses the fp32 d and min; the stored fp16
# values are what dequantization sees. bits/weight = 20 * 8 / 32 = 5.  Byte-identical to
# quantize_row_q4_1_ref (and to the gguf package). SmolLM2-135M-Instruct's GGUF is mostly Q4_1.


def quantize_q4_1(w: torch.Tensor) -> dict[str, torch.Tensor]:
    _check_finite(w, "Q4_1")
    x = _blocks(w, 32, "Q4_1")  # (nb, 32)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)  # (nb, 1) each
    d = (hi - lo) / 15  # fp32, as in the C code: (max - min) / ((1 << 4) - 1)
    _check_fp16_scale(d, "Q4_1")
    _check_fp16_scale(lo, "Q4_1")  # the offset is stored in fp16 too
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))  # id = d ? 1/d : 0
    q = torch.clamp(((x - lo) * inv + 0.5).trunc(), max=15).to(torch.uint8)  # (nb, 32)
    return dict(blocks=torch.cat([_fp16_bytes(d), _fp16_bytes(lo), pack_halves(q)], dim=1))  # (nb, 20)


def dequantize_q4_1(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    b = q["blocks"]  # (nb, 20)
    d = b[:, 0:2].contiguous().view(torch.float16).float()  # (nb, 1)
    m = b[:, 2:4].contiguous().view(torch.float16).float()  # (nb, 1)
    return (unpack_halves(b[:, 4:]).float() * d + m).view(shape)  # (N, K)


# -----------------------------------------------------------------------------------------------
# MXFP4 (OCP MX v1.0; GGML's block_mxfp4): 32 weights -> 17 bytes
#   byte 0: e, E8M0 (a bare biased exponent): scale X = 2^(e - 127), e = floorf(log2f(amax)) - 2 + 127
#   bytes 1-16: qs[16], FP4 E2M1 codes (1 sign, 2 exponent, 1 mantissa bit), GGML nibble order
# E2M1 magnitudes by code 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign. The scale puts amax in
# [4X, 8X) (or a hair below 4X, see log2_floor_f32): values above 6X saturate to 6X. GGML picks the
# nearest level by a first-minimum search over its table, so ties go to the smaller magnitude (the OCP
# spec says round-to-nearest-even: they differ on exact ties such as 0.75X).
# bits/weight = 17 * 8 / 32 = 4.25.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def log2_floor_f32(x: torch.Tensor) -> torch.Tensor:
    """C's floorf(log2f(x)) for float32 x > 0: log2 is rounded to float32 *before* the floor.

    That is not the binary exponent (frexp): for x a few float32 steps below 2^k, log2(x) = k - ~1e-7
    lies within half a float32 ulp of k, so log2f returns exactly k and the floor is k, not k - 1.
    E.g. x = nextafter(16, 0) = 16 - 2^-20: log2 = 4 - 8.6e-8, float32 spacing below 4 is 2.4e-7, so
    log2f = 4.0. This happens to the last few float32 values below 2^k for k >= 3 and k <= -2 (up to
    ~0.7 |k| of them, 44 at most). We take log2 in float64 (error ~1e-16, far below float32's 6e-8) and
    round it to the nearest float32: a correctly rounded log2f, which is what glibc's log2f returns on
    all these values (the tests check every float32 near a power of two against libm, via ctypes)."""
    return torch.log2(x.double()).float().floor()


def quantize_mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    _check_finite(w, "MXFP4")
    x = _blocks(w, 32, "MXFP4")  # (nb, 32)
    amax = x.abs().amax(dim=1, keepdim=True)  # (nb, 1)
    # Below 2^-125 the C cast of a negative e to uint8 is undefined; we clamp e to 0 (X = 2^-127), so
    # such blocks round to zero. At the top, amax = nextafter(2^128, 0) gives log2f = 128 and e = 253.
    e = (log2_floor_f32(amax) - 2 + 127).clamp(0, 254).int()
    e = torch.where(amax > 0, e, torch.zeros_like(e))  # (nb, 1) int32
    half_scale = torch.ldexp(torch.ones_like(amax), (e - 128).float())  # X/2, ggml's E8M0_TO_FP32_HALF
    levels = (2 * E2M1.to(x.device)).view(1, 1, 8) * half_scale.unsqueeze(-1)  # (nb, 1, 8): kvalues * X/2
    err = (levels - x.abs().unsqueeze(-1)).abs()  # (nb, 32, 8); |k*d - |x|| == |-k*d - x| for x < 0
    mag = err.argmin(dim=-1)  # (nb, 32) first minimum: ties go to the smaller magnitude
    code = mag | ((x < 0) & (mag > 0)).long() << 3  # sign bit; GGML never emits -0 (code 8)
    return dict(blocks=torch.cat([e.to(torch.uint8), pack_halves(code.to(torch.uint8))], dim=1))  # (nb, 17)


def dequantize_mxfp4(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    b = q["blocks"]  # (nb, 17)
    scale = torch.ldexp(torch.ones(b.shape[0], 1, device=b.device), b[:, :1].float() - 127)  # 2^(e - 127)
    code = unpack_halves(b[:, 1:]).long()  # (nb, 32)
    val = E2M1.to(b.device)[code & 7] * (1 - 2 * (code >> 3)).float()
    return (val * scale).view(shape)  # (N, K)


# -----------------------------------------------------------------------------------------------
# int4, group-wise asymmetric round-to-nearest (the RTN baseline of GPTQ/AWQ papers)
# Each group of G consecutive input weights gets w_hat = (q - z) * s, q in [0, 15],
# s = (max - min) / 15 (fp16), z = round(-min / s) in [0, 15]: 0.0 is exactly representable.
# Layout: q (N*Kp/2,) uint8 nibbles (pairs) over the (N, Kp) matrix, Kp = K padded with zeros to a
# multiple of G; s fp16 (N, Kp/G); z nibbles (pairs) over the (N, Kp/G) zero points.
# bits/weight = (4 * N * Kp + 16 * N * Kp/G + 4 * N * Kp/G) / (N * K) = 4 + 20/G when G divides K.


def quantize_int4(w: torch.Tensor, G: int = 128) -> dict[str, torch.Tensor]:
    _check_finite(w, f"int4_g{G}")
    N, K = w.shape
    x = F.pad(w.float(), (0, -K % G)).view(N, -1, G)  # (N, ng, G)
    lo, hi = x.amin(dim=-1).clamp(max=0), x.amax(dim=-1).clamp(min=0)  # (N, ng); keep 0 in range
    s = ((hi - lo) / 15)
    _check_fp16_scale(s, f"int4_g{G}")
    s = s.half().float()  # quantize with the scale we store
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group, or a scale below fp16's range
    z = torch.round(-lo / s).clamp(0, 15)  # (N, ng)
    q = torch.round(x / s[..., None] + z[..., None]).clamp(0, 15)  # (N, ng, G)
    return dict(q=pack_pairs(q), s=s.half(), z=pack_pairs(z))


def dequantize_int4(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    N, K = shape
    s = q["s"].float()  # (N, ng)
    ng = s.shape[1]
    G = 2 * q["q"].numel() // (N * ng)  # Kp = ng * G is even, so the codes fill N * Kp / 2 bytes exactly
    z = unpack_pairs(q["z"], s.numel()).view(N, ng).float()
    x = unpack_pairs(q["q"], N * ng * G).view(N, ng, G).float()
    return ((x - z[..., None]) * s[..., None]).view(N, ng * G)[:, :K]  # (N, K)


# -----------------------------------------------------------------------------------------------
# NF4 with double quantization (QLoRA section 3)
# NormalFloat: 16 levels at quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 (asymmetric:
# 7 negative, 8 positive levels). These are the values of the paper's appendix / bitsandbytes.
# Layout over the flattened weight, in blocks of 64: codes (n/2,) uint8 nibbles (pairs);
# absmax per block double-quantized (eq. 6): c2 = absmax - mean (fp32 `offset`, one per tensor), in
# blocks of 256 as FP8 E4M3 codes (n/64,) with an fp32 scale per 256 (the paper: "8-bit Floats with a
# blocksize of 256"; bitsandbytes uses its 8-bit dynamic map instead).
# bits/weight = 4 + 8/64 + 32/(64*256) = 4.127 (+ 32 bits per tensor).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448 = 1.75 * 2^8


def _fp8_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (m, b) -> E4M3 codes (m, b) and fp32 scales (m,) with x ~= codes * scale."""
    scale = x.abs().amax(dim=1) / FP8_MAX  # (m,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


NF4_BLOCK, NF4_BLOCK2 = 64, 256  # weights per absmax; absmaxes per second-level scale (QLoRA)


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    _check_finite(w, "nf4")
    n, block, block2 = w.numel(), NF4_BLOCK, NF4_BLOCK2
    x = F.pad(w.float().flatten(), (0, -n % block)).view(-1, block)  # (nb, 64)
    absmax = x.abs().amax(dim=1)  # (nb,)
    offset = absmax.mean()
    c2 = F.pad(absmax - offset, (0, -absmax.numel() % block2)).view(-1, block2)  # (nb2, 256)
    am_codes, am_scale = _fp8_blockwise(c2)
    absmax_hat = (am_codes.float() * am_scale[:, None]).flatten()[:absmax.numel()] + offset  # (nb,)
    # normalise by the absmax we will actually use, so the dequantized values land on the levels
    safe = torch.where(absmax_hat > 0, absmax_hat, torch.ones_like(absmax_hat))
    codes = ((x / safe[:, None]).unsqueeze(-1) - NF4.to(x.device)).abs().argmin(dim=-1)  # (nb, 64) nearest
    return dict(q=pack_pairs(codes), absmax_q=am_codes.flatten()[:absmax.numel()], absmax_scale=am_scale,
                offset=offset.view(1))


def dequantize_nf4(q: dict, shape: tuple[int, int]) -> torch.Tensor:
    n, block, block2 = shape[0] * shape[1], NF4_BLOCK, NF4_BLOCK2
    nb = q["absmax_q"].numel()
    am = F.pad(q["absmax_q"].float(), (0, -nb % block2)).view(-1, block2) * q["absmax_scale"][:, None]
    absmax = am.flatten()[:nb] + q["offset"]  # (nb,)
    codes = unpack_pairs(q["q"], nb * block).view(nb, block).long()
    return (NF4.to(codes.device)[codes] * absmax[:, None]).flatten()[:n].view(shape)  # (N, K)


# -----------------------------------------------------------------------------------------------
# FP8 E4M3 with DeepSeek-V3's fine-grained scaling (section 3.3.2)
# E4M3 (1 sign, 4 exponent, 3 mantissa bits, no infinities, max 448) keeps ~2 significant digits
# everywhere but has little range, so scales must follow the data closely: one fp32 scale per 128x128
# block of the weight, and one per 1x128 tile of each activation row (computed online).
# Layout: q float8_e4m3fn (N, K); scale fp32 (ceil(N/128), ceil(K/128)). Edge blocks are partial.
# bits/weight = 8 + 32 * ceil(N/128) * ceil(K/128) / (N * K) (= 8.002 for a full 128x128 block).


def quantize_fp8(w: torch.Tensor, block: int = 128) -> dict[str, torch.Tensor]:
    _check_finite(w, "fp8")
    N, K = w.shape
    x = F.pad(w.float(), (0, -K % block, 0, -N % block))  # (Np, Kp)
    Nb, Kb = x.shape[0] // block, x.shape[1] // block
    tiles = x.view(Nb, block, Kb, block).permute(0, 2, 1, 3).reshape(Nb * Kb, block * block)  # (Nb*Kb, 128^2)
    codes, scale = _fp8_blockwise(tiles)
    q = codes.view(Nb, Kb, block, block).permute(0, 2, 1, 3).reshape(Nb * block, Kb * block)[:N, :K]
    return dict(q=q.contiguous(), scale=scale.view(Nb, Kb))


def dequantize_fp8(q: dict, shape: tuple[int, int], block: int = 128) -> torch.Tensor:
    N, K = shape
    s = q["scale"].repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]  # (N, K)
    return q["q"].float() * s


def fake_quant_fp8_activation(x: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """x (..., K) -> x rounded through E4M3 with one scale per 1x128 tile of each row (DeepSeek-V3)."""
    K = x.shape[-1]
    t = F.pad(x.float(), (0, -K % tile)).reshape(-1, tile)  # (rows * K/128, 128)
    codes, scale = _fp8_blockwise(t)
    return (codes.float() * scale[:, None]).view(*x.shape[:-1], -1)[..., :K].to(x.dtype)


# -----------------------------------------------------------------------------------------------
# The schemes, by name: (quantize, dequantize). AWQ is int4 after an activation-aware rescaling of the
# model (apply_awq below), so it shares int4's storage.

SCHEMES: dict[str, tuple] = {
    "int8": (quantize_int8, dequantize_int8),
    "int8_outlier": (quantize_int8_outlier, dequantize_int8_outlier),
    "q8_0": (quantize_q8_0, dequantize_q8_0),
    "fp8": (quantize_fp8, dequantize_fp8),
    "q4_0": (quantize_q4_0, dequantize_q4_0),
    "q4_1": (quantize_q4_1, dequantize_q4_1),
    "mxfp4": (quantize_mxfp4, dequantize_mxfp4),
    "nf4": (quantize_nf4, dequantize_nf4),
    **{f"int4_g{G}": (lambda w, G=G: quantize_int4(w, G), dequantize_int4) for G in (32, 64, 128)},
    **{f"awq_g{G}": (lambda w, G=G: quantize_int4(w, G), dequantize_int4) for G in (32, 64, 128)},
}


def storage_bits(q: dict[str, torch.Tensor]) -> int:
    """Bits actually stored: the sum of the packed tensors' sizes."""
    return 8 * sum(t.numel() * t.element_size() for t in q.values())


def layout_bits(scheme: str, N: int, K: int, outlier_frac: float = 0.005) -> int:
    """Bits an (N, K) weight needs in `scheme`, from the layouts documented above (no tensors made)."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    n = N * K
    if scheme.startswith(("int4", "awq")):
        G = int(scheme.split("_g")[1])
        ng = N * cdiv(K, G)  # groups, over the zero-padded (N, Kp)
        return 4 * ng * G + 16 * ng + 8 * cdiv(ng, 2)  # codes + fp16 scales + 4-bit zero points
    return {"int8": 8 * n + 32 * N, "int8_outlier": 8 * n + 32 * N + 48 * round(outlier_frac * n),
            "q8_0": n // 32 * 34 * 8, "q4_0": n // 32 * 18 * 8, "q4_1": n // 32 * 20 * 8,
            "mxfp4": n // 32 * 17 * 8,
            "nf4": 4 * n + 8 * cdiv(n, 64) + 32 * cdiv(cdiv(n, 64), 256) + 32,
            "fp8": 8 * n + 32 * cdiv(N, 128) * cdiv(K, 128)}[scheme]


# -----------------------------------------------------------------------------------------------
# The quantized linear layer


class QuantLinear(nn.Module):
    """y = x W_hat^T + b, with W_hat rebuilt from packed buffers at every call (the weight never
    lives in fp32 between calls). Buffers: whatever the scheme packs ("q", "scale", "blocks"...)."""

    def __init__(self, linear: nn.Linear, scheme: str, outlier_frac: float = 0.005):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        packed = (quantize_int8_outlier(w, outlier_frac) if scheme == "int8_outlier"
                  else SCHEMES[scheme][0](w))
        self.names = sorted(packed)
        for k in self.names:
            self.register_buffer(k, packed[k].to(w.device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.names}

    def dequantize(self) -> torch.Tensor:
        return SCHEMES[self.scheme][1](self.packed(), (self.out_features, self.in_features))  # (N, K)

    def bits_per_weight(self) -> float:
        return storage_bits(self.packed()) / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ---- CUDA DISPATCH POINT: a fused dequantize-matmul kernel from kernels.cu, when built. ----
        # Expected signature: llm_kernels.quant_linear(x, scheme, *packed buffers in self.names order).
        # It covers int8, int4_g<G> and awq_g<G> (llm_kernels.QUANT_SCHEMES) for fp16/bf16 x.
        if (x.is_cuda and llm_kernels is not None and self.scheme in getattr(llm_kernels, "QUANT_SCHEMES", ())
                and x.dtype in (torch.float16, torch.bfloat16)):
            x = x.contiguous()
            y = llm_kernels.quant_linear(x, self.scheme, *[getattr(self, k) for k in self.names])
            return y if self.bias is None else y + self.bias.to(y.dtype)
        # ---- PyTorch path: dequantize on the fly, then an ordinary matmul. ----
        if self.scheme == "fp8":  # DeepSeek-V3 quantizes activations too, per 1x128 tile
            x = fake_quant_fp8_activation(x)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)  # (..., out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, scheme={self.scheme}, "
                f"{self.bits_per_weight():.3f} bits/weight")


def quantize_model(model: gpt.GPT, scheme: str, calib: Optional[torch.Tensor] = None,
                   outlier_frac: float = 0.005, awq_grid: int = 20) -> gpt.GPT:
    """A copy of `model` with every nn.Linear replaced by a QuantLinear (the original is untouched).

    The tied output head is *not* quantized: it is the token embedding (V x C, most of a tiny model's
    parameters), read as a lookup table on the way in, and the logits are the most sensitive matmul
    (AWQ and llama.cpp's default mixes also keep it in higher precision). It stays fp32 and is counted
    as such in model_bytes(). An untied head is an ordinary Linear and is quantized.
    awq_gG schemes need `calib` (B, T) token windows: the model is rescaled (apply_awq) first."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
    if scheme.startswith("awq"):
        if calib is None:
            raise ValueError(f"{scheme} needs calibration tokens: "
                             f"quantize_model(model, {scheme!r}, calib=(B, T) token ids)")
        model, alphas = apply_awq(model, calib, int(scheme.split("_g")[1]), awq_grid)
        model.awq_alphas = alphas  # the alpha chosen per layer group, for the curious
    else:
        model = copy.deepcopy(model)
    tied = model.output.weight is model.tok_embeddings.weight
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and not (tied and m is model.output)]
    for name, lin in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QuantLinear(lin, scheme, outlier_frac))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: packed buffers + remaining float parameters (tied once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# -----------------------------------------------------------------------------------------------
# AWQ: activation-aware scaling (Lin et al. 2023, section 3.2)
# A weight column multiplied by s > 1 is quantized with relatively smaller error (its group's step
# barely moves), and the matching input channel divided by s undoes it exactly: W x = (W s)(x / s).
# Channels with large activations matter most, so s = mean|x|^alpha (eq. 5); alpha is searched per
# layer group by the output error on calibration data (alpha = 0 is plain RTN, so the search can only
# help on that data). x / s is folded into the op that produced x, so nothing is added at run time:
#   wq, wk, wv (one s)  <- attention_norm.weight / s         w1, w3 (one s) <- ffn_norm.weight / s
#   wo                  <- rows of wv / s (GQA: query heads sharing a kv head must share s)
#   w2                  <- rows of w3 / s (silu(w1 x) * (w3 x) is linear in w3's output)


@torch.no_grad()
def collect_linear_inputs(model: gpt.GPT, tokens: torch.Tensor,
                          max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """Inputs (rows, in_features) seen by every nn.Linear on a forward of `tokens` (B, T), via hooks."""
    inputs: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: inputs.setdefault(name, []).append(
        a[0].detach().reshape(-1, a[0].shape[-1])))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model.eval()
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, xs in inputs.items():
        x = torch.cat(xs)  # (B*T, K)
        out[name] = x[torch.randperm(len(x), generator=gen)[:max_rows]] if len(x) > max_rows else x
    return out


def awq_search(weights: list[torch.Tensor], x: torch.Tensor, G: int, grid: int = 20,
               share: Optional[tuple[int, int, int]] = None) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-input-channel scale s (K,) for weights sharing input x (rows, K), by output MSE.

    share=(nkv, g, hs): channels laid out (nkv*g, hs) must share s within each group of g heads."""
    mean_abs = x.abs().mean(dim=0)  # (K,) s_X of eq. 5
    if share is not None:
        nkv, g, hs = share
        mean_abs = mean_abs.view(nkv, g, hs).mean(1, keepdim=True).expand(nkv, g, hs).reshape(-1)
    refs = [x @ w.T for w in weights]  # (rows, N) each
    errs, best = [], (math.inf, None, 0.0)
    for i in range(grid + 1):
        alpha = i / grid
        s = mean_abs.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre s around 1 (AWQ's reference code)
        err = 0.0
        for w, ref in zip(weights, refs):
            w_hat = dequantize_int4(quantize_int4(w * s, G), tuple(w.shape)) / s  # Q(W s) / s
            err += float(((x @ w_hat.T - ref) ** 2).mean())
        errs.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errs


@torch.no_grad()
def apply_awq(model: gpt.GPT, calib: torch.Tensor, G: int, grid: int = 20) -> tuple[gpt.GPT, dict]:
    """A copy of a llama-style gpt.py model with AWQ scales folded in (same function in fp32), ready
    for int4_gG, and {layer group: chosen alpha}."""
    cfg = model.cfg
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.bias:
        raise ValueError("apply_awq folds scales into RMSNorm gains and SwiGLU's up projection: it needs "
                         "the llama preset (norm=rmsnorm, mlp=swiglu, bias=False)")
    xs = collect_linear_inputs(model, calib)
    model = copy.deepcopy(model)
    alphas = {}
    g = cfg.n_head // cfg.n_kv_head
    for i, blk in enumerate(model.layers):
        a, f = blk.attention, blk.feed_forward
        p = f"layers.{i}."
        s, alphas[p + "qkv"], _ = awq_search([a.wq.weight, a.wk.weight, a.wv.weight],
                                             xs[p + "attention.wq"], G, grid)
        for lin in (a.wq, a.wk, a.wv):
            lin.weight.mul_(s)  # (N, C) * (C,): column j scaled by s_j
        blk.attention_norm.weight.div_(s)
        s, alphas[p + "o"], _ = awq_search([a.wo.weight], xs[p + "attention.wo"], G, grid,
                                           share=(cfg.n_kv_head, g, cfg.head_size))
        a.wo.weight.mul_(s)
        s_v = s.view(cfg.n_kv_head, g, cfg.head_size)[:, 0].reshape(-1)  # (nkv*hs,) one per kv channel
        a.wv.weight.div_(s_v[:, None])  # rows of wv: v / s_v, so y / s reaches wo
        s, alphas[p + "gate_up"], _ = awq_search([f.w1.weight, f.w3.weight], xs[p + "feed_forward.w1"],
                                                 G, grid)
        f.w1.weight.mul_(s)
        f.w3.weight.mul_(s)
        blk.ffn_norm.weight.div_(s)
        s, alphas[p + "down"], _ = awq_search([f.w2.weight], xs[p + "feed_forward.w2"], G, grid)
        f.w2.weight.mul_(s)
        f.w3.weight.div_(s[:, None])  # rows of w3
    return model, alphas


# -----------------------------------------------------------------------------------------------
# Demo: quantize a trained model every way, measure what it costs


def ensure_model(qc: QuantConfig) -> tuple[gpt.GPT, object]:
    if qc.ckpt:
        model, enc, _ = gpt.load_model(qc.ckpt)
        return model, enc
    path = Path(qc.out_dir) / "ckpt.pt"
    if path.exists():
        state = gpt.read_checkpoint(path)
        if state["iter"] == qc.train_iters == state["train_config"]["max_iters"]:
            print(f"reusing {path} (trained by an earlier run; delete it to retrain)")
            model, enc, _ = gpt.load_model(path)
            return model, enc
    print(f"training gpt.py's default model for {qc.train_iters} iterations into {path} ...")
    res = gpt.train(gpt.GPTConfig(), gpt.TrainConfig(max_iters=qc.train_iters, out_dir=qc.out_dir,
                                                     seed=qc.seed, log_interval=100), verbose=True)
    return res["model"].eval(), res["tokenizer"]


def decode_speed(model: gpt.GPT, prompt: list[int], n: int) -> float:
    """Greedy batch-1 decoding speed in tokens/s, on one thread: a tiny model decoding one token at a
    time gains nothing from more, and one thread keeps the figure steady on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gpt.generate(model, prompt, 8, temperature=0)  # warm-up
        t = time.perf_counter()
        out = gpt.generate(model, prompt, n, temperature=0)
        return len(out[0]) / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)


def plot_ppl_vs_bits(rows: list[dict], base_ppl: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for family, color in (("int4_g", "C2"), ("awq_g", "C1")):  # the group-size sweeps as lines
        pts = sorted((r["bits"], r["dppl"]) for r in rows if r["scheme"].startswith(family))
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=f"{family}32/64/128")
    singles = [r for r in rows if not r["scheme"].startswith(("int4_g", "awq_g"))]
    ax.scatter([r["bits"] for r in singles], [r["dppl"] for r in singles], color="C0", zorder=3)
    for r in rows:  # the sweeps are named in the legend: label their points by G only
        awq, sweep = r["scheme"].startswith("awq_g"), r["scheme"].startswith(("int4_g", "awq_g"))
        ax.annotate(r["scheme"].split("_")[1] if sweep else r["scheme"], (r["bits"], r["dppl"]),
                    textcoords="offset points", fontsize=8,
                    xytext=(-24, -10) if awq else (-40, -12) if r["scheme"] == "int8_outlier" else (5, 4))
    ax.axhline(0, color="gray", ls="--", label=f"fp32 (ppl {base_ppl:.3f})")
    ax.set_xlabel("bits per weight of the quantized linears (counted from the stored bytes)")
    ax.set_ylabel("validation perplexity change vs fp32 (%)")
    ax.set_title("quant.py on gpt.py's default model (tied fp32 embedding/head not quantized)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str]) -> QuantConfig:
    return gpt.config_from_args(QuantConfig, argv)

def measure_schemes(model: gpt.GPT, val: np.ndarray, byte_lengths: np.ndarray, calib: torch.Tensor,
                    prompt: list[int], qc: QuantConfig, block_size: int) -> tuple[dict, list[dict]]:
    """Quantize `model` with each scheme of qc.schemes and measure what it costs: bits/weight counted
    from the packed bytes (and checked against a file of them and the layout's arithmetic), validation
    perplexity on the first qc.eval_tokens tokens of `val` in windows of `block_size`, decode speed
    (qc.decode_tokens greedy tokens from `prompt`; 0 = skip). Returns (the float model's row, rows).
    `python pretrained.py quant` calls it on a real model."""
    schemes = list(SCHEMES) if qc.schemes == "all" else qc.schemes.split(",")
    evaluate = lambda m: gpt.evaluate(m, val, byte_lengths, block_size, 8, qc.eval_tokens)  # noqa: E731
    speed = lambda m: decode_speed(m, prompt, qc.decode_tokens) if qc.decode_tokens else None  # noqa: E731
    base = evaluate(model)
    base_ppl = math.exp(base["loss"])
    tied = model.output.weight is model.tok_embeddings.weight
    n_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
                and not (tied and m is model.output))  # the weights quantize_model quantizes
    base_row = dict(scheme="fp32", bits=32, file=4 * n_lin, expect=4 * n_lin, bytes=model_bytes(model),
                    loss=base["loss"], ppl=base_ppl, dppl=0.0, tps=speed(model), qtime=0.0)
    print(f"\nfloat model: val loss {base['loss']:.4f} (ppl {base_ppl:.3f}) on {base['tokens']:,} tokens; "
          f"{n_lin:,} weights in quantizable linears, head "
          f"{'tied to the fp32 embedding' if tied else 'untied'}")
    rows = []
    for scheme in schemes:
        t0 = time.perf_counter()
        qm = quantize_model(model, scheme, calib=calib, outlier_frac=qc.outlier_frac, awq_grid=qc.awq_grid)
        qt = time.perf_counter() - t0
        ql = [m for m in qm.modules() if isinstance(m, QuantLinear)]
        bits = sum(storage_bits(m.packed()) for m in ql) / n_lin
        # size check: write the packed linears as raw bytes, compare with the layout's arithmetic
        f = Path(qc.out_dir) / f"linears-{scheme}.bin"
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "wb") as fh:
            for m in ql:
                for t in m.packed().values():
                    fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        ev = evaluate(qm)
        ppl = math.exp(ev["loss"])
        expect = sum(layout_bits(scheme, m.out_features, m.in_features, qc.outlier_frac) for m in ql) / 8
        rows.append(dict(scheme=scheme, bits=bits, file=f.stat().st_size, expect=expect,
                         bytes=model_bytes(qm), loss=ev["loss"], ppl=ppl, dppl=100 * (ppl / base_ppl - 1),
                         tps=speed(qm), qtime=qt))
        r = rows[-1]
        tps = f"{r['tps']:.0f} tok/s, " if r["tps"] else ""
        print(f"{scheme:>13}: {bits:.3f} bits/weight, ppl {ppl:.3f} ({r['dppl']:+.2f}%), {tps}"
              f"quantized in {qt:.1f}s", flush=True)
        if scheme.startswith("awq"):
            print("    alphas chosen:", " ".join(f"{k.removeprefix('layers.')}={v:.2f}"
                                              for k, v in qm.awq_alphas.items()))
    return base_row, rows


def print_table(base: dict, rows: list[dict]) -> None:
    """The markdown table of measure_schemes' rows, and AWQ vs RTN at each group size measured."""
    print("\n| scheme | bits/weight | linears file (bytes) | layout arithmetic (bytes) | model bytes | "
          "val loss | ppl | ppl change | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in [base] + rows:
        tps = f"{r['tps']:.0f}" if r["tps"] else "-"
        change = "-" if r is base else f"{r['dppl']:+.2f}%"
        bits = "32" if r is base else f"{r['bits']:.3f}"
        print(f"| {r['scheme']} | {bits} | {r['file']:,} | {r['expect']:,.0f} | {r['bytes']:,} | "
              f"{r['loss']:.4f} | {r['ppl']:.3f} | {change} | {tps} |")
    by = {r["scheme"]: r for r in rows}
    for G in (32, 64, 128):
        if f"awq_g{G}" in by and f"int4_g{G}" in by:
            a, b = by[f"awq_g{G}"], by[f"int4_g{G}"]
            verdict = "no worse" if a["ppl"] <= b["ppl"] else "WORSE"
            print(f"AWQ vs RTN at G={G}: ppl {a['ppl']:.3f} vs {b['ppl']:.3f} "
                  f"({100 * (a['ppl'] / b['ppl'] - 1):+.2f}%: {verdict})")


def main(argv: list[str]) -> None:
    try:
        qc = parse_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(qc.seed)
    model, enc = ensure_model(qc)
    cfg = model.cfg
    val = gpt.load_tokens("valid", enc)
    train_tokens = gpt.load_tokens("train", enc)
    gen = torch.Generator().manual_seed(qc.seed)
    calib_off = torch.randint(0, len(train_tokens) - cfg.block_size - 1, (qc.calib_seqs,), generator=gen)
    calib, _ = gpt.get_batch(train_tokens, calib_off, cfg.block_size)  # (calib_seqs, T)
    prompt = enc.encode_ordinary("Once upon a time")
    base, rows = measure_schemes(model, val, gpt.token_byte_lengths(enc), calib, prompt, qc, cfg.block_size)
    print_table(base, rows)
    plot_ppl_vs_bits(rows, base["ppl"], ROOT / "assets" / "quant_ppl_vs_bits.png")
    print("saved assets/quant_ppl_vs_bits.png")
    print("(to write a llama.cpp file of this model: python pretrained.py export --ckpt=PATH --dtype=Q4_0)")


if __name__ == "__main__":
    main(sys.argv[1:])
