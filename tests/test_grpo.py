"""Tests for grpo.py: the reward and its gates, group advantages (hand-computed, every variant), the loss
normalisations, the clipped objective's gradient inside and outside the trust region, k3 (>= 0, exact in
expectation), rollout log-probs against a float64 recomputation, the RL loop (dynamic sampling, DPO on the
same rollouts, a short run that raises the held-out reward), and bad input."""

import copy
import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dpo
import gpt
import grpo
import lora
from conftest import tiny_config, tiny_train_config

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("ball", "dog", "park")
STORY = ("Tom had a red ball. He took the ball to the park with his dog. The dog ran after the ball and "
         "brought it back. Tom laughed and threw it again. They played until the sun went down, and then "
         "they walked home together, happy and tired.")


def quiet(*args) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is about as fast as two on an idle machine and much faster on a
    busy one (no threads spinning while they wait for a core). Restored for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, **kw) -> gpt.GPT:
    torch.manual_seed(seed)
    return gpt.GPT(tiny_config(**kw)).eval()


# -----------------------------------------------------------------------------------------------
# The reward


@pytest.mark.parametrize("answer,ended,partial,expected", [
    (STORY, True, 0.0, 1.0),
    (STORY.replace("park", "garden"), True, 0.0, 0.0),  # fluent, a word missing: 0 without partial credit
    (STORY.replace("park", "garden"), True, 0.6, 0.6 * 2 / 3),  # ... partial * fraction of words used
    (STORY, False, 0.6, 0.0),  # never ended: disfluent, no partial credit either
    ("ball, dog, park.", True, 0.6, 0.0),  # the list: too short
])
def test_verifier_reward(answer, ended, partial, expected):
    assert grpo.verifier_reward(answer, WORDS, ended, partial) == pytest.approx(expected)


@pytest.mark.parametrize("text,ended", grpo.GAMING_EXAMPLES[:-1])
def test_gaming_answers_win_the_naive_reward_and_lose_the_gated_one(text, ended):
    """Listing, repeating, stopping mid-sentence: full marks from the naive reward, 0 once gated."""
    assert grpo.naive_reward(text, grpo.EXAMPLE_WORDS, ended) == 1.0
    assert grpo.verifier_reward(text, grpo.EXAMPLE_WORDS, ended, partial=0.5) == 0.0


def test_a_real_story_wins_both_rewards():
    text, ended = grpo.GAMING_EXAMPLES[-1]
    assert grpo.verifier_reward(text, grpo.EXAMPLE_WORDS, ended) == 1.0
    assert grpo.naive_reward(text, grpo.EXAMPLE_WORDS, ended) == 1.0


# -----------------------------------------------------------------------------------------------
# Advantages


def test_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # mean 1/4; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    torch.testing.assert_close(grpo.group_advantages(r, "std"),
                               torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (0.5 + 1e-4))
    torch.testing.assert_close(grpo.group_advantages(r, "mean"), torch.tensor([[0.75, -0.25, -0.25, -0.25]]))
    # leave one out: 1 - mean(0, 0, 0) = 1; 0 - mean(1, 0, 0) = -1/3
    torch.testing.assert_close(grpo.group_advantages(r, "loo"), torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))


def test_loo_equals_explicit_leave_one_out():
    r = torch.rand(5, 6, dtype=torch.float64)
    loo = torch.stack([r[:, i] - torch.cat([r[:, :i], r[:, i + 1:]], 1).mean(1) for i in range(6)], 1)
    torch.testing.assert_close(grpo.group_advantages(r, "loo"), loo, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", grpo.ADVANTAGES)
def test_tied_group_gets_zero_advantage_not_nan(kind):
    r = torch.tensor([[1.0] * 8, [0.0] * 8, [0.3, 0.7, 0.3, 0.7, 0.3, 0.7, 0.3, 0.7]])
    a = grpo.group_advantages(r, kind)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:2], torch.zeros(2, 8))
    assert (a[2] > 0).tolist() == [False, True] * 4  # above the mean: positive, whatever the scaling
    torch.testing.assert_close(a.sum(1), torch.zeros(3), rtol=0, atol=1e-5)  # centered within each group


