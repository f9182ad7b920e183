"""
muon.py - the Muon optimizer, Moonlight's scaling rules, and MuonClip (QK-Clip), raced against AdamW.

Muon ("MomentUm Orthogonalized by Newton-schulz") keeps a momentum of each weight matrix's gradient
and, instead of stepping along it, steps along its *orthogonalised* version: the matrix U V^T with the
same singular vectors but every singular value set to 1. A handful of matrix multiplications (a
Newton-Schulz iteration) computes it, so the update moves all directions of the matrix by the same
amount instead of being dominated by a few large ones. Moonlight made it a drop-in for AdamW (weight
decay, and an update RMS matched to AdamW's so the same learning rate works); Kimi K2 added QK-Clip,
which rescales a head's query/key weights after the step whenever its attention logits grow past tau.

References
- Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
  kellerjordan.github.io/posts/muon (the quintic Newton-Schulz and its coefficients; github.com/
  KellerJordan/Muon). Bernstein & Newhouse 2024, arXiv:2409.20325 (why orthogonalise: steepest
  descent under the spectral norm).
- Moonlight: Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982, section 2.2
  (weight decay, eq. 3; update scaled by 0.2 * sqrt(max(A, B)), eq. 4) and section 3 (SVD entropy).
- Kimi K2: Kimi Team 2025, arXiv:2507.20534, section 2.1 and Algorithm 1 (MuonClip / QK-Clip).
- torch.optim.Muon (PyTorch >= 2.9): the tests check this file against it, update for update.

Run it
    python muon.py                        # the demo: AdamW vs Muon race, NS cost, SVD entropy, QK-Clip
    python muon.py --steps=40 --adamw_lrs=6e-3 --muon_lrs=6e-3 --clip_steps=20   # a quick look
    python gpt.py --optimizer=muon --qk_clip_tau=100   # gpt.py's training with MuonClip
    python muon.py train --lr=6e-3        # the same as gpt.py --optimizer=muon
    torchrun --standalone --nproc_per_node=2 gpt.py --optimizer=muon   # DDP: Newton-Schulz split across ranks

Not covered: Muon's theory beyond a paragraph (see Bernstein & Newhouse), the ZeRO-1 sharded
momentum of Moonlight's distributed version (here every rank keeps all momentum buffers and only the
Newton-Schulz work is split), MLA attention (K2's setting; our heads are GQA, see qk_clip_), Polar
Express / other coefficient schedules, and learning-rate transfer across widths (muP).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

import gpt

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# Newton-Schulz: orthogonalise a matrix with matrix multiplications only.
#
# If G = U S V^T (SVD), then G G^T G = U S^3 V^T: an odd polynomial of G acts on each singular value
# separately and leaves U and V alone. Iterating X <- p(X) with p(x) = a x + b x^3 + c x^5, i.e.
#     A = X X^T,   X <- a X + (b A + c A^2) X,
# drives every singular value toward the fixed band of p while keeping U and V. Dividing G by its
# Frobenius norm first puts all singular values in [0, 1] (sigma_max <= ||G||_F).
#
# Why (a, b, c) = (3.4445, -4.7750, 2.0315) (Jordan 2024): the slope at 0 is a = 3.4445, so a small
# singular value grows ~3.4x per step (the classic cubic Newton-Schulz, p(x) = 1.5x - 0.5x^3, grows
# it only 1.5x and needs ~3x more steps). Such a steep p overshoots 1, so it cannot converge to 1
# exactly: p(1) = a + b + c = 0.701. The coefficients were tuned so that after 5 steps any input
# singular value in [2e-3, 1] lands in about [0.5, 1.2], and one in [1e-2, 1] in [0.68, 1.13] (our
# test checks this band against the scalar polynomial). Muon only needs "roughly orthogonal": updates
# U S' V^T with S' in this band train as well as exact U V^T, at a fraction of the cost.
# Everything is a matmul, so it runs well in bf16 on a GPU; on a CPU bf16 matmuls are slow, so fp32.

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan 2024; torch.optim.Muon's defaults
NS_STEPS = 5
NS_EPS = 1e-7


def resolve_ns_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (fast tensor cores, the published choice), fp32 on CPU."""
    if ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}[ns_dtype]


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS, coefficients: tuple = NS_COEFFICIENTS,
                  eps: float = NS_EPS, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Approximately orthogonalise G: U S' V^T with S' in ~[0.5, 1.2] where G = U S V^T.

    G is a matrix (rows, cols); a weight with more dimensions (a conv filter (out, in, kh, kw)) is
    treated as the matrix (out, in*kh*kw) and reshaped back. Returns G's shape, in `dtype`
    (default: bf16 on CUDA, fp32 elsewhere)."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    dtype = dtype or resolve_ns_dtype("auto", G.device)
    X = G.reshape(G.shape[0], -1).to(dtype)  # (m, n)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.mT  # (n, m): work with the short side so the Gram matrix A is min(m, n)^2
    X = X / X.norm().clamp(min=eps)  # all singular values now in [0, 1]
    for _ in range(steps):
        A = X @ X.mT  # (k, k), k = min(m, n)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2, (k, k); fused like torch.optim.Muon
        X = torch.addmm(X, B, X, beta=a)  # a X + B X = a X + b X^3 + c X^5, (k, max(m, n))
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def newton_schulz_reference(G: torch.Tensor, steps: int = NS_STEPS,
                            coefficients: tuple = NS_COEFFICIENTS) -> torch.Tensor:
    """The same map computed through the SVD in float64: U p^steps(S / ||G||_F) V^T. Slow, exact."""
    a, b, c = coefficients
    U, S, Vh = torch.linalg.svd(G.reshape(G.shape[0], -1).double(), full_matrices=False)
    s = S / S.norm()  # ||G||_F = sqrt(sum of squared singular values)
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return (U * s) @ Vh  # (m, n)


