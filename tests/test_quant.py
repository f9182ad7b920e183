"""Tests for quant.py: every format against an independent reference (llama.cpp's C loops transcribed,
the gguf package's NumPy quantizers, hand-computed blocks), error bounds, edge cases, QuantLinear,
quantized models that still generate, and AWQ (GGUF files: tests/test_pretrained.py)."""

import ctypes
import ctypes.util
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import quant
from conftest import tiny_config

gguf = pytest.importorskip("gguf")  # test-only dependency (pip install gguf)
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

FORMATS = [s for s in quant.SCHEMES if not s.startswith("awq")]
GGML = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "mxfp4": GT.MXFP4}


def roundtrip(scheme: str, w: torch.Tensor) -> torch.Tensor:
    q = quant.SCHEMES[scheme][0](w)
    return quant.SCHEMES[scheme][1](q, tuple(w.shape))


def weights(seed: int, N: int = 64, K: int = 256, scale: float = 0.05) -> torch.Tensor:
    """Gaussian with 3% of entries 4x larger (trained weights are heavy-tailed); with N > 2 also a
    zero row and a block holding one outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * scale * (1 + 3 * (torch.rand(N, K, generator=g) > 0.97))
    if N > 2:
        w[1] = 0.0
        w[2, 7] = 20 * scale
    return w


# -----------------------------------------------------------------------------------------------
# llama.cpp's reference quantizers, transcribed loop for loop from ggml-quants.c in float32 NumPy
# scalars (the independent reference for the vectorised torch code)


def c_quantize_row_q8_0(x: np.ndarray) -> bytes:
    out = b""
    for blk in x.astype(np.float32).reshape(-1, 32):
        amax = np.float32(0)
        for v in blk:
            amax = max(amax, abs(v))
        d = np.float32(amax / np.float32(127))
        id_ = np.float32(1) / d if d else np.float32(0)
        qs = []
        for v in blk:
            x0 = np.float32(v * id_)
            # roundf: ties away from zero (|x0| + 0.5 is exact in float64 for a float32 x0 <= 127)
            qs.append(int(math.copysign(math.floor(abs(x0) + 0.5), x0)))
        out += np.float16(d).tobytes() + np.array(qs, dtype=np.int8).tobytes()
    return out


def c_quantize_row_q4_0(x: np.ndarray) -> bytes:
    out = b""
    for blk in x.astype(np.float32).reshape(-1, 32):
        amax, mx = np.float32(0), np.float32(0)
        for v in blk:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = np.float32(mx / np.float32(-8))
        id_ = np.float32(1) / d if d else np.float32(0)
        qs = bytearray(16)
        for j in range(16):
            x0 = np.float32(blk[j] * id_)
            x1 = np.float32(blk[16 + j] * id_)
            xi0 = min(15, int(np.trunc(np.float32(x0 + np.float32(8.5)))))  # (int8_t) truncates
            xi1 = min(15, int(np.trunc(np.float32(x1 + np.float32(8.5)))))
            qs[j] = xi0 | (xi1 << 4)
        out += np.float16(d).tobytes() + bytes(qs)
    return out


def c_quantize_row_q4_1(x: np.ndarray) -> bytes:
    out = b""
    for blk in x.astype(np.float32).reshape(-1, 32):
        mn, mx = np.float32(np.finfo(np.float32).max), np.float32(-np.finfo(np.float32).max)  # FLT_MAX
        for v in blk:
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = np.float32((mx - mn) / np.float32(15))
        id_ = np.float32(1) / d if d else np.float32(0)
        qs = bytearray(16)
        for j in range(16):
            x0 = np.float32((blk[j] - mn) * id_)
            x1 = np.float32((blk[16 + j] - mn) * id_)
            xi0 = min(15, int(np.trunc(np.float32(x0 + np.float32(0.5)))))  # (int8_t) truncates
            xi1 = min(15, int(np.trunc(np.float32(x1 + np.float32(0.5)))))
            qs[j] = xi0 | (xi1 << 4)
        out += np.float16(d).tobytes() + np.float16(mn).tobytes() + bytes(qs)
    return out


KVALUES_MXFP4 = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]  # ggml-common.h, E2M1 * 2


def _load_log2f():
    """The C library's float32 log2f, the function ggml calls (not Python's float64 math.log2, which is
    not rounded to float32 and so misses the values just below a power of two)."""
    try:
        f = ctypes.CDLL(ctypes.util.find_library("m")).log2f
    except (OSError, AttributeError, TypeError):
        return None
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return f


LOG2F = _load_log2f()


def c_floorf_log2f(amax: float) -> int:
    """floorf(log2f(amax)) in C float32 arithmetic, through ctypes."""
    if LOG2F is None:
        pytest.skip("needs the C library's log2f through ctypes")
    return math.floor(LOG2F(float(amax)))  # the float32 result, exactly, as a Python float


def c_quantize_row_mxfp4(x: np.ndarray) -> bytes:
    out = b""
    for blk in x.astype(np.float32).reshape(-1, 32):
        amax = np.float32(0)
        for v in blk:
            if amax < abs(v):
                amax = abs(v)
        e = c_floorf_log2f(amax) - 2 + 127 if amax > 0 else 0
        d = np.float32(2.0 ** (e - 128))  # GGML_E8M0_TO_FP32_HALF
        codes = []
        for v in blk:
            best, best_err = 0, abs(np.float32(KVALUES_MXFP4[0] * d) - v)
            for i in range(1, 16):
                err = abs(np.float32(KVALUES_MXFP4[i] * d) - v)
                if err < best_err:
                    best, best_err = i, err
            codes.append(best)
        out += bytes([e]) + bytes(codes[j] | (codes[16 + j] << 4) for j in range(16))
    return out


C_REF = {"q8_0": c_quantize_row_q8_0, "q4_0": c_quantize_row_q4_0, "q4_1": c_quantize_row_q4_1,
         "mxfp4": c_quantize_row_mxfp4}


def tricky_rows() -> torch.Tensor:
    """Blocks that hit the rounding rules: exact .5 ties after scaling, the sign of the extreme
    value, repeated maxima, zeros, powers of two, E2M1 midpoints."""
    rows = [
        torch.arange(-16, 16).float() / 4,  # x/d hits many ties
        torch.cat([torch.tensor([-8.0, 8.0]), torch.arange(30).float() / 4 - 3.5]),  # tie of |max|
        torch.tensor([6.0, -6.0, 0.75, 0.25, 5.0, -1.5, 7.0, -0.25] * 4),  # E2M1 ties
        torch.zeros(32),
        torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5] + [0.0] * 26),
        torch.full((32,), -3.0),
        torch.cat([torch.tensor([0.0, 15.0]), torch.arange(30).float() / 2]),  # Q4_1: d = 1, ties at .5
    ]
    return torch.stack(rows)  # (7, 32)


# -----------------------------------------------------------------------------------------------
# GGML formats: byte-identical to llama.cpp


@pytest.mark.parametrize("scheme", list(GGML))
@pytest.mark.parametrize("case", ["random", "tricky", "scales"])
def test_ggml_bytes_match_c_reference_and_gguf(scheme, case):
    if case == "random":
        w = weights(0, 8, 64)
    elif case == "tricky":
        w = tricky_rows()
    else:  # the same block at scales from 1e-4 to 1e4
        w = torch.cat([weights(1, 1, 64) * 10.0 ** p for p in range(-4, 5)])
    ours = quant.SCHEMES[scheme][0](w)["blocks"].numpy().tobytes()
    assert ours == C_REF[scheme](w.numpy())
    ref = gguf_quantize(w.numpy(), GGML[scheme])
    assert ours == ref.tobytes()
    back = quant.SCHEMES[scheme][1](quant.SCHEMES[scheme][0](w), tuple(w.shape))
    np.testing.assert_array_equal(back.numpy(), gguf_dequantize(ref, GGML[scheme]).reshape(w.shape))


def test_ggml_bytes_match_gguf_on_large_matrix():
    w = weights(2, 256, 512)
    for scheme, t in GGML.items():
        ours = quant.SCHEMES[scheme][0](w)["blocks"].numpy().tobytes()
        assert ours == gguf_quantize(w.numpy(), t).tobytes()


# -----------------------------------------------------------------------------------------------
# Hand-computed blocks (bytes and values)


def test_q8_0_hand_block():
    x = torch.tensor([127.0, 2.5, -2.5, 0.5, -1.0] + [0.0] * 27)[None]  # d = 127/127 = 1
    b = quant.quantize_q8_0(x)["blocks"][0]
    assert bytes(b[:2].tolist()) == b"\x00\x3c"  # fp16 1.0 = 0x3C00, little-endian
    assert b[2:7].view(torch.int8).tolist() == [127, 3, -3, 1, -1]  # roundf: ties away from zero
    assert quant.dequantize_q8_0(dict(blocks=b[None]), (1, 32))[0, :5].tolist() == [127, 3, -3, 1, -1]


def test_q4_0_hand_block():
    lo = [8.0, -8.0, 0.5, -0.5, 7.0, 3.0, -7.6, 1.2] + [0.0] * 8
    hi = [7.4, 7.6, -1.0] + [0.0] * 13
    x = torch.tensor(lo + hi)[None]  # max = the first largest |x|, with its sign: +8 -> d = 8 / -8 = -1
    b = quant.quantize_q4_0(x)["blocks"][0]
    assert bytes(b[:2].tolist()) == b"\x00\xbc"  # fp16 -1.0 = 0xBC00, little-endian
    # q = min(15, trunc(x / d + 8.5)) = min(15, trunc(8.5 - x)):
    # 8 -> 0, -8 -> 16 -> 15 (clipped), .5 -> 8, -.5 -> 9, 7 -> 1, 3 -> 5, -7.6 -> 15, 1.2 -> 7, 0 -> 8
    q_lo = [0, 15, 8, 9, 1, 5, 15, 7] + [8] * 8
    q_hi = [1, 0, 9] + [8] * 13  # 7.4 -> 1, 7.6 -> 0, -1 -> 9
    assert b[2:].tolist() == [a | (c << 4) for a, c in zip(q_lo, q_hi)]  # x[j] low, x[j+16] high nibble
    back = quant.dequantize_q4_0(dict(blocks=b[None]), (1, 32))[0]  # (q - 8) * d
    assert back[:8].tolist() == [8, -7, 0, -1, 7, 3, -7, 1] and back[16:19].tolist() == [7, 8, -1]


def test_q4_1_hand_block():
    lo = [-1.0, 14.0, -0.5, 0.5, 6.4, 6.6, 13.6, 2.0] + [-1.0] * 8
    hi = [14.0, 0.0, 2.5] + [-1.0] * 13
    x = torch.tensor(lo + hi)[None]  # min -1, max 14: d = 15 / 15 = 1, m = -1
    b = quant.quantize_q4_1(x)["blocks"][0]
    assert bytes(b[:4].tolist()) == b"\x00\x3c\x00\xbc"  # fp16 d = 1.0 (0x3C00), m = -1.0 (0xBC00)
    # q = min(15, trunc(x - min + 0.5)): ties round up (-0.5 -> 0.5 -> 1, 0.5 -> 1.5 -> 2)
    q_lo = [0, 15, 1, 2, 7, 8, 15, 3] + [0] * 8
    q_hi = [15, 1, 4] + [0] * 13  # 2.5 -> 3.5 -> 4
    assert b[4:].tolist() == [a | (c << 4) for a, c in zip(q_lo, q_hi)]
    back = quant.dequantize_q4_1(dict(blocks=b[None]), (1, 32))[0]  # q * d + m
    assert back[:8].tolist() == [-1, 14, 0, 1, 6, 7, 14, 2] and back[16:19].tolist() == [14, 0, 3]


def test_mxfp4_hand_block():
    x = torch.tensor([6.0, -6.0, 0.5, 0.75, 0.25, 5.0, -1.5, 7.0] + [0.0] * 24)[None]
    b = quant.quantize_mxfp4(x)["blocks"][0]
    assert b[0] == 127  # amax 7 -> floor(log2 7) = 2 -> e = 2 - 2 + 127: scale 2^0 = 1
    # codes: 6 -> 7, -6 -> 8|7, 0.5 -> 1, 0.75 (tie 0.5|1) -> 1, 0.25 (tie 0|0.5) -> 0, 5 (tie 4|6) -> 6 (=4),
    # -1.5 -> 8|3, 7 -> 7 (saturates at 6)
    codes = [7, 15, 1, 1, 0, 6, 11, 7] + [0] * 8
    assert b[1:].tolist() == codes  # the high nibbles hold elements 16..31, all 0
    back = quant.dequantize_mxfp4(dict(blocks=b[None]), (1, 32))[0]
    assert back[:8].tolist() == [6, -6, 0.5, 0.5, 0, 4, -1.5, 6]


def test_mxfp4_block_just_below_a_power_of_two():
    x = torch.zeros(1, 32)
    x[0, 0] = float(np.nextafter(np.float32(16), np.float32(0)))  # 16 - 2^-20, the block's amax
    x[0, 1] = -6.0
    b = quant.quantize_mxfp4(x)["blocks"][0]
    # float32 log2f(16 - 2^-20) = 4.0 exactly (the true 4 - 8.6e-8 is within half a float32 step of 4),
    # so e = 4 - 2 + 127 = 129 and X = 4; the binary exponent (frexp) would give 128, X = 2, and the
    # value would saturate to 6X = 12
    assert b[0] == 129
    assert b[1:3].tolist() == [6, 8 | 3] and b[3:].tolist() == [0] * 14  # 16- -> 4X (code 6), -6 -> -1.5X
    assert bytes(b.tolist()) == c_quantize_row_mxfp4(x.numpy())
    back = quant.dequantize_mxfp4(dict(blocks=b[None]), (1, 32))[0]
    assert back[:2].tolist() == [16.0, -6.0]


def neighbours_of_powers_of_two(below: int, above: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 values (n_powers, below) just under and (n_powers, above) from each power of two
    2^-124 .. 2^128 (2^128 itself is inf: the values under it end at the largest float32). Below 2^-124
    C's (uint8_t) cast of a negative e would be undefined."""
    powers = np.array([np.float32(2.0 ** k).view(np.uint32) if k < 128 else 0x7F800000
                       for k in range(-124, 129)], dtype=np.uint32)
    under = powers[:, None] - np.arange(1, below + 1, dtype=np.uint32)  # (n, below), nearest first
    over = powers[:-1, None] + np.arange(above, dtype=np.uint32)  # (n - 1, above)
    return under.view(np.float32), over.view(np.float32)


