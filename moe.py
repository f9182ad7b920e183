"""
moe.py - mixture of experts the way DeepSeek-V3, Kimi K2 and LongCat-Flash do it, on TinyStories.

A mixture-of-experts (MoE) layer replaces the MLP of a transformer block by many small MLPs
("experts") and a router that sends each token to only K of them: the model holds E experts' worth of
parameters but each token pays for K. The hard part is not the maths but the traffic: a router left
alone sends most tokens to a few experts (collapse), so this file shows four ways to balance it, the
way experts are dispatched without a Python loop over tokens, and zero-computation experts that let
easy tokens use fewer real experts.

References
- Shazeer et al. 2017, arXiv:1701.06538 (sparsely-gated MoE); GShard, Lepikhin et al. 2020,
  arXiv:2006.16668 (top-2, capacity, auxiliary loss).
- Switch Transformer, Fedus et al. 2021, arXiv:2101.03961: eq. 4 auxiliary loss alpha*N*sum f_i P_i,
  section 2.2 expert capacity = capacity_factor * tokens / experts, overflow tokens dropped.
- ST-MoE, Zoph et al. 2022, arXiv:2202.08906: eq. 5 router z-loss.
- DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066: fine-grained experts + shared experts.
- DeepSeek-V3, arXiv:2412.19437, section 2.1.2: sigmoid scores, weights normalised over the chosen
  experts (eq. 13), the auxiliary-loss-free bias used for selection only (eq. 16) updated by
  gamma = 1e-3 per step, the complementary sequence-wise balance loss (eqs. 17-20, alpha = 1e-4),
  the routed scaling factor (2.5 in their config), the first 3 layers kept dense. Kimi K2
  (arXiv:2507.20534) uses the same recipe with 384 experts, top-8, one shared expert.
- LongCat-Flash, arXiv:2509.01322, section 2.1: zero-computation experts E_i(x) = x for
  N < i <= N+Z (identity: the token's input comes back, weighted by its gate), and the bias update
  Delta b_i = mu * (K_e/K * 1/N - T_i / (K*T_all)) that steers the average number of real experts per
  token toward K_e.

Run it
    python moe.py                          # dense vs MoE, the balancing variants, zero experts (~17 min)
    python moe.py --max_iters=100 --variants=dense,aux_free   # a quick look (~1 min)
    python gpt.py --mlp=moe --n_experts=32 --top_k=4 --max_iters=2000   # gpt.py's training, MoE model
    python moe.py train --n_experts=32      # the same as gpt.py --mlp=moe
    torchrun --standalone --nproc_per_node=2 gpt.py --mlp=moe           # data-parallel

Not covered: expert parallelism (all-to-all between devices) and its communication overlap (LongCat's
shortcut-connected MoE), device-limited routing, token-choice vs expert-choice routing, fused
grouped-GEMM kernels beyond torch._grouped_mm, upcycling a dense model into an MoE.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import gpt

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class MoEConfig(gpt.GPTConfig):
    """A GPTConfig whose MLP slot is an MoE layer: gpt.GPT(MoEConfig(...)) builds the MoE model."""

    mlp: str = "moe"  # the MLPS entry this file registers
    n_experts: int = 16  # E routed experts (DeepSeek-V3: 256, Kimi K2: 384, LongCat-Flash: 512)
    top_k: int = 3  # K experts per token, zero experts included (DeepSeek-V3: 8)
    expert_hidden: int = 0  # hidden width of one expert; 0: hidden_size / (n_shared + top_k), so a
    #                         token's active MLP parameters equal the dense SwiGLU's
    n_shared: int = 1  # experts every token always uses (DeepSeek-V3, Kimi K2: 1); 0 = none
    score: str = "sigmoid"  # sigmoid (DeepSeek-V3) | softmax (Switch, Mixtral)
    norm_topk: bool = True  # divide the K chosen scores by their sum (DeepSeek-V3 eq. 13, Mixtral);
    #                         keep False with top_k=1, where it would make every weight 1
    routed_scaling: float = 1.0  # multiplies the routed weights (DeepSeek-V3 uses 2.5)
    balance: str = "aux_free"  # none | aux (Switch eq. 4) | aux_free (DeepSeek-V3 bias)
    aux_alpha: float = 1e-2  # Switch auxiliary-loss coefficient (Switch section 2.2: 1e-2)
    bias_gamma: float = 1e-3  # bias update speed of aux_free (DeepSeek-V3 section 2.1.2: 0.001)
    seq_aux_alpha: float = 1e-4  # DeepSeek-V3's sequence-wise balance loss with aux_free; 0 = off
    router_z_loss: float = 0.0  # ST-MoE eq. 5 coefficient (they use 1e-3); 0 = off
    capacity_factor: float = 0.0  # expert capacity = cf * tokens * K / E (Switch); 0 = no dropping
    n_dense_layers: int = 0  # the first layers keep the dense SwiGLU (DeepSeek-V3: 3, Kimi K2: 1)
    n_zero_experts: int = 0  # Z identity experts a token may pick instead of a real one (LongCat)
    target_real_experts: float = 0.0  # K_e: average real experts per token the zero-expert bias
    #                                   controller steers toward (LongCat); 0 = no controller
    budget_mu: float = 0.1  # mu of LongCat's proportional bias update toward K_e
    dispatch: str = "grouped_mm"  # loop (one matmul per expert slice, the reference) | grouped_mm

    def __post_init__(self):
        super().__post_init__()

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"MoEConfig: {msg}")

        need(self.mlp == "moe", f"mlp must be 'moe' in an MoEConfig, got {self.mlp!r}")
        need(self.n_experts >= 1 and self.n_shared >= 0 and self.n_zero_experts >= 0,
             "n_experts must be >= 1, n_shared and n_zero_experts >= 0")
        need(1 <= self.top_k <= self.n_experts + self.n_zero_experts,
             f"top_k={self.top_k} must be in [1, n_experts + n_zero_experts]")
        need(self.score in ("softmax", "sigmoid"), f"score must be softmax or sigmoid, not {self.score!r}")
        need(self.balance in ("none", "aux", "aux_free"),
             f"balance must be none, aux or aux_free, not {self.balance!r}")
        need(self.dispatch in ("loop", "grouped_mm"),
             f"dispatch must be loop or grouped_mm, not {self.dispatch!r}")
        need(self.capacity_factor >= 0, "capacity_factor must be >= 0")
        need(0 <= self.n_dense_layers <= self.n_layer, "n_dense_layers must be in [0, n_layer]")
        k_e = self.target_real_experts
        need(k_e == 0 or (self.n_zero_experts > 0 and 0 < k_e <= self.top_k),
             "target_real_experts needs zero experts and must be in (0, top_k]")
        if self.expert_hidden == 0:
            self.expert_hidden = max(1, self.hidden_size // (self.n_shared + self.top_k))


# -----------------------------------------------------------------------------------------------
# Pure functions: routing, the balancing losses, the bias updates. Shapes: N tokens (N = B*T),
# C channels, E routed experts, Z zero experts, K chosen per token.


def route(logits: torch.Tensor, bias: torch.Tensor, k: int, score: str = "sigmoid", norm_topk: bool = True,
          routed_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose K experts per token. logits (N, E+Z), bias (E+Z,) ->
    weights (N, K), indices (N, K) int64, scores (N, E+Z).

    The bias only decides *which* experts are chosen (DeepSeek-V3 eq. 16); the gate weights come from
    the unbiased scores, so balancing never distorts what an expert's output is worth."""
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()  # (N, E+Z)
    idx = torch.topk(scores + bias, k, dim=-1, sorted=False).indices  # (N, K): selection only
    w = scores.gather(1, idx)  # (N, K): the weights ignore the bias
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)  # DeepSeek-V3 eq. 13: weights sum to 1 over the chosen experts
    return w * routed_scaling, idx, scores


