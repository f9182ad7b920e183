"""Tests for gpt.py: tokenizer, data, attention options, RoPE, KV cache, training, resume, DDP, errors."""

import dataclasses
import json
import math
import os
import resource
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt
from conftest import tiny_config, tiny_train_config

ROOT = Path(gpt.__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# Tokenizer


def reference_gpt2_encode(text: str) -> list[int]:
    """OpenAI's original GPT-2 encoder.py algorithm, written independently of tiktoken: regex
    pre-split, bytes -> printable unicode, then merge the lowest-ranked pair until none is left."""
    if not hasattr(reference_gpt2_encode, "tables"):
        encoder = json.loads((ROOT / "data/gpt2/encoder.json").read_text())
        merges = (ROOT / "data/gpt2/vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
        ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        reference_gpt2_encode.tables = encoder, ranks, gpt._bytes_to_unicode()
    encoder, ranks, b2u = reference_gpt2_encode.tables
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    out = []
    for piece in regex.findall(pat, text):
        word = tuple(b2u[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out.extend(encoder[w] for w in word)
    return out


def test_gpt2_ids_match_openai(gpt2):
    # ids published with the GPT-2 files (see data/gpt2/README.md)
    assert gpt2.encode("Hello world! Once upon a time") == [15496, 995, 0, 4874, 2402, 257, 640]
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256


def test_gpt2_ids_match_reference_bpe(gpt2):
    stories = (ROOT / "data/tinystories/tinystories_valid.txt").read_text().split(gpt.EOT)[:40]
    texts = stories + ["naïve café — 日本語 🐱🐱 ", "  multiple   spaces\n\n\ttabs", "it's we'll I'd"]
    for t in texts:
        assert gpt2.encode_ordinary(t) == reference_gpt2_encode(t)


def test_gpt2_token_count_matches_data_readme(gpt2):
    # data/tinystories/README.md: 1,570,545 GPT-2 tokens in the train file, counted this way
    text = (ROOT / "data/tinystories/tinystories_train.txt").read_text()
    assert len(gpt2.encode(text, allowed_special={gpt.EOT})) == 1_570_545


def test_trimmed_vocab_is_closed_and_complete(tokenizer):
    enc, kept = tokenizer
    assert enc.n_vocab == 8192 and len(kept) == 8191 and enc.eot_token == 8191
    ranks, parents = gpt._read_gpt2_files()
    by_rank = {r: t for t, r in ranks.items()}
    kept_bytes = {by_rank[r] for r in kept}
    assert all(bytes([b]) in kept_bytes for b in range(256))
    for t in kept_bytes:  # closure: every kept merged token can be built from kept tokens
        if t in parents:
            assert parents[t][0] in kept_bytes and parents[t][1] in kept_bytes
    # new ids follow GPT-2's rank order, so merge priority is unchanged, and keep their bytes
    assert [enc.decode_single_token_bytes(i) for i in range(8191)] == [by_rank[r] for r in kept]


def test_trimmed_vocab_costs_few_extra_tokens(tokenizer, gpt2):
    text = (ROOT / "data/tinystories/tinystories_valid.txt").read_text()
    n_trim, n_full = len(tokenizer[0].encode_ordinary(text)), len(gpt2.encode_ordinary(text))
    assert n_full <= n_trim < 1.01 * n_full  # 6x smaller vocabulary, < 1% more tokens


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_trimmed_round_trip_any_unicode(text):
    enc = test_trimmed_round_trip_any_unicode.enc
    assert enc.decode(enc.encode_ordinary(text)) == text


test_trimmed_round_trip_any_unicode.enc = gpt.build_tokenizer(8192)[0]


def test_small_trim_and_bad_rank_sets():
    kept = gpt.trim_vocab(300, "the cat sat on the mat. " * 50)
    assert len(kept) == 299
    enc = gpt.tokenizer_from_ranks(kept)
    assert enc.decode(enc.encode_ordinary("the cat ☕")) == "the cat ☕"
    ranks, parents = gpt._read_gpt2_files()
    orphan = next(ranks[t] for t in parents if ranks[t] > 1000)  # a merged token without its parents
    with pytest.raises(ValueError, match="closed under merges"):
        gpt.tokenizer_from_ranks(list(range(256)) + [orphan])


# -----------------------------------------------------------------------------------------------
# Data


def test_token_stream_separates_stories(tokenizer, val_tokens):
    enc, _ = tokenizer
    text = (ROOT / "data/tinystories/tinystories_valid.txt").read_text()
    stories = [s.strip() for s in text.split(gpt.EOT) if s.strip()]
    assert len(stories) == 874
    assert int((val_tokens == enc.eot_token).sum()) == 874 and val_tokens[-1] == enc.eot_token
    first = len(enc.encode_ordinary(stories[0]))
    assert enc.decode(val_tokens[:first].tolist()) == stories[0] and val_tokens[first] == enc.eot_token


def test_cache_is_invalidated_when_text_changes(monkeypatch, tmp_path, tokenizer):
    enc, _ = tokenizer
    (tmp_path / "tinystories").mkdir()
    f = tmp_path / "tinystories" / "tinystories_valid.txt"
    monkeypatch.setattr(gpt, "DATA_DIR", tmp_path)
    f.write_text("One story.\n<|endoftext|>\nTwo.\n<|endoftext|>\n")
    a = gpt.load_tokens("valid", enc)
    f.write_text("A different story.\n<|endoftext|>\n")
    b = gpt.load_tokens("valid", enc)
    assert enc.decode(a.tolist()) == "One story.<|endoftext|>Two.<|endoftext|>"
    assert enc.decode(b.tolist()) == "A different story.<|endoftext|>"
    assert len(list((tmp_path / "cache").glob("*.u16"))) == 2


def test_batches_depend_only_on_global_batch():
    one = gpt.batch_offsets(torch.Generator().manual_seed(0), 10_000, 64, 8, 3, 1, 0)
    halves = [gpt.batch_offsets(torch.Generator().manual_seed(0), 10_000, 64, 4, 3, 2, r) for r in (0, 1)]
    assert one.shape == (3, 8) and torch.equal(torch.cat(halves, dim=1), one)


def test_get_batch_targets_are_shifted_inputs(train_tokens):
    x, y = gpt.get_batch(train_tokens, torch.tensor([0, 1000]), 16)
    assert x.shape == y.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[1], torch.from_numpy(train_tokens[1001:1017].astype(np.int64)))


def test_full_data_offline_fails_fast_naming_the_default(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setattr(gpt, "DATA_DIR", tmp_path)

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(gpt.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"--data=sample.*default"):
        gpt.load_tokens("train", tokenizer[0], data="full")
    assert not list(tmp_path.rglob("*.part"))


def test_missing_and_corrupt_data_give_clear_errors(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setattr(gpt, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="git checkout -- data"):
        gpt.load_tokens("train", tokenizer[0])
    with pytest.raises(RuntimeError, match="data/gpt2"):
        gpt.gpt2_tokenizer()
    (tmp_path / "tinystories").mkdir()
    f = tmp_path / "tinystories" / "tinystories_valid.txt"
    f.write_text("Hi.\n<|endoftext|>\n")
    gpt.load_tokens("valid", tokenizer[0])
    cache = next((tmp_path / "cache").glob("*.u16"))
    cache.write_bytes(b"\xff\xff\xff")
    with pytest.raises(RuntimeError, match="corrupt"):
        gpt.load_tokens("valid", tokenizer[0])


# -----------------------------------------------------------------------------------------------
# Attention: every option of every kernel equals the naive reference in float64


def loop_attention(q, k, v, causal, window, sinks):
    """Row-by-row float64 reference, written from the definition, to check naive_attention itself."""
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(nh):
            g = h // (nh // nkv)
            for i in range(Tq):
                pos = Tk - Tq + i
                js = [j for j in range(Tk) if (not causal or j <= pos) and (not window or abs(pos - j) < window)]
                s = torch.stack([q[b, h, i] @ k[b, g, j] / math.sqrt(hs) for j in js])
                z = torch.exp(s - s.max())
                denom = z.sum() + (torch.exp(sinks[h] - s.max()) if sinks is not None else 0)
                out[b, h, i] = sum(z[n] / denom * v[b, g, j] for n, j in enumerate(js))
    return out


def test_naive_attention_hand_computed():
    # one head, two keys, query (1, 0): scores (1, 0) / sqrt(2); second row sees both keys
    q = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    out = gpt.naive_attention(q, k, v, causal=True)
    p = 1 / (1 + math.exp(-1 / math.sqrt(2)))  # softmax((1/sqrt2, 0))[0]
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(out[0, 0, 1], torch.tensor([p + 3 * (1 - p), 2 * p + 4 * (1 - p)], dtype=torch.float64))
    # a sink of logit 0 takes e^0 / (e^0 + e^s) of the mass of the first row
    out = gpt.naive_attention(q, k, v, causal=True, sinks=torch.zeros(1, dtype=torch.float64))
    w = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    assert torch.allclose(out[0, 0, 0], w * torch.tensor([1.0, 2.0], dtype=torch.float64))


OPTIONS = [  # (nh, nkv, causal, window, sinks)
    (4, 4, True, 0, False), (4, 2, True, 0, False), (4, 1, True, 0, False), (4, 2, False, 0, False),
    (4, 2, True, 3, False), (4, 4, True, 0, True), (4, 1, True, 5, True), (4, 2, False, 4, True),
]


@pytest.mark.parametrize("nh,nkv,causal,window,sinks", OPTIONS)
@pytest.mark.parametrize("Tq", [9, 1])
def test_attention_kernels_match_reference(nh, nkv, causal, window, sinks, Tq):
    g = torch.Generator().manual_seed(0)
    Tk, hs = 9, 8
    q = torch.randn(2, nh, Tq, hs, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, nkv, Tk, hs, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, nkv, Tk, hs, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(nh, generator=g, dtype=torch.float64, requires_grad=True) if sinks else None
    ref = loop_attention(q.detach(), k.detach(), v.detach(), causal, window, s.detach() if sinks else None)
    outs = {}
    for name, fn in [("naive", gpt.naive_attention), ("sdpa", gpt.sdpa_attention)]:
        out = fn(q, k, v, causal=causal, window=window, sinks=s)
        assert torch.allclose(out, ref, atol=1e-10), name
        grads = torch.autograd.grad((out * ref).sum(), [q, k, v] + ([s] if sinks else []))
        outs[name] = grads
    for a, b in zip(outs["naive"], outs["sdpa"]):  # gradients agree too, sinks included
        assert torch.allclose(a, b, atol=1e-10)


def test_max_attention_logit_is_recorded_per_head():
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(vocab_size=300, block_size=8, window=3)).double()
    attn = model.layers[1].attention
    attn.record_max_logit = True
    captured = {}
    attn.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    model(torch.randint(0, 300, (2, 8)))
    cfg = model.cfg
    x = captured["x"]  # recompute the scores by hand from the layer's input
    rope = gpt.rope_cos_sin(torch.arange(8), cfg.head_size, cfg.rope_theta)
    q = gpt.apply_rope(attn.wq(x).view(2, 8, 4, 16), *rope).transpose(1, 2)
    k = gpt.apply_rope(attn.wk(x).view(2, 8, 2, 16), *rope).transpose(1, 2).repeat_interleave(2, dim=1)
    s = (q @ k.transpose(-2, -1)) / 4.0
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    s = s.masked_fill(~((j <= i) & (i - j < 3)), float("-inf"))
    assert torch.allclose(attn.max_logit, s.amax(dim=(0, 2, 3)))
    assert model.layers[0].attention.max_logit is None  # off unless asked for


def test_soft_cap_bounds_scores_and_sdpa_refuses_it():
    g = torch.Generator().manual_seed(0)
    q, k = 30 * torch.randn(1, 2, 5, 4, generator=g), 30 * torch.randn(1, 2, 5, 4, generator=g)
    v = torch.eye(5).view(1, 1, 5, 5).expand(1, 2, 5, 5)[..., :4]
    capped = gpt.naive_attention(q, k, torch.eye(5).expand(1, 2, 5, 5), causal=False, soft_cap=2.0)
    # with |scores| < 2 no weight can exceed e^2 / (e^2 + 4 e^-2)
    assert capped.max() < math.exp(2) / (math.exp(2) + 4 * math.exp(-2)) + 1e-6
    with pytest.raises(ValueError, match="naive"):
        gpt.sdpa_attention(q, k, v, soft_cap=2.0)
    with pytest.raises(ValueError, match="attn_impl=naive"):
        gpt.GPTConfig(attn_soft_cap=50.0, attn_impl="sdpa")


# -----------------------------------------------------------------------------------------------
# RoPE and the model


def test_rope_matches_complex_rotation_and_is_relative():
    x = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    pos = torch.arange(6)
    out = gpt.apply_rope(x, *gpt.rope_cos_sin(pos, 8, 10000.0))
    # Meta's Llama: view adjacent pairs as complex numbers and multiply by e^(i * pos * freq)
    freqs = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rot = torch.polar(torch.ones(6, 4, dtype=torch.float64), pos[:, None].double() * freqs)  # (T, hs/2)
    ref = torch.view_as_real(torch.view_as_complex(x.view(1, 6, 2, 4, 2)) * rot[None, :, None]).flatten(-2)
    assert torch.allclose(out, ref)
    # q.k after rotation depends only on the distance m - n
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def dot(m, n):
        rq = gpt.apply_rope(q.view(1, 1, 1, 8), *gpt.rope_cos_sin(torch.tensor([m]), 8, 10000.0))
        rk = gpt.apply_rope(k.view(1, 1, 1, 8), *gpt.rope_cos_sin(torch.tensor([n]), 8, 10000.0))
        return (rq * rk).sum()

    assert torch.allclose(dot(7, 3), dot(104, 100)) and torch.allclose(dot(0, 0), (q * k).sum())


MODEL_VARIANTS = [
    dict(), dict(n_kv_head=1), dict(n_kv_head=4), dict(window=5), dict(sinks=True), dict(qk_norm=True),
    dict(window=4, sinks=True, n_kv_head=1), dict(tie_embeddings=False),
    dict(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True, n_kv_head=0),
    dict(mlp="relu2", logit_soft_cap=3.0, zero_init=True),
]


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_model_naive_equals_sdpa(variant):
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(vocab_size=300, block_size=16, **variant)).double()
    for p in model.parameters():  # break the symmetry of zero sinks / unit norms
        p.data += 0.05 * torch.randn_like(p)
    idx = torch.randint(0, 300, (2, 16))
    model.cfg.attn_impl = "sdpa"
    a, _ = model(idx)
    model.cfg.attn_impl = "naive"
    b, _ = model(idx)
    assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("variant", MODEL_VARIANTS + [dict(attn_soft_cap=5.0, attn_impl="naive")],
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_kv_cache_decoding_equals_full_forward(variant):
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(vocab_size=300, block_size=16, **variant)).double().eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    idx = torch.randint(0, 300, (2, 16))
    full, _ = model(idx)  # (B, T, V)
    cache = gpt.KVCache(model.cfg, 2, 16, dtype=torch.float64)
    steps = [model(idx[:, :6], cache=cache)[0]]  # prefill 6 tokens, then one at a time (past the ring)
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(6, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10)


def test_sliding_window_cache_is_a_fixed_ring_and_decodes_past_block_size():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=300, block_size=8, window=4, n_layer=1)  # one layer: sees 4 tokens
    model = gpt.GPT(cfg).double().eval()
    cache = gpt.KVCache(cfg, 1, cfg.block_size, dtype=torch.float64)
    assert cache.k.shape[3] == 4  # W slots, however long the text
    idx = torch.randint(0, 300, (1, 20))
    out = [model(idx[:, :3], cache=cache)[0][:, -1]] + [model(idx[:, t:t + 1], cache=cache)[0][:, -1]
                                                         for t in range(3, 20)]
    # at position 19 the model sees tokens 16..19; RoPE is relative, so the same 4 tokens at
    # positions 0..3 give the same logits
    ref, _ = model(idx[:, 16:20])
    assert torch.allclose(out[-1], ref[:, -1], atol=1e-10)


def test_loss_is_cross_entropy_plus_z_loss_and_aux():
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(vocab_size=300, block_size=8, z_loss=1e-2))
    idx, tgt = torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))
    logits, loss = model(idx, tgt)
    ce = F.cross_entropy(logits.view(-1, 300), tgt.view(-1))
    z = torch.logsumexp(logits.view(-1, 300), -1).pow(2).mean()
    assert torch.allclose(loss, ce + 1e-2 * z)
    model.layers[0].feed_forward.aux_loss = torch.tensor(0.5)  # what an MoE layer would set
    assert torch.allclose(model(idx, tgt)[1], ce + 1e-2 * z + 0.5)


