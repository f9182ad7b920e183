"""
mla.py - multi-head latent attention (DeepSeek-V2/V3, Kimi K2) and the arithmetic of the KV cache.

While decoding, a transformer keeps every past token's keys and values: 2 * nkv * hs numbers per
token and layer, which at long context outweighs the model itself. Multi-head latent attention (MLA)
caches one small latent vector per token instead (d_c numbers, plus a d_r-wide rotary key) and
rebuilds every head's key and value from it; at inference the rebuilding matrices are folded into the
query and the output projection, so the keys and values are never materialised at all.

References
- DeepSeek-V2, arXiv:2405.04434: sec. 2.1.2 low-rank key-value joint compression (eqs. 9-11) and
  its absorption at inference, query compression (eqs. 12-13); sec. 2.1.3 decoupled RoPE (eqs.
  14-19) and why plain RoPE breaks the absorption; sec. 2.1.4 Table 1 (KV cache per token of MHA,
  GQA, MQA, MLA); sec. 3.1.2 RMSNorm after the latent vectors, 60 layers, n_h = d_h = 128,
  d_c = 512, d_c' = 1536, d_h^R = 64; sec. 3.2.3 the 6-bit KV cache behind "93.3% less KV cache".
- DeepSeek-V3, arXiv:2412.19437: sec. 2.1.1 the same MLA written as eqs. 1-11 (the equation numbers
  cited below); sec. 4.2 its sizes (61 layers, the V2 dimensions).
- DeepSeek-V3 inference code (github.com/deepseek-ai/DeepSeek-V3, inference/model.py, class MLA): the
  parameter names below (wq / wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo) and its "absorb" path.
- Kimi K2, arXiv:2507.20534: DeepSeek-V3's MLA with 64 heads instead of 128 (sec. 2, Table 2), and
  why QK-norm cannot be used with MLA (sec. 2.1, the reason for MuonClip).
- MQA: Shazeer 2019, arXiv:1911.02150. GQA: Ainslie et al. 2023, arXiv:2305.13245.

Run it
    python mla.py                   # MHA, GQA, MQA, MLA on TinyStories, decode speed, cache tables
    python mla.py --num_threads=1   # the same on a machine other jobs keep busy (threads would wait)
    python mla.py --max_iters=60 --decode_lengths=1024 --out_dir=out/mla_quick   # a quick look
    python mla.py table             # the KV-cache arithmetic for real models only (instant)
    python gpt.py --attention=mla --kv_lora_rank=48 --qk_rope_head_dim=16   # gpt.py's training, MLA
    python gpt.py --sample --ckpt=out/ckpt.pt                                  # samples via the latent cache

Not covered: MuonClip for MLA (Kimi K2 clips the per-head q^C/k^C and q^R, not the shared k^R),
quantised latent caches (V2's 6-bit cache enters the arithmetic only), FlashMLA's paged kernel,
YaRN long-context scaling of the rotary part, converting real DeepSeek weights, multi-token prediction.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import gpt

# -----------------------------------------------------------------------------------------------
# The configuration MLA needs. Symbols as in DeepSeek-V2/V3: d_c the KV latent, d_c' the query
# latent, d_h the per-head "content" width of queries and keys, d_h^R (here d_r) the rotary width.


@dataclass
class MLAConfig(gpt.GPTConfig):
    """A GPTConfig whose attention layers are MLA: gpt.GPT(MLAConfig(...)) builds the MLA model."""

    attention: str = "mla"  # the ATTENTION_LAYERS entry this file registers
    n_kv_head: int = 0  # MLA rebuilds a key and a value for every query head: nkv = nh (leave it 0)
    kv_lora_rank: int = 48  # d_c: the latent each token caches per layer (DeepSeek-V2/V3, Kimi K2: 512)
    qk_rope_head_dim: int = 16  # d_r: rotary width of each query head and of the one shared rotary
    #                             key, also cached (V2/V3: 64 = d_h / 2). Even: RoPE rotates pairs
    q_lora_rank: int = 0  # d_c': queries through a latent of their own (V2/V3: 1536); 0 = from x
    qk_nope_head_dim: int = 0  # d_h: position-free width of a query/key head; 0 = head_size (V3: 128)
    v_head_dim: int = 0  # value width of a head; 0 = head_size (V3: 128)
    mla_cache: str = "latent"  # what decoding caches: latent (the absorbed path) | expanded (K, V)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"MLAConfig: {msg}")

        need(self.attention == "mla", f"attention must be 'mla' in an MLAConfig, got {self.attention!r}")
        need(self.kv_lora_rank > 0, f"kv_lora_rank (d_c) must be positive, got {self.kv_lora_rank}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim (d_r) must be positive and even (RoPE rotates pairs of channels), "
             f"got {self.qk_rope_head_dim}")
        need(min(self.q_lora_rank, self.qk_nope_head_dim, self.v_head_dim) >= 0,
             "q_lora_rank, qk_nope_head_dim and v_head_dim must be >= 0 (0 = the default)")
        need(self.pos_emb == "rope", "MLA carries positions in its decoupled rotary part: use pos_emb=rope")
        need(not self.qk_norm, "qk_norm normalises whole keys, which MLA's absorbed path never builds "
             "(the reason Kimi K2 clips logits with MuonClip instead): drop qk_norm")
        need(not self.bias, "MLA has no biases (DeepSeek-V2/V3 have none): use bias=false")
        need(self.mla_cache in ("latent", "expanded"),
             f"mla_cache must be latent or expanded, not {self.mla_cache!r}")
        super().__post_init__()
        need(self.n_kv_head == self.n_head, f"n_kv_head={self.n_kv_head} does not apply to MLA, whose "
             f"keys and values are rebuilt per query head: leave it 0 (= n_head={self.n_head})")
        self.qk_nope_head_dim = self.qk_nope_head_dim or self.head_size
        self.v_head_dim = self.v_head_dim or self.head_size

    @property
    def rope_dim(self) -> int:  # gpt.GPT builds the RoPE angles for this many channels
        return self.qk_rope_head_dim


# -----------------------------------------------------------------------------------------------
# The idea, in three steps (shapes per token; nh heads, d_h = qk_nope_head_dim, d_v = v_head_dim).
#
# 1. Low-rank joint compression (V3 eqs. 1, 2, 5). Instead of K = W^K h and V = W^V h (nh*d_h each),
#        c = RMSNorm(W^DKV h)                (d_c,)  the only thing that must be remembered
#        k^C_i = W^UK_i c,  v_i = W^UV_i c   (d_h,) and (d_v,) for each head i, rebuilt on demand.
#    The RMSNorm on c is in DeepSeek's code and V2 sec. 3.1.2 (it keeps the narrow latent's scale stable).
#
# 2. Absorption. The rebuilding matrices are linear and the same for every position, so they can move
#    to the other side of the dot products:
#        q^C_i . k^C_{j,i} = q^C_i . (W^UK_i c_j) = (W^UK_i^T q^C_i) . c_j
#        sum_j p_ij v_{j,i} = W^UV_i (sum_j p_ij c_j)
#    Each head's query is mapped into latent space once (d_h -> d_c), its scores are taken directly
#    against the cached latents, the probability-weighted sum of latents is taken, and only then
#    W^UV_i maps that one vector up (W^O follows). A decoding step then reads d_c + d_r numbers per
#    cached token for all heads together, where an expanded cache holds nh (d_h + d_r + d_v), and a
#    latent cache without absorption would rebuild every cached key and value at every step.
#
# 3. Decoupled RoPE (V2 sec. 2.1.3; V3 eqs. 3, 8). RoPE rotates keys by their position, k_j = R_j W^UK c_j,
#    and then q_i . k_j = (W^UK^T R_j^T q_i) . c_j: a rotation that depends on the *key's* position
#    sits between the query and W^UK. There is no single matrix to absorb any more: one would have
#    to rotate and rebuild every cached key at every step, the very cost absorption removed. So MLA
#    keeps RoPE out of the compressed part altogether and adds a small separate rotary part:
#        k^R = RoPE(W^KR h)       (d_r,) ONE rotary key per token, shared by all heads (as in MQA),
#                                        cached next to c
#        q^R_i = RoPE(W^QR_i c^Q) (d_r,) per head
#        score_ij = (q^C_i . k^C_j + q^R_i . k^R_j) / sqrt(d_h + d_r)     (V3 eq. 10)
#    The first term carries no position and absorbs W^UK; positions enter only through the second.
#    The cache per token and layer is d_c + d_r numbers, whatever the number of heads (V2 Table 1).
#
# In kernel terms the absorbed path is multi-query attention with one "head" of width d_c + d_r:
# query [W^UK^T q^C; q^R], key [c; k^R], value c (the key's first d_c channels). That is what lets
# it run on gpt.py's attention kernels, and why decoding is one (nh x (d_c+d_r)) @ ((d_c+d_r) x T)
# matrix product per sequence: all heads read the same cached latents (FlashMLA's layout too).


def expand_kv(c: torch.Tensor, k_rope: torch.Tensor, w_ukv: torch.Tensor, d_nope: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training path's keys and values from the latents c (B, T, d_c) and the rotary key
    k_rope (B, T, d_r), with w_ukv (nh, d_h + d_v, d_c) = per head [W^UK_i; W^UV_i].
    Returns k (B, nh, T, d_h + d_r) = [W^UK_i c; k^R] (V3 eqs. 2, 4) and v (B, nh, T, d_v) (eq. 5)."""
    B, T, d_r = k_rope.shape
    nh = w_ukv.shape[0]
    kv = torch.einsum("btc,hdc->bhtd", c, w_ukv)  # (B, nh, T, d_h + d_v)
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]
    k = torch.cat([k_nope, k_rope[:, None].expand(B, nh, T, d_r)], dim=-1)  # (B, nh, T, d_h + d_r)
    return k, v