def normalised_scores(scores: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each token's scores over the real experts as a distribution: s' = s / sum_j s_j (N, E).
    For softmax scoring (and no zero experts) this is the softmax itself (DeepSeek-V3 eq. 19)."""
    s = scores[..., :n_experts]
    return s / s.sum(-1, keepdim=True)


def switch_aux_loss(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4 without alpha: E * sum_i f_i * P_i, where f_i = fraction of the
    token->expert assignments that went to expert i (counts (E,), no gradient) and P_i = mean router
    probability of expert i (probs (N, E), differentiable). Equals 1 when routing is uniform."""
    E = counts.numel()
    f = counts.float() / counts.sum().clamp(min=1)  # (E,)
    return E * (f * probs.mean(0)).sum()


def sequence_aux_loss(onehot: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """DeepSeek-V3 eqs. 17-20 without alpha, per sequence then averaged over the batch.
    onehot (B, T, E): 1 where token t chose expert i; probs (B, T, E) normalised scores.
    f_i = E / (K T) * sum_t onehot, P_i = mean_t s'_i; loss = sum_i f_i P_i (1 when uniform)."""
    B, T, E = onehot.shape
    f = onehot.sum(1) * E / (k * T)  # (B, E)
    return (f * probs.mean(1)).sum(-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5 without its coefficient: mean over tokens of logsumexp(logits)^2 (N, E) -> ()."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def aux_free_update(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeepSeek-V3 section 2.1.2: after each step, b_i += gamma * sign(mean load - load_i).
    An overloaded expert's bias falls, so it wins fewer top-K contests next step. counts (E,)."""
    c = counts.float()
    return bias + gamma * torch.sign(c.mean() - c)


def budget_update(bias: torch.Tensor, counts: torch.Tensor, n_tokens: int, k: int, k_e: float,
                  mu: float) -> torch.Tensor:
    """LongCat-Flash section 2.1: for each real expert i <= E,
        b_i += mu * (K_e / K * 1 / E - T_i / (K * T_all)),
    i.e. each real expert aims at a share K_e/(K E) of all K*T_all assignments; the rest falls to the
    zero experts (whose biases stay fixed), so tokens use K_e real experts on average. bias (E,),
    counts T_i (E,) over the real experts."""
    E = counts.numel()
    return bias + mu * (k_e / k / E - counts.float() / (k * n_tokens))


# -----------------------------------------------------------------------------------------------
# Dispatch: run the experts on the token->expert pairs. The pairs are sorted by expert, so each
# expert's tokens form one contiguous slice and each expert runs once on its slice.


def sort_by_expert(idx: torch.Tensor, n_experts: int, capacity: int = 0) -> dict:
    """Group the (N, K) token->expert pairs by expert. Pairs with a zero expert (id >= E) are left
    out; with capacity > 0, pairs beyond the first `capacity` of an expert (in token order, the
    Switch rule) are dropped. Returns token (M,) and pair (M,) indices of the kept pairs, sorted by
    expert, counts (E,) kept per expert, and dropped (the number of real pairs dropped)."""
    N, K = idx.shape
    flat = idx.reshape(-1)  # (N*K,) pair p = n*K + k
    order = torch.argsort(flat, stable=True)  # (N*K,): by expert, token order kept within an expert
    e_sorted = flat[order]  # (N*K,)
    real = e_sorted < n_experts
    n_real = int(real.sum())
    order, e_sorted = order[:n_real], e_sorted[:n_real]  # zero experts sort last: cut them off
    dropped = 0
    if capacity > 0:
        counts_all = torch.bincount(e_sorted, minlength=n_experts)  # (E,)
        starts = torch.cumsum(counts_all, 0) - counts_all  # (E,) first sorted slot of each expert
        rank = torch.arange(n_real, device=idx.device) - starts[e_sorted]  # (M,) position in its queue
        keep = rank < capacity
        dropped = n_real - int(keep.sum())
        order, e_sorted = order[keep], e_sorted[keep]
    counts = torch.bincount(e_sorted, minlength=n_experts)  # (E,)
    return dict(token=order // K, pair=order, counts=counts, dropped=dropped)


def experts_loop(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """The reference: one SwiGLU per expert on its contiguous slice. x (M, C) sorted by expert,
    counts (E,), w1/w3 (E, h, C), w2 (E, C, h) -> (M, C). Empty experts still run (on 0 rows), so
    every weight is in the graph and DDP sees a gradient for each."""
    ys = []
    for e, xe in enumerate(x.split(counts.tolist())):  # (M_e, C)
        ys.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T)  # (M_e, h) -> (M_e, C)
    return torch.cat(ys)  # (M, C)


def experts_grouped_mm(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                       w2: torch.Tensor) -> torch.Tensor:
    """The same as experts_loop in three torch._grouped_mm calls: one matmul kernel walks all the
    expert slices (offs = where each slice ends). float32/bfloat16 only; float64 falls back."""
    if x.dtype == torch.float64 or not hasattr(torch, "_grouped_mm"):
        return experts_loop(x, counts, w1, w3, w2)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end of each expert's slice
    g = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)  # (M, C) x (E, C, h) -> (M, h)
    u = torch._grouped_mm(x, w3.transpose(1, 2), offs=offs)  # (M, h)
    return torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)  # (M, h) x (E, h, C) -> (M, C)


EXPERT_IMPLS = {"loop": experts_loop, "grouped_mm": experts_grouped_mm}


# -----------------------------------------------------------------------------------------------
# Modules


class Experts(nn.Module):
    """n SwiGLU experts of hidden width h, stacked: w1, w3 (n, h, C) and w2 (n, C, h), laid out
    like n nn.Linear weights. Shared experts are the same thing applied to every token."""

    def __init__(self, n: int, C: int, h: int, init_std: float, out_std: float):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, h, C) * init_std)  # gate
        self.w3 = nn.Parameter(torch.randn(n, h, C) * init_std)  # up
        self.w2 = nn.Parameter(torch.randn(n, C, h) * out_std)  # down, residual-scaled like gpt's w2

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """All n experts on every token, summed: one SwiGLU of width n*h. x (N, C) -> (N, C)."""
        n, h, C = self.w1.shape
        g = x @ self.w1.reshape(n * h, C).T  # (N, n*h)
        u = x @ self.w3.reshape(n * h, C).T  # (N, n*h)
        return (F.silu(g) * u) @ self.w2.transpose(0, 1).reshape(C, n * h).T  # (N, n*h) -> (N, C)