def test_logit_soft_cap_relu2_and_zero_init_by_hand():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=300, block_size=8, mlp="relu2", zero_init=True)
    model = gpt.GPT(cfg).double()
    idx = torch.randint(0, 300, (2, 8))
    for block in model.layers:  # zero-init: every block starts as the identity
        assert not block.attention.wo.weight.any() and not block.feed_forward.w2.weight.any()
    plain, _ = model(idx)
    assert torch.allclose(plain, model.output(model.norm(model.tok_embeddings(idx))), atol=1e-12)
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    mlp, x = model.layers[0].feed_forward, torch.randn(3, cfg.n_embd, dtype=torch.float64)
    assert mlp.w1.out_features == 4 * cfg.n_embd
    assert torch.allclose(mlp(x), mlp.w2(torch.clamp(mlp.w1(x), min=0) ** 2), atol=1e-12)
    plain, _ = model(idx)
    model.cfg.logit_soft_cap = 0.5  # below the logits' range, so the cap really bends them
    capped, _ = model(idx)
    assert torch.allclose(capped, 0.5 * torch.tanh(plain / 0.5), atol=1e-12) and capped.abs().max() < 0.5


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    tc = gpt.TrainConfig(max_iters=100, warmup_iters=10, min_lr_ratio=0.1, schedule="wsd", cooldown_frac=0.4)
    f = [gpt.lr_factor(it, tc) for it in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0  # warmup
    assert all(x == 1.0 for x in f[10:61])  # stable until the last 40 steps
    assert f[80] == pytest.approx(1 - 0.9 * 20 / 40) and f[100] == pytest.approx(0.1)
    cos = dataclasses.replace(tc, schedule="cosine")
    assert gpt.lr_factor(55, cos) == pytest.approx(0.55) and gpt.lr_factor(100, cos) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule must be cosine or wsd"):
        gpt.TrainConfig(schedule="step")


def test_parameter_names_follow_llama():
    names = set(gpt.GPT(tiny_config(n_layer=1, tie_embeddings=False)).state_dict())
    assert names == {"tok_embeddings.weight", "norm.weight", "output.weight",
                     "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
                     *(f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")),
                     *(f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3"))}


# -----------------------------------------------------------------------------------------------
# Sampling


def test_top_k_and_top_p_filter_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(gpt.sample_next(logits, generator=g, **kw)) for _ in range(300)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}  # 0.5 < 0.75 <= 0.8: the first two tokens are needed
    assert draws(top_p=0.5) == {0}
    assert draws(temperature=0.0) == {0}
    assert draws() == {0, 1, 2, 3}


def test_generate_stops_at_eot():
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(vocab_size=300, block_size=16))
    with torch.no_grad():
        model.output.weight.zero_()  # tied: all logits 0 ...
        model.norm.weight.zero_()
    eot = 7  # ... so greedy picks token 0 forever unless EOT is preferred
    out = gpt.generate(model, [1, 2, 3], 40, temperature=0.0)
    assert out == [[0] * 40]  # runs past block_size by re-prefilling
    model.output = torch.nn.Linear(64, 300, bias=False)
    with torch.no_grad():
        model.output.weight.zero_()
    model.norm.weight.data.fill_(1.0)
    model.output.bias = None
    model.output.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([eot]), 1.0))
    assert gpt.generate(model, [1, 2, 3], 40, num_samples=2, temperature=0.0, eot=eot) == [[], []]


