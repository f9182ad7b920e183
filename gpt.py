"""
gpt.py - the spine of this repo: a small, modern (Llama-style) GPT trained on TinyStories.

A decoder-only transformer predicts the next token of a story. Everything it needs is in this one
file, in reading order: the model (RMSNorm, RoPE, grouped-query attention, SwiGLU) and sampling from
it with a KV cache; then the plumbing that feeds it: a byte-level BPE tokenizer (GPT-2's, trimmed to
the tokens TinyStories uses) and the data pipeline; training (AdamW, warmup + cosine or WSD,
accumulation, DDP) with evaluation in bits per byte; checkpoints; the command line.

References
- GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (BPE, init).
- Llama: Touvron et al. 2023, arXiv:2302.13971 (RMSNorm pre-norm, RoPE, SwiGLU, no biases);
  Llama 2 (arXiv:2307.09288) for grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245).
- RoPE: Su et al. 2021, arXiv:2104.09864, eq. 34. SwiGLU: Shazeer 2020, arXiv:2002.05202.
- TinyStories: Eldan & Li 2023, arXiv:2305.07759 (they kept the 10K most common GPT-Neo tokens).
- Attention sinks: Xiao et al. 2023 (arXiv:2309.17453); as learned per-head logits in gpt-oss (2025).
- QK-norm: Dehghani et al. 2023 (arXiv:2302.05442), OLMo 2, Qwen3. Soft-capping of attention scores
  and output logits: Gemma 2 (arXiv:2408.00118, section 2). Squared ReLU: Primer, So et al. 2021
  (arXiv:2109.08668). WSD schedule: MiniCPM, Hu et al. 2024 (arXiv:2404.06395).
- z-loss: PaLM, Chowdhery et al. 2022 (arXiv:2204.02311) section 5.
- Layout and training loop in the spirit of nanoGPT (Karpathy).

Run it
    python gpt.py                                   # train the default tiny model (~5 min, 2 CPU cores)
    python gpt.py --preset=nanogpt                  # the GPT-2 / nanoGPT-style baseline
    python gpt.py --preset=speedrun --time_budget=300  # the speedrun recipe for 300 s of steps (bench.py)
    python gpt.py --sample --ckpt=out/ckpt.pt --prompt="Once upon a time"
    torchrun --standalone --nproc_per_node=2 gpt.py # DDP (gloo on CPU, nccl on GPU)

Not covered here: attention kernels beyond SDPA (attention_flash.py), mixture of experts
(moe.py), other optimizers (muon.py), quantization (quant.py), preference tuning (dpo.py).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import inspect
import json
import math
import os
import pickle
import re
import sys
import time
import typing
import urllib.error
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
EOT = "<|endoftext|>"


# -----------------------------------------------------------------------------------------------
# The model's configuration (training and sampling have theirs further down)


@dataclass
class GPTConfig:
    """The model. Defaults: the tiny Llama-style model that `python gpt.py` trains on a CPU."""

    block_size: int = 256  # context length T; a TinyStories story is ~200 tokens
    vocab_size: int = 8192  # 50257 = GPT-2's full vocabulary; smaller = GPT-2 trimmed to this many
    n_layer: int = 4
    n_head: int = 4  # nh, query heads
    n_kv_head: int = 2  # nkv: 1 is MQA, n_head (or 0) is MHA, in between is GQA (Llama 2/3)
    n_embd: int = 128  # C; head size hs = C / nh
    mlp_hidden: int = 0  # 0: SwiGLU 8/3*C rounded up to a multiple of 32 (Llama), GELU 4*C
    norm: str = "rmsnorm"  # rmsnorm (Llama) | layernorm (GPT-2)
    norm_eps: float = 1e-5
    pos_emb: str = "rope"  # rope (relative, rotary) | learned (GPT-2 absolute positions)
    rope_theta: float = 10000.0  # RoPE base (Llama 1/2; Llama 3 uses 500000 for long contexts)
    mlp: str = "swiglu"  # swiglu | gelu | relu2 | anything registered in MLPS (moe.py adds its own)
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 had them, Llama dropped them)
    tie_embeddings: bool = True  # output head shares the token embedding matrix (GPT-2, Llama 3.2 1B)
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # naive (the reference) | sdpa | flash (from attention_flash.py)
    attention: str = "gqa"  # the attention layer: gqa (MHA/GQA/MQA by n_kv_head) | mla (mla.py, DeepSeek)
    window: int = 0  # causal sliding window in tokens (Mistral, gpt-oss); 0 = full causal attention
    sinks: bool = False  # learned per-head logit that joins the softmax denominator (gpt-oss)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (OLMo 2, Qwen3)
    attn_soft_cap: float = 0.0  # scores -> cap * tanh(scores / cap) (Gemma 2 uses 50); 0 = off
    logit_soft_cap: float = 0.0  # output logits -> cap * tanh(logits / cap) (Gemma 2: 30); 0 = off
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) (PaLM uses 1e-4); 0 = off
    init_std: float = 0.02  # GPT-2 init; residual output projections get / sqrt(2 * n_layer)
    zero_init: bool = False  # residual output projections (wo, w2) start at zero (modded-nanogpt)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.n_embd % self.n_head == 0,
             f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        need(257 <= self.vocab_size <= 50257, "vocab_size must be in [257, 50257] "
             f"(256 byte tokens + <|endoftext|> up to GPT-2's full vocabulary), got {self.vocab_size}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm must be rmsnorm or layernorm, not {self.norm!r}")
        need(self.pos_emb in ("rope", "learned"), f"pos_emb must be rope or learned, not {self.pos_emb!r}")
        need(self.pos_emb != "rope" or self.rope_dim % 2 == 0, "RoPE needs an even head size")
        need(self.window >= 0, f"window must be >= 0, got {self.window}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.attn_soft_cap >= 0 and self.logit_soft_cap >= 0 and self.z_loss >= 0,
             "attn_soft_cap, logit_soft_cap and z_loss must be >= 0")
        need(not (self.attn_soft_cap and self.attn_impl == "sdpa"),
             "attn_soft_cap changes the scores inside the softmax, which SDPA cannot do: "
             "use --attn_impl=naive (or flash)")
        need(self.pos_emb == "rope" or self.window == 0 or self.window >= self.block_size,
             "a sliding window with learned positions cannot decode past block_size: use pos_emb=rope")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_dim(self) -> int:
        """Channels of a head that RoPE rotates: all of them (mla.py rotates only a decoupled part)."""
        return self.head_size

    @property
    def hidden_size(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two, so Llama shrinks 4C to 2/3 * 4C = 8C/3 to keep
        # the parameter count of a 4C GELU MLP (Shazeer 2020, section 2), rounded up to a multiple of 32.
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)


# Presets: named sets of model and training fields, flags override them. nanogpt is the GPT-2 recipe to
# compare against: LayerNorm with biases, learned absolute positions, a GELU MLP, full multi-head
# attention and GPT-2's full 50,257-token vocabulary. speedrun is the best recipe bench.py's 300-second
# track has found (docs/gpt.md, "The speedrun track"): Muon without QK-Clip, a 4,096-token vocabulary,
# and a narrower model (C = 96) that takes more steps in the same time.
PRESETS: dict[str, dict] = {
    "llama": {},
    "nanogpt": dict(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True, vocab_size=50257,
                    n_kv_head=0),
    "speedrun": dict(optimizer="muon", lr=8e-3, qk_clip_tau=0.0, vocab_size=4096, n_embd=96),
}


# -----------------------------------------------------------------------------------------------
# Attention kernels. Every kernel takes
#     q (B, nh, Tq, hs), k and v (B, nkv, Tk, hs)  with nh a multiple of nkv (query head h reads
#     kv head h // (nh // nkv), as Llama's repeat_kv does), queries being the *last* Tq of the Tk
#     positions (bottom-right aligned, the KV-cache case), and returns (B, nh, Tq, hs). The values
#     may be narrower than the keys, v (B, nkv, Tk, hs_v <= hs) -> (B, nh, Tq, hs_v) (mla.py's are).
# Options: causal; window W (key j is visible from query i iff i - W < j <= i); sinks (nh,) learned
# logits that join each row's softmax denominator and take probability mass without a value;
# soft_cap (scores -> cap * tanh(scores / cap)). New kernels register in ATTENTION.


def attention_mask(Tq: int, Tk: int, causal: bool, window: int, device=None) -> Optional[torch.Tensor]:
    """Boolean (Tq, Tk) mask, True where query i may attend to key j; None when all is allowed."""
    if not causal and not window:
        return None
    i = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # absolute positions of the queries
    j = torch.arange(Tk, device=device)[None, :]
    ok = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if window:
        ok = ok & ((i - j).abs() < window)
    return ok


def naive_attention(q, k, v, *, causal=True, window=0, sinks=None, soft_cap=0.0):
    """The reference: materialise the (Tq, Tk) scores, mask, softmax, weight the values."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs): each kv head serves nh/nkv queries
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, Tq, Tk)
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)  # bounded in (-cap, cap), Gemma 2
    mask = attention_mask(Tq, Tk, causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # one extra column per head: softmax over [scores, sink], then drop it
        sink_col = sinks.to(scores.dtype).view(1, nh, 1, 1).expand(B, nh, Tq, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :Tk]
    else:
        probs = torch.softmax(scores, dim=-1)  # (B, nh, Tq, Tk)
    if mask is not None:  # a row with no visible key gives zeros rather than 0/0 = NaN
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return probs @ v  # (B, nh, Tq, hs)


def sdpa_attention(q, k, v, *, causal=True, window=0, sinks=None, soft_cap=0.0):
    """torch's fused scaled_dot_product_attention (flash / memory-efficient / math backends)."""
    if soft_cap:
        raise ValueError("SDPA cannot soft-cap scores inside the softmax: use attn_impl=naive or flash")
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    gqa = nh != nkv
    if sinks is None:
        if causal and not window and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = attention_mask(Tq, Tk, causal, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    # Sinks through SDPA: prepend one key whose score is exactly the sink logit and whose value is 0.
    # Give every query an extra coordinate holding its head's sink logit s_h, every real key a 0
    # there, and the sink key the vector (0, ..., 0, 1): then q'.k_sink = s_h and q'.k_j = q.k_j.
    # The scale 1/sqrt(hs) is folded into q so the sink logit is not scaled.
    s = sinks.to(q.dtype).view(1, nh, 1, 1).expand(B, nh, Tq, 1)
    q1 = torch.cat([q / math.sqrt(hs), s], dim=-1)  # (B, nh, Tq, hs+1)
    k1 = F.pad(k, (0, 1))  # (B, nkv, Tk, hs+1), last coordinate 0
    k_sink = F.pad(k.new_ones(B, nkv, 1, 1), (hs, 0))  # (B, nkv, 1, hs+1) = (0, ..., 0, 1)
    k1 = torch.cat([k_sink, k1], dim=2)  # (B, nkv, 1+Tk, hs+1)
    v1 = F.pad(v, (0, 0, 1, 0))  # (B, nkv, 1+Tk, hs), the sink's value row is 0
    mask = attention_mask(Tq, Tk, causal, window, q.device)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device) if mask is None else mask
    mask = F.pad(mask, (1, 0), value=True)  # (Tq, 1+Tk): the sink is always visible
    return F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, scale=1.0, enable_gqa=gqa)


