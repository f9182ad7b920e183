"""Tests for moe.py: routing, dispatch against a per-token loop, balancing losses and biases, zero
experts, capacity dropping, dense layers, and a short TinyStories run."""

import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt
import moe
from conftest import tiny_config, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


def layer_config(**kw) -> moe.MoEConfig:
    base = dataclasses.asdict(tiny_config())
    base.update(dict(mlp="moe", n_experts=6, top_k=2, expert_hidden=8, n_shared=1))
    base.update(kw)
    return moe.MoEConfig(**base)


def make_layer(seed: int = 0, dtype=torch.float64, **kw) -> moe.MoE:
    torch.manual_seed(seed)
    layer = moe.MoE(layer_config(**kw)).to(dtype)
    with torch.no_grad():  # larger router weights than the 0.02 init, so scores are well separated
        layer.router.weight.normal_(0.0, 0.5)
        layer.bias.normal_(0.0, 0.05)
    return layer


# -----------------------------------------------------------------------------------------------
# The independent reference: every token on its own, in plain Python loops, float64.


def reference_moe(layer: moe.MoE, x: torch.Tensor, drop: set = frozenset()) -> torch.Tensor:
    """A per-token loop with the paper formulas written out: score, pick the K largest biased
    scores, weight by the unbiased scores normalised over the picks, sum the experts' SwiGLUs (a zero
    expert returns x), add the shared experts. `drop` holds (token, slot) pairs to leave out."""
    cfg = layer.cfg
    E, K = cfg.n_experts, cfg.top_k
    xf = x.reshape(-1, x.shape[-1])
    ex, sh = layer.experts, layer.shared
    rows = []
    for n in range(xf.shape[0]):
        xn = xf[n]
        logit = layer.router.weight.to(xn.dtype) @ xn
        s = torch.softmax(logit, 0) if cfg.score == "softmax" else torch.sigmoid(logit)
        order = sorted(range(len(s)), key=lambda i: -float(s[i].detach() + layer.bias[i]))[:K]
        order = sorted(order)  # which slot is which does not matter; token order does for capacity
        total = sum(s[i] for i in order) if cfg.norm_topk else 1.0
        y = torch.zeros_like(xn)
        for slot, i in enumerate(order):
            if (n, i) in drop:
                continue
            g = s[i] / total * cfg.routed_scaling
            if i >= E:
                y = y + g * xn  # LongCat zero-computation expert: E(x) = x
            else:
                y = y + g * (ex.w2[i] @ (F.silu(ex.w1[i] @ xn) * (ex.w3[i] @ xn)))
        if sh is not None:
            for j in range(sh.w1.shape[0]):
                y = y + sh.w2[j] @ (F.silu(sh.w1[j] @ xn) * (sh.w3[j] @ xn))
        rows.append(y)
    return torch.stack(rows).view_as(x)


