"""
lora.py - supervised fine-tuning three ways (full, LoRA, QLoRA): teaching the story model an instruction.

Pretraining gives a model that continues text; supervised fine-tuning (SFT) on (instruction, answer)
pairs, with the loss on the answer tokens only, teaches it to take an order. LoRA freezes each
pretrained weight W (N x K) and learns a low-rank update beside it, W + (alpha / r) B A with A (r x K)
and B (N x r), r << min(N, K): a few percent of the trainable parameters and of the optimizer state,
an adapter file of kilobytes, and once B A is folded into W, no cost at inference. QLoRA stores the
frozen W in 4-bit NormalFloat (NF4) and dequantizes it for every matmul, so the base takes ~1/4 of its
16-bit bytes while the adapters still train in full precision.

The task, a verifiable instruction in the style of TinyStories-Instruct (defined here, reused by
grpo.py): the prompt "Words: dog, ball, park\\nStory:" asks for a story; an answer succeeds when it is a
finished, fluent story (dpo.py's gates) that uses every one of the three words (`verify`).

References
- LoRA: Hu et al. 2021, arXiv:2106.09685: eq. 3 (h = W0 x + B A x), section 4.1 (A random, B = 0 so
  B A = 0 at the start; B A x scaled by alpha / r, "we simply set alpha to the first r we try and do
  not tune it"; merging W = W0 + B A for inference without latency), section 7.1 (which matrices),
  section 7.2 (how small r can be). Kaiming-uniform A and the names merge/unmerge follow Hugging Face
  PEFT's LoraLayer; the single-file spirit follows minLoRA.
- QLoRA: Dettmers et al. 2023, arXiv:2305.14314: section 3 (4-bit NormalFloat, double quantization,
  paged optimizers), eq. 5 (Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2, computed in BF16), section 4
  (LoRA on every linear layer is what matches 16-bit fine-tuning). NF4 itself lives in quant.py.
- TinyStories-Instruct: Eldan & Li 2023, arXiv:2305.07759, section 2 (prompts that list words a
  story must contain) and section 4.2.
- SFT with the loss on the answer only: Ouyang et al. 2022 (InstructGPT), arXiv:2203.02155, section 3.5;
  Touvron et al. 2023 (Llama 2), arXiv:2307.09288, section 3.1 ("we zero-out the loss on tokens from
  the user prompt").
- Gradient checkpointing: Chen et al. 2016, arXiv:1604.06174 (keep block inputs, recompute the rest).

Paged optimizers (QLoRA section 3) use CUDA unified memory: when a long batch makes GPU memory spike,
the optimizer states are evicted page by page to CPU RAM and paged back for the update, instead of the
run dying out of memory. On a CPU the states already live in host RAM, so there is nothing to page.

Run it
    python lora.py                                  # base model, full FT, LoRA r=8, QLoRA r=8
    python lora.py --methods=lora4,lora16,lora8attn # any subset; methods: full, loraR, loraRattn, qloraR
    python lora.py --init=out/ckpt.pt               # start from your own `python gpt.py` checkpoint
    python lora.py --checkpointing=true             # recompute block activations in backward
    python lora.py --timing=true --methods=full,lora8,qlora8   # only step times, round-robin
    python lora.py --gguf=PATH --methods=base,lora8,qlora8 --steps=20 --batch_size=2 --lr_lora=1e-3 \\
        --n_eval=24 --val_tokens=2048 --eval_interval=20      # SmolLM2-135M-Instruct (pretrained.py)

Not covered: DoRA, rsLoRA, LoRA+ and other variants; adapters on the embedding (PEFT's
modules_to_save); 4-bit matmul kernels (the CPU path dequantizes to fp32 / bf16 per matmul);
multi-turn chat data; the optional first-sentence constraint of TinyStories-Instruct.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import dpo
import gpt
import quant

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# The idea: a frozen linear layer plus a trainable low-rank update
#
#   y = W0 x + (alpha / r) B A dropout(x)        W0 (N, K) frozen, A (r, K), B (N, r) trained
#
# At the start B = 0, so the adapted model *is* the pretrained model and training starts from its
# function (section 4.1); A is random (Kaiming-uniform, like nn.Linear's own init), so the gradient of
# B is not zero. B A has rank <= r: r (N + K) parameters instead of N K. Why alpha / r: with Adam,
# each entry of A and B moves by ~lr per step whatever r is, so B A x grows with r; dividing by r keeps
# the size of an update (and so the learning rate) roughly independent of the rank.
# A trained adapter is a separate, tiny file; several adapters can sit on one base model and be
# switched without touching its weights; merge() folds B A into W0 so inference costs nothing extra.


@dataclass
class LoRAConfig:
    """One adapter: its rank, scale, dropout and which matrices it adapts."""

    r: int = 8  # rank of B A (Hu et al. 2021 find r = 1..8 enough for GPT-3's q and v)
    alpha: float = 16.0  # B A x is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input only (the frozen path sees x unchanged)
    targets: str = "all"  # comma list of q, k, v, o, gate, up, down, or the groups attn, mlp, all

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        parse_targets(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


# Target names -> the module path inside a gpt.Block (Llama's names, see gpt.py). gate/up/down are
# SwiGLU's w1/w3/w2; a GELU MLP has only w1 (its up projection, matched by "gate") and w2 ("down").
TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
           "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}
TARGET_GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": tuple(TARGETS)}


def parse_targets(spec: str) -> tuple[str, ...]:
    """"q,v" -> ("q", "v"); groups expand ("attn" -> q, k, v, o). Unknown names get a clear error."""
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name not in TARGETS and name not in TARGET_GROUPS:
            raise ValueError(f"unknown LoRA target {name!r}; choose from {', '.join(TARGETS)} "
                             f"or the groups {', '.join(TARGET_GROUPS)}")
        out += [t for t in TARGET_GROUPS.get(name, (name,)) if t not in out]
    if not out:
        raise ValueError("LoRA targets are empty: name at least one of " + ", ".join(TARGETS))
    return tuple(out)


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update an adapter stands for: (alpha / r) B A, (N, r) @ (r, K) -> (N, K)."""
    return scaling * (B @ A)


