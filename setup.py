"""Installs the single-file modules of this repo (gpt.py, ...) and their dependencies.

    pip install -e .            # torch, numpy, tiktoken, matplotlib
    pip install -e ".[test]"    # + pytest, hypothesis, regex, gguf (for the tests)
"""

from setuptools import setup

setup(
    name="llm-stack",
    version="0.1.0",
    description="Minimal, commented PyTorch implementations of the 2025 LLM stack, trained on TinyStories",
    py_modules=["gpt", "attention_flash", "moe", "muon", "quant"],
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "tiktoken>=0.7", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis", "regex", "gguf"]},
)