def test_std_scaling_equalises_prompts_and_mean_does_not():
    """Dr. GRPO's difficulty bias: with 1/std a rare success (1 in 8) gets a much larger advantage than a
    common one (4 in 8); without it the advantage is the plain difference from the group mean."""
    r = torch.tensor([[1.0] + [0.0] * 7, [1.0] * 4 + [0.0] * 4])
    std, mean = grpo.group_advantages(r, "std"), grpo.group_advantages(r, "mean")
    assert std[0, 0] > 2 * std[1, 0]
    assert mean[0, 0] == pytest.approx(7 / 8) and mean[1, 0] == pytest.approx(1 / 2)


# -----------------------------------------------------------------------------------------------
# The objective: normalisation, clipping, k3


def test_loss_weights_hand_computed():
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])  # answers of 2 and 4 tokens
    torch.testing.assert_close(grpo.loss_weights(mask, "seq_mean", 10),
                               torch.tensor([[1 / 4, 1 / 4, 0, 0], [1 / 8] * 4]))  # 1 / (N |o_i|)
    torch.testing.assert_close(grpo.loss_weights(mask, "token_mean", 10), mask / 6)  # 1 / sum |o_j|
    torch.testing.assert_close(grpo.loss_weights(mask, "seq_sum", 10), mask / 20)  # 1 / (N L_max)


def test_seq_mean_weighs_a_long_answer_less_per_token():
    """GRPO's length bias: under seq_mean each token of a long answer carries less weight, under
    token_mean and seq_sum every token carries the same."""
    mask = torch.zeros(2, 50)
    mask[0, :10], mask[1, :50] = 1, 1
    w = grpo.loss_weights(mask, "seq_mean", 50)
    assert w[0, 0] == pytest.approx(5 * w[1, 0])
    for agg in ("token_mean", "seq_sum"):
        w = grpo.loss_weights(mask, agg, 50)
        assert w[0, 0] == w[1, 0]


def reference_loss(logps, old, ref, adv, weights, eps_low, eps_high, beta):
    """DeepSeekMath eq. 3 written element by element in float64, for comparison."""
    total = 0.0
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            rho = float(torch.exp(logps[i, t] - old[i, t]))
            A = float(adv[i])
            surr = min(rho * A, min(max(rho, 1 - eps_low), 1 + eps_high) * A)
            q = float(torch.exp(ref[i, t] - logps[i, t]))
            k3 = q - math.log(q) - 1
            total += float(weights[i, t]) * (surr - beta * k3)
    return -total


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_grpo_loss_equals_the_equation(agg):
    g = torch.Generator().manual_seed(0)
    N, T = 4, 6
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logps = old + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ratios inside and outside
    ref = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.tensor([6, 3, 5, 1])[:, None]).double()
    w = grpo.loss_weights(mask, agg, T)
    loss, stats = grpo.grpo_loss(logps, old, ref, adv, w, 0.2, 0.28, 0.04)
    assert loss.item() == pytest.approx(reference_loss(logps, old, ref, adv, w, 0.2, 0.28, 0.04), rel=1e-10)
    assert 0 < stats["clip_frac"] < 1


def test_first_inner_step_is_reinforce_with_the_group_baseline():
    """At rho = 1 (policy = sampler) and beta = 0: d(loss)/d(log pi_i,t) = -A_i w_i,t."""
    old = -torch.rand(3, 5, dtype=torch.float64)
    logps = old.clone().requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    w = grpo.loss_weights(torch.ones(3, 5, dtype=torch.float64), "seq_mean", 5)
    loss, _ = grpo.grpo_loss(logps, old, None, adv, w, beta=0.0)
    loss.backward()
    torch.testing.assert_close(logps.grad, -adv[:, None] * w, rtol=0, atol=1e-15)


@pytest.mark.parametrize("A,log_ratio,zero", [
    (1.0, 0.5, True),     # A > 0, rho = 1.65 > 1 + eps: already pushed up enough, no more gradient
    (1.0, -0.5, False),   # A > 0, rho = 0.61 < 1 - eps: moved the wrong way, gradient pulls it back
    (-1.0, -0.5, True),   # A < 0, rho < 1 - eps: already pushed down enough
    (-1.0, 0.5, False),   # A < 0, rho > 1 + eps: moved the wrong way, gradient pushes it down
    (1.0, 0.1, False),    # inside the trust region: always a gradient
    (-1.0, -0.1, False),
])
def test_clip_zeroes_the_gradient_outside_the_trust_region_in_the_advantage_direction(A, log_ratio, zero):
    old = torch.tensor([[-2.0]])
    logps = (old + log_ratio).requires_grad_(True)
    loss, _ = grpo.grpo_loss(logps, old, None, torch.tensor([A]), torch.ones(1, 1), 0.2, 0.2, beta=0.0)
    loss.backward()
    if zero:
        assert logps.grad.item() == 0.0
    else:  # the gradient of -rho A: descending it raises log pi when A > 0 and lowers it when A < 0
        assert logps.grad.item() == pytest.approx(-A * torch.exp(torch.tensor(log_ratio)).item())