class LoRALinear(nn.Module):
    """A frozen linear layer (`base`: nn.Linear or NF4Linear) plus any number of named adapters, one of
    them active. `path` is the layer's name in the model (layers.0.attention.wq), the key in adapter
    files. While merged, the active adapter's B A sits inside base.weight and forward adds nothing."""

    def __init__(self, base: nn.Module, path: str):
        super().__init__()
        self.base, self.path = base, path
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()  # adapter name -> A (r, K)
        self.lora_B = nn.ParameterDict()  # adapter name -> B (N, r)
        self.configs: dict[str, LoRAConfig] = {}
        self.active: Optional[str] = None
        self.unmerged_weight: Optional[torch.Tensor] = None  # W0 itself, kept while merged

    def add_adapter(self, name: str, cfg: LoRAConfig) -> None:
        w = self.base.weight if isinstance(self.base, nn.Linear) else self.base.offset
        dtype = w.dtype if w.dtype.is_floating_point and w.dtype.itemsize >= 4 else torch.float32
        A = torch.empty(cfg.r, self.in_features, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's init (PEFT's default for A)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=w.device, dtype=dtype))
        self.configs[name] = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., N)
        name = self.active
        if name is None or name not in self.configs or self.unmerged_weight is not None:
            return y
        cfg, A, B = self.configs[name], self.lora_A[name], self.lora_B[name]
        h = F.dropout(x.to(A.dtype), cfg.dropout, self.training)
        # (..., K) @ (K, r) -> (..., r) @ (r, N) -> (..., N): two thin matmuls, never the (N, K) B A
        return y + (h @ A.t() @ B.t()).to(y.dtype) * cfg.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha / r) B A. W0 is kept aside: float addition rounds, so subtracting B A
        again would not give W0 back bit for bit (PEFT subtracts and accepts the rounding)."""
        if self.active is None or self.unmerged_weight is not None:
            return
        if not isinstance(self.base, nn.Linear):
            raise ValueError(f"{self.path}: cannot merge into a 4-bit NF4 base (B A is not representable in "
                             "its 16 levels); dequantize the base to float first")
        W = self.base.weight  # (N, K)
        self.unmerged_weight = W.detach().clone()
        name = self.active
        W += lora_delta(self.lora_A[name], self.lora_B[name], self.configs[name].scaling).to(W.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.unmerged_weight is not None:
            self.base.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={c.r}" for n, c in self.configs.items())
        return f"{self.in_features} -> {self.out_features}, adapters {{{ranks}}}, active={self.active!r}"


# Model-level operations: wrap the target layers, choose the active adapter, freeze the rest.


def logical_path(path: str) -> str:
    """A module's name as the plain gpt.GPT spells it (gradient checkpointing wraps each block as
    `layers.N.inner`), so adapter files do not depend on whether checkpointing is on."""
    return re.sub(r"\.inner(?=\.|$)", "", path)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model: nn.Module, cfg: LoRAConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` on the target layers of `model` (in place), make it the active one, and
    freeze everything but it. Layers are wrapped in LoRALinear the first time an adapter reaches them."""
    if any(name in layer.configs for layer in lora_layers(model)):
        raise ValueError(f"the model already has an adapter named {name!r}: pick another name")
    suffixes = tuple(TARGETS[t] for t in parse_targets(cfg.targets))
    found = 0
    for path, m in list(model.named_modules()):
        lp = logical_path(path)
        if not lp.endswith(suffixes) or not isinstance(m, (LoRALinear, nn.Linear, NF4Linear)):
            continue
        if not isinstance(m, LoRALinear):
            parent, _, child = path.rpartition(".")
            m_new = LoRALinear(m, lp).train(m.training)  # a new module would start in train mode
            setattr(model.get_submodule(parent) if parent else model, child, m_new)
            m = m_new
        m.add_adapter(name, cfg)
        found += 1
    if not found:
        raise ValueError(f"no layer of the model matches the LoRA targets {cfg.targets!r} "
                         f"(looked for module names ending in {', '.join(suffixes)})")
    return set_adapter(model, name)