ATTENTION: dict[str, Callable] = {"naive": naive_attention, "sdpa": sdpa_attention}


@torch.no_grad()
def max_attention_logit(q, k, *, causal=True, window=0) -> torch.Tensor:
    """Each head's largest visible pre-softmax score q.k / sqrt(hs) over the batch: (nh,).
    Exploding maxima signal unstable training; MuonClip (muon.py) caps them."""
    B, nh, Tq, hs = q.shape
    k = k.repeat_interleave(nh // k.shape[1], dim=1)  # (B, nh, Tk, hs)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, Tq, Tk)
    mask = attention_mask(Tq, k.shape[2], causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.amax(dim=(0, 2, 3))  # (nh,)


# -----------------------------------------------------------------------------------------------
# Model building blocks, smallest first. Parameter names follow Meta's Llama checkpoints, which map
# one-to-one onto GGUF tensor names (llama.cpp):
#   tok_embeddings -> token_embd            layers.N.attention.wq/wk/wv/wo -> blk.N.attn_q/k/v/output
#   layers.N.attention_norm -> blk.N.attn_norm    layers.N.feed_forward.w1/w2/w3 -> blk.N.ffn_gate/down/up
#   layers.N.ffn_norm -> blk.N.ffn_norm     norm -> output_norm     output -> output (absent when tied)
# Weights are (out_features, in_features) as in nn.Linear. RoPE rotates *adjacent* pairs
# (x[2i], x[2i+1]) like Meta's complex-number code and GGML's normal rope mode, so no permutation of
# wq/wk is needed on export (Hugging Face's rotate-half layout would need one).


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019): LayerNorm without the mean."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in >= fp32 even under bf16
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(pos: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles pos * theta^(-2i/hs), i < hs/2: each (T, hs/2), in fp64 so
    that large positions keep their precision (cast to the compute dtype when applied)."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float64) / head_size)
    angles = pos.double()[:, None] * inv_freq[None, :]  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x (B, T, n, hs) by angle pos * freq_i.

    A rotation by m*w applied to a query at position m and n*w to a key at position n leaves their
    dot product depending on m - n only: attention sees relative positions (RoPE paper, eq. 16)."""
    B, T, n, hs = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)  # rotate in >= fp32 even under bf16
    xp = x.to(dt).view(B, T, n, hs // 2, 2)  # (B, T, n, hs/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos.to(dt).view(1, T, 1, hs // 2), sin.to(dt).view(1, T, 1, hs // 2)
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # (B, T, n, hs/2, 2)
    return out.view(B, T, n, hs).type_as(x)


class KVCache:
    """Keys and values of past positions, for decoding one token at a time without recomputing.

    Without a window it holds every position up to `max_len`. With a sliding window W the model
    never looks further back than W tokens, so the cache is a ring of W slots: position p lives in
    slot p % W, and memory stays fixed however long the story gets. The order of slots does not
    matter to attention (a softmax over a set), only that each slot holds a visible key.

    Speculative decoding (speculative.py) feeds several tokens at once after the prompt (a draft to
    check) and then rolls back to the accepted prefix with `truncate`. Without a window, rolling back
    just moves `pos`: entries past it are overwritten before anything reads them. In a ring of W
    slots, writing position p destroys position p - W, which a query earlier in the same chunk, or
    the next query after a rollback, still needs; so `spare` extra slots (a ring of W + spare) keep
    them: chunks of up to spare + 1 tokens and rollbacks of up to spare positions are then exact."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 spare: int = 0):
        if spare < 0:
            raise ValueError(f"KVCache: spare must be >= 0, got {spare}")
        self.window, self.spare = cfg.window, spare
        self.size = cfg.window + spare if cfg.window else max_len
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.size, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, S, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens seen so far = position of the next token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this chunk's k, v (B, nkv, T, hs); return the keys/values to attend to and whether
        the kernel must still apply the causal/window mask (prompt, chunks) or not (one token)."""
        T = k.shape[2]
        if self.pos == 0:  # the prompt: attend within the chunk with the usual mask, keep its tail
            n = min(T, self.size)
            slots = torch.arange(T - n, T, device=k.device) % self.size
            self.k[layer].index_copy_(2, slots, k[:, :, T - n:].to(self.k.dtype))
            self.v[layer].index_copy_(2, slots, v[:, :, T - n:].to(self.v.dtype))
            return k, v, True
        if not self.window:
            if self.pos + T > self.size:
                raise ValueError(f"KVCache is full ({self.size} positions): start a new one")
            self.k[layer, :, :, self.pos:self.pos + T] = k
            self.v[layer, :, :, self.pos:self.pos + T] = v
            n = self.pos + T  # queries are the last T of these n keys (bottom-right aligned mask)
            return self.k[layer, :, :, :n], self.v[layer, :, :, :n], T > 1
        if T > self.spare + 1:
            raise ValueError(f"KVCache: a chunk of {T} tokens after the prompt needs a ring with spare >= "
                             f"{T - 1} extra slots (this one has spare={self.spare})")
        slots = torch.arange(self.pos, self.pos + T, device=k.device) % self.size
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        if T == 1 and not self.spare:  # the plain ring: every stored key is in the past and the window
            n = min(self.pos + 1, self.size)
            return self.k[layer, :, :, :n], self.v[layer, :, :, :n], False
        # positions pos - W + 1 .. pos + T - 1 (all a query of this chunk may see), in order of position,
        # so the usual bottom-right causal + window mask applies; W + spare slots still hold them all
        first = max(0, self.pos - self.window + 1)
        order = torch.arange(first, self.pos + T, device=k.device) % self.size
        return self.k[layer].index_select(2, order), self.v[layer].index_select(2, order), T > 1

    def truncate(self, n: int) -> None:
        """Forget positions n, n+1, ... (a rejected draft): the next token fed is position n."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"KVCache.truncate({n}): can keep 0 to {self.pos} positions (those seen)")
        if self.window and self.pos - n > self.spare:
            raise ValueError(f"KVCache.truncate: rolling a sliding-window ring back {self.pos - n} positions "
                             f"needs spare >= {self.pos - n} (this one has spare={self.spare})")
        self.pos = n


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads, RoPE, and the options of GPTConfig."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_size
        self.wq = nn.Linear(cfg.n_embd, nh * hs, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, nkv * hs, bias=cfg.bias)  # GQA: fewer K/V heads, smaller cache
        self.wv = nn.Linear(cfg.n_embd, nkv * hs, bias=cfg.bias)
        self.wo = nn.Linear(nh * hs, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hs, cfg.norm_eps), RMSNorm(hs, cfg.norm_eps)
        if cfg.sinks:
            self.sinks = nn.Parameter(torch.zeros(nh))  # (nh,) one learned logit per head
        self.dropout = nn.Dropout(cfg.dropout)
        self.record_max_logit = False  # when True, forward stores max_attention_logit in self.max_logit
        self.max_logit: Optional[torch.Tensor] = None

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                   spare: int = 0) -> KVCache:
        """The empty cache that forward(x, rope, cache) fills: what a layer caches is its own business.
        `spare` extra ring slots let a sliding-window cache take chunks and roll back (see KVCache)."""
        return KVCache(self.cfg, batch_size, max_len, device, dtype, spare)

    def forward(self, x, rope: Optional[tuple], cache: Optional[KVCache] = None):
        B, T, C = x.shape
        cfg = self.cfg
        q = self.wq(x).view(B, T, cfg.n_head, cfg.head_size)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, cfg.n_kv_head, cfg.head_size)  # (B, T, nkv, hs)
        v = self.wv(x).view(B, T, cfg.n_kv_head, cfg.head_size)  # (B, T, nkv, hs)
        if cfg.qk_norm:  # unit-RMS queries and keys bound the logits (stabilises high LRs)
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hs)
        masked = True
        if cache is not None:
            k, v, masked = cache.update(self.layer, k, v)  # (B, nkv, Tk, hs)
        if self.record_max_logit:  # an extra Q K^T without gradients: off unless asked for
            self.max_logit = max_attention_logit(q, k, causal=masked, window=cfg.window if masked else 0)
        y = ATTENTION[cfg.attn_impl](q, k, v, causal=masked, window=cfg.window if masked else 0,
                                     sinks=getattr(self, "sinks", None), soft_cap=cfg.attn_soft_cap)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_size)  # (B, T, nh*hs)
        return self.dropout(self.wo(y))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): a gated MLP (Shazeer 2020; Llama). w1 = gate, w3 = up, w2 = down."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.hidden_size, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, cfg.hidden_size, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)): GPT-2's MLP (up to 4C, tanh-approximated GELU, back down)."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.hidden_size, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.gelu(self.w1(x), approximate="tanh")))


