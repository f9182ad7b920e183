"""Tests for dpo.py: every loss against a hand computation from its paper's equation, gradient signs and
beta limits, completion log-probs against a float64 per-sequence reference (prompt and padding masked),
the sampler's distribution, the judge's gaming cases, and a short DPO run on TinyStories openings that
raises the held-out preference margin."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import dpo
import gpt
from conftest import tiny_config, tiny_train_config


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x), in plain Python floats
    return math.log1p(math.exp(x))


# One pair in plain numbers: summed log-probs of the policy and of the reference, and lengths in tokens.
PAIR = dict(policy_chosen_logps=-3.0, policy_rejected_logps=-5.0, ref_chosen_logps=-4.0,
            ref_rejected_logps=-4.5, chosen_lengths=2.0, rejected_lengths=4.0)
H = ((PAIR["policy_chosen_logps"] - PAIR["ref_chosen_logps"])
     - (PAIR["policy_rejected_logps"] - PAIR["ref_rejected_logps"]))  # log-ratio difference = 1.5 nats
REF_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LENGTH_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths")


def t(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64, requires_grad=True)


def pair_tensors() -> dict[str, torch.Tensor]:
    """PAIR as (1,) float64 tensors; the log-probs take gradients, the lengths are constants."""
    return {k: torch.tensor([v], dtype=torch.float64, requires_grad=k.endswith("logps"))
            for k, v in PAIR.items()}


def args(b: dict, names: tuple) -> dict:
    """The entries of batch b a loss takes, passed by keyword: a renamed or reordered argument fails."""
    return {k: b[k] for k in names}


def orpo_by_hand(lam: float) -> float:
    p = {k: math.exp(PAIR[f"policy_{k}_logps"] / PAIR[f"{k}_lengths"]) for k in ("chosen", "rejected")}
    log_or = math.log(p["chosen"] / (1 - p["chosen"])) - math.log(p["rejected"] / (1 - p["rejected"]))
    return -PAIR["policy_chosen_logps"] / PAIR["chosen_lengths"] + lam * softplus(-log_or)


# name -> (call on a batch of (1,) tensors named as in PAIR, the value computed by hand from the equation)
HAND = {
    "dpo": (lambda b: dpo.dpo_loss(**args(b, REF_ARGS), beta=0.5), softplus(-0.5 * H)),  # eq. 7
    "cdpo": (lambda b: dpo.dpo_loss(**args(b, REF_ARGS), beta=0.5, label_smoothing=0.1),
             0.9 * softplus(-0.75) + 0.1 * softplus(0.75)),
    "ipo": (lambda b: dpo.ipo_loss(**args(b, REF_ARGS), tau=0.25), (H - 1 / (2 * 0.25)) ** 2),  # (1.5 - 2)^2
    "hinge": (lambda b: dpo.hinge_loss(**args(b, REF_ARGS), beta=0.5), max(0.0, 1 - 0.5 * H)),  # 0.25
    # beta (avg_c - avg_r) - gamma = 2 (-1.5 + 1.25) - 0.5 = -1
    "simpo": (lambda b: dpo.simpo_loss(**args(b, LENGTH_ARGS), beta=2.0, gamma=0.5), softplus(1.0)),
    "orpo": (lambda b: dpo.orpo_loss(**args(b, LENGTH_ARGS), lam=0.1), orpo_by_hand(0.1)),
}


# -----------------------------------------------------------------------------------------------
# The losses


@pytest.mark.parametrize("name", list(HAND))
def test_loss_equals_hand_computation(name):
    fn, expected = HAND[name]
    losses, chosen_rewards, rejected_rewards = fn(pair_tensors())
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad  # detached, for logging


@pytest.mark.parametrize("name", list(HAND))
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """Descending the loss moves log pi(y_c) up and log pi(y_r) down:
    d loss / d policy_chosen_logps < 0 < d loss / d policy_rejected_logps."""
    fn, _ = HAND[name]
    b = pair_tensors()
    fn(b)[0].sum().backward()
    assert b["policy_chosen_logps"].grad.item() < 0 < b["policy_rejected_logps"].grad.item()


@pytest.mark.parametrize("name, beta", [("dpo", 0.5), ("cdpo", 0.5), ("ipo", 0.25), ("hinge", 0.5)])
def test_reference_rewards_are_beta_log_ratios(name, beta):
    fn, _ = HAND[name]
    _, chosen_rewards, rejected_rewards = fn(pair_tensors())
    for side, reward in (("chosen", chosen_rewards), ("rejected", rejected_rewards)):
        log_ratio = PAIR[f"policy_{side}_logps"] - PAIR[f"ref_{side}_logps"]
        assert reward.item() == pytest.approx(beta * log_ratio)


def test_rewards_give_loss_via_bradley_terry():
    """DPO's loss is exactly the Bradley-Terry NLL of its own implicit rewards (eq. 5 into eq. 7)."""
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(*torch.randn(4, 8), beta=0.3)
    assert torch.allclose(losses, -torch.log(torch.sigmoid(chosen_rewards - rejected_rewards)), atol=1e-6)


