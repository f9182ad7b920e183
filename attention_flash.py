"""
attention_flash.py - FlashAttention-2, forward and backward, written in plain PyTorch to be read.

Attention softmax(Q K^T / sqrt(hs)) V needs every score of a row before it can normalise, so the
textbook version materialises the whole (Tq, Tk) score matrix: O(T^2) memory, written to and read
back from memory several times. FlashAttention tiles Q into blocks of Br rows and K, V into blocks
of Bc columns and keeps a *running* softmax (max m, sum l, unnormalised output O) per row, so only
one (Br, Bc) block of scores exists at a time: O(T) extra memory, exact (not an approximation). The
backward pass never stores the probabilities either: it recomputes each block from Q, K and the
saved log-sum-exp L. This file is the readable algorithm, the reference the CUDA kernel
(kernels.cu) is checked against, and the dispatcher that picks between the two.

References
- FlashAttention-2: Dao 2023, arXiv:2307.08691, Algorithm 1 (forward) and Algorithm 2 (backward);
  comments below cite their line numbers as "Alg 1 l.N". FlashAttention: Dao et al. 2022,
  arXiv:2205.14135 (the tiling and recomputation idea).
- Online softmax: Milakov & Gimelshein 2018, arXiv:1805.02867.
- Attention sinks as learned per-head logits: Xiao et al. 2023 (arXiv:2309.17453), gpt-oss (2025).
- Sliding windows: Mistral 7B (arXiv:2310.06825); soft-capping: Gemma 2 (arXiv:2408.00118).
- Layout in the spirit of flash-attention-minimal (tspeterkim) and llm.c's dev/cuda kernels.

Run it
    python attention_flash.py                       # validate vs float64, then benchmark T=256..8192
    python attention_flash.py --seq_lens=256,1024 --n_head=8 --causal=false
    python -m pytest -q tests/test_attention_flash.py

Use it: `import attention_flash` registers `gpt.ATTENTION["flash"]`, then GPTConfig(attn_impl="flash").

Not covered: dropout on the attention probabilities, variable-length (packed) batches, paged KV
caches, FP8, FlashAttention-3's warp specialisation; the CUDA kernel itself lives in kernels.cu.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import gpt

ROOT = Path(__file__).resolve().parent

# Default tile sizes of the PyTorch path. On a CPU each tile costs ~15 tensor ops of Python and
# dispatch overhead (~10 us each, plus a thread-pool barrier per op) on top of its 4 Br Bc hs FLOPs,
# so tiles must be big enough to amortise that, yet the (Br*rep, Bc) score tile should stay in cache.
# Measured fwd+bwd at T = 2048 and 8192 (B=1, nh=4, hs=64, causal, fp32, 2 cores): 512 x 512 was the
# fastest of 128..1024 (128 x 128 was several times slower: too many small ops; timings on the shared
# CPU were noisy, and small tiles suffer most from a busy second core). GPU kernels use far smaller
# tiles (64-128), sized to fit shared memory instead.
BLOCK_Q = 512  # Br, query positions per tile (times rep = nh/nkv query heads sharing a kv head)
BLOCK_K = 512  # Bc, key/value positions per tile


# -----------------------------------------------------------------------------------------------
# The reference is gpt.naive_attention: scores (B, nh, Tq, Tk) -> mask -> softmax -> @ V, checked in
# float64 by tests/test_gpt.py. Everything below must agree with it, which tests/test_attention_flash.py
# checks for every option. Queries are bottom-right aligned: query i sits at absolute position
# Tk - Tq + i (the KV-cache case), and a query at position p sees key j iff
#     causal:  j <= p          window W:  |p - j| < W   (both: p - W < j <= p, as gpt.attention_mask)


SKIP, FULL, PARTIAL = "skip", "full", "partial"


def block_visibility(p0: int, p1: int, j0: int, j1: int, causal: bool, window: int) -> str:
    """Can the queries at positions p0..p1-1 see the keys j0..j1-1? SKIP (none of the pairs),
    FULL (all of them) or PARTIAL (needs an element mask).

    Query p sees the interval lo(p) <= j <= hi(p), and both ends grow with p. So the block is
    empty if its last key is left of the *first* query's interval or its first key right of the
    *last* query's, and full if it lies inside both the last query's lower and first query's
    upper bound. Causal attention skips every block above the diagonal (about half the work); a
    window of W also skips every block further than W in the past: O(T W) work instead of O(T^2)."""
    inf = 1 << 62

    def lo(p):
        return p - window + 1 if window else -inf

    def hi(p):
        return p if causal else (p + window - 1 if window else inf)

    if j1 - 1 < lo(p0) or j0 > hi(p1 - 1):
        return SKIP
    if j0 >= lo(p1 - 1) and j1 - 1 <= hi(p0):
        return FULL
    return PARTIAL


def block_mask(p0: int, p1: int, j0: int, j1: int, causal: bool, window: int, device) -> torch.Tensor:
    """(p1-p0, j1-j0) boolean mask of a PARTIAL block, True = visible (same rule as gpt.attention_mask)."""
    p = torch.arange(p0, p1, device=device)[:, None]  # absolute query positions
    j = torch.arange(j0, j1, device=device)[None, :]
    ok = (j <= p) if causal else torch.ones(p1 - p0, j1 - j0, dtype=torch.bool, device=device)
    if window:
        ok = ok & ((p - j).abs() < window)
    return ok


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 (bf16/fp16/fp32 inputs), or in fp64 for fp64 inputs (gradcheck, tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, nkv: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, nh, T, d) -> (B*nkv, T*rep, d) in `dtype`, contiguous, with rep = nh/nkv (Llama's n_rep): the
    rep query heads that share a kv head become extra *rows* next to each position (row t*rep + g).
    Query head h = kv*rep + g reads kv head h // rep (as gpt.py's repeat_interleave does), so a tile of
    Br positions is one contiguous (Br*rep, d) matrix that meets the *one* shared K/V tile: GQA/MQA read
    K and V once per kv head and never copy them rep times. Flattening (B, nkv) into one batch dim N lets
    every tile op be a single batched matmul (bmm/baddbmm) over all batch x heads at once."""
    B, nh, T, d = x.shape
    x = x.view(B, nkv, nh // nkv, T, d).transpose(2, 3)  # (B, nkv, T, rep, d), a view
    return x.to(dtype).reshape(B * nkv, T * (nh // nkv), d)  # (N, T*rep, d), a copy unless rep = 1


def _unrows(x: torch.Tensor, B: int, rep: int) -> torch.Tensor:
    """(B*nkv, T*rep, d) -> (B, nh, T, d), the inverse of _rows."""
    N, n_rows, d = x.shape
    T = n_rows // rep
    return x.view(B, N // B, T, rep, d).transpose(2, 3).reshape(B, N // B * rep, T, d)  # (B, nh, T, d)


# -----------------------------------------------------------------------------------------------
# Forward: FlashAttention-2, Algorithm 1.
#
# Why the running rescaling is exact. For one row, with scores s_1..s_n split into blocks, keep
#     m = max of the scores seen so far,   l = sum_j exp(s_j - m),   O = sum_j exp(s_j - m) v_j.
# When a new block arrives with a larger max m' >= m, every old term must be re-expressed relative to
# m': exp(s_j - m') = exp(s_j - m) * exp(m - m'). So multiplying l and O by alpha = exp(m - m') and
# adding the new block's terms gives exactly the sums we would have had with m' from the start. At
# the end O / l = sum_j softmax(s)_j v_j, and m + log(l) = log sum_j exp(s_j) = L, the log-sum-exp.
# Subtracting the running max keeps every exp() <= 1 (no overflow), and alpha <= 1 too.
# FlashAttention-2 (vs. FlashAttention-1) divides by l only once, at the end (Alg 1 l.12), instead of
# after every block, and keeps only L = m + log(l) for the backward pass instead of both m and l.
#
# Sinks fit in without a special case: a sink is one extra score s_h per head with a zero value
# vector, so each row simply *starts* with m = s_h, l = exp(s_h - m) = 1, O = 0.
#
# Where the work goes, per (Br, Bc) tile: two matmuls Q_i K_j^T and P V_j (4 Br Bc hs FLOPs, the
# bulk: 4 T^2 hs per head in total, halved by causal skipping) and Br Bc exponentials. Memory
# traffic: Q_i, O_i stay put while K_j, V_j stream past, so K and V are read Tq/Br times and Q, O
# once - instead of writing and re-reading the T x T scores and probabilities. Extra memory: one tile
# of scores plus m, l, L: O(T), never O(T^2).


def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       sinks: Optional[torch.Tensor] = None, causal: bool = True, window: int = 0,
                       soft_cap: float = 0.0, block_q: int = BLOCK_Q,
                       block_k: int = BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, nh, Tq, hs) in q's dtype, and the log-sum-exp L (B*nkv, Tq*rep) in the
    accumulation dtype (+inf for a row that sees no key and has no sink). q (B, nh, Tq, hs),
    k and v (B, nkv, Tk, hs), sinks (nh,) or None."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    rep, N = nh // nkv, B * nkv
    acc = _acc_dtype(q)
    dev = q.device
    # One O(T) copy in the accumulation dtype, with 1/sqrt(hs) folded into Q (saves a pass over S).
    Q = _rows(q, nkv, acc) * (1.0 / math.sqrt(hs))  # (N, Tq*rep, hs), never in place: may view q
    K, V = k.reshape(N, Tk, hs).to(acc), v.reshape(N, Tk, hs).to(acc)  # (N, Tk, hs), no copy if fp32
    O = torch.empty(N, Tq * rep, hs, dtype=acc, device=dev)
    L = torch.empty(N, Tq * rep, dtype=acc, device=dev)
    sink_rows = None if sinks is None else sinks.to(acc).view(1, nkv, 1, rep).expand(B, nkv, block_q, rep)
    off = Tk - Tq  # query i sits at absolute position off + i (bottom-right aligned)
    for i0 in range(0, Tq, block_q):  # Alg 1 l.3: for 1 <= i <= Tr (the GPU runs these in parallel)
        i1 = min(i0 + block_q, Tq)
        Br = i1 - i0
        rows = slice(i0 * rep, i1 * rep)  # this tile's Br*rep rows
        Qi = Q[:, rows]  # (N, Br*rep, hs), Alg 1 l.4 (a view)
        if sinks is None:  # Alg 1 l.5: O = 0, l = 0, m = -inf
            m = torch.full((N, Br * rep), -math.inf, dtype=acc, device=dev)  # (N, Br*rep)
            l = torch.zeros(N, Br * rep, dtype=acc, device=dev)
        else:  # the sink as the row's first "key": m = s_h, l = exp(s_h - s_h) = 1, value 0
            m = sink_rows[:, :, :Br].reshape(N, Br * rep)  # (N, Br*rep)
            l = torch.ones(N, Br * rep, dtype=acc, device=dev)
        Oi = torch.zeros(N, Br * rep, hs, dtype=acc, device=dev)  # (N, Br*rep, hs)
        for j0 in range(0, Tk, block_k):  # Alg 1 l.6: for 1 <= j <= Tc
            j1 = min(j0 + block_k, Tk)
            vis = block_visibility(off + i0, off + i1, j0, j1, causal, window)
            if vis == SKIP:
                continue
            S = torch.bmm(Qi, K[:, j0:j1].transpose(1, 2))  # (N, Br*rep, Bc), Alg 1 l.8: S = Q_i K_j^T
            if soft_cap:  # Gemma 2: bounded scores cap * tanh(s / cap), applied before the mask
                S = S.div_(soft_cap).tanh_().mul_(soft_cap)
            if vis == PARTIAL:  # diagonal / window-edge tile: -inf where the key is invisible
                mask = block_mask(off + i0, off + i1, j0, j1, causal, window, dev)  # (Br, Bc)
                S.view(N, Br, rep, j1 - j0).masked_fill_(~mask[:, None, :], -math.inf)
            m_new = torch.maximum(m, S.amax(dim=-1))  # (N, Br*rep), Alg 1 l.9: m = max(m, rowmax S)
            # A row that has seen only -inf so far has m_new = -inf, and -inf - (-inf) = NaN: use 0 as
            # its reference instead (its exp() terms are all exp(-inf) = 0, which is right).
            m_ref = m_new.masked_fill(m_new == -math.inf, 0.0)
            P = S.sub_(m_ref[..., None]).exp_()  # (N, Br*rep, Bc), Alg 1 l.9: P~ = exp(S - m), in place
            alpha = torch.exp(m - m_ref)  # (N, Br*rep), the rescaling factor exp(m_old - m_new) <= 1
            l = alpha * l + P.sum(dim=-1)  # Alg 1 l.9: l = e^(m_old - m) l + rowsum(P~)
            Oi.mul_(alpha[..., None]).baddbmm_(P, V[:, j0:j1])  # (N, Br*rep, hs), Alg 1 l.10: += P~ V_j
            m = m_new
        # Alg 1 l.12: normalise once. l = 0 only for a row with no visible key and no sink: its O is
        # 0 (not 0/0 = NaN, matching the reference) and L = +inf makes every recomputed P exactly 0.
        empty = l == 0
        O[:, rows] = Oi / l.masked_fill(empty, 1.0)[..., None]
        L[:, rows] = (m + torch.log(l)).masked_fill(empty, math.inf)  # Alg 1 l.13: L = m + log(l)
    return _unrows(O, B, rep).to(q.dtype), L  # (B, nh, Tq, hs), (N, Tq*rep)


# -----------------------------------------------------------------------------------------------
# Backward: FlashAttention-2, Algorithm 2.
#
# With P = softmax(S) row-wise and O = P V, the chain rule gives (Alg 2 l.11-14)
#     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D) with D_r = sum_c P_rc dP_rc = rowsum(dO * O),
#     dQ = dS K * scale,   dK = dS^T Q * scale.
# D = rowsum(dO * O) is the cheap form of rowsum(P * dP): sum_c P_rc (dO_r . V_c) = dO_r . O_r, an
# O(T hs) precomputation (Alg 2 l.4) instead of a second pass over the scores. P itself is rebuilt
# tile by tile from the saved L: P = exp(S - L) (Alg 2 l.11), already normalised, which costs one
# more Q K^T matmul but avoids storing the O(T^2) probabilities. Per tile that is 5 matmuls (Q K^T,
# P^T dO, dO V^T, dS K, dS^T Q: 10 Br Bc hs FLOPs, 2.5x the forward) and Br Bc exponentials.
#
# Loop order as in FlashAttention-2: the *outer* loop is over key blocks j, so dK_j and dV_j
# accumulate in fast memory (registers on the GPU) and are written once; dQ_i is accumulated across
# the outer loop in main memory (atomic adds on the GPU, Alg 2 l.17).
#
# Sink gradient. Let p_s = exp(s_h - L) be the sink's probability in a row. It changes every
# P_rc = exp(S_rc - L) through L only: dP_rc / ds_h = -P_rc p_s, so
#     d loss / d s_h = sum_r sum_c dO_r . V_c (-P_rc p_s) = -sum_r p_s,r (dO_r . O_r) = -sum_r p_s,r D_r,
# summed over every row (batch, position) of head h. (The sink's own value is 0, so it adds no term.)
#
# Soft-cap: S = cap * tanh(X / cap) with X = Q K^T * scale has dS/dX = 1 - tanh^2(X / cap), so dX is
# dS times that, recomputed from the same tanh.


def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        L: torch.Tensor, sinks: Optional[torch.Tensor] = None, causal: bool = True,
                        window: int = 0, soft_cap: float = 0.0, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dsinks) of the attention output o = flash_attn_forward(...)[0] given
    d loss / d o = do, each in its input's dtype; dsinks is None when sinks is None."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    rep, N = nh // nkv, B * nkv
    acc = _acc_dtype(q)
    dev = q.device
    scale = 1.0 / math.sqrt(hs)
    Q = _rows(q, nkv, acc) * scale  # (N, Tq*rep, hs)
    dO = _rows(do, nkv, acc)  # (N, Tq*rep, hs)
    K, V = k.reshape(N, Tk, hs).to(acc), v.reshape(N, Tk, hs).to(acc)  # (N, Tk, hs)
    D = (dO * _rows(o, nkv, acc)).sum(dim=-1)  # (N, Tq*rep), Alg 2 l.4: D = rowsum(dO * O)
    dQ = torch.zeros_like(Q)  # (N, Tq*rep, hs), gradient w.r.t. the *scaled* Q
    dK = torch.empty(N, Tk, hs, dtype=acc, device=dev)
    dV = torch.empty(N, Tk, hs, dtype=acc, device=dev)
    off = Tk - Tq
    for j0 in range(0, Tk, block_k):  # Alg 2 l.5: for 1 <= j <= Tc (parallel on the GPU)
        j1 = min(j0 + block_k, Tk)
        Kj, Vj = K[:, j0:j1], V[:, j0:j1]  # (N, Bc, hs), Alg 2 l.6
        dKj = torch.zeros_like(Kj)  # Alg 2 l.7
        dVj = torch.zeros_like(Vj)
        for i0 in range(0, Tq, block_q):  # Alg 2 l.8: for 1 <= i <= Tr
            i1 = min(i0 + block_q, Tq)
            vis = block_visibility(off + i0, off + i1, j0, j1, causal, window)
            if vis == SKIP:
                continue
            Br, rows = i1 - i0, slice(i0 * rep, i1 * rep)
            Qi, dOi = Q[:, rows], dO[:, rows]  # (N, Br*rep, hs), Alg 2 l.9
            Li, Di = L[:, rows, None], D[:, rows, None]  # (N, Br*rep, 1)
            S = torch.bmm(Qi, Kj.transpose(1, 2))  # (N, Br*rep, Bc), Alg 2 l.10
            if soft_cap:
                t = torch.tanh(S / soft_cap)
                S = soft_cap * t
            if vis == PARTIAL:
                mask = block_mask(off + i0, off + i1, j0, j1, causal, window, dev)  # (Br, Bc)
                S.view(N, Br, rep, j1 - j0).masked_fill_(~mask[:, None, :], -math.inf)
            P = S.sub_(Li).exp_()  # (N, Br*rep, Bc), Alg 2 l.11: the normalised probabilities exp(S - L)
            dVj.baddbmm_(P.transpose(1, 2), dOi)  # (N, Bc, hs), Alg 2 l.12 (sums over the rep heads too)
            dP = torch.bmm(dOi, Vj.transpose(1, 2))  # (N, Br*rep, Bc), Alg 2 l.13
            dS = dP.sub_(Di).mul_(P)  # (N, Br*rep, Bc), Alg 2 l.14: dS = P * (dP - D)
            if soft_cap:
                dS.mul_(1 - t * t)  # through cap * tanh(x / cap)
            dQ[:, rows].baddbmm_(dS, Kj)  # (N, Br*rep, hs), Alg 2 l.15 (an atomicAdd on the GPU)
            dKj.baddbmm_(dS.transpose(1, 2), Qi)  # (N, Bc, hs), Alg 2 l.16 (Qi carries the scale)
        dK[:, j0:j1] = dKj  # Alg 2 l.18: write dK_j, dV_j once
        dV[:, j0:j1] = dVj
    dq = _unrows(dQ.mul_(scale), B, rep).to(q.dtype)  # (B, nh, Tq, hs): S = (scale Q) K^T, dQ = scale dS K
    dsinks = None
    if sinks is not None:  # -sum over rows of p_sink * D (derivation above); L >= s_h, never +inf
        p_sink = torch.exp(sinks.to(acc).view(1, nkv, 1, rep) - L.view(B, nkv, Tq, rep))  # (B, nkv, Tq, rep)
        dsinks = -(p_sink * D.view(B, nkv, Tq, rep)).sum(dim=(0, 2)).reshape(nh).to(sinks.dtype)  # (nh,)
    return dq, dK.view_as(k).to(k.dtype), dV.view_as(v).to(v.dtype), dsinks


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward keeps q, k, v, o and L (all O(T)); the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, window, soft_cap, block_q, block_k):
        o, L = flash_attn_forward(q, k, v, sinks, causal, window, soft_cap, block_q, block_k)
        ctx.save_for_backward(q, k, v, o, L, sinks)
        ctx.options = (causal, window, soft_cap, block_q, block_k)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, L, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = flash_attn_backward(do, q, k, v, o, L, sinks, *ctx.options)
        return dq, dk, dv, dsinks, None, None, None, None, None


# -----------------------------------------------------------------------------------------------
# Dispatch: the CUDA kernel when it is built and the tensors are on a GPU, else the PyTorch path.
#
# `llm_kernels` is the extension that setup.py builds from kernels.cu. The contract it must meet:
#     flash_attn_fwd(q, k, v, sinks, causal, window) -> (o, lse)
#     flash_attn_bwd(do, q, k, v, o, lse, sinks, causal, window) -> (dq, dk, dv, dsinks)
# with q (B, nh, Tq, hs), k/v (B, nkv, Tk, hs) contiguous, sinks (nh,) float32 or None, the same
# masking conventions as above, and dsinks None when sinks is None. It has no soft-cap: soft-capped
# calls take the PyTorch path, and so do fp32 inputs and head sizes other than 64 and 128 (the
# kernel's tensor-core tiles are 16-bit and its shared-memory layout is sized for those two).
# The kernel's lse is its own (B, nh, Tq) fp32 tensor, passed back to flash_attn_bwd untouched.

try:
    import llm_kernels  # type: ignore[import-not-found]
except ImportError:
    llm_kernels = None


class _CudaFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, window):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = llm_kernels.flash_attn_fwd(q, k, v, sinks, causal, window)
        ctx.save_for_backward(q, k, v, o, lse, sinks)
        ctx.options = (causal, window)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = llm_kernels.flash_attn_bwd(do.contiguous(), q, k, v, o, lse, sinks, *ctx.options)
        return dq, dk, dv, dsinks, None, None