class MoE(nn.Module):
    """Router + E routed experts + shared experts (+ Z zero experts). (B, T, C) -> (B, T, C).

    After each forward: self.aux_loss (a tensor gpt.GPT adds to the loss) and self.stats (detached
    diagnostics). In training, the expert loads accumulate until after_optimizer_step(), which
    updates the balancing bias and appends the step's load to self.load_log."""

    def __init__(self, cfg: MoEConfig, layer: Optional[int] = None):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        E, Z, C, h = cfg.n_experts, cfg.n_zero_experts, cfg.n_embd, cfg.expert_hidden
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)  # GPT-2 residual scaling, as gpt.GPT does
        self.router = nn.Linear(C, E + Z, bias=False)  # one score per expert, zero experts included
        self.experts = Experts(E, C, h, cfg.init_std, out_std)
        self.shared = Experts(cfg.n_shared, C, h, cfg.init_std, out_std) if cfg.n_shared else None
        # the balancing bias: changed by after_optimizer_step, never by gradients; saved in checkpoints
        self.register_buffer("bias", torch.zeros(E + Z))
        self.register_buffer("step_counts", torch.zeros(E + Z), persistent=False)  # since last step
        self.step_tokens = 0
        self.aux_loss: Optional[torch.Tensor] = None
        self.stats: dict = {}
        self.load_log: list[torch.Tensor] = []  # per optimizer step: assignments per expert (E+Z,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        cfg = self.cfg
        E, K = cfg.n_experts, cfg.top_k
        xf = x.reshape(B * T, C)  # (N, C)
        N = B * T
        # 1. route, in >= float32 (DeepSeek-V3 keeps the gate in fp32 under bf16/fp8 training)
        logits = self.router(xf).to(torch.promote_types(x.dtype, torch.float32))  # (N, E+Z)
        w, idx, scores = route(logits, self.bias, K, cfg.score, cfg.norm_topk, cfg.routed_scaling)
        # 2. dispatch the real pairs, grouped by expert; Switch capacity per expert (section 2.2)
        capacity = math.ceil(cfg.capacity_factor * N * K / E) if cfg.capacity_factor else 0
        d = sort_by_expert(idx, E, capacity)
        # index_select, not xf[token]: its backward is index_add_, deterministic on CPU, whereas the
        # backward of advanced indexing (index_put_ with accumulate) adds in a thread-dependent order
        xs = xf.index_select(0, d["token"])  # (M, C): gather each kept pair's token
        ys = EXPERT_IMPLS[cfg.dispatch](xs, d["counts"], self.experts.w1, self.experts.w3, self.experts.w2)
        ys = ys * w.reshape(-1)[d["pair"]].to(ys.dtype)[:, None]  # (M, C): times the gate weight
        out = torch.zeros_like(xf).index_add_(0, d["token"], ys)  # (N, C): scatter-add back per token
        # 3. zero experts (LongCat eq. 1): E_i(x) = x, so they add gate * x and cost no matmul
        is_zero = idx >= E  # (N, K)
        if cfg.n_zero_experts:
            out = out + (w * is_zero).sum(-1, keepdim=True).to(xf.dtype) * xf  # (N, 1) * (N, C)
        # 4. shared experts see every token
        if self.shared is not None:
            out = out + self.shared.dense(xf)
        self._losses_and_stats(logits, scores, idx, is_zero, d, B, T)
        return out.view(B, T, C)

    def _losses_and_stats(self, logits, scores, idx, is_zero, d, B, T):
        cfg = self.cfg
        E, Z, K, N = cfg.n_experts, cfg.n_zero_experts, cfg.top_k, B * T
        counts = torch.bincount(idx.reshape(-1), minlength=E + Z)  # (E+Z,) assignments before drops
        probs = normalised_scores(scores, E)  # (N, E) real experts only
        aux = logits.new_zeros(())
        terms = {}
        if cfg.balance == "aux":
            terms["aux"] = cfg.aux_alpha * switch_aux_loss(counts[:E], probs)
        if cfg.balance == "aux_free" and cfg.seq_aux_alpha:
            onehot = torch.zeros(N, E + Z, device=idx.device).scatter_(1, idx, 1.0)[:, :E]  # (N, E)
            terms["seq_aux"] = cfg.seq_aux_alpha * sequence_aux_loss(
                onehot.view(B, T, E), probs.view(B, T, E), K)
        if cfg.router_z_loss:
            terms["z"] = cfg.router_z_loss * router_z_loss(logits)
        for v in terms.values():
            aux = aux + v
        self.aux_loss = aux
        if self.training and torch.is_grad_enabled():  # balance on training batches only
            self.step_counts += counts.to(self.step_counts.dtype)
            self.step_tokens += N
        with torch.no_grad():
            load = counts[:E].float()
            real_per_token = K - is_zero.sum(-1)  # (N,)
            h, C = cfg.expert_hidden, cfg.n_embd
            kept = int(d["counts"].sum())
            # forward matmul FLOPs of this layer per token: router + shared + the kept real pairs
            flops = 2 * C * (E + Z) + 6 * C * h * (cfg.n_shared + kept / N)
            self.stats = dict(
                counts=counts.detach(), load_max_mean=float(load.max() / load.mean().clamp(min=1e-9)),
                dropped=d["dropped"], entropy=float(-(probs * probs.clamp(min=1e-20).log()).sum(-1).mean()),
                real_per_token=real_per_token.view(B, T),
                real_hist=torch.bincount(real_per_token, minlength=K + 1), flops_per_token=flops,
                **{k: float(v) for k, v in terms.items()})

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Called by gpt.train after every optimizer step: log the step's load, update the bias."""
        cfg = self.cfg
        E = cfg.n_experts
        counts, n_tok = self.step_counts.clone(), self.step_tokens
        if n_tok == 0:
            return
        if dist.is_available() and dist.is_initialized():  # every rank must apply the same update
            t = torch.cat([counts, counts.new_tensor([n_tok])])
            dist.all_reduce(t)
            counts, n_tok = t[:-1], int(t[-1])
        if cfg.balance == "aux_free":
            if cfg.target_real_experts:
                self.bias[:E] = budget_update(self.bias[:E], counts[:E], n_tok, cfg.top_k,
                                              cfg.target_real_experts, cfg.budget_mu)
            else:
                self.bias[:E] = aux_free_update(self.bias[:E], counts[:E], cfg.bias_gamma)
        self.load_log.append(counts.cpu())
        self.step_counts.zero_()
        self.step_tokens = 0