def test_dpo_beta_limits():
    """beta -> 0: every pair costs log 2 (the policy's ratios stop mattering); beta -> infinity: a right
    pair costs 0 and a wrong one beta |h| (a hard 0/1 classifier with a linear penalty)."""
    logps = {k: torch.tensor([PAIR[k], -PAIR[k]], dtype=torch.float64) for k in REF_ARGS}  # h = 1.5, -1.5
    small, _, _ = dpo.dpo_loss(**logps, beta=1e-9)
    assert torch.allclose(small, torch.full((2,), math.log(2), dtype=torch.float64), atol=1e-8)
    big, _, _ = dpo.dpo_loss(**logps, beta=1e4)
    assert big[0] < 1e-12 and float(big[1]) == pytest.approx(1e4 * 1.5, rel=1e-9)


def test_cdpo_gradient_vanishes_at_finite_margin():
    """With label smoothing eps the optimum is beta h = log((1 - eps) / eps), not infinity."""
    eps, beta = 0.1, 0.5
    h_star = math.log((1 - eps) / eps) / beta
    policy_chosen = t(h_star)
    dpo.dpo_loss(policy_chosen, t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=eps)[0].sum().backward()
    assert abs(policy_chosen.grad.item()) < 1e-12
    a, b, c, d = torch.randn(4, 5)
    half, _, _ = dpo.dpo_loss(a, b, c, d, 1.0, label_smoothing=0.5)
    swapped, _, _ = dpo.dpo_loss(b, a, d, c, 1.0, label_smoothing=0.5)
    assert torch.allclose(half, swapped)  # eps = 0.5: a label says nothing, chosen <-> rejected is free


def test_ipo_target_and_hinge_margin():
    """IPO's loss is 0 exactly at h = 1/(2 tau); the hinge gives no gradient once beta h >= 1."""
    tau = 0.25
    assert dpo.ipo_loss(t(1 / (2 * tau)), t(0.0), t(0.0), t(0.0), tau)[0].item() == 0.0
    policy_chosen = t(2.0 / 0.5)  # beta h = 2 > 1
    dpo.hinge_loss(policy_chosen, t(0.0), t(0.0), t(0.0), beta=0.5)[0].sum().backward()
    assert policy_chosen.grad.item() == 0.0


def test_simpo_is_length_normalised():
    """Doubling a completion's length with the same per-token log-prob leaves SimPO's loss unchanged."""
    a, _, _ = dpo.simpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), chosen_lengths=torch.tensor([2.0]),
                             rejected_lengths=torch.tensor([4.0]), beta=2.0, gamma=0.5)
    b, _, _ = dpo.simpo_loss(torch.tensor([-6.0]), torch.tensor([-5.0]), chosen_lengths=torch.tensor([4.0]),
                             rejected_lengths=torch.tensor([4.0]), beta=2.0, gamma=0.5)
    assert torch.allclose(a, b)


@pytest.mark.parametrize("name", list(dpo.LOSSES))
def test_dispatch_table_uses_the_config(name):
    """dpo.LOSSES[name](batch, config) is the pure function with the config's hyperparameters."""
    cfg = dpo.DPOConfig(beta=0.5, label_smoothing=0.1, simpo_beta=2.0, simpo_gamma=0.5, orpo_lambda=0.1)
    expected = {"ipo": (H - 1 / (2 * 0.5)) ** 2}.get(name, HAND[name][1])  # IPO's tau is cfg.beta = 0.5
    assert dpo.LOSSES[name](pair_tensors(), cfg)[0].item() == pytest.approx(expected, rel=1e-12)