def absorb_query(q_nope: torch.Tensor, q_rope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """The absorbed query [W^UK_i^T q^C_i; q^R_i] (B, nh, T, d_c + d_r) from q_nope (B, nh, T, d_h),
    q_rope (B, nh, T, d_r) and w_uk (nh, d_h, d_c), scaled so that a kernel's 1/sqrt(d_c + d_r)
    becomes the 1/sqrt(d_h + d_r) of V3 eq. 10 (the scores must not change)."""
    d_h, d_c, d_r = q_nope.shape[-1], w_uk.shape[-1], q_rope.shape[-1]
    q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, nh, T, d_c): W^UK moved into the query
    return torch.cat([q_lat, q_rope], dim=-1) * math.sqrt((d_c + d_r) / (d_h + d_r))


def latent_attention(q_abs: torch.Tensor, kv: torch.Tensor, d_c: int, kernel, *, causal: bool = True,
                     window: int = 0, sinks: Optional[torch.Tensor] = None, soft_cap: float = 0.0
                     ) -> torch.Tensor:
    """Attention of absorbed queries q_abs (B, nh, Tq, d_c + d_r) over cached rows kv (B, Tk, d_c + d_r)
    = [c; k^R] with value c, through a gpt.ATTENTION kernel. Returns the latent outputs
    sum_j p_ij c_j: (B, nh, Tq, d_c)."""
    B, nh, Tq, D = q_abs.shape
    k = kv[:, None]  # (B, 1, Tk, d_c + d_r): one key "head" shared by all nh query heads
    # The value is the latent c, the key's first d_c channels. We pass the whole key as the value and
    # drop the last d_r output channels: no copy, and kernels that want one head size for k and v
    # (SDPA's fast CPU path, FlashAttention) take it as it is.
    if Tq == 1 and not causal and not window and sinks is None:
        # One new token, every cached row visible: put the heads where the queries go, so the kernel
        # computes one (nh, D) @ (D, Tk) product instead of broadcasting the latents to nh heads
        # (SDPA's enable_gqa copies k and v nh times on the CPU).
        y = kernel(q_abs.transpose(1, 2), k, k, causal=False, soft_cap=soft_cap)  # (B, 1, nh, D)
        return y.transpose(1, 2)[..., :d_c]  # (B, nh, 1, d_c)
    y = kernel(q_abs, k, k, causal=causal, window=window, sinks=sinks, soft_cap=soft_cap)  # (B, nh, Tq, D)
    return y[..., :d_c]


