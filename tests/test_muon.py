"""Tests for muon.py: Newton-Schulz against an SVD reference and its published band, update RMS under
Moonlight's scaling, bit-for-bit agreement with torch.optim.Muon (and torch.optim.AdamW for the rest),
parameter routing and errors, QK-Clip, 2-process DDP equal to 1 process, and a TinyStories run."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon

import gpt
import muon
from conftest import tiny_config, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
A, B, C = muon.NS_COEFFICIENTS


def quintic(x: float, steps: int = 5) -> float:
    """The scalar polynomial p(x) = a x + b x^3 + c x^5 iterated, in plain Python floats."""
    for _ in range(steps):
        x = A * x + B * x ** 3 + C * x ** 5
    return x


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An (m, n) matrix with singular values s, from random orthogonal factors (QR of Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * s) @ V.T


def short_run(cfg, out_dir, **kw) -> dict:
    """gpt.train for max_iters steps without its closing whole-split evaluation (179k val tokens, the
    slowest part of a short run): a schedule one step longer, stopped (stop_at) after max_iters."""
    clip = {"qk_clip_tau": kw.pop("qk_clip_tau")} if "qk_clip_tau" in kw else {}
    tc = tiny_train_config(out_dir, **kw)
    tc = muon.MuonConfig(**{**dataclasses.asdict(tc), "max_iters": tc.max_iters + 1, "stop_at": tc.max_iters},
                         **clip)
    return gpt.train(cfg, tc, verbose=False)


def val_loss(model, val_tokens, n_tokens: int = 8192) -> float:
    enc, _ = gpt.build_tokenizer(model.cfg.vocab_size)
    lengths = gpt.token_byte_lengths(enc)
    return gpt.evaluate(model, val_tokens, lengths, model.cfg.block_size, 8, n_tokens)["loss"]


SHAPES = {"square": (64, 64), "wide": (48, 160), "tall": (160, 48), "4-D conv": (32, 8, 3, 3)}


# -----------------------------------------------------------------------------------------------
# Newton-Schulz


def test_newton_schulz_hand_computed_diagonal():
    # diag(3, 4) has Frobenius norm 5: the iteration sees singular values 0.6 and 0.8, each mapped by p^5
    out = muon.newton_schulz(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), dtype=torch.float64)
    expected = torch.tensor([[quintic(0.6), 0.0], [0.0, quintic(0.8)]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_quintic_band():
    """The claim behind the coefficients: 5 steps take [2e-3, 1] into ~[0.5, 1.2], [1e-2, 1] into
    [0.68, 1.14], and p(1) = a + b + c = 0.701 (1 is not a fixed point: no convergence to exactly 1)."""
    xs = torch.logspace(math.log10(2e-3), 0, 3001, dtype=torch.float64)
    ys = torch.tensor([quintic(float(x)) for x in xs], dtype=torch.float64)
    assert 0.5 < ys.min() and ys.max() < 1.21
    assert 0.68 < ys[xs >= 1e-2].min() and ys[xs >= 1e-2].max() < 1.14
    assert abs(quintic(1.0, 1) - 0.701) < 1e-9
    assert quintic(1e-4) < 0.1  # too small a singular value is not brought up in 5 steps


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_newton_schulz_matches_svd_reference(shape):
    # fp32 matmuls against the float64 SVD form U p^5(S/||G||) V^T: fp32 rounding over 5 steps ~1e-6
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = muon.newton_schulz(G, dtype=torch.float32)
    assert out.shape == G.shape and out.dtype == torch.float32
    ref = muon.newton_schulz_reference(G)
    torch.testing.assert_close(out.reshape(ref.shape).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_singular_values_in_band(shape):
    m, n = shape[0], math.prod(shape[1:])
    k = min(m, n)
    # a spectrum spanning two decades (condition number 100), as momentum matrices roughly do
    s = torch.logspace(0, 2, k, dtype=torch.float64)
    G = with_spectrum(m, n, s).reshape(shape).float()
    sv = torch.linalg.svdvals(muon.newton_schulz(G).reshape(m, n).double())
    # the smallest input sigma/||G||_F is 1/||s|| > 2e-3, so every output lies in p^5's band
    assert 1 / s.norm() > 2e-3
    assert sv.min() > 0.5 and sv.max() < 1.21, (sv.min(), sv.max())


def test_newton_schulz_bf16_equals_torch_bit_for_bit():
    for shape in [(64, 64), (48, 160), (160, 48)]:
        G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        ours = muon.newton_schulz(G, dtype=torch.bfloat16)
        theirs = torch_muon._zeropower_via_newtonschulz(G, muon.NS_COEFFICIENTS, 5, muon.NS_EPS)
        assert torch.equal(ours, theirs), shape


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="needs a matrix"):
        muon.newton_schulz(torch.randn(5))


# -----------------------------------------------------------------------------------------------
# Update scale: Moonlight's 0.2 * sqrt(max(A, B)) gives every shape the same update RMS


def first_update(shape, adjust, seed=3):
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    muon.Muon([p], lr=1.0, weight_decay=0.0, adjust_lr_fn=adjust, ns_dtype="float32").step()
    return p.detach()


@pytest.mark.parametrize("shape", list(SHAPES.values()) + [(16, 512), (512, 16)],
                         ids=list(SHAPES) + ["very wide", "very tall"])
def test_update_rms_is_about_0_2_under_moonlight_scaling(shape):
    rms = first_update(shape, "match_rms_adamw").pow(2).mean().sqrt().item()
    # RMS = 0.2 * RMS of the output singular values, which lie in p^5's band (~0.7-1.1)
    assert 0.15 < rms < 0.22, rms


def test_original_scaling_rms_depends_on_shape():
    # Jordan's sqrt(max(1, A/B)) leaves the RMS at ~1/sqrt(max(A, B)): wide and square updates shrink
    small, big = (first_update(s, "original").pow(2).mean().sqrt().item() for s in [(16, 16), (256, 256)])
    assert small > 3 * big
    assert muon.update_scale((256, 64), "original") == 2.0 and muon.update_scale((64, 256), "original") == 1.0
    assert muon.update_scale((64, 256), "match_rms_adamw") == pytest.approx(0.2 * 16)


# -----------------------------------------------------------------------------------------------
# Agreement with the references: torch.optim.Muon for matrices, torch.optim.AdamW for the rest


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_bit_for_bit(adjust, nesterov):
    torch.manual_seed(4)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 64), (48, 160), (160, 48)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    opt = muon.Muon(ours, ns_dtype="bfloat16", **kw)  # torch.optim.Muon always orthogonalises in bf16
    opt_ref = torch.optim.Muon(ref, **kw)
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


def test_muon_fp32_matches_torch_muon_with_fp32_newton_schulz(monkeypatch):
    """The CPU default (fp32) is the same algorithm: give torch's Muon our fp32 orthogonaliser."""
    def fp32_ns(g, coeffs, steps, eps):
        return muon.newton_schulz(g, steps, coeffs, eps, torch.float32)

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_ns)
    torch.manual_seed(5)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(32, 96), (96, 32)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = muon.Muon(ours, lr=0.01, adjust_lr_fn="match_rms_adamw")  # ns_dtype auto = fp32 on CPU
    opt_ref = torch.optim.Muon(ref, lr=0.01, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


def test_adamw_groups_match_torch_adamw():
    # same arithmetic as torch's single-tensor AdamW; fp32 reassociation allows ~1 ulp per step
    torch.manual_seed(6)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(10,), (50, 8)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = muon.Muon([dict(params=ours, use_muon=False)], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------------------------
# Routing and errors


def test_make_muon_routes_parameters():
    model = gpt.GPT(tiny_config(bias=True, sinks=True))
    opt = muon.make_muon(model, tiny_train_config("unused", lr=3e-3, weight_decay=0.1))
    groups = {(g["use_muon"], g["weight_decay"]): g["params"] for g in opt.param_groups}
    assert all(g["initial_lr"] == 3e-3 for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[id(p)] for p in groups[(True, 0.1)]}
    assert hidden == {n for n, p in model.named_parameters()
                      if p.ndim == 2 and n.rsplit(".", 2)[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    assert {names[id(p)] for p in groups[(False, 0.1)]} == {"tok_embeddings.weight"}  # = output (tied)
    vectors = groups[(False, 0.0)]
    assert all(p.ndim == 1 for p in vectors) and any(names[id(p)].endswith("sinks") for p in vectors)
    assert sum(map(len, groups.values())) == len(list(model.parameters()))  # each exactly once
    untied = gpt.GPT(tiny_config(tie_embeddings=False))
    embed = muon.split_params(untied)[1]
    assert {id(p) for p in embed} == {id(untied.tok_embeddings.weight), id(untied.output.weight)}


def test_registered_as_a_plugin():
    assert gpt.OPTIMIZERS["muon"] is muon.make_muon and gpt.CONFIG_CLASSES["muon"] is muon.MuonConfig
    # a plain TrainConfig gets MuonConfig's defaults; a MuonConfig's options reach the optimizer
    model = gpt.GPT(tiny_config())
    assert muon.make_muon(model, gpt.TrainConfig()).qk_clip.tau == 100.0
    opt = muon.make_muon(model, muon.MuonConfig(qk_clip_tau=0, muon_momentum=0.9, ns_steps=3))
    assert opt.qk_clip is None and opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["ns_steps"] == 3


def test_clear_errors():
    with pytest.raises(ValueError, match="use_muon=False"):
        muon.Muon([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        muon.Muon([torch.nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="spectral")
    with pytest.raises(ValueError, match="complex"):
        muon.Muon([torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        muon.Muon([p]).step()
    with pytest.raises(ValueError, match="qk_norm"):
        muon.make_muon(gpt.GPT(tiny_config(qk_norm=True)), tiny_train_config("unused"))


# -----------------------------------------------------------------------------------------------
# QK-Clip


def attention_logits(attn: gpt.Attention, x: torch.Tensor) -> torch.Tensor:
    """Per-head max logit of attn on x, through the layer's own forward (RoPE included): (nh,)."""
    rope = gpt.rope_cos_sin(torch.arange(x.shape[1]), attn.cfg.head_size, attn.cfg.rope_theta)
    attn.record_max_logit = True
    attn(x, rope)
    return attn.max_logit.clone()


@pytest.mark.parametrize("nkv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_qk_clip_caps_over_threshold_heads_only(nkv):
    torch.manual_seed(7)
    cfg = tiny_config(n_head=4, n_kv_head=nkv, bias=True)
    attn = gpt.Attention(cfg, 0).double()
    with torch.no_grad():  # large weights and distinct per-head scales: logits from ~1 to ~100
        attn.wq.weight.mul_(torch.tensor([1.0, 4.0, 0.5, 8.0], dtype=torch.float64).repeat_interleave(
            cfg.head_size)[:, None] * 20)
        attn.wk.weight.mul_(20)
    x = torch.randn(2, 16, cfg.n_embd, dtype=torch.float64)
    before = attention_logits(attn, x)
    tau = float(before.sort().values[1:3].mean())  # two heads above tau, two below
    over = before > tau
    assert over.sum() == 2
    wq, wk = attn.wq.weight.detach().clone(), attn.wk.weight.detach().clone()
    gamma = muon.qk_clip_(attn, before, tau)
    after = attention_logits(attn, x)
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-10, atol=0)
    torch.testing.assert_close(after[~over], before[~over], rtol=1e-12, atol=0)
    torch.testing.assert_close(gamma, torch.where(over, tau / before, torch.ones_like(before)))
    hs = cfg.head_size
    for h in torch.nonzero(~over).flatten().tolist():  # heads under tau: their query rows unchanged
        assert torch.equal(attn.wq.weight[h * hs:(h + 1) * hs], wq[h * hs:(h + 1) * hs])
    if nkv == 4:  # MHA: q and k rows each scaled by sqrt(gamma) (K2)
        g = gamma.sqrt().repeat_interleave(hs)[:, None]
        torch.testing.assert_close(attn.wq.weight, wq * g)
        torch.testing.assert_close(attn.wk.weight, wk * g)
    else:  # shared keys: untouched, each head's queries take the whole gamma
        assert torch.equal(attn.wk.weight, wk)
        torch.testing.assert_close(attn.wq.weight, wq * gamma.repeat_interleave(hs)[:, None])


def test_qk_clip_records_max_over_micro_batches_in_training_only():
    torch.manual_seed(8)
    model = gpt.GPT(tiny_config())
    clip = muon.QKClip(model, tau=math.inf)
    xs = [torch.randint(0, 8192, (2, 32)) for _ in range(3)]
    per_batch = []
    for x in xs[:2]:
        model(x)
        per_batch.append(torch.stack([a.max_logit for a in clip.attns]))
    model.eval()
    model(xs[2])  # evaluation: not recorded, no extra logit work
    assert all(not a.record_max_logit for a in clip.attns)
    model.train()
    S = clip.apply()
    torch.testing.assert_close(S, torch.maximum(*per_batch))
    assert clip.history == [float(S.max())] and clip.running == {}


def test_muonclip_in_the_training_loop(tmp_path, train_tokens):
    """tau far below this model's logits (~0.1 after a few steps): every step clips. K2 measures
    S_max in the forward *before* the update and rescales the updated weights, so the cap is not
    exact afterwards; still the logits stay near tau while the unclipped run's keep growing."""
    cfg, tau = tiny_config(), 0.01
    logits = {}
    for t in (tau, math.inf):
        res = short_run(cfg, tmp_path / str(t), optimizer="muon", max_iters=6, qk_clip_tau=t)
        clip = res["optimizer"].qk_clip
        assert len(clip.history) == 6
        x, _ = gpt.get_batch(train_tokens, torch.arange(8) * 1000, cfg.block_size)
        res["model"].train()
        with torch.no_grad():
            res["model"](x)
        logits[t] = max(float(a.max_logit.max()) for a in clip.attns)
    assert min(clip.history) > 10 * tau  # unclipped: far above tau at every step
    assert logits[tau] < 2 * tau < logits[math.inf] / 5, logits


# -----------------------------------------------------------------------------------------------
# Training: gpt.py's loop, unchanged, with --optimizer=muon


def test_muon_training_lowers_val_loss(tmp_path, val_tokens, tokenizer):
    res = short_run(tiny_config(), tmp_path, optimizer="muon", max_iters=60, warmup_iters=10, lr=6e-3)
    start = res["history"][0]["val_loss"]  # step 0, on the first 4,096 val tokens
    end = val_loss(res["model"], val_tokens, 4096)
    unigram = gpt.unigram_entropy(np.asarray(val_tokens), tokenizer[0].n_vocab)  # 5.87
    assert start > 8.5 and end < start - 2.5 and end < unigram, (start, end)  # ln(8192) = 9.01 at init


def test_resume_with_muon_gives_the_same_parameters(tmp_path):
    cfg = tiny_config()
    kw = dict(optimizer="muon", max_iters=8, grad_accum=2)
    full = short_run(cfg, tmp_path / "a", **kw)
    gpt.train(cfg, dataclasses.replace(tiny_train_config(tmp_path / "b", **kw), max_iters=9, stop_at=4),
              verbose=False)
    resumed = gpt.train(cfg, dataclasses.replace(tiny_train_config(tmp_path / "b", **kw), max_iters=9,
                                                 stop_at=8, resume=True), verbose=False)
    for (name, p), q in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(p, q), name


# -----------------------------------------------------------------------------------------------
# Distributed: each rank orthogonalises its share; 2 processes = 1 process


def test_assign_owners_balances_cost():
    owner = muon.assign_owners([100.0, 60.0, 50.0, 10.0], 2)
    assert owner == [0, 1, 1, 0]
    assert muon.assign_owners([5.0, 5.0], 1) == [0, 0]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    # tau = 0.05 clips every head at every step, so the max must be all-reduced across ranks to agree
    common = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--block_size=64", "--max_iters=7", "--stop_at=6",
              "--warmup_iters=2", "--eval_interval=1000", "--log_interval=3", "--num_threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "muon.py"), "train", "--qk_clip_tau=0.05", *common, "--batch_size=4",
           f"--out_dir={tmp_path / 'ddp'}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 process(es)" in r.stdout
    cfg, tc, _, _ = gpt.parse_args(common + ["--optimizer=muon", "--qk_clip_tau=0.05", "--batch_size=8",
                                             f"--out_dir={tmp_path / 'one'}"])
    single = gpt.train(cfg, tc, verbose=False)
    ddp = gpt.read_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert ddp["optimizer"]["param_groups"][0]["use_muon"]
    for name, p in single["model"].state_dict().items():
        assert torch.allclose(p, ddp["model"][name], atol=1e-5, rtol=1e-4), name