# -----------------------------------------------------------------------------------------------
# Completion log-probs: masking, padding, one batched forward


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return gpt.GPT(tiny_config(vocab_size=300)).eval()


def test_completion_logps_match_reference(tiny_model):
    """Ragged prompts and completions, right-padded in one batch, against a float64 per-sequence sum."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 299, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
    comps = [torch.randint(0, 299, (n,), generator=g).tolist() for n in (6, 2, 9, 4)]
    tokens, mask, lengths = dpo.pack(prompts, comps, pad=299)
    with torch.no_grad():
        fast = dpo.completion_logps(tiny_model, tokens, mask)
    ref = [dpo.completion_logps_reference(tiny_model, p, c) for p, c in zip(prompts, comps)]
    assert torch.allclose(fast.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)
    assert lengths.tolist() == [6, 2, 9, 4]


def test_prompt_and_padding_do_not_contribute():
    """The gradient of the summed log-probs reaches the logits of completion positions only."""
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]]
    tokens, mask, _ = dpo.pack(prompts, comps, pad=0)  # (2, 5)
    logits = torch.randn(2, tokens.shape[1] - 1, 16, requires_grad=True)
    dpo.completion_logps(lambda x: (logits, None), tokens, mask).sum().backward()
    touched = logits.grad.abs().sum(-1) > 0  # (2, T-1): which positions' predictions count
    # row 0: predictions at positions 2, 3 (targets 5, 6); row 1: positions 0..3 (targets 7..10)
    assert touched.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert mask.tolist() == touched.float().tolist()


def test_group_batch_scores_every_pair_like_separate_pairs(tiny_model):
    """One forward over a group's answers, indexed per pair, equals the pairs run one by one."""
    g = torch.Generator().manual_seed(2)
    groups = [dict(prompt=torch.randint(0, 299, (4,), generator=g).tolist(),
                   completions=[torch.randint(0, 299, (n,), generator=g).tolist() for n in lens], pairs=pairs)
              for lens, pairs in (((5, 3, 7), [(0, 1), (0, 2), (2, 1)]), ((2, 6), [(1, 0)]))]
    tokens, mask, lengths, chosen, rejected = dpo.group_batch(groups, pad=299)
    assert tokens.shape[0] == 5 and chosen.tolist() == [0, 0, 2, 4] and rejected.tolist() == [1, 2, 1, 3]
    with torch.no_grad():
        lp = dpo.completion_logps(tiny_model, tokens, mask)
    pairs = [dict(prompt=gr["prompt"], chosen=gr["completions"][i], rejected=gr["completions"][j])
             for gr in groups for i, j in gr["pairs"]]
    one_by_one = dpo.pair_logps(tiny_model, pairs, pad=299, batch=1)
    assert torch.allclose(lp[chosen], one_by_one["chosen_logps"], atol=1e-5)
    assert torch.allclose(lp[rejected], one_by_one["rejected_logps"], atol=1e-5)
    assert lengths[chosen].tolist() == one_by_one["chosen_lengths"].tolist()
    assert lengths[rejected].tolist() == one_by_one["rejected_lengths"].tolist()
    ref = dpo.group_logps(tiny_model, groups, pad=299, batch=1)  # per group, unbatched
    assert torch.allclose(torch.cat(ref), lp, atol=1e-5)


def test_token_kl_zero_for_same_model_and_positive_otherwise(tiny_model):
    tokens, mask, _ = dpo.pack([[1, 2, 3]] * 2, [[4, 5, 6], [7, 8]], pad=0)
    assert dpo.token_kl(tiny_model, tiny_model, tokens, mask) == pytest.approx(0.0, abs=1e-6)
    other = gpt.GPT(tiny_model.cfg).eval()
    assert dpo.token_kl(other, tiny_model, tokens, mask) > 1e-4


# -----------------------------------------------------------------------------------------------
# Sampling


def test_story_openings_are_story_starts(tokenizer, val_tokens):
    enc = tokenizer[0]
    opens = dpo.story_openings(val_tokens, enc.eot_token, 20, 16, seed=0)
    assert len(opens) == 20 and all(len(o) == 16 and enc.eot_token not in o for o in opens)
    assert len({tuple(o) for o in opens}) == 20
    text = enc.decode(val_tokens[:200000].tolist())
    assert all(enc.decode(o) in text for o in opens)