# -----------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_training_lowers_val_loss_far_below_unigram(tmp_path, val_tokens, tokenizer):
    # the default model, 200 steps of 8 x 256 tokens (~100 s on 2 cores)
    tc = tiny_train_config(tmp_path, max_iters=200, batch_size=8, warmup_iters=40, lr=6e-3)
    res = gpt.train(gpt.GPTConfig(), tc, verbose=False)
    f = res["final"]
    unigram = gpt.unigram_entropy(np.asarray(val_tokens), tokenizer[0].n_vocab)
    assert abs(f["unigram_loss"] - unigram) < 1e-9
    # a model that ignores context cannot beat the unigram loss (5.87); 1 nat below = 2.7x lower perplexity
    assert f["val_loss"] < unigram - 1.0, f
    assert f["val_tokens"] == len(val_tokens) - 1  # the final evaluation covers the whole split
    assert f["val_bpb"] < 1.7, f
    assert res["history"][0]["val_loss"] > 8.5  # it started from uniform guessing, ln(8192) = 9.01


def test_bits_per_byte_is_nats_over_bytes(val_tokens, tokenizer):
    enc, _ = tokenizer
    model = gpt.GPT(tiny_config())
    lengths = gpt.token_byte_lengths(enc)
    ev = gpt.evaluate(model, val_tokens, lengths, 64, 8, max_tokens=1000)
    nbytes = lengths[np.asarray(val_tokens[1:1001], dtype=np.int64)].sum()
    assert ev["tokens"] == 1000
    assert math.isclose(ev["bpb"], ev["loss"] * 1000 / math.log(2) / nbytes, rel_tol=1e-9)
    text = (ROOT / "data/tinystories/tinystories_valid.txt").read_text()  # bytes = text + 1 per EOT
    stories = [s.strip() for s in text.split(gpt.EOT) if s.strip()]
    assert lengths[np.asarray(val_tokens, dtype=np.int64)].sum() == sum(len(s.encode()) + 1 for s in stories)


