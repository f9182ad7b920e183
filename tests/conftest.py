"""Shared fixtures: the bundled TinyStories, tokenized once per session, and tiny configs that train
in seconds on a CPU. Later files (attention_flash, moe, muon, quant, dpo) reuse them."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import gpt  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~20 s on a 2-core CPU (run by default)")


@pytest.fixture(scope="session")
def tokenizer():
    """The default trimmed GPT-2 tokenizer (8,192 tokens) and its kept GPT-2 ranks."""
    return gpt.build_tokenizer(8192)


@pytest.fixture(scope="session")
def gpt2():
    return gpt.gpt2_tokenizer()


@pytest.fixture(scope="session")
def train_tokens(tokenizer) -> np.ndarray:
    return gpt.load_tokens("train", tokenizer[0])


@pytest.fixture(scope="session")
def val_tokens(tokenizer) -> np.ndarray:
    return gpt.load_tokens("valid", tokenizer[0])


def tiny_config(**overrides) -> gpt.GPTConfig:
    """A 2-layer, 64-wide model: ~0.6M parameters, most of them the 8,192 x 64 embedding."""
    kw = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64)
    kw.update(overrides)
    return gpt.GPTConfig(**kw)


def tiny_train_config(out_dir, **overrides) -> gpt.TrainConfig:
    kw = dict(batch_size=8, max_iters=20, warmup_iters=5, lr=3e-3, eval_interval=10_000,
              eval_tokens=4096, log_interval=10, out_dir=str(out_dir), ckpt_interval=10_000)
    kw.update(overrides)
    return gpt.TrainConfig(**kw)


@pytest.fixture
def tiny_cfg() -> gpt.GPTConfig:
    return tiny_config()