def update_scale(shape: torch.Size, adjust_lr_fn: str) -> float:
    """The factor Muon multiplies the learning rate by for a matrix of this shape (rows A, cols B).

    An orthogonal (A, B) matrix has RMS sqrt(min(A, B) / (A B)) = 1 / sqrt(max(A, B)): the raw update
    shrinks as matrices grow. "match_rms_adamw" (Moonlight eq. 4) rescales it to RMS 0.2, the typical
    RMS of an AdamW update, so AdamW's learning rate and weight decay carry over unchanged.
    "original" (Jordan) only corrects tall matrices: sqrt(max(1, A / B))."""
    A, B = shape[0], math.prod(shape[1:])
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, A / B))
    raise ValueError(f"adjust_lr_fn must be 'match_rms_adamw' (Moonlight) or 'original' (Jordan), "
                     f"not {adjust_lr_fn!r}")


def svd_entropy(W: torch.Tensor) -> float:
    """Normalised entropy of the squared singular values, in [0, 1] (Alter et al. 2000; Moonlight
    section 3): H = -1/log(n) sum_i p_i log p_i with p_i = s_i^2 / sum_j s_j^2. 1 = all directions
    equally used, 0 = rank one. Moonlight reports higher values for Muon-trained matrices."""
    s = torch.linalg.svdvals(W.detach().reshape(W.shape[0], -1).double())
    p = s.pow(2) / s.pow(2).sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(s)))


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Which rank orthogonalises each matrix: the largest first, each to the least-loaded rank."""
    load, owner = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(world), key=lambda r: load[r])
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


# -----------------------------------------------------------------------------------------------
# QK-Clip (Kimi K2, section 2.1, Algorithm 1). Muon at high learning rates can make a few heads'
# attention logits grow without bound (q.k / sqrt(hs) in the thousands), which saturates the softmax
# and eventually diverges. K2's fix never touches the forward pass: the forward records each head's
# largest logit S_max^h, and after the optimizer step every head with S_max^h > tau has its query and
# key weights scaled by sqrt(gamma_h) each, gamma_h = tau / S_max^h. The logit is bilinear in W_q and
# W_k, so the same input would now give exactly tau. Heads below tau are untouched.


@torch.no_grad()
def qk_clip_(attn: gpt.Attention, max_logit: torch.Tensor, tau: float) -> torch.Tensor:
    """Rescale attn.wq / attn.wk in place so each head's max logit would be <= tau. Returns gamma (nh,).

    GQA: a key head is shared by nh/nkv query heads, so shrinking it would also shrink heads that
    were fine. K2's MLA has the same problem with its *shared* rotary key k^R and solves it by
    leaving k^R alone and scaling that head's rotary query q^R by the whole gamma. We do the same:
    with nkv == nh (MHA) q and k rows get sqrt(gamma) each (K2's rule); with shared keys (GQA, MQA)
    the query rows get gamma and the keys are untouched. Either way every head's logits scale by
    exactly its own gamma (RoPE is a rotation, so it commutes with scaling q or k)."""
    cfg = attn.cfg
    if cfg.qk_norm:
        raise ValueError("QK-Clip rescales W_q and W_k, which qk_norm undoes: use one or the other")
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_size
    gamma = torch.where(max_logit > tau, tau / max_logit, torch.ones_like(max_logit))  # (nh,)
    gamma = gamma.to(attn.wq.weight.dtype)
    gq = gamma.sqrt() if nkv == nh else gamma
    attn.wq.weight.view(nh, hs, -1).mul_(gq.view(nh, 1, 1))  # (nh, hs, C): head h's rows of W_q
    if attn.wq.bias is not None:
        attn.wq.bias.view(nh, hs).mul_(gq.view(nh, 1))
    if nkv == nh:
        attn.wk.weight.view(nh, hs, -1).mul_(gamma.sqrt().view(nh, 1, 1))  # (nh, hs, C)
        if attn.wk.bias is not None:
            attn.wk.bias.view(nh, hs).mul_(gamma.sqrt().view(nh, 1))
    return gamma


class QKClip:
    """Records every attention layer's per-head max logit during *training* forwards (the max over
    micro-batches under gradient accumulation, and over ranks under DDP) and clips after each step.

    tau = inf records without clipping (to watch logits grow). `history` holds the largest logit of
    each step, over all layers and heads, before the clip."""

    def __init__(self, model: nn.Module, tau: float = 100.0):
        self.tau = tau
        self.attns = [m for m in model.modules() if isinstance(m, gpt.Attention)]
        if not self.attns:
            raise ValueError("QK-Clip found no gpt.Attention layer in the model")
        if any(a.cfg.qk_norm for a in self.attns):
            raise ValueError("QK-Clip rescales W_q and W_k, which qk_norm undoes: use one or the other "
                             "(make_muon(..., qk_clip_tau=0) turns QK-Clip off)")
        self.running: dict[gpt.Attention, torch.Tensor] = {}
        self.history: list[float] = []
        for a in self.attns:
            a.register_forward_pre_hook(self._before)
            a.register_forward_hook(self._after)

    @staticmethod
    def _before(module, args):
        module.record_max_logit = module.training  # the extra Q K^T only in training forwards

    def _after(self, module, args, output):
        if module.training and module.max_logit is not None:
            prev = self.running.get(module)
            self.running[module] = module.max_logit if prev is None else torch.maximum(prev, module.max_logit)

    @torch.no_grad()
    def apply(self) -> Optional[torch.Tensor]:
        """Clip every over-threshold head; returns the (L, nh) maxima it saw (None if no forward)."""
        if not self.running:
            return None
        S = torch.stack([self.running[a] for a in self.attns])  # (L, nh)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(S, op=dist.ReduceOp.MAX)  # every rank clips the same heads identically
        if math.isfinite(self.tau):
            for a, s in zip(self.attns, S):
                qk_clip_(a, s, self.tau)
        self.history.append(float(S.max()))
        self.running.clear()
        return S


# -----------------------------------------------------------------------------------------------
# The optimizer: Muon for hidden matrices, AdamW for everything else, in one object.
#
# Muon step for a matrix W with gradient G (torch.optim.Muon / Jordan's muon.py conventions):
#     M <- mu M + (1 - mu) G                         momentum as an EMA (lerp)
#     U  = (1 - mu) G + mu M   (Nesterov)  or  M     look-ahead along the momentum
#     O  = NewtonSchulz(U)                            ~orthogonal, singular values ~1
#     W <- W (1 - lr wd)                              decoupled weight decay (Moonlight eq. 3)
#     W <- W - lr * scale(shape) * O                  scale: update_scale (Moonlight eq. 4)
# Moonlight writes the momentum as M <- mu M + G; that is (1 - mu)^-1 times ours, and Newton-Schulz
# divides by the Frobenius norm, so the update is the same. The embedding, the output head (the
# paper: "Muon is for hidden layers"), norm gains and biases are not hidden matrices and use AdamW.


class Muon(torch.optim.Optimizer):
    """Muon + auxiliary AdamW. Each param group has `use_muon` (default True); groups with
    use_muon=False are updated by AdamW with their own `betas`, `adam_eps` and `weight_decay`.

    Under torch.distributed (gradients already averaged by DDP), each rank orthogonalises its share
    of the matrices and the results are all-gathered, so every rank applies identical updates."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_coefficients: tuple = NS_COEFFICIENTS,
                 eps: float = NS_EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str = "match_rms_adamw",
                 ns_dtype: str = "auto", betas: tuple = (0.9, 0.95), adam_eps: float = 1e-8,
                 qk_clip: Optional[QKClip] = None):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got {lr}, "
                             f"{weight_decay}, {momentum}")
        update_scale((1, 1), adjust_lr_fn)  # fails early on an unknown name
        resolve_ns_dtype(ns_dtype, torch.device("cpu"))
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, betas=tuple(betas),
                        adam_eps=adam_eps, use_muon=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(f"Muon: complex parameters are not supported (shape {tuple(p.shape)})")
                if group["use_muon"] and p.ndim < 2:
                    raise ValueError(
                        f"Muon orthogonalises matrices, but got a {p.ndim}-D parameter of shape "
                        f"{tuple(p.shape)}: put vectors (norm gains, biases) in a group with use_muon=False "
                        "(AdamW), or build the optimizer with make_muon(model, tc), which routes them")
        self.qk_clip = qk_clip

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        if p.grad.is_sparse:
            raise RuntimeError(f"Muon: sparse gradients are not supported (shape {tuple(p.shape)})")
        return p.grad

    def _adamw(self, group: dict) -> None:
        """AdamW (Loshchilov & Hutter 2019), the same arithmetic as torch.optim.AdamW."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["adam_eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = self._grad(p)
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            p.mul_(1 - lr * wd)  # decoupled weight decay
            m.lerp_(g, 1 - beta1)  # first moment
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # second moment
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)  # bias-corrected sqrt(v) + eps
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))

    def _orthogonalise(self, work: list[tuple[torch.Tensor, dict, torch.Tensor]]) -> list[torch.Tensor]:
        """Newton-Schulz of every update in `work`; under torch.distributed each rank does its share."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        # NS cost of an (m, n) matrix, m <= n: steps * (2 m^2 n + m^3) multiply-adds (X X^T is m^2 n,
        # A^2 is m^3, (bA + cA^2) X is m^2 n); the steps are the same for all, so they drop out
        shapes = [sorted((u.shape[0], u.numel() // u.shape[0])) for _, _, u in work]
        costs = [2 * m * m * n + m ** 3 for m, n in shapes]
        owner = assign_owners(costs, world)
        out: list[Optional[torch.Tensor]] = [None] * len(work)
        for i, (p, g, u) in enumerate(work):
            if owner[i] == rank:
                out[i] = newton_schulz(u, g["ns_steps"], g["ns_coefficients"], g["eps"],
                                       resolve_ns_dtype(g["ns_dtype"], u.device))
        if world == 1:
            return out
        # All-gather: each rank packs its results into one flat buffer, padded to the largest share.
        mine = [i for i in range(len(work)) if owner[i] == rank]
        shares = [sum(work[i][2].numel() for i in range(len(work)) if owner[i] == r) for r in range(world)]
        device = work[0][2].device
        flat = torch.zeros(max(shares), device=device, dtype=torch.float32)
        off = 0
        for i in mine:
            n = out[i].numel()
            flat[off:off + n] = out[i].reshape(-1)
            off += n
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        for r in range(world):
            off = 0
            for i in (i for i in range(len(work)) if owner[i] == r):
                n = work[i][2].numel()
                out[i] = gathered[r][off:off + n].view(work[i][2].shape)
                off += n
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (param, group, Nesterov update before orthogonalisation)
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw(group)
                continue
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p)
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)  # M <- mu M + (1 - mu) G
                work.append((p, group, g.lerp(buf, mu) if group["nesterov"] else buf))
        if work:
            for (p, group, _), O in zip(work, self._orthogonalise(work)):
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled: the *unscaled* lr
                p.add_(O.view(p.shape), alpha=-group["lr"] * update_scale(p.shape, group["adjust_lr_fn"]))
        if self.qk_clip is not None:
            self.qk_clip.apply()
        return loss


def split_params(model: nn.Module) -> tuple[list, list, list]:
    """(hidden matrices -> Muon, embeddings and output head -> AdamW with decay, vectors -> AdamW).
    Tied weights appear once (model.parameters() deduplicates)."""
    not_hidden = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "output", None)
    if isinstance(head, nn.Linear):
        not_hidden.add(id(head.weight))
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.ndim >= 2 and id(p) not in not_hidden]
    embed = [p for p in params if p.ndim >= 2 and id(p) in not_hidden]
    vectors = [p for p in params if p.ndim < 2]
    return hidden, embed, vectors