def grads(layer: moe.MoE, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    params = [x, layer.router.weight, layer.experts.w1, layer.experts.w2, layer.experts.w3]
    return torch.autograd.grad((y * r).sum(), params)


# -----------------------------------------------------------------------------------------------
# Dispatch == per-token reference (outputs and gradients)


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
@pytest.mark.parametrize("variant", [
    dict(score="sigmoid"),
    dict(score="softmax", n_shared=0),
    dict(score="sigmoid", n_zero_experts=3, top_k=3, routed_scaling=2.5),
    dict(score="softmax", top_k=1, norm_topk=False, n_shared=2),
])
def test_dispatch_matches_per_token_reference(dispatch, variant):
    # float64 for the loop (exact up to summation order); grouped_mm runs in float32 only, so it is
    # compared to the float64 reference with a float32 tolerance (~1e-7 relative per op, C = 64 sums)
    dtype = torch.float64 if dispatch == "loop" else torch.float32
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    ref_layer = make_layer(dispatch="loop", **variant)
    layer = copy.deepcopy(ref_layer).to(dtype)
    layer.cfg = dataclasses.replace(ref_layer.cfg, dispatch=dispatch)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    r = torch.randn(2, 5, 64, dtype=torch.float64)
    xa = x.to(dtype).requires_grad_()
    xr = x.clone().requires_grad_()
    y = layer(xa)
    y_ref = reference_moe(ref_layer, xr)
    assert torch.allclose(y.double(), y_ref, atol=atol, rtol=atol)
    for g, g_ref in zip(grads(layer, xa, y, r.to(dtype)), grads(ref_layer, xr, y_ref, r)):
        assert torch.allclose(g.double(), g_ref, atol=atol * 10, rtol=atol * 10)


def test_loop_and_grouped_mm_agree_in_float32():
    x = torch.randn(4, 16, 64)
    ys = [make_layer(dtype=torch.float32, dispatch=d, n_experts=8)(x) for d in ("loop", "grouped_mm")]
    assert torch.allclose(*ys, atol=1e-6)


# -----------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_topk_weights_are_normalised(score, scaling):
    logits = torch.randn(50, 10, dtype=torch.float64)
    w, idx, s = moe.route(logits, torch.zeros(10), 3, score, True, scaling)
    assert torch.allclose(w.sum(-1), torch.full((50,), scaling, dtype=torch.float64))
    assert (w > 0).all() and idx.shape == (50, 3)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts per token


def test_route_hand_computed():
    # sigmoid scores of logits [0, ln 3, -ln 3] are [1/2, 3/4, 1/4]; top-2 picks experts 0 and 1 with
    # weights 1/2 / (5/4) = 0.4 and 3/4 / (5/4) = 0.6. A bias of +0.6 on expert 2 makes it win over
    # expert 0 (1/4 + 0.6 > 1/2), and its weight is then its *unbiased* 1/4 / (1/4 + 3/4) = 0.25.
    logits = torch.tensor([[0.0, math.log(3), -math.log(3)]], dtype=torch.float64)
    w, idx, _ = moe.route(logits, torch.zeros(3, dtype=torch.float64), 2, "sigmoid")
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got == pytest.approx({0: 0.4, 1: 0.6})
    w, idx, _ = moe.route(logits, torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64), 2, "sigmoid")
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got == pytest.approx({1: 0.75, 2: 0.25})


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_selection_but_never_weights(score):
    torch.manual_seed(0)
    logits = torch.randn(200, 8, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    w0, idx0, s0 = moe.route(logits, torch.zeros(8, dtype=torch.float64), 2, score)
    w1, idx1, s1 = moe.route(logits, bias, 2, score)
    assert (idx0.sort(-1).values != idx1.sort(-1).values).any(-1).float().mean() > 0.3  # selection moved
    assert torch.equal(s0, s1)  # scores do not see the bias
    picked = s0.gather(1, idx1)
    assert torch.allclose(w1, picked / picked.sum(-1, keepdim=True))  # weights: unbiased scores
    # a token whose choice the bias did not change keeps exactly the same weights
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    assert torch.allclose(w0.sort(-1).values[same], w1.sort(-1).values[same])


# -----------------------------------------------------------------------------------------------
# Balancing: losses and bias updates


def test_switch_aux_loss_formula():
    # uniform routing gives exactly 1 (so alpha * 1 is the floor); a hand case: f = [3/4, 1/4],
    # P = [0.6, 0.4] -> 2 * (0.45 + 0.1) = 1.1
    E = 4
    assert moe.switch_aux_loss(torch.full((E,), 5), torch.full((10, E), 1 / E)) == pytest.approx(1.0)
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]], requires_grad=True)
    loss = moe.switch_aux_loss(torch.tensor([3, 1]), probs)
    assert float(loss.detach()) == pytest.approx(1.1)
    (g,) = torch.autograd.grad(loss, probs)  # d/dP_i = E * f_i / N: pushes down the busy expert
    assert torch.allclose(g, torch.tensor([[0.75, 0.25], [0.75, 0.25]]))