# -----------------------------------------------------------------------------------------------
# The caches, and the attention layer.


class MLACache:
    """The decoding cache of an MLA model: per layer, either the latent rows [c; k^R] (B, S, d_c + d_r)
    (latent=True, the absorbed path) or every head's expanded K (B, nh, S, d_h + d_r) and V
    (B, nh, S, d_v) (latent=False, the cost MLA avoids). The latent and rotary key share one buffer so
    that the kernel reads them without a copy. The bookkeeping is gpt.KVCache's, with any tensors:
    S = max_len slots, or a ring of W + spare slots with a sliding window W; the prompt goes in whole,
    then chunks of one token or (speculative decoding's drafts) several, and truncate(n) rolls back."""

    def __init__(self, cfg: MLAConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 latent: bool = True, spare: int = 0):
        if spare < 0:
            raise ValueError(f"MLACache: spare must be >= 0, got {spare}")
        self.latent, self.window, self.spare = latent, cfg.window, spare
        self.size = cfg.window + spare if cfg.window else max_len
        d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        shapes = ({"kv": (-1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)} if latent else
                  {"k": (cfg.n_head, -1, d_qk), "v": (cfg.n_head, -1, cfg.v_head_dim)})  # -1: positions
        self.dim = {name: 1 + s.index(-1) for name, s in shapes.items()}  # position axis of (B, ...)
        self.buf = {name: torch.zeros(cfg.n_layer, batch_size, *(self.size if d == -1 else d for d in s),
                                      device=device, dtype=dtype) for name, s in shapes.items()}
        self.pos = 0  # tokens seen so far = position of the next token (gpt.GPT.forward advances it)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buf.values())

    def update(self, layer: int, **new: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """Store this chunk's tensors (positions on the axis `dim`); return what to attend to and
        whether the kernel must still apply the causal/window mask (prompt, chunks) or not (one token)."""
        name0 = next(iter(new))
        T = new[name0].shape[self.dim[name0]]
        device = new[name0].device
        if self.pos == 0:  # the prompt: attend within the chunk with the usual mask, keep its tail
            n = min(T, self.size)
            slots = torch.arange(T - n, T, device=device) % self.size
            for name, x in new.items():
                d = self.dim[name]
                self.buf[name][layer].index_copy_(d, slots, x.narrow(d, T - n, n).to(self.buf[name].dtype))
            return new, True
        out = {}
        if not self.window:
            if self.pos + T > self.size:
                raise ValueError(f"MLACache is full ({self.size} positions): start a new one")
            for name, x in new.items():
                d = self.dim[name]
                self.buf[name][layer].narrow(d, self.pos, T).copy_(x)
                out[name] = self.buf[name][layer].narrow(d, 0, self.pos + T)  # queries = the last T rows
            return out, T > 1
        if T > self.spare + 1:
            raise ValueError(f"MLACache: a chunk of {T} tokens after the prompt needs a ring with spare >= "
                             f"{T - 1} extra slots (this one has spare={self.spare})")
        slots = torch.arange(self.pos, self.pos + T, device=device) % self.size
        for name, x in new.items():
            self.buf[name][layer].index_copy_(self.dim[name], slots, x.to(self.buf[name].dtype))
        if T == 1 and not self.spare:  # the plain ring: every stored row is in the past and the window
            n = min(self.pos + 1, self.size)
            return {name: b[layer].narrow(self.dim[name], 0, n) for name, b in self.buf.items()}, False
        # positions pos - W + 1 .. pos + T - 1, in order, so the usual causal + window mask applies
        first = max(0, self.pos - self.window + 1)
        order = torch.arange(first, self.pos + T, device=device) % self.size
        return {name: b[layer].index_select(self.dim[name], order) for name, b in self.buf.items()}, T > 1

    def truncate(self, n: int) -> None:
        """Forget positions n, n+1, ... (a rejected draft): the next token fed is position n."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"MLACache.truncate({n}): can keep 0 to {self.pos} positions (those seen)")
        if self.window and self.pos - n > self.spare:
            raise ValueError(f"MLACache.truncate: rolling a sliding-window ring back {self.pos - n} "
                             f"positions needs spare >= {self.pos - n} (this one has spare={self.spare})")
        self.pos = n


class MLA(nn.Module):
    """Multi-head latent attention with decoupled RoPE, optional query compression, and two paths:
    expanded K and V (training, and decoding with an expanded cache) and absorbed (latent cache)."""

    def __init__(self, cfg: MLAConfig, layer: int = 0):
        super().__init__()
        if not isinstance(cfg, MLAConfig):
            raise ValueError("attention='mla' needs the MLA options: build the model from an mla.MLAConfig "
                             "(`python gpt.py --attention=mla` does that for you)")
        self.cfg, self.layer = cfg, layer
        C, nh = cfg.n_embd, cfg.n_head
        d_h, d_r, d_v, d_c, d_q = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                   cfg.kv_lora_rank, cfg.q_lora_rank)
        if d_q:  # query compression (V3 eqs. 6-8): saves activation memory in training, not cache
            self.wq_a = nn.Linear(C, d_q, bias=False)  # W^DQ
            self.q_norm = gpt.make_norm(cfg, d_q)
            self.wq_b = nn.Linear(d_q, nh * (d_h + d_r), bias=False)  # per head [W^UQ_i; W^QR_i]
        else:
            self.wq = nn.Linear(C, nh * (d_h + d_r), bias=False)
        self.wkv_a = nn.Linear(C, d_c + d_r, bias=False)  # [W^DKV; W^KR] (eqs. 1, 3)
        self.kv_norm = gpt.make_norm(cfg, d_c)
        self.wkv_b = nn.Linear(d_c, nh * (d_h + d_v), bias=False)  # per head [W^UK_i; W^UV_i] (eqs. 2, 5)
        self.wo = nn.Linear(nh * d_v, C, bias=False)  # W^O (eq. 11)
        if cfg.sinks:
            self.sinks = nn.Parameter(torch.zeros(nh))  # (nh,) one learned logit per head
        self.dropout = nn.Dropout(cfg.dropout)

    def project(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> q_nope (B, nh, T, d_h), q_rope (B, nh, T, d_r), the normalised latent
        c (B, T, d_c) and the rotary key k_rope (B, T, d_r). Only the *_rope tensors see positions."""
        B, T, C = x.shape
        cfg = self.cfg
        nh, d_h, d_r, d_c = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)  # (B, T, nh*(d_h+d_r))
        q = q.view(B, T, nh, d_h + d_r)
        q_nope = q[..., :d_h].transpose(1, 2)  # (B, nh, T, d_h)
        q_rope = gpt.apply_rope(q[..., d_h:].contiguous(), *rope).transpose(1, 2)  # (B, nh, T, d_r)
        ckr = self.wkv_a(x)  # (B, T, d_c + d_r)
        c = self.kv_norm(ckr[..., :d_c])  # (B, T, d_c)
        k_rope = gpt.apply_rope(ckr[..., None, d_c:].contiguous(), *rope)[:, :, 0]  # (B, T, d_r)
        return q_nope, q_rope, c, k_rope

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                   spare: int = 0) -> MLACache:
        return MLACache(self.cfg, batch_size, max_len, device, dtype, latent=self.cfg.mla_cache == "latent",
                        spare=spare)

    def forward(self, x: torch.Tensor, rope: tuple, cache: Optional[MLACache] = None) -> torch.Tensor:
        B, T, C = x.shape
        cfg = self.cfg
        nh, d_h, d_v, d_c = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        kernel = gpt.plugin("attn_impl", cfg.attn_impl)  # imports attention_flash.py if asked for
        sinks = getattr(self, "sinks", None)
        q_nope, q_rope, c, k_rope = self.project(x, rope)
        w_ukv = self.wkv_b.weight.view(nh, d_h + d_v, d_c)  # (nh, d_h + d_v, d_c)
        masked = True
        if cache is not None and cache.latent:  # absorbed: K and V are never built
            kv = torch.cat([c, k_rope], dim=-1)  # (B, T, d_c + d_r): what this token leaves behind
            kv, masked = cache.update(self.layer, kv=kv)
            q = absorb_query(q_nope, q_rope, w_ukv[:, :d_h])  # (B, nh, T, d_c + d_r)
            o = latent_attention(q, kv["kv"], d_c, kernel, causal=masked, window=cfg.window if masked else 0,
                                 sinks=sinks, soft_cap=cfg.attn_soft_cap)  # (B, nh, T, d_c)
            y = torch.einsum("bhtc,hdc->bthd", o, w_ukv[:, d_h:])  # (B, T, nh, d_v): W^UV after the sum
        else:  # expanded: every head's key and value, through any attention kernel
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, nh, T, d_h + d_r) (eq. 9)
            k, v = expand_kv(c, k_rope, w_ukv, d_h)  # (B, nh, T, d_h + d_r), (B, nh, T, d_v)
            if cache is not None:
                kv, masked = cache.update(self.layer, k=k, v=v)
                k, v = kv["k"], kv["v"]
            y = kernel(q, k, v, causal=masked, window=cfg.window if masked else 0, sinks=sinks,
                       soft_cap=cfg.attn_soft_cap).transpose(1, 2)  # (B, T, nh, d_v)
        return self.dropout(self.wo(y.reshape(B, T, nh * d_v)))