def test_clip_higher_widens_the_upper_side_only():
    """DAPO's eps_high = 0.28: a token with A > 0 may rise to rho = 1.28 instead of 1.2 before its
    gradient stops (rho = 1.246 here); the lower side stays at 1 - 0.2 (rho = 0.779 < 0.8: stopped)."""
    old = torch.tensor([[-2.0]])

    def grad(log_ratio, A, eps_high):
        logps = (old + log_ratio).requires_grad_(True)
        loss, _ = grpo.grpo_loss(logps, old, None, torch.tensor([A]), torch.ones(1, 1), 0.2, eps_high,
                                 beta=0.0)
        loss.backward()
        return logps.grad.item()

    assert grad(0.22, 1.0, 0.2) == 0 and grad(0.22, 1.0, 0.28) != 0
    assert grad(-0.25, -1.0, 0.2) == 0 and grad(-0.25, -1.0, 0.28) == 0


def test_k3_is_nonnegative_zero_at_the_reference_and_exact_in_expectation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (grpo.k3_kl(a, b) >= 0).all()
    assert torch.equal(grpo.k3_kl(a, a), torch.zeros(1000))
    # E_{x ~ p}[k3(x)] = sum_x p(x) (q/p - log q/p - 1) = KL(p || q) exactly, for any two distributions
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    logq = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    expected = (logp.exp() * grpo.k3_kl(logp, logq)).sum()
    torch.testing.assert_close(expected, (logp.exp() * (logp - logq)).sum(), rtol=1e-12, atol=0)


def test_kl_term_pulls_the_policy_toward_the_reference():
    old = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -0.5]])  # the reference likes token 0 less, token 1 more
    logps = old.clone().requires_grad_(True)
    loss, _ = grpo.grpo_loss(logps, old, ref, torch.zeros(1), torch.ones(1, 2), beta=0.1)
    loss.backward()
    assert logps.grad[0, 0] > 0 and logps.grad[0, 1] < 0  # descending lowers log pi_0, raises log pi_1


def test_old_logps_must_be_detached():
    x = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="detached"):
        grpo.grpo_loss(x, x * 1, None, torch.ones(1), torch.ones(1, 2), beta=0.0)


# -----------------------------------------------------------------------------------------------
# Rollouts


@pytest.fixture(scope="module")
def rollout(tokenizer):
    enc = tokenizer[0]
    model = tiny_model().requires_grad_(True)
    tasks = lora.load_instructions("valid", 5, seed=0)
    groups = grpo.sample_groups(model, enc, tasks, 3, 12, 0.8, torch.Generator().manual_seed(0))
    grpo.score_groups(groups, enc, grpo.naive_reward)
    return enc, model, tasks, groups, grpo.rollout_batch(model, groups, enc.eot_token, 0.8, micro_rows=4)


def test_sample_groups_shapes(rollout):
    enc, model, tasks, groups, _ = rollout
    assert [g["task"] for g in groups] == tasks
    for g in groups:
        assert len(g["answers"]) == len(g["ended"]) == len(g["rewards"]) == 3
        for a, e in zip(g["answers"], g["ended"]):
            assert (a[-1] == enc.eot_token) is e and enc.eot_token not in a[:-1]
            assert len(a) <= 12


def test_rollout_logps_equal_a_float64_recomputation(rollout):
    """Per-token log-probs of the sampled tokens at the sampling temperature, from the padded, chunked
    batch, equal the same model run in float64 on each unpadded sequence; they carry no gradient."""
    _, model, _, groups, batch = rollout
    assert not batch["old_logps"].requires_grad and any(p.requires_grad for p in model.parameters())
    m64 = copy.deepcopy(model).double()
    row = 0
    for g in groups:
        for a in g["answers"]:
            ids = torch.tensor([g["prompt"] + a])
            with torch.no_grad():
                logits = m64(ids[:, :-1])[0][0]  # (T-1, V)
            lp = torch.log_softmax(logits / 0.8, -1).gather(1, ids[0, 1:, None])[:, 0]
            P = len(g["prompt"])
            got = batch["old_logps"][row, P - 1:P - 1 + len(a)]
            torch.testing.assert_close(got.double(), lp[P - 1:], rtol=0, atol=1e-4)
            outside = batch["mask"][row] == 0
            assert batch["mask"][row].sum() == len(a) and (batch["old_logps"][row][outside] == 0).all()
            row += 1