def moe_ffn(cfg: MoEConfig, layer: Optional[int] = None) -> nn.Module:
    """The MLPS["moe"] entry (gpt.Block calls it with its layer index): the dense SwiGLU for the
    first n_dense_layers layers (DeepSeek-V3 keeps its first 3 dense), an MoE after that."""
    if not isinstance(cfg, MoEConfig):
        raise ValueError("mlp='moe' needs the MoE options: build the model from a moe.MoEConfig "
                         "(`python gpt.py --mlp=moe` does that for you)")
    if layer is not None and layer < cfg.n_dense_layers:
        return gpt.SwiGLU(cfg)  # width cfg.hidden_size, the dense model's MLP
    return MoE(cfg, layer)


gpt.MLPS["moe"] = moe_ffn
gpt.CONFIG_CLASSES["moe"] = MoEConfig  # `python gpt.py --mlp=moe --n_experts=32` knows these options


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def active_params(model: gpt.GPT) -> int:
    """Parameters one token uses: everything except the routed experts it was not sent to. With
    zero experts and a budget target K_e, a token uses K_e real experts on average."""
    n = model.num_params()
    for m in moe_layers(model):
        per_expert = m.experts.w1[0].numel() * 3
        n -= per_expert * (m.cfg.n_experts - (m.cfg.target_real_experts or m.cfg.top_k))
    return int(n)