@torch.no_grad()
def expand_latent_cache(model: gpt.GPT, cache: MLACache) -> MLACache:
    """The expanded cache (every head's K and V) that holds what a latent cache holds: K and V are
    functions of the latent rows, which is the whole point."""
    cfg = model.cfg
    first = cache.buf["kv"]
    out = MLACache(cfg, first.shape[1], cache.size, first.device, first.dtype, latent=False,
                   spare=cache.spare)
    out.pos = cache.pos
    d_h, d_c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    for i, block in enumerate(model.layers):
        kv = cache.buf["kv"][i]  # (B, S, d_c + d_r)
        w_ukv = block.attention.wkv_b.weight.view(cfg.n_head, d_h + cfg.v_head_dim, d_c)
        k, v = expand_kv(kv[..., :d_c], kv[..., d_c:], w_ukv, d_h)  # (B, nh, S, d_h + d_r), (B, nh, S, d_v)
        out.buf["k"][i].copy_(k)
        out.buf["v"][i].copy_(v)
    return out


gpt.ATTENTION_LAYERS["mla"] = MLA
gpt.CONFIG_CLASSES["mla"] = MLAConfig  # `python gpt.py --attention=mla --kv_lora_rank=32` knows these


# -----------------------------------------------------------------------------------------------
# KV-cache arithmetic. Per token and layer an attention layer caches
#     MHA / GQA / MQA: nkv * (hs_k + hs_v) numbers     (nkv = nh, a divisor of nh, or 1)
#     MLA:             d_c + d_r                         (whatever nh is)
# A layer with a sliding window W holds at most W tokens (plus any StreamingLLM sink tokens); a
# gpt-oss style learned sink is a logit, not a token, and costs nothing.


