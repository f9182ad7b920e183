"""Tests for attention_flash.py: FlashAttention-2 (PyTorch path) against float64 naive attention and
SDPA, forward and every gradient, for every option; gradcheck; bf16/fp16; dispatch; training."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import attention_flash as af
import gpt
from conftest import requires_cuda, tiny_config, tiny_train_config


HEADS = {"mha": (4, 4), "gqa2": (4, 2), "gqa4": (8, 2), "mqa": (4, 1)}  # (nh, nkv): ratios 1, 2, 4, MQA


def make_inputs(B, nh, nkv, Tq, hs, Tk=None, sinks=False, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    q = torch.randn(B, nh, Tq, hs, generator=g, dtype=torch.float64)
    k = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    v = torch.randn(B, nkv, Tk, hs, generator=g, dtype=torch.float64)
    s = torch.randn(nh, generator=g, dtype=torch.float64) if sinks else None
    do = torch.randn(B, nh, Tq, hs, generator=g, dtype=torch.float64)
    conv = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return conv(q), conv(k), conv(v), conv(s), conv(do)


def output_and_grads(fn, q, k, v, s, do, **kw):
    """[out, dq, dk, dv(, dsinks)] of fn at fresh leaf copies of the inputs."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sk = None if s is None else s.detach().clone().requires_grad_()
    out = fn(*xs, sinks=sk, **kw)
    grads = torch.autograd.grad(out, xs + ([sk] if sk is not None else []), do)
    return [out, *grads]


def flash(block_q=af.BLOCK_Q, block_k=af.BLOCK_K):
    return lambda *a, **kw: af.flash_attention(*a, **kw, block_q=block_q, block_k=block_k)


def assert_close_all(got, ref, atol, rtol=0.0):
    names = ["out", "dq", "dk", "dv", "dsinks"]
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        err = (a.double() - b.double()).abs()
        bound = atol + rtol * b.double().abs()
        assert (err <= bound).all(), f"{name}: max error {err.max().item():.3e}"


# -----------------------------------------------------------------------------------------------
# Hand-computed cases


def test_zero_queries_average_the_visible_values():
    # q = 0 makes every score 0, so each row is the plain mean of the values it can see; causal:
    # the running mean of v[0..i]. With a sink logit s the denominator gains e^s: sum v / (n + e^s).
    T, hs = 5, 3
    q = torch.zeros(1, 1, T, hs)
    v = torch.arange(T * hs, dtype=torch.float32).view(1, 1, T, hs)
    k = torch.randn(1, 1, T, hs)
    out = af.flash_attention(q, k, v, causal=True, block_q=2, block_k=2)
    n = torch.arange(1, T + 1, dtype=torch.float32)[:, None]
    torch.testing.assert_close(out[0, 0], v[0, 0].cumsum(0) / n)
    s = torch.tensor([math.log(2.0)])  # e^s = 2
    out = af.flash_attention(q, k, v, causal=True, sinks=s, block_q=2, block_k=3)
    torch.testing.assert_close(out[0, 0], v[0, 0].cumsum(0) / (n + 2))


def test_rows_that_see_no_key_give_zeros_not_nan():
    # Tq > Tk, bottom-right aligned: the first Tq - Tk queries sit before every key (causal).
    q, k, v, _, do = make_inputs(1, 2, 1, 6, 4, Tk=3, dtype=torch.float32)
    got = output_and_grads(flash(2, 2), q, k, v, None, do, causal=True)
    assert (got[0][:, :, :3] == 0).all() and torch.isfinite(got[0]).all()
    assert all(torch.isfinite(g).all() for g in got)
    assert (got[1][:, :, :3] == 0).all()  # no gradient reaches queries that attend to nothing


