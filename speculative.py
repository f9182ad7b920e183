"""
speculative.py - faster sampling, same output distribution: speculative decoding and multi-token prediction.

Decoding one token at a time reads every weight of the model for a single token. Speculative decoding
lets a cheap draft guess gamma tokens, has the target score all of them in *one* forward pass, and keeps
or rejects each guess with a rule under which the output is distributed exactly as the target's own
samples; DeepSeek-V3's multi-token prediction (MTP) trains small extra modules to predict further ahead,
and at inference those modules are the draft of their own model (self-speculation).

References
- Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding",
  arXiv:2211.17192: Algorithm 1; section 3.1 (acceptance rate alpha = E[sum_x min(p(x), q(x))]);
  eq. 1 (expected tokens per target call (1 - alpha^(gamma+1)) / (1 - alpha)); Theorem 3.8 (walltime
  speedup (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)), c = draft / target cost of one step);
  Appendix A.1 (the rule reproduces p exactly).
- Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling",
  arXiv:2302.01318: Algorithm 2 (modified rejection sampling), Theorem 1.
- Stern, Shazeer & Uszkoreit 2018, "Blockwise Parallel Decoding", arXiv:1811.03115: the greedy ancestor.
- DeepSeek-V3 Technical Report, arXiv:2412.19437: section 2.2 (MTP modules, eqs. 21-25: RMSNorm'd
  hidden state and next-token embedding, projection M_k, one transformer block, shared embedding and
  output head, loss lambda / D * sum_k L_k), section 5.4.3 (MTP as the draft: 85-90% acceptance of the
  second token, 1.8x tokens per second). Gloeckle et al. 2024, arXiv:2404.19737 (MTP heads, self-
  speculation).
- gpt-fast (PyTorch team, 2023, generate.py / model.py): a static preallocated KV cache with fixed
  shapes and a torch.compile'd one-token decode step, the baseline any speedup must beat.
- FR-Spec, Zhao et al. 2025, arXiv:2502.14856 (draft only over the most frequent tokens; EAGLE-3 does
  the same): the draft's output layer is most of its cost, and the rule stays exact for any draft.
- Prompt lookup decoding (Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding; transformers'
  prompt_lookup_num_tokens) and LLMA (Yang et al. 2023, arXiv:2304.04487): the draft is copied from the
  context after the latest match of its last n-gram; no draft model.

Run it
    python speculative.py                    # toy target / draft / MTP pairs: train, measure, plot
    python speculative.py --gammas=1,2,4 --n_prompts=2 --compile=false   # a quicker look
    python speculative.py --pair=smollm2 --max_new_tokens=48 --frozen_steps=150   # SmolLM2-135M, MTP draft
    python speculative.py --pair=smollm2 --thin=kernel --compile=false --lookup_gammas=2,4,6
                                             # + kernels_cpu.cpp's verify and prompt-lookup drafts
    python speculative.py --toy_mtp=joint    # the toy MTP modules trained jointly with a second target
    python speculative.py --target_ckpt=out/t/ckpt.pt --draft_ckpt=out/d/ckpt.pt --out_dir=out/td
                                             # a pair trained by gpt.py first (same --vocab_size)
    python speculative.py --help             # every option

Not covered: tree drafts (SpecInfer, Medusa, EAGLE-2), batched speculative decoding (each row accepts a
different number of tokens, so caches get ragged: pad and mask per row, or advance all rows by the
minimum), lookahead / Jacobi decoding, speculative decoding on GPUs (where the verify pass is nearly
free until the GPU saturates).
"""

from __future__ import annotations

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
import torch.nn.functional as F

import gpt

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# The arithmetic (Leviathan et al., section 3). Say every draft token is accepted independently with
# probability alpha. A round drafts gamma tokens and calls the target once; it yields the accepted run
# plus one token from the target (the correction, or a bonus token when all gamma pass), so
#     E[tokens per target call] = 1 + alpha + ... + alpha^gamma = (1 - alpha^(gamma+1)) / (1 - alpha)  (eq. 1)
# and a round costs gamma draft steps + one target call, c = draft step / target step, so
#     speedup = (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + 1))                               (Thm 3.8)
# The verify call scores gamma + 1 positions, but on a machine that is bound by reading weights (batch
# 1 decoding) that costs about one position; where it does not, the measured speedup falls short.


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): tokens each target call yields on average (eq. 1)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al.'s Theorem 3.8: tokens per call over the round's cost in target steps."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)


def best_gamma(alpha: float, c: float, max_gamma: int = 16) -> int:
    """The gamma in 1..max_gamma that maximises the expected speedup."""
    return max(range(1, max_gamma + 1), key=lambda g: expected_speedup(alpha, g, c))


# -----------------------------------------------------------------------------------------------
# The rule (Chen et al. Algorithm 2; Leviathan et al. Algorithm 1). p is the target's distribution at a
# position, q the draft's, x ~ q the draft's token. Keep x with probability min(1, p(x)/q(x)); on the
# first rejection, draw the replacement from the residual norm(max(0, p - q)). Then
#     P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * max(0, p(x) - q(x)) / Z
#              = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x),
# because Z = sum_y max(0, p(y) - q(y)) = 1 - sum_y min(p(y), q(y)). Exactly p, whatever q is: a bad draft
# costs speed, never quality. The tokens after a rejection were conditioned on a token we replaced, so
# they are dropped; if all gamma are kept, p at the next position is free: one bonus token.


def acceptance_prob(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) for each draft token x. p, q (g, V); tokens (g,) -> (g,).
    q(x) > 0 for every x the draft drew, so the ratio is defined."""
    px = p.gather(-1, tokens[:, None]).squeeze(-1)  # (g,)
    qx = q.gather(-1, tokens[:, None]).squeeze(-1)  # (g,)
    return torch.minimum(torch.ones_like(px), px / qx)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) (..., V): what a rejection resamples from. When p = q nothing is ever
    rejected and the residual is 0/0; p is returned then (it is never used)."""
    r = (p - q).clamp(min=0)
    z = r.sum(-1, keepdim=True)
    return torch.where(z > 0, r / z.clamp(min=torch.finfo(r.dtype).tiny), p)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
           generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """One round of modified rejection sampling. p (g+1, V): the target's distributions at the g draft
    positions and the one after them; q (g, V): the draft's; drafts (g,). Returns (a, token): the first
    a drafts are kept, then `token` (the correction drawn from the residual, or the bonus from p[g])."""
    g = drafts.numel()
    u = torch.rand(g, generator=generator, dtype=p.dtype)  # one uniform per draft token
    keep = u < acceptance_prob(p[:g], q, drafts)  # P(keep) = min(1, p/q)
    a = int(keep.long().cumprod(0).sum())  # the run of kept tokens before the first rejection
    dist = p[g] if a == g else residual(p[a], q[a])
    return a, int(torch.multinomial(dist, 1, generator=generator))


def verify_greedy(p_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """Greedy mode: keep drafts while they equal the target's argmax; then emit the target's argmax.
    The output is the target's greedy text token for token. (This is the rule above with one-hot p
    and q, i.e. temperature 0: p(x)/q(x) is 1 or 0 and the residual is p's one-hot.)"""
    t = p_logits.argmax(-1)  # (g+1,)
    g = drafts.numel()
    a = int((t[:g] == drafts).long().cumprod(0).sum())
    return a, int(t[a])


# -----------------------------------------------------------------------------------------------
# The loop. A *runner* is a model with its KV cache: feed(tokens) appends tokens and returns their
# logits (and hidden states, which MTP drafts from); truncate(n) rolls the cache back to n positions.
# A *drafter* proposes tokens with their distributions q and is told the accepted text after each round.
# Invariant between rounds: the target's cache holds every token but the last one (the last token is
# fed again as the first position of the next verify chunk, whose output is p for the first draft).


@torch.no_grad()
def speculative_generate(target: "EagerRunner | StaticRunner", drafter: "ModelDrafter | MTPDrafter",
                         prompt: list[int], max_new_tokens: int, gamma: int, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, eot: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> tuple[list[int], dict]:
    """Continue `prompt` (batch 1) by up to max_new_tokens tokens, stopping at `eot` (not included).
    The runner and the drafter start from empty caches (they are reused, so compiled steps are too).

    Returns the new tokens and counts: rounds (= target verify calls), drafted, accepted, rejected
    (rounds that ended in a rejection), emitted, and seconds spent drafting and verifying.
    Temperature 0 is greedy decoding (verify_greedy); otherwise temperature / top-k / top-p shape p and q
    through the same function, gpt.filtered_probs, and the output is distributed as the target's samples."""
    if gamma < 1:
        raise ValueError(f"gamma (tokens drafted per round) must be >= 1, got {gamma}")
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    gpt.check_sampling(temperature, top_k, top_p)
    if drafter.max_gamma and gamma > drafter.max_gamma:
        raise ValueError(f"this draft proposes at most {drafter.max_gamma} tokens per round (one per MTP "
                         f"module), got gamma={gamma}")
    if drafter.vocab_size != target.vocab_size:
        raise ValueError(f"the draft and the target must share a vocabulary: the draft has "
                         f"{drafter.vocab_size} tokens, the target {target.vocab_size}")
    target.reset()
    drafter.reset()
    seq, n0 = list(prompt), len(prompt)
    stats = dict(rounds=0, drafted=0, accepted=0, rejected=0, emitted=0, draft_s=0.0, target_s=0.0)
    if drafter.needs_hidden and n0 > 1:  # MTP drafts from the target's hidden states: prefill them
        _, h = target.feed(seq[:-1])
        drafter.observe(0, h)
    while len(seq) - n0 < max_new_tokens:
        g = min(gamma, max_new_tokens - (len(seq) - n0) - 1)  # no drafts past the end
        t0 = time.perf_counter()
        drafts, q = drafter.propose(seq, g, temperature, top_k, top_p, generator)
        g = len(drafts)
        start, t1 = target.pos, time.perf_counter()
        logits, h = target.feed(seq[start:] + drafts)  # one call scores the last token + g drafts
        stats["draft_s"] += t1 - t0
        stats["target_s"] += time.perf_counter() - t1
        if drafter.needs_hidden:
            drafter.observe(start, h)
        p_logits = logits[-(g + 1):]  # (g+1, V): p for each draft position and the one after
        d = torch.tensor(drafts, dtype=torch.long)
        if temperature == 0:
            a, nxt = verify_greedy(p_logits, d)
        else:  # float64: the residual p - q of two close distributions keeps its precision
            p = gpt.filtered_probs(p_logits, temperature, top_k, top_p).double()
            a, nxt = verify(p, q.double() if g else p[:0], d, generator)
        new = drafts[:a] + [nxt]
        seq += new
        target.truncate(len(seq) - 1)  # forget the rejected drafts (and keep the last token pending)
        drafter.accept(seq)
        stats["rounds"] += 1
        stats["drafted"] += g
        stats["accepted"] += a
        stats["rejected"] += a < g
        if eot is not None and eot in new:
            del seq[len(seq) - len(new) + new.index(eot):]
            break
    out = seq[n0:n0 + max_new_tokens]
    stats["emitted"] = len(out)
    return out, stats


@torch.no_grad()
def plain_generate(runner: "EagerRunner | StaticRunner", prompt: list[int], max_new_tokens: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eot: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> list[int]:
    """Ordinary decoding, one target call per token, through a runner (gpt.generate's loop, batch 1)."""
    runner.reset()
    logits, _ = runner.feed(list(prompt))
    out: list[int] = []
    while len(out) < max_new_tokens:
        nxt = int(gpt.sample_next(logits[-1:], temperature, top_k, top_p, generator))
        if nxt == eot:
            break
        out.append(nxt)
        if len(out) < max_new_tokens:
            logits, _ = runner.feed([nxt])
    return out


# -----------------------------------------------------------------------------------------------
# Drafts. draft_probs turns a draft's logits into q with the same filtering as p (gpt.filtered_probs);
# a draft may score only a subset of the vocabulary (the most frequent tokens, FR-Spec): q is then 0
# elsewhere, the rule stays exact, and the draft's output layer shrinks from V rows to len(subset).


def draft_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                subset: Optional[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """q (1, V) from draft logits (1, V) or, with a subset (N,) of token ids, logits over it (1, N)."""
    q = gpt.filtered_probs(logits, temperature, top_k, top_p)  # (1, V) or (1, N)
    if subset is None:
        return q
    return q.new_zeros(1, vocab_size).index_copy_(1, subset, q)  # (1, V), 0 off the subset


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, subset: Optional[torch.Tensor],
         vocab_size: int, generator: Optional[torch.Generator]) -> tuple[int, Optional[torch.Tensor]]:
    """A draft token and its distribution q (None in greedy mode, where only the argmax matters)."""
    if temperature == 0:
        i = int(logits[0].argmax())
        return (int(subset[i]) if subset is not None else i), None
    q = draft_probs(logits, temperature, top_k, top_p, subset, vocab_size)
    return int(torch.multinomial(q[0], 1, generator=generator)), q


class ModelDrafter:
    """A small model with its own KV cache (any runner) drafts gamma tokens one at a time."""

    needs_hidden = False
    max_gamma = 0  # no limit

    def __init__(self, runner: "EagerRunner | StaticRunner", subset: Optional[torch.Tensor] = None):
        self.runner, self.subset = runner, subset
        self.vocab_size = runner.vocab_size
        runner.head_subset(subset)

    def propose(self, seq: list[int], g: int, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[torch.Tensor]]:
        if g == 0:
            return [], None
        pending = seq[self.runner.pos:]  # the prompt; then 1 token, or 2 after a full accept
        if self.runner.pos == 0:
            logits, _ = self.runner.feed(pending, last_only=True)
        else:  # one token per call: the compiled step keeps a single shape
            for t in pending:
                logits, _ = self.runner.feed([t], last_only=True)
        drafts, qs = [], []
        for i in range(g):
            d, q = draw(logits[-1:], temperature, top_k, top_p, self.subset, self.vocab_size, generator)
            drafts.append(d)
            qs.append(q)
            if i < g - 1:
                logits, _ = self.runner.feed([d], last_only=True)
        return drafts, (torch.cat(qs) if temperature else None)  # q (g, V)

    def reset(self) -> None:
        self.runner.reset()

    def observe(self, start: int, h: torch.Tensor) -> None:
        pass

    def accept(self, seq: list[int]) -> None:
        """Keep the cached positions whose tokens were accepted (at most all but the last token)."""
        self.runner.truncate(min(self.runner.pos, len(seq) - 1))


def lookup_continuation(seq: list[int], g: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: find the most recent earlier occurrence of the text's last n tokens (n = max_ngram
    down to min_ngram, the longest that occurs) and return up to g tokens that followed it; [] if none.
    (Saxena's reference code takes the first occurrence; in a text that repeats itself the most recent
    one is the likelier to continue the same way.)"""
    a = np.asarray(seq)
    for n in range(min(max_ngram, len(a) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(a[:-1], n)  # (len-n, n): n-grams before the end
        hits = np.flatnonzero((windows == a[-n:]).all(axis=1))
        if len(hits):
            j = int(hits[-1]) + n  # the token after the most recent match
            return a[j:j + g].tolist()
    return []


class LookupDrafter:
    """No draft model: the draft is text the context already holds (prompt lookup decoding, Saxena 2023;
    LLMA, Yang et al. 2023, arXiv:2304.04487). Where the text repeats itself or its prompt (a retelling,
    code edits, a greedy loop) whole runs are accepted; elsewhere no n-gram matches and the round is a
    plain step. Drafting costs a numpy search, nothing next to a target step (c ~ 0).

    The draft is deterministic given the text, so q is one-hot: the rule keeps token x with probability
    min(1, p(x) / 1) = p(x) and resamples a rejection from norm(max(0, p - q)), p with x removed: the
    output is still distributed as the target's samples (the rule holds for any q)."""

    needs_hidden = False
    max_gamma = 0  # no limit (the match may be shorter)

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram

    def propose(self, seq: list[int], g: int, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[torch.Tensor]]:
        drafts = lookup_continuation(seq, g, self.max_ngram, self.min_ngram) if g else []
        if not temperature or not drafts:
            return drafts, None
        return drafts, F.one_hot(torch.tensor(drafts), self.vocab_size).float()  # q (g, V), one-hot

    def reset(self) -> None:
        pass

    def observe(self, start: int, h: torch.Tensor) -> None:
        pass

    def accept(self, seq: list[int]) -> None:
        pass


# -----------------------------------------------------------------------------------------------
# Multi-token prediction (DeepSeek-V3, section 2.2). Beside the main model, D sequential modules; with
# h^0_i the main model's last hidden state at position i (the input of its final norm),
#     h'^k_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))]        (eq. 21, M_k: C x 2C)
#     h^k    = TRM_k(h'^k)  over positions i = 0 .. T-1-k             (eq. 22, one causal block)
#     P^k_i  = OutHead(h^k_i), a distribution over token t_{i+k+1}    (eq. 23, shared with the main model)
#     L      = L_main + lambda / D * sum_k CE(P^k, t_{k+1..})          (eqs. 24-25)
# Module k thus sees the true tokens up to t_{i+k} (the causal chain is kept) and predicts k+1 ahead.
# At inference, module 1 at the last accepted position turns the target's own hidden state and the
# newest token into a guess for the token after it, module 2 continues from module 1's state and that
# guess, and so on: D drafts per round at the cost of D blocks, with no second model.


@dataclass
class MTPConfig(gpt.GPTConfig):
    """A GPTConfig plus DeepSeek-V3's multi-token prediction modules."""

    n_mtp: int = 2  # D: extra modules; module k (1..D) predicts token t+k+1 at position t
    mtp_lambda: float = 0.3  # lambda of eq. 25 (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1)

    def __post_init__(self):
        super().__post_init__()
        if self.n_mtp < 1 or not self.mtp_lambda >= 0:
            raise ValueError(f"MTPConfig: n_mtp must be >= 1 and mtp_lambda >= 0, got {self.n_mtp} and "
                             f"{self.mtp_lambda}")


def mtp_shift(idx: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Module k's inputs and targets from a training pair x = t_0..t_{T-1}, y = t_1..t_T (B, T): at
    position i it embeds t_{i+k} = x[i+k] and predicts t_{i+k+1} = y[i+k], for i = 0 .. T-1-k.
    Returns (token ids to embed, targets), both (B, T-k)."""
    return idx[:, k:], targets[:, k:]


class MTPModule(nn.Module):
    """Depth k of MTP: two RMSNorms, the projection M_k, one transformer block (eqs. 21-22), and the
    norm before the shared output head (DeepSeek-V3's checkpoints give each depth its own)."""

    def __init__(self, cfg: gpt.GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.hnorm, self.enorm = gpt.RMSNorm(C, cfg.norm_eps), gpt.RMSNorm(C, cfg.norm_eps)
        self.proj = nn.Linear(2 * C, C, bias=False)  # M_k (C x 2C)
        self.block = gpt.Block(dataclasses.replace(cfg, n_layer=1), 0)  # layer 0 of its own KV cache
        self.norm = gpt.make_norm(cfg, C)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope: Optional[tuple],
                cache: Optional[gpt.KVCache] = None) -> torch.Tensor:
        """h^{k-1} and Emb(t_{i+k}), both (B, T, C) -> h^k (B, T, C)."""
        x = self.proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))  # (B, T, 2C) -> (B, T, C), eq. 21
        return self.block(x, rope, cache)  # eq. 22


def mtp_modules(cfg: gpt.GPTConfig, D: int) -> nn.ModuleList:
    """D MTP modules with gpt.GPT's init: N(0, init_std), residual outputs / sqrt(2 L) (GPT-2 section 2.3)."""
    modules = nn.ModuleList(MTPModule(cfg) for _ in range(D))
    for name, p in modules.named_parameters():
        if p.dim() == 2:
            scaled = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            nn.init.normal_(p, 0.0, cfg.init_std / (math.sqrt(2 * cfg.n_layer) if scaled else 1.0))
    return modules


def forward_hidden(model: gpt.GPT, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                   cache: Optional[gpt.KVCache] = None) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                                  torch.Tensor]:
    """gpt.GPT.forward plus the last hidden state h^0 (B, T, C): the input of the final norm, caught by a
    hook because GPT.forward returns only logits and loss."""
    box = {}
    handle = model.norm.register_forward_pre_hook(lambda m, args: box.setdefault("h", args[0]))
    try:
        logits, loss = model(idx, targets, cache=cache)
    finally:
        handle.remove()
    return logits, loss, box["h"]


def rope_for(model: gpt.GPT, start: int, T: int, device=None) -> Optional[tuple]:
    """The RoPE angles of positions start .. start+T-1, or None for a model with learned positions."""
    cfg = model.cfg
    if cfg.pos_emb != "rope":
        return None
    return gpt.rope_cos_sin(torch.arange(start, start + T, device=device), cfg.head_size, cfg.rope_theta)


def mtp_logits(model: gpt.GPT, modules: nn.ModuleList, h: torch.Tensor, idx: torch.Tensor,
               subset: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Each depth's logits from the main model's h^0 (B, T, C) over tokens idx (B, T): depth k's (B, T-k, V)
    row i is its distribution of token t_{i+k+1} (eqs. 21-23); over the subset's N tokens if given."""
    B, T = idx.shape
    emb = model.tok_embeddings(idx)  # (B, T, C), the shared embedding
    W = model.output.weight if subset is None else model.output.weight[subset]  # (V or N, C)
    out = []
    for k, module in enumerate(modules, start=1):
        if T - k < 1:
            break
        h = module(h[:, :T - k], emb[:, k:], rope_for(model, 0, T - k, idx.device))  # (B, T-k, C)
        out.append(F.linear(module.norm(h), W))  # (B, T-k, V or N), the shared output head (eq. 23)
    return out


def mtp_losses(model: gpt.GPT, modules: nn.ModuleList, h: torch.Tensor, idx: torch.Tensor,
               targets: torch.Tensor, subset: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """The D cross-entropies of eq. 24, from the main model's h^0 (B, T, C) and the pair (idx, targets).
    With a subset the softmax runs over its tokens only and other targets are skipped (a draft that will
    only ever propose subset tokens, trained at a fraction of the output layer's cost)."""
    if subset is not None:  # token id -> its index in the subset, -1 (ignored) if absent
        where = torch.full((model.cfg.vocab_size,), -1, dtype=torch.long, device=idx.device)
        where[subset] = torch.arange(len(subset), device=idx.device)
        targets = torch.where(targets >= 0, where[targets.clamp(min=0)], -1)
    out = []
    for k, logits in enumerate(mtp_logits(model, modules, h, idx, subset), start=1):
        _, tgt = mtp_shift(idx, targets, k)  # (B, T-k): y[i+k] = t_{i+k+1}
        out.append(F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-1))
    return out


class MTPGPT(nn.Module):
    """A gpt.GPT (`main`) with D MTP modules: forward(x, y) -> (main logits, L_main + lambda * mean L_k),
    so gpt.train trains it as it trains a GPT (and evaluates the main model, whose logits it returns)."""

    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.cfg = cfg
        self.main = gpt.GPT(cfg)
        self.mtp = mtp_modules(cfg, cfg.n_mtp)
        self.last_mtp_losses: list[float] = []

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if targets is None:
            return self.main(idx)
        logits, loss, h = forward_hidden(self.main, idx, targets)
        if self.cfg.mtp_lambda == 0:  # logged, not trained: no zero gradients that would still change
            with torch.no_grad():     # the rounding of the clipping norm, so the main model trains bit
                losses = mtp_losses(self.main, self.mtp, h, idx, targets)  # for bit as without MTP
            self.last_mtp_losses = [float(x) for x in losses]
            return logits, loss
        losses = mtp_losses(self.main, self.mtp, h, idx, targets)
        self.last_mtp_losses = [float(x.detach()) for x in losses]
        return logits, loss + self.cfg.mtp_lambda * torch.stack(losses).mean()  # eq. 25


def load_mtp(path: Path | str) -> tuple[MTPGPT, object]:
    """An MTPGPT checkpoint written by gpt.train (eval mode) and its tokenizer."""
    state = gpt.read_checkpoint(path)
    try:
        cfg = MTPConfig(**state["model_config"])
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"{path} is not an MTP checkpoint of speculative.py ({e})") from e
    model = MTPGPT(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), gpt.tokenizer_from_ranks(state["tokenizer"]["kept_gpt2_ranks"])


class FrozenMTP(nn.Module):
    """A trained gpt.GPT (`main`, frozen) with D MTP modules trained on top of it (train_mtp_frozen):
    the same .main / .mtp an MTPGPT has, for drafting and evaluation."""

    def __init__(self, main: gpt.GPT, mtp: nn.ModuleList):
        super().__init__()
        self.main, self.mtp, self.cfg = main, mtp, main.cfg


class MTPDrafter:
    """Self-speculation: the target's own MTP modules draft up to D tokens per round.

    H[k] holds depth k's hidden states per position (H[0]: the target's, reported by the loop through
    observe). Module k at position i reads H[k-1][i] and token t_{i+k}; the draft for round with text
    t_0..t_{n-1} comes from position j = n-2 (the last position whose target state is known): module 1
    reads t_{n-1} and guesses t_n, module 2 reads that guess and guesses t_{n+1}, ... Each module keeps
    a KV cache over positions; after a round, position i of module k stays only if the token t_{i+k} it
    read is still in the text (see accept)."""

    needs_hidden = True

    def __init__(self, model: gpt.GPT, modules: nn.ModuleList, max_len: int, spare: int = 0,
                 subset: Optional[torch.Tensor] = None, static: bool = False, compile: bool = False):
        self.model, self.modules, self.subset = model, modules, subset
        self.vocab_size, self.max_gamma = model.cfg.vocab_size, len(modules)
        dtype = model.tok_embeddings.weight.dtype
        self.H = [torch.zeros(max_len, model.cfg.n_embd, dtype=dtype)  # (S, C) per depth
                  for _ in range(len(modules) + 1)]
        if static or compile:
            self.runners = [StaticMTPRunner(model, m, max_len, subset, compile) for m in modules]
        else:
            self.runners = [MTPRunner(model, m, max_len, spare, subset) for m in modules]

    def reset(self) -> None:
        for r in self.runners:
            r.reset()

    def observe(self, start: int, h: torch.Tensor) -> None:
        self.H[0][start:start + len(h)] = h

    def propose(self, seq: list[int], g: int, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[torch.Tensor]]:
        j = len(seq) - 2  # the draft position
        if g == 0 or j < 0:
            return [], None
        ext, qs = list(seq), []
        for k, runner in enumerate(self.runners[:g], start=1):
            lo = runner.pos  # positions lo..j are new to module k
            hk, logits = runner.feed(self.H[k - 1][lo:j + 1], ext[lo + k:j + k + 1])  # (j+1-lo, C), (1, V|N)
            self.H[k][lo:j + 1] = hk
            d, q = draw(logits, temperature, top_k, top_p, self.subset, self.vocab_size, generator)
            ext.append(d)
            qs.append(q)
        return ext[len(seq):], (torch.cat(qs) if temperature else None)

    def accept(self, seq: list[int]) -> None:
        # module k's position i read token t_{i+k}: it stays if that token is still the text's, i.e. was
        # not the last one (the correction or bonus, new to the modules): i + k <= len(seq) - 2
        for k, runner in enumerate(self.runners, start=1):
            runner.truncate(min(runner.pos, max(0, len(seq) - 1 - k)))


@torch.no_grad()
def mtp_propose_reference(model: gpt.GPT, modules: nn.ModuleList, seq: list[int], g: int) -> list[int]:
    """Greedy MTP drafts recomputed from scratch (no caches): the reference MTPDrafter is tested against."""
    idx = torch.tensor([seq])
    _, _, h = forward_hidden(model, idx)  # (1, n, C)
    ext = list(seq)
    n = len(seq)
    for k, module in enumerate(modules[:g], start=1):
        emb = model.tok_embeddings(torch.tensor([ext[k:n - 1 + k]]))  # tokens t_{i+k}, i = 0..n-2
        h = module(h[:, :n - 1], emb, rope_for(model, 0, n - 1))  # (1, n-1, C)
        ext.append(int(model.output(module.norm(h[:, -1])).argmax()))
    return ext[n:]


# -----------------------------------------------------------------------------------------------
# Runners. EagerRunner is the reference: gpt.py's own forward and KVCache. StaticRunner is gpt-fast's
# recipe for a fast ordinary decoder: the cache is preallocated at its full length, every step has the
# same shapes (attention always spans all S slots, with a mask hiding slots past the query's position),
# so torch.compile traces the one-token step once and fuses its small ops; no Python per op remains.


def decoding_cache(attention: nn.Module, max_len: int, spare: int, w: torch.Tensor):
    """The cache an attention layer makes for decoding (gpt.py's layer slot: attention.make_cache), for
    one sequence on w's device and dtype, with `spare` ring slots so that a sliding-window cache can take
    verify chunks and roll back. Speculative decoding needs truncate(n): a cache without it is refused."""
    cache = attention.make_cache(1, max_len, w.device, w.dtype, spare=spare)
    if not callable(getattr(cache, "truncate", None)):
        raise ValueError(f"speculative decoding rolls caches back, but {type(cache).__name__} (the cache of "
                         f"{type(attention).__name__}) has no truncate(n)")
    return cache


class EagerRunner:
    """A gpt.GPT and its decoding cache (spare ring slots for chunks and rollbacks under a window)."""

    def __init__(self, model: gpt.GPT, max_len: int, spare: int = 0, want_hidden: bool = False):
        self.model, self.want_hidden = model.eval(), want_hidden
        self.max_len, self.spare = max_len, spare
        self.vocab_size = model.cfg.vocab_size
        self.subset: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        m = self.model
        self.cache = decoding_cache(m.layers[0].attention, self.max_len, self.spare, m.tok_embeddings.weight)

    @property
    def pos(self) -> int:
        return self.cache.pos

    def head_subset(self, subset: Optional[torch.Tensor]) -> None:
        self.subset = subset  # the eager model computes all V logits; we keep the subset's

    def feed(self, tokens: list[int], last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Append tokens; their logits (T, V) (or the last row over the subset) and hidden states (T, C)."""
        idx = torch.tensor([tokens], device=self.model.tok_embeddings.weight.device)
        if self.want_hidden:
            logits, _, h = forward_hidden(self.model, idx, cache=self.cache)
            h = h[0]
        else:
            logits, h = self.model(idx, cache=self.cache)[0], None
        logits = logits[0, -1:] if last_only else logits[0]
        return (logits[:, self.subset] if self.subset is not None else logits), h

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)


class MTPRunner:
    """One MTP module with its own decoding cache (eager): feed(h^{k-1} (T, C), tokens t_{i+k})."""

    def __init__(self, model: gpt.GPT, module: MTPModule, max_len: int, spare: int,
                 subset: Optional[torch.Tensor] = None):
        self.model, self.module, self.subset = model, module, subset
        self.max_len, self.spare = max_len, spare
        self.reset()

    def reset(self) -> None:
        self.cache = decoding_cache(self.module.block.attention, self.max_len, self.spare,
                                    self.model.tok_embeddings.weight)

    @property
    def pos(self) -> int:
        return self.cache.pos

    def feed(self, h: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """h^{k-1} (T, C) and the tokens t_{i+k} (T) of the next T positions -> h^k (T, C) and the last
        position's logits (1, V or N). A module skipped for a few rounds (gamma < k) catches up here in
        pieces a sliding-window ring can take (spare + 1 positions)."""
        c, out = self.cache, []
        piece = len(tokens) if not c.window or c.pos == 0 else c.spare + 1
        for s in range(0, len(tokens), piece):
            part = tokens[s:s + piece]
            emb = self.model.tok_embeddings(torch.tensor([part]))  # (1, T', C)
            hs = h[None, s:s + len(part)]  # (1, T', C)
            out.append(self.module(hs, emb, rope_for(self.model, c.pos, len(part)), c)[0])  # (T', C)
            c.pos += len(part)  # GPT.forward advances its cache; a lone block does not
        hk = torch.cat(out)  # (T, C)
        W = self.model.output.weight if self.subset is None else self.model.output.weight[self.subset]
        return hk, F.linear(self.module.norm(hk[-1:]), W)  # (T, C), (1, V|N)

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)


def thin_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for the few rows of a decode step or a verify chunk, computed as
    (W x^T)^T: x (..., K), weight (N, K) -> (..., N). The same products; only the BLAS call (and so
    the rounding of the sums) differs. A BLAS picks its kernel by shape, and for x W^T with 2-4 rows some
    (MKL's sgemm on the AMD CPU of docs/speculative.md) stream W from memory about once per row, so a
    verify over gamma + 1 positions costs up to gamma + 1 steps. W x^T, a wide matrix times a thin one,
    is served by other kernels, which stream W once for some shapes (the output layer) and not for
    others: which matmuls gain depends on the BLAS, so StaticRunner's `thin` picks them."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K), M = the rows (positions) of this step
    y = (weight @ x2.t()).t()  # (N, K) @ (K, M) -> (N, M) -> (M, N)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)


# The kernel choice: kernels_cpu.cpp's small_linear reads each weight once for 1-8 rows of x (its
# header has the algorithm), where the BLAS reads it about once per row; built on first use with the
# machine's C++ compiler (torch.utils.cpp_extension.load, cached under ~/.cache/torch_extensions).
KERNEL_ROWS = 8  # small_linear takes 1..8 rows: a decode step, or a verify over up to gamma = 7 drafts
_kernels_cpu = None


def kernels_cpu():
    """The compiled kernels_cpu.cpp module (built on the first call, a minute or two; then cached)."""
    global _kernels_cpu
    if _kernels_cpu is None:
        from torch.utils.cpp_extension import load
        try:
            _kernels_cpu = load("llm_kernels_cpu", [str(ROOT / "kernels_cpu.cpp")], extra_cflags=["-O3"])
        except (RuntimeError, OSError, ImportError) as e:
            raise RuntimeError(f"thin=kernel builds kernels_cpu.cpp with the machine's C++ compiler on first "
                               f"use, and that failed ({str(e).splitlines()[0][:200]}): use --thin=off") from e
    return _kernels_cpu


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through kernels_cpu.cpp's small_linear when x holds 1..8 rows of fp32 on
    the CPU and no gradient is wanted (decode steps and verify chunks); F.linear otherwise (a prompt)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if (not 1 <= len(x2) <= KERNEL_ROWS or x.dtype != torch.float32 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    b = bias if bias is not None else weight.new_empty(0)
    y = kernels_cpu().small_linear(x2.contiguous(), weight.contiguous(), b.contiguous())  # (M, N)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)


THIN = ("off", "head", "all", "kernel")  # StaticRunner(thin=...): which matmuls run how


def stacked(*linears: nn.Linear) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights (and biases) of linears that read the same input, stacked along their outputs: one
    matmul, so one pass over the weights and one call, instead of several (gpt-fast's fused wqkv). A copy:
    the decoder's, made when it is built (the model's weights must not change while it decodes)."""
    w = torch.cat([lin.weight for lin in linears])  # (N1 + N2 + .., K)
    b = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return w, b


def stack_layers(blocks: nn.ModuleList) -> list[dict]:
    """Per block: wq|wk|wv stacked as "qkv", and a SwiGLU's gate|up (w1|w3) as "w13"."""
    out = []
    for block in blocks:
        a, mlp = block.attention, block.feed_forward
        out.append(dict(qkv=stacked(a.wq, a.wk, a.wv)) | (dict(w13=stacked(mlp.w1, mlp.w3))
                                                          if isinstance(mlp, gpt.SwiGLU) else {}))
    return out


def static_mlp(mlp: nn.Module, x: torch.Tensor, lin, w13: Optional[tuple] = None) -> torch.Tensor:
    """gpt.py's SwiGLU / GeluMLP with every matmul through `lin` (a SwiGLU's gate and up in one, given their
    stacked weights w13); any other MLP (e.g. moe.py's) runs as is."""
    if isinstance(mlp, gpt.SwiGLU):
        if w13 is None:
            gate, up = lin(x, mlp.w1.weight, mlp.w1.bias), lin(x, mlp.w3.weight, mlp.w3.bias)
        else:
            gate, up = lin(x, *w13).chunk(2, dim=-1)  # (B, T, 2H) -> 2 x (B, T, H)
        return lin(F.silu(gate) * up, mlp.w2.weight, mlp.w2.bias)
    if isinstance(mlp, gpt.GeluMLP):
        return lin(F.gelu(lin(x, mlp.w1.weight, mlp.w1.bias), approximate="tanh"), mlp.w2.weight, mlp.w2.bias)
    return mlp(x)


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     sinks: Optional[torch.Tensor] = None, soft_cap: float = 0.0) -> torch.Tensor:
    """Attention of q (B, nh, T, hs) over all S cache slots k, v (B, nkv, S, hs), mask (T, S) True where
    visible: fixed shapes whatever the position. Query head h reads kv head h // (nh / nkv) (GQA)."""
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    rep = nh // nkv  # query heads per kv head
    scores = (q.reshape(B, nkv, rep * T, hs) @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nkv, rep*T, S)
    scores = scores.view(B, nkv, rep, T, S)
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # the sink column joins the softmax denominator, then is dropped (gpt.py)
        sink = sinks.to(scores.dtype).view(1, nkv, rep, 1, 1).expand(B, nkv, rep, T, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :S]
    else:
        probs = torch.softmax(scores, dim=-1)  # (B, nkv, rep, T, S)
    return (probs.reshape(B, nkv, rep * T, S) @ v).view(B, nh, T, hs)  # (B, nh, T, hs)


class StaticCache:
    """gpt-fast's KV cache: (L, 1, nkv, S, hs) preallocated; slot = position (a window is just a mask,
    so rolling back is moving `pos`); RoPE tables for every position, precomputed."""

    def __init__(self, cfg: gpt.GPTConfig, n_layer: int, max_len: int, dtype=torch.float32):
        shape = (n_layer, 1, cfg.n_kv_head, max_len, cfg.head_size)
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.slots = torch.arange(max_len)
        self.window, self.size = cfg.window, max_len
        cos, sin = gpt.rope_cos_sin(self.slots, cfg.head_size, cfg.rope_theta)  # (S, hs/2) each, fp64
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)


def static_blocks(blocks: nn.ModuleList, x: torch.Tensor, pos: torch.Tensor, cache: StaticCache,
                  rope: bool, lin=F.linear, stacks: Optional[list[dict]] = None,
                  live: Optional[int] = None) -> torch.Tensor:
    """gpt.Block's math (pre-norm attention + MLP) for x (1, T, C) at positions pos (T,), keys and values
    written into and read from the static cache; the same operations as gpt.Attention.forward, every
    matmul with a weight through `lin` (F.linear, thin_linear or kernel_linear), with the stacked q|k|v and
    gate|up weights of stack_layers when given. Attention reads every slot (fixed shapes, for torch.compile)
    or, given `live`, the first `live` slots only: uncompiled, the slots past the last position are
    masked anyway (SmolLM2, 400 of 1024 slots filled: its 30 attentions take 6 ms instead of 13, of a
    ~75 ms step)."""
    B, T, C = x.shape
    S = live or cache.size  # the slots attention reads
    i, j = pos[:, None], cache.slots[None, :S]
    mask = j <= i  # (T, S): causal over the slots, which hold positions
    if cache.window:
        mask = mask & (i - j < cache.window)
    cs = (cache.cos[pos], cache.sin[pos]) if rope else None  # (T, hs/2) each
    for layer, block in enumerate(blocks):
        a, cfg = block.attention, block.attention.cfg
        nq, nkv = cfg.n_head * cfg.head_size, cfg.n_kv_head * cfg.head_size
        y = block.attention_norm(x)
        if stacks is None:
            q, k, v = lin(y, a.wq.weight, a.wq.bias), lin(y, a.wk.weight, a.wk.bias), lin(y, a.wv.weight, a.wv.bias)
        else:
            q, k, v = lin(y, *stacks[layer]["qkv"]).split([nq, nkv, nkv], dim=-1)  # (B, T, nq + 2 nkv) -> 3
        q = q.view(B, T, cfg.n_head, cfg.head_size)  # (B, T, nh, hs)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_size)  # (B, T, nkv, hs)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_size)
        if cfg.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        if cs is not None:
            q, k = gpt.apply_rope(q, *cs), gpt.apply_rope(k, *cs)
        cache.k[layer].index_copy_(2, pos, k.transpose(1, 2))  # (B, nkv, T, hs) into slots pos
        cache.v[layer].index_copy_(2, pos, v.transpose(1, 2))
        o = static_attention(q.transpose(1, 2), cache.k[layer][:, :, :S], cache.v[layer][:, :, :S], mask,
                             getattr(a, "sinks", None), cfg.attn_soft_cap)  # (B, nh, T, hs)
        x = x + lin(o.transpose(1, 2).reshape(B, T, nq), a.wo.weight, a.wo.bias)
        x = x + static_mlp(block.feed_forward, block.ffn_norm(x), lin,
                           None if stacks is None else stacks[layer].get("w13"))
    return x


class StaticRunner:
    """gpt-fast's decoder for a gpt.GPT: static cache, fixed shapes; the step after the prompt is
    torch.compile'd when compile=True (the prompt, fed once, runs uncompiled). `thin` picks which weight
    matmuls run as (W x^T)^T (thin_linear): off (none), head (the output layer), all; or kernel: every
    weight matmul of up to 8 rows through kernels_cpu.cpp (kernel_linear; uncompiled only)."""

    def __init__(self, model: gpt.GPT, max_len: int, compile: bool = False, want_hidden: bool = False,
                 thin: str = "off"):
        cfg = model.cfg
        if cfg.attention != "gqa":
            raise ValueError(f"the static decoder re-implements gpt.py's gqa attention, not "
                             f"attention={cfg.attention!r}: use EagerRunner")
        if cfg.logit_soft_cap:
            raise ValueError("the static decoder reads the output head directly and does not soft-cap "
                             "its logits: use EagerRunner for a model with logit_soft_cap")
        if thin not in THIN:
            raise ValueError(f"thin must be one of {', '.join(THIN)}, not {thin!r}")
        if thin == "kernel" and compile:
            raise ValueError("thin=kernel calls a C++ kernel torch.compile does not trace: run the static "
                             "decoder uncompiled (compile=False)")
        if cfg.pos_emb == "learned" and max_len > cfg.block_size:
            raise ValueError(f"learned positions stop at block_size={cfg.block_size}, asked for {max_len}")
        self.model, self.want_hidden = model.eval(), want_hidden
        self.cache = StaticCache(cfg, cfg.n_layer, max_len, model.tok_embeddings.weight.dtype)
        self.vocab_size = cfg.vocab_size
        self.pos = 0
        self.head = model.output.weight  # (V, C), or the subset's rows
        self.subset: Optional[torch.Tensor] = None
        self.lin = {"all": thin_linear, "kernel": kernel_linear}.get(thin, F.linear)  # the blocks' matmuls
        self.lin_head = {"head": thin_linear, "all": thin_linear, "kernel": kernel_linear}.get(thin, F.linear)
        with torch.no_grad():
            self.stacks = stack_layers(model.layers)  # q|k|v and gate|up: one matmul each
        self.compile = compile
        self.compiled = torch.compile(self.step, dynamic=None) if compile else self.step

    def reset(self) -> None:
        self.pos = 0  # stale slots are never visible: the mask only shows slots <= the query's position

    def head_subset(self, subset: Optional[torch.Tensor]) -> None:
        self.subset = subset
        w = self.model.output.weight
        self.head = w if subset is None else w[subset].contiguous()  # (N, C): the subset's rows

    def step(self, idx: torch.Tensor, pos: torch.Tensor, last_only: bool,
             live: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (1, T) at positions pos (T,) -> logits (1, T or 1, V or N), hidden (1, T, C); attention over
        the first `live` cache slots (None: all of them)."""
        m = self.model
        x = m.tok_embeddings(idx)  # (1, T, C)
        if m.cfg.pos_emb == "learned":
            x = x + m.pos_embeddings(pos)
        h = static_blocks(m.layers, x, pos, self.cache, m.cfg.pos_emb == "rope", self.lin, self.stacks, live)
        y = h[:, -1:] if last_only else h
        return self.lin_head(m.norm(y), self.head), h  # (1, T', V|N)

    @torch.no_grad()  # a decoder: no graph (and kernel_linear needs none)
    def feed(self, tokens: list[int], last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        T = len(tokens)
        if self.pos + T > self.cache.size:
            raise ValueError(f"the static cache holds {self.cache.size} positions; this needs {self.pos + T}")
        idx, pos = torch.tensor([tokens]), torch.arange(self.pos, self.pos + T)
        compiled = self.compile and self.pos > 0  # prefill eager, decode / verify compiled
        if compiled and T > 1:  # one graph for every verify length, not one per length
            torch._dynamo.mark_dynamic(idx, 1)
            torch._dynamo.mark_dynamic(pos, 0)
        if compiled:  # fixed shapes: attention over every slot
            logits, h = self.compiled(idx, pos, last_only)
        else:  # uncompiled: over the filled ones only
            logits, h = self.step(idx, pos, last_only, self.pos + T)
        self.pos += T
        return logits[0], (h[0] if self.want_hidden else None)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.pos:
            raise ValueError(f"truncate({n}): can keep 0 to {self.pos} positions")
        self.pos = n  # slots past n are overwritten before any query can see them (the mask hides them)


class StaticMTPRunner:
    """One MTP module on a static cache, its step compiled like StaticRunner's."""

    def __init__(self, model: gpt.GPT, module: MTPModule, max_len: int, subset: Optional[torch.Tensor] = None,
                 compile: bool = False):
        self.model, self.module, self.blocks = model, module, nn.ModuleList([module.block])
        self.cache = StaticCache(model.cfg, 1, max_len, model.tok_embeddings.weight.dtype)
        self.head = model.output.weight if subset is None else model.output.weight[subset].contiguous()
        self.pos = 0
        self.compiled = torch.compile(self.step, dynamic=None) if compile else self.step

    def step(self, h: torch.Tensor, idx: torch.Tensor,
             pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h^{k-1} (1, T, C) and tokens t_{i+k} (1, T) at positions pos (T,) -> h^k (1, T, C), logits of
        the last position (1, V or N)."""
        m, mod = self.model, self.module
        x = mod.proj(torch.cat([mod.hnorm(h), mod.enorm(m.tok_embeddings(idx))], dim=-1))  # (1, T, C)
        hk = static_blocks(self.blocks, x, pos, self.cache, m.cfg.pos_emb == "rope")
        return hk, F.linear(mod.norm(hk[:, -1]), self.head)

    def feed(self, h: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = len(tokens)
        if self.pos + T > self.cache.size:
            raise ValueError(f"the static cache holds {self.cache.size} positions; this needs {self.pos + T}")
        fn = self.step if self.pos == 0 else self.compiled
        h, idx, pos = h[None], torch.tensor([tokens]), torch.arange(self.pos, self.pos + T)
        if T > 1:
            for t, dim in ((h, 1), (idx, 1), (pos, 0)):
                torch._dynamo.mark_dynamic(t, dim)
        hk, logits = fn(h, idx, pos)
        self.pos += T
        return hk[0], logits

    def reset(self) -> None:
        self.pos = 0

    def truncate(self, n: int) -> None:
        self.pos = n


# -----------------------------------------------------------------------------------------------
# Training the toy pairs with gpt.py's loop, and MTP on top of a frozen model


def train_or_load(name: str, cfg: gpt.GPTConfig, tc: gpt.TrainConfig, mtp: bool = False, probe=None,
                  log=print) -> tuple[nn.Module, dict]:
    """gpt.train into tc.out_dir (a GPT, or an MTPGPT when mtp=True); a checkpoint of the same model and
    training settings there is reused. Returns the model (eval mode) and its final figures."""
    path = tc.ckpt_path
    if path.exists():
        state = gpt.read_checkpoint(path)
        same_tc = all(state["train_config"].get(f.name) == getattr(tc, f.name) for f in dataclasses.fields(tc)
                      if f.name not in gpt.RUN_ONLY_FIELDS)
        saved = {**dataclasses.asdict(type(cfg)()), **state["model_config"]}  # fields added since: defaults
        if state["iter"] == tc.max_iters and saved == dataclasses.asdict(cfg) and same_tc:
            model = load_mtp(path)[0] if mtp else gpt.load_model(path)[0]
            final = next(h for h in reversed(state["history"]) if h.get("whole_split"))
            log(f"{name}: reusing {path} (val loss {final['val_loss']:.4f})")
            return model, dict(final, train_time=final["time"])
    log(f"{name}: training {tc.max_iters} steps -> {path}")
    torch.manual_seed(tc.seed)  # gpt.train seeds before building its GPT; an MTPGPT builds its GPT first
    model = MTPGPT(cfg) if mtp else None
    res = gpt.train(cfg, dataclasses.replace(tc, overwrite=True), verbose=True, model=model, probe=probe)
    return res["model"].eval(), res["final"]


@torch.no_grad()
def mtp_val_losses(model: MTPGPT | FrozenMTP, tokens: np.ndarray, n_windows: int = 16, T: int = 0,
                   subset: Optional[torch.Tensor] = None) -> dict:
    """Each MTP depth's loss on the first n_windows windows of T tokens (0: block_size) of `tokens` (the
    same ones every time), the softmax over `subset` if given (see mtp_losses)."""
    was = model.training
    model.eval()
    T = T or model.cfg.block_size
    x = torch.from_numpy(tokens[:n_windows * T].astype(np.int64)).view(n_windows, T)
    y = torch.from_numpy(tokens[1:n_windows * T + 1].astype(np.int64)).view(n_windows, T)
    _, _, h = forward_hidden(model.main, x)
    losses = mtp_losses(model.main, model.mtp, h, x, y, subset)
    model.train(was)
    return {f"mtp{k}_loss": float(l) for k, l in enumerate(losses, start=1)}


def train_mtp_frozen(model: gpt.GPT, modules: nn.ModuleList, tokens: np.ndarray, steps: int, n_windows: int,
                     block_size: int, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                     subset: Optional[torch.Tensor] = None, log=print) -> list[float]:
    """Train MTP modules on top of a frozen model with AdamW on the modules alone (embedding and head
    frozen), the softmax over `subset`'s tokens if given (see mtp_losses). The model's hidden states:
    n_windows > 0: one no-grad pass over n_windows random windows, cached, and every step samples its batch
    from the cache (quick, but a small cache is seen many times over and the modules memorize it);
    n_windows = 0: every step draws batch_size fresh windows and runs the model on them then (each window
    seen once, steps x batch_size windows in all; no cache)."""
    gen = torch.Generator().manual_seed(seed)
    new_windows = lambda n: gpt.get_batch(  # noqa: E731  (n, T) inputs and targets
        tokens, torch.randint(0, len(tokens) - block_size - 1, (n,), generator=gen), block_size)
    model.eval().requires_grad_(False)
    if n_windows:
        x, y = new_windows(n_windows)  # (N, T) each
        with torch.no_grad():  # the cache: h^0 of every window, computed once
            hs = torch.cat([forward_hidden(model, x[i:i + batch_size])[2]  # (N, T, C)
                            for i in range(0, n_windows, batch_size)])
    modules.train().requires_grad_(True)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    schedule = gpt.TrainConfig(max_iters=steps, warmup_iters=max(1, steps // 10))  # warmup, cosine to 10%
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * gpt.lr_factor(step, schedule)
        if n_windows:
            i = torch.randint(0, n_windows, (batch_size,), generator=gen)
            hb, xb, yb = hs[i], x[i], y[i]
        else:
            xb, yb = new_windows(batch_size)
            with torch.no_grad():
                hb = forward_hidden(model, xb)[2]  # (B, T, C)
        loss = torch.stack(mtp_losses(model, modules, hb, xb, yb, subset)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  frozen-model MTP step {step + 1}/{steps}: loss {np.mean(history[-20:]):.4f}")
    modules.eval().requires_grad_(False)
    return history


# -----------------------------------------------------------------------------------------------
# Measuring: how often drafts are accepted (teacher-forced, independent of any timing), and decoding
# speed of every method on the same prompts and seeds, interleaved so that a busy machine slows all alike.


def frequent_tokens(tokens: np.ndarray, n: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The n most frequent token ids of `tokens` (sorted) and the share of the text they cover."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size)
    top = np.sort(np.argsort(-counts, kind="stable")[:n])
    return torch.from_numpy(top.astype(np.int64)), float(counts[top].sum() / counts.sum())


@torch.no_grad()
def acceptance_rates(target: gpt.GPT, texts: list[list[int]], n_prompt: int | list[int], temperature: float,
                     top_k: int,
                     top_p: float, draft: Optional[gpt.GPT] = None, mtp: Optional[nn.ModuleList] = None,
                     subset: Optional[torch.Tensor] = None) -> list[float]:
    """alpha = E[sum_x min(p(x), q(x))] (Leviathan et al. section 3.1; greedy: P(argmax q = argmax p)),
    teacher-forced over the target's own continuations (texts = prompt + continuation, the first n_prompt
    tokens the prompt; one n_prompt per text when they differ). One alpha for a draft model; one per
    depth for MTP (depth k's acceptance given that the k-1 drafts before it were accepted, so its inputs
    were the true tokens)."""
    sums: dict[int, list[float]] = {}
    n_prompts = n_prompt if isinstance(n_prompt, list) else [n_prompt] * len(texts)
    for ids, n_prompt in zip(texts, n_prompts):
        idx = torch.tensor([ids])
        p_logits, _, h = forward_hidden(target, idx)  # (1, T, V): row i predicts token i+1
        qs = [draft(idx)[0]] if draft is not None else mtp_logits(target, mtp, h, idx)  # depth k: (1, T-k, V)
        for k, q_logits in enumerate(qs, start=1):
            off = 0 if draft is not None else k  # q's row i is a distribution of token i + 1 + off
            rows = torch.arange(max(0, n_prompt - 1 - off), len(ids) - 1 - off)  # tokens of the continuation
            ql = q_logits[0, rows]
            pl = p_logits[0, rows + off]  # the target's row for the same token
            if subset is not None:
                ql = torch.full_like(ql, float("-inf")).index_copy_(1, subset, ql[:, subset])
            if temperature == 0:
                ok = (pl.argmax(-1) == ql.argmax(-1)).double()
            else:
                p = gpt.filtered_probs(pl, temperature, top_k, top_p).double()
                q = gpt.filtered_probs(ql, temperature, top_k, top_p).double()
                ok = torch.minimum(p, q).sum(-1)
            sums.setdefault(k, []).extend(ok.tolist())
    return [float(np.mean(sums[k])) for k in sorted(sums)]


def expected_tokens_per_call_depths(alphas: list[float]) -> float:
    """1 + a1 + a1 a2 + ... : eq. 1 when draft k is accepted with its own probability a_k (MTP depths)."""
    total, run = 1.0, 1.0
    for a in alphas:
        run *= a
        total += run
    return total


def story_openings(tokens: np.ndarray, eot: int, n: int, P: int) -> list[list[int]]:
    """The first P tokens of the first n stories (of at least 2P tokens) of a split."""
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    out = [tokens[s:s + P].astype(np.int64).tolist() for s, e in zip(starts, ends) if e - s >= 2 * P]
    if len(out) < n:
        raise ValueError(f"only {len(out)} stories of >= {2 * P} tokens in the split, asked for {n}")
    return out[:n]


def interleaved(methods: dict, n_prompts: int, repeats: int = 1) -> dict:
    """Run every method on every prompt, alternating methods within each prompt (in a rotating order),
    so load from other processes falls on all of them alike. methods: name -> fn(i) -> (tokens, stats).
    Returns name -> dict(tokens, wall, cpu (this process's CPU seconds), outputs, stats summed)."""
    res = {m: dict(tokens=0, wall=0.0, cpu=0.0, outputs=[], stats={}) for m in methods}
    names = list(methods)
    for rep in range(repeats):
        for i in range(n_prompts):
            shift = (i + rep) % len(names)
            for m in names[shift:] + names[:shift]:
                t0, c0 = time.perf_counter(), time.process_time()
                out, st = methods[m](i)
                r = res[m]
                r["wall"] += time.perf_counter() - t0
                r["cpu"] += time.process_time() - c0
                r["tokens"] += len(out)
                if rep == 0:
                    r["outputs"].append(out)
                for k, v in st.items():
                    r["stats"][k] = r["stats"].get(k, 0) + v
    return res


# -----------------------------------------------------------------------------------------------
# Demo: `python speculative.py`


@dataclass
class DemoConfig:
    """The toy pairs (trained with gpt.py's loop) or SmolLM2 with its MTP modules, then every decoder
    measured on the same prompts and seeds."""

    pair: str = "toy"  # toy: target, 1-layer draft and MTP modules trained here | smollm2: SmolLM2-135M-
    #                    Instruct (pretrained.py) drafting for itself with MTP modules trained on it
    out_dir: str = "out/speculative"  # checkpoints (reused by later runs) and non-default plots
    target_layers: int = 6  # the target: gpt.py's model, deeper and wider than its default
    target_embd: int = 192  # its width C
    draft_layers: int = 1  # the draft: one layer, trained on the same data
    draft_embd: int = 128  # its width C
    n_mtp: int = 2  # D: MTP modules (the MTP pair drafts 1..D tokens per round)
    toy_mtp: str = "frozen"  # toy: frozen = modules trained on top of the trained target (see frozen_*) |
    #                          joint = a second target trained with MTP from scratch (same steps and data)
    mtp_lambda: float = 0.3  # joint: lambda of DeepSeek-V3 eq. 25
    target_ckpt: str = ""  # toy: a finished gpt.py checkpoint as the target instead of training one here
    draft_ckpt: str = ""  # toy: a finished gpt.py checkpoint as the draft (same tokenizer as the target)
    iters: int = 300  # training steps of the target (and of the joint MTP model)
    draft_iters: int = 300  # training steps of the draft
    lr: float = 6e-3  # peak learning rate of all three (gpt.py's default)
    n_prompts: int = 4  # story openings from the validation split
    prompts: str = "openings"  # openings: a story's first prompt_tokens tokens, continued | retell, edit
    #                            (smollm2 only): a validation story in a chat request (STORY_TASKS)
    prompt_tokens: int = 16  # each prompt: a story's first tokens
    max_new_tokens: int = 128  # tokens each method generates per prompt (no stop at <|endoftext|>)
    gammas: str = "1,2,3,4,6"  # draft lengths of the draft pair (the MTP pair uses 1..n_mtp)
    lookup_gammas: str = "4"  # draft lengths of prompt lookup (no draft model; "" = not measured)
    lookup_ngram: int = 3  # prompt lookup matches the text's last 3, else 2, else 1 tokens
    temperature: float = 0.8  # the sampled runs (every method also runs greedy)
    top_k: int = 0  # the sampled runs' top-k (0 = off), applied to p and q alike
    top_p: float = 0.95  # the sampled runs' nucleus, applied to p and q alike
    draft_vocab: int = 1024  # drafts score only this many most frequent train tokens (FR-Spec); 0 = all
    compile: bool = True  # also measure the torch.compile'd static decoders (the fast baseline)
    thin: str = "off"  # static decoders: matmuls computed as (W x^T)^T (thin_linear): off | head | all |
    #                    kernel (kernels_cpu.cpp, needs --compile=false; adds the uncompiled static engine)
    repeats: int = 1  # timed passes over the prompts
    decode_threads: int = 1  # torch threads while decoding (batch-1 decoding of small models: 1 is fastest)
    num_threads: int = 0  # torch threads while training; 0 = torch's default
    frozen_steps: int = 200  # MTP on a frozen model: training steps on its cached hidden states
    frozen_windows: int = 96  # MTP on a frozen model: train windows whose hidden states are cached; 0 = fresh
    #                           windows every step, each seen once (slower per step, no memorizing)
    frozen_block: int = 128  # MTP on a frozen model: tokens per window
    frozen_lr: float = 3e-3  # MTP on a frozen model: peak learning rate of the modules
    smollm2_draft_vocab: int = 4096  # smollm2: the MTP modules train and draft over this many frequent tokens
    seed: int = 1337  # training seed; prompt i is sampled with seed + i by every method
    plot: str = "auto"  # auto: assets/speculative.png for the default run, out_dir/speculative.png otherwise
    measure: bool = True  # False: only train (or reuse) the models and print their table, no decoding

    def __post_init__(self):
        if not self.gamma_list or min(self.gamma_list) < 1:
            raise ValueError(f"gammas must be a comma-separated list of integers >= 1, got {self.gammas!r}")
        for name in ("target_layers", "target_embd", "draft_layers", "draft_embd", "n_mtp", "iters",
                     "draft_iters", "n_prompts", "prompt_tokens", "max_new_tokens", "repeats",
                     "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        gpt.check_sampling(self.temperature, self.top_k, self.top_p)
        if self.temperature == 0:
            raise ValueError("temperature is the sampled runs' (greedy runs always happen): use > 0")
        if self.pair not in ("toy", "smollm2"):
            raise ValueError(f"pair must be toy or smollm2, not {self.pair!r}")
        if self.prompts not in ("openings", *STORY_TASKS) or (self.prompts != "openings" and self.pair != "smollm2"):
            raise ValueError(f"prompts must be openings, or {' or '.join(STORY_TASKS)} with --pair=smollm2 (a chat "
                             f"model), not "
                             f"{self.prompts!r} with --pair={self.pair}")
        if self.thin not in THIN:
            raise ValueError(f"thin must be one of {', '.join(THIN)}, not {self.thin!r}")
        if self.thin == "kernel" and self.compile:
            raise ValueError("--thin=kernel runs the static decoder uncompiled (torch.compile does not trace "
                             "the C++ kernel): add --compile=false")
        if self.lookup_gammas.strip() and (not self.lookup_gamma_list or min(self.lookup_gamma_list) < 1):
            raise ValueError(f"lookup_gammas must be a comma-separated list of integers >= 1 (or empty), got "
                             f"{self.lookup_gammas!r}")
        if self.lookup_ngram < 1:
            raise ValueError(f"lookup_ngram must be >= 1, got {self.lookup_ngram}")
        if self.toy_mtp not in ("frozen", "joint"):
            raise ValueError(f"toy_mtp must be frozen or joint, not {self.toy_mtp!r}")
        if (self.target_ckpt or self.draft_ckpt) and self.pair != "toy":
            raise ValueError("target_ckpt and draft_ckpt choose the toy pair's models: use them with "
                             "--pair=toy")
        if self.target_ckpt and self.toy_mtp == "joint":
            raise ValueError("--toy_mtp=joint trains its own target with the MTP modules: drop --target_ckpt "
                             "(the given target gets MTP modules with --toy_mtp=frozen)")
        for name in ("frozen_steps", "frozen_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frozen_windows < 0:
            raise ValueError(f"frozen_windows must be >= 0 (0: fresh windows every step), got "
                             f"{self.frozen_windows}")

    @property
    def gamma_list(self) -> list[int]:
        return int_list(self.gammas)

    @property
    def lookup_gamma_list(self) -> list[int]:
        return int_list(self.lookup_gammas)

    @property
    def engines(self) -> list[str]:
        """eager: gpt.py's forward; static: the static decoder uncompiled (with --thin=kernel);
        compiled: the static decoder compiled."""
        return ["eager"] + (["static"] if self.thin == "kernel" else []) + (["compiled"] if self.compile else [])


def int_list(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; [] if any item is not an integer."""
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        return []


def checkpoint_model(name: str, path: str, log=print) -> tuple[gpt.GPT, list[int], dict]:
    """A model trained elsewhere (e.g. `python gpt.py --preset=speedrun ...`): the model (eval mode, frozen),
    its tokenizer's kept GPT-2 ranks and its final whole-split figures (only a finished run has those)."""
    model, _, state = gpt.load_model(path)
    final = next((h for h in reversed(state["history"]) if h.get("whole_split")), None)
    if final is None:
        raise ValueError(f"{name} checkpoint {path} has no final evaluation of the whole validation split "
                         f"(stopped at iteration {state['iter']}): finish its training first")
    log(f"{name}: {path} ({model.cfg.n_layer} layers, C={model.cfg.n_embd}, V={model.cfg.vocab_size}, "
        f"trained {state['iter']} steps elsewhere; val loss {final['val_loss']:.4f})")
    kept = sorted(state["tokenizer"]["kept_gpt2_ranks"])
    return model.requires_grad_(False), kept, dict(final, train_time=final["time"])


def demo_models(dc: DemoConfig, log=print) -> dict:
    """Train (or reuse) the target, the draft and the target's MTP modules: trained on top of the frozen
    target (toy_mtp=frozen), or a second target trained jointly with them (joint, same recipe + MTP)."""
    base = dict(n_layer=dc.target_layers, n_embd=dc.target_embd)
    tc = gpt.TrainConfig(max_iters=dc.iters, warmup_iters=max(1, dc.iters // 10), lr=dc.lr,
                         eval_interval=10 ** 9, log_interval=50, ckpt_interval=10 ** 9, seed=dc.seed,
                         num_threads=dc.num_threads)
    target_cfg = gpt.GPTConfig(**base)
    draft_cfg = gpt.GPTConfig(n_layer=dc.draft_layers, n_embd=dc.draft_embd)
    out = Path(dc.out_dir)
    run = lambda name, **kw: dataclasses.replace(tc, out_dir=str(out / name), **kw)  # noqa: E731
    if dc.target_ckpt:
        target, kept_t, f_t = checkpoint_model("target", dc.target_ckpt, log)
    else:
        target, f_t = train_or_load("target", target_cfg, run("target"), log=log)
        kept_t = gpt.build_tokenizer(target_cfg.vocab_size)[1]
    if dc.draft_ckpt:
        draft, kept_d, f_d = checkpoint_model("draft", dc.draft_ckpt, log)
    else:
        draft_tc = run("draft", max_iters=dc.draft_iters, warmup_iters=max(1, dc.draft_iters // 10))
        draft, f_d = train_or_load("draft", draft_cfg, draft_tc, log=log)
        kept_d = gpt.build_tokenizer(draft_cfg.vocab_size)[1]
    if sorted(kept_t) != sorted(kept_d):
        raise ValueError(f"the draft's tokenizer ({len(kept_d)} tokens) is not the target's ({len(kept_t)}): "
                         "train both with the same --vocab_size")
    enc = gpt.tokenizer_from_ranks(kept_t)
    val = gpt.load_tokens("valid", enc)
    if dc.toy_mtp == "joint":
        mtp_cfg = MTPConfig(**base, n_mtp=dc.n_mtp, mtp_lambda=dc.mtp_lambda)
        probe = lambda model, it: mtp_val_losses(model, val)  # noqa: E731
        mtp, f_m = train_or_load("MTP model", mtp_cfg, run("mtp"), mtp=True, probe=probe, log=log)
    else:  # the softmax over all V: V is small here, and the depth losses compare with joint training's
        mtp = frozen_mtp(target, gpt.load_tokens("train", enc), None, dc, out / "mtp_frozen.pt", log,
                         dc.target_ckpt)
        f_m = dict(f_t, **mtp_val_losses(mtp, val))  # the main model is the target itself
    return dict(target=target, mtp=mtp, draft=draft, enc=enc, finals=dict(target=f_t, mtp=f_m, draft=f_d))


def plain_speed(models: dict[str, gpt.GPT], prompts: list[list[int]], N: int, compile: bool,
                repeats: int, thin: str = "off") -> dict:
    """Greedy plain decoding of each model three ways, interleaved: gpt.generate (today's eager decoder),
    the static decoder run eagerly, and compiled. Returns name/decoder -> interleaved()'s record."""
    methods = {}
    for name, model in models.items():
        S = max(map(len, prompts)) + N + 1
        static = StaticRunner(model, S, thin=thin)
        methods[f"{name}/generate"] = lambda i, m=model: (gpt.generate(m, prompts[i], N, temperature=0)[0],
                                                          {})
        methods[f"{name}/static"] = lambda i, r=static: (plain_generate(r, prompts[i], N, temperature=0), {})
        if compile:
            fast = StaticRunner(model, S, compile=True, thin=thin)
            plain_generate(fast, prompts[0], 4, temperature=0)  # compile before timing
            methods[f"{name}/compiled"] = lambda i, r=fast: (plain_generate(r, prompts[i], N, temperature=0),
                                                             {})
    return interleaved(methods, len(prompts), repeats)


def speculative_runs(dc: DemoConfig, m: dict, prompts: list[list[int]], subset: Optional[torch.Tensor],
                     engine: str, temperature: float, log=print) -> dict:
    """Plain decoding of both targets and every speculative pair x gamma, one engine, one sampling mode,
    interleaved on the same prompts with the same seeds (a fresh generator per prompt)."""
    target, mtp, draft = m["target"], m["mtp"], m["draft"]  # draft and target: None for the MTP pair alone
    N, gammas, D = dc.max_new_tokens, dc.gamma_list if draft is not None else [], dc.n_mtp
    G = max(gammas + dc.lookup_gamma_list + [D])
    S = max(map(len, prompts)) + N + G + 2
    samp = (temperature, dc.top_k, dc.top_p)
    gen = lambda i: torch.Generator().manual_seed(dc.seed + i)  # noqa: E731
    methods = {}
    targets = {"mtp": mtp.main} if draft is None else {"target": target, "mtp": mtp.main}
    if target is mtp.main:  # frozen MTP modules: both pairs speed up the same model, one baseline
        del targets["mtp"]
    if engine == "eager":
        tT = EagerRunner(target, S, G) if draft is not None else None
        tM = EagerRunner(mtp.main, S, G, want_hidden=True)
        dd = ModelDrafter(EagerRunner(draft, S, G), subset) if draft is not None else None
        md = MTPDrafter(mtp.main, mtp.mtp, S, 2 * G, subset)
        for name, model in targets.items():  # today's eager decoder
            methods[f"{name}/plain"] = lambda i, model=model: (
                gpt.generate(model, prompts[i], N, 1, *samp, generator=gen(i))[0], {})
    else:  # the static decoder, compiled or not (the draft model never takes the target's thin choice)
        c = engine == "compiled"
        tT = StaticRunner(target, S, compile=c, thin=dc.thin) if draft is not None else None
        tM = StaticRunner(mtp.main, S, compile=c, want_hidden=True, thin=dc.thin)
        dd = ModelDrafter(StaticRunner(draft, S, compile=c), subset) if draft is not None else None
        md = MTPDrafter(mtp.main, mtp.mtp, S, subset=subset, static=True, compile=c)
        for name, r in (("target", tT), ("mtp", tM)):
            if name in targets:
                methods[f"{name}/plain"] = lambda i, r=r: (
                    plain_generate(r, prompts[i], N, *samp, generator=gen(i)), {})
    for g in gammas:
        methods[f"draft/{g}"] = lambda i, g=g: speculative_generate(tT, dd, prompts[i], N, g, *samp,
                                                                    generator=gen(i))
    for g in range(1, D + 1):
        methods[f"mtp/{g}"] = lambda i, g=g: speculative_generate(tM, md, prompts[i], N, g, *samp,
                                                                  generator=gen(i))
    ld, tL = LookupDrafter(tM.vocab_size, dc.lookup_ngram), (tT if draft is not None else tM)
    for g in dc.lookup_gamma_list:  # the same target as the draft pair's (or the MTP pair's)
        methods[f"lookup/{g}"] = lambda i, g=g: speculative_generate(tL, ld, prompts[i], N, g, *samp,
                                                                     generator=gen(i))
    if engine == "compiled":
        t0 = time.time()
        for name, fn in methods.items():  # warm-up: compiles every graph before anything is timed
            fn(0)
        log(f"  {engine}, {'greedy' if temperature == 0 else f'T={temperature}'}: warm-up (compiles) "
            f"{time.time() - t0:.0f} s", flush=True)
    return interleaved(methods, len(prompts), dc.repeats)


def summarize(runs: dict, alphas: dict, mode_t: float, engine: str, dc: DemoConfig) -> list[dict]:
    """One row per speculative method: acceptance, tokens per call and speedup, predicted and measured.
    The prediction takes alpha from the teacher-forced rates and c (draft step / target step) from
    the run's own timings; the measured speedup is tokens/s over the same target's plain tokens/s.
    Prompt lookup has no fixed alpha (it drafts only where the text repeats): its predictions are nan."""
    rows = []
    for name, r in runs.items():
        pair, g = name.split("/")
        if g == "plain":
            continue
        g = int(g)
        own = "mtp/plain" if pair == "mtp" else "target/plain"
        base = runs[own if own in runs else "mtp/plain" if pair == "lookup" else "target/plain"]  # same target
        st = r["stats"]
        step = base["wall"] / base["tokens"]  # one plain target step, s
        c = st["draft_s"] / max(1, st["drafted"]) / step
        a_run = st["accepted"] / max(1, st["accepted"] + st["rejected"])  # MLE of a truncated geometric
        a = alphas.get((pair, mode_t), [math.nan] * g)
        tpc = expected_tokens_per_call(a[0], g) if pair != "mtp" else expected_tokens_per_call_depths(a[:g])
        same = sum(o == p for o, p in zip(r["outputs"], base["outputs"]))
        rows.append(dict(pair=pair, gamma=g, engine=engine, temperature=mode_t,
                         alpha=a[g - 1] if pair == "mtp" else a[0], alpha_run=a_run,
                         tpc_pred=tpc, tpc=r["tokens"] / max(1, st["rounds"]), c=c,
                         verify=st["target_s"] / max(1, st["rounds"]) / step,
                         speedup_pred=tpc / (g * c + 1),
                         speedup=(r["tokens"] / r["wall"]) / (base["tokens"] / base["wall"]),
                         speedup_cpu=(r["tokens"] / r["cpu"]) / (base["tokens"] / base["cpu"]),
                         tok_s=r["tokens"] / r["wall"], base_tok_s=base["tokens"] / base["wall"],
                         identical=same if mode_t == 0 else None, n=len(r["outputs"])))
    return rows


def plot_demo(rows: list[dict], path: Path, dc: DemoConfig) -> None:
    plt = gpt.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    gs = np.arange(1, max(dc.gamma_list + dc.lookup_gamma_list) + 1)
    colors = {("draft", 0.0): "C0", ("draft", dc.temperature): "C1", ("mtp", 0.0): "C2",
              ("mtp", dc.temperature): "C3", ("lookup", 0.0): "C4", ("lookup", dc.temperature): "C5"}
    names = {"draft": "draft model", "mtp": "MTP self-draft", "lookup": "prompt lookup"}
    for (pair, t), col in colors.items():
        sel = [r for r in rows if r["pair"] == pair and r["temperature"] == t]
        if not sel:
            continue
        lab = f"{names[pair]}, {'greedy' if t == 0 else f'T={t}'}"
        for r in sel:
            axes[0].plot(r["gamma"], r["tpc"], "o", color=col, label=lab if pair == "lookup" and r is sel[0]
                         else None)
        a = sel[0]["alpha"] if pair == "draft" else None
        if pair == "lookup":
            pass  # no alpha, no eq. 1 curve: measured dots only
        elif pair == "draft":
            axes[0].plot(gs, [expected_tokens_per_call(a, g) for g in gs], "--", color=col,
                         label=f"{lab}: eq. 1 with alpha={a:.2f} (dots: measured)")
        else:
            alphas = [r["alpha"] for r in sorted(sel, key=lambda r: r["gamma"])
                      if r["engine"] == sel[0]["engine"]]
            g2 = np.arange(1, len(alphas) + 1)
            axes[0].plot(g2, [expected_tokens_per_call_depths(alphas[:g]) for g in g2], "--", color=col,
                         label=f"{lab}: 1 + a1 + a1 a2.. (dots: measured)")
        for eng, mk in (("compiled", "-o"), ("static", "-.^"), ("eager", ":s")):
            es = sorted((r for r in sel if r["engine"] == eng), key=lambda r: r["gamma"])
            if es:
                axes[1].plot([r["gamma"] for r in es], [r["speedup"] for r in es], mk, color=col,
                             label=f"{lab}, {eng}")
                axes[1].plot([r["gamma"] for r in es], [r["speedup_pred"] for r in es], "--", color=col,
                             alpha=0.4)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_xlabel("gamma (tokens drafted per round)")
    axes[0].set_ylabel("tokens per target call")
    axes[0].set_title("tokens per target call: predicted (dashed) vs measured", fontsize=10)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("gamma")
    axes[1].set_ylabel("decode speedup over plain decoding (same engine)")
    axes[1].set_title("measured speedup (solid / dotted) and Thm 3.8 prediction (dashed)", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gpt.save_figure(fig, path)


def frozen_mtp(model: gpt.GPT, train_tok: np.ndarray, subset: Optional[torch.Tensor], dc: DemoConfig,
               path: Path, log=print, model_name: str = "") -> FrozenMTP:
    """D MTP modules trained on top of the frozen model from its cached hidden states (train_mtp_frozen),
    the softmax over `subset`; reused from `path` when trained with the same settings (and on the same
    model_name, when given: a checkpoint's path)."""
    key = dict(n_mtp=dc.n_mtp, steps=dc.frozen_steps, windows=dc.frozen_windows, block=dc.frozen_block,
               lr=dc.frozen_lr, subset=None if subset is None else len(subset), seed=dc.seed)
    if model_name:
        key["model"] = str(model_name)
    torch.manual_seed(dc.seed)
    modules = mtp_modules(model.cfg, dc.n_mtp)
    state = torch.load(path, weights_only=True) if path.exists() else {}
    if state.get("key") == key:
        modules.load_state_dict(state["modules"])
        log(f"MTP modules: reusing {path}")
    else:
        data = (f"the cached hidden states of {dc.frozen_windows} x {dc.frozen_block} train tokens"
                if dc.frozen_windows else f"fresh windows of {dc.frozen_block} train tokens, each seen once")
        log(f"MTP modules: training {dc.n_mtp} on the frozen model, {dc.frozen_steps} steps over {data} "
            f"-> {path}")
        t0 = time.time()
        history = train_mtp_frozen(model, modules, train_tok, dc.frozen_steps, dc.frozen_windows,
                                   dc.frozen_block, lr=dc.frozen_lr, seed=dc.seed, subset=subset, log=log)
        log(f"MTP modules: training took {time.time() - t0:.0f} s")
        with gpt.atomic_path(path) as tmp:
            torch.save(dict(key=key, modules=modules.state_dict(), history=history), tmp)
    return FrozenMTP(model, modules.eval().requires_grad_(False))


def smollm2_models(dc: DemoConfig, log=print) -> dict:
    """SmolLM2-135M-Instruct (pretrained.py) as the target, and D MTP modules trained on top of it, frozen,
    from its cached hidden states on TinyStories (cached in out_dir/smollm2/mtp.pt)."""
    try:
        import pretrained  # the real model's loader: only this pair needs it
    except ImportError as e:
        raise RuntimeError("--pair=smollm2 needs pretrained.py (the GGUF loader of SmolLM2)") from e
    G = max(dc.gamma_list + dc.lookup_gamma_list + [dc.n_mtp])  # the longest verify chunk
    context = dc.prompt_tokens + dc.max_new_tokens + 2 * G + 8
    if dc.prompts in STORY_TASKS:
        context += STORY_MAX_TOKENS + 64  # the story and the chat template around it
    model, enc, _ = pretrained.load(context=max(context, dc.frozen_block + 1))
    model.eval().requires_grad_(False)
    V = model.cfg.vocab_size
    train_tok = pretrained.validation_tokens(enc, V, "train")
    subset, cover = frequent_tokens(train_tok, dc.smollm2_draft_vocab, V)
    print(f"SmolLM2-135M-Instruct: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.cfg.n_layer} layers, C={model.cfg.n_embd}, V={V}; the MTP modules score the "
          f"{len(subset)} most frequent train tokens ({cover:.1%} of the text)")
    mtp = frozen_mtp(model, train_tok, subset, dc, Path(dc.out_dir) / "smollm2" / "mtp.pt", log)
    val_tok = pretrained.validation_tokens(enc, V, "valid")
    losses = mtp_val_losses(mtp, val_tok, 8, dc.frozen_block, subset)
    print(f"MTP depth losses (first 8 x {dc.frozen_block} val tokens, softmax over the subset): "
          + ", ".join(f"{v:.3f}" for v in losses.values()) + "\n")
    prompts = story_task_prompts(enc, val_tok, dc.n_prompts, V, dc.prompts) if dc.prompts in STORY_TASKS else None
    return dict(target=None, mtp=mtp, draft=None, enc=enc, train_tok=train_tok, val_tok=val_tok,
                subset=subset, cover=cover, ref_models={"SmolLM2-135M-Instruct": model}, prompts=prompts)


STORY_MAX_TOKENS = 250  # story-task prompts: validation stories of 60 to 250 tokens
# Input-grounded chat requests around a story, for SmolLM2-135M-Instruct: where drafts copied from the
# prompt (LookupDrafter) are meant to shine. A retelling paraphrases (short copied runs); an edit writes
# the story out again with few changes (long ones): the two ends of "how much of the answer is in the
# prompt", which decides prompt lookup's tokens per call.
STORY_TASKS = {"retell": "Retell this story in your own words:",
               "edit": "Correct any mistakes in this story and write it out in full:"}


def story_task_prompts(enc, tokens: np.ndarray, n: int, vocab_size: int, task: str = "retell") -> list[list[int]]:
    """The chat prompt STORY_TASKS[task] + a blank line + a story, for the first n validation stories of
    60-250 tokens (ChatML, ending with the assistant's header)."""
    import pretrained
    if task not in STORY_TASKS:
        raise ValueError(f"task must be one of {', '.join(STORY_TASKS)}, not {task!r}")
    ends = np.flatnonzero(tokens == enc.eot_token)
    spans = [(s, e) for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends) if 60 <= e - s <= STORY_MAX_TOKENS]
    if len(spans) < n:
        raise ValueError(f"only {len(spans)} validation stories of 60-{STORY_MAX_TOKENS} tokens, asked for {n}")
    return [pretrained.chatml_ids(enc, [("user", f"{STORY_TASKS[task]}\n\n" + enc.decode(tokens[s:e].tolist()))],
                                  vocab_size) for s, e in spans[:n]]


def toy_models(dc: DemoConfig) -> dict:
    """The toy pairs (demo_models) and their table: parameters, val loss, MTP's effect on the main loss."""
    m = demo_models(dc)
    enc, finals = m["enc"], m["finals"]
    ft, fm = finals["target"], finals["mtp"]
    mtp_name = ("MTP model (main + modules), trained jointly" if dc.toy_mtp == "joint"
                else "MTP modules on the frozen target")
    mtp_params = m["mtp"].parameters() if dc.toy_mtp == "joint" else m["mtp"].mtp.parameters()
    print("\n| model | params | val loss (whole split) | MTP depth losses (first 16 val windows) |")
    print("|---|---|---|---|")
    for name, params, f in (("target", m["target"].parameters(), ft), (mtp_name, mtp_params, fm),
                            ("draft", m["draft"].parameters(), finals["draft"])):
        depths = ", ".join(f"{f[k]:.3f}" for k in sorted(f) if k.startswith("mtp")) or "-"
        print(f"| {name} | {sum(p.numel() for p in params) / 1e6:.2f}M | {f['val_loss']:.4f} | {depths} |")
    if dc.toy_mtp == "joint":
        change = 100 * (fm["val_loss"] / ft["val_loss"] - 1)
        print(f"MTP's effect on the main next-token loss: {change:+.2f}% "
              f"(lambda={dc.mtp_lambda}, D={dc.n_mtp})")
    print()
    m["train_tok"], m["val_tok"] = gpt.load_tokens("train", enc), gpt.load_tokens("valid", enc)
    m["subset"], m["cover"] = (frequent_tokens(m["train_tok"], dc.draft_vocab, enc.n_vocab) if dc.draft_vocab
                               else (None, 1.0))
    torch.manual_seed(dc.seed)
    m["ref_models"] = {"target": m["target"],
                       "gpt.py default (random weights)": gpt.GPT(gpt.GPTConfig()).eval()}
    return m


def measure(dc: DemoConfig, m: dict) -> dict:
    """Plain decoders, acceptance rates and every speculative method on the same prompts; tables + plot."""
    enc, subset, N = m["enc"], m["subset"], dc.max_new_tokens
    torch.set_num_threads(dc.decode_threads)
    load0 = os.getloadavg()
    prompts = m.get("prompts") or story_openings(m["val_tok"], enc.eot_token, dc.n_prompts, dc.prompt_tokens)

    # 1. the plain decoders: gpt.generate vs the static decoder, eager and compiled
    t0 = time.time()
    plain = plain_speed(m["ref_models"], prompts, N, dc.compile, dc.repeats, dc.thin)
    print(f"# plain greedy decoding, batch 1, {dc.decode_threads} thread(s), {dc.n_prompts} prompts x {N} "
          f"tokens ({time.time() - t0:.0f} s incl. compiling); static decoders with thin={dc.thin}")
    print("| model | decoder | tokens/s | x gpt.generate (wall) | x gpt.generate (CPU time) | "
          "same text as generate |")
    print("|---|---|---|---|---|---|")
    for name in m["ref_models"]:
        base = plain[f"{name}/generate"]
        for dec in ("generate", "static", "compiled"):
            r = plain.get(f"{name}/{dec}")
            if r is None:
                continue
            same = sum(o == b for o, b in zip(r["outputs"], base["outputs"]))
            print(f"| {name} | {dec} | {r['tokens'] / r['wall']:.0f} | {base['wall'] / r['wall']:.2f} | "
                  f"{base['cpu'] / r['cpu']:.2f} | {same}/{len(r['outputs'])} |")

    # 2. how often drafts are accepted, teacher-forced on the targets' own continuations
    if subset is not None:
        print(f"\ndrafts score the {len(subset)} most frequent train tokens ({m['cover']:.1%} of the train "
              "text)")
    pairs = ([("draft", m["target"])] if m["draft"] is not None else []) + [("mtp", m["mtp"].main)]
    alphas, continuations = {}, {}
    for t in (0.0, dc.temperature):
        for pair, tm in pairs:
            if (id(tm), t) not in continuations:  # both pairs may share their target (frozen MTP modules)
                gen = torch.Generator().manual_seed(dc.seed)
                continuations[id(tm), t] = [p + gpt.generate(tm, p, N, 1, t, dc.top_k, dc.top_p,
                                                             generator=gen)[0] for p in prompts]
            texts = continuations[id(tm), t]
            alphas[(pair, t)] = acceptance_rates(
                tm, texts, [len(p) for p in prompts], t, dc.top_k, dc.top_p, subset=subset,
                draft=m["draft"] if pair == "draft" else None, mtp=m["mtp"].mtp if pair == "mtp" else None)
    print("\n| draft | alpha, greedy | alpha, " + f"T={dc.temperature} top_p={dc.top_p} |\n|---|---|---|")
    if m["draft"] is not None:
        a_d = alphas[("draft", 0.0)][0], alphas[("draft", dc.temperature)][0]
        print(f"| {m['draft'].cfg.n_layer}-layer draft model | {a_d[0]:.3f} | {a_d[1]:.3f} |")
    for k in range(dc.n_mtp):
        print(f"| MTP depth {k + 1} (given depths < {k + 1} accepted) | {alphas[('mtp', 0.0)][k]:.3f} | "
              f"{alphas[('mtp', dc.temperature)][k]:.3f} |")

    # 3. speculative decoding vs plain decoding, per engine and sampling mode
    rows = []
    engines = dc.engines
    print(f"\n# speculative decoding (machine load {load0[0]:.1f} at the start)", flush=True)
    for engine in engines:
        for t in (0.0, dc.temperature):
            runs = speculative_runs(dc, m, prompts, subset, engine, t)
            rows += summarize(runs, alphas, t, engine, dc)
    load1 = os.getloadavg()
    print(f"\n{dc.n_prompts} prompts x {N} new tokens, batch 1, {dc.decode_threads} thread(s); load average "
          f"{load0[0]:.1f} -> {load1[0]:.1f}. c = draft time per drafted token / plain target step; "
          "verify = one verify call / plain target step")
    print("| pair | engine | mode | gamma | alpha (teacher-forced / in run) | tokens per call (eq. 1 / "
          "measured) | c | verify | tokens/s (plain -> speculative) | speedup (Thm 3.8 / measured wall / "
          "CPU time) | greedy text identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, d=2: "-" if math.isnan(v) else f"{v:.{d}f}"  # noqa: E731 (no prediction for lookup)
    for r in rows:
        mode = "greedy" if r["temperature"] == 0 else f"T={r['temperature']}"
        ident = f"{r['identical']}/{r['n']}" if r["identical"] is not None else "-"
        print(f"| {r['pair']} | {r['engine']} | {mode} | {r['gamma']} | {f(r['alpha'], 3)} / "
              f"{r['alpha_run']:.3f} | {f(r['tpc_pred'])} / {r['tpc']:.2f} | {r['c']:.2f} | "
              f"{r['verify']:.2f} | "
              f"{r['base_tok_s']:.0f} -> {r['tok_s']:.0f} | {f(r['speedup_pred'])} / **{r['speedup']:.2f}** "
              f"/ {r['speedup_cpu']:.2f} | {ident} |")
    print()
    for engine in engines:
        for t in (0.0, dc.temperature):
            sel = [r for r in rows if (r["pair"], r["engine"], r["temperature"]) == ("draft", engine, t)]
            if not sel:
                continue
            c = float(np.mean([r["c"] for r in sel]))
            pick = best_gamma(sel[0]["alpha"], c, max(dc.gamma_list))
            best = max(sel, key=lambda r: r["speedup"])
            print(f"draft pair, {engine}, {'greedy' if t == 0 else f'T={t}'}: predicted best gamma {pick} "
                  f"(alpha {sel[0]['alpha']:.3f}, c {c:.2f}); measured best gamma {best['gamma']} "
                  f"({best['speedup']:.2f}x)")
    return dict(rows=rows, plain=plain, alphas=alphas, load=(load0[0], load1[0]))


def main(argv: list[str]) -> dict:
    dc = gpt.config_from_args(DemoConfig, argv, __doc__, "speculative.py")
    t_start = time.time()
    if dc.num_threads:
        torch.set_num_threads(dc.num_threads)
    torch.manual_seed(dc.seed)
    m = toy_models(dc) if dc.pair == "toy" else smollm2_models(dc)
    if not dc.measure:
        print(f"total {time.time() - t_start:.0f} s")
        return dict(finals=m.get("finals"))
    out = measure(dc, m)
    documented = gpt.is_default(dc, ("out_dir", "num_threads", "plot", "pair"))
    name = "speculative.png" if dc.pair == "toy" else "speculative_smollm2.png"
    path = gpt.plot_path(name, documented, dc.out_dir, dc.plot)
    if path:
        plot_demo(out["rows"], path, dc)
        print(f"\nplot: {path}")
    print(f"total {time.time() - t_start:.0f} s")
    return dict(out, finals=m.get("finals"))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