@dataclass(frozen=True)
class CacheSpec:
    """What one model caches: enough for the arithmetic, with where the numbers come from."""

    name: str
    kind: str  # a label: MHA, GQA, MQA, MLA, ...
    n_layer: int
    n_kv_head: int = 0  # K/V heads of an MHA/GQA/MQA layer
    head_dim: int = 0  # key width per K/V head
    v_head_dim: int = 0  # value width per K/V head; 0 = head_dim
    kv_lora_rank: int = 0  # MLA d_c; > 0 means the layer caches the latent instead of K and V
    rope_dim: int = 0  # MLA d_r, the shared rotary key cached beside the latent
    window: int = 0  # sliding window of the windowed layers; 0 = none
    windowed_layers: int = -1  # how many layers use the window; -1 = all of them
    sink_tokens: int = 0  # first tokens kept besides the window (StreamingLLM)
    context: int = 0  # context length the model was trained for
    source: str = ""

    def per_token_layer(self) -> int:
        """Numbers cached per token in one (unwindowed) layer."""
        if self.kv_lora_rank:
            return self.kv_lora_rank + self.rope_dim
        return self.n_kv_head * (self.head_dim + (self.v_head_dim or self.head_dim))


def kv_cache_bytes(spec: CacheSpec, context: int, batch_size: int = 1, bits: float = 16) -> float:
    """Bytes of KV cache for batch_size sequences of `context` tokens, at `bits` per cached number
    (16 = bf16/fp16, 32 = fp32, 8 = fp8, 6 = DeepSeek-V2's quantised cache). Divide by context for
    bytes per token."""
    n_win = (spec.n_layer if spec.windowed_layers < 0 else spec.windowed_layers) if spec.window else 0
    held = min(context, spec.window + spec.sink_tokens) if spec.window else context
    tokens = (spec.n_layer - n_win) * context + n_win * held  # token-layers held
    return tokens * spec.per_token_layer() * batch_size * bits / 8


def spec_from_config(cfg: gpt.GPTConfig) -> CacheSpec:
    """The CacheSpec of one of our models, as its make_cache() would fill it."""
    if isinstance(cfg, MLAConfig):
        if cfg.mla_cache == "latent":
            return CacheSpec("ours", "MLA", cfg.n_layer, kv_lora_rank=cfg.kv_lora_rank,
                             rope_dim=cfg.qk_rope_head_dim, window=cfg.window)
        return CacheSpec("ours", "MLA, expanded", cfg.n_layer, n_kv_head=cfg.n_head, window=cfg.window,
                         head_dim=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim)
    kind = "MHA" if cfg.n_kv_head == cfg.n_head else "MQA" if cfg.n_kv_head == 1 else "GQA"
    return CacheSpec("ours", kind, cfg.n_layer, n_kv_head=cfg.n_kv_head, head_dim=cfg.head_size,
                     window=cfg.window)


LLAMA1 = "LLaMA arXiv:2302.13971 Table 2; Llama 2 arXiv:2307.09288 sec. 2.2 (GQA only for 34B, 70B)"
LLAMA3 = ("Llama 3 arXiv:2407.21783 Table 3 (8 KV heads of 128); 8K context as first released "
          "(Llama 3.1, the same architecture: 128K)")
DSV3 = ("DeepSeek-V3 arXiv:2412.19437 sec. 4.2: 61 layers, n_h = 128, d_h = 128, d_c = 512, d_h^R = 64; "
        "config.json kv_lora_rank 512, qk_rope_head_dim 64")
REAL_MODELS: list[CacheSpec] = [
    CacheSpec("Llama-2-7B", "MHA", 32, n_kv_head=32, head_dim=128, context=4096, source=LLAMA1),
    CacheSpec("Llama-3-8B", "GQA", 32, n_kv_head=8, head_dim=128, context=8192, source=LLAMA3),
    CacheSpec("Llama-3-70B", "GQA", 80, n_kv_head=8, head_dim=128, context=8192, source=LLAMA3),
    CacheSpec("Mistral-7B v0.1", "GQA + SWA 4096", 32, n_kv_head=8, head_dim=128, window=4096, context=8192,
              source="Mistral 7B arXiv:2310.06825 Table 1 (rolling buffer cache of W = 4096, sec. 2)"),
    CacheSpec("gpt-oss-120b", "GQA, window 128 every other layer", 36, n_kv_head=8, head_dim=64,
              window=128, windowed_layers=18, context=131072,
              source="gpt-oss model card arXiv:2508.10925 sec. 2 (36 layers, 64 query heads of 64, 8 KV "
                     "heads, banded window of 128 alternating with dense); its sinks are logits"),
    CacheSpec("DeepSeek-V3", "MLA", 61, kv_lora_rank=512, rope_dim=64, context=131072, source=DSV3),
    CacheSpec("DeepSeek-V3, expanded", "MLA without absorption", 61, n_kv_head=128, head_dim=192,
              v_head_dim=128, context=131072, source=DSV3 + "; K = 128 + 64, V = 128 per head"),
    CacheSpec("Kimi K2", "MLA", 61, kv_lora_rank=512, rope_dim=64, context=131072,
              source="Kimi K2 arXiv:2507.20534 Table 2 (DeepSeek-V3's MLA, 64 heads); config.json "
                     "kv_lora_rank 512, qk_rope_head_dim 64, num_hidden_layers 61"),
    CacheSpec("SmolLM2-135M", "GQA", 30, n_kv_head=3, head_dim=64, context=8192,
              source="HuggingFaceTB/SmolLM2-135M config.json (30 layers, 9 heads, 3 KV heads, C = 576); "
                     "the same in the bundled GGUF's metadata"),
]