@dataclass
class MuonConfig(gpt.TrainConfig):
    """gpt.py's TrainConfig plus Muon's options: `python gpt.py --optimizer=muon --qk_clip_tau=50`."""

    optimizer: str = "muon"
    muon_momentum: float = 0.95  # mu of the momentum EMA (Jordan 2024; Moonlight)
    ns_steps: int = NS_STEPS  # Newton-Schulz iterations per update
    adjust_lr_fn: str = "match_rms_adamw"  # match_rms_adamw (Moonlight eq. 4) | original (Jordan)
    qk_clip_tau: float = 100.0  # MuonClip threshold on the max attention logit (Kimi K2: 100); 0 = off


def make_muon(model: nn.Module, tc: gpt.TrainConfig) -> Muon:
    """gpt.OPTIMIZERS["muon"]: Muon on hidden matrices, AdamW on the rest, one learning rate (tc.lr)
    for both - Moonlight's scaling makes AdamW's rate right for Muon too. With qk_clip_tau > 0 it is
    MuonClip: QK-Clip after every step (K2 uses tau = 100); 0 turns it off (no extra logit work).
    Muon's options come from a MuonConfig; a plain TrainConfig gets MuonConfig's defaults."""
    mc = tc if isinstance(tc, MuonConfig) else MuonConfig()
    hidden, embed, vectors = split_params(model)
    groups = [dict(params=hidden, use_muon=True, weight_decay=tc.weight_decay, initial_lr=tc.lr),
              dict(params=embed, use_muon=False, weight_decay=tc.weight_decay, initial_lr=tc.lr),
              dict(params=vectors, use_muon=False, weight_decay=0.0, initial_lr=tc.lr)]
    clip = QKClip(model, mc.qk_clip_tau) if mc.qk_clip_tau > 0 else None
    return Muon([g for g in groups if g["params"]], lr=tc.lr, momentum=mc.muon_momentum,
                ns_steps=mc.ns_steps, adjust_lr_fn=mc.adjust_lr_fn, betas=(tc.beta1, tc.beta2), qk_clip=clip)