def test_mxfp4_exponent_is_float32_log2f_near_every_power_of_two():
    """ggml's e = floorf(log2f(amax)) - 2 + 127 with a float32 log2f, against the C library's log2f, on
    every float32 from 128 steps under to 16 steps over each power of two. Under 2^k, log2f rounds up
    to exactly k for the nearest few values (up to 44 of them, at |k| >= 64): there e is one more than
    the binary exponent (frexp) gives. The window reaches past them: at its far end, C agrees with frexp,
    and log2f is monotone, so no value further down can differ."""
    under, over = neighbours_of_powers_of_two(128, 16)
    x = np.concatenate([under.ravel(), over.ravel()])
    want = np.array([c_floorf_log2f(v) - 2 + 127 for v in x])
    binary = torch.frexp(torch.from_numpy(x)).exponent.numpy() - 1 - 2 + 127
    rounded_up = want != binary
    assert rounded_up.sum() > 7000 and not rounded_up[under.size:].any()  # only under the powers
    assert not rounded_up[:under.size].reshape(under.shape)[:, -1].any()  # the window's far end
    w = torch.zeros(len(x), 32)
    w[:, 0] = torch.from_numpy(x)  # one nonzero per block: amax = x
    got = quant.quantize_mxfp4(w)["blocks"][:, 0].numpy()
    assert np.array_equal(got, want), f"{int((got != want).sum())} exponent bytes differ from C"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_ggml_fp16_scale_at_the_top_of_fp16(fmt):
    """A scale d that rounds to fp16's largest finite value, 65504, is stored as ggml stores it (0x7BFF,
    or 0xFBFF for Q4_0's negative d); only a d that rounds to fp16 inf (|d| >= 65520) is refused."""
    # Q8_0: d = amax / 127; Q4_0: d = max / -8, with the signed max. Integers below 2^24 are exact.
    finite = [65504 * 127, 8321039] if fmt == "q8_0" else [-65504 * 8, 524159.9375, -524159.9375]
    overflow = 8321040 if fmt == "q8_0" else -524160  # d = 65520 exactly: the midpoint, even is inf
    for top in finite:
        w = torch.tensor([top, top / 3, -top / 7, 1.0] + [0.0] * 28)[None]
        ours = quant.SCHEMES[fmt][0](w)["blocks"]
        assert ours[0, :2].tolist() in ([0xFF, 0x7B], [0xFF, 0xFB]), (top, ours[0, :2])  # +-65504
        ref = gguf_quantize(w.numpy(), GGML[fmt]).tobytes()
        assert ours.numpy().tobytes() == C_REF[fmt](w.numpy()) == ref
        back = quant.SCHEMES[fmt][1](dict(blocks=ours), (1, 32))
        assert bool(torch.isfinite(back).all()) and abs(float(back[0, 0]) - top) <= abs(top) / 100
    w = torch.tensor([float(overflow)] + [0.0] * 31)[None]
    with np.errstate(over="ignore"):
        assert C_REF[fmt](w.numpy())[:2] in (b"\x00\x7c", b"\x00\xfc")  # C would store +-inf
    with pytest.raises(ValueError, match="overflows the fp16 scale/value field"):
        quant.SCHEMES[fmt][0](w)