@pytest.mark.parametrize("heads", ["mha", "gqa2"])
def test_inputs_are_not_modified(heads):
    # with rep = nh/nkv = 1 the row layout is a view of q: scaling it in place would corrupt the caller's q
    nh, nkv = HEADS[heads]
    q, k, v, s, do = make_inputs(1, nh, nkv, 9, 4, sinks=True, dtype=torch.float32)
    before = [t.clone() for t in (q, k, v, s, do)]
    output_and_grads(flash(4, 4), q, k, v, s, do, causal=True, soft_cap=3.0)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, s, do)))


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 3), (False, 3), (False, 0)])
def test_block_visibility_agrees_with_the_element_mask(causal, window):
    Tq, Tk = 13, 17
    mask = gpt.attention_mask(Tq, Tk, causal, window)
    mask = torch.ones(Tq, Tk, dtype=torch.bool) if mask is None else mask
    off = Tk - Tq
    for i0, j0, br, bc in itertools.product(range(Tq), range(Tk), (1, 3, 4), (1, 2, 5)):
        i1, j1 = min(i0 + br, Tq), min(j0 + bc, Tk)
        block = mask[i0:i1, j0:j1]
        vis = af.block_visibility(off + i0, off + i1, j0, j1, causal, window)
        assert vis == (af.SKIP if not block.any() else af.FULL if block.all() else af.PARTIAL)
        if vis == af.PARTIAL:
            assert torch.equal(af.block_mask(off + i0, off + i1, j0, j1, causal, window, None), block)


# -----------------------------------------------------------------------------------------------
# Forward and all gradients against float64 naive attention. Inputs in float64: the PyTorch path
# then accumulates in float64 too, so any algorithmic slip (a missed rescale, a wrong mask, a
# skipped block that was visible) shows up far above the 1e-10 tolerance.

@pytest.mark.parametrize("T", [1, 7, 64, 129])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window,sinks,blocks", [(0, False, (16, 16)), (5, True, (32, 24))])
def test_matches_naive_float64(T, causal, heads, window, sinks, blocks):
    nh, nkv = HEADS[heads]
    q, k, v, s, do = make_inputs(2, nh, nkv, T, 8, sinks=sinks, seed=T)
    kw = dict(causal=causal, window=window)
    got = output_and_grads(flash(*blocks), q, k, v, s, do, **kw)
    ref = output_and_grads(gpt.naive_attention, q, k, v, s, do, **kw)
    assert_close_all(got, ref, atol=1e-10)


@pytest.mark.parametrize("T,causal,heads,window,sinks,soft_cap,blocks", [
    (1000, True, "gqa2", 0, True, 0.0, (af.BLOCK_Q, af.BLOCK_K)),  # the default tiles, not dividing T
    (1000, False, "mqa", 100, False, 0.0, (128, 96)),
    (1000, True, "mha", 64, True, 5.0, (100, 300)),
    (200, False, "gqa4", 0, True, 0.0, (7, 50)),
])
def test_matches_naive_long_sequences(T, causal, heads, window, sinks, soft_cap, blocks):
    nh, nkv = HEADS[heads]
    q, k, v, s, do = make_inputs(1, nh, nkv, T, 16, sinks=sinks, seed=1)
    kw = dict(causal=causal, window=window, soft_cap=soft_cap)
    assert_close_all(output_and_grads(flash(*blocks), q, k, v, s, do, **kw),
                     output_and_grads(gpt.naive_attention, q, k, v, s, do, **kw), atol=1e-10)


@pytest.mark.parametrize("Tq,Tk,causal,window", [(1, 40, True, 0), (5, 37, True, 6), (5, 37, False, 6),
                                                  (9, 4, True, 0), (9, 4, False, 2)])
@pytest.mark.parametrize("sinks", [False, True])
def test_queries_are_bottom_right_aligned(Tq, Tk, causal, window, sinks):
    # the KV-cache case (Tq < Tk) and its mirror (Tq > Tk, whose early rows may see nothing)
    q, k, v, s, do = make_inputs(2, 4, 2, Tq, 8, Tk=Tk, sinks=sinks)
    kw = dict(causal=causal, window=window)
    assert_close_all(output_and_grads(flash(4, 8), q, k, v, s, do, **kw),
                     output_and_grads(gpt.naive_attention, q, k, v, s, do, **kw), atol=1e-10)


