"""
grpo.py - reinforcement learning with verifiable rewards: GRPO and its fixes, against DPO and best-of-N.

Sample a group of G answers to each prompt from the model itself, score every answer with a program (here
lora.py's verifier: a finished story that uses the three required words), and raise the log-probability
of the answers that beat their group's mean while lowering the others. The group is the baseline: PPO
needs a learned value network for it, GRPO needs nothing but G samples and a reward you can compute.

Why no critic. PPO (InstructGPT's RL stage) learns V(s_t), a second network as large as the policy, to
turn one reward per answer into a per-token advantage (GAE). With a single reward at the last token, that
per-token value is hard to learn (DeepSeekMath, section 4.1.1), costs a second model's memory, and is
only a baseline anyway: anything that does not depend on the answer leaves the policy gradient unbiased.
The mean reward of G answers to the same prompt is such a baseline, computed instead of learned.

References
- GRPO: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300: eq. 1 (PPO's clipped objective), eq. 3 (GRPO:
  1/G sum_i 1/|o_i| sum_t [min(rho A, clip(rho, 1-eps, 1+eps) A) - beta KL]), eq. 4 (the k3 KL estimator),
  section 4.1.2 (outcome supervision: A_i,t = (r_i - mean r) / std r for every token t), Algorithm 1
  (mu inner updates per batch of rollouts). DeepSeek-R1, arXiv:2501.12948, section 2.2.2 (rule-based
  rewards instead of a neural reward model, which "may suffer from reward hacking").
- PPO: Schulman et al. 2017, arXiv:1707.06347, eq. 7 (the clipped surrogate). k3 = r - 1 - log r, with
  r = pi_ref / pi: Schulman 2020, "Approximating KL Divergence" (unbiased, always >= 0).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783, section 3.1: GRPO's
  1/|o_i| biases the length of answers (long wrong answers are penalised less per token) and its 1/std
  biases which prompts count (too easy and too hard ones weigh most); the fix drops both.
- DAPO: Yu et al. 2025, arXiv:2503.14476: section 3.1 clip-higher (eps_low 0.2, eps_high 0.28), 3.2
  dynamic sampling (drop groups whose answers are all right or all wrong, sample more), 3.3 token-level
  loss (every token of the batch weighs the same), eq. 8 (the objective); section 2.3 drops the KL term.
- RLOO: Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740 (REINFORCE Leave-One-Out: the mean of
  the other k - 1 samples as each sample's baseline), after Kool et al. 2019, "Buy 4 REINFORCE Samples,
  Get a Baseline for Free!". Online DPO on pairs from the policy's own samples: Guo et al. 2024,
  arXiv:2402.04792.
- Best-of-N: its KL to the sampler is at most log N - (N - 1) / N, Beirami et al. 2024, arXiv:2401.01879.
- The pre-training mix (--ptx_coef): InstructGPT, Ouyang et al. 2022, arXiv:2203.02155, eq. 2 ("PPO-ptx":
  gamma E_pretrain[log pi] added to the RL objective, against forgetting); here the KL term's alternative
  as the anchor of a policy that may drift.
- The knobs follow TRL's GRPOTrainer: num_generations (G), num_iterations (mu), epsilon / epsilon_high,
  beta, scale_rewards, loss_type grpo / dr_grpo / dapo.

Run it
    python grpo.py                                 # start, best-of-8, DPO, GRPO, Dr. GRPO, DAPO, RLOO
    python grpo.py --methods=grpo,drgrpo --steps=60      # any subset, longer
    python grpo.py --methods=grpo --batch_prompts=16 --eval_every=7   # held-out figures along the way
    python grpo.py --methods=grpo --agg=token_mean --eps_high=0.28   # GRPO with some of DAPO's fixes
    python grpo.py --methods=grpo --reward=naive   # the gameable reward: see what the policy does to it
    python grpo.py --methods=drgrpo --beta=0 --ptx_coef=0.02   # no KL anchor, a pre-training mix instead
    python grpo.py --init=out/my_sft/ckpt.pt       # any gpt.py checkpoint as the start model

Not covered: process rewards and value networks (PPO itself), DAPO's overlong reward shaping, GSPO's
sequence-level ratio, multi-turn or tool-use rollouts, asynchronous rollout workers and the
sampler/trainer mismatch they bring (here one process samples and trains with the same weights),
KL in the reward (InstructGPT) instead of in the loss.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import dpo
import gpt
import lora

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# Configuration: the objective's knobs (GRPO's values by default), the methods as presets of them,
# and the demo around them (`python grpo.py --key=value`).


@dataclass
class GRPOConfig:
    """One RL run (its objective, rollouts, optimiser) and the comparison demo around it."""

    # the objective (defaults: GRPO as in DeepSeekMath; the methods below override some of them)
    group_size: int = 8  # G answers sampled per prompt
    adv: str = "std"  # advantage: std = (r - mean) / std (GRPO), mean = r - mean (Dr. GRPO), loo (RLOO)
    agg: str = "seq_mean"  # how token losses are averaged: seq_mean (GRPO eq. 3: per answer, then over
    #                        answers), token_mean (DAPO: over all tokens), seq_sum (Dr. GRPO: a constant)
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low (PPO's epsilon)
    eps_high: float = 0.2  # ... and above at 1 + eps_high (DAPO's clip-higher: 0.28)
    beta: float = 0.04  # weight of the k3 KL to the start model (DeepSeekMath: 0.04); 0 = none
    inner_steps: int = 2  # mu: optimizer steps on each batch of rollouts (the 2nd+ are off-policy)
    dynamic_sampling: bool = False  # DAPO: keep only groups whose rewards differ, sample more to refill
    max_refills: int = 3  # dynamic sampling draws at most this many extra batches per step
    dpo_beta: float = 0.1  # method dpo: dpo.py's beta, on the best vs worst answer of each group
    ptx_coef: float = 0.0  # weight of a TinyStories next-token loss added to every optimizer step
    #                        (InstructGPT's PPO-ptx, arXiv:2203.02155 eq. 2; dpo.py's ptx_loss); 0 = none
    ptx_batch: int = 16  # TinyStories windows per optimizer step for that term ...
    ptx_tokens: int = 128  # ... of this many tokens each

    # the reward
    reward: str = "verify"  # verify (lora.py's verifier, + partial credit) | naive (words used, no gates)
    partial: float = 0.5  # credit for a fluent answer that misses words: partial * fraction of words used

    # rollouts and optimisation
    steps: int = 6  # rollout batches per method
    batch_prompts: int = 4  # prompts per batch (B); a batch holds B * G answers
    temperature: float = 0.7  # sampling temperature; the policy trained is softmax(logits / temperature)
    max_new_tokens: int = 240  # an answer not ended by then is unfinished (reward 0)
    lr: float = 1e-3  # AdamW, constant after warmup
    warmup: int = 3  # linear warmup, in optimizer steps
    grad_clip: float = 1.0
    micro_rows: int = 16  # answers per forward/backward (gradient accumulation; the loss is the same)

    # the demo
    init: str = ""  # start model; "" = lora.py's full fine-tune in lora_dir/full, made first if missing
    lora_dir: str = "out/lora"  # where lora.py keeps its base model and fine-tunes
    out_dir: str = "out/grpo"
    methods: str = "start,bon,grpo,drgrpo,dapo,rloo,dpo"  # any of these, in this order; bon = best-of-N
    bon: int = 8  # N of best-of-N
    n_train: int = 0  # training prompts from the train split (0 = all)
    n_eval: int = 64  # held-out prompts (valid split), one answer each at `temperature`
    eval_samples: int = 1  # answers per held-out prompt: the figures average over all (pass@1 of k samples)
    eval_every: int = 0  # also measure the held-out figures every this many steps during training (0 = no),
    #                      saving each such policy as out_dir/<method>/step<N>.pt
    val_tokens: int = 65536  # TinyStories val tokens of the val loss
    seed: int = 1337
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (1 is much faster on a busy machine)
    plot: str = "auto"  # auto: assets/grpo_curves.png for the documented run, else out_dir; "" = none

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group of 1 has no baseline), got {self.group_size}")
        if self.adv not in ADVANTAGES:
            raise ValueError(f"adv must be one of {', '.join(ADVANTAGES)}, not {self.adv!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {', '.join(AGGREGATIONS)}, not {self.agg!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, not {self.reward!r}")
        for name in ("beta", "dpo_beta", "eps_low", "eps_high", "partial", "max_refills", "eval_every",
                     "ptx_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1 (the lower clip 1 - eps_low > 0), got {self.eps_low}")
        for name in ("inner_steps", "steps", "batch_prompts", "max_new_tokens", "micro_rows", "bon", "n_eval",
                     "eval_samples", "val_tokens", "ptx_batch", "ptx_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("lr and temperature must be positive")
        for m in self.method_names():
            if m not in METHODS and m not in ("start", "bon"):
                raise ValueError(f"unknown method {m!r}: use start, bon or one of {', '.join(METHODS)}")

    def method_names(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


# Each method is GRPO's configuration with a few fields changed: the fixes are flags, a method a preset.
# dpo trains dpo.py's loss on the best vs worst answer of each group, from the same rollouts.
METHODS: dict[str, dict] = {
    "grpo": {},
    "drgrpo": dict(adv="mean", agg="seq_sum"),  # Dr. GRPO: no 1/std, no 1/|o_i|
    "dapo": dict(agg="token_mean", eps_high=0.28, dynamic_sampling=True, beta=0.0),  # DAPO sec. 2.3, 3.1-3.3
    "rloo": dict(adv="loo", agg="seq_sum", inner_steps=1),  # REINFORCE + leave-one-out: on-policy, no clip
    "dpo": {},
}


def method_config(cfg: GRPOConfig, name: str) -> GRPOConfig:
    return dataclasses.replace(cfg, **METHODS[name])


# -----------------------------------------------------------------------------------------------
# The reward: a program, not a model. lora.py's verifier: the answer must be a finished, fluent story
# (dpo.py's gates: ended with <|endoftext|> after . ! or ?, >= 25 words, few repeated 3-grams, enough
# distinct words) that uses each required word. 1 for a success, else 0 - or, with `partial` > 0, partial
# credit for a fluent story that uses some of the words (a denser signal when successes are rare).
#
# Why the gates matter: the obvious reward, "fraction of the required words in the answer", is maximised
# by the answer "dog, ball, park." - no story at all. A policy optimised against a score finds what the
# score pays for (Goodhart; DeepSeek-R1 sec. 2.2.2 keeps to rule-based rewards for this reason). The
# fluency gates make every cheap way to contain the words (listing them, repeating them, never ending)
# worth 0. `naive` is that obvious reward, kept to watch the policy game it (docs/grpo.md).


def verifier_reward(answer: str, words: tuple[str, ...], ended: bool, partial: float = 0.0) -> float:
    """1 if lora.py's verifier accepts the answer; else partial * (fraction of words used) for a fluent
    answer, and 0 for a disfluent or unfinished one."""
    c = lora.check_answer(answer, words, ended)
    if c["ok"]:
        return 1.0
    return partial * c["words_used"] if c["fluent"] else 0.0


def naive_reward(answer: str, words: tuple[str, ...], ended: bool, partial: float = 0.0) -> float:
    """Fraction of the required words the answer contains: no gates (it is what the fluency gates fix)."""
    return lora.check_answer(answer, words, ended)["words_used"]


REWARDS: dict[str, Callable[..., float]] = {"verify": verifier_reward, "naive": naive_reward}


# -----------------------------------------------------------------------------------------------
# Advantages: how much better each answer is than its group. rewards (n, G): n groups of G answers.
#
#   std  (GRPO, DeepSeekMath 4.1.2):  A_i = (r_i - mean r) / (std r + 1e-4)   std with Bessel's n - 1, as TRL
#   mean (Dr. GRPO, sec. 3.1):         A_i =  r_i - mean r
#   loo  (RLOO, Ahmadian et al.):      A_i =  r_i - mean_{j != i} r_j  =  G / (G - 1) * (r_i - mean r)
#
# A group whose rewards are all equal gets A = 0 for every answer (the + 1e-4 keeps 0 / 0 away): it
# teaches nothing, which is why DAPO's dynamic sampling drops such groups instead of averaging zeros in.
# Dividing by std rescales every prompt to unit spread: a prompt the policy solves 1 time in 8 gets as
# much total push as one it solves 4 times in 8. Dr. GRPO calls that a difficulty bias and drops it.

ADVANTAGES = ("std", "mean", "loo")


def group_advantages(rewards: torch.Tensor, kind: str = "std") -> torch.Tensor:
    """Advantages (n, G) of rewards (n, G), one value per answer (the same for all its tokens)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (n_groups, G), got shape {tuple(rewards.shape)}")
    G = rewards.size(1)
    if G < 2:
        raise ValueError("a group needs at least 2 answers: with G = 1 there is no baseline to compare to")
    centered = rewards - rewards.mean(1, keepdim=True)  # (n, G)
    if kind == "std":
        return centered / (rewards.std(1, keepdim=True) + 1e-4)
    if kind == "mean":
        return centered
    if kind == "loo":
        return centered * G / (G - 1)
    raise ValueError(f"unknown advantage {kind!r}: use one of {', '.join(ADVANTAGES)}")