def test_int8_hand_row():
    q = quant.quantize_int8(torch.tensor([[254.0, -127.0, 1.0, 0.0]]))
    assert q["scale"].tolist() == [2.0] and q["q"].tolist() == [[127, -64, 0, 0]]  # ties to even


def test_int8_outlier_hand_row():
    q = quant.quantize_int8_outlier(torch.tensor([[100.0, 1.0, -1.0, 0.5]]), frac=0.25)
    assert q["idx"].tolist() == [0] and q["val"].tolist() == [100.0]
    assert q["q"].tolist() == [[0, 127, -127, 64]]  # scale 1/127 from the inliers; 63.5 -> 64 (even)
    back = quant.dequantize_int8_outlier(q, (1, 4))
    assert back[0, 0] == 100.0 and abs(back[0, 3] - 64 / 127) < 1e-7


def test_int4_hand_group():
    q = quant.quantize_int4(torch.tensor([[-1.0, 0.0, 2.0, 3.5], [-1.0, -2.0, -3.0, -4.5]]), G=4)
    s = float(np.float16(4.5 / 15))  # 0.2999267578125 for both groups
    assert q["s"].tolist() == [[s], [s]]
    # row 0: z = round(1 / s) = 3, q = round(x / s + 3) = [0, 3, 10, 15]
    # row 1 (all negative, the range is stretched to include 0): z = round(4.5 / s) = 15, q = [12, 8, 5, 0]
    assert q["z"].tolist() == [3 | 15 << 4] and q["q"].tolist() == [0x30, 0xFA, 0x8C, 0x05]
    np.testing.assert_allclose(quant.dequantize_int4(q, (2, 4)).numpy(),
                               [[-3 * s, 0, 7 * s, 12 * s], [-3 * s, -7 * s, -10 * s, -15 * s]])