class ReluSquaredMLP(GeluMLP):
    """w2(relu(w1 x)^2): Primer's squared ReLU (So et al. 2021, arXiv:2109.08668, section 3), the MLP of
    modded-nanogpt's speedrun records. Two matrices like GELU's; the square keeps large activations
    growing while zeroing the rest, an exactly sparse hidden layer."""

    def forward(self, x):
        return self.dropout(self.w2(F.relu(self.w1(x)).square()))


# The MLP slot. A module built as MLPS[cfg.mlp](cfg, layer) maps (B, T, C) -> (B, T, C); `layer` lets
# a factory vary by depth (DeepSeek-V3 keeps its first layers dense). If it sets a tensor
# attribute `aux_loss` during forward (an MoE balancing loss), GPT.forward adds it to the loss; if it
# has a method `after_optimizer_step()`, the training loop calls it after every step.
MLPS: dict[str, Callable[[GPTConfig, int], nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP,
                                                           "relu2": ReluSquaredMLP}

# The attention-layer slot, the same way. ATTENTION_LAYERS[cfg.attention](cfg, layer) has
# forward(x (B, T, C), rope, cache) -> (B, T, C) and make_cache(batch_size, max_len, device, dtype, spare),
# the empty cache its forward fills while decoding (mla.py caches a latent vector instead of K and V).
ATTENTION_LAYERS: dict[str, Callable[[GPTConfig, int], nn.Module]] = {"gqa": Attention}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attention_norm = make_norm(cfg, cfg.n_embd)
        self.attention = plugin("attention", cfg.attention)(cfg, layer)
        self.ffn_norm = make_norm(cfg, cfg.n_embd)
        self.feed_forward = plugin("mlp", cfg.mlp)(cfg, layer)

    def forward(self, x, rope, cache=None):
        x = x + self.attention(self.attention_norm(x), rope, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Token embedding -> n_layer blocks -> final norm -> output head (next-token logits)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        plugin("attn_impl", cfg.attn_impl)  # imports the chapter that provides it, if needed
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.pos_embeddings = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.n_embd)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # (V, C): one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                # Each block adds two residual branches; scaling their last projection by
                # 1/sqrt(2 * n_layer) keeps the residual stream's variance O(1) at init (GPT-2, 2.3).
                # zero_init starts them at 0: every block begins as the identity and the first steps
                # grow each branch from nothing (modded-nanogpt; Fixup / ReZero in spirit).
                std = 0.0 if cfg.zero_init else cfg.init_std / math.sqrt(2 * cfg.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if hasattr(self, "pos_embeddings"):
                n -= self.pos_embeddings.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the training loss."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        cfg = self.cfg
        if cfg.pos_emb == "learned" and start + T > cfg.block_size:
            raise ValueError(f"learned positions stop at block_size={cfg.block_size}, "
                             f"got position {start + T - 1}")
        if cache is None and T > cfg.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.tok_embeddings(idx)  # (B, T, C)
        rope = None
        if cfg.pos_emb == "learned":
            x = x + self.pos_embeddings(pos)  # (B, T, C) + (T, C)
        else:
            rope = rope_cos_sin(pos, cfg.rope_dim, cfg.rope_theta)  # 2 x (T, rope_dim/2)
        x = self.dropout(x)
        for block in self.layers:
            x = block(x, rope, cache)
        x = self.norm(x)
        logits = self.output(x)  # (B, T, V)
        if cfg.logit_soft_cap:  # a smooth clamp to (-cap, cap): no logit can run away (Gemma 2)
            logits = cfg.logit_soft_cap * torch.tanh(logits / cfg.logit_soft_cap)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return logits, None
        logits32 = logits.float().view(-1, logits.size(-1))  # (B*T, V)
        loss = F.cross_entropy(logits32, targets.reshape(-1), ignore_index=-1)
        if cfg.z_loss:  # pushes log Z toward 0 so logits stay in a range bf16 represents well
            loss = loss + cfg.z_loss * torch.logsumexp(logits32, dim=-1).pow(2).mean()
        for m in self.modules():  # auxiliary losses of pluggable modules (MoE balancing)
            aux = getattr(m, "aux_loss", None)
            if m is not self and isinstance(aux, torch.Tensor):
                loss = loss + aux
        return logits, loss

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for decoding batch_size sequences of up to max_len positions, on the model's
        device and in its dtype, made by the attention layers (they know what they cache)."""
        w = self.tok_embeddings.weight
        return self.layers[0].attention.make_cache(batch_size, max_len, w.device, w.dtype)

    def after_optimizer_step(self) -> None:
        """Let submodules update non-gradient state after each step (e.g. MoE balancing biases)."""
        for m in self.modules():
            if m is not self and hasattr(m, "after_optimizer_step"):
                m.after_optimizer_step()


# -----------------------------------------------------------------------------------------------
# Plug-in points. The attention kernel and layer, the MLP and the optimizer are looked up by name in
# plain dicts (ATTENTION, ATTENTION_LAYERS, MLPS above, OPTIMIZERS below) that other chapters add to
# when imported. PROVIDERS says which chapter provides which name, so `python gpt.py --mlp=moe`
# imports moe.py on first use: no user code has to import it. A chapter whose part takes options of
# its own registers a dataclass extending GPTConfig or TrainConfig under the part's name in
# CONFIG_CLASSES (moe.py: MoEConfig), and the command line and checkpoints then know those options too.

PROVIDERS: dict[str, dict[str, str]] = {  # config field -> {name: module that registers it}
    "attn_impl": {"flash": "attention_flash"},
    "attention": {"mla": "mla"},
    "mlp": {"moe": "moe"},
    "optimizer": {"muon": "muon"},
}
CONFIG_CLASSES: dict[str, type] = {}  # plug-in name -> dataclass adding its options


def plugin(kind: str, name: str) -> Callable:
    """The entry `name` of the plug-in table for config field `kind` (attn_impl, attention, mlp,
    optimizer), importing the chapter that provides it first if needed; a clear error lists the choices."""
    table = {"attn_impl": ATTENTION, "attention": ATTENTION_LAYERS, "mlp": MLPS,
             "optimizer": OPTIMIZERS}[kind]
    if name not in table and name in PROVIDERS[kind]:
        importlib.import_module(PROVIDERS[kind][name])  # the module registers itself on import
    if name not in table:
        known = sorted(set(table) | set(PROVIDERS[kind]))
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(known)}")
    return table[name]


def config_classes(names: dict[str, str]) -> tuple[type, type]:
    """The model and training config classes for the plug-ins in use ({field: name}): GPTConfig and
    TrainConfig, or dataclasses that extend them with every option the plug-ins registered."""
    for kind, name in names.items():
        plugin(kind, name)
    out = []
    for base in (GPTConfig, TrainConfig):
        ext = [CONFIG_CLASSES[n] for n in names.values()
               if n in CONFIG_CLASSES and issubclass(CONFIG_CLASSES[n], base)]
        if len(ext) <= 1:
            out.append(ext[0] if ext else base)
        else:  # several extensions (say an MoE model trained by Muon): one class with all their fields
            out.append(dataclass(type("+".join(c.__name__ for c in ext), tuple(ext), {})))
    return out[0], out[1]


# -----------------------------------------------------------------------------------------------
# Sampling


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Sampling settings that would be silently wrong or fail deep inside torch get a clear error."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def filtered_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution sample_next draws from, one row per row of logits (B, V) -> (B, V): softmax of
    logits / temperature over the top-k and nucleus tokens; temperature 0 puts all mass on the argmax."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits.float() / temperature
    if top_k:  # keep the k largest logits
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token id per row of logits (B, V) -> (B,). temperature 0 means greedy."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model: GPT, prompt: list[int], max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eot: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Continue `prompt` num_samples times with a KV cache; each stops at `eot` (not included).

    The prompt is processed in one forward pass (prefill); after that every step feeds one token.
    Without a sliding window the cache holds block_size positions; when it is full we keep the last
    half of the text and prefill again, so generation can run on (RoPE only sees relative positions).
    A prompt longer than block_size is cut to its last block_size tokens (with a warning): the model
    was trained on no longer context.
    """
    model.eval()
    cfg = model.cfg
    device = model.tok_embeddings.weight.device
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    check_sampling(temperature, top_k, top_p)
    if len(prompt) > cfg.block_size:
        warnings.warn(f"generate: the prompt has {len(prompt)} tokens, more than block_size="
                      f"{cfg.block_size}; only its last {cfg.block_size} tokens are used", stacklevel=2)
    seqs = torch.tensor(prompt, device=device).repeat(num_samples, 1)  # (B, T0)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    ctx = seqs[:, -cfg.block_size:]
    cache = model.make_cache(num_samples, cfg.block_size)
    logits, _ = model(ctx, cache=cache)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        if eot is not None:
            nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
            done |= nxt == eot
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
        if not cfg.window and cache.pos >= cfg.block_size:  # full: re-prefill the last half
            cache = model.make_cache(num_samples, cfg.block_size)
            logits, _ = model(seqs[:, -(cfg.block_size // 2):], cache=cache)
        else:
            logits, _ = model(nxt[:, None], cache=cache)
    out = []
    for row in seqs[:, len(prompt):].tolist():
        out.append(row[:row.index(eot)] if eot is not None and eot in row else row)
    return out


# -----------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE through tiktoken, built offline from data/gpt2, and trimmed.
#
# BPE starts from the 256 single bytes and applies learned merges in order of rank: the pair whose
# concatenation has the lowest rank is merged first. GPT-2 learned 50,000 merges, so its vocabulary
# is 256 bytes + 50,000 merged tokens + <|endoftext|> = 50,257. A token's id *is* its merge rank.
#
# Trimming (TinyStories, section 2, kept the 10K most common tokens): a tiny model spends most of its
# FLOPs and parameters on a 50K-way output layer, yet TinyStories uses a few thousand tokens. We keep
# a subset of GPT-2's ranks and renumber them densely in rank order, so the merge *priority* is
# unchanged. The subset must be closed under merges: if "ing" = "in" + "g" is kept, so are "in" and
# "g", otherwise "ing" could never be built. All 256 bytes stay, so any text still round-trips.

GPT2_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet vocab.bpe is written in (encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_gpt2_files() -> tuple[dict[bytes, int], dict[bytes, tuple[bytes, bytes]]]:
    """GPT-2 merge ranks (token bytes -> id) and each merged token's two parents, from data/gpt2."""
    d = DATA_DIR / "gpt2"
    try:
        ranks = {}
        for line in (d / "r50k_base.tiktoken").read_bytes().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        parents = {}
        for line in (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]:  # skip #version
            a, b = (bytes(byte_of[c] for c in part) for part in line.split(" "))
            parents[a + b] = (a, b)
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"the GPT-2 tokenizer files in {d} are missing or corrupt ({e!r}); "
                           "restore them with `git checkout -- data/gpt2`") from e
    if len(ranks) != 50256 or len(parents) != 50000:
        raise RuntimeError(f"{d} is corrupt: expected 50256 ranks and 50000 merges, got "
                           f"{len(ranks)} and {len(parents)}; restore it with `git checkout -- data/gpt2`")
    return ranks, parents


def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 (r50k_base) encoding, offline: ids equal OpenAI's GPT-2 ids."""
    ranks, _ = _read_gpt2_files()
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


def trim_vocab(vocab_size: int, text: str) -> list[int]:
    """Choose the GPT-2 ranks to keep: the most frequent tokens in `text`, closed under merges.

    Returns sorted GPT-2 ranks (ids), `vocab_size - 1` of them (the last new id is <|endoftext|>).
    Tokens are taken in order of frequency (ties by rank); each brings its missing merge ancestors,
    and is skipped if they would not fit. Leftover room is filled with the lowest-rank tokens whose
    parents are already kept (the merges BPE would learn first), so the size is exactly vocab_size.
    """
    ranks, parents = _read_gpt2_files()
    by_rank = {r: t for t, r in ranks.items()}
    budget = vocab_size - 1
    keep = {t for t, r in ranks.items() if r < 256}  # all single bytes: any text stays encodable

    def closure(t: bytes) -> list[bytes]:  # t and its not-yet-kept ancestors, parents first
        out, stack = [], [t]
        while stack:
            u = stack.pop()
            if u in keep or u in out:
                continue
            out.append(u)
            stack.extend(parents[u])
        return out

    counts = Counter(gpt2_tokenizer().encode_ordinary(text))
    for rank, _ in sorted(counts.items(), key=lambda rc: (-rc[1], rc[0])):
        if len(keep) >= budget:
            break
        new = closure(by_rank[rank])
        if len(keep) + len(new) <= budget:
            keep.update(new)
    for r in range(256, 50256):
        if len(keep) >= budget:
            break
        t = by_rank[r]
        if t not in keep and all(p in keep for p in parents[t]):
            keep.add(t)
    return sorted(ranks[t] for t in keep)


def tokenizer_from_ranks(kept: list[int]) -> tiktoken.Encoding:
    """A real tiktoken.Encoding over the kept GPT-2 ranks, renumbered 0..V-2; <|endoftext|> = V-1."""
    if len(kept) == 50256:
        return gpt2_tokenizer()
    ranks, parents = _read_gpt2_files()
    by_rank = {r: t for t, r in ranks.items()}
    kept_bytes = {by_rank[r] for r in kept}
    missing = [t for t in kept_bytes if t in parents and not all(p in kept_bytes for p in parents[t])]
    if len(kept_bytes) != len(kept) or missing or sum(r < 256 for r in kept) != 256:
        raise ValueError("kept ranks must be distinct, include all 256 bytes and be closed under merges")
    new_ranks = {by_rank[r]: i for i, r in enumerate(sorted(kept))}  # rank order = merge priority
    digest = hashlib.sha256(np.asarray(sorted(kept), dtype=np.int64).tobytes()).hexdigest()[:8]
    return tiktoken.Encoding(name=f"gpt2-trim{len(kept) + 1}-{digest}", pat_str=GPT2_PAT,
                             mergeable_ranks=new_ranks, special_tokens={EOT: len(kept)},
                             explicit_n_vocab=len(kept) + 1)


def build_tokenizer(vocab_size: int) -> tuple[tiktoken.Encoding, list[int]]:
    """GPT-2 (vocab_size=50257) or GPT-2 trimmed on the bundled train split, and its kept ranks."""
    if vocab_size == 50257:
        return gpt2_tokenizer(), list(range(50256))
    text = read_text(DATA_DIR / "tinystories" / "tinystories_train.txt")
    cache = DATA_DIR / "cache" / f"trim{vocab_size}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    try:
        kept = json.loads(cache.read_text())
    except (OSError, ValueError):
        kept = trim_vocab(vocab_size, text)
        atomic_write_bytes(cache, json.dumps(kept).encode())
    return tokenizer_from_ranks(kept), kept


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """Bytes of text behind each token id; <|endoftext|> counts as 1 byte (the story separator).
    Dividing the summed loss by these bytes gives bits per byte, comparable across tokenizers."""
    lengths = np.ones(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i != enc.eot_token:
            lengths[i] = len(enc.decode_single_token_bytes(i))
    return lengths


# -----------------------------------------------------------------------------------------------
# Data: stories -> one long uint16 stream of token ids with <|endoftext|> between stories, cached on
# disk as a memmap. Training samples random windows from it; evaluation walks it in order.

FULL_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"


def read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"missing data file {path}; the bundled TinyStories sample lives in "
                                "data/tinystories (restore it with `git checkout -- data`)")
    return path.read_text(encoding="utf-8")


def download_full(split: str, timeout: float = 10.0) -> Path:
    """Download TinyStoriesV2-GPT4 (~2.2 GB train, 22 MB valid) from its Hugging Face page once."""
    path = DATA_DIR / "full" / f"TinyStoriesV2-GPT4-{split}.txt"
    if path.exists():
        return path
    url = FULL_URL.format(split)
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total, done, last = int(r.headers.get("Content-Length") or 0), 0, time.time()
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if time.time() - last > 5:
                    print(f"downloading {path.name}: {done / 1e6:.0f} / {total / 1e6:.0f} MB", flush=True)
                    last = time.time()
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} ({e}). --data=full needs the internet once; "
                           "without it use the bundled sample: --data=sample (the default, "
                           "data/tinystories, 7,671 train / 874 valid stories)") from e
    os.replace(tmp, path)
    return path


def iter_stories(path: Path, chunk_chars: int = 1 << 24):
    """Yield lists of stories from a file of stories separated by <|endoftext|>, in bounded memory."""
    with open(path, encoding="utf-8") as f:
        rest = ""
        while chunk := f.read(chunk_chars):
            parts = (rest + chunk).split(EOT)
            rest = parts.pop()
            yield [s.strip() for s in parts if s.strip()]
        if rest.strip():
            yield [rest.strip()]


def load_tokens(split: str, enc: tiktoken.Encoding, data: str = "sample") -> np.ndarray:
    """The split as a uint16 memmap of token ids, each story followed by <|endoftext|>.

    The cache file's name holds a hash of the text and the tokenizer name (which holds a hash of its
    vocabulary), so editing either one re-tokenizes. It is written atomically."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be train or valid, not {split!r}")
    if data == "sample":
        path = DATA_DIR / "tinystories" / f"tinystories_{split}.txt"
        read_text(path)  # clear error if missing
    elif data == "full":
        path = download_full(split)
    else:
        raise ValueError(f"data must be 'sample' or 'full', not {data!r}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    cache = DATA_DIR / "cache" / f"{data}-{split}-{enc.name}-{h.hexdigest()[:16]}.u16"
    if not cache.exists():
        assert enc.n_vocab <= 65536, "uint16 token ids need a vocabulary of at most 65,536"
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                for stories in iter_stories(path):
                    for ids in enc.encode_ordinary_batch(stories):
                        ids.append(enc.eot_token)
                        f.write(np.asarray(ids, dtype=np.uint16).tobytes())
    if cache.stat().st_size % 2:
        raise RuntimeError(f"token cache {cache} is corrupt (odd size): delete it to re-tokenize")
    tokens = np.memmap(cache, dtype=np.uint16, mode="r")
    if len(tokens) == 0 or int(tokens.max()) >= enc.n_vocab:
        raise RuntimeError(f"token cache {cache} is corrupt (empty or ids >= {enc.n_vocab}): delete it")
    return tokens


def get_batch(tokens: np.ndarray, offsets: torch.Tensor, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and next-token targets y for windows starting at `offsets`: both (B, T) int64."""
    idx = offsets.numpy()[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
    w = torch.from_numpy(tokens[idx].astype(np.int64))
    return w[:, :-1], w[:, 1:]


def batch_offsets(gen: torch.Generator, n_tokens: int, block_size: int, micro: int, accum: int,
                  world: int, rank: int) -> torch.Tensor:
    """Random window starts for one optimizer step, shape (accum, micro), for this rank.

    Every rank draws the whole global batch (accum, world * micro) from the same generator and takes
    its own columns. So the data depend only on the global batch, not on how it is split: 2 processes
    with batch 8 see exactly the windows 1 process with batch 16 sees."""
    if n_tokens <= block_size + 1:
        raise ValueError(f"the data has {n_tokens} tokens, too few for block_size={block_size}")
    starts = torch.randint(0, n_tokens - block_size - 1, (accum, world * micro), generator=gen)
    return starts[:, rank * micro:(rank + 1) * micro]


# -----------------------------------------------------------------------------------------------
# Training: its configuration, the optimizers, the learning-rate schedule, evaluation, the loop.


@dataclass
class TrainConfig:
    """Training, evaluation and I/O. Defaults: ~5 minutes on a 2-core laptop CPU."""

    data: str = "sample"  # sample: the bundled 7,671 stories | full: download TinyStoriesV2-GPT4
    batch_size: int = 8  # windows per micro-batch *per process*
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size*grad_accum*world
    max_iters: int = 600  # optimizer steps (the LR schedule spans exactly these; see time_budget)
    warmup_iters: int = 60  # linear LR warmup
    lr: float = 6e-3  # peak learning rate (tiny models take high rates; ~3e-4 at GPT-2 small scale)
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio (Chinchilla, Llama)
    schedule: str = "cosine"  # after warmup: cosine (GPT-3, Llama) | wsd (flat, then a linear cooldown)
    cooldown_frac: float = 0.4  # wsd: the share of max_iters spent decaying (modded-nanogpt ~0.45)
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9
    beta2: float = 0.95  # 0.95 rather than 0.999: steadier for transformers (GPT-3, Llama)
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    optimizer: str = "adamw"  # adamw | anything registered in OPTIMIZERS (muon.py adds muon)
    eval_interval: int = 100  # iterations between validation evaluations
    eval_tokens: int = 32768  # periodic evaluations use the first this many val tokens (the same ones
    #                           every time); the final evaluation uses the whole split
    log_interval: int = 50  # iterations between progress lines
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    out_dir: str = "out"  # the run's directory: checkpoint, and the loss plot of non-default runs
    ckpt: str = ""  # the checkpoint this run writes, resumes (--resume) or samples (--sample);
    #                 "" = out_dir/ckpt.pt
    ckpt_interval: int = 200  # iterations between checkpoints (one is always written at the end)
    resume: bool = False  # continue the checkpoint exactly where it stopped
    overwrite: bool = False  # let a new run replace an existing checkpoint (otherwise it refuses)
    stop_at: int = 0  # stop after this many iterations (as if interrupted; the schedule still uses max_iters)
    time_budget: float = 0.0  # > 0: train for this many seconds of optimizer steps (evaluation excluded):
    #                           the schedule follows the share of it spent, as if it were max_iters steps
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    plot: str = "auto"  # loss plot: auto = assets/gpt_loss.png for the documented default run and
    #                     out_dir/loss.png for any other; or a path; or "" for none

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_tokens", "log_interval",
                     "ckpt_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig: {name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_iters", "weight_decay", "grad_clip", "stop_at", "num_threads"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.time_budget) and self.time_budget >= 0):
            raise ValueError(f"TrainConfig: time_budget must be a number of seconds >= 0, "
                             f"got {self.time_budget}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig: lr must be a positive number, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("TrainConfig: min_lr_ratio must be in [0, 1], beta1 and beta2 in [0, 1)")
        if self.data not in ("sample", "full"):
            raise ValueError(f"TrainConfig: data must be sample or full, not {self.data!r}")
        if self.schedule not in ("cosine", "wsd") or not 0 < self.cooldown_frac <= 1:
            raise ValueError(f"TrainConfig: schedule must be cosine or wsd (got {self.schedule!r}) and "
                             f"cooldown_frac in (0, 1] (got {self.cooldown_frac})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig: dtype must be auto, float32 or bfloat16, not {self.dtype!r}")

    @property
    def ckpt_path(self) -> Path:
        return Path(self.ckpt) if self.ckpt else Path(self.out_dir) / "ckpt.pt"


# Optimizers. A factory takes (model, TrainConfig) and returns a torch optimizer whose param groups
# each carry `initial_lr`; the training loop sets lr = initial_lr * schedule(iter). muon.py adds one.


def make_adamw(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices (>= 2-D) only: decaying norm
    gains and biases toward 0 only hurts. Tied weights appear once in named_parameters()."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [dict(params=decay, weight_decay=tc.weight_decay, initial_lr=tc.lr),
              dict(params=no_decay, weight_decay=0.0, initial_lr=tc.lr)]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused or None)


OPTIMIZERS: dict[str, Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]] = {"adamw": make_adamw}


def lr_factor(it: float, tc: TrainConfig) -> float:
    """Linear warmup to 1, then decay to min_lr_ratio at max_iters: cosine, or WSD (warmup-stable-decay,
    MiniCPM, Hu et al. 2024, arXiv:2404.06395): hold the peak, then fall linearly over the last
    cooldown_frac of the run. WSD needs no fixed horizon until the cooldown starts, and at a short budget
    it spends more steps at the peak rate (Haegele et al. 2024, arXiv:2405.18392, match cosine with a
    ~20% cooldown). Under a time budget `it` is fractional: max_iters * (share of the budget spent)."""
    if it < tc.warmup_iters:
        return (it + 1) / tc.warmup_iters
    if tc.schedule == "wsd":
        cooldown = max(1, round(tc.cooldown_frac * tc.max_iters))
        progress = min(1.0, max(0.0, (it - (tc.max_iters - cooldown)) / cooldown))  # 0 until the cooldown
        return 1 - (1 - tc.min_lr_ratio) * progress
    progress = min(1.0, (it - tc.warmup_iters) / max(1, tc.max_iters - tc.warmup_iters))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, byte_lengths: np.ndarray, block_size: int,
             batch_size: int, max_tokens: int = 0, rank: int = 0, world: int = 1,
             autocast=None) -> dict:
    """Mean loss (nats/token) and bits per byte over consecutive windows of `tokens`.

    Walks the split in order (deterministic: the same windows every time), the first `max_tokens`
    targets or all of them. bits/byte = sum of losses / ln 2 / bytes of text predicted; it does not
    depend on how the text was tokenized, so models with different vocabularies are comparable.
    Under DDP each rank takes every world-th batch and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    n = len(tokens) - 1
    if max_tokens:
        n = min(n, max_tokens)
    n_windows = math.ceil(n / block_size)
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, tokens
    lengths = torch.from_numpy(byte_lengths).to(device)
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if b % world != rank:
            continue
        xs, ys = [], []
        for w in range(first, min(first + batch_size, n_windows)):
            s, e = w * block_size, min((w + 1) * block_size, n)
            x = torch.from_numpy(tokens[s:e].astype(np.int64))
            y = torch.from_numpy(tokens[s + 1:e + 1].astype(np.int64))
            pad = block_size - len(x)  # the last window is shorter: pad, and ignore the padding
            xs.append(F.pad(x, (0, pad)))
            ys.append(F.pad(y, (0, pad), value=-1))
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)  # (B, T)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        valid = y.flatten() >= 0
        sums += torch.stack([nll.sum().double(), lengths[y.flatten()[valid]].sum().double(),
                             valid.sum().double()])
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    nats, nbytes, ntok = sums.tolist()
    return dict(loss=nats / ntok, bpb=nats / math.log(2) / nbytes, tokens=int(ntok))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Loss (nats/token) of the best model that ignores context: the baseline any LM must beat."""
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------
# Training


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory of every size for reuse; True if it took effect.

    By default glibc serves large allocations (above a threshold that adapts up to 32 MiB) with a fresh
    mmap and returns them to the kernel on free. A CPU training step allocates and frees the same large
    buffers every step (the (B*T, V) logits alone are 32 MiB at B*T = 2048, V = 4096), so each step
    pays the kernel to map, fault in and zero those pages again, 4 KiB at a time: a large share of a
    small model's step on a CPU (measured in docs/gpt.md, the speedrun track). Raising the mmap
    and trim thresholds (mallopt M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1) keeps the pages in the
    heap for the next step; the arithmetic is unchanged, the process keeps its peak memory.
    Linux/glibc only; a no-op elsewhere. PyTorch's own advice is a caching allocator (jemalloc or
    tcmalloc through LD_PRELOAD); this needs nothing installed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        return False