def set_adapter(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Make adapter `name` active on every layer (None: the plain base model) and trainable, and
    freeze every other parameter. Switching needs no reload: the base weights are shared."""
    layers = lora_layers(model)
    if name is not None and not any(name in layer.configs for layer in layers):
        known = sorted({n for layer in layers for n in layer.configs})
        raise ValueError(f"no adapter named {name!r}; the model has {known or 'none'}")
    if any(layer.unmerged_weight is not None for layer in layers):
        raise ValueError("an adapter is merged into the weights: unmerge(model) before switching")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.active = name
        if name in layer.configs:
            layer.lora_A[name].requires_grad_(True)
            layer.lora_B[name].requires_grad_(True)
    return model


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """Every A and B of adapter `name` (None: of all adapters)."""
    return [store[n] for layer in lora_layers(model) for store in (layer.lora_A, layer.lora_B)
            for n in store if name is None or n == name]


def merge(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.unmerge()
    return model


# -----------------------------------------------------------------------------------------------
# QLoRA: the frozen base in NF4 (quant.py), dequantized per matmul; LoRA on top in full precision.
#
#   Y = X dequant(W_NF4)^T + (alpha / r) X A^T B^T        (QLoRA eq. 5; their L1 L2 are our A^T B^T)
#
# The 4-bit weight never gets a gradient, but the input does: dL/dX = dL/dY dequant(W_NF4). An
# ordinary F.linear(x, dequant(W)) would make autograd keep the dequantized (N, K) weight alive until
# backward, undoing the saving; NF4Matmul keeps only the 4-bit codes and dequantizes again in backward
# (as bitsandbytes' 4-bit matmul does). compute_dtype is the dtype of that matmul: bfloat16 as in the
# paper, or float32 (the default here: CPU bf16 matmuls are slow on many CPUs).


class NF4Matmul(torch.autograd.Function):
    """y = x W_hat^T with W_hat = layer.dequantize(): x (..., K) -> (..., N); saves no weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize().to(x.dtype).t()  # (..., K) @ (K, N) -> (..., N)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ ctx.layer.dequantize().to(grad_y.dtype), None  # (..., N) @ (N, K) -> (..., K)


class NF4Linear(nn.Module):
    """A frozen linear layer stored as quant.py's NF4 with double quantization (buffers, no parameters)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        packed = quant.quantize_nf4(linear.weight.detach())
        self.names = sorted(packed)
        for k in self.names:
            self.register_buffer(k, packed[k])
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_nf4({k: getattr(self, k) for k in self.names},
                                    (self.out_features, self.in_features))  # (N, K) fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = NF4Matmul.apply(x.to(self.compute_dtype), self).to(x.dtype)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, NF4, compute {self.compute_dtype}"


def quantize_base(model: gpt.GPT, compute_dtype: torch.dtype = torch.float32) -> gpt.GPT:
    """Replace every nn.Linear inside the transformer blocks (also the bases of LoRALinear layers) by an
    NF4Linear, in place. The token embedding and the output head stay in float: QLoRA quantizes the
    blocks' linear layers, and quant.py keeps the tied head in float for the same reasons."""
    for path, m in list(model.layers.named_modules()):
        if isinstance(m, nn.Linear):
            parent, _, child = path.rpartition(".")
            owner = model.layers.get_submodule(parent) if parent else model.layers
            setattr(owner, child, NF4Linear(m, compute_dtype).train(m.training))
    return model


# Gradient checkpointing: keep only each block's input; recompute the block during backward.


class CheckpointedBlock(nn.Module):
    """Runs `inner` (a gpt.Block) under torch.utils.checkpoint while training: activations inside the
    block are recomputed in backward instead of stored (Chen et al. 2016): one extra forward per step."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, rope, cache=None):
        if self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(self.inner, x, rope, use_reentrant=False)
        return self.inner(x, rope, cache)


def checkpoint_blocks(model: gpt.GPT) -> gpt.GPT:
    for i, block in enumerate(model.layers):
        if not isinstance(block, CheckpointedBlock):
            model.layers[i] = CheckpointedBlock(block)
    return model


# -----------------------------------------------------------------------------------------------
# Adapter files: only A and B of one adapter (kilobytes), its config and the shape of every layer it
# adapts, so loading onto a base of another shape fails with a message instead of a size mismatch.

ADAPTER_FORMAT = "lora.py adapter v1"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{"layers.0.attention.wq.lora_A": A, ...lora_B: B} of adapter `name`."""
    out = {}
    for layer in lora_layers(model):
        if name in layer.configs:
            out[f"{layer.path}.lora_A"] = layer.lora_A[name].detach()
            out[f"{layer.path}.lora_B"] = layer.lora_B[name].detach()
    if not out:
        raise ValueError(f"the model has no adapter named {name!r}")
    return out


def save_adapter(model: nn.Module, path: str | Path, name: str = "default") -> int:
    """Write adapter `name` to `path` (atomically); returns the file's size in bytes."""
    tensors = adapter_state_dict(model, name)
    layers = [layer for layer in lora_layers(model) if name in layer.configs]
    state = dict(format=ADAPTER_FORMAT, config=dataclasses.asdict(layers[0].configs[name]),
                 shapes={la.path: [la.out_features, la.in_features] for la in layers},
                 tensors={k: v.cpu().contiguous() for k, v in tensors.items()})
    path = Path(path)
    with gpt.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path.stat().st_size


def load_adapter(model: nn.Module, path: str | Path, name: str = "default") -> nn.Module:
    """Add the adapter stored at `path` to `model` as `name` and make it active. The file must have been
    trained on a base model of the same shape; the weights are not checked (an adapter trained on another
    checkpoint of the same architecture loads, and is meaningless)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable adapter file ({type(e).__name__})") from e
    if not isinstance(state, dict) or state.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a lora.py adapter file (no format {ADAPTER_FORMAT!r})")
    modules = {logical_path(p): m for p, m in model.named_modules()}
    for lp, (N, K) in state["shapes"].items():
        m = modules.get(lp)
        if m is None or not hasattr(m, "in_features"):
            raise ValueError(f"adapter {path} adapts {lp}, which this model does not have: it was made "
                             "for another model")
        if (m.out_features, m.in_features) != (N, K):
            raise ValueError(f"adapter {path} was made for a model whose {lp} is {N}x{K}; this model's "
                             f"is {m.out_features}x{m.in_features}: load it onto the base model it was "
                             "trained on")
    cfg = LoRAConfig(**state["config"])
    for lp, (N, K) in state["shapes"].items():  # check every tensor before touching the model
        for part, shape in (("lora_A", (cfg.r, K)), ("lora_B", (N, cfg.r))):
            t = state["tensors"].get(f"{lp}.{part}")
            if t is None or tuple(t.shape) != shape:
                got = "is missing" if t is None else f"has shape {tuple(t.shape)}"
                raise ValueError(f"adapter {path} is damaged: {lp}.{part} {got}, expected {shape}")
    add_lora(model, cfg, name)
    layers = {layer.path: layer for layer in lora_layers(model) if name in layer.configs}
    if sorted(layers) != sorted(state["shapes"]):
        raise ValueError(f"adapter {path}: its layers do not match the ones its config targets")
    with torch.no_grad():
        for lp, layer in layers.items():
            layer.lora_A[name].copy_(state["tensors"][f"{lp}.lora_A"])
            layer.lora_B[name].copy_(state["tensors"][f"{lp}.lora_B"])
    return model


# -----------------------------------------------------------------------------------------------
# The task: write a story that uses three given words (TinyStories-Instruct, Eldan & Li 2023, sec. 2).
#
# Building it from the bundled stories: for each story, 3 distinct words drawn at random from the
# *concrete nouns* (a fixed list, NOUNS: things a child's story is about) that occur, written in
# lowercase, among the story's first OPENING words; a noun qualifies when it occurs in MIN_STORIES or
# more of the train stories (the model has seen it in context) and in no more than MAX_STORY_FRAC of
# them (a word in most stories is a free pass, not an instruction). Why nouns and why the opening:
# a story can bring any object in, so the order is always feasible, and the SFT answers then show the
# words early, which is the habit the model must learn (TinyStories-Instruct also lists verbs and
# adjectives; common nouns are the order a tiny model can start to follow in a short run). The noun
# vocabulary comes from the train split only; held-out instructions are built from the valid split.
#
# Prompt format: plain text, `Words: dog, ball, park\nStory:`, answer: " " + story + <|endoftext|>.
# Why no new special tokens (<|user|>, <|assistant|>): a new token needs a new embedding row, which LoRA
# does not train (PEFT has to add the embedding to `modules_to_save`) and which changes the vocabulary
# the checkpoint was built with. "Words:" and "Story:" never occur in TinyStories, so the template is
# unambiguous; <|endoftext|> in front marks the start of a document as it does in pretraining, and the
# answer ends with it, which is how the model says "done".
#
# Verifier: a success is a finished story (dpo.fluency: ended with <|endoftext|> after . ! or ?, >= 25
# words, little repetition) that contains each required word as a whole word, case-insensitive, in
# exactly the given form: "ball" is not satisfied by "balls" or "football"; "ball's" counts (' is not a
# letter). No inflections: the words are copied from real stories in the form they appear, so an
# answer in that form exists, and an exact rule leaves nothing for grpo.py's policy to game.

NOUNS = frozenset("""
ball dog cat park tree bird toy car box cake fish sun flower garden house book hat bear bunny rabbit boat
water sky rain snow ice cream apple cookie candy door window bed room kitchen school teacher baby king
queen prince princess dragon monster castle forest river lake sea beach sand shell rock stone hill
mountain cloud star moon train truck bike kite balloon doll robot puzzle game song picture paint crayon
paper pencil letter gift present party birthday juice milk bread pie soup pizza banana carrot orange
grass leaf leaves farm cow pig horse duck frog bug bee butterfly spider mouse lion tiger monkey elephant
owl fox wolf sheep chicken egg nest cave bridge road town city shop store jar cup bowl spoon plate table
chair blanket pillow coat shoe shoes sock dress shirt bag basket map key clock phone bell drum ring
necklace crown sword treasure ship plane rocket bottle button
""".split())
MIN_STORIES, MAX_STORY_FRAC, N_WORDS, OPENING = 60, 0.2, 3, 40
WORD = re.compile(r"\b[a-z]{3,}\b")  # lowercase in the text: no names, no sentence starts


def format_prompt(words: tuple[str, ...] | list[str]) -> str:
    return f"Words: {', '.join(words)}\nStory:"


@dataclass(frozen=True)
class Instruction:
    """One example: the required words and a real story (the SFT answer) that uses all of them."""

    words: tuple[str, ...]
    story: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.words)


def read_stories(split: str) -> list[str]:
    text = gpt.read_text(gpt.DATA_DIR / "tinystories" / f"tinystories_{split}.txt")
    return [s.strip() for s in text.split(gpt.EOT) if s.strip()]


def word_vocabulary(stories: list[str]) -> frozenset[str]:
    """The NOUNS of a story collection that occur in >= MIN_STORIES stories, <= MAX_STORY_FRAC of them."""
    df: dict[str, int] = {}
    for s in stories:
        for w in set(WORD.findall(s)):
            df[w] = df.get(w, 0) + 1
    hi = MAX_STORY_FRAC * len(stories)
    return frozenset(w for w, c in df.items() if MIN_STORIES <= c <= hi and w in NOUNS)


@functools.lru_cache(maxsize=1)
def train_vocabulary() -> frozenset[str]:
    return word_vocabulary(read_stories("train"))


def make_instructions(stories: list[str], vocab: frozenset[str], seed: int) -> list[Instruction]:
    """One Instruction per story with N_WORDS words of `vocab` among its first OPENING words; the
    words drawn at random, in random order."""
    rng = np.random.default_rng(seed)
    out = []
    for s in stories:
        opening = " ".join(s.split()[:OPENING])
        cands = sorted(set(WORD.findall(opening)) & vocab)  # sorted: the draw depends on the seed only
        if len(cands) >= N_WORDS:
            out.append(Instruction(tuple(rng.choice(cands, N_WORDS, replace=False).tolist()), s))
    return out


def load_instructions(split: str, n: int = 0, seed: int = 0) -> list[Instruction]:
    """Instructions from the bundled train or valid stories (the first n; 0 = all), words drawn with
    `seed`. The held-out set is load_instructions("valid")."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be train or valid, not {split!r}")
    tasks = make_instructions(read_stories(split), train_vocabulary(), seed)
    return tasks[:n] if n else tasks