def test_nf4_hand_block():
    x = torch.zeros(1, 64)
    x[0, :5] = torch.tensor([1.0, -1.0, 0.07958029955625534, 0.6, -0.1])
    q = quant.quantize_nf4(x)
    # one block: absmax 1 = its mean, so c2 = 0 and absmax is recovered exactly
    assert q["offset"].tolist() == [1.0] and q["absmax_q"].float().tolist() == [0.0]
    # codes 15 (1.0), 0 (-1.0), 8 (0.0796), 13 (0.6 -> 0.5626), 6 (-0.1 -> -0.0911), 7 (0.0) ...
    assert q["q"][:3].tolist() == [15 | 0 << 4, 8 | 13 << 4, 6 | 7 << 4]
    back = quant.dequantize_nf4(q, (1, 64))[0]
    assert back[3].item() == pytest.approx(0.5626170039176941) and back[5:].abs().max() == 0


def test_fp8_hand_block():
    w = torch.tensor([[448.0, 1.0, 0.3], [17.0, -2.0, 0.0]])
    q = quant.quantize_fp8(w)
    assert q["scale"].tolist() == [[1.0]]  # amax 448 / 448
    # E4M3 bytes: 448 = 0 1111 110, 1 = 0 0111 000, 0.3 -> 0.3125 = 0 0101 010, 17 -> 16 (tie to even)
    assert q["q"].view(torch.uint8).tolist() == [[0x7E, 0x38, 0x2A], [0x58, 0xC0, 0x00]]
    assert quant.dequantize_fp8(q, (2, 3)).tolist() == [[448, 1, 0.3125], [16, -2, 0]]