def test_token_logps_sum_to_dpo_completion_logps(rollout):
    _, model, _, _, batch = rollout
    with torch.no_grad():
        per_token = grpo.token_logps(model, batch["tokens"])
        torch.testing.assert_close((per_token * batch["mask"]).sum(1),
                                   dpo.completion_logps(model, batch["tokens"], batch["mask"]))


def test_chunked_loss_equals_the_whole_batch(rollout):
    """The weights sum over the batch, so accumulating chunk losses gives the whole batch's gradient."""
    _, model, _, groups, batch = rollout
    rewards = batch["rewards"].view(len(groups), 3) + torch.rand(len(groups), 3)
    adv = grpo.group_advantages(rewards, "std").flatten()
    w = grpo.loss_weights(batch["mask"], "seq_mean", 12)
    grads = []
    for chunk in (len(w), 4):
        model.zero_grad()
        for rows in torch.arange(len(w)).split(chunk):
            logps = grpo.token_logps(model, batch["tokens"][rows], 0.8)
            loss, _ = grpo.grpo_loss(logps, batch["old_logps"][rows], None, adv[rows], w[rows], beta=0.0)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_length_chunks_cover_every_target_and_keep_pairs(rollout):
    """Every row once, units (DPO pairs) together, each chunk cut no shorter than its longest answer, and
    the trimmed, sorted chunks give the whole padded batch's gradient."""
    _, model, _, groups, batch = rollout
    mask = batch["mask"]
    last = torch.tensor([int(torch.nonzero(m)[-1]) + 1 for m in mask])  # one past each row's last target
    for unit, rows in ((1, 4), (2, 4), (1, 100)):
        n = len(mask) - len(mask) % unit
        chunks = grpo.length_chunks(mask[:n], rows, unit)
        seen = torch.cat([r for r, _ in chunks])
        assert sorted(seen.tolist()) == list(range(n)) and all(len(r) <= rows for r, _ in chunks)
        assert all(c == int(last[r].max()) for r, c in chunks)
        if unit == 2:
            assert all((r.view(-1, 2)[:, 0] % 2 == 0).all() and (r.view(-1, 2).diff(1) == 1).all()
                       for r, _ in chunks)
    with pytest.raises(ValueError, match="unit"):
        grpo.length_chunks(mask[:3], 4, unit=2)
    rewards = batch["rewards"].view(len(groups), 3) + torch.rand(len(groups), 3)
    adv = grpo.group_advantages(rewards, "std").flatten()
    w = grpo.loss_weights(mask, "seq_mean", 12)
    grads = []
    for chunks in ([(torch.arange(len(w)), mask.size(1))], grpo.length_chunks(mask, 4)):
        model.zero_grad()
        for rows, cols in chunks:
            logps = grpo.token_logps(model, batch["tokens"][rows, :cols + 1], 0.8)
            loss, _ = grpo.grpo_loss(logps, batch["old_logps"][rows, :cols], None, adv[rows], w[rows, :cols],
                                     beta=0.0)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_the_loop_takes_old_logps_from_its_first_inner_step(tokenizer, monkeypatch):
    """train_rl skips rollout_batch's separate old-policy forward: the old_logps its first inner step
    uses equal rollout_batch's (same weights, same tokens), the ratio there is 1, and the second inner step
    sees the same old_logps while the policy has moved."""
    enc = tokenizer[0]
    model, ref = tiny_model().requires_grad_(True), tiny_model()
    tasks = lora.load_instructions("train", 8, seed=0)
    seen, real_loss, real_sample = [], grpo.grpo_loss, grpo.sample_groups

    def sample(policy, *args, **kw):
        groups = real_sample(policy, *args, **kw)
        seen.append(dict(groups=groups, state=copy.deepcopy(policy.state_dict())))
        return groups

    def loss(logps, old, *args, **kw):
        seen[-1].setdefault("calls", []).append((logps.detach().clone(), old.clone()))
        return real_loss(logps, old, *args, **kw)

    def by_length(text, words, ended, partial):  # rewards that differ within a group
        return len(text) % 7 / 7

    monkeypatch.setattr(grpo, "sample_groups", sample)
    monkeypatch.setattr(grpo, "grpo_loss", loss)
    monkeypatch.setitem(grpo.REWARDS, "naive", by_length)
    cfg = small_cfg(steps=1, micro_rows=64, inner_steps=2, lr=1e-2, reward="naive")
    grpo.train_rl(model, ref, tasks, enc, cfg)
    first, second = seen[0]["calls"]
    snap = tiny_model()
    snap.load_state_dict(seen[0]["state"])
    grpo.score_groups(seen[0]["groups"], enc, by_length)
    batch = grpo.rollout_batch(snap, seen[0]["groups"], enc.eot_token, cfg.temperature, 4)
    rows, cols = grpo.length_chunks(batch["mask"], 64)[0]
    torch.testing.assert_close(first[1], batch["old_logps"][rows, :cols], rtol=0, atol=1e-5)
    m = batch["mask"][rows, :cols] > 0
    assert torch.equal(first[0][m], first[1][m])  # rho = 1 exactly at the first inner step
    assert torch.equal(second[1], first[1]) and not torch.allclose(second[0][m], first[0][m])