_announced: set[str] = set()  # paths already reported, so each is printed once per process


def _announce(path: str) -> None:
    if path not in _announced:
        _announced.add(path)
        print(f"attention_flash: {path}", flush=True)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int = 0, sinks: Optional[torch.Tensor] = None, soft_cap: float = 0.0,
                    block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                    use_cuda_kernel: bool = True) -> torch.Tensor:
    """FlashAttention-2 with gpt.ATTENTION's interface: q (B, nh, Tq, hs), k and v (B, nkv, Tk, hs),
    queries bottom-right aligned, sinks (nh,) or None; returns (B, nh, Tq, hs) in q's dtype.
    Values narrower than the keys (B, nkv, Tk, hs_v < hs) are zero-padded to hs and the output cut
    back to (B, nh, Tq, hs_v): the kernels keep one head size."""
    if v.dim() == 4 and k.dim() == 4 and v.shape[:3] == k.shape[:3] and v.shape[3] < k.shape[3]:
        v_pad = torch.nn.functional.pad(v, (0, k.shape[3] - v.shape[3]))  # (B, nkv, Tk, hs)
        y = flash_attention(q, k, v_pad, causal=causal, window=window, sinks=sinks, soft_cap=soft_cap,
                            block_q=block_q, block_k=block_k, use_cuda_kernel=use_cuda_kernel)
        return y[..., :v.shape[3]]  # (B, nh, Tq, hs_v)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, nh, Tq, hs) and k, v (B, nkv, Tk, hs); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, nh, Tq, hs = q.shape
    if k.shape[0] != B or k.shape[3] != hs or nh % k.shape[1]:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)}: need the same B and hs, "
                         "and nh a multiple of nkv")
    if sinks is not None and sinks.shape != (nh,):
        raise ValueError(f"sinks must have shape ({nh},), got {tuple(sinks.shape)}")
    if block_q < 1 or block_k < 1 or window < 0 or soft_cap < 0:
        raise ValueError("block sizes must be >= 1, window and soft_cap >= 0")
    kernel_ok = (q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
                 and hs in (64, 128))
    if q.is_cuda and use_cuda_kernel and llm_kernels is not None and not soft_cap and kernel_ok:
        _announce("CUDA kernel (llm_kernels.flash_attn_fwd / flash_attn_bwd)")
        return _CudaFlashAttention.apply(q, k, v, sinks, causal, window)
    why = "no CUDA tensors" if not q.is_cuda else (
        "llm_kernels not built" if llm_kernels is None else
        "the kernel takes fp16/bf16 and hs 64 or 128 only" if not kernel_ok else
        "soft-cap or CUDA kernel disabled")
    _announce(f"PyTorch path ({why})")
    return FlashAttentionFunction.apply(q, k, v, sinks, causal, window, soft_cap, block_q, block_k)