@pytest.mark.parametrize("soft_cap", [1.0, 20.0])
@pytest.mark.parametrize("sinks", [False, True])
def test_soft_cap_matches_naive(soft_cap, sinks):
    q, k, v, s, do = make_inputs(2, 4, 2, 70, 8, sinks=sinks)
    q = q * 3  # large scores, so the cap really bends them
    kw = dict(causal=True, window=0, soft_cap=soft_cap)
    assert_close_all(output_and_grads(flash(32, 16), q, k, v, s, do, **kw),
                     output_and_grads(gpt.naive_attention, q, k, v, s, do, **kw), atol=1e-10)


@pytest.mark.parametrize("opts", [dict(causal=True, window=3, sinks=True, soft_cap=2.0),
                                  dict(causal=False, window=0, sinks=True, soft_cap=0.0),
                                  dict(causal=True, window=0, sinks=False, soft_cap=0.0)])
def test_gradcheck(opts):
    # finite differences in float64 on a tiny GQA shape with ragged blocks (T=5, tiles 2 x 3)
    q, k, v, s, _ = make_inputs(1, 4, 2, 5, 3, sinks=opts["sinks"])
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([s.requires_grad_()] if s is not None else [])

    def f(q, k, v, *s):
        return af.flash_attention(q, k, v, causal=opts["causal"], window=opts["window"],
                                  sinks=s[0] if s else None, soft_cap=opts["soft_cap"], block_q=2, block_k=3)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


