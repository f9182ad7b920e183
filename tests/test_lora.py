"""Tests for lora.py: LoRA is exactly the base model at init, trains only A and B, merges to within fp64
rounding and unmerges bit for bit, saves/loads and swaps adapters; QLoRA's base is quant.py's NF4 and
stays frozen; the SFT loss ignores the prompt; the verifier on hand-written answers; bad input; and a
short real SFT run that lowers the held-out answer loss."""

import copy

import pytest
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import lora
import quant
from conftest import tiny_config, tiny_train_config


def tiny_model(dtype=torch.float32, **kw) -> gpt.GPT:
    torch.manual_seed(0)
    return gpt.GPT(tiny_config(**kw)).to(dtype).eval()


def tokens(B=2, T=16, V=8192, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, name: str = "default", seed: int = 2) -> None:
    """Give every B (zeros at init) random values, so the adapter changes the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            B = layer.lora_B[name]
            B.copy_(0.02 * torch.randn(B.shape, generator=g, dtype=torch.float64).to(B.dtype))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


# -----------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("targets", ["all", "attn", "q,v", "mlp"])
def test_lora_at_init_is_exactly_the_base_model(targets):
    base = tiny_model()
    model = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, targets=targets))
    x = tokens()
    assert torch.equal(logits(model, x), logits(base, x))  # B = 0: B A x adds exact zeros
    model.train()  # adapter dropout on: still exact, B A = 0 whatever its input
    torch.manual_seed(3)
    assert torch.equal(model(x)[0].detach(), logits(base, x))


def test_targets_choose_the_wrapped_layers():
    model = lora.add_lora(tiny_model(), lora.LoRAConfig(r=2, targets="q,v,down"))
    paths = sorted(layer.path for layer in lora.lora_layers(model))
    assert paths == sorted(f"layers.{i}.{p}" for i in range(2)
                           for p in ("attention.wq", "attention.wv", "feed_forward.w2"))
    layer = model.layers[0].attention.wq
    assert layer.lora_A["default"].shape == (2, 64) and layer.lora_B["default"].shape == (64, 2)
    # parameter count r (N + K) per layer: wq 64x64, wv 32x64 (GQA: 2 kv heads), w2 64x192
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * 2 * ((64 + 64) + (32 + 64) + (64 + 192))


def test_gradients_reach_only_A_and_B():
    model = lora.add_lora(tiny_model(), lora.LoRAConfig(r=4, dropout=0.0))
    lora_params = {id(p) for p in lora.adapter_parameters(model)}
    x = tokens()
    model.train()
    model(x, tokens(seed=5))[1].backward()
    for name, p in model.named_parameters():
        if id(p) in lora_params:
            assert p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    layer = model.layers[0].attention.wq
    assert layer.lora_B["default"].grad.abs().sum() > 0  # dL/dB = g (A x)^T: A is random
    assert layer.lora_A["default"].grad.abs().sum() == 0  # dL/dA = B^T g x^T = 0 while B = 0
    randomize_adapters(model)
    model.zero_grad()
    model(x, tokens(seed=5))[1].backward()
    assert layer.lora_A["default"].grad.abs().sum() > 0


def test_lora_forward_equals_the_formula():
    """One LoRALinear against y = W x + (alpha / r) B A x in float64, written out by hand."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=True).double()
    layer = lora.LoRALinear(lin, "w")
    layer.add_adapter("a", lora.LoRAConfig(r=3, alpha=6.0, dropout=0.0))
    layer.active = "a"
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    A, B = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    ref = x @ lin.weight.detach().T + lin.bias.detach() + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x).detach(), ref, rtol=0, atol=1e-13)


def test_merge_equals_adapter_forward_and_unmerge_restores_bits():
    model = lora.add_lora(tiny_model(torch.float64), lora.LoRAConfig(r=4, alpha=8.0))
    randomize_adapters(model)
    x = tokens()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter_out = logits(model, x)
    lora.merge(model)
    merged_out = logits(model, x)
    w = model.layers[0].attention.wq
    assert not torch.equal(w.base.weight, before["layers.0.attention.wq.base.weight"])  # B A is in W now
    torch.testing.assert_close(merged_out, adapter_out, rtol=0, atol=1e-10)
    lora.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit for bit, not W + BA - BA
    assert torch.equal(logits(model, x), adapter_out)