gpt.ATTENTION["flash"] = flash_attention


# -----------------------------------------------------------------------------------------------
# Demo: validate against the float64 reference, then time and measure memory for T = 256 .. 8192.


@dataclass
class BenchConfig:
    """The `python attention_flash.py` demo / benchmark (the attention function takes plain arguments)."""

    seq_lens: str = "256,512,1024,2048,4096,8192"  # T values to benchmark (Tq = Tk = T)
    batch: int = 1  # B
    n_head: int = 4  # nh query heads
    n_kv_head: int = 4  # nkv key/value heads (nh = nkv: plain multi-head attention, like SDPA's)
    head_size: int = 64  # hs
    causal: bool = True
    dtype: str = "float32"  # float32 | bfloat16 | float16 (inputs; accumulation is always fp32)
    block_q: int = BLOCK_Q  # Br of the PyTorch flash path
    block_k: int = BLOCK_K  # Bc of the PyTorch flash path
    repeats: int = 3  # timed repetitions (the minimum is reported) for T <= 2048; 1 above
    impls: str = "naive,flash,sdpa"  # which kernels to time (+ cuda when the extension is built)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    seed: int = 0


def validate(device: torch.device, seed: int = 0) -> list[dict]:
    """Max |error| of flash (fp32 inputs) vs float64 naive attention, forward and every gradient,
    on shapes that exercise GQA, MQA, sinks, windows, soft-cap and ragged blocks. Raises on failure."""
    cases = [dict(T=300, nh=4, nkv=2, causal=True, window=0, sinks=True, soft_cap=0.0),
             dict(T=300, nh=4, nkv=1, causal=True, window=64, sinks=False, soft_cap=0.0),
             dict(T=300, nh=4, nkv=4, causal=False, window=0, sinks=True, soft_cap=30.0)]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in cases:
        B, hs = 2, 32
        q = torch.randn(B, c["nh"], c["T"], hs, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, c["nkv"], c["T"], hs, generator=g, dtype=torch.float64) for _ in range(2))
        s = torch.randn(c["nh"], generator=g, dtype=torch.float64) if c["sinks"] else None
        do = torch.randn(B, c["nh"], c["T"], hs, generator=g, dtype=torch.float64)
        kw = dict(causal=c["causal"], window=c["window"], soft_cap=c["soft_cap"])
        errs = {}
        for name, fn, dt in (("ref", gpt.naive_attention, torch.float64),
                             ("flash", flash_attention, torch.float32)):
            xs = [t.detach().to(device, dt).requires_grad_() for t in (q, k, v)]
            sk = s.detach().to(device, dt).requires_grad_() if s is not None else None
            out = fn(*xs, sinks=sk, **kw, **({"block_q": 128, "block_k": 96} if name == "flash" else {}))
            out.backward(do.to(device, dt))
            errs[name] = [out] + [t.grad for t in xs] + ([sk.grad] if sk is not None else [])
        err = max((a.double() - b).abs().max().item() for a, b in zip(errs["flash"], errs["ref"]))
        rows.append(dict(c, max_err=err))
        if not err < 1e-4:
            raise RuntimeError(f"flash attention disagrees with the float64 reference: {c}, "
                               f"max error {err:.2e}")
    return rows


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))  # kB


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter and return the memory in use now (the baseline).
    CPU: writing 5 to /proc/self/clear_refs resets the kernel's peak resident set size (VmHWM,
    Linux >= 4.0), so the later VmHWM is the peak of this call alone, not of the torch import."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS")


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_bytes("VmHWM")