# -----------------------------------------------------------------------------------------------
# Error bounds: each format's worst case, per element


def error_bound(scheme: str, w: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |w - w_hat| from the format's layout (see quant.py's comments)."""
    N, K = w.shape
    if scheme in ("int8", "int8_outlier"):  # half a step of the row's grid (with outliers: the inliers')
        return (w.abs().amax(1, keepdim=True) / 127 / 2 * 1.0001).expand(N, K)
    if scheme == "q8_0":  # half a step + the fp16 rounding of d times |q| <= 127
        d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
        return (d * (0.5 + 127 * 2.0 ** -11) + 1e-30).expand(-1, 32).reshape(N, K)
    if scheme == "q4_0":  # the opposite extreme clips from +8d to +7d: one full step
        d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 8
        return (d * (1 + 8 * 2.0 ** -11) + 1e-30).expand(-1, 32).reshape(N, K)
    if scheme == "q4_1":  # half a step of (max - min) / 15, + the fp16 rounding of d (x |q| <= 15) and m
        a = w.reshape(-1, 32)
        lo, d = a.amin(1, keepdim=True), (a.amax(1, keepdim=True) - a.amin(1, keepdim=True)) / 15
        return (d * (0.5 + 15 * 2.0 ** -11) + lo.abs() * 2.0 ** -11 + 1e-30).expand(-1, 32).reshape(N, K)
    if scheme == "mxfp4":  # half the E2M1 spacing at the value's magnitude; 6X..8X saturate (<= 2X)
        a = w.reshape(-1, 32)
        e = torch.log2(a.abs().amax(1, keepdim=True).double()).float().floor()  # floorf(log2f(amax))
        X = torch.ldexp(torch.ones_like(a[:, :1]), e - 2)
        m = a.abs() / X
        half_gap = torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, torch.where(m < 6, 1.0, 2.0)))
        return (half_gap * X).reshape(N, K)
    if scheme.startswith("int4"):  # half a step, + 15 x the fp16 rounding of s (clamped extremes)
        G = int(scheme.split("_g")[1])
        x = F.pad(w, (0, -K % G)).view(N, -1, G)
        s = (x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)) / 15
        return (s * (0.5 + 16 * 2.0 ** -11))[..., None].expand(-1, -1, G).reshape(N, -1)[:, :K] + 1e-30
    if scheme == "nf4":  # half the widest NF4 gap (0.3038 between -1 and -0.696) x absmax, + absmax error
        a = w.flatten().view(-1, 64).abs().amax(1, keepdim=True)
        da = (a - a.mean()).abs() * 2.0 ** -4 * 1.01  # absmax - mean stored in E4M3: 2^-4 relative
        return ((a + da) * 0.3038 / 2 + da).expand(-1, 64).reshape(N, K)
    if scheme == "fp8":  # E4M3: 2^-4 relative (3 mantissa bits), subnormals 2^-10 x scale absolute
        return w.abs() * 2.0 ** -4 + 2.0 ** -10 * w.abs().max() / 448 + 1e-30
    raise KeyError(scheme)


@pytest.mark.parametrize("scheme", FORMATS)
@pytest.mark.parametrize("seed,scale", [(0, 0.02), (1, 1.0), (2, 300.0)])
def test_roundtrip_error_within_bound(scheme, seed, scale):
    w = weights(seed, 64, 256, scale)
    err = (roundtrip(scheme, w) - w).abs()
    bound = error_bound(scheme, w)
    assert bool((err <= bound).all()), f"{scheme}: max excess {float((err - bound).max())}"
    # the bound is tight, not loose: on a uniform grid rounding errors are ~uniform, mean ~ half the bound
    assert float(err.mean()) < 0.6 * float(bound.mean())
    if scheme not in ("nf4", "mxfp4", "fp8"):  # (non-uniform grids: the bound is set by the widest gap)
        assert float(err.mean()) > 0.2 * float(bound.mean())


@pytest.mark.parametrize("scheme", ["int4_g64", "int4_g128", "fp8", "nf4", "int8"])
def test_shapes_not_multiple_of_the_block(scheme):
    w = weights(3, 100, 352)  # 352 = SwiGLU hidden of C=128: not a multiple of 64, 128 or 128x128
    assert bool(((roundtrip(scheme, w) - w).abs() <= error_bound(scheme, w)).all())


def test_ggml_formats_reject_bad_block_size():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        quant.quantize_q4_0(torch.randn(4, 48))


# -----------------------------------------------------------------------------------------------
# Edge cases: zeros, tiny and huge values, NaN / Inf


@pytest.mark.parametrize("scheme", FORMATS)
def test_all_zero_weights_are_exact(scheme):
    w = torch.zeros(32, 128)
    assert torch.equal(roundtrip(scheme, w), w)


@pytest.mark.parametrize("scheme", FORMATS)
def test_tiny_values_stay_finite_and_small(scheme):
    w = weights(4, 32, 128, scale=1e-7)  # below fp16's normal range (6e-5): fp16 scales underflow
    back = roundtrip(scheme, w)
    assert bool(torch.isfinite(back).all())
    assert float((back - w).abs().max()) <= float(w.abs().max())  # at worst flushed to zero


@pytest.mark.parametrize("scheme", FORMATS)
def test_huge_values(scheme):
    w = weights(5, 32, 128, scale=1e5)  # amax ~ 2e6: x/127 fits fp16, x/15 or x/8 does not
    # fp16 scale or values
    fp16_limited = {"q4_0", "q4_1", "int4_g32", "int4_g64", "int4_g128", "int8_outlier"}
    if scheme in fp16_limited:
        with pytest.raises(ValueError, match="overflows the fp16 scale/value field"):
            quant.SCHEMES[scheme][0](w)
        return
    err = (roundtrip(scheme, w) - w).abs()
    assert bool((err <= error_bound(scheme, w)).all())
    if scheme == "q8_0":
        with pytest.raises(ValueError, match="overflows the fp16 scale/value field"):
            quant.quantize_q8_0(w * 100)


@pytest.mark.parametrize("scheme", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise(scheme, bad):
    w = weights(6, 32, 128)
    w[3, 17] = bad
    with pytest.raises(ValueError, match=r"non-finite value\(s\) \(first at index \(3, 17\)\)"):
        quant.SCHEMES[scheme][0](w)


# -----------------------------------------------------------------------------------------------
# Bits per weight: counted from the stored bytes, equal to the layout's formula


@pytest.mark.parametrize("N,K", [(256, 128), (128, 352), (8192, 128)])
def test_bits_per_weight_match_layout(N, K):
    w = weights(7, N, K)
    n = N * K
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    expect = {
        "int8": 8 + 32 / K, "int8_outlier": 8 + 32 / K + 48 * round(0.005 * n) / n, "q8_0": 8.5,
        "q4_0": 4.5, "q4_1": 5.0, "mxfp4": 4.25,
        "nf4": (4 * n + 8 * ceil(n, 64) + 32 * ceil(ceil(n, 64), 256) + 32) / n,
        "fp8": 8 + 32 * ceil(N, 128) * ceil(K, 128) / n,
        # codes over the padded (N, Kp) + fp16 scales + 4-bit zero points (padded to whole bytes)
        **{f"int4_g{G}": (4 * N * ceil(K, G) * G + 16 * N * ceil(K, G) + 8 * ceil(N * ceil(K, G), 2)) / n
           for G in (32, 64, 128)},
    }
    for scheme in FORMATS:
        got = quant.storage_bits(quant.SCHEMES[scheme][0](w)) / n
        assert got == pytest.approx(expect[scheme], rel=1e-9), scheme
        assert quant.layout_bits(scheme, N, K) == quant.storage_bits(quant.SCHEMES[scheme][0](w)), scheme
    assert expect["int4_g128"] == pytest.approx(4 + 20 / 128) if K % 128 == 0 else True
    if n % (64 * 256) == 0:
        assert expect["nf4"] == pytest.approx(4.127, abs=1e-3)  # QLoRA section 3's 4.127


# -----------------------------------------------------------------------------------------------
# QuantLinear


@pytest.mark.parametrize("scheme", FORMATS)
def test_quantlinear_equals_dequantized_matmul(scheme):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    ql = quant.QuantLinear(lin, scheme)
    x = torch.randn(3, 5, 128)
    w_hat = ql.dequantize()
    xin = quant.fake_quant_fp8_activation(x) if scheme == "fp8" else x
    torch.testing.assert_close(ql(x), F.linear(xin, w_hat, lin.bias), rtol=0, atol=0)
    # and close to the float layer, within the weight error's effect
    ref = lin(x).detach()
    rel = float((ql(x) - ref).norm() / ref.norm())
    tol = 0.02 if scheme in ("int8", "int8_outlier", "q8_0") else 0.05 if scheme == "fp8" else 0.2
    assert rel < tol, rel  # fp8 also rounds the activations
    assert not any(p.requires_grad for p in ql.parameters())
    assert {n for n, _ in ql.named_buffers()} >= set(ql.names)


def test_fp8_activation_tiles():
    x = torch.randn(2, 300) * torch.logspace(-3, 3, 300)  # 3 tiles of 128 with very different ranges
    xq = quant.fake_quant_fp8_activation(x)
    tiles = F.pad(x, (0, 84)).view(2, 3, 128)
    tile_scale = (tiles.abs().amax(-1) / 448).repeat_interleave(128, -1)[:, :300]  # (2, 300)
    bound = x.abs() * 2.0 ** -4 + tile_scale * 2.0 ** -10
    assert bool(((xq - x).abs() <= bound).all())


# -----------------------------------------------------------------------------------------------
# A real (tiny) model trained on TinyStories, quantized


@pytest.fixture(scope="module")
def trained(tokenizer, train_tokens):
    """gpt.py's tiny test model trained briefly on TinyStories (a bare loop: gpt.train would also
    evaluate on the whole validation split, which this file does not need)."""
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config())
    tc = gpt.TrainConfig(lr=1e-2, weight_decay=0.0)
    opt = gpt.make_adamw(model, tc)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = gpt.get_batch(train_tokens, gpt.batch_offsets(gen, len(train_tokens), 64, 16, 1, 1, 0)[0], 64)
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), tokenizer[0]


@pytest.fixture(scope="module")
def val_batch(val_tokens):
    offsets = torch.arange(0, 16 * 64 * 4, 64 * 4)[:16]
    return gpt.get_batch(val_tokens, offsets, 64)  # (16, 64) each


@pytest.fixture(scope="module")
def calib(train_tokens):
    return gpt.get_batch(train_tokens, torch.arange(8) * 5000, 64)[0]  # (8, 64)


def test_tiny_model_learned(trained, val_batch):
    model, _ = trained
    cfg = model.cfg
    untrained = gpt.GPT(cfg).eval()
    with torch.no_grad():
        loss, loss0 = model(*val_batch)[1].item(), untrained(*val_batch)[1].item()
    assert loss < loss0 - 2.0, (loss, loss0)  # ln(8192) = 9.0 at init


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_quantized_model_still_works(trained, val_batch, calib, scheme):
    model, enc = trained
    qm = quant.quantize_model(model, scheme, calib=calib, awq_grid=4)
    ql = [m for m in qm.modules() if isinstance(m, quant.QuantLinear)]
    assert len(ql) == 7 * model.cfg.n_layer  # wq wk wv wo w1 w2 w3; the tied head stays fp32
    assert qm.output.weight is qm.tok_embeddings.weight
    assert not any(isinstance(m, quant.QuantLinear) for m in model.modules())  # original untouched
    with torch.no_grad():
        loss, loss_q = model(*val_batch)[1].item(), qm(*val_batch)[1].item()
    tol = 0.01 if scheme in ("int8", "int8_outlier", "q8_0", "fp8") else 0.1
    assert abs(loss_q - loss) < tol * loss, (scheme, loss, loss_q)
    out = gpt.generate(qm, enc.encode_ordinary("Once upon a time"), 20, temperature=0)[0]
    assert len(out) > 0 and all(0 <= t < enc.n_vocab for t in out)
    assert quant.model_bytes(qm) < quant.model_bytes(model)


def test_quantize_model_rejects_unknown_and_needs_calibration(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="unknown scheme"):
        quant.quantize_model(model, "q3_k")
    with pytest.raises(ValueError, match="needs calibration tokens"):
        quant.quantize_model(model, "awq_g64")


# -----------------------------------------------------------------------------------------------
# AWQ


def awq_fold_targets(model: gpt.GPT, i: int) -> dict[str, torch.Tensor]:
    """The tensor each of layer i's AWQ groups folds its x / s into (see quant.apply_awq)."""
    blk = model.layers[i]
    return {"qkv": blk.attention_norm.weight, "o": blk.attention.wv.weight,
            "gate_up": blk.ffn_norm.weight, "down": blk.feed_forward.w3.weight}