def smollm2_spec_from_gguf(path: Path) -> CacheSpec:
    """SmolLM2's CacheSpec read from a GGUF file's llama.* metadata (checks the cited numbers)."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields

    def get(key: str) -> int:
        f = fields[f"llama.{key}"]
        return int(f.parts[f.data[0]][0])

    heads, dim = get("attention.head_count"), get("embedding_length")
    return CacheSpec("SmolLM2-135M", "GQA", get("block_count"), n_kv_head=get("attention.head_count_kv"),
                     head_dim=dim // heads, context=get("context_length"), source=REAL_MODELS[-1].source)


def deepseek_v2_table1(n_h: int = 128, d_h: int = 128, n_layer: int = 60, n_g: int = 8) -> list[tuple]:
    """DeepSeek-V2 Table 1 with V2's own sizes (sec. 3.1.2; d_c = 4 d_h, d_h^R = d_h / 2): rows of
    (mechanism, formula, numbers per token, in units of d_h * l). n_g is ours to choose (V2 leaves
    it symbolic)."""
    d_c, d_r = 4 * d_h, d_h // 2
    specs = [("MHA", "2 n_h d_h l", CacheSpec("", "MHA", n_layer, n_kv_head=n_h, head_dim=d_h)),
             (f"GQA (n_g = {n_g})", "2 n_g d_h l",
              CacheSpec("", "GQA", n_layer, n_kv_head=n_g, head_dim=d_h)),
             ("MQA", "2 d_h l", CacheSpec("", "MQA", n_layer, n_kv_head=1, head_dim=d_h)),
             ("MLA", "(d_c + d_h^R) l", CacheSpec("", "MLA", n_layer, kv_lora_rank=d_c, rope_dim=d_r))]
    rows = []
    for name, formula, s in specs:
        n = kv_cache_bytes(s, 1, bits=8)  # bytes at 8 bits = numbers
        rows.append((name, formula, int(n), n / (d_h * n_layer)))
    return rows


def deepseek_v2_reduction() -> float:
    """V2's "reduces the KV cache by 93.3%" (vs DeepSeek 67B): 67B caches 95 layers x 8 KV heads x
    (128 + 128) in 16 bits (DeepSeek LLM arXiv:2401.02954 Table 2); V2 caches 60 x (512 + 64) at 6
    bits on average (V2 sec. 3.2.3). Returns the fraction saved."""
    ds67b = CacheSpec("DeepSeek 67B", "GQA", 95, n_kv_head=8, head_dim=128)
    v2 = CacheSpec("DeepSeek-V2", "MLA", 60, kv_lora_rank=512, rope_dim=64)
    return 1 - kv_cache_bytes(v2, 1, bits=6) / kv_cache_bytes(ds67b, 1, bits=16)


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def print_tables(contexts: tuple[int, ...] = (4096, 32768, 131072)) -> None:
    print("# KV cache of real models, batch 1, bf16 (x = beyond the context the model was trained for)")
    print("| model | attention | numbers / token / layer | per token, all layers, no window | "
          + " | ".join(f"{c // 1024}K tokens" for c in contexts) + " |")
    print("|---|---|---|---|" + "---|" * len(contexts))
    for s in REAL_MODELS:
        cells = [human(kv_cache_bytes(s, c)) + (" x" if c > s.context else "") for c in contexts]
        per_token = human(s.per_token_layer() * s.n_layer * 2)
        print(f"| {s.name} | {s.kind} | {s.per_token_layer():,} | {per_token} | " + " | ".join(cells) + " |")
    print("sources:\n" + "\n".join(f"  {s.name}: {s.source}" for s in REAL_MODELS))
    print("\n# DeepSeek-V2 Table 1, with V2's sizes (n_h = d_h = 128, l = 60, d_c = 4 d_h, d_h^R = d_h / 2)")
    print("| mechanism | KV cache per token (numbers) | with V2's sizes | in units of d_h l |")
    print("|---|---|---|---|")
    for name, formula, n, units in deepseek_v2_table1():
        print(f"| {name} | {formula} | {n:,} | {units:g} |")
    print(f"MLA = 9/2 d_h l = GQA with 2.25 groups; vs DeepSeek 67B (GQA, 16-bit) with V2's 6-bit cache: "
          f"{deepseek_v2_reduction():.1%} less (V2 abstract: 93.3%)\n")


# -----------------------------------------------------------------------------------------------
# Demo: MHA, GQA, MQA and MLA at equal width, depth, data and steps; then decoding at long context.


@dataclass
class DemoConfig:
    """`python mla.py --key=value`. Defaults: four 600-step runs and the decode benchmark."""

    variants: str = "mha,gqa,mqa,mla"  # names from VARIANTS, in order
    n_layer: int = 4
    n_head: int = 4  # nh; hs = 32
    n_embd: int = 128  # C
    block_size: int = 128  # T
    kv_lora_rank: int = 48  # d_c of the MLA variants: 48 + 16 = 64 numbers per token and layer, 1/4 of
    #                         MHA's 2 * C = 256 and half of GQA's (nkv = 2) 128
    qk_rope_head_dim: int = 16  # d_r = hs / 2, as in DeepSeek-V2/V3
    q_lora_rank: int = 64  # d_c' of the mla_q variant
    max_iters: int = 600
    batch_size: int = 8
    lr: float = 6e-3
    seed: int = 1337
    decode_lengths: str = "2048,4096,8192"  # prompt lengths T for the decode benchmark; "" = skip it
    decode_steps: int = 12  # timed tokens per cache at each T (after 2 warm-up tokens), interleaved
    decode_threads: int = 1  # torch threads while decoding: one token of a tiny model is too little
    #                          work to share, and on a busy machine thread synchronisation dominates
    num_threads: int = 0  # torch CPU threads for training; 0 = torch's default
    out_dir: str = "out/mla"  # each variant's run, and the plot of runs other than the documented one


VARIANTS: dict[str, dict] = {
    "mha": dict(n_kv_head=0),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "mla": dict(attention="mla"),  # d_c = --kv_lora_rank, d_r = --qk_rope_head_dim
    "mla_q": dict(attention="mla", q_lora_rank=-1),  # + query compression, d_c' = --q_lora_rank
    "mla_wide": dict(attention="mla", kv_lora_rank=-1),  # d_c so the cache equals GQA's (nkv = 2)
}


def variant_config(name: str, dc: DemoConfig) -> gpt.GPTConfig:
    kw = dict(n_layer=dc.n_layer, n_head=dc.n_head, n_embd=dc.n_embd, block_size=dc.block_size)
    kw.update(VARIANTS[name])
    if kw.get("attention") != "mla":
        return gpt.GPTConfig(**kw)
    gqa_cache = 2 * 2 * (dc.n_embd // dc.n_head)  # K and V of 2 heads of hs
    d_c = dc.kv_lora_rank if kw.get("kv_lora_rank") != -1 else gqa_cache - dc.qk_rope_head_dim
    kw.update(kv_lora_rank=d_c, qk_rope_head_dim=dc.qk_rope_head_dim, n_kv_head=0,
              q_lora_rank=dc.q_lora_rank if kw.get("q_lora_rank") == -1 else 0)
    return MLAConfig(**kw)


def run_variant(name: str, dc: DemoConfig) -> dict:
    cfg = variant_config(name, dc)
    tc = gpt.TrainConfig(batch_size=dc.batch_size, max_iters=dc.max_iters, warmup_iters=dc.max_iters // 10,
                         lr=dc.lr, eval_interval=10**9, eval_tokens=4096, log_interval=50, seed=dc.seed,
                         out_dir=str(Path(dc.out_dir) / name), ckpt_interval=10**9, overwrite=True,
                         num_threads=dc.num_threads)
    r = gpt.train(cfg, tc, verbose=False)
    spec = spec_from_config(cfg)
    model = r["model"]
    return dict(name=name, cfg=cfg, model=model, tokenizer=r["tokenizer"], history=r["history"],
                val_loss=r["final"]["val_loss"], val_bpb=r["final"]["val_bpb"], params=model.num_params(),
                attn_params=sum(p.numel() for p in model.layers[0].attention.parameters()),
                per_token_layer=spec.per_token_layer(), kv_bytes=kv_cache_bytes(spec, 1))


@torch.no_grad()
def bench_decode(models: dict[str, gpt.GPT], tokens: np.ndarray, lengths: list[int], steps: int,
                 warmup: int = 2, mla_kernels: tuple[str, ...] = ("sdpa", "naive")) -> list[dict]:
    """For every model and context length T: prefill T tokens of text, then feed the text's next
    tokens one at a time and time each step. An MLA model decodes from its latent cache and from the
    expanded cache built from it, each with every kernel in mla_kernels; the other models use their
    own kernel. All runs take turns token by token, so a slow spell of a shared machine hits them
    alike. Validates as it goes: each MLA run's logits are compared with the latent/sdpa run's."""
    rows = []
    for T in lengths:
        if len(tokens) < T + steps + warmup:
            raise ValueError(f"the text has {len(tokens)} tokens, too few for a {T}-token prompt")
        ids = torch.from_numpy(tokens[:T + steps + warmup].astype(np.int64))[None]  # (1, T + n)
        runs = []
        for name, model in models.items():
            cache = model.make_cache(1, T + steps + warmup)
            model(ids[:, :T], cache=cache)  # prefill with the model's own (training) kernel
            if not isinstance(model.cfg, MLAConfig):
                runs.append(dict(model=model, label=name, cache=cache, kernel=model.cfg.attn_impl))
                continue
            expanded = expand_latent_cache(model, cache)
            for kind, c in (("latent", cache), ("expanded", expanded)):
                for kernel in mla_kernels:
                    runs.append(dict(model=model, label=f"{name}, {kind} cache", cache=copy.deepcopy(c),
                                     kernel=kernel, ref=f"{name}, latent cache"))
        for run in runs:
            run.update(times=[], logits=[], impl=run["model"].cfg.attn_impl)
        for i in range(steps + warmup):
            tok = ids[:, T + i:T + i + 1]  # (1, 1): the text's next token, the same for every run
            for run in runs:
                run["model"].cfg.attn_impl = run["kernel"]  # the layers share this config object
                t0 = time.perf_counter()
                logits, _ = run["model"](tok, cache=run["cache"])
                dt = time.perf_counter() - t0
                run["model"].cfg.attn_impl = run["impl"]
                if i >= warmup:
                    run["times"].append(dt)
                run["logits"].append(logits[:, -1])
        for run in runs:
            ms = 1e3 * float(np.median(run["times"]))
            ref = next((r for r in runs if r["label"] == run.get("ref") and r["kernel"] == "sdpa"), None)
            diff = None if ref is None else torch.stack(run["logits"]) - torch.stack(ref["logits"])
            err = None if diff is None else float(diff.abs().max())
            cache = run["cache"]
            nbytes = cache.nbytes if isinstance(cache, MLACache) else cache.k.nbytes + cache.v.nbytes
            rows.append(dict(T=T, label=run["label"], kernel=run["kernel"], ms=ms, bytes=nbytes, err=err))
    return rows


def plot_demo(results: list[dict], decode: list[dict], path: Path, title: str) -> None:
    plt = gpt.pyplot()
    fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(11.5 if decode else 5.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    for r in results:
        ax.plot(r["kv_bytes"] / 1024, r["val_loss"], "o", ms=8)
        ax.annotate(f"  {r['name']}", (r["kv_bytes"] / 1024, r["val_loss"]), fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache per token, all layers (KiB, bf16)")
    ax.set_ylabel("val loss (nats/token), whole val split")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if decode:
        ax = axes[0, 1]
        for key in dict.fromkeys((r["label"], r["kernel"]) for r in decode):
            pts = [(r["T"], r["ms"]) for r in decode if (r["label"], r["kernel"]) == key]
            ax.plot(*zip(*pts), "o-" if key[1] == "sdpa" else "s--", label=f"{key[0]} ({key[1]})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel("ms per decoded token (median)")
        ax.set_title("decoding one token after T tokens, batch 1, fp32", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gpt.save_figure(fig, path)


def parse_demo_args(argv: list[str]) -> DemoConfig:
    dc = gpt.config_from_args(DemoConfig, argv, __doc__, "mla.py")
    unknown = [v for v in dc.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    try:
        lengths = [int(t) for t in dc.decode_lengths.split(",") if t]
    except ValueError:
        raise ValueError(f"--decode_lengths={dc.decode_lengths!r}: expected integers, comma-separated"
                         ) from None
    if any(t < 1 for t in lengths) or dc.decode_steps < 1 or dc.decode_threads < 1:
        raise ValueError("decode lengths, --decode_steps and --decode_threads must be positive")
    return dc


@torch.no_grad()
def check_paths(cfg: MLAConfig, T: int = 24, prefill: int = 8, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| vs the full forward (expanded training path) of decoding from the latent
    and from the expanded cache, in float64, on a random model of this shape: both should be ~1e-15."""
    torch.manual_seed(seed)
    model = gpt.GPT(dataclasses.replace(cfg, vocab_size=300, block_size=T)).double().eval()
    idx = torch.randint(0, 300, (2, T))
    full, _ = model(idx)
    err = {}
    for latent in (True, False):
        cache = MLACache(model.cfg, 2, T, dtype=torch.float64, latent=latent)
        out = [model(idx[:, :prefill], cache=cache)[0]]
        out += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(prefill, T)]
        err["latent" if latent else "expanded"] = float((torch.cat(out, dim=1) - full).abs().max())
    return err