def test_sink_gradient_formula_by_hand():
    # d loss / d s_h = -sum_rows p_sink * rowsum(dO * O): recompute it from the naive probabilities
    q, k, v, s, do = make_inputs(2, 4, 2, 11, 8, sinks=True)
    got = output_and_grads(flash(4, 4), q, k, v, s, do, causal=True)[-1]
    k2 = k.repeat_interleave(2, dim=1)
    scores = (q @ k2.transpose(-2, -1)) / math.sqrt(8)
    scores = scores.masked_fill(~gpt.attention_mask(11, 11, True, 0), -math.inf)
    lse = torch.logsumexp(torch.cat([scores, s.view(1, 4, 1, 1).expand(2, 4, 11, 1)], -1), -1)  # (B, nh, T)
    out = gpt.naive_attention(q, k, v, causal=True, sinks=s)
    want = -(torch.exp(s.view(1, 4, 1) - lse) * (do * out).sum(-1)).sum((0, 2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# -----------------------------------------------------------------------------------------------
# Against torch's fused scaled_dot_product_attention (fp32), where it supports the case


@pytest.mark.parametrize("T,heads,causal,window,sinks", [
    (129, "mha", True, 0, False), (64, "gqa2", False, 0, False), (100, "mqa", True, 9, False),
    (77, "gqa4", True, 0, True)])
def test_matches_sdpa(T, heads, causal, window, sinks):
    nh, nkv = HEADS[heads]
    q, k, v, s, do = make_inputs(2, nh, nkv, T, 16, sinks=sinks, dtype=torch.float32)
    kw = dict(causal=causal, window=window)
    got = output_and_grads(flash(32, 48), q, k, v, s, do, **kw)
    ref = output_and_grads(gpt.sdpa_attention, q, k, v, s, do, **kw)
    if not sinks and not window:  # also straight through F.scaled_dot_product_attention
        raw = lambda q, k, v, sinks, **kw: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=causal, enable_gqa=nh != nkv)
        assert_close_all(ref, output_and_grads(raw, q, k, v, None, do), atol=1e-6)
    assert_close_all(got, ref, atol=2e-5, rtol=1e-4)


# -----------------------------------------------------------------------------------------------
# Low precision: bf16 / fp16 inputs, fp32 accumulation, output in the input dtype.
# The reference is float64 attention of the *same rounded inputs*, so the errors left are the fp32
# accumulation (~1e-6) and the rounding of results to the input format (p = 8 significant bits for
# bf16, 11 for fp16): the output is off by half an ulp, 2^-p relative at most. The gradients see
# more: dO is rounded, and D = rowsum(dO * O) uses the *rounded* output O (as FlashAttention-2 does),
# then dP - D cancels. We allow each tensor 4 * 2^-p of its largest entry; measured: <= 1.5 * 2^-p
# (bf16: out 2.0e-3, grads <= 5.5e-3 vs 2^-8 = 3.9e-3), which is no worse than gpt.naive_attention
# run in bf16 itself (out 6.8e-3, grads <= 1.1e-2).


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_low_precision_inputs(dtype, p):
    q, k, v, s, do = make_inputs(2, 4, 2, 150, 16, sinks=True, dtype=dtype)
    kw = dict(causal=True, window=40)
    got = output_and_grads(flash(64, 32), q, k, v, s.float(), do, **kw)
    assert [t.dtype for t in got] == [dtype] * 4 + [torch.float32]
    ref = output_and_grads(gpt.naive_attention, *(t.double() for t in (q, k, v, s, do)), **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dsinks"], got, ref):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err <= 4 * 2.0 ** -p, f"{name}: max error {err:.2e} of the largest entry"


# -----------------------------------------------------------------------------------------------
# Dispatch and errors


def test_registered_and_announces_its_path_once(capsys):
    assert gpt.ATTENTION["flash"] is af.flash_attention
    af._announced.clear()
    q, k, v, _, _ = make_inputs(1, 2, 1, 4, 4, dtype=torch.float32)
    af.flash_attention(q, k, v)
    af.flash_attention(q, k, v)
    out = capsys.readouterr().out
    assert out.count("attention_flash: PyTorch path") == 1


def test_bad_shapes_raise():
    q, k, v, _, _ = make_inputs(1, 3, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of nkv"):
        af.flash_attention(q, k, v)
    q, k, v, _, _ = make_inputs(1, 4, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="sinks"):
        af.flash_attention(q, k, v, sinks=torch.zeros(3))


@requires_cuda
@pytest.mark.parametrize("sinks", [False, True])
def test_cuda_matches_naive(sinks):
    # whichever path the dispatcher picks on a GPU (the llm_kernels kernel when built), fp32
    q, k, v, s, do = make_inputs(2, 8, 2, 300, 64, sinks=sinks, dtype=torch.float32, device="cuda")
    kw = dict(causal=True, window=100)
    got = output_and_grads(af.flash_attention, q, k, v, s, do, **kw)
    as64 = [t.double() if t is not None else None for t in (q, k, v, s, do)]
    ref = output_and_grads(gpt.naive_attention, *as64, **kw)
    assert_close_all(got, ref, atol=1e-4, rtol=1e-3)


# -----------------------------------------------------------------------------------------------
# Training: a tiny GPT with attn_impl="flash" follows the attn_impl="sdpa" run step for step


def test_training_with_flash_matches_sdpa(tmp_path):
    cfg = dict(sinks=True, window=24)  # exercise the sink gradient and the window in real training
    # 25 steps with val loss on 4,096 tokens at steps 0 and 24; stop_at < max_iters skips the final
    # evaluation over the whole val split (slow, and not what this test is about).
    tc = dict(max_iters=26, stop_at=25, log_interval=1, eval_interval=24, eval_tokens=4096, warmup_iters=5,
              lr=3e-3)
    runs = {}
    for impl in ("sdpa", "flash"):
        runs[impl] = gpt.train(tiny_config(attn_impl=impl, **cfg), tiny_train_config(tmp_path / impl, **tc),
                               verbose=False)
    losses = {impl: [h["train_loss"] for h in r["history"] if "train_loss" in h] for impl, r in runs.items()}
    vals = {impl: [h["val_loss"] for h in r["history"] if "val_loss" in h] for impl, r in runs.items()}
    assert len(losses["flash"]) == 25 and len(vals["flash"]) == 2
    # Same seed, same batches: the two runs differ only by fp32 rounding in attention, which AdamW
    # amplifies slowly; 25 steps stay within 2e-3 nats/token of each other.
    diffs = [abs(a - b) for a, b in zip(losses["flash"], losses["sdpa"])]
    assert max(diffs) < 2e-3, diffs
    assert abs(vals["flash"][-1] - vals["sdpa"][-1]) < 2e-3
    assert vals["flash"][-1] < vals["flash"][0] - 0.5, vals  # it learns: from ~ln(8192) = 9.0