def test_batches_share_a_prompt_length(tokenizer):
    enc = tokenizer[0]
    tasks = lora.load_instructions("train", 300, seed=0)
    next_batch = grpo.make_batches(tasks, enc, 8, seed=0)
    seen = set()
    for _ in range(60):
        batch = next_batch()
        assert len(batch) == 8 and len({len(lora.encode_prompt(enc, t.prompt)) for t in batch}) == 1
        seen.update(batch)
    assert len(seen) > 250  # an epoch order, not a few prompts over and over


# -----------------------------------------------------------------------------------------------
# The loop


def small_cfg(**kw) -> grpo.GRPOConfig:
    base = dict(steps=2, batch_prompts=4, group_size=4, max_new_tokens=10, micro_rows=8, warmup=1)
    base.update(kw)
    return grpo.GRPOConfig(**base)


def test_dynamic_sampling_drops_tied_groups_and_counts_every_sample(tokenizer, monkeypatch):
    """A constant reward ties every group: DAPO's filter keeps none, refills max_refills times, makes no
    update, and the samples drawn still count."""
    monkeypatch.setitem(grpo.REWARDS, "constant", lambda text, words, ended, partial: 1.0)
    enc = tokenizer[0]
    policy, ref = tiny_model().requires_grad_(True), tiny_model()
    before = copy.deepcopy(policy.state_dict())
    cfg = grpo.method_config(small_cfg(reward="constant", max_refills=2), "dapo")
    hist = grpo.train_rl(policy, ref, lora.load_instructions("train", 50), enc, cfg, "dapo", log=quiet)
    assert [h["samples"] for h in hist] == [48, 96]  # (1 + 2 refills) x 4 prompts x 4 answers per step
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", ["dpo", "rloo"])
def test_other_methods_update_the_policy(tokenizer, monkeypatch, method):
    g = torch.Generator().manual_seed(0)
    monkeypatch.setitem(grpo.REWARDS, "random", lambda *a: float(torch.rand(1, generator=g)))
    enc = tokenizer[0]
    policy, ref = tiny_model().requires_grad_(True), tiny_model()
    cfg = grpo.method_config(small_cfg(reward="random", steps=1), method)
    hist = grpo.train_rl(policy, ref, lora.load_instructions("train", 50), enc, cfg, method, log=quiet)
    assert hist[0]["samples"] == 16 and hist[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # sampled by the start
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, ref.state_dict()[k])]
    assert changed