# -----------------------------------------------------------------------------------------------
# Demo: dense vs MoE at equal active parameters, the balancing variants, zero experts.


@dataclass
class DemoConfig:
    """`python moe.py --key=value`. Defaults: six 600-step runs of a 2-layer model, ~17 min on 2 cores."""

    variants: str = "dense,none,aux,aux_free_paper,aux_free,zero"  # names from VARIANTS, in order
    n_layer: int = 2
    n_embd: int = 128  # C; the dense SwiGLU is 8C/3 -> 352 wide
    block_size: int = 128  # T
    n_experts: int = 16  # E routed experts
    top_k: int = 3  # K; with 1 shared expert of width 88: 4 x 88 = 352 = the dense MLP's width
    expert_hidden: int = 88
    n_zero_experts: int = 8  # the zero variant: Z identity experts, top_k + 1 picks, target top_k real
    score: str = "sigmoid"
    routed_scaling: float = 3.0  # = top_k: the K normalised weights then sum to K, as the dense sum of
    #   K experts would (DeepSeek-V3's 2.5 does the same job). At 1.0 the routed output is an average,
    #   a third as large, and the experts learn a third as fast (docs/moe.md has the measured gap)
    bias_gamma: float = 3e-3  # aux-free bias speed; DeepSeek-V3's 1e-3 is the aux_free_paper variant.
    #   Why faster here: the bias must outrun the router's own drift, and our router learns with
    #   AdamW at lr 6e-3 (DeepSeek-V3: 2.2e-4, 27x slower) for 600 steps (theirs: ~10^5 steps).
    aux_alpha: float = 1e-2  # Switch's value
    dispatch: str = "grouped_mm"
    max_iters: int = 600
    batch_size: int = 8
    lr: float = 6e-3
    seed: int = 1337
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    out_dir: str = "out/moe"  # each variant's run, and the plots of runs other than the documented one