@pytest.mark.slow
def test_resume_gives_the_same_parameters(tmp_path):
    cfg = tiny_config()
    full = gpt.train(cfg, tiny_train_config(tmp_path / "a", max_iters=12, grad_accum=2), verbose=False)
    gpt.train(cfg, tiny_train_config(tmp_path / "b", max_iters=12, grad_accum=2, stop_at=6), verbose=False)
    assert gpt.read_checkpoint(tmp_path / "b" / "ckpt.pt")["iter"] == 6
    resumed = gpt.train(cfg, tiny_train_config(tmp_path / "b", max_iters=12, grad_accum=2, resume=True),
                        verbose=False)
    for (name, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert gpt.read_checkpoint(tmp_path / "b" / "ckpt.pt")["iter"] == 12


def test_keep_freed_memory_reuses_freed_pages():
    """A training step frees and allocates the same large buffers every time: once the heap has room for
    them, a freed 64 MiB buffer is reused instead of being unmapped and faulted in again (16,384 pages)."""
    if not gpt.keep_freed_memory():
        pytest.skip("needs Linux with glibc")
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 * 2**20)  # 64 MiB, every page written
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults[2:]) < 1000, f"page faults per 64 MiB buffer: {faults}"


class FakeClock:
    """Stands in for gpt.time: every time() call advances by `dt`, so each optimizer step (timed by two
    calls) takes exactly dt seconds, whatever the machine."""

    def __init__(self, dt: float):
        self.now, self.dt = 0.0, dt

    def time(self) -> float:
        self.now += self.dt
        return self.now