gpt.OPTIMIZERS["muon"] = make_muon
gpt.CONFIG_CLASSES["muon"] = MuonConfig


# -----------------------------------------------------------------------------------------------
# The demo: tune, race, measure.


@dataclass
class DemoConfig:
    """The race: a tiny GPT trained by AdamW and by Muon on the same tokens, each at its best LR."""

    n_layer: int = 4
    n_embd: int = 128  # C
    n_head: int = 4  # nh
    n_kv_head: int = 2  # nkv (GQA, like gpt.py's default)
    block_size: int = 128  # T: half gpt.py's default, so the demo fits in minutes on a CPU
    batch_size: int = 8  # windows per step: 1,024 tokens
    steps: int = 150  # optimizer steps of every run (warmup + cosine)
    warmup: int = 15
    adamw_lrs: str = "3e-3,6e-3,1.2e-2"  # the grid each optimizer picks its learning rate from
    muon_lrs: str = "3e-3,6e-3,1.2e-2"  # Moonlight scaling: AdamW-sized rates are the right range
    eval_interval: int = 25  # steps between validation evaluations
    eval_tokens: int = 8192  # the first this many val tokens: the curves, LR choice, steps-to-target
    clip_lr: float = 0.05  # the "aggressive" learning rate of the QK-Clip experiment
    clip_steps: int = 80
    tau: float = 0.0  # QK-Clip threshold of the experiment; 0 = half the unclipped run's peak logit
    # (K2 uses 100; a model this small never gets there, so the default gives the clip work to do)
    timing_reps: int = 20  # repetitions when timing one optimizer step
    seed: int = 1337
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    out_dir: str = "out/muon"  # plots of runs other than the documented default go here