def uses_word(text: str, word: str) -> bool:
    """Whole-word, case-insensitive: "ball" matches "Ball." and "ball's", not "balls" or "football"."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def check_answer(answer: str, words: tuple[str, ...] | list[str], ended: bool = True) -> dict:
    """The verifier's details: fluent (dpo.py's gates), which words are missing, and ok."""
    fluent = dpo.fluency(answer, ended)["ok"]
    missing = [w for w in words if not uses_word(answer, w)]
    return dict(ok=fluent and not missing, fluent=fluent, missing=missing,
                words_used=(len(words) - len(missing)) / len(words))


def verify(answer: str, words: tuple[str, ...] | list[str], ended: bool = True) -> bool:
    """True when `answer` is a finished, fluent story that uses every required word."""
    return check_answer(answer, words, ended)["ok"]


# -----------------------------------------------------------------------------------------------
# SFT data: prompt + answer in one sequence, the loss on answer tokens only. Position t predicts token
# t+1, so the targets of positions 0 .. P-2 (the rest of the prompt) are set to -1, which gpt.GPT's
# cross-entropy ignores (ignore_index=-1); position P-1 predicts the answer's first token and counts.
# Padding (to the longest row of a batch) is ignored the same way.


def encode_prompt(enc, text: str) -> list[int]:
    return [enc.eot_token] + enc.encode_ordinary(text)


def encode_example(enc, inst: Instruction, block_size: int) -> Optional[tuple[list[int], int]]:
    """(token ids of prompt + answer + <|endoftext|>, prompt length P), or None if it does not fit the
    context: a story cut short would teach the model to stop without ending."""
    prompt = encode_prompt(enc, inst.prompt)
    ids = prompt + enc.encode_ordinary(" " + inst.story) + [enc.eot_token]
    return (ids, len(prompt)) if len(ids) <= block_size + 1 else None


def masked_example(ids: list[int], P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (L-1,) and targets y (L-1,) with the prompt's targets masked to -1."""
    t = torch.tensor(ids)
    x, y = t[:-1], t[1:].clone()
    y[:P - 1] = -1
    return x, y