def setup_distributed(tc: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: init the process group (nccl on GPU, gloo on CPU).
    On CPU it also keeps freed memory for reuse (keep_freed_memory)."""
    if tc.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = tc.device
    if device == "cpu":
        keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # bf16 dense


def train(cfg: GPTConfig, tc: TrainConfig, verbose: bool = True, *, model: Optional[nn.Module] = None,
          batches: Optional[Callable] = None, probe: Optional[Callable] = None,
          tokenizer: Optional[tiktoken.Encoding] = None, val_tokens: Optional[np.ndarray] = None) -> dict:
    """Train a GPT and return {"model", "tokenizer", "optimizer", "history", "final"}.

    Each iteration: [evaluate] -> one optimizer step over grad_accum micro-batches -> [checkpoint].
    The checkpoint after iteration i holds everything that influences iteration i+1 (weights,
    optimizer moments, the data generator, RNG states), so --resume continues bit-for-bit.

    Other chapters reuse this loop through these hooks instead of copying it:
      model:   train this module (e.g. a pretrained model with adapters) instead of a fresh GPT(cfg);
               only its parameters with requires_grad are optimized.
      batches: batches(gen, micro, accum, world, rank) -> (x, y) LongTensors (accum, micro, T) drawn
               from the torch.Generator `gen` (saved in checkpoints): a different data source, e.g.
               instruction data whose prompt targets are -1 (ignored by the loss).
      probe:   probe(model, it) -> dict of extra figures, run at every evaluation and logged in history.
      tokenizer: the model's own tokenizer (a pretrained model's) instead of gpt.py's trimmed GPT-2 for
               cfg.vocab_size; evaluation and the default batches then use its token ids.
      val_tokens: the token stream to evaluate on, instead of the whole valid split.
    """
    if tc.time_budget and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("time_budget needs a single process: each rank's clock would end the run at a "
                         "different step; give DDP runs --max_iters")
    rank, world, device = setup_distributed(tc)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if verbose and master else (lambda *a: None)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    make_optimizer = plugin("optimizer", tc.optimizer)
    use_bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    ckpt_path = tc.ckpt_path
    if not tc.resume and not tc.overwrite and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} already holds a checkpoint: continue it with --resume, train "
                              "into another directory with --out_dir=DIR, or replace it with --overwrite")

    enc, kept = (tokenizer, []) if tokenizer is not None else build_tokenizer(cfg.vocab_size)
    train_tokens = load_tokens("train", enc, tc.data)
    val_tokens = load_tokens("valid", enc, tc.data) if val_tokens is None else val_tokens
    byte_lengths = token_byte_lengths(enc)

    torch.manual_seed(tc.seed)
    if model is None:
        model = GPT(cfg)
    model = model.to(device)
    optimizer = make_optimizer(model, tc)
    data_gen = torch.Generator().manual_seed(tc.seed)
    start, history, t_train = 0, [], 0.0  # t_train: seconds spent in optimizer steps, evaluation excluded

    def finished(done: int) -> bool:  # the schedule is complete: max_iters steps, or the time budget spent
        return t_train >= tc.time_budget if tc.time_budget else done >= tc.max_iters

    if tc.resume:
        state = read_checkpoint(ckpt_path, map_location=device)
        if state["model_config"] != dataclasses.asdict(cfg):
            raise ValueError(f"--resume: the model config differs from the checkpoint's in {ckpt_path}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start, history = state["iter"], state["history"]
        t_train = history[-1].get("train_time", 0.0) if history else 0.0
        if finished(start):
            log(f"nothing to do: {ckpt_path} is at iteration {start}, the end of its schedule; "
                "raise --max_iters (or --time_budget) to continue")
            return dict(model=model, tokenizer=enc, optimizer=optimizer, history=history, final={})
        log(f"resumed from {ckpt_path} at iteration {start}")
    raw_model = model
    if tc.compile:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if batches is None:  # random windows of the token stream, the same for any split of the batch
        def batches(gen, micro, accum, world, rank):
            offsets = batch_offsets(gen, len(train_tokens), cfg.block_size, micro, accum, world, rank)
            xy = [get_batch(train_tokens, o, cfg.block_size) for o in offsets]  # accum x (micro, T)
            return torch.stack([x for x, _ in xy]), torch.stack([y for _, y in xy])

    tokens_per_iter = tc.batch_size * tc.grad_accum * world * cfg.block_size
    n_params = raw_model.num_params() if isinstance(raw_model, GPT) else sum(p.numel() for p in
                                                                               raw_model.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size  # PaLM appendix B
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu_name), None)
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
        f"attention={cfg.attn_impl}, mlp={cfg.mlp}, optimizer={tc.optimizer}, "
        f"tokenizer {enc.name} ({enc.n_vocab} tokens)")
    log(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens ({len(val_tokens) - 1:,} "
        f"next-token targets); {tokens_per_iter:,} tokens "
        f"per iteration on {world} process(es), device {device}, {'bf16' if use_bf16 else 'fp32'}")

    def run_eval(max_tokens):  # the unwrapped model: ranks may run different numbers of batches
        return evaluate(raw_model, val_tokens, byte_lengths, cfg.block_size, tc.batch_size, max_tokens,
                        rank, world, autocast)

    model.train()
    t_start = t_last = time.time()
    done = start
    # stop_at ends the run early, as an interruption would; the schedule still spans the whole run
    while not finished(done) and not (tc.stop_at and done >= tc.stop_at):
        it = done
        if it % tc.eval_interval == 0:
            t_eval = time.time()
            ev = run_eval(tc.eval_tokens)
            extra = probe(raw_model, it) if probe is not None else {}
            history.append(dict(iter=it, val_loss=ev["loss"], val_bpb=ev["bpb"], val_tokens=ev["tokens"],
                                time=time.time() - t_start, train_time=t_train, **extra))
            log(f"iter {it}: val loss {ev['loss']:.4f}, {ev['bpb']:.4f} bits/byte (first {ev['tokens']:,} "
                "val tokens)" + "".join(f", {k} {v:.4g}" for k, v in extra.items()))
            t_last += time.time() - t_eval  # keep evaluation out of the tokens/s figure
        t_step = time.time()
        # a time budget places the schedule by the share of the budget spent, as if it were max_iters steps
        lr_f = lr_factor(tc.max_iters * min(1.0, t_train / tc.time_budget) if tc.time_budget else it, tc)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_f
        xs, ys = batches(data_gen, tc.batch_size, tc.grad_accum, world, rank)  # (accum, micro, T)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = xs[micro].to(device, non_blocking=True), ys[micro].to(device, non_blocking=True)
            last = micro == tc.grad_accum - 1
            # under DDP, all-reduce the gradients only once, on the last micro-batch
            sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with sync, autocast():
                _, loss = model(x, y)
            (loss / tc.grad_accum).backward()  # gradients of the mean over all micro-batches
            loss_sum += loss.item()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: just measure the norm
        params = [p for p in model.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not (math.isfinite(loss_sum) and math.isfinite(float(gnorm))):
            raise FloatingPointError(
                f"non-finite loss ({loss_sum / tc.grad_accum}) or gradient norm ({float(gnorm)}) at "
                f"iteration {it}; stopped before the update. The last good checkpoint ({ckpt_path}, "
                "if any) is untouched: lower --lr, raise --warmup_iters or set --grad_clip, then --resume")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(raw_model, "after_optimizer_step"):
            raw_model.after_optimizer_step()
        t_train += time.time() - t_step
        done = it + 1
        ending = finished(done) or done == tc.stop_at
        if done % tc.log_interval == 0 or ending:
            train_loss = loss_sum / tc.grad_accum
            if world > 1:
                t = torch.tensor([train_loss], device=device)
                dist.all_reduce(t)
                train_loss = t.item() / world
            dt = time.time() - t_last
            steps = tc.log_interval if done % tc.log_interval == 0 else done % tc.log_interval
            tok_s = steps * tokens_per_iter / dt
            eta = max(0.0, tc.time_budget - t_train) if tc.time_budget else (tc.max_iters - done) * dt / steps
            mfu = f" | mfu {flops_per_token * tok_s / peak:.1%}" if peak else ""
            of = f" ({t_train:.0f}/{tc.time_budget:.0f} s)" if tc.time_budget else f"/{tc.max_iters}"
            log(f"iter {done}{of} | loss {train_loss:.4f} | lr {tc.lr * lr_f:.2e} | "
                f"{tok_s / 1e3:.1f}k tok/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s{mfu}")
            history.append(dict(iter=done, train_loss=train_loss, time=time.time() - t_start,
                                train_time=t_train, tok_s=tok_s))
            t_last = time.time()
        if master and not finished(done) and (done % tc.ckpt_interval == 0 or ending):
            save_checkpoint(ckpt_path, raw_model, optimizer, cfg, tc, kept, done, data_gen, history)
    final = {}
    if finished(done):  # finished the schedule in this run
        ev = run_eval(0)  # the whole validation split
        extra = probe(raw_model, done) if probe is not None else {}
        final = dict(val_loss=ev["loss"], val_bpb=ev["bpb"], val_tokens=ev["tokens"],
                     unigram_loss=unigram_entropy(np.asarray(val_tokens), enc.n_vocab),
                     train_time=time.time() - t_start, step_time=t_train, iters=done, **extra)
        history.append(dict(iter=done, val_loss=ev["loss"], val_bpb=ev["bpb"],
                            val_tokens=ev["tokens"], time=time.time() - t_start, train_time=t_train,
                            whole_split=True, **extra))
        log(f"final: val loss {ev['loss']:.4f} nats/token ({ev['bpb']:.4f} bits/byte) over the whole val "
            f"split ({ev['tokens']:,} next-token targets); unigram baseline {final['unigram_loss']:.4f}; "
            f"{final['train_time']:.0f}s" + "".join(f"; {k} {v:.4g}" for k, v in extra.items()))
        if master:
            save_checkpoint(ckpt_path, raw_model, optimizer, cfg, tc, kept, done, data_gen, history)
    return dict(model=raw_model, tokenizer=enc, optimizer=optimizer, history=history, final=final)


# -----------------------------------------------------------------------------------------------
# Checkpoints and files: written atomically, loaded with weights_only=True (no code from a file).


def weights_digest(state_dict: dict) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes: detects a checkpoint whose weights were
    damaged on disk (zip entries carry CRCs, but torch.load does not check them)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, optimizer, cfg: GPTConfig, tc: TrainConfig, kept: list[int],
                    it: int, data_gen: torch.Generator, history: list) -> None:
    weights = model.state_dict()
    state = dict(
        model=weights, digest=weights_digest(weights), optimizer=optimizer.state_dict(),
        model_config=dataclasses.asdict(cfg), train_config=dataclasses.asdict(tc),
        tokenizer=dict(kept_gpt2_ranks=kept), iter=it, history=history,
        rng=dict(torch=torch.get_rng_state(), data=data_gen.get_state(),
                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
    )
    with atomic_path(path) as tmp:  # readers see the old checkpoint or the new one, never half
        torch.save(state, tmp)


CHECKPOINT_KEYS = {"model", "optimizer", "model_config", "train_config", "tokenizer", "iter", "rng"}


def read_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint dict; a missing, damaged or foreign file gets one line saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (`python gpt.py "
                                f"--out_dir={path.parent}`) or pass --ckpt=PATH")
    size = path.stat().st_size
    if size == 0:
        raise RuntimeError(f"checkpoint {path} is empty (0 bytes): delete it and train again")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise RuntimeError(f"checkpoint {path} is not a PyTorch checkpoint (not a zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"checkpoint {path} holds objects other than tensors and plain values, which "
                           f"weights_only=True refuses to load: {str(e).splitlines()[0]}") from e
    except Exception as e:  # truncated or damaged zip
        raise RuntimeError(f"checkpoint {path} ({size:,} bytes) is truncated or damaged: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise RuntimeError(f"checkpoint {path} is not a gpt.py checkpoint: expected the keys "
                           f"{sorted(CHECKPOINT_KEYS)}, found {have}")
    if "digest" in state and weights_digest(state["model"]) != state["digest"]:
        raise RuntimeError(f"checkpoint {path} is damaged: its weights do not match the digest stored "
                           "when it was written; restore it from a copy or train again")
    return state


def model_config_from_dict(d: dict) -> GPTConfig:
    """The model config stored in a checkpoint, as the class that has all its fields: GPTConfig or the
    extension of the plug-ins it names (an MoE checkpoint's config holds MoEConfig's fields)."""
    cls, _ = config_classes({k: d[k] for k in PROVIDERS if k in d and k in GPTConfig.__dataclass_fields__})
    return cls(**d)


def load_model(path: Path | str, device="cpu") -> tuple[GPT, tiktoken.Encoding, dict]:
    """A trained model (eval mode), its tokenizer and the raw checkpoint, from a checkpoint file."""
    state = read_checkpoint(path, map_location=device)
    try:
        cfg = model_config_from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"checkpoint {path} has an invalid model config ({e})") from e
    model = GPT(cfg).to(device)
    model.load_state_dict(state["model"])
    enc = tokenizer_from_ranks(state["tokenizer"]["kept_gpt2_ranks"])
    return model.eval(), enc, state


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside `path` to write to; rename it over `path` only when the block ends
    without error, so a crash never leaves half a file behind (os.replace is atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# -----------------------------------------------------------------------------------------------
# Command line: --key=value for any field of GPTConfig, TrainConfig or SampleConfig.


@dataclass
class SampleConfig:
    """Sampling (`--sample`) and the stories printed after training."""

    prompt: str = "Once upon a time"
    num_samples: int = 3  # stories to sample
    max_new_tokens: int = 300
    temperature: float = 0.8  # softmax temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 0.95  # nucleus sampling: smallest set with this much probability; 1 = off
    sample_seed: int = 42

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {self.num_samples} and "
                             f"{self.max_new_tokens}")


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's comment in the source (`name: type = default  # comment`, with any
    comment lines right below it): --help shows the text written once beside the field."""
    docs: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(c):
            continue
        try:
            lines = inspect.getsource(c).splitlines()
        except (OSError, TypeError):  # made at run time (config_classes): its bases have the comments
            continue
        name = None
        for line in lines:
            field = re.match(r"\s+(\w+): [^=]+=.*?(?:  # (.*))?$", line)
            more = re.match(r"\s+#\s+(.*)$", line)
            if field:
                name = field.group(1)
                docs[name] = field.group(2) or ""
            elif more and name:
                docs[name] += " " + more.group(1)
            else:
                name = None
    return docs