def test_save_load_round_trip(tmp_path):
    base = tiny_model()
    model = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, alpha=4.0, targets="attn"))
    randomize_adapters(model)
    n = lora.save_adapter(model, tmp_path / "a.pt")
    assert n == (tmp_path / "a.pt").stat().st_size
    loaded = lora.load_adapter(copy.deepcopy(base), tmp_path / "a.pt")
    x = tokens()
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert [la.path for la in lora.lora_layers(loaded)] == [la.path for la in lora.lora_layers(model)]
    assert lora.lora_layers(loaded)[0].configs["default"] == lora.LoRAConfig(r=4, alpha=4.0, targets="attn")
    # the file holds the adapter only: r (N + K) fp32 numbers for q, k, v, o of 2 layers (~14 KB) plus
    # torch.save's zip framing, not the 0.6M base weights (2.4 MB)
    assert n < 4 * 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)) + 10_000


def test_swapping_adapters_gives_each_adapters_outputs(tmp_path):
    base = tiny_model()
    x = tokens()
    singles = {}
    for name, seed, targets in (("a", 2, "all"), ("b", 7, "q,v")):
        m = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig(r=4, targets=targets), name)
        randomize_adapters(m, name, seed)
        lora.save_adapter(m, tmp_path / f"{name}.pt", name)
        singles[name] = logits(m, x)
    assert not torch.equal(singles["a"], singles["b"])
    model = copy.deepcopy(base)
    lora.load_adapter(model, tmp_path / "a.pt", "a")
    lora.load_adapter(model, tmp_path / "b.pt", "b")  # two adapters on one base, b active
    adapters = {id(p) for p in lora.adapter_parameters(model)}
    weights = [p for p in model.parameters() if id(p) not in adapters]
    ids = [p.data_ptr() for p in weights]
    assert torch.equal(logits(model, x), singles["b"])
    assert torch.equal(logits(lora.set_adapter(model, "a"), x), singles["a"])
    assert torch.equal(logits(lora.set_adapter(model, "b"), x), singles["b"])
    assert torch.equal(logits(lora.set_adapter(model, None), x), logits(base, x))
    assert [p.data_ptr() for p in weights] == ids  # the base was never copied or reloaded
    lora.set_adapter(model, "a")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.adapter_parameters(model, "a")}
    assert len(lora.adapter_parameters(model)) == 2 * (2 * 7 + 2 * 2)  # a: 7 layers x 2, b: q, v


def test_checkpointing_gives_the_same_gradients():
    base = lora.add_lora(tiny_model(), lora.LoRAConfig(r=4, dropout=0.0))
    randomize_adapters(base)
    ck = lora.checkpoint_blocks(copy.deepcopy(base))
    assert isinstance(ck.layers[0], lora.CheckpointedBlock)
    assert [la.path for la in lora.lora_layers(ck)] == [la.path for la in lora.lora_layers(base)]
    x, y = tokens(), tokens(seed=4)
    grads = []
    for m in (base, ck):
        m.train()
        m(x, y)[1].backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    opt = torch.optim.AdamW([p for p in ck.parameters() if p.requires_grad])
    full, saved = lora.training_memory(base, opt, x, y), lora.training_memory(ck, opt, x, y)
    assert saved["activations"] < full["activations"]


# -----------------------------------------------------------------------------------------------
# QLoRA


def test_nf4_base_equals_quant_nf4_and_its_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    q = lora.NF4Linear(lin)
    ref_w = quant.dequantize_nf4(quant.quantize_nf4(lin.weight.detach()), (40, 96))
    assert torch.equal(q.dequantize(), ref_w)
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == quant.layout_bits("nf4", 40, 96) // 8
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = q(x)
    x64 = x.detach().double().requires_grad_(True)
    y64 = F.linear(x64, ref_w.double())  # float64 reference, autograd through F.linear
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_nf4_matmul_saves_no_weight_for_backward():
    q = lora.NF4Linear(nn.Linear(64, 64, bias=False))
    shapes = []
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        q(x).sum().backward()
    assert (64, 64) not in shapes