def test_heldout_evaluation_during_training_changes_nothing(tokenizer, monkeypatch):
    """eval_every runs the real held-out report (sampling, exact KL, val loss) mid-run on its own random
    draws: the run's rewards and final weights are those of the same run without it."""
    monkeypatch.setitem(grpo.REWARDS, "length", lambda text, words, e, partial: len(text) % 5 / 4)
    enc = tokenizer[0]
    ref = tiny_model()
    tasks, held = lora.load_instructions("train", 50), lora.load_instructions("valid", 4, seed=1)
    val, byte_lengths = gpt.load_tokens("valid", enc)[:4096], gpt.token_byte_lengths(enc)
    runs, lines = [], []
    for every in (0, 1):
        policy = copy.deepcopy(ref).requires_grad_(True)
        cfg = small_cfg(reward="length", steps=2, eval_every=every, n_eval=4, val_tokens=1024)
        hist = grpo.train_rl(policy, ref, tasks, enc, cfg, "grpo", log=lines.append if every else quiet,
                             evaluate=lambda p, cfg=cfg: grpo.heldout_report(p, ref, enc, held, cfg, val,
                                                                              byte_lengths))
        runs.append((hist, policy.state_dict()))
    (plain, w0), (evaluated, w1) = runs
    assert ["heldout" in h for h in plain] == [False, False]
    assert ["heldout" in h for h in evaluated] == [True, False]  # the last step: run_demo's final row
    assert {"success", "kl", "val_loss", "length"} <= set(evaluated[0]["heldout"])
    assert [h["reward"] for h in plain] == [h["reward"] for h in evaluated]
    for k, v in w0.items():
        assert torch.equal(v, w1[k]), k
    # tools/grpo_curves.py reads the same figures back from the printed log
    spec = importlib.util.spec_from_file_location("grpo_curves", ROOT / "tools" / "grpo_curves.py")
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    parsed = curves.parse_log("\n".join(lines))
    assert [h["step"] for h in parsed] == [1, 2]
    for h, e in zip(parsed, evaluated):
        for k in ("reward", "success", "kl"):
            assert abs(h[k] - e[k]) < 1e-3, k
        assert abs(h["length"] - e["length"]) <= 0.5
    assert abs(parsed[0]["heldout"]["success"] - evaluated[0]["heldout"]["success"]) < 1e-4
    assert abs(parsed[0]["heldout"]["val_loss"] - evaluated[0]["heldout"]["val_loss"]) < 1e-4


def test_heldout_report_with_k_samples_scores_every_answer(tokenizer, monkeypatch):
    """--eval_samples=k: k answers per held-out prompt, each scored (pass@1 averaged over k), the same
    draws a G = k sampling pass makes; k = 1 is the one-answer report; best-of-n keeps one per prompt."""
    monkeypatch.setitem(grpo.REWARDS, "length", lambda text, words, e, partial: len(text) % 5 / 4)
    monkeypatch.setattr(grpo.lora, "verify", lambda text, words, ended: len(text) % 3 == 0)
    enc, model = tokenizer[0], tiny_model()
    held = lora.load_instructions("valid", 5, seed=1)
    val, byte_lengths = gpt.load_tokens("valid", enc)[:4096], gpt.token_byte_lengths(enc)
    for k in (1, 3):
        cfg = small_cfg(reward="length", eval_samples=k, val_tokens=1024)
        groups = grpo.sample_groups(model, enc, held, k, cfg.max_new_tokens, cfg.temperature,
                                    torch.Generator().manual_seed(cfg.seed + 1))
        grpo.score_groups(groups, enc, grpo.REWARDS["length"])
        rep = grpo.heldout_report(model, tiny_model(), enc, held, cfg, val, byte_lengths)
        assert rep["success"] == pytest.approx(np.mean([s for g in groups for s in g["success"]]))
        assert rep["reward"] == pytest.approx(np.mean([r for g in groups for r in g["rewards"]]))
        assert rep["length"] == pytest.approx(np.mean([len(a) for g in groups for a in g["answers"]]))
    assert 0 < rep["success"] < 1
    best = grpo.heldout_report(model, model, enc, held, cfg, val, byte_lengths, n=3)  # best-of-3 of the same draws
    assert best["reward"] == pytest.approx(np.mean([max(g["rewards"]) for g in groups]))


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """A tiny model trained on TinyStories for 40 steps: it writes story-like text and sometimes ends."""
    tc = tiny_train_config(tmp_path_factory.mktemp("ref"), max_iters=41, stop_at=40)
    return gpt.train(tiny_config(block_size=128), tc, verbose=False)["model"].eval()


def mean_reward(model, enc, tasks, cfg, reward, seed) -> float:
    groups = grpo.sample_groups(model, enc, tasks, 4, cfg.max_new_tokens, cfg.temperature,
                                torch.Generator().manual_seed(seed))
    grpo.score_groups(groups, enc, reward)
    return sum(sum(g["rewards"]) for g in groups) / (4 * len(groups))