VARIANTS: dict[str, Optional[dict]] = {
    "dense": None,  # gpt.py's SwiGLU, the baseline at equal active parameters
    "none": dict(balance="none"),
    "aux": dict(balance="aux"),
    "aux_free": dict(balance="aux_free"),  # gamma = --bias_gamma, + DeepSeek-V3's seq-wise loss (1e-4)
    # gamma = 1e-3 moves a bias by at most 0.6 in 600 steps, too slow to catch up with this router
    "aux_free_paper": dict(balance="aux_free", bias_gamma=1e-3),
    # too fast: early on, when every token's hidden state looks alike, the whole batch flips between
    # experts from one step to the next (measured at 300 steps: val loss 5.09 vs 4.31 at 1e-3)
    "aux_free_fast": dict(balance="aux_free", bias_gamma=1e-2),
    "aux_free_cap": dict(balance="aux_free", capacity_factor=1.25),  # Switch's token dropping
    "softmax_none": dict(balance="none", score="softmax"),
    "zero": dict(balance="aux_free"),  # + LongCat zero experts: filled in by variant_config
}


def variant_config(name: str, dc: DemoConfig) -> gpt.GPTConfig:
    base = dict(n_layer=dc.n_layer, n_embd=dc.n_embd, block_size=dc.block_size)
    if VARIANTS[name] is None:
        return gpt.GPTConfig(**base)
    kw = dict(base, n_experts=dc.n_experts, top_k=dc.top_k, expert_hidden=dc.expert_hidden, score=dc.score,
              routed_scaling=dc.routed_scaling, bias_gamma=dc.bias_gamma, aux_alpha=dc.aux_alpha,
              dispatch=dc.dispatch)
    kw.update(VARIANTS[name])
    if name == "zero":  # one more pick per token, steered to use top_k real experts on average
        kw.update(n_zero_experts=dc.n_zero_experts, top_k=dc.top_k + 1, target_real_experts=dc.top_k)
    return MoEConfig(**kw)


def max_mean(counts: torch.Tensor) -> float:
    return float(counts.max() / counts.mean())


def bench_dispatch(dc: DemoConfig, reps: int = 20) -> list[tuple[str, float, float]]:
    """Validate, then time one FFN forward+backward at the demo's shape: the dense SwiGLU and the
    MoE layer with each expert implementation. Returns (name, ms, max |error| vs loop)."""
    cfg = variant_config("aux_free", dc)
    torch.manual_seed(dc.seed)
    x = torch.randn(dc.batch_size, dc.block_size, dc.n_embd)
    layers = {"dense SwiGLU": gpt.SwiGLU(gpt.GPTConfig(n_embd=dc.n_embd))}
    for impl in EXPERT_IMPLS:
        torch.manual_seed(dc.seed)
        layers[f"MoE, {impl}"] = MoE(dataclasses.replace(cfg, dispatch=impl))
    out = []
    with torch.no_grad():
        ref = layers["MoE, loop"](x)
        errs = {k: float((m(x) - ref).abs().max()) for k, m in layers.items() if k.startswith("MoE")}
    for name, layer in layers.items():
        err = errs.get(name, float("nan"))
        xr = x.clone().requires_grad_()
        for _ in range(3):  # warm-up
            layer(xr).square().mean().backward()
        t0 = time.perf_counter()
        for _ in range(reps):
            layer(xr).square().mean().backward()
        out.append((name, (time.perf_counter() - t0) / reps * 1e3, err))
    return out


def bench_step(dc: DemoConfig, names: tuple[str, ...] = ("dense", "aux_free", "zero"),
               reps: int = 15) -> dict[str, float]:
    """Median milliseconds of one whole training step (forward, backward, AdamW update, bias update)
    on TinyStories windows, per variant. The variants take turns step by step, so a slow spell of a
    shared machine hits them all alike instead of whichever happened to run then."""
    enc, _ = gpt.build_tokenizer(gpt.GPTConfig().vocab_size)
    tokens = gpt.load_tokens("train", enc)
    tc = gpt.TrainConfig(lr=dc.lr)
    runs = {}
    for name in names:
        torch.manual_seed(dc.seed)
        model = gpt.GPT(variant_config(name, dc))
        runs[name] = (model, gpt.make_adamw(model, tc), [])
    gen = torch.Generator().manual_seed(dc.seed)
    for rep in range(reps + 3):  # 3 warm-up rounds
        off = torch.randint(0, len(tokens) - dc.block_size - 1, (dc.batch_size,), generator=gen)
        x, y = gpt.get_batch(tokens, off, dc.block_size)
        for model, opt, times in runs.values():
            t0 = time.perf_counter()
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for m in moe_layers(model):
                m.after_optimizer_step()
            if rep >= 3:
                times.append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(times)) for name, (_, _, times) in runs.items()}