# -----------------------------------------------------------------------------------------------
# The objective, token by token. For answer i (tokens o_i,1 .. o_i,|o_i|) and its token t:
#
#   rho_i,t = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)     the policy now vs at sampling
#   surrogate_i,t = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)              (PPO eq. 7)
#   k3_i,t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 >= 0                (DeepSeekMath eq. 4)
#   J = sum_i,t w_i,t (surrogate_i,t - beta k3_i,t),   loss = -J                (DeepSeekMath eq. 3)
#
# The clip is the trust region: once a token's probability has moved by more than eps in the direction
# its advantage wants, min() picks the clipped, constant term and its gradient is zero - the step stops
# pushing that token. In the other direction (the update overshot the wrong way) the unclipped term is
# smaller and keeps its gradient, so mistakes are always corrected. At the first inner step rho = 1 and
# the gradient is A grad log pi: plain REINFORCE with the group baseline.
#
# k3 is an unbiased estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_theta (E[pi_ref/pi] = 1),
# is >= 0 for every token (x - 1 - log x >= 0), and its gradient is that of the exact KL in expectation.
#
# The weights w are the normalisation, the part the fixes argue about (mask: 1 on answer tokens):
#   seq_mean   (GRPO eq. 3):      w_i,t = 1 / (N |o_i|)         each answer counts once, whatever its length
#   token_mean (DAPO sec. 3.3):   w_i,t = 1 / sum_j |o_j|       each token counts once
#   seq_sum    (Dr. GRPO sec. 3.1): w_i,t = 1 / (N L_max)        a constant: the plain sum of log-probs
# With seq_mean a long answer's tokens each get a smaller share: a wrong answer (A < 0) is pushed down less
# per token the longer it is, a right one pushed up more the shorter it is - so wrong answers drift long
# (Dr. GRPO sec. 3.1). seq_sum is the unbiased policy gradient of sum_t log pi; token_mean is between.