def print_results(results: list[dict], dc: DemoConfig) -> None:
    print(f"\n# {dc.n_layer} layers, C={dc.n_embd}, nh={dc.n_head}, T={dc.block_size}, "
          f"batch {dc.batch_size}, {dc.max_iters} steps, same data and seed; MLA d_c={dc.kv_lora_rank}, "
          f"d_r={dc.qk_rope_head_dim}; "
          "val = the whole validation split")
    print(f"| variant | params | attention params / layer | KV numbers / token / layer | "
          f"KV per token (bf16, {dc.n_layer} layers) | val loss | val bits/byte |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['params'] / 1e6:.3f}M | {r['attn_params']:,} | {r['per_token_layer']} | "
              f"{r['kv_bytes']:,.0f} B | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")


def print_decode(rows: list[dict], steps: int, load: tuple[float, float]) -> None:
    print(f"\n# decoding one token after a T-token prompt, batch 1, fp32, median of {steps} tokens; all "
          f"runs interleaved token by token; load average {load[0]:.1f} -> {load[1]:.1f} on "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("| T | cache | kernel | cache size | ms / token | expanded / latent | max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        twin = next((x for x in rows if x["T"] == r["T"] and x["kernel"] == r["kernel"]
                     and x["label"] == r["label"].replace("latent", "expanded")), None)
        ratio = f"{twin['ms'] / r['ms']:.2f}x" if twin is not None and twin is not r else ""
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        print(f"| {r['T']} | {r['label']} | {r['kernel']} | {human(r['bytes'])} | {r['ms']:.2f} | {ratio} | "
              f"{err} |")