def _measure(impl: str, T: int, bc: BenchConfig, device_name: str, queue) -> None:
    """One (kernel, T) measurement, run in a fresh process, with its own heap and allocator caches.

    Memory: the peak resident set size during the call (Linux VmHWM, reset just before it; on CUDA
    the allocator's peak) minus the memory in use just before it, with the inputs and the output
    gradient already allocated and the kernel warmed up once at the same T (so lazy initialisation
    and the allocator's first growth are not counted twice). It counts everything the call holds at
    its worst moment: scores, probabilities, saved activations, gradients. A fresh process per
    measurement keeps one kernel's cached blocks from hiding another's. Time: the minimum over
    bc.repeats runs (1 for T > 2048)."""
    device = torch.device(device_name)
    torch.manual_seed(bc.seed)
    dtype = getattr(torch, bc.dtype)
    fn = {"naive": gpt.naive_attention, "sdpa": gpt.sdpa_attention,
          "flash": lambda *a, **kw: flash_attention(*a, **kw, block_q=bc.block_q, block_k=bc.block_k,
                                                    use_cuda_kernel=False),
          "cuda": lambda *a, **kw: flash_attention(*a, **kw)}[impl]
    _announced.add("PyTorch path (no CUDA tensors)")  # keep the worker's output to the JSON line

    def inputs(t):
        q = torch.randn(bc.batch, bc.n_head, t, bc.head_size, device=device, dtype=dtype)
        kv_shape = (bc.batch, bc.n_kv_head, t, bc.head_size)
        k, v = (torch.randn(kv_shape, device=device, dtype=dtype) for _ in range(2))
        return q, k, v, torch.randn_like(q)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(xs, do, backward):
        if not backward:
            with torch.no_grad():
                fn(*xs, causal=bc.causal)
        else:
            xs = [x.requires_grad_() for x in xs]
            fn(*xs, causal=bc.causal).backward(do)
            for x in xs:
                x.grad = None
        sync()

    q, k, v, do = inputs(T)
    res = dict(impl=impl, T=T)
    for backward in (False, True):
        run((q.detach(), k.detach(), v.detach()), do, backward)  # warm-up
        sync()
        before = _reset_peak(device)
        run((q.detach(), k.detach(), v.detach()), do, backward)
        res["mem_fwdbwd" if backward else "mem_fwd"] = max(_peak(device) - before, 0)
    for backward in (False, True):
        times = []
        for _ in range(bc.repeats if T <= 2048 else 1):  # already warm
            t0 = time.perf_counter()
            run((q.detach(), k.detach(), v.detach()), do, backward)
            times.append(time.perf_counter() - t0)
        res["ms_fwdbwd" if backward else "ms_fwd"] = 1e3 * min(times)
    queue.put(res)