def sft_batches(examples: list[tuple[list[int], int]], pad: int) -> Callable:
    """gpt.train's `batches` hook: random examples (with replacement, drawn from the loop's generator
    so --resume continues the same stream), right-padded to the longest row: x, y (accum, micro, T)."""
    pairs = [masked_example(ids, P) for ids, P in examples]

    def batches(gen, micro, accum, world, rank):
        pick = torch.randint(0, len(pairs), (accum, world * micro), generator=gen)
        pick = pick[:, rank * micro:(rank + 1) * micro]  # this rank's columns of the global batch
        T = max(len(pairs[i][0]) for i in pick.flatten().tolist())
        x = torch.full((accum, micro, T), pad, dtype=torch.long)
        y = torch.full((accum, micro, T), -1, dtype=torch.long)
        for a in range(accum):
            for b in range(micro):
                xi, yi = pairs[pick[a, b]]
                x[a, b, :len(xi)], y[a, b, :len(yi)] = xi, yi
        return x, y

    return batches


# -----------------------------------------------------------------------------------------------
# Evaluation: sample an answer to each held-out prompt and verify it.


# Where an answer ends: at <|endoftext|>, which the SFT answers end with, and also at an end-of-turn
# token if the tokenizer has one. An instruct model (SmolLM2-135M-Instruct) was tuned to close its
# answers with ChatML's <|im_end|>; prompted in plain text it still ends them so rather than with
# <|endoftext|>, and without this its finished answers would count as cut off.
END_OF_TURN = ("<|im_end|>",)


def end_of_turn_ids(enc) -> set[int]:
    return {enc.encode_single_token(t) for t in END_OF_TURN if t in enc.special_tokens_set}


def cut_at_stop(ids: list[int], ended: bool, stops: set[int]) -> tuple[list[int], bool]:
    """(ids up to the first id in `stops`, True) if there is one, else (ids, ended) unchanged."""
    cut = next((k for k, i in enumerate(ids) if i in stops), None)
    return (ids, ended) if cut is None else (ids[:cut], True)


@torch.no_grad()
def sample_answers(model: gpt.GPT, enc, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                   seed: int) -> list[tuple[str, bool]]:
    """One sampled answer per prompt: (text, ended). Prompts of equal length are batched together
    (dpo.sample_completions); answers are cut at the context length the model was trained on, and at
    an end-of-turn token (END_OF_TURN) if the tokenizer has one."""
    was_training = model.training
    stops = end_of_turn_ids(enc)
    gen = torch.Generator().manual_seed(seed)
    out: list[Optional[tuple[str, bool]]] = [None] * len(prompts)
    for P in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == P]
        n_new = min(max_new_tokens, model.cfg.block_size - P)
        got = dpo.sample_completions(model, [prompts[i] for i in idx], 1, n_new, temperature,
                                     enc.eot_token, gen)
        for i, [(ids, ended)] in zip(idx, got):
            ids, ended = cut_at_stop(ids, ended, stops)
            out[i] = (enc.decode(ids), ended)
    model.train(was_training)
    return out  # type: ignore[return-value]


def instruction_success(model: gpt.GPT, enc, tasks: list[Instruction], max_new_tokens: int = 240,
                        temperature: float = 0.7, seed: int = 0) -> dict:
    """Held-out figures: success rate (verify), fluent rate, mean fraction of required words used."""
    prompts = [encode_prompt(enc, t.prompt) for t in tasks]
    answers = sample_answers(model, enc, prompts, max_new_tokens, temperature, seed)
    checks = [check_answer(text, t.words, ended) for (text, ended), t in zip(answers, tasks)]
    return dict(success=float(np.mean([c["ok"] for c in checks])),
                fluent=float(np.mean([c["fluent"] for c in checks])),
                words=float(np.mean([c["words_used"] for c in checks])))