AGGREGATIONS = ("seq_mean", "token_mean", "seq_sum")


def loss_weights(mask: torch.Tensor, agg: str, max_len: int) -> torch.Tensor:
    """w (N, T) of the objective above for the answers' token mask (N, T); sums over the whole batch, so a
    forward in chunks of rows adds up to the same loss."""
    N = mask.size(0)
    if agg == "seq_mean":
        return mask / (N * mask.sum(1, keepdim=True).clamp_min(1))
    if agg == "token_mean":
        return mask / mask.sum().clamp_min(1)
    if agg == "seq_sum":
        return mask / (N * max_len)
    raise ValueError(f"unknown aggregation {agg!r}: use one of {', '.join(AGGREGATIONS)}")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from log pi and log pi_ref of sampled tokens (any shape)."""
    log_r = ref_logps - logps  # log(pi_ref / pi)
    return torch.exp(log_r) - log_r - 1  # DeepSeekMath eq. 4


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, weights: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """-J of DeepSeekMath eq. 3 for a batch: logps (N, T) of pi_theta (with gradient), old_logps (N, T) of
    the sampling policy, ref_logps (N, T) of the reference (None when beta = 0), advantages (N,), weights
    (N, T) from loss_weights. Returns the loss and detached stats (clipped fraction, mean k3, mean ratio)."""
    if old_logps.requires_grad:
        raise ValueError("old_logps must be detached: they are the sampling policy's, a constant of the step")
    ratio = torch.exp(logps - old_logps)  # rho_i,t (N, T)
    A = advantages[:, None]  # (N, 1): one advantage per answer, the same for each of its tokens
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    surrogate = torch.minimum(unclipped, clipped)  # PPO eq. 7
    objective = surrogate
    kl = torch.zeros_like(logps)
    if beta > 0:
        kl = k3_kl(logps, ref_logps)  # DeepSeekMath eq. 4
        objective = surrogate - beta * kl
    loss = -(objective * weights).sum()  # eq. 3, normalised by the weights
    m = weights > 0
    stats = dict(clip_frac=float(((clipped < unclipped) & m).sum() / m.sum().clamp_min(1)),
                 kl=float(kl.detach()[m].mean()) if m.any() else 0.0,
                 ratio=float(ratio.detach()[m].mean()) if m.any() else 1.0)
    return loss, stats


# -----------------------------------------------------------------------------------------------
# Rollouts. A batch of prompts is answered G times each by dpo.sample_completions (KV-cache decoding,
# every (prompt, answer) pair a row of one batch). Then a teacher-forced forward in the training layout
# gives the per-token log-probs of the sampling policy, old_logps: the same weights that sampled, so the
# first inner step has rho = 1 (a separate inference engine, as in large-scale RL, makes this mismatch a
# real problem; here there is none to speak of). The training loop gets them from its first inner step's
# own forward; rollout_batch computes them separately, as the reference the tests pin that against.
# An answer that ended keeps its <|endoftext|>: stopping is an action the policy takes and is rewarded for.


def token_logps(model: gpt.GPT, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of each next token: (N, T-1) from tokens (N, T). The sum over an
    answer's mask is dpo.completion_logps (at temperature 1)."""
    logits, _ = model(tokens[:, :-1])  # (N, T-1, V)
    nll = F.cross_entropy((logits.float() / temperature).flatten(0, 1), tokens[:, 1:].flatten(),
                          reduction="none")  # (N (T-1),): rows of V contiguous, faster than (N, V, T-1)
    return -nll.view(tokens.size(0), -1)