def demo_configs(dc: DemoConfig, optimizer: str, lr: float, steps: int, out_dir: str,
                 qk_clip_tau: float = 0.0) -> tuple[gpt.GPTConfig, MuonConfig]:
    """gpt.py configs for one demo run. gpt.train evaluates the whole val split (179k tokens) when a
    schedule ends, which costs more than a short run here; so we run a schedule of steps + 1 and
    stop after `steps` (stop_at), and evaluate ourselves: the last learning rate differs by <0.1%."""
    cfg = gpt.GPTConfig(n_layer=dc.n_layer, n_embd=dc.n_embd, n_head=dc.n_head, n_kv_head=dc.n_kv_head,
                        block_size=dc.block_size)
    tc = MuonConfig(batch_size=dc.batch_size, max_iters=steps + 1, stop_at=steps,
                    warmup_iters=min(dc.warmup, steps // 5), lr=lr, optimizer=optimizer,
                    eval_interval=dc.eval_interval, eval_tokens=dc.eval_tokens, log_interval=steps,
                    seed=dc.seed, out_dir=out_dir, ckpt_interval=10 ** 9, num_threads=dc.num_threads,
                    qk_clip_tau=qk_clip_tau)
    return cfg, tc


def run(dc: DemoConfig, optimizer: str, lr: float, out_dir: str, steps: Optional[int] = None,
        qk_clip_tau: float = 0.0) -> dict:
    """One gpt.train run; returns its val curve on the first eval_tokens val tokens (step, loss,
    training seconds with evaluation excluded) and the trained model."""
    steps = steps or dc.steps
    cfg, tc = demo_configs(dc, optimizer, lr, steps, out_dir, qk_clip_tau)
    res = gpt.train(cfg, tc, verbose=False)
    enc, hist = res["tokenizer"], res["history"]
    # train_time: seconds spent in optimizer steps so far, evaluations excluded
    pts = [(h["iter"], h["val_loss"], h["train_time"]) for h in hist if "val_loss" in h]
    train_s = hist[-1]["train_time"]
    val = gpt.load_tokens("valid", enc)
    last = gpt.evaluate(res["model"], val, gpt.token_byte_lengths(enc), cfg.block_size, tc.batch_size,
                        dc.eval_tokens)["loss"]  # the same tokens as the curve
    pts.append((steps, last, train_s))
    return dict(curve=pts, model=res["model"], lr=lr, clip=getattr(res["optimizer"], "qk_clip", None),
                train_s=train_s, final=last, val=val, enc=enc, cfg=cfg)


def whole_split_loss(r: dict) -> float:
    return gpt.evaluate(r["model"], r["val"], gpt.token_byte_lengths(r["enc"]), r["cfg"].block_size,
                        8, 0)["loss"]


def steps_to_reach(curve: list, target: float) -> Optional[float]:
    """First step at which the val curve reaches `target`, linearly interpolated between evals."""
    for (s0, l0, _), (s1, l1, _) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else float(s0)
    return None


def time_steps(dc: DemoConfig) -> dict:
    """Median milliseconds of forward+backward and of each optimizer's step on the demo model, and of
    the Newton-Schulz calls alone (one per hidden matrix, as Muon runs them)."""
    cfg, tc = demo_configs(dc, "adamw", 1e-3, dc.steps, "unused")
    enc, _ = gpt.build_tokenizer(cfg.vocab_size)
    tokens = gpt.load_tokens("train", enc)
    torch.manual_seed(dc.seed)
    model = gpt.GPT(cfg)
    x, y = gpt.get_batch(tokens, torch.randint(0, len(tokens) - cfg.block_size - 1, (dc.batch_size,)),
                         cfg.block_size)

    def median_ms(fn):
        fn()  # warm-up
        ts = []
        for _ in range(dc.timing_reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e3 * sorted(ts)[len(ts) // 2]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()

    out = dict(fwd_bwd=median_ms(fwd_bwd))
    out["adamw_step"] = median_ms(gpt.make_adamw(model, tc).step)  # steps on the same gradients
    out["muon_step"] = median_ms(make_muon(model, tc).step)  # tc: qk_clip_tau = 0, no clip work
    hidden = split_params(model)[0]
    out["ns"] = median_ms(lambda: [newton_schulz(p.grad) for p in hidden])
    return out


def plot_race(runs: dict, path: Path, title: str) -> None:
    fig, axes = gpt.pyplot().subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        steps, loss, secs = zip(*r["curve"])
        axes[0].plot(steps, loss, "o-", ms=3, label=f"{name} (lr {r['lr']:g})")
        axes[1].plot(secs, loss, "o-", ms=3, label=f"{name} (lr {r['lr']:g})")
    for ax, xl in zip(axes, ("optimizer step", "training seconds (evaluation excluded)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        lo = min(min(l for _, l, _ in r["curve"]) for r in runs.values())
        ax.set_ylim(lo - 0.1, lo + 2.0)
    fig.suptitle(title)
    gpt.save_figure(fig, path)


def plot_clip(runs: dict, tau: float, path: Path, title: str) -> None:
    fig, axes = gpt.pyplot().subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        axes[0].plot(range(1, len(r["clip"].history) + 1), r["clip"].history, label=name)
        steps, loss, _ = zip(*r["curve"])
        axes[1].plot(steps, loss, "o-", ms=3, label=name)
    axes[0].axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("max attention logit (all layers, heads)")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("val loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    gpt.save_figure(fig, path)


def demo(dc: DemoConfig) -> dict:
    if dc.num_threads:
        torch.set_num_threads(dc.num_threads)
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="muon_demo_")
    # 1. Tune: every learning rate of each grid is a full run; the best final val loss wins.
    #    (loss on the first eval_tokens val tokens; the winners are evaluated on the whole split below)
    grid = {"AdamW": ("adamw", [float(v) for v in dc.adamw_lrs.split(",")]),
            "Muon": ("muon", [float(v) for v in dc.muon_lrs.split(",")])}
    best, tuning = {}, []
    for name, (opt, lrs) in grid.items():
        for lr in lrs:
            r = run(dc, opt, lr, f"{tmp}/{opt}_{lr:g}")
            tuning.append((name, lr, r["final"], r["train_s"]))
            print(f"{name:5s} lr {lr:<8g} val loss {r['final']:.4f}  ({r['train_s']:.0f} s training)",
                  flush=True)
            if name not in best or r["final"] < best[name]["final"]:
                best[name] = r
    adamw, muon_r = best["AdamW"], best["Muon"]
    whole = {name: whole_split_loss(r) for name, r in best.items()}
    # 2. Steps for Muon to reach AdamW's final loss (both on the first eval_tokens val tokens).
    target = adamw["curve"][-1][1]
    reach = steps_to_reach(muon_r["curve"], target)
    # 3. Cost of a step, and of Newton-Schulz alone.
    ms = time_steps(dc)
    # 4. Singular-value entropy of the trained hidden matrices.
    ent = {}
    for name, r in best.items():
        hidden = split_params(r["model"])[0]
        ent[name] = sum(map(svd_entropy, hidden)) / len(hidden)
    # 5. QK-Clip at an aggressive learning rate: record-only (tau = inf) vs clipped at tau.
    noclip = run(dc, "muon", dc.clip_lr, f"{tmp}/noclip", dc.clip_steps, qk_clip_tau=math.inf)
    tau = dc.tau or float(f"{max(noclip['clip'].history) / 2:.2g}")
    clip_runs = {"Muon, no clip": noclip,
                 f"MuonClip (tau {tau:g})": run(dc, "muon", dc.clip_lr, f"{tmp}/clip", dc.clip_steps,
                                                qk_clip_tau=tau)}
    documented = gpt.is_default(dc, ("num_threads", "out_dir"))
    paths = [gpt.plot_path(name, documented, dc.out_dir) for name in ("muon_race.png", "muon_qk_clip.png")]
    plot_race(best, paths[0],
              f"AdamW vs Muon, {dc.n_layer}L C={dc.n_embd} T={dc.block_size}, {dc.steps} steps, best LR each")
    plot_clip(clip_runs, tau, paths[1],
              f"Muon at lr {dc.clip_lr:g}: max attention logit with and without QK-Clip")

    print("\n| learning-rate grid | " + " | ".join(f"lr {lr:g}" for lr in grid["AdamW"][1]) + " |")
    print("|---|" + "---|" * len(grid["AdamW"][1]))
    for name in grid:
        print(f"| {name} val loss | " + " | ".join(f"{f:.4f}" for n, _, f, _ in tuning if n == name) + " |")
    reach_txt = f"{reach:.0f} ({reach / dc.steps:.2f}x)" if reach is not None else "not reached"
    print("\n| | AdamW | Muon |\n|---|---|---|")
    print(f"| best learning rate | {adamw['lr']:g} | {muon_r['lr']:g} |")
    print(f"| final val loss, whole split (nats/token) | {whole['AdamW']:.4f} | {whole['Muon']:.4f} |")
    print(f"| val loss on the first {dc.eval_tokens} val tokens at step {dc.steps} | {target:.4f} | "
          f"{muon_r['curve'][-1][1]:.4f} |")
    print(f"| steps to reach AdamW's final loss ({target:.4f}) | {dc.steps} | {reach_txt} |")
    print(f"| training time of the run (evaluation excluded) | {adamw['train_s']:.0f} s | "
          f"{muon_r['train_s']:.0f} s |")
    print(f"| forward + backward per step | {ms['fwd_bwd']:.1f} ms | {ms['fwd_bwd']:.1f} ms |")
    print(f"| optimizer step | {ms['adamw_step']:.1f} ms | {ms['muon_step']:.1f} ms "
          f"(Newton-Schulz {ms['ns']:.1f} ms) |")
    print(f"| Newton-Schulz overhead per training step | - | "
          f"{100 * ms['ns'] / (ms['fwd_bwd'] + ms['adamw_step']):.0f}% |")
    print(f"| mean SVD entropy of the hidden matrices | {ent['AdamW']:.4f} | {ent['Muon']:.4f} |")
    print(f"\n| Muon at lr {dc.clip_lr:g}, {dc.clip_steps} steps | max logit, peak | max logit, last step "
          f"| val loss (first {dc.eval_tokens} val tokens) |\n|---|---|---|---|")
    for name, r in clip_runs.items():
        print(f"| {name} | {max(r['clip'].history):.3g} | {r['clip'].history[-1]:.3g} | {r['final']:.4f} |")
    print(f"\nplots: {paths[0]}, {paths[1]}; total {time.time() - t_start:.0f} s")
    return dict(best=best, tuning=tuning, reach=reach, target=target, ms=ms, entropy=ent, clip=clip_runs,
                whole=whole)


# -----------------------------------------------------------------------------------------------
# Command line


def parse_demo_args(argv: list[str]) -> DemoConfig:
    return gpt.config_from_args(DemoConfig, argv, __doc__, "muon.py")


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:  # gpt.py's command line with Muon chosen (= gpt.py --optimizer=muon)
        gpt.main(["--optimizer=muon"] + sys.argv[2:])
    else:
        try:
            config = parse_demo_args(sys.argv[1:])
        except ValueError as e:
            sys.exit(f"error: {e}")
        torch.manual_seed(config.seed)
        demo(config)