@pytest.mark.slow
def test_short_grpo_run_raises_the_heldout_reward(tokenizer, pretrained_tiny, monkeypatch):
    """A real run of the loop on a reward a 40-step model can learn in a few updates: finish the answer
    within 16 tokens. The mean reward on held-out (valid-split) prompts goes up, the KL leaves 0."""
    ended = lambda text, words, e, partial: float(e)  # noqa: E731
    monkeypatch.setitem(grpo.REWARDS, "ended", ended)
    enc = tokenizer[0]
    ref = pretrained_tiny
    policy = copy.deepcopy(ref).requires_grad_(True)
    cfg = small_cfg(reward="ended", steps=5, batch_prompts=8, group_size=8, max_new_tokens=16, lr=3e-3,
                    micro_rows=64, seed=0)
    held = lora.load_instructions("valid", 32, seed=1)
    before = mean_reward(ref, enc, held, cfg, ended, seed=5)
    hist = grpo.train_rl(policy, ref, lora.load_instructions("train", 400), enc, cfg, "grpo", log=quiet)
    after = mean_reward(policy, enc, held, cfg, ended, seed=5)
    assert after > before + 0.2, (before, after)
    assert hist[-1]["kl"] > 0 and len(hist) == 5


# -----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=1), "group_size must be >= 2"), (dict(beta=-0.1), "beta must be >= 0"),
    (dict(adv="z"), "adv must be one of"), (dict(agg="x"), "agg must be one of"),
    (dict(reward="happy"), "reward must be one of"), (dict(eps_low=1.0), "eps_low must be < 1"),
    (dict(methods="grpo,ppo"), "unknown method 'ppo'"), (dict(steps=0), "steps must be positive"),
])
def test_bad_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        grpo.GRPOConfig(**kw)


def test_bad_input_errors(tokenizer):
    with pytest.raises(ValueError, match="at least 2 answers"):
        grpo.group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"\(n_groups, G\)"):
        grpo.group_advantages(torch.ones(3))
    m = tiny_model()
    with pytest.raises(ValueError, match="no training prompts"):
        grpo.train_rl(m, m, [], tokenizer[0], small_cfg())
    with pytest.raises(ValueError, match="unknown method"):
        grpo.train_rl(m, m, lora.load_instructions("train", 5), tokenizer[0], small_cfg(), "ppo")


def test_cli_errors():
    with pytest.raises(SystemExit, match="group_size must be >= 2"):
        grpo.main(["--group_size=1"])
    with pytest.raises(SystemExit, match="beta must be >= 0"):
        grpo.main(["--beta=-1"])
    with pytest.raises(SystemExit, match="unknown option --epsilon"):
        grpo.main(["--epsilon=0.2"])


def test_presets_only_change_fields_of_the_config():
    cfg = grpo.GRPOConfig()
    fields = {f.name for f in dataclasses.fields(cfg)}
    for name, preset in grpo.METHODS.items():
        assert set(preset) <= fields, name
        grpo.method_config(cfg, name)  # validates


def test_saved_policy_loads_as_a_gpt_checkpoint(tmp_path):
    """save_policy writes the start model's checkpoint with the trained weights: gpt.load_model reads it
    back (digest checked) with the same weights and tokenizer, and the run's config and history ride along."""
    start = tmp_path / "start" / "ckpt.pt"
    gpt.train(tiny_config(), tiny_train_config(start.parent, max_iters=2), verbose=False)
    ref, enc, _ = gpt.load_model(start)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        policy.output.weight.add_(0.5)  # tied to the embedding: "trained" weights differ from the start's
    cfg = grpo.GRPOConfig(init=str(start))
    grpo.save_policy(policy, cfg, tmp_path / "grpo" / "ckpt.pt", [dict(step=1, reward=0.5)])
    loaded, enc2, state = gpt.load_model(tmp_path / "grpo" / "ckpt.pt")
    for k, v in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(loaded.output.weight, ref.output.weight)
    assert enc2.n_vocab == enc.n_vocab and enc2.encode("Once upon a time") == enc.encode("Once upon a time")
    assert state["rl"]["history"] == [dict(step=1, reward=0.5)] and state["rl"]["config"]["init"] == str(start)