def test_sample_token_follows_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -50.0]]).repeat(40000, 1)
    for temperature in (1.0, 0.5):
        draws = dpo.sample_token(logits, temperature, torch.Generator().manual_seed(0))
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        p = torch.softmax(logits[0].double() / temperature, -1)
        assert torch.allclose(freq, p, atol=0.01)  # 4 sigma of a binomial at n = 40000 is < 0.01
        assert freq[4] == 0.0


def test_sample_completions_shapes_and_eot(tiny_model):
    eot = 299
    out = dpo.sample_completions(tiny_model, [[1, 2, 3], [4, 5, 6]], 3, 12, 1.0, eot,
                                 torch.Generator().manual_seed(0), max_rows=4)  # 6 rows in 2 chunks
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    for group in out:
        for ids, ended in group:
            assert eot not in ids and (ended or len(ids) == 12)


# -----------------------------------------------------------------------------------------------
# The judge: degenerate text must lose to a fluent happy ending


HAPPY_STORY = ("Tom and his dog went to the park to find the red ball. They looked under the big tree and "
               "behind the slide. The ball was in the pond, so Tom asked his dad for help. Dad got the ball "
               "out with a long stick. Tom smiled and hugged his dad. They played together and were very "
               "happy.")
SAD_STORY = HAPPY_STORY.replace("Tom smiled and hugged his dad. They played together and were very happy.",
                                "The ball was broken. Tom cried and felt sad and alone all day.")


def test_judge_prefers_happy_ending():
    assert dpo.is_happy(HAPPY_STORY)
    assert dpo.judge(HAPPY_STORY) > 0 > dpo.judge(SAD_STORY) > dpo.FAIL


GAMING = {
    "repetition": "They were very happy and had fun. " * 12,
    "too short": "They played together and were very happy.",
    "unterminated": HAPPY_STORY[:-1] + " and",
    "stuffing": HAPPY_STORY[:-1] + " happy glad fun love smile joy best.",
    "babble": "happy " * 40 + "friends.",
    "no ending": HAPPY_STORY,  # fine text, but the sampler never produced <|endoftext|>
}


@pytest.mark.parametrize("case", list(GAMING))
def test_judge_gaming_cases_lose(case):
    ended = case != "no ending"
    assert dpo.judge(GAMING[case], ended) == dpo.FAIL
    assert dpo.judge(GAMING[case], ended) < dpo.judge(SAD_STORY) < dpo.judge(HAPPY_STORY)


def test_judge_negation_and_counting_once():
    base = HAPPY_STORY.replace("They played together and were very happy.", "They were not happy.")
    assert dpo.ending_sentiment(base)[0] < dpo.ending_sentiment(HAPPY_STORY)[0]
    twice = HAPPY_STORY.replace("very happy.", "very happy and happy.")
    assert dpo.ending_sentiment(twice)[0] == dpo.ending_sentiment(HAPPY_STORY)[0]


def test_judge_passes_real_stories(tokenizer, val_tokens):
    """Not too strict: real TinyStories (val split) nearly all pass the fluency gates."""
    enc = tokenizer[0]
    stories = [s for s in enc.decode(val_tokens[:60000].tolist()).split(gpt.EOT) if s.strip()][:150]
    ok = [dpo.fluency(s.strip())["ok"] for s in stories]
    assert sum(ok) / len(ok) > 0.9


def test_make_pairs_best_vs_worst_and_skips_ties(tokenizer):
    enc = tokenizer[0]
    e = enc.encode_ordinary
    groups = [[(e(" " + SAD_STORY), True), (e(" " + HAPPY_STORY), True), (e(" and then"), False)],
              [(e(" " + HAPPY_STORY), True), (e(" " + HAPPY_STORY), True)],  # a tie: skipped
              [(e(" " + HAPPY_STORY), True), (e(" and then"), False)]]  # one finished: skipped
    pairs = dpo.make_pairs([[1], [2], [3]], groups, enc)
    assert len(pairs) == 1
    assert pairs[0]["chosen"] == e(" " + HAPPY_STORY) + [enc.eot_token]
    assert pairs[0]["rejected"] == e(" " + SAD_STORY) + [enc.eot_token]  # never the unfinished one