@pytest.mark.parametrize("step_s, steps", [(0.5, 10), (1.25, 4)])
def test_time_budget_stops_when_spent_and_places_the_schedule_by_time(tmp_path, monkeypatch, step_s, steps):
    monkeypatch.setattr(gpt, "time", FakeClock(step_s))
    tc = tiny_train_config(tmp_path, max_iters=20, warmup_iters=2, time_budget=5.0, log_interval=3)
    short_val = np.arange(2000) % 300  # the final evaluation's stream: any tokens, kept short for speed
    res = gpt.train(tiny_config(), tc, verbose=False, val_tokens=short_val)
    # as many steps as fit (the plan said 20), then the final evaluation and checkpoint
    assert res["final"]["iters"] == steps and res["final"]["step_time"] == pytest.approx(5.0)
    assert res["history"][-1]["whole_split"] and gpt.read_checkpoint(tmp_path / "ckpt.pt")["iter"] == steps
    # step i runs at schedule position max_iters * (i * step_s / budget): the last at 20 * (steps - 1) / steps
    last_lr = res["optimizer"].param_groups[0]["lr"]
    assert last_lr == pytest.approx(tc.lr * gpt.lr_factor(20 * (steps - 1) / steps, tc))
    resumed = gpt.train(tiny_config(), dataclasses.replace(tc, resume=True), verbose=False,
                        val_tokens=short_val)
    assert resumed["final"] == {}  # a spent budget has nothing left to do