def run_variant(name: str, dc: DemoConfig) -> dict:
    cfg = variant_config(name, dc)
    tc = gpt.TrainConfig(batch_size=dc.batch_size, max_iters=dc.max_iters, warmup_iters=dc.max_iters // 10,
                         lr=dc.lr, eval_interval=10**9, eval_tokens=4096, log_interval=25, seed=dc.seed,
                         out_dir=str(Path(dc.out_dir) / name), ckpt_interval=10**9, overwrite=True,
                         num_threads=dc.num_threads)
    r = gpt.train(cfg, tc, verbose=False)
    model, hist = r["model"], r["history"]
    speeds = [h["tok_s"] for h in hist if "tok_s" in h]
    speeds = speeds[1:] or speeds  # the first interval includes the first evaluation
    layers = moe_layers(model)
    logs = [torch.stack(m.load_log) for m in layers]  # each (steps, E+Z)
    tail = max(1, dc.max_iters // 5)  # the last 20% of training
    res = dict(name=name, cfg=cfg, model=model, tokenizer=r["tokenizer"], history=hist,
               val_loss=r["final"]["val_loss"], tok_s=sum(speeds) / len(speeds), logs=logs,
               params=model.num_params(), active=active_params(model))
    if layers:
        E = cfg.n_experts
        res["load_tail"] = max(max_mean(lg[-tail:, :E].sum(0)) for lg in logs)  # worst layer
        res["load_step"] = max(float((lg[-tail:, :E].amax(1) / lg[-tail:, :E].mean(1)).mean()) for lg in logs)
        res["load_first"] = max(max_mean(lg[:tail, :E].sum(0)) for lg in logs)
    return res


@torch.no_grad()
def zero_expert_report(res: dict, val_tokens: np.ndarray, n_windows: int = 64) -> dict:
    """Real experts per token on validation windows, averaged over the MoE layers: the histogram and
    the token ids that use the fewest / most."""
    model, cfg = res["model"], res["cfg"]
    model.eval()
    T = cfg.block_size
    x = torch.from_numpy(val_tokens[: n_windows * T].astype(np.int64)).view(n_windows, T)  # (W, T)
    model(x)
    per_layer = torch.stack([m.stats["real_per_token"] for m in moe_layers(model)])  # (L, W, T)
    hist = torch.stack([m.stats["real_hist"] for m in moe_layers(model)]).sum(0)  # (K+1,)
    avg = per_layer.float().mean(0).flatten()  # (W*T,) real experts per token, averaged over layers
    ids = x.flatten()
    sums = torch.zeros(cfg.vocab_size).index_add_(0, ids, avg)
    cnt = torch.bincount(ids, minlength=cfg.vocab_size).float()
    mean = sums / cnt.clamp(min=1)
    frequent = (cnt >= 20).nonzero().flatten()
    order = frequent[mean[frequent].argsort()]
    return dict(hist=hist, mean=float(avg.mean()), fewest=order[:8].tolist(),
                most=order[-8:].flip(0).tolist(), token_mean=mean, token_count=cnt)


def plot_demo(results: list[dict], path_load: Path, path_loss: Path, zero: Optional[dict]) -> None:
    plt = gpt.pyplot()
    moes = [r for r in results if r["logs"]]
    if moes:
        fig, axes = plt.subplots(len(moes), 1, figsize=(9, 2.2 * len(moes)), squeeze=False)
        for ax, r in zip(axes[:, 0], moes):
            E = r["cfg"].n_experts
            rows = [(lg[:, :E] / lg[:, :E].mean(1, keepdim=True)).T for lg in r["logs"]]  # (E, steps)
            im = ax.imshow(torch.cat(rows).numpy(), aspect="auto", cmap="magma", vmin=0, vmax=3,
                           interpolation="nearest")
            for i in range(1, len(rows)):
                ax.axhline(i * E - 0.5, color="white", lw=0.8)
            ax.set_title(f"{r['name']}: expert load / mean (rows: layer x expert)", fontsize=9)
            ax.set_ylabel("expert")
            fig.colorbar(im, ax=ax, fraction=0.02)
        axes[-1, 0].set_xlabel("training step")
        gpt.save_figure(fig, path_load, dpi=110)
    ncol = 2 if zero else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 3.8), squeeze=False)
    ax = axes[0, 0]
    for r in results:
        tr = [(h["iter"], h["train_loss"]) for h in r["history"] if "train_loss" in h]
        ax.plot(*zip(*tr), label=f"{r['name']} (val {r['val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if zero:
        ax = axes[0, 1]
        r, K = zero["res"], zero["res"]["cfg"].top_k
        for li, lg in enumerate(r["logs"]):
            real = lg[:, :r["cfg"].n_experts].sum(1) / lg.sum(1) * K  # real experts per token, per step
            ax.plot(real.numpy(), label=f"layer {moe_layers(r['model'])[li].layer}")
        ax.axhline(r["cfg"].target_real_experts, color="k", ls="--", lw=0.8, label="target K_e")
        ax.set_xlabel("step")
        ax.set_ylabel("real experts per token (mean)")
        ax.set_title(f"zero experts: {K} picks, Z={r['cfg'].n_zero_experts}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    gpt.save_figure(fig, path_loss, dpi=110)


def parse_demo_args(argv: list[str]) -> DemoConfig:
    dc = gpt.config_from_args(DemoConfig, argv, __doc__, "moe.py")
    unknown = [v for v in dc.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    return dc


def main(argv: list[str]) -> None:
    try:
        dc = parse_demo_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(dc.seed)
    if dc.num_threads:
        torch.set_num_threads(dc.num_threads)
    print(f"# one FFN layer, forward + backward, B={dc.batch_size} T={dc.block_size} C={dc.n_embd}")
    print("| layer | ms | max abs err vs loop |\n|---|---|---|")
    for name, ms, err in bench_dispatch(dc):
        print(f"| {name} | {ms:.2f} | {'' if math.isnan(err) else f'{err:.1e}'} |")
    steps = bench_step(dc)
    print("\n# one whole training step (fwd + bwd + AdamW), median of 15, variants interleaved")
    print("| model | ms per step | / dense |\n|---|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.1f} | {ms / steps['dense']:.2f}x |")
    results = []
    for name in dc.variants.split(","):
        t0 = time.time()
        results.append(run_variant(name, dc))
        print(f"{name}: val loss {results[-1]['val_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    print(f"\n# {dc.n_layer} layers, C={dc.n_embd}, T={dc.block_size}, batch {dc.batch_size}, "
          f"{dc.max_iters} steps; MoE: E={dc.n_experts}, top-{dc.top_k}, 1 shared, width {dc.expert_hidden}, "
          f"{dc.score} router")
    print("| variant | params | active | val loss | max/mean load, last 20% | per-step max/mean | "
          "first 20% | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        lt = f"{r['load_tail']:.3f}" if "load_tail" in r else "-"
        ls = f"{r['load_step']:.3f}" if "load_step" in r else "-"
        lf = f"{r['load_first']:.2f}" if "load_first" in r else "-"
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['val_loss']:.4f} | "
              f"{lt} | {ls} | {lf} | {r['tok_s']:.0f} |")
    zero = None
    zr = next((r for r in results if r["name"] == "zero"), None)
    if zr:
        enc = zr["tokenizer"]
        rep = zero_expert_report(zr, gpt.load_tokens("valid", enc))
        zero = dict(res=zr, **rep)
        K = zr["cfg"].top_k
        hist = rep["hist"].float() / rep["hist"].sum()
        print(f"\n# zero experts: real experts per token on validation text "
              f"(target {zr['cfg'].target_real_experts:g} of {K} picks), mean {rep['mean']:.2f}")
        print("| real experts | " + " | ".join(str(i) for i in range(K + 1)) + " |")
        print("|---" * (K + 2) + "|")
        print("| share of tokens | " + " | ".join(f"{p:.1%}" for p in hist.tolist()) + " |")
        def show(ids: list[int]) -> str:
            return ", ".join(f"{enc.decode([i])!r} {rep['token_mean'][i]:.2f}" for i in ids)

        print(f"fewest real experts (tokens seen >= 20 times): {show(rep['fewest'])}")
        print(f"most real experts: {show(rep['most'])}")
    documented = gpt.is_default(dc, ("num_threads", "out_dir"))
    paths = [gpt.plot_path(name, documented, dc.out_dir) for name in ("moe_load.png", "moe_loss.png")]
    plot_demo(results, *paths, zero)
    print(f"\nplots: {paths[0]}, {paths[1]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:  # gpt.py's command line with the MoE chosen: the same as gpt.py --mlp=moe
        gpt.main(["--mlp=moe"] + sys.argv[2:])
    else:
        main(sys.argv[1:])