def test_sequence_aux_loss_formula():
    # one sequence, T=2, E=2, K=1: both tokens pick expert 0 -> f = [2, 0]; P = [0.7, 0.3] -> 1.4
    onehot = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]])
    assert float(moe.sequence_aux_loss(onehot, probs, 1)) == pytest.approx(1.4)
    uniform = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(moe.sequence_aux_loss(uniform, torch.full((1, 2, 2), 0.5), 1)) == pytest.approx(1.0)


def test_router_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert float(moe.router_z_loss(logits)) == pytest.approx(expected)


def test_aux_free_update_hand_case():
    # mean load 2: the busy expert 0 goes down by gamma, the idle expert 1 up, expert 2 (at the mean) stays
    b = moe.aux_free_update(torch.zeros(3), torch.tensor([3.0, 1.0, 2.0]), 0.01)
    assert torch.allclose(b, torch.tensor([-0.01, 0.01, 0.0]))


def skewed_layer(**kw) -> moe.MoE:
    layer = make_layer(dtype=torch.float32, n_experts=8, top_k=2, **kw)
    with torch.no_grad():
        layer.bias.zero_()
        layer.router.weight.normal_(0.0, 0.1)
        layer.router.weight[0] += 0.05  # experts 0 and 1 score higher for the typical token
        layer.router.weight[1] += 0.03
    return layer.train()


def load_max_mean(counts: torch.Tensor) -> float:
    return float(counts.max() / counts.mean())


@pytest.mark.parametrize("balance", ["none", "aux_free"])
def test_bias_update_moves_load_toward_uniform(balance):
    layer = skewed_layer(balance=balance, bias_gamma=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):  # a fresh batch each "step", mean-shifted so the router's skew hits all tokens
        layer(torch.randn(8, 32, 64, generator=gen) + 1.0)
        layer.after_optimizer_step()
    log = torch.stack(layer.load_log)  # (steps, E): assignments per expert per step
    assert log.shape == (150, 8) and (log.sum(1) == 8 * 32 * 2).all()
    first, last = load_max_mean(log[:5].sum(0)), load_max_mean(log[-50:].sum(0))
    assert first > 3.0  # experts 0 and 1 take almost every token
    if balance == "none":
        assert last > 3.0 and (layer.bias == 0).all()  # nothing changes without balancing
    else:
        # per step the max/mean also carries sampling noise (64 assignments per expert); summed
        # over the last 50 steps the load is uniform within a few percent
        assert last < 1.1
        assert layer.bias[0] < 0 and layer.bias[1] < 0  # the busy experts' biases went down


def test_step_counts_only_from_training_batches():
    layer = skewed_layer()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    assert layer.step_tokens == 0
    layer.train()
    layer(x)
    assert layer.step_tokens == 16 and float(layer.step_counts.sum()) == 16 * 2
    layer.after_optimizer_step()
    assert layer.step_tokens == 0 and float(layer.step_counts.sum()) == 0


def test_aux_loss_is_added_to_the_gpt_loss():
    cfg = moe.MoEConfig(**{**dataclasses.asdict(tiny_config()), "mlp": "moe", "balance": "aux",
                           "aux_alpha": 0.5, "router_z_loss": 1e-3})
    torch.manual_seed(0)
    model = gpt.GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    logits, loss = model(x, x)
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), x.view(-1))
    aux = sum(m.aux_loss for m in moe.moe_layers(model))
    assert float(aux.detach()) > 0.5 * cfg.n_layer * 0.99  # the Switch loss is >= 1 per layer, times alpha
    assert torch.allclose(loss, ce + aux)


# -----------------------------------------------------------------------------------------------
# Zero-computation experts (LongCat-Flash)