# -----------------------------------------------------------------------------------------------
# Fine-tuning: gpt.py's training loop, fed by sft_batches, with the success rate as its probe.
# A method is one way of choosing what trains: "full" (every weight), "loraR" (rank-R adapters on all
# linear layers of the blocks), "loraRattn" / "loraRmlp" (attention or MLP matrices only), "qloraR"
# (rank-R adapters on an NF4 base), and "base" (no training: the pretrained model, prompted).


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # base | full | lora | qlora
    r: int = 0
    targets: str = "all"


def parse_method(name: str) -> Method:
    m = re.fullmatch(r"(base|full)|(q?lora)(\d+)(attn|mlp)?", name.strip())
    if not m:
        raise ValueError(f"unknown method {name!r}: use base, full, loraR, loraRattn, loraRmlp or qloraR "
                         "(R = rank, e.g. lora8, lora8attn, qlora8)")
    if m.group(1):
        return Method(name, m.group(1))
    if int(m.group(3)) <= 0:
        raise ValueError(f"method {name!r}: the LoRA rank must be positive")
    return Method(name, m.group(2), int(m.group(3)), m.group(4) or "all")


def prepare(base: gpt.GPT, method: Method, alpha: float = 16.0, dropout: float = 0.05,
            compute_dtype: torch.dtype = torch.float32, checkpointing: bool = False,
            seed: int = 0) -> gpt.GPT:
    """A fresh copy of `base` set up for `method`: what trains has requires_grad, the rest is frozen."""
    model = copy.deepcopy(base)
    if method.kind in ("base", "full"):
        for p in model.parameters():
            p.requires_grad_(method.kind == "full")
    else:
        if method.kind == "qlora":
            quantize_base(model, compute_dtype)
        torch.manual_seed(seed)  # the draw of every A
        add_lora(model, LoRAConfig(method.r, alpha, dropout, method.targets))
    return checkpoint_blocks(model) if checkpointing else model


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (a tied weight counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state (AdamW: two moments per trained parameter, and step counters)."""
    return tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
                    ) -> dict[str, int]:
    """What one training step on batch (x, y) holds at its peak, in bytes, counted tensor by tensor
    (device-independent; a CPU has no allocator statistics to read): the weights and buffers, one
    gradient per trained parameter, the optimizer state, and the activations autograd saves for
    backward (seen through saved_tensors_hooks, storages counted once, weights excluded). Under
    gradient checkpointing the blocks save nothing but their inputs, which checkpoint() keeps itself:
    those are added as one (B, T, C) tensor per block."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    del loss
    model.train(was_training)
    n_ckpt = sum(isinstance(b, CheckpointedBlock) for b in getattr(model, "layers", []))
    acts = sum(saved.values()) + n_ckpt * x.numel() * model.cfg.n_embd * 4
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    grads = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    opt = optimizer_bytes(optimizer)
    return dict(weights=weights, grads=grads, optimizer=opt, activations=acts,
                total=weights + grads + opt + acts)


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the frozen base: all of it, and the blocks' linear layers alone (what QLoRA quantizes)."""
    lora_ids = {id(p) for p in adapter_parameters(model)}
    frozen = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in lora_ids]
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, NF4Linear))
               and m is not getattr(model, "output", None)]
    lin = tensor_bytes(t for m in linears for t in list(m.parameters()) + list(m.buffers()))
    return dict(base=tensor_bytes(frozen), linears=lin)


# -----------------------------------------------------------------------------------------------
# Demo configuration, the start model, the comparison, the plot, the command line