def run_it(doc: Optional[str]) -> str:
    """The "Run it" block of a module docstring: the example commands --help shows."""
    m = re.search(r"^Run it.*\n((?:[ \t]+.*\n|\n(?=[ \t]))+)", doc or "", re.M)
    return "examples:\n" + m.group(1).rstrip() + "\n" if m else ""


def help_text(prog: str, sections: list[tuple[str, type]], doc: Optional[str] = None,
              extra: Optional[list[tuple[str, str]]] = None) -> str:
    """Usage, the docstring's "Run it" examples, then every flag with its type, default and comment."""
    out = [f"usage: python {prog} [--key=value ...]\n", run_it(doc)]
    for title, cls in sections:
        out.append(f"{title}:")
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{f.name}={f.default}"
            out.append(f"  {flag:<34} {hints[f.name].__name__:<5}  {docs.get(f.name, '')}".rstrip())
        out.append("")
    for flag, text in extra or []:
        out.append(f"  {flag:<34} {text}")
    return "\n".join(out).rstrip() + "\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in ("--help", "-h") for a in argv)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _parse_value(name: str, text: str, typ):
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on", ""):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise ValueError(f"--{name}={text!r}: expected {_TYPE_WORDS.get(typ, typ.__name__)}") from None


def _unknown_option(key: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return ValueError(f"unknown option --{key}{hint} (--help lists them all)")


def _split(arg: str) -> tuple[str, str]:
    if not arg.startswith("--"):
        raise ValueError(f"unexpected argument {arg!r}: options look like --key=value (--help lists them)")
    key, _, text = arg[2:].partition("=")
    return key, text


def config_from_args(cls: type, argv: list[str], doc: Optional[str] = None, prog: str = ""):
    """An instance of dataclass `cls` from `--key=value` flags: every demo's command line. --help / -h
    prints the flags (with the comments written beside the fields) and the module's "Run it" examples."""
    if wants_help(argv):
        main_mod = sys.modules.get("__main__")
        print(help_text(prog or Path(sys.argv[0]).name, [("options", cls)],
                        doc if doc is not None else getattr(main_mod, "__doc__", None)))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    kw = {}
    for arg in argv:
        key, text = _split(arg)
        if key not in hints:
            raise _unknown_option(key, list(hints))
        kw[key] = _parse_value(key, text, hints[key])
    return cls(**kw)


def parse_args(argv: list[str]) -> tuple[GPTConfig, TrainConfig, SampleConfig, bool]:
    """gpt.py's command line: `--key=value` for any field of the model, training and sampling configs,
    plus --preset=NAME (its values first, flags override them) and --sample. A plug-in named by
    --attn_impl / --mlp / --optimizer is imported, and its options (CONFIG_CLASSES) become flags too:
    `--mlp=moe --n_experts=32`."""
    preset = "llama"
    for arg in argv:
        key, text = _split(arg) if arg.startswith("--") else ("", "")
        if key == "preset":
            if text not in PRESETS:
                raise ValueError(f"--preset={text!r}: known presets are {sorted(PRESETS)}")
            preset = text
    names = {k: v for k, v in PRESETS[preset].items() if k in PROVIDERS}
    for arg in argv:
        key, text = _split(arg) if arg.startswith("--") else ("", "")
        if key in PROVIDERS:
            names[key] = text
    model_cls, train_cls = config_classes(names)
    if wants_help(argv):
        print(help_text("gpt.py", [("model", model_cls), ("training", train_cls), ("sampling", SampleConfig)],
                        __doc__, [("--preset=llama", f"start from a preset: {', '.join(PRESETS)}"),
                                  ("--sample", "sample from --ckpt instead of training")]))
        raise SystemExit(0)
    kinds = {c: typing.get_type_hints(c) for c in (model_cls, train_cls, SampleConfig)}
    kinds = {c: {f.name: hints[f.name] for f in dataclasses.fields(c)} for c, hints in kinds.items()}
    values = {c: {} for c in kinds}
    for key, value in PRESETS[preset].items():  # a preset may set model and training fields
        values[next(c for c, f in kinds.items() if key in f)][key] = value
    sample = False
    for arg in argv:
        key, text = _split(arg)
        if key == "sample":
            sample = _parse_value(key, text, bool)
            continue
        if key == "preset":
            continue
        owner = next((c for c, f in kinds.items() if key in f), None)
        if owner is None:
            raise _unknown_option(key, [k for f in kinds.values() for k in f] + ["sample", "preset"])
        values[owner][key] = _parse_value(key, text, kinds[owner][key])
    return (model_cls(**values[model_cls]), train_cls(**values[train_cls]),
            SampleConfig(**values[SampleConfig]), sample)


def print_samples(model: GPT, enc: tiktoken.Encoding, sc: SampleConfig) -> list[str]:
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(sc.sample_seed)
    prompt = enc.encode_ordinary(sc.prompt)
    outs = generate(model, prompt, sc.max_new_tokens, sc.num_samples, sc.temperature, sc.top_k, sc.top_p,
                    eot=enc.eot_token, generator=gen)
    stories = [sc.prompt + enc.decode(o) for o in outs]
    for i, s in enumerate(stories):
        print(f"--- sample {i + 1} ---\n{s}")
    return stories


# Plots. The docs show the figures of the documented demo commands, so only those runs write assets/;
# any other run (fewer steps, another model) writes its plots into its own output directory.


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed): every demo's plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def is_default(cfg, ignore: tuple[str, ...] = ()) -> bool:
    """True when dataclass `cfg` holds its class defaults, the fields in `ignore` aside."""
    base = type(cfg)()
    return all(getattr(cfg, f.name) == getattr(base, f.name) for f in dataclasses.fields(cfg)
               if f.name not in ignore)