def test_awq_folding_keeps_the_function(trained, val_batch, calib, monkeypatch):
    model, _ = trained
    x = val_batch[0]
    # The search: whichever alpha it picks for a group (this can differ between CPUs), alpha = 0 means
    # s = 1 and leaves the group's fold target bit for bit, alpha > 0 changes it; the function stays.
    scaled, alphas = quant.apply_awq(model, calib, G=32, grid=4)
    assert len(alphas) == 4 * model.cfg.n_layer
    for i in range(model.cfg.n_layer):
        before, after = awq_fold_targets(model, i), awq_fold_targets(scaled, i)
        for group, t in before.items():
            assert torch.equal(after[group], t) == (alphas[f"layers.{i}.{group}"] == 0), (i, group)
    with torch.no_grad():  # in float arithmetic x W^T = (x / s)(W s)^T: same logits
        torch.testing.assert_close(scaled(x)[0], model(x)[0], rtol=1e-4, atol=1e-4)
    # Arbitrary positive scales in place of the search's (shared across the query heads of a kv head
    # for wo, as the search shares them): every fold target changes, the function does not.
    gen = torch.Generator().manual_seed(0)

    def random_scales(weights, x, G, grid=20, share=None):
        if share is None:
            return torch.rand(x.shape[1], generator=gen) + 0.5, 0.5, []
        nkv, g, hs = share
        return (torch.rand(nkv, 1, hs, generator=gen) + 0.5).expand(nkv, g, hs).reshape(-1), 0.5, []

    monkeypatch.setattr(quant, "awq_search", random_scales)
    scaled, _ = quant.apply_awq(model, calib, G=32, grid=4)
    for i in range(model.cfg.n_layer):
        before, after = awq_fold_targets(model, i), awq_fold_targets(scaled, i)
        assert not any(torch.equal(after[group], t) for group, t in before.items()), i
    with torch.no_grad():
        torch.testing.assert_close(scaled(x)[0], model(x)[0], rtol=1e-4, atol=1e-4)


def test_awq_search_no_worse_than_rtn_on_calibration(trained, calib):
    model, _ = trained
    xs = quant.collect_linear_inputs(model, calib)
    for name in ("layers.0.feed_forward.w2", "layers.1.attention.wq"):
        w = model.get_submodule(name).weight.detach()
        s, alpha, errs = quant.awq_search([w], xs[name], G=32, grid=10)
        assert len(errs) == 11 and min(errs) <= errs[0]  # errs[0]: alpha = 0, s = 1 = plain RTN
        x = xs[name]
        rtn = quant.dequantize_int4(quant.quantize_int4(w, 32), tuple(w.shape))
        assert errs[0] == pytest.approx(float(((x @ rtn.T - x @ w.T) ** 2).mean()), rel=1e-5)


def test_awq_needs_llama_preset(calib):
    model = gpt.GPT(tiny_config(mlp="gelu"))
    with pytest.raises(ValueError, match="llama preset"):
        quant.apply_awq(model, calib, 32)