@dataclass
class LoRADemoConfig:
    """The comparison: one start model, the same SFT data, steps and schedule for every method."""

    init: str = ""  # gpt.py checkpoint to fine-tune; "" = out_dir/base/ckpt.pt, trained first if missing
    #                 (gpt.py's default run: the same model `python gpt.py` trains)
    gguf: str = ""  # fine-tune a llama-family GGUF instead (SmolLM2-135M-Instruct) through pretrained.py
    out_dir: str = "out/lora"  # each method writes out_dir/<method>/ (checkpoint, adapter), rewritten per run
    methods: str = "base,full,lora8,qlora8"  # base, full, loraR[attn|mlp], qloraR (e.g. lora4,lora8attn)
    steps: int = 100  # optimizer steps of every method (the same warmup + cosine schedule)
    batch_size: int = 8  # instructions per step
    warmup: int = 10  # linear LR warmup steps
    lr_full: float = 2e-3  # peak LR of full fine-tuning (1/3 of pretraining's 6e-3)
    lr_lora: float = 1e-2  # peak LR of the adapters (LoRA takes ~5-10x the full-FT rate: B A starts at 0)
    alpha: float = 16.0  # LoRA alpha: B A x is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapters' input
    checkpointing: bool = False  # gradient checkpointing: recompute each block in backward
    compute_dtype: str = "float32"  # QLoRA matmul dtype: float32 | bfloat16
    n_train: int = 0  # training instructions from the train split (0 = all that fit the context)
    n_eval: int = 96  # held-out instructions (valid split) scored at every evaluation
    eval_interval: int = 50  # steps between evaluations (success rate and val loss)
    val_tokens: int = 32768  # TinyStories val tokens of the periodic val loss (the final one: all of
    #                          them, except with --gguf, where every val loss uses the first val_tokens)
    max_new_tokens: int = 240  # answer length cap (and the context: block_size - prompt length)
    temperature: float = 0.7  # sampling temperature of the held-out answers
    seed: int = 1337
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    plot: str = "auto"  # auto: assets/lora_curves.png for the documented run, else out_dir; "" = none
    timing: bool = False  # only time training steps of each method, round-robin, with and without
    #                       checkpointing (step_times), instead of fine-tuning and evaluating

    def __post_init__(self):
        for name in ("steps", "batch_size", "n_eval", "eval_interval", "val_tokens", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, not {self.compute_dtype!r}")
        if not (self.lr_full > 0 and self.lr_lora > 0):
            raise ValueError("lr_full and lr_lora must be positive")
        methods = [parse_method(m) for m in self.methods.split(",") if m.strip()]
        if not methods:
            raise ValueError("--methods is empty: name at least one of base, full, loraR, qloraR")
        LoRAConfig(8, self.alpha, self.dropout)  # validates alpha and dropout


def load_start_model(dc: LoRADemoConfig) -> tuple[gpt.GPT, object]:
    """The pretrained model to fine-tune, and its tokenizer."""
    if dc.gguf:
        try:
            import pretrained
        except ImportError as e:
            raise RuntimeError("--gguf needs pretrained.py (the GGUF reader chapter), which this checkout "
                               "does not have") from e
        model, enc, _ = pretrained.load(dc.gguf, context=512)  # stories fit in 512 tokens; a smaller cache
        return model.eval(), enc
    path = Path(dc.init) if dc.init else Path(dc.out_dir) / "base" / "ckpt.pt"
    if not dc.init and not path.exists():
        print(f"no start model at {path}: training gpt.py's default model first (`python gpt.py`)")
        gpt.train(gpt.GPTConfig(), gpt.TrainConfig(out_dir=str(path.parent), num_threads=dc.num_threads))
    model, enc, _ = gpt.load_model(path)
    return model, enc


def plain_val_tokens(enc, dc: LoRADemoConfig) -> np.ndarray:
    """The plain TinyStories val tokens of the forgetting column, in the model's tokenizer: the whole
    split for gpt.py's models; its first dc.val_tokens for a GGUF model (whose pass over the whole
    split is a long job on a CPU)."""
    val = gpt.load_tokens("valid", enc)
    return val[:dc.val_tokens + 1] if dc.gguf else val


def run_method(method: Method, base: gpt.GPT, enc, examples: list, held: list[Instruction],
               dc: LoRADemoConfig, base_figures: dict) -> dict:
    """Fine-tune one method with gpt.train and measure it; returns its row of the table."""
    dtype = getattr(torch, dc.compute_dtype)
    model = prepare(base, method, dc.alpha, dc.dropout, dtype, dc.checkpointing, dc.seed)
    out = Path(dc.out_dir) / method.name
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def probe(m, it):  # B = 0: a LoRA model at step 0 *is* the base model, whose figures we have
        if it == 0 and method.kind in ("full", "lora"):
            return dict(base_figures)
        return instruction_success(m, enc, held, dc.max_new_tokens, dc.temperature, dc.seed)

    tc = gpt.TrainConfig(batch_size=dc.batch_size, max_iters=dc.steps, warmup_iters=dc.warmup,
                         lr=dc.lr_full if method.kind == "full" else dc.lr_lora, weight_decay=0.0,
                         eval_interval=dc.eval_interval, eval_tokens=dc.val_tokens,
                         log_interval=max(1, dc.eval_interval // 2), seed=dc.seed, out_dir=str(out),
                         ckpt_interval=dc.steps, overwrite=True, num_threads=dc.num_threads, plot="")
    print(f"\n=== {method.name}: {n_train:,} trainable parameters ===", flush=True)
    batches, computed = sft_batches(examples, enc.eot_token), []

    def counted(*args):  # the tokens each step computes (padding included), for tokens/s
        x, y = batches(*args)
        computed.append(x.numel())
        return x, y

    own = dict(tokenizer=enc, val_tokens=plain_val_tokens(enc, dc)) if dc.gguf else {}  # a GGUF's own ids
    res = gpt.train(model.cfg, tc, model=model, batches=counted, probe=probe, **own)
    model, opt, final = res["model"], res["optimizer"], res["final"]
    if method.kind == "full":
        with gpt.atomic_path(out / "weights.pt") as tmp:  # what a full fine-tune has to ship
            torch.save({k: v for k, v in model.state_dict().items()}, tmp)
        file_bytes = (out / "weights.pt").stat().st_size
    else:
        file_bytes = save_adapter(model, out / "adapter.pt")
    x, y = sft_batches(examples, enc.eot_token)(torch.Generator().manual_seed(0), dc.batch_size, 1, 1, 0)
    mem = training_memory(model, opt, x[0], y[0])
    return dict(method=method.name, trainable=n_train, success=final["success"], fluent=final["fluent"],
                words=final["words"], val_loss=final["val_loss"], file_bytes=file_bytes,
                optimizer_bytes=optimizer_bytes(opt), memory=mem, **base_weight_bytes(model),
                step_time=final["step_time"] / dc.steps, tok_s=sum(computed) / final["step_time"],
                curve=[(h["iter"], h["success"], h["val_loss"]) for h in res["history"]
                       if "success" in h and not h.get("whole_split")] + [(dc.steps, final["success"], None)])


def base_row(base: gpt.GPT, enc, figures: dict, dc: LoRADemoConfig) -> dict:
    val = plain_val_tokens(enc, dc)
    ev = gpt.evaluate(base, val, gpt.token_byte_lengths(enc), base.cfg.block_size, dc.batch_size)
    return dict(method="base", trainable=0, **figures, val_loss=ev["loss"], file_bytes=0, optimizer_bytes=0,
                memory=None, **base_weight_bytes(base), step_time=None, tok_s=None, curve=None)


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, k in (("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}" if n < 100 * k else f"{n / k:.0f} {unit}"
    return f"{n} B"


def print_table(rows: list[dict]) -> None:
    full = next((r for r in rows if r["method"] == "full"), None)
    n_full = full["trainable"] if full else None
    t_full = full["step_time"] if full else None
    print("\n| method | trainable params | held-out success | fluent | words used | val loss (plain) | "
          "adapter / weights file | optimizer state | base weights | train memory | step time | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f" ({r['trainable'] / n_full:.1%})" if n_full and r["method"] != "full" and r["trainable"] \
            else ""
        st = "-" if r["step_time"] is None else f"{r['step_time'] * 1e3:.0f} ms"
        if t_full and r["step_time"] is not None and r["method"] != "full":
            st += f" ({r['step_time'] / t_full:.2f}x)"
        mem = fmt_bytes(r["memory"]["total"]) if r["memory"] else "-"
        print(f"| {r['method']} | {r['trainable']:,}{share} | {r['success']:.3f} | {r['fluent']:.3f} | "
              f"{r['words']:.3f} | {r['val_loss']:.4f} | {fmt_bytes(r['file_bytes'] or None)} | "
              f"{fmt_bytes(r['optimizer_bytes'] or None)} | {fmt_bytes(r['base'])} | {mem} | {st} | "
              + ("-" if r.get("tok_s") is None else f"{r['tok_s']:.0f}") + " |")


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    plt = gpt.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["curve"] is None:
            ax1.axhline(r["success"], color="gray", ls="--", label="base (prompted)")
            ax2.axhline(r["val_loss"], color="gray", ls="--", label="base, whole split")
            continue
        it, succ, val = zip(*r["curve"])
        line, = ax1.plot(it, succ, "o-", ms=3, label=r["method"])
        pts = [(i, v) for i, v in zip(it, val) if v is not None]
        ax2.plot(*zip(*pts), "o-", ms=3, color=line.get_color(), label=r["method"])
        ax2.plot(it[-1], r["val_loss"], "s", mfc="none", color=line.get_color())  # the whole split
    ax1.set(xlabel="step", ylabel="held-out success rate", title="instruction success (verify)")
    ax2.set(xlabel="step", ylabel="val loss, plain TinyStories (nats/token)",
            title="forgetting (dots: first val tokens; squares: whole val split)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    gpt.save_figure(fig, path)


def step_times(base: gpt.GPT, examples: list, pad: int, methods: list[Method], batch_size: int,
               rounds: int = 3, steps: int = 4, seed: int = 0) -> dict[str, float]:
    """Median seconds per optimizer step (forward, backward, AdamW) of each method, without and with
    gradient checkpointing, on the same batches. Round-robin: every round runs `steps` steps of each
    variant in turn, so load from other jobs on a shared machine falls on all of them alike."""
    gen = torch.Generator().manual_seed(seed)
    data = [sft_batches(examples, pad)(gen, batch_size, 1, 1, 0) for _ in range(steps)]
    variants = {}
    for m in methods:
        for ckpt in (False, True):
            model = prepare(base, m, checkpointing=ckpt, seed=seed).train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            variants[m.name + (" +ckpt" if ckpt else "")] = (model, opt)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (model, opt) in variants.items():
            for x, y in data:
                t = time.perf_counter()
                _, loss = model(x[0], y[0])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) for name, t in times.items()}


def run_demo(dc: LoRADemoConfig) -> list[dict]:
    torch.manual_seed(dc.seed)
    if dc.num_threads:
        torch.set_num_threads(dc.num_threads)
    methods = [parse_method(m) for m in dc.methods.split(",") if m.strip()]
    base, enc = load_start_model(dc)
    T = base.cfg.block_size
    train_tasks = load_instructions("train", dc.n_train, seed=dc.seed)
    examples = [e for e in (encode_example(enc, t, T) for t in train_tasks) if e is not None]
    if dc.timing:
        trained = [m for m in methods if m.kind != "base"]
        times = step_times(base, examples, enc.eot_token, trained, dc.batch_size, seed=dc.seed)
        ref = times.get("full")
        print(f"\nmedian step time, batch {dc.batch_size}, {torch.get_num_threads()} threads (round-robin)")
        print("| method | step time | vs full |\n|---|---|---|")
        for name, t in times.items():
            print(f"| {name} | {t * 1e3:.0f} ms | " + (f"{t / ref:.2f}x |" if ref else "- |"))
        return [dict(method=name, step_time=t) for name, t in times.items()]
    held = load_instructions("valid", dc.n_eval, seed=dc.seed + 1)
    print(f"SFT data: {len(examples):,} of {len(train_tasks):,} train instructions fit the {T}-token "
          f"context; {len(held)} held-out instructions; word vocabulary {len(train_vocabulary()):,}\n"
          f"example prompt: {held[0].prompt!r}")
    t0 = time.time()
    base_figures = instruction_success(base, enc, held, dc.max_new_tokens, dc.temperature, dc.seed)
    print(f"base model (prompted): {base_figures} ({time.time() - t0:.0f} s)")
    rows = []
    for m in methods:
        rows.append(base_row(base, enc, base_figures, dc) if m.kind == "base"
                    else run_method(m, base, enc, examples, held, dc, base_figures))
    print_table(rows)
    print(f"peak resident memory of this process: {peak_rss_bytes() / 1e9:.2f} GB")
    out = Path(dc.out_dir)
    with gpt.atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(dict(config=dataclasses.asdict(dc), rows=rows), indent=1))
    documented = gpt.is_default(dc, ("out_dir", "num_threads", "plot", "init"))
    path = gpt.plot_path("lora_curves.png", documented, dc.out_dir, dc.plot)
    if path and any(r["curve"] for r in rows):
        n = sum(p.numel() for p in base.parameters())
        plot_curves(rows, path, f"lora.py: SFT of a {n / 1e6:.1f}M-parameter story model, {dc.steps} steps, "
                    f"{len(held)} held-out prompts")
        print(f"plot: {path}")
    return rows


def main(argv: list[str]) -> None:
    try:
        dc = gpt.config_from_args(LoRADemoConfig, argv, __doc__, "lora.py")
        run_demo(dc)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # bad input: one clear line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