def measure(impl: str, T: int, bc: BenchConfig, device: torch.device) -> dict:
    # A fresh interpreter and allocator. glibc keeps freed heap memory resident and raises its mmap
    # threshold after big frees, which would hide a second call's allocations from the RSS peak; a
    # fixed 64 KiB threshold makes every large tensor its own mapping, returned to the OS when freed.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_measure, args=(impl, T, bc, str(device), queue))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"measuring {impl} at T={T} failed (exit code {p.exitcode})")
    return queue.get()


def plot(results: list[dict], bc: BenchConfig, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in results):
        rs = [r for r in results if r["impl"] == impl]
        Ts = [r["T"] for r in rs]
        line, = ax_t.plot(Ts, [r["ms_fwdbwd"] for r in rs], "o-", label=f"{impl} fwd+bwd")
        c = line.get_color()
        ax_t.plot(Ts, [r["ms_fwd"] for r in rs], "s--", color=c, alpha=0.6, label=f"{impl} fwd")
        ax_m.plot(Ts, [r["mem_fwdbwd"] / 2**20 for r in rs], "o-", color=c, label=f"{impl} fwd+bwd")
        ax_m.plot(Ts, [max(r["mem_fwd"] / 2**20, 0.1) for r in rs], "s--", color=line.get_color(), alpha=0.6,
                  label=f"{impl} fwd")  # floor 0.1 MiB: below that the RSS page counting is noise
    for ax, ylabel in ((ax_t, "time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    mode = "causal" if bc.causal else "full"
    fig.suptitle(f"attention, B={bc.batch} nh={bc.n_head} hs={bc.head_size} {mode} {bc.dtype}; "
                 f"flash tiles {bc.block_q}x{bc.block_k}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str]) -> BenchConfig:
    return gpt.config_from_args(BenchConfig, argv)

def main(argv: list[str]) -> None:
    try:
        bc = parse_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(bc.seed)
    device = torch.device("cuda" if bc.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if bc.device == "auto" else bc.device))
    print(f"validating flash (fp32) against float64 naive attention on {device} ...")
    for r in validate(device, bc.seed):
        print(f"  T={r['T']} nh={r['nh']} nkv={r['nkv']} causal={r['causal']} window={r['window']} "
              f"sinks={r['sinks']} soft_cap={r['soft_cap']}: max |error| (output and grads) "
              f"{r['max_err']:.1e}")
    impls = bc.impls.split(",")
    if device.type == "cuda" and llm_kernels is not None and "cuda" not in impls:
        impls.append("cuda")
    print(f"benchmark on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"flash = PyTorch path, tiles {bc.block_q} x {bc.block_k}")
    results = []
    for T in [int(t) for t in bc.seq_lens.split(",")]:
        for impl in impls:
            r = measure(impl, T, bc, device)
            results.append(r)
            print(f"  T={T:5d} {impl:5s}: fwd {r['ms_fwd']:9.1f} ms, fwd+bwd {r['ms_fwdbwd']:9.1f} ms, "
                  f"extra memory fwd {r['mem_fwd'] / 2**20:8.1f} MiB, "
                  f"fwd+bwd {r['mem_fwdbwd'] / 2**20:8.1f} MiB",
                  flush=True)
    print("\n| T | kernel | fwd ms | fwd+bwd ms | fwd+bwd / sdpa | extra MiB fwd | extra MiB fwd+bwd | "
          "mem / naive |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        by = {x["impl"]: x for x in results if x["T"] == r["T"]}
        ratio_t = f"{r['ms_fwdbwd'] / by['sdpa']['ms_fwdbwd']:.2f}x" if "sdpa" in by else "-"
        ratio_m = f"{r['mem_fwdbwd'] / max(by['naive']['mem_fwdbwd'], 1):.3f}" if "naive" in by else "-"
        print(f"| {r['T']} | {r['impl']} | {r['ms_fwd']:.1f} | {r['ms_fwdbwd']:.1f} | {ratio_t} | "
              f"{r['mem_fwd'] / 2**20:.1f} | {r['mem_fwdbwd'] / 2**20:.1f} | {ratio_m} |")
    path = ROOT / "assets" / "attention_flash_bench.png"
    plot(results, bc, path)
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "attention_flash_bench.json").write_text(json.dumps(
        dict(config=dataclasses.asdict(bc), device=str(device), torch=torch.__version__, results=results),
        indent=1))
    print(f"\nsaved {path.relative_to(ROOT)} and out/attention_flash_bench.json")


if __name__ == "__main__":
    main(sys.argv[1:])