def plot_path(name: str, documented: bool, out_dir: str | Path, plot: str = "auto") -> Optional[Path]:
    """Where a plot goes: `plot` = "auto" -> assets/NAME for the documented run, out_dir/NAME for any
    other; "" -> nowhere (None); anything else is the path itself."""
    if plot != "auto":
        return Path(plot) if plot else None
    return ROOT / "assets" / name if documented else Path(out_dir) / name


# Fields that do not change what a run computes: a run that differs only in these is still the documented one.
RUN_ONLY_FIELDS = ("out_dir", "ckpt", "plot", "overwrite", "resume", "num_threads", "log_interval", "device")


def plot_history(history: list, path: Path, title: str) -> None:
    plt = pyplot()
    tr = [(h["iter"], h["train_loss"]) for h in history if "train_loss" in h]
    sub = [(h["iter"], h["val_loss"]) for h in history if "val_loss" in h and not h.get("whole_split")]
    whole = [(h["iter"], h["val_loss"]) for h in history if h.get("whole_split")]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss (last batch)")
    if sub:
        n = next(h.get("val_tokens") for h in history if "val_loss" in h and not h.get("whole_split"))
        ax.plot(*zip(*sub), "o-", label=f"val loss, first {n:,} val tokens" if n else "val loss")
    if whole:
        ax.plot(*zip(*whole), "*", ms=12, label="val loss, whole split")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str]) -> None:
    try:
        cfg, tc, sc, sample = parse_args(argv)
        if sample:
            device = "cuda" if torch.cuda.is_available() and tc.device in ("auto", "cuda") else "cpu"
            model, enc, _ = load_model(tc.ckpt_path, device)
            print_samples(model, enc, sc)
            return
        result = train(cfg, tc)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # bad input: one clear line
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", "0")) == 0 and result["final"]:
        f = result["final"]
        print("\n| val loss (nats/token) | val bits/byte | unigram baseline | wall time (incl. eval) |")
        print("|---|---|---|---|")
        print(f"| {f['val_loss']:.4f} | {f['val_bpb']:.4f} | {f['unigram_loss']:.4f} | "
              f"{f['train_time']:.0f} s |\n")
        documented = is_default(cfg) and is_default(tc, RUN_ONLY_FIELDS)
        path = plot_path("gpt_loss.png" if documented else "loss.png", documented, tc.out_dir, tc.plot)
        if path:
            n_params = sum(p.numel() for p in result["model"].parameters())
            plot_history(result["history"], path, f"gpt.py: {cfg.n_layer} layers, C={cfg.n_embd}, "
                         f"{n_params / 1e6:.1f}M params, {tc.max_iters} steps")
            print(f"plot: {path}")
        print_samples(result["model"], result["tokenizer"], sc)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    # Run as a script this file is the module __main__; a chapter it imports for a plug-in does
    # `import gpt` and must register into these tables, not into a second copy of this file.
    sys.modules.setdefault("gpt", sys.modules[__name__])
    main(sys.argv[1:])