def test_make_groups_pairs_every_happy_with_every_unhappy_finished_answer(tokenizer):
    enc = tokenizer[0]
    e = enc.encode_ordinary
    happy, sad, cut = e(" " + HAPPY_STORY), e(" " + SAD_STORY), e(" and then")
    samples = [[(sad, True), (happy, True), (cut, False), (happy, True), (sad, True), (sad, True)],
               [(happy, True), (happy, True)],  # no unhappy answer: no pair
               [(happy, True), (sad, False)]]  # the unhappy one is unfinished: no pair
    groups = dpo.make_groups([[1], [2], [3]], samples, enc, "all")
    assert len(groups) == 1 and groups[0]["prompt"] == [1]
    comps = groups[0]["completions"]  # the finished answers, in order, each closed by <|endoftext|>
    assert comps == [x + [enc.eot_token] for x in (sad, happy, happy, sad, sad)]
    assert sorted(groups[0]["pairs"]) == [(1, 0), (1, 3), (1, 4), (2, 0), (2, 3), (2, 4)]  # 2 x 3
    best_worst = dpo.make_groups([[1], [2], [3]], samples, enc)  # the default: make_pairs' one pair
    pair = dpo.make_pairs([[1], [2], [3]], samples, enc)[0]
    assert [(g["completions"], g["pairs"]) for g in best_worst] == [([pair["chosen"], pair["rejected"]], [(0, 1)])]
    with pytest.raises(ValueError, match="best_worst"):
        dpo.make_groups([[1]], samples[:1], enc, "everything")


# -----------------------------------------------------------------------------------------------
# A short DPO run on TinyStories


ENDINGS = {"chosen": [" They played together and were very happy.", " She smiled and hugged her mom."],
           "rejected": [" He was sad and cried all day.", " They were scared and lost."]}


def ending_pairs(tokens, enc, n: int, seed: int) -> list[dict]:
    """Prompt: a story opening (32 tokens); both answers continue it with its next 16 tokens, then the
    chosen ends happily and the rejected sadly (the judge agrees), then <|endoftext|>."""
    opens = dpo.story_openings(tokens, enc.eot_token, n, 48, seed)
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for o in opens:
        i, j = torch.randint(0, 2, (2,), generator=g).tolist()
        c = o[32:] + enc.encode_ordinary(ENDINGS["chosen"][i]) + [enc.eot_token]
        r = o[32:] + enc.encode_ordinary(ENDINGS["rejected"][j]) + [enc.eot_token]
        pairs.append(dict(prompt=o[:32], chosen=c, rejected=r))
    return pairs


def test_preference_stats_accuracy_margin_and_length_split():
    """Rewards beta * (policy - reference) log-probs: pairs 0-2 ranked right, pair 3 wrong; the chosen
    answer is the longer one in pairs 0 and 3."""
    cfg = dpo.DPOConfig(beta=0.1)
    logps = dict(chosen_logps=torch.tensor([0.0, 0.0, 0.0, -5.0]),
                 rejected_logps=torch.tensor([-1.0, -1.0, -1.0, 0.0]),
                 chosen_lengths=torch.tensor([10, 3, 3, 12]), rejected_lengths=torch.tensor([5, 8, 8, 4]))
    ref = dict(chosen_logps=torch.zeros(4), rejected_logps=torch.zeros(4))
    s = dpo.preference_stats("dpo", logps, ref, cfg)
    assert s["acc"] == 0.75 and s["acc_chosen_longer"] == 0.5 and s["acc_chosen_shorter"] == 1.0
    assert s["margin"] == pytest.approx(0.1 * (1 + 1 + 1 - 5) / 4)
    assert s["loss"] == pytest.approx(float(-F.logsigmoid(0.1 * torch.tensor([1.0, 1, 1, -5])).mean()))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tokenizer, train_tokens, val_tokens):
    """A tiny model trained on TinyStories for a few steps (the reference), training groups from
    train-split openings, held-out pairs from val-split ones, and the DPO settings of the short runs."""
    enc = tokenizer[0]
    cfg = tiny_config(block_size=128)
    tc = tiny_train_config(tmp_path_factory.mktemp("ref"), max_iters=41, stop_at=40)  # no closing eval
    ref = gpt.train(cfg, tc, verbose=False)["model"].eval()
    train = dpo.pairs_as_groups(ending_pairs(train_tokens, enc, 64, seed=0))  # one pair per group
    held = ending_pairs(val_tokens, enc, 32, seed=1)
    dc = dataclasses.replace(dpo.DPOConfig(), lr=1e-3, epochs=2, batch_prompts=16, warmup_steps=2)
    eot = enc.eot_token
    return dict(ref=ref, train=train, held=held, dc=dc, eot=eot, ref_train=dpo.group_logps(ref, train, eot),
                ref_held=dpo.pair_logps(ref, held, eot), lengths=gpt.token_byte_lengths(enc))