def test_time_budget_rejects_bad_values_and_ddp(tmp_path, monkeypatch):
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time_budget must be"):
            gpt.TrainConfig(time_budget=bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="single process"):
        gpt.train(tiny_config(), tiny_train_config(tmp_path, time_budget=1.0), verbose=False)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    common = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--block_size=64", "--max_iters=6",
              "--warmup_iters=2", "--eval_interval=1000", "--log_interval=3", "--num_threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "gpt.py"), *common, "--batch_size=4", f"--out_dir={tmp_path / 'ddp'}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 process(es)" in r.stdout
    single = gpt.train(*gpt.parse_args(common + ["--batch_size=8", f"--out_dir={tmp_path / 'one'}"])[:2],
                       verbose=False)
    ddp = gpt.read_checkpoint(tmp_path / "ddp" / "ckpt.pt")["model"]
    for name, p in single["model"].state_dict().items():
        assert torch.allclose(p, ddp[name], atol=1e-5, rtol=1e-4), name


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_config()
    tc = tiny_train_config(tmp_path, max_iters=20, warmup_iters=1, lr=1e30, ckpt_interval=1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        gpt.train(cfg, tc, verbose=False)
    state = gpt.read_checkpoint(tmp_path / "ckpt.pt")
    assert 1 <= state["iter"] < 20
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# -----------------------------------------------------------------------------------------------
# Command line, configs and checkpoints: bad input gets a clear error


def test_cli_overrides_and_presets():
    cfg, tc, sc, sample = gpt.parse_args(["--n_layer=3", "--lr=1e-3", "--compile=false", "--prompt=Hi",
                                          "--sample", "--preset=nanogpt"])
    assert (cfg.n_layer, tc.lr, tc.compile, sc.prompt, sample) == (3, 1e-3, False, "Hi", True)
    assert (cfg.norm, cfg.pos_emb, cfg.mlp, cfg.vocab_size, cfg.n_kv_head) == ("layernorm", "learned", "gelu",
                                                                                50257, cfg.n_head)
    with pytest.raises(ValueError, match="did you mean --n_layer"):
        gpt.parse_args(["--n_layers=3"])
    with pytest.raises(ValueError, match="expected an integer"):
        gpt.parse_args(["--n_layer=three"])
    with pytest.raises(ValueError, match="known presets"):
        gpt.parse_args(["--preset=gpt5"])
    cfg, tc, _, _ = gpt.parse_args(["--preset=speedrun", "--lr=1e-3"])  # model + training fields, flags win
    assert (cfg.vocab_size, cfg.n_embd, tc.optimizer, tc.lr, tc.qk_clip_tau) == (4096, 96, "muon", 1e-3, 0.0)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_embd=100, n_head=3), "divisible"), (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(vocab_size=100), "vocab_size"), (dict(norm="batchnorm"), "norm"), (dict(window=-1), "window"),
    (dict(pos_emb="learned", window=4), "pos_emb=rope"), (dict(n_layer=0), "positive"),
    (dict(logit_soft_cap=-1.0), "logit_soft_cap"),
])
def test_bad_model_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        gpt.GPTConfig(**kw)