@torch.no_grad()
def sample_groups(model: gpt.GPT, enc, tasks: list[lora.Instruction], G: int, max_new_tokens: int,
                  temperature: float, generator: torch.Generator) -> list[dict]:
    """G answers to each task: [{task, prompt (ids), answers [ids, + <|endoftext|> if ended], ended}].
    Prompts of one token length are decoded together (the model has no padding mask, so a batch shares a
    prompt length); the answer is capped by the context the model was trained on."""
    prompts = [lora.encode_prompt(enc, t.prompt) for t in tasks]
    out: list[Optional[dict]] = [None] * len(tasks)
    for P in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == P]
        n_new = min(max_new_tokens, model.cfg.block_size - P)
        got = dpo.sample_completions(model, [prompts[i] for i in idx], G, n_new, temperature, enc.eot_token,
                                     generator)
        for i, group in zip(idx, got):
            out[i] = dict(task=tasks[i], prompt=prompts[i], ended=[e for _, e in group],
                          answers=[ids + [enc.eot_token] if e else ids for ids, e in group])
    return out  # type: ignore[return-value]


def score_groups(groups: list[dict], enc, reward_fn: Callable[..., float], partial: float = 0.0) -> None:
    """Add the texts, rewards and verifier outcomes of every answer to each group (in place)."""
    for g in groups:
        g["texts"] = [enc.decode(a[:-1] if e else a) for a, e in zip(g["answers"], g["ended"])]
        g["rewards"] = [reward_fn(t, g["task"].words, e, partial) for t, e in zip(g["texts"], g["ended"])]
        g["success"] = [lora.verify(t, g["task"].words, e) for t, e in zip(g["texts"], g["ended"])]


def length_chunks(mask: torch.Tensor, rows: int, unit: int = 1) -> list[tuple[torch.Tensor, int]]:
    """The batch's forward/backward chunks: (row indices, columns), at most `rows` rows each. Rows are
    sorted by where their answer ends (`unit` consecutive rows stay together: DPO's chosen/rejected pairs)
    and each chunk is cut to the columns its longest answer needs, so the right padding of a batch whose
    answers run from 20 to 240 tokens is mostly never computed. The loss weights sum over the whole batch,
    so the chunks' losses add up to the same total in any order."""
    N, T = mask.shape
    if N % unit:
        raise ValueError(f"{N} rows do not split into units of {unit} (DPO's rows come in pairs)")
    end = T - torch.argmax(mask.flip(1), 1)  # (N,): one past each row's last target (T for an empty row)
    order = torch.argsort(end.view(-1, unit).amax(1), stable=True)  # units, shortest first
    idx = (order[:, None] * unit + torch.arange(unit)).flatten()  # (N,) rows, units kept together
    return [(r, int(end[r].max())) for r in idx.split(rows)]