def tune(run: dict, dc: dpo.DPOConfig, **kw) -> tuple[gpt.GPT, list[dict]]:
    policy = gpt.GPT(run["ref"].cfg)
    policy.load_state_dict(run["ref"].state_dict())
    history = dpo.train_preference("dpo", policy, run["train"], run["ref_train"], dc, run["eot"],
                                   log=lambda *a: None, **kw)
    return policy, history


def test_short_dpo_run_raises_heldout_margin(short_run, val_tokens):
    """DPO on train-split pairs: the implicit reward margin and accuracy on pairs from *val-split*
    prompts go up, and the val loss barely moves."""
    r, dc = short_run, short_run["dc"]
    before = dpo.preference_stats("dpo", dpo.pair_logps(r["ref"], r["held"], r["eot"]), r["ref_held"], dc)
    assert before["margin"] == 0.0  # policy == reference: every implicit reward is 0
    policy, history = tune(r, dc)
    after = dpo.preference_stats("dpo", dpo.pair_logps(policy, r["held"], r["eot"]), r["ref_held"], dc)
    assert history[-1]["loss"] < history[0]["loss"]
    # The property: the held-out margin rises well above 0 and nearly every held-out pair is ranked right.
    # Thresholds sit at about half of what this run reaches (margin ~0.5, accuracy 1.0 here), so that
    # another CPU's float details cannot flip the outcome.
    assert after["margin"] > 0.25 and after["acc"] >= 0.9, after
    v0 = gpt.evaluate(r["ref"], val_tokens, r["lengths"], 128, 8, 8192)["loss"]
    v1 = gpt.evaluate(policy, val_tokens, r["lengths"], 128, 8, 8192)["loss"]
    assert v1 < v0 * 1.05


@pytest.mark.slow
def test_ptx_mix_lowers_val_loss_and_probes_report(short_run, train_tokens, val_tokens):
    """The TinyStories NLL term (ptx_coef) pulls the val loss below plain DPO's, DPO still learns the
    preference, the NLL-only control trains the model too, and the probe runs every probe_every steps
    in eval mode."""
    r = short_run
    val = lambda m: gpt.evaluate(m, val_tokens, r["lengths"], 128, 8, 8192)["loss"]  # noqa: E731
    plain, _ = tune(r, r["dc"])
    dc = dataclasses.replace(r["dc"], ptx_coef=1.0, ptx_tokens=64, probe_every=3)
    modes = []

    def probe(model):
        modes.append(model.training)
        return dict(probe_acc=dpo.preference_stats("dpo", dpo.pair_logps(model, r["held"], r["eot"]),
                                                   r["ref_held"], dc)["acc"])

    mixed, history = tune(r, dc, ptx_data=train_tokens, probe=probe)
    assert [h["step"] for h in history if "probe_acc" in h] == [3, 6] and modes == [False, False]
    assert all(h["ptx_nll"] > 0 for h in history)  # logged each step (16 windows: too noisy to compare)
    assert val(mixed) < val(plain) - 0.01  # (~0.02 lower here: the threshold leaves room for float details)
    after = dpo.preference_stats("dpo", dpo.pair_logps(mixed, r["held"], r["eot"]), r["ref_held"], dc)
    assert after["margin"] > 0.25 and after["acc"] >= 0.9, after  # the mix slows DPO a little, no more
    control = gpt.GPT(r["ref"].cfg)
    control.load_state_dict(r["ref"].state_dict())
    dpo.train_ptx_only(control, 40, dc, train_tokens)  # the mix alone keeps training the language model
    assert val(control) < val(r["ref"]) - 0.05  # (~0.16 lower here)
    with pytest.raises(ValueError, match="ptx_data"):
        tune(r, dc)  # the mix without its data
    for bad in ("--ptx_coef=-1", "--probe_every=-2"):
        with pytest.raises(ValueError, match=">= 0"):
            dpo.main([bad])  # before any sampling or training