def test_ptx_mix_adds_dpo_ptx_loss_and_its_control_matches(tokenizer, train_tokens, monkeypatch):
    """With rewards that tie in every group (zero advantages) and no KL, the only gradient left in a
    --ptx_coef run is the pre-training mix: train_rl must then end where dpo.train_ptx_only (the control
    run_demo reports) ends after the same number of optimizer steps, on the same windows."""
    enc = tokenizer[0]
    monkeypatch.setitem(grpo.REWARDS, "naive", lambda text, words, ended, partial: 0.5)
    tasks = lora.load_instructions("train", 8, seed=0)
    cfg = small_cfg(reward="naive", beta=0.0, ptx_coef=2.0, ptx_batch=4, ptx_tokens=32, lr=1e-2, warmup=2)
    start = tiny_model()
    policy = copy.deepcopy(start).requires_grad_(True)
    hist = grpo.train_rl(policy, start, tasks, enc, cfg, ptx_data=train_tokens)
    assert hist[-1]["updates"] == cfg.steps * cfg.inner_steps and all(h["ptx_nll"] > 0 for h in hist)
    control = copy.deepcopy(start).requires_grad_(True)
    dc = dpo.DPOConfig(lr=cfg.lr, warmup_steps=cfg.warmup, grad_clip=cfg.grad_clip, ptx_coef=cfg.ptx_coef,
                       ptx_batch=cfg.ptx_batch, ptx_tokens=cfg.ptx_tokens, seed=cfg.seed)
    dpo.train_ptx_only(control, hist[-1]["updates"], dc, train_tokens)
    moved = False
    for (k, v), w, w0 in zip(policy.state_dict().items(), control.state_dict().values(),
                             start.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
        moved |= not torch.equal(v, w0)
    assert moved
    with pytest.raises(ValueError, match="ptx_data"):
        grpo.train_rl(copy.deepcopy(start).requires_grad_(True), start, tasks, enc, cfg)
    with pytest.raises(ValueError, match="ptx_coef"):
        grpo.GRPOConfig(ptx_coef=-1.0)


def test_ptx_gradient_is_added_with_its_coefficient(tokenizer, train_tokens, monkeypatch):
    """The first update's gradient (before clipping) is the RL gradient plus ptx_coef times the gradient of
    dpo.ptx_loss on the run's first TinyStories windows."""
    enc = tokenizer[0]
    monkeypatch.setitem(grpo.REWARDS, "naive", lambda text, words, ended, partial: len(text) % 7 / 7)
    tasks = lora.load_instructions("train", 8, seed=0)
    start = tiny_model()
    grads = {}

    def capture(params, max_norm):
        params = list(params)
        grads.setdefault(len(grads), torch.cat([p.grad.flatten() for p in params]))
        return torch.tensor(0.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    for coef in (0.0, 2.0):
        cfg = small_cfg(reward="naive", beta=0.0, ptx_coef=coef, ptx_batch=4, ptx_tokens=32, steps=1,
                        inner_steps=1)
        grpo.train_rl(copy.deepcopy(start).requires_grad_(True), start, tasks, enc, cfg, ptx_data=train_tokens)
    model = copy.deepcopy(start).requires_grad_(True).train()
    dpo.ptx_loss(model, train_tokens, torch.Generator().manual_seed(cfg.seed + 2), cfg).backward()
    g_ptx = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[0].abs().sum() > 0 and g_ptx.abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0] + 2.0 * g_ptx, rtol=1e-4, atol=1e-6)


def test_word_list_detector_of_the_hacking_count():
    """tools/grpo_word_lists.py counts answers that list required words ("ball, cat"), the hack the
    verifier's gates let through inside a story; using the words in sentences is not a list."""
    spec = importlib.util.spec_from_file_location("grpo_word_lists", ROOT / "tools" / "grpo_word_lists.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    words = ("ball", "cat", "sun")
    assert tool.lists_words('The bird said, "Thank you, Ball, cat, cat!"', words)
    assert tool.lists_words("sun,ball", words)
    for text in ("The cat had a red ball in the sun.", "The cat, the ball and the sun.", "cats, balls", ""):
        assert not tool.lists_words(text, words), text
    story = 'The sky was sad and said, "Tom, cat!" The bird said, "Thank you, ball, cat, cat!"'
    assert lora.check_answer(story, ("ball", "cat", "tom"), True)["words_used"] == 1.0