def test_qlora_step_changes_only_adapters():
    base = tiny_model()
    model = lora.prepare(base, lora.parse_method("qlora4"), seed=0)
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())  # every block linear is NF4
    frozen = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if "lora_" not in n}
    adapters = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    opt = gpt.make_adamw(model, tiny_train_config("unused"))
    model.train()
    model(tokens(), tokens(seed=4))[1].backward()
    opt.step()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    sizes = lora.base_weight_bytes(model)
    fp32 = lora.base_weight_bytes(base)
    assert sizes["linears"] < 0.14 * fp32["linears"]  # 4.127 of 32 bits per weight


def test_qlora_forward_matches_dequantized_float_model():
    base = tiny_model()
    q = lora.prepare(base, lora.parse_method("qlora4"), seed=0)
    randomize_adapters(q)
    ref = copy.deepcopy(base)  # the same model, its linears replaced by their NF4 round trip in float
    with torch.no_grad():
        for m in list(ref.layers.modules()):
            if isinstance(m, nn.Linear):
                m.weight.copy_(quant.dequantize_nf4(quant.quantize_nf4(m.weight), tuple(m.weight.shape)))
    lora.add_lora(ref, lora.LoRAConfig(r=4))
    with torch.no_grad():
        for lq, lr in zip(lora.lora_layers(q), lora.lora_layers(ref)):
            lr.lora_A["default"].copy_(lq.lora_A["default"])
            lr.lora_B["default"].copy_(lq.lora_B["default"])
    x = tokens()
    torch.testing.assert_close(logits(q, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NF4"):
        lora.merge(q)


# -----------------------------------------------------------------------------------------------
# The task: data, loss masking, verifier


@pytest.fixture(scope="module")
def tasks():
    return lora.load_instructions("train", 200, seed=0)


def test_instructions_use_words_of_their_story(tasks):
    vocab = lora.train_vocabulary()
    assert vocab <= lora.NOUNS and len(vocab) >= 50
    for t in tasks:
        assert len(set(t.words)) == lora.N_WORDS
        assert all(w in vocab for w in t.words)
        opening = " ".join(t.story.split()[:lora.OPENING])
        assert all(lora.uses_word(opening, w) for w in t.words)  # the words are in the opening
        assert t.prompt == f"Words: {t.words[0]}, {t.words[1]}, {t.words[2]}\nStory:"
    assert lora.load_instructions("train", 200, seed=0) == tasks  # deterministic
    assert lora.load_instructions("train", 200, seed=1) != tasks
    held = lora.load_instructions("valid", 50)
    train_stories = set(lora.read_stories("train"))
    assert not any(t.story in train_stories for t in held)


def test_masked_batch_targets_only_the_answer(tokenizer, tasks):
    enc = tokenizer[0]
    ids, P = lora.encode_example(enc, tasks[0], 256)
    assert ids[0] == enc.eot_token and ids[-1] == enc.eot_token
    assert enc.decode(ids[1:P]) == tasks[0].prompt
    x, y = lora.masked_example(ids, P)
    assert torch.equal(x, torch.tensor(ids[:-1]))
    assert (y[:P - 1] == -1).all() and torch.equal(y[P - 1:], torch.tensor(ids[P:]))
    examples = [lora.encode_example(enc, t, 256) for t in tasks[:20]]
    batches = lora.sft_batches([e for e in examples if e], enc.eot_token)
    xs, ys = batches(torch.Generator().manual_seed(0), 4, 2, 1, 0)  # micro 4, accum 2
    assert xs.shape == ys.shape and xs.shape[:2] == (2, 4)
    assert ((ys == -1) | (ys == torch.roll(xs, -1, dims=-1))).all()  # targets are next tokens or ignored


def test_prompt_tokens_contribute_nothing_to_the_loss(tokenizer, tasks):
    enc = tokenizer[0]
    model = tiny_model(block_size=256)
    ex = [lora.encode_example(enc, t, 256) for t in tasks[:3]]
    ex = [e for e in ex if e]
    xs, ys = lora.sft_batches(ex, enc.eot_token)(torch.Generator().manual_seed(0), len(ex), 1, 1, 0)
    x, y = xs[0], ys[0]
    with torch.no_grad():
        logits, loss = model(x, y)
    # float64 reference: mean NLL over the answer positions only
    logp = torch.log_softmax(logits.double(), -1)
    keep = y >= 0
    ref = -logp[keep].gather(-1, y[keep][:, None]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # scramble the logits at every prompt (and padding) position: the loss does not move
    noise = torch.zeros_like(logits)
    noise[~keep] = 100 * torch.randn(int((~keep).sum()), logits.shape[-1])
    handle = model.output.register_forward_hook(lambda m, i, out: out + noise)
    with torch.no_grad():
        _, loss2 = model(x, y)
    handle.remove()
    assert torch.equal(loss2, loss)


def answer_loss(model, examples) -> float:
    """Mean next-token loss over the answer tokens of equal-length (ids, P) examples."""
    pairs = [lora.masked_example(ids, P) for ids, P in examples]
    x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    with torch.no_grad():
        return model.eval()(x, y)[1].item()


def test_short_sft_run_lowers_the_heldout_answer_loss(tokenizer, tmp_path):
    """A real fine-tuning run through gpt.train on sft_batches (examples cut to their first 64 tokens):
    the loss on the answers of held-out (valid split) instructions goes down."""
    enc, T = tokenizer[0], 64

    def examples(split, n, seed):
        out = [lora.encode_example(enc, t, 10 ** 6) for t in lora.load_instructions(split, n, seed=seed)]
        return [(ids[:T + 1], P) for ids, P in out]

    train, held = examples("train", 300, 0), examples("valid", 32, 1)
    model = lora.prepare(tiny_model(block_size=T), lora.parse_method("full"))
    before = answer_loss(model, held)
    tc = tiny_train_config(tmp_path, max_iters=16, stop_at=15, batch_size=16, lr=3e-3, weight_decay=0.0)
    res = gpt.train(model.cfg, tc, verbose=False, model=model, batches=lora.sft_batches(train, enc.eot_token))
    after = answer_loss(res["model"], held)
    assert after < before - 1.0, (before, after)


def with_im_end(enc) -> tiktoken.Encoding:
    """The toy tokenizer plus ChatML's <|im_end|> (id 8192), the way SmolLM2's tokenizer ends a turn."""
    return tiktoken.Encoding(name=enc.name + "+im_end", pat_str=enc._pat_str,
                             mergeable_ranks=enc._mergeable_ranks,
                             special_tokens={**enc._special_tokens, "<|im_end|>": enc.n_vocab})


def test_answers_end_at_an_end_of_turn_token(tokenizer):
    """An instruct model closes an answer with <|im_end|>, never <|endoftext|>: with a tokenizer that has
    <|im_end|>, the answer ends there, finished (without the cut it would run on to the length cap)."""
    enc0 = tokenizer[0]
    enc = with_im_end(enc0)
    model = tiny_model(vocab_size=enc.n_vocab)
    word = enc.encode_ordinary(" ball")
    steps = []

    def force(module, inputs, out):  # the first new token is " ball", every later one <|im_end|>
        steps.append(out.shape[1])
        want = word[0] if len(steps) == 1 else enc.n_vocab - 1
        forced = torch.full_like(out, -1e4)
        forced[..., want] = 0.0
        return forced

    model.output.register_forward_hook(force)
    prompt = [lora.encode_prompt(enc, "Words: ball\nStory:")]
    assert lora.end_of_turn_ids(enc) == {enc.n_vocab - 1} and lora.end_of_turn_ids(enc0) == set()
    assert lora.sample_answers(model, enc, prompt, 6, 1.0, 0) == [(" ball", True)]
    assert lora.cut_at_stop([5, 6, 7], False, set()) == ([5, 6, 7], False)  # no end-of-turn: unchanged


def test_gpt_train_evaluates_in_the_models_own_tokens(tokenizer, tmp_path):
    """gpt.train scores the val split in gpt.py's own tokenizer; a GGUF model brings its own, which
    lora.py passes as gpt.train(tokenizer=enc, val_tokens=val)."""
    enc = tokenizer[0]
    val = gpt.load_tokens("train", enc)[:257]  # a distinct token stream, to see which one is scored
    model = lora.prepare(tiny_model(), lora.parse_method("lora4"))
    ex = [lora.encode_example(enc, t, 10 ** 6) for t in lora.load_instructions("train", 8)]
    ex = [(ids[:65], P) for ids, P in ex]  # cut to the tiny model's 64-token context
    tc = tiny_train_config(tmp_path, max_iters=1, warmup_iters=0, batch_size=2)
    res = gpt.train(model.cfg, tc, verbose=False, model=model, batches=lora.sft_batches(ex, enc.eot_token),
                    tokenizer=enc, val_tokens=val)
    assert res["tokenizer"] is enc and res["final"]["val_tokens"] == 256
    ref = gpt.evaluate(res["model"].eval(), val, gpt.token_byte_lengths(enc), 64, 2)
    assert res["final"]["val_loss"] == pytest.approx(ref["loss"], rel=1e-6)


STORY = ("Tom had a red ball. He took the ball to the park with his dog. The dog ran after the ball and "
         "brought it back. Tom laughed and threw it again. They played until the sun went down, and then "
         "they walked home together, happy and tired.")


@pytest.mark.parametrize("answer,ended,ok,why", [
    (STORY, True, True, "pass"),
    (STORY.upper().replace("TOM", "Tom"), True, True, "case-insensitive"),
    (STORY.replace("park", "garden"), True, False, "missing word"),
    (STORY.replace("ball", "football"), True, False, "word only inside another word"),
    (STORY.replace("ball", "balls"), True, False, "inflected form"),
    (STORY.replace("ball.", "ball's."), True, True, "possessive counts"),
    (STORY, False, False, "unfinished: never ended"),
    (STORY[:-1] + " and", True, False, "unfinished: no final punctuation"),
    ("The ball, the dog, the park. " * 6, True, False, "babbling (repeats)"),
    ("The dog took the ball to the park.", True, False, "too short"),
])
def test_verifier(answer, ended, ok, why):
    assert lora.verify(answer, ("ball", "dog", "park"), ended) is ok, why


def test_verifier_details():
    c = lora.check_answer(STORY.replace("park", "garden"), ["ball", "park", "moon"])
    assert c["fluent"] and not c["ok"]
    assert c["missing"] == ["park", "moon"] and c["words_used"] == pytest.approx(1 / 3)


# -----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw,match", [
    (dict(r=0), "rank"), (dict(r=-2), "rank"), (dict(alpha=0.0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(targets="q,qq"), "unknown LoRA target 'qq'"), (dict(targets=""), "empty"),
])
def test_bad_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lora.LoRAConfig(**kw)


@pytest.mark.parametrize("name", ["lora", "lora0", "qlora-1", "dora8", "lora8xyz"])
def test_bad_method_errors(name):
    with pytest.raises(ValueError, match="method"):
        lora.parse_method(name)


def test_adapter_for_another_model_shape_errors(tmp_path):
    model = lora.add_lora(tiny_model(), lora.LoRAConfig(r=4))
    lora.save_adapter(model, tmp_path / "a.pt")
    wider = tiny_model(n_embd=128)
    with pytest.raises(ValueError, match=r"layers.0.attention.wq is 64x64; this model's is 128x128"):
        lora.load_adapter(wider, tmp_path / "a.pt")
    deeper_file = tmp_path / "deep.pt"
    lora.save_adapter(lora.add_lora(tiny_model(n_layer=3), lora.LoRAConfig(r=4)), deeper_file)
    with pytest.raises(ValueError, match="layers.2.attention.wq, which this model does not have"):
        lora.load_adapter(tiny_model(), deeper_file)
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(RuntimeError, match="not a readable adapter"):
        lora.load_adapter(tiny_model(), tmp_path / "junk.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lora.py adapter"):
        lora.load_adapter(tiny_model(), tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        lora.load_adapter(tiny_model(), tmp_path / "missing.pt")


def test_other_model_errors():
    model = lora.add_lora(tiny_model(mlp="gelu"), lora.LoRAConfig(r=2, targets="attn"))
    with pytest.raises(ValueError, match="no layer of the model matches"):
        lora.add_lora(model, lora.LoRAConfig(r=2, targets="up"), "u")  # a GELU MLP has no w3
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lora.add_lora(model, lora.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lora.set_adapter(model, "x")
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora.set_adapter(model, None)


def test_cli_errors(capsys):
    with pytest.raises(SystemExit, match="unknown option --rank"):
        lora.main(["--rank=8"])
    with pytest.raises(SystemExit, match="unknown method 'lora'"):
        lora.main(["--methods=lora"])
    with pytest.raises(SystemExit, match="compute_dtype"):
        lora.main(["--compute_dtype=fp16"])