def test_zero_experts_are_exactly_identity_and_cost_nothing():
    layer = make_layer(n_zero_experts=2, top_k=2, n_shared=0, routed_scaling=1.0)
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        layer.bias[:6] = -10.0  # every token picks the two zero experts
    y = layer(x)
    w, idx, _ = moe.route(layer.router(x.view(14, 64)), layer.bias, 2)
    assert (idx >= 6).all()
    assert torch.equal(y.view(14, 64), w.sum(-1, keepdim=True) * x.view(14, 64))  # gate * x, nothing else
    assert torch.allclose(y, x, atol=1e-15)  # and the normalised gates sum to 1: the input comes back
    flops_zero = layer.stats["flops_per_token"]
    assert layer.stats["real_hist"].tolist() == [14, 0, 0]
    with torch.no_grad():
        layer.bias[:6] = 10.0  # now only real experts
    layer(x)
    assert layer.stats["real_hist"].tolist() == [0, 0, 14]
    h, C = 8, 64
    assert layer.stats["flops_per_token"] - flops_zero == 2 * 6 * C * h  # two real SwiGLUs per token


def test_budget_controller_steers_real_experts_per_token():
    layer = make_layer(dtype=torch.float32, n_experts=6, n_zero_experts=4, top_k=4, n_shared=0,
                       target_real_experts=2.5, budget_mu=0.5).train()
    x = torch.randn(8, 32, 64)
    for _ in range(200):
        layer(x)
        layer.after_optimizer_step()
    real = layer.stats["real_per_token"].float()
    assert abs(real.mean() - 2.5) < 0.1
    assert real.min() < real.max()  # the number varies from token to token (adaptive compute)


def test_budget_update_formula():
    # K=2, E=2, K_e=1: each real expert aims at 1/4 of the 2*10 assignments = 5 tokens
    b = moe.budget_update(torch.zeros(2), torch.tensor([9.0, 1.0]), n_tokens=10, k=2, k_e=1.0, mu=1.0)
    assert torch.allclose(b, torch.tensor([0.25 - 0.45, 0.25 - 0.05]))


# -----------------------------------------------------------------------------------------------
# Capacity and token dropping (Switch)


def test_sort_by_expert_capacity_hand_case():
    # 4 tokens, K=1, E=2 (+ zero expert 2): expert 0 gets tokens 0, 1, 3; expert 1 token 2
    idx = torch.tensor([[0], [0], [1], [0], [2]])
    d = moe.sort_by_expert(idx, 2, capacity=2)
    assert d["token"].tolist() == [0, 1, 2]  # token 3 is expert 0's third: dropped; the zero expert left out
    assert d["counts"].tolist() == [2, 1] and d["dropped"] == 1
    d = moe.sort_by_expert(idx, 2, capacity=0)
    assert d["token"].tolist() == [0, 1, 3, 2] and d["dropped"] == 0


@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_capacity_drops_and_counts(cf):
    layer = make_layer(capacity_factor=cf, n_experts=4, top_k=2)
    x = torch.randn(1, 12, 64, dtype=torch.float64)
    y = layer(x)
    N, K, E = 12, 2, 4
    cap = math.ceil(cf * N * K / E)
    # which pairs overflow, computed independently: walk tokens in order, count per expert
    _, idx, _ = moe.route(layer.router(x.view(N, -1)), layer.bias, K)
    seen, drop = [0] * E, set()
    for n in range(N):
        for i in sorted(idx[n].tolist()):
            seen[i] += 1
            if seen[i] > cap:
                drop.add((n, i))
    assert layer.stats["dropped"] == len(drop)
    assert sum(max(0, c - cap) for c in seen) == len(drop)
    if cf == 0.5:
        assert len(drop) > 0
    assert torch.allclose(y, reference_moe(layer, x, drop), atol=1e-12)


# -----------------------------------------------------------------------------------------------
# The model: dense layers, parameter counts, errors, checkpoints, training