@torch.no_grad()
def chunked_logps(model: gpt.GPT, tokens: torch.Tensor, chunks: list[tuple[torch.Tensor, int]],
                  temperature: float) -> torch.Tensor:
    """token_logps (N, T-1) of a whole batch without gradient, computed chunk by chunk (zeros past each
    chunk's columns: only padding lies there)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(tokens.size(0), tokens.size(1) - 1)
    for rows, cols in chunks:
        out[rows, :cols] = token_logps(model, tokens[rows, :cols + 1], temperature)
    model.train(was_training)
    return out


def rollout_batch(policy: gpt.GPT, groups: list[dict], pad: int, temperature: float, micro_rows: int,
                  with_old: bool = True) -> dict:
    """The training batch of `groups`: tokens (N, T), mask (N, T-1) of answer targets, group ids (N,),
    rewards (N,), and old_logps (N, T-1), the sampling policy's per-token log-probs (no gradient).
    with_old=False leaves old_logps out: train_rl takes them from its first inner step's forward, which
    runs the same weights on the same tokens (one forward of the batch saved)."""
    prompts = [g["prompt"] for g in groups for _ in g["answers"]]
    tokens, mask, lengths = dpo.pack(prompts, [a for g in groups for a in g["answers"]], pad)
    batch = dict(tokens=tokens, mask=mask, lengths=lengths,
                 group=torch.tensor([k for k, g in enumerate(groups) for _ in g["answers"]]),
                 rewards=torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float32))
    if with_old:
        batch["old_logps"] = chunked_logps(policy, tokens, length_chunks(mask, micro_rows), temperature) * mask
    return batch


# -----------------------------------------------------------------------------------------------
# The RL loop: sample -> score -> advantages -> mu optimizer steps on the clipped objective.


def make_batches(tasks: list[lora.Instruction], enc, B: int, seed: int) -> Callable[[], list]:
    """An endless stream of B prompts at a time, each batch from one prompt length (one KV cache), the
    length drawn in proportion to how many prompts have it; within a length, epochs in random order."""
    by_len: dict[int, list] = {}
    for t in tasks:
        by_len.setdefault(len(lora.encode_prompt(enc, t.prompt)), []).append(t)
    lengths = sorted(by_len)
    rng = np.random.default_rng(seed)
    queues: dict[int, list] = {P: [] for P in lengths}
    p = np.array([len(by_len[P]) for P in lengths], dtype=float)

    def next_batch() -> list:
        P = lengths[rng.choice(len(lengths), p=p / p.sum())]
        while len(queues[P]) < B:
            queues[P] += [by_len[P][i] for i in rng.permutation(len(by_len[P]))]
        batch, queues[P] = queues[P][:B], queues[P][B:]
        return batch

    return next_batch


def train_rl(policy: gpt.GPT, ref: gpt.GPT, tasks: list[lora.Instruction], enc, cfg: GRPOConfig,
             method: str = "grpo", log: Callable = print,
             evaluate: Optional[Callable[[gpt.GPT], dict]] = None, ptx_data: Optional[np.ndarray] = None
             ) -> list[dict]:
    """Train `policy` in place with `method` (grpo-family settings from cfg, or dpo) on prompts from
    `tasks`; `ref` is the frozen start model. Returns one history entry per rollout batch; with
    `evaluate` and cfg.eval_every, the entries of every eval_every-th step (not the last) hold
    evaluate(policy) under "heldout" (it must not touch the training's random draws). cfg.ptx_coef > 0
    adds that times dpo.ptx_loss on windows of ptx_data (TinyStories tokens) to every optimizer step."""
    if not tasks:
        raise ValueError("no training prompts: the task list is empty")
    if cfg.ptx_coef and ptx_data is None:
        raise ValueError("ptx_coef > 0 needs ptx_data: the TinyStories tokens of its next-token term")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    reward_fn, eot, G = REWARDS[cfg.reward], enc.eot_token, cfg.group_size
    gen = torch.Generator().manual_seed(cfg.seed)  # the sampler's draws
    ptx_gen = torch.Generator().manual_seed(cfg.seed + 2)  # the ptx windows: a stream of their own
    next_batch = make_batches(tasks, enc, cfg.batch_prompts, cfg.seed)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)  # no decay: the reference, not zero, is the anchor
    ref.eval()
    history, drawn, n_updates, t0, c0 = [], 0, 0, time.time(), time.process_time()
    for step in range(cfg.steps):
        # 1. Rollouts from the current policy (it is pi_old for this batch), scored by the program.
        groups = sample_groups(policy, enc, next_batch(), G, cfg.max_new_tokens, cfg.temperature, gen)
        score_groups(groups, enc, reward_fn, cfg.partial)
        drawn += len(groups) * G
        seen = list(groups)  # everything sampled this step, for the logged reward
        if cfg.dynamic_sampling:  # DAPO sec. 3.2: keep groups with 0 < #right < G, refill the batch
            groups = [g for g in groups if len(set(g["rewards"])) > 1]
            for _ in range(cfg.max_refills):
                if len(groups) >= cfg.batch_prompts:
                    break
                more = sample_groups(policy, enc, next_batch(), G, cfg.max_new_tokens, cfg.temperature, gen)
                score_groups(more, enc, reward_fn, cfg.partial)
                drawn += len(more) * G
                seen += more
                groups += [g for g in more if len(set(g["rewards"])) > 1]
            groups = groups[:cfg.batch_prompts]
        rewards = [r for g in seen for r in g["rewards"]]
        h = dict(step=step + 1, reward=float(np.mean(rewards)),
                 success=float(np.mean([s for g in seen for s in g["success"]])),
                 length=float(np.mean([len(a) for g in seen for a in g["answers"]])), samples=drawn)
        if method == "dpo":  # best vs worst answer of each group (ties give no pair), as dpo.make_pairs
            pairs = [(g, int(np.argmax(g["rewards"])), int(np.argmin(g["rewards"]))) for g in groups]
            groups = [dict(g, answers=[g["answers"][b], g["answers"][w]],
                           rewards=[g["rewards"][b], g["rewards"][w]])
                      for g, b, w in pairs if g["rewards"][b] > g["rewards"][w]]
        if not groups:  # nothing to learn from (every group tied): no update, the samples still count
            history.append(dict(h, kl=history[-1]["kl"] if history else 0.0, loss=0.0, clip_frac=0.0,
                                time=time.time() - t0, cpu=time.process_time() - c0))
            log(f"  {method} step {step + 1}/{cfg.steps}: every group tied (reward {h['reward']:.3f}), "
                "no update")
            continue

        # 2. The batch: reference log-probs per token (constants), advantages per answer. The sampling
        # policy's log-probs (old_logps) come from the first inner step's forward: nothing has changed
        # the weights since sampling, so that forward is pi_old's, and its ratio is exactly 1.
        batch = rollout_batch(policy, groups, eot, cfg.temperature, cfg.micro_rows, with_old=False)
        tokens, mask = batch["tokens"], batch["mask"]
        if method == "dpo":  # rows alternate chosen, rejected: chunks keep each pair together
            adv, chunks = None, length_chunks(mask, max(2, cfg.micro_rows - cfg.micro_rows % 2), unit=2)
        else:
            adv = group_advantages(batch["rewards"].view(len(groups), G), cfg.adv).flatten()  # (N,)
            chunks = length_chunks(mask, cfg.micro_rows)
        ref_logps = chunked_logps(ref, tokens, chunks, cfg.temperature)  # (N, T-1)
        old_logps = torch.zeros_like(ref_logps)  # filled at the first inner step
        weights = loss_weights(mask, cfg.agg, cfg.max_new_tokens)  # (N, T-1): the normalisation

        # 3. mu optimizer steps on this batch (Algorithm 1's inner loop), the forward in chunks of rows.
        policy.train()
        for inner in range(cfg.inner_steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (n_updates + 1) / cfg.warmup)
            opt.zero_grad(set_to_none=True)
            total, clipped = 0.0, []
            for rows, cols in chunks:
                logps = token_logps(policy, tokens[rows, :cols + 1], cfg.temperature)  # (rows, cols), grad
                m, ref_c = mask[rows, :cols], ref_logps[rows, :cols]
                if inner == 0:
                    old_logps[rows, :cols] = logps.detach() * m
                if method == "dpo":  # dpo.py's loss on summed log-probs, averaged over all pairs
                    seq, ref_seq = (logps * m).sum(1), (ref_c * m).sum(1)
                    losses, _, _ = dpo.dpo_loss(
                        policy_chosen_logps=seq[0::2], policy_rejected_logps=seq[1::2],
                        ref_chosen_logps=ref_seq[0::2], ref_rejected_logps=ref_seq[1::2], beta=cfg.dpo_beta)
                    loss = losses.sum() / len(groups)
                else:
                    loss, s = grpo_loss(logps, old_logps[rows, :cols], ref_c, adv[rows],
                                        weights[rows, :cols], cfg.eps_low, cfg.eps_high, cfg.beta)
                    clipped.append(s["clip_frac"] * float(m.sum()))
                loss.backward()  # the chunks' losses add up to the batch's: gradient accumulation
                total += loss.item()
            if cfg.ptx_coef:  # the pre-training mix: keep the plain-story next-token loss where it was
                ptx = dpo.ptx_loss(policy, ptx_data, ptx_gen, cfg)
                (cfg.ptx_coef * ptx).backward()
                h["ptx_nll"] = ptx.item()
            if not (math.isfinite(total) and math.isfinite(h.get("ptx_nll", 0.0))):
                raise FloatingPointError(f"{method}: the loss is {total} (ptx term {h.get('ptx_nll', 0.0)}) at step "
                                         f"{step + 1}: lower --lr")
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            n_updates += 1
            h["updates"] = n_updates
            if inner == 0:  # KL(pi_old || pi_ref) per token on the answers just sampled: the distance so far
                h["kl"] = float((k3_kl(old_logps, ref_logps) * mask).sum() / mask.sum())
            h["loss"] = h.get("loss", total)  # the first inner step's
            h["clip_frac"] = sum(clipped) / float(mask.sum())  # tokens clipped at the last inner step
        policy.eval()
        h["time"], h["cpu"] = time.time() - t0, time.process_time() - c0
        history.append(h)
        log(f"  {method} step {step + 1}/{cfg.steps}: reward {h['reward']:.3f} success {h['success']:.3f} "
            f"kl {h['kl']:.4f} length {h['length']:.0f} clip {h['clip_frac']:.3f} groups {len(groups)} "
            f"samples {drawn} ({h['time']:.0f} s)")
        if evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            e0, c1 = time.time(), time.process_time()
            h["heldout"] = {k: v for k, v in evaluate(policy).items() if isinstance(v, float)}
            log(f"  {method} held-out at step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                    h["heldout"].items()))
            t0, c0 = t0 + time.time() - e0, c0 + time.process_time() - c1  # times count training only
    return history


# -----------------------------------------------------------------------------------------------
# Evaluation on held-out prompts: one answer each at the training temperature (the same draws for every
# model: a fixed seed), its reward and verdict, the exact per-token KL to the start model on those
# answers (dpo.token_kl), the answer length, and the val loss on plain TinyStories (forgetting).


def heldout_report(model: gpt.GPT, ref: gpt.GPT, enc, held: list[lora.Instruction], cfg: GRPOConfig,
                   val: np.ndarray, byte_lengths: np.ndarray, n: int = 1) -> dict:
    """Held-out figures of `model`; with n > 1, best-of-n: n answers per prompt, the highest reward kept.
    With n = 1 and cfg.eval_samples = k > 1, k answers per prompt, every one scored: the success rate is
    then pass@1 averaged over k samples (its standard error shrinks by about sqrt(k))."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    k = n if n > 1 else cfg.eval_samples
    groups = sample_groups(model, enc, held, k, cfg.max_new_tokens, cfg.temperature, gen)
    score_groups(groups, enc, REWARDS[cfg.reward], cfg.partial)
    keys = ("answers", "ended", "texts", "rewards", "success")
    if n > 1:  # best-of-n: the highest reward of each group
        keep = [[int(np.argmax(g["rewards"]))] for g in groups]
    else:  # every answer, as a group of one
        keep = [list(range(k)) for _ in groups]
    picked = [dict(g, **{key: [g[key][b]] for key in keys}) for g, bs in zip(groups, keep) for b in bs]
    lengths = [len(g["answers"][0]) for g in picked]
    if n > 1 or model is ref:  # best-of-n's KL: the bound log n - (n - 1) / n per answer, per token
        kl = (math.log(n) - (n - 1) / n) / float(np.mean(lengths))
    else:
        kls, ws = [], []
        for i in range(0, len(picked), cfg.micro_rows):
            chunk = picked[i:i + cfg.micro_rows]
            tokens, mask, _ = dpo.pack([g["prompt"] for g in chunk], [g["answers"][0] for g in chunk],
                                       enc.eot_token)
            kls.append(dpo.token_kl(model, ref, tokens, mask, cfg.temperature))
            ws.append(float(mask.sum()))
        kl = float(np.average(kls, weights=ws))
    fluent = [lora.check_answer(g["texts"][0], g["task"].words, g["ended"][0]) for g in picked]
    v = gpt.evaluate(model, val, byte_lengths, model.cfg.block_size, 16, cfg.val_tokens)["loss"]
    ok = [g["success"][0] for g in picked]
    return dict(success=float(np.mean(ok)), reward=float(np.mean([g["rewards"][0] for g in picked])),
                fluent=float(np.mean([c["fluent"] for c in fluent])),
                words=float(np.mean([c["words_used"] for c in fluent])), kl=kl, val_loss=v,
                length=float(np.mean(lengths)),
                example=next((g["texts"][0] for g, s in zip(picked, ok) if s), "(none)"),
                failure=next((g["texts"][0] for g, s in zip(picked, ok) if not s), "(none)"))


# -----------------------------------------------------------------------------------------------
# Demo: the start model, every method from it with the same prompts and sample budget, the table, plots.


def start_model(cfg: GRPOConfig) -> tuple[gpt.GPT, object]:
    """--init, or lora.py's full fine-tune of gpt.py's default model (made with lora.py if missing)."""
    model, enc, _ = gpt.load_model(start_path(cfg))
    return model, enc


def start_path(cfg: GRPOConfig) -> Path:
    """The start model's checkpoint: --init, or lora.py's full fine-tune (made with lora.py if missing)."""
    path = Path(cfg.init) if cfg.init else Path(cfg.lora_dir) / "full" / "ckpt.pt"
    if not cfg.init and not path.exists():
        print(f"no start model at {path}: running lora.py's full fine-tune first "
              f"(`python lora.py --methods=full --out_dir={cfg.lora_dir}`)", flush=True)
        lora.run_demo(lora.LoRADemoConfig(methods="full", out_dir=cfg.lora_dir, num_threads=cfg.num_threads,
                                          plot=""))
    return path


def save_policy(policy: gpt.GPT, cfg: GRPOConfig, path: Path, history: list[dict]) -> None:
    """The trained policy as a gpt.py checkpoint: the start model's file with the new weights (and the run's
    config and history beside them), so `--init`, lora.py, dpo.py and speculative.py load it as any other.
    It holds no optimizer state: it is a result to evaluate or start from, not a run to resume."""
    state = gpt.read_checkpoint(start_path(cfg))
    weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    state.update(model=weights, digest=gpt.weights_digest(weights), optimizer={},
                 rl=dict(config=dataclasses.asdict(cfg), history=history))
    with gpt.atomic_path(path) as tmp:
        torch.save(state, tmp)


def print_table(rows: list[dict], start_val: float) -> None:
    print("\n| method | held-out success | mean reward | fluent | words used | KL/token to start | "
          f"val loss (start {start_val:.4f}) | mean length | samples: training / per test prompt | "
          "time: training (CPU) / eval |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl = ("<= " if r["method"].startswith("best-of") else "") + f"{r['kl']:.4f}"
        train = f"{r['train_time']:.0f} s ({r['train_cpu']:.0f} s)" if r["train_time"] else "-"
        val = f"{r['val_loss']:.4f} ({100 * (r['val_loss'] / start_val - 1):+.1f}%)"
        print(f"| {r['method']} | {r['success']:.3f} | {r['reward']:.3f} | {r['fluent']:.3f} | "
              f"{r['words']:.3f} | {kl} | {val} | {r['length']:.0f} | "
              f"{r['train_samples']:,} / {r['test_samples']} | {train} / {r['eval_time']:.0f} s |")


def smooth(v: list, k: int = 5) -> np.ndarray:
    """k-step moving average of a long curve; a short one (< 5 k points) as it is."""
    return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) >= 5 * k else np.asarray(v, dtype=float)


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Reward, KL and mean answer length vs step for every trained method (5-step moving averages of
    runs of 25 steps or more)."""
    plt = gpt.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, hist in runs.items():
        emphasis = dict(lw=2.2) if name in ("grpo", "drgrpo") else dict(lw=1.2, alpha=0.8)
        for ax, key in zip(axes, ("reward", "kl", "length")):
            v = smooth([h[key] for h in hist])
            line, = ax.plot(np.arange(len(v)) + (len(hist) - len(v)) + 1, v, label=name, **emphasis)
        held = [(h["step"], h["heldout"]["success"]) for h in hist if "heldout" in h]
        if held:  # --eval_every: the held-out success rate along the way, in the method's colour
            axes[0].plot(*zip(*held), "o--", color=line.get_color(), lw=1, label=f"{name}: held-out success")
    titles = ("mean reward of the rollouts", "KL(pi || start) per token (k3, on the rollouts)",
              "mean answer length (tokens): GRPO vs Dr. GRPO")
    for ax, t in zip(axes, titles):
        ax.set(xlabel="step (rollout batch)", title=t)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    gpt.save_figure(fig, path)


def run_demo(cfg: GRPOConfig) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_all = time.time()
    ref, enc = start_model(cfg)
    ref.requires_grad_(False)
    val, byte_lengths = gpt.load_tokens("valid", enc), gpt.token_byte_lengths(enc)
    ptx_data = gpt.load_tokens("train", enc) if cfg.ptx_coef else None
    tasks = lora.load_instructions("train", cfg.n_train, seed=cfg.seed)
    held = lora.load_instructions("valid", cfg.n_eval, seed=cfg.seed + 1)
    print(f"{len(tasks):,} training prompts, {len(held)} held-out prompts; G = {cfg.group_size}, "
          f"{cfg.batch_prompts} prompts per step, {cfg.steps} steps per method\nexample: {held[0].prompt!r}")
    print("\nthe reward on hand-made answers (verify | naive):")
    for text, ended in GAMING_EXAMPLES:
        note = "" if ended else " (unfinished)"
        print(f"  {verifier_reward(text, EXAMPLE_WORDS, ended, cfg.partial):.2f} | "
              f"{naive_reward(text, EXAMPLE_WORDS, ended):.2f}  {text[:70]!r}{note}")
    rows, runs, out = [], {}, Path(cfg.out_dir)
    start = None
    for name in cfg.method_names():
        row = dict(method=name, train_samples=0, train_time=0.0, train_cpu=0.0)
        policy, mc, n = ref, cfg, 1
        if name == "bon":
            n, row["method"] = cfg.bon, f"best-of-{cfg.bon} (verifier at test time)"
        elif name == "start":
            row["method"] = "start model"
        else:
            mc = method_config(cfg, name)
            policy = copy.deepcopy(ref).requires_grad_(True)
            print(f"\n=== {name}: " + ", ".join(f"{k}={getattr(mc, k)}" for k in (
                "adv", "agg", "eps_low", "eps_high", "beta", "inner_steps", "dynamic_sampling")), flush=True)
            steps = itertools.count(mc.eval_every, mc.eval_every)

            def evaluate(p: gpt.GPT) -> dict:  # at every eval_every-th step: save the policy, measure it
                save_policy(p, mc, out / name / f"step{next(steps)}.pt", [])
                return heldout_report(p, ref, enc, held, mc, val, byte_lengths)
            hist = train_rl(policy, ref, tasks, enc, mc, name, evaluate=evaluate, ptx_data=ptx_data)
            runs[name] = hist
            save_policy(policy, mc, out / name / "ckpt.pt", hist)
            row.update(train_samples=hist[-1]["samples"], train_time=hist[-1]["time"],
                       train_cpu=hist[-1]["cpu"], history=hist)
        t0 = time.time()
        row.update(heldout_report(policy, ref, enc, held, mc, val, byte_lengths, n), test_samples=n)
        row["eval_time"] = time.time() - t0
        if name in runs:  # the final held-out figures close the run's curve of them (--eval_every)
            keys = ("success", "reward", "fluent", "words", "kl", "val_loss", "length")
            runs[name][-1]["heldout"] = {k: row[k] for k in keys}
        rows.append(row)
        start = row if name == "start" else start
        print(f"{row['method']}: success {row['success']:.3f}, reward {row['reward']:.3f}, "
              f"KL {row['kl']:.4f}, val {row['val_loss']:.4f}, length {row['length']:.0f}", flush=True)
        with gpt.atomic_path(out / "results.json") as tmp:  # after every method: a long run keeps its rows
            tmp.write_text(json.dumps(dict(config=dataclasses.asdict(cfg), rows=rows), indent=1))
    control = None
    if cfg.ptx_coef and runs:  # what the pre-training mix alone does to the val loss (dpo.py's control)
        updates = max(h.get("updates", 0) for hist in runs.values() for h in hist)
        dc = dpo.DPOConfig(lr=cfg.lr, warmup_steps=cfg.warmup, grad_clip=cfg.grad_clip, ptx_coef=cfg.ptx_coef,
                           ptx_batch=cfg.ptx_batch, ptx_tokens=cfg.ptx_tokens, seed=cfg.seed)
        model = copy.deepcopy(ref).requires_grad_(True)
        dpo.train_ptx_only(model, updates, dc, ptx_data)  # the same optimizer, lr, windows; no RL term
        control = gpt.evaluate(model, val, byte_lengths, ref.cfg.block_size, 16, cfg.val_tokens)["loss"]
        print(f"ptx-only control ({updates} optimizer steps on the same TinyStories windows, no RL term): "
              f"val loss {control:.4f}")
        with gpt.atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(dict(config=dataclasses.asdict(cfg), rows=rows, ptx_control_val=control),
                                      indent=1))
    start_val = start["val_loss"] if start else gpt.evaluate(ref, val, byte_lengths, ref.cfg.block_size, 16,
                                                             cfg.val_tokens)["loss"]
    print_table(rows, start_val)
    for r in rows:
        print(f"\n--- {r['method']}: a successful answer ---\n{r['example']}\n--- and a failed one ---\n"
              f"{r['failure']}")
    print(f"\ntotal {time.time() - t_all:.0f} s")
    documented = gpt.is_default(cfg, ("out_dir", "num_threads", "plot", "init", "lora_dir"))
    path = gpt.plot_path("grpo_curves.png", documented, cfg.out_dir, cfg.plot)
    if path and runs:
        n = sum(p.numel() for p in ref.parameters())
        plot_curves(runs, path, f"grpo.py: RL on the Words -> Story task, {n / 1e6:.1f}M-parameter model, "
                    f"{cfg.batch_prompts} prompts x {cfg.group_size} answers per step")
        print(f"plot: {path}")
    return dict(rows=rows, runs=runs, ptx_control_val=control)


EXAMPLE_WORDS = ("dog", "ball", "park")
GAMING_EXAMPLES = [  # (answer, ended): what a policy paid for "contains the words" can write
    ("dog, ball, park.", True),
    ("The dog and the ball and the park. The dog and the ball and the park. The dog and the ball and "
     "the park. The dog and the ball and the park.", True),
    ("Once upon a time, a dog found a ball in the park and", False),
    ("Once upon a time, a little dog named Max went to the park. He found a red ball under a tree. Max "
     "pushed the ball with his nose and ran after it all day. When the sun went down, he went home, happy "
     "and tired.", True),
]


def main(argv: list[str]) -> None:
    try:
        cfg = gpt.config_from_args(GRPOConfig, argv, __doc__, "grpo.py")
        run_demo(cfg)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # bad input: one clear line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