def main(argv: list[str]) -> None:
    try:
        dc = parse_demo_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    t_start, cpu_start = time.time(), time.process_time()
    if dc.num_threads:
        torch.set_num_threads(dc.num_threads)
    print_tables()
    err = check_paths(variant_config("mla", dc), seed=dc.seed)
    print(f"# float64, random MLA model: decoding from the latent cache vs the full forward, max abs logit "
          f"diff {err['latent']:.1e}; from the expanded cache {err['expanded']:.1e}\n")
    results = []
    for name in [v for v in dc.variants.split(",") if v]:
        t0 = time.time()
        results.append(run_variant(name, dc))
        print(f"{name}: val loss {results[-1]['val_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    if not results:
        return
    print_results(results, dc)
    decode = []
    lengths = [int(t) for t in dc.decode_lengths.split(",") if t]
    if lengths:
        tokens = np.asarray(gpt.load_tokens("valid", results[0]["tokenizer"]))
        load0, threads = os.getloadavg()[0], torch.get_num_threads()
        torch.set_num_threads(dc.decode_threads)
        models = {r["name"]: r["model"].eval() for r in results}
        decode = bench_decode(models, tokens, lengths, dc.decode_steps)
        print_decode(decode, dc.decode_steps, (load0, os.getloadavg()[0]))
        torch.set_num_threads(threads)
    documented = gpt.is_default(dc, ("num_threads", "out_dir"))
    path = gpt.plot_path("mla.png", documented, dc.out_dir)
    plot_demo(results, decode, path, f"{dc.n_layer} layers, C={dc.n_embd}, T={dc.block_size}, "
              f"{dc.max_iters} steps, TinyStories")
    print(f"\nplot: {path}\ntotal {time.time() - t_start:.0f} s wall, "
          f"{time.process_time() - cpu_start:.0f} s of CPU time (this process, all threads)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        print_tables()
    else:
        main(sys.argv[1:])