def test_first_layers_dense_and_active_params():
    kw = {**dataclasses.asdict(tiny_config(n_layer=3)), "mlp": "moe"}
    model = gpt.GPT(moe.MoEConfig(**kw, n_dense_layers=1))
    kinds = [type(b.feed_forward).__name__ for b in model.layers]
    assert kinds == ["SwiGLU", "MoE", "MoE"]
    assert [m.layer for m in moe.moe_layers(model)] == [1, 2]
    # equal active parameters: shared + top-K experts of width hidden/(1+K) = the dense SwiGLU, plus
    # the router (E x C per MoE layer)
    cfg = moe.MoEConfig(**kw)
    dense = gpt.GPT(tiny_config(n_layer=3))
    assert cfg.expert_hidden * (cfg.n_shared + cfg.top_k) == dense.cfg.hidden_size
    assert moe.active_params(gpt.GPT(cfg)) == dense.num_params() + 3 * cfg.n_experts * cfg.n_embd


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(score="relu"), dict(balance="loss"),
                                 dict(dispatch="magic"), dict(target_real_experts=2.0),
                                 dict(n_dense_layers=5), dict(capacity_factor=-1.0)])
def test_config_errors(bad):
    with pytest.raises(ValueError, match="MoEConfig"):
        layer_config(**bad)


@pytest.mark.slow
def test_short_tinystories_run_lowers_val_loss(tmp_path):
    kw = {**dataclasses.asdict(tiny_config()), "mlp": "moe", "n_experts": 8, "top_k": 2}
    cfg = moe.MoEConfig(**kw, bias_gamma=1e-2)
    tc = tiny_train_config(tmp_path, max_iters=40, eval_interval=20, eval_tokens=4096)
    result = gpt.train(cfg, tc, verbose=False)
    vals = [h["val_loss"] for h in result["history"] if "val_loss" in h]
    assert vals[-1] < vals[0] - 1.0  # from ~ln(8192) = 9.0 down by a lot in 40 steps
    layers = moe.moe_layers(result["model"])
    assert all(len(m.load_log) == 40 for m in layers)
    assert all(m.bias.abs().sum() > 0 for m in layers)  # aux-free biases moved
    # the checkpoint round-trips through gpt.load_model: its config names mlp=moe, so the MoEConfig
    model, _, _ = gpt.load_model(tmp_path / "ckpt.pt")
    assert isinstance(model.cfg, moe.MoEConfig)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    result["model"].eval()
    assert torch.equal(model(x)[0], result["model"](x)[0])


def test_backward_is_bit_reproducible():
    # The gather of each pair's token must be index_select (backward: index_add_, a fixed order), not
    # xf[token] (backward: index_put_ with accumulate, whose CPU threads add in a varying order).
    torch.manual_seed(0)
    kw = {**dataclasses.asdict(tiny_config(n_embd=128, block_size=128)), "mlp": "moe"}
    model = gpt.GPT(moe.MoEConfig(**kw, n_experts=16, top_k=3))
    x = torch.randint(0, model.cfg.vocab_size, (8, 128))

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, x)[1].backward()
        return [p.grad.clone() for p in model.parameters()]

    first = grads()
    for _ in range(3):
        for (name, _), a, b in zip(model.named_parameters(), first, grads()):
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    # each rank routes its own 2 windows; the aux-free bias update all-reduces the loads, so the
    # biases (buffers) and the weights must match one process on the same 4-window global batch
    common = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--block_size=64", "--max_iters=6",
              "--warmup_iters=2", "--eval_interval=1000", "--log_interval=3", "--num_threads=1",
              "--n_experts=8", "--top_k=2", "--bias_gamma=0.01"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "moe.py"), "train", *common, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 process(es)" in r.stdout
    argv = common + ["--batch_size=4", f"--out_dir={tmp_path / 'one'}"]
    cfg, tc, _, _ = gpt.parse_args(argv + ["--mlp=moe"])
    single = gpt.train(cfg, tc, verbose=False)
    ddp = gpt.read_checkpoint(tmp_path / "ddp" / "ckpt.pt")["model"]
    biases = [k for k in ddp if k.endswith("feed_forward.bias")]
    assert len(biases) == 2 and all(ddp[k].abs().sum() > 0 for k in biases)
    for name, p in single["model"].state_dict().items():
        assert torch.allclose(p, ddp[name], atol=1e-5, rtol=1e-4), name


def test_train_cli_rejects_bad_flags():
    r = subprocess.run([sys.executable, str(ROOT / "moe.py"), "train", "--n_expert=4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "did you mean --n_experts" in r.stderr