def test_unknown_pluggable_parts_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown attn_impl 'flashy'; choose one of .*flash.*naive.*sdpa"):
        gpt.GPT(tiny_config(attn_impl="flashy"))
    with pytest.raises(ValueError, match="unknown mlp 'moo'; choose one of .*moe.*swiglu"):
        gpt.GPT(tiny_config(mlp="moo"))
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose one of adamw, muon"):
        gpt.train(tiny_config(), tiny_train_config(tmp_path, optimizer="sgd"), verbose=False)
    with pytest.raises(ValueError, match="needs the MoE options"):  # a plain GPTConfig lacks them
        gpt.GPT(tiny_config(mlp="moe"))


def test_plugins_are_imported_on_first_use_and_add_their_options():
    # a fresh interpreter: nothing imported but gpt; naming a chapter's part imports the chapter
    code = ("import sys, gpt\n"
            "cfg, tc, _, _ = gpt.parse_args(['--mlp=moe', '--n_experts=4', '--top_k=2', '--optimizer=muon',"
            " '--qk_clip_tau=50', '--attn_impl=flash'])\n"
            "print(type(cfg).__name__, cfg.n_experts, type(tc).__name__, tc.qk_clip_tau)\n"
            "print(sorted(m for m in ('moe', 'muon', 'attention_flash') if m in sys.modules))\n"
            "gpt.GPT(cfg)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["MoEConfig 4 MuonConfig 50.0", "['attention_flash', 'moe', 'muon']"]
    # two extensions of one base combine into one class with both sets of options
    import moe
    import muon  # noqa: F401
    gpt.CONFIG_CLASSES["moe_twin"] = type("Twin", (moe.MoEConfig,), {})
    try:
        both, _ = gpt.config_classes({"mlp": "moe", "attn_impl": "sdpa"})
        assert both is moe.MoEConfig
        model_cls, train_cls = gpt.config_classes({"mlp": "moe", "optimizer": "muon"})
        assert (model_cls.__name__, train_cls.__name__) == ("MoEConfig", "MuonConfig")
    finally:
        del gpt.CONFIG_CLASSES["moe_twin"]


def test_bad_training_and_sampling_values_get_clear_errors():
    for argv, msg in [(["--top_k=-3"], "top_k must be >= 0"), (["--temperature=nan"], "temperature must be"),
                      (["--temperature=-1"], "temperature must be"), (["--top_p=2"], r"top_p must be in \(0, 1\]"),
                      (["--top_p=0"], "top_p must be in"), (["--num_samples=0"], "num_samples"),
                      (["--max_iters=0"], "max_iters must be positive"), (["--lr=inf"], "lr must be"),
                      (["--batch_size=-2"], "batch_size must be positive"), (["--dtype=fp8"], "dtype must be")]:
        with pytest.raises(ValueError, match=msg):
            gpt.parse_args(argv)
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="temperature"):
        gpt.sample_next(logits, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        gpt.sample_next(logits, top_k=-1)


def test_long_prompt_is_cut_with_a_warning(tiny_cfg):
    torch.manual_seed(0)
    model = gpt.GPT(tiny_cfg)
    with pytest.warns(UserWarning, match="only its last 64 tokens"):
        out = gpt.generate(model, list(range(100)), 3, temperature=0)
    assert out == gpt.generate(model, list(range(36, 100)), 3, temperature=0)


def test_help_lists_every_flag_with_its_comment():
    text = gpt.help_text("gpt.py", [("model", gpt.GPTConfig), ("training", gpt.TrainConfig)], gpt.__doc__)
    assert "examples:\n    python gpt.py " in text
    for f in dataclasses.fields(gpt.GPTConfig) + dataclasses.fields(gpt.TrainConfig):
        assert f"--{f.name}=" in text, f.name
    # the comment beside the field, including its continuation line
    assert "context length T; a TinyStories story is ~200 tokens" in text
    assert "the final evaluation uses the whole split" in text


SCRIPTS = ["gpt.py", "attention_flash.py", "moe.py", "muon.py", "quant.py", "dpo.py", "bench.py",
           "bench_kernels.py"]


def test_every_script_has_help():
    procs = {s: subprocess.Popen([sys.executable, str(ROOT / s), "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
    for script, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (script, err)
        assert out.startswith(f"usage: python {script}") and "examples:" in out, (script, out[:300])
        assert re.search(r"^  --\w+=", out, re.M), script  # at least one flag, with its default


def _ckpt_dir(tmp_path):
    cfg, tc = tiny_config(), tiny_train_config(tmp_path, max_iters=4, eval_interval=1000)
    gpt.train(cfg, tc, verbose=False)
    return cfg, tc


@pytest.mark.slow
def test_new_run_refuses_to_overwrite_a_checkpoint_and_resume_is_explicit(tmp_path, capsys):
    cfg, tc = _ckpt_dir(tmp_path / "a")
    before = (tmp_path / "a" / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--out_dir=DIR.*--overwrite"):
        gpt.train(cfg, tc, verbose=False)
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == before
    # --resume on a finished run: nothing to do, said so
    res = gpt.train(cfg, dataclasses.replace(tc, resume=True), verbose=True)
    assert res["final"] == {} and "nothing to do" in capsys.readouterr().out
    # --resume --ckpt=PATH resumes *that* file (and keeps writing it), whatever out_dir says
    other = tmp_path / "b" / "mine.pt"
    gpt.train(cfg, dataclasses.replace(tc, ckpt=str(other), max_iters=6, stop_at=3), verbose=False)
    res = gpt.train(cfg, dataclasses.replace(tc, ckpt=str(other), max_iters=6, resume=True), verbose=True)
    assert f"resumed from {other} at iteration 3" in capsys.readouterr().out
    assert gpt.read_checkpoint(other)["iter"] == 6 and res["final"]
    gpt.train(cfg, dataclasses.replace(tc, overwrite=True), verbose=False)  # explicit: allowed


def test_damaged_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one first"):
        gpt.load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    with pytest.raises(RuntimeError, match="is empty"):
        gpt.load_model(bad)
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match="not a zip archive"):
        gpt.load_model(bad)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(RuntimeError, match="not a gpt.py checkpoint: expected the keys"):
        gpt.load_model(bad)
    _ckpt_dir(tmp_path)
    good = (tmp_path / "ckpt.pt").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(RuntimeError, match="truncated or damaged"):
        gpt.load_model(bad)
    # 4 KiB flipped in the middle of the largest tensor (the embedding): only the digest can tell
    state = gpt.read_checkpoint(tmp_path / "ckpt.pt")
    emb = state["model"]["tok_embeddings.weight"].numpy().tobytes()
    at = good.find(emb[:64])
    assert at > 0
    mid = at + len(emb) // 2
    flipped = good[:mid] + bytes(b ^ 0xFF for b in good[mid:mid + 4096]) + good[mid + 4096:]
    bad.write_bytes(flipped)
    with pytest.raises(RuntimeError, match="do not match the digest"):
        gpt.load_model(bad)


def test_plots_of_modified_runs_stay_out_of_assets(tmp_path):
    assert gpt.plot_path("gpt_loss.png", True, tmp_path) == gpt.ROOT / "assets" / "gpt_loss.png"
    assert gpt.plot_path("loss.png", False, tmp_path) == tmp_path / "loss.png"
    assert gpt.plot_path("x.png", True, tmp_path, "") is None
    assert gpt.plot_path("x.png", False, tmp_path, "here.png") == Path("here.png")
    assert gpt.is_default(gpt.TrainConfig(out_dir="elsewhere", num_threads=2), gpt.RUN_ONLY_FIELDS)
    assert not gpt.is_default(gpt.TrainConfig(max_iters=10), gpt.RUN_ONLY_FIELDS)


@pytest.mark.slow
def test_cli_trains_then_samples_from_checkpoint(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "gpt.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=600)
    assets = {p.name: p.stat().st_mtime_ns for p in (ROOT / "assets").glob("*.png")}
    # (batch 32 x 64 tokens: the closing evaluation of the whole val split takes 88 batches, not 1,400)
    r = run("--n_layer=1", "--n_embd=32", "--block_size=64", "--max_iters=5", "--eval_interval=100",
            "--batch_size=32", "--max_new_tokens=20", "--num_samples=1", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "--- sample 1 ---" in r.stdout
    assert (tmp_path / "loss.png").stat().st_size > 1000  # a modified run plots into its out_dir...
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "assets").glob("*.png")} == assets  # ...not assets/
    r = run("--sample", f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=Once upon a time", "--max_new_tokens=10")
    assert r.returncode == 0, r.stderr
    samples = re.findall(r"--- sample \d+ ---\n(.*)", r.stdout)
    assert len(samples) == 3 and all(s.startswith("Once upon a time") for s in samples), r.stdout
    # a plug-in named on the command line (moe.py's layer and one of its options) registers into the
    # gpt module that runs as the script, and the checkpoint rebuilds the MoE model for --sample
    moe_ckpt = tmp_path / "moe" / "ckpt.pt"
    r = run("--n_layer=1", "--n_embd=32", "--block_size=32", "--max_iters=3", "--stop_at=2", "--batch_size=4",
            "--eval_interval=100", "--eval_tokens=256", "--mlp=moe", "--n_experts=4", "--top_k=2",
            f"--ckpt={moe_ckpt}")
    assert r.returncode == 0, r.stderr
    assert "mlp=moe" in r.stdout and moe_ckpt.exists()
    r = run("--sample", f"--ckpt={moe_ckpt}", "--max_new_tokens=5", "--num_samples=1")
    assert r.returncode == 0 and "--- sample 1 ---" in r.stdout, r.stderr
    r = run("--n_layerz=1")
    assert r.returncode != 0 and "unknown option --n_layerz" in r.stderr
    r = run("--sample", f"--ckpt={tmp_path / 'missing.pt'}")
    assert r.returncode != 0 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr
