"""A K-quant GGUF served as the file stores it (--quantization auto): a tiny random llama
written as llama.cpp's converter and quantize tool would (Q/K rows permuted; Q4_K, Q6_K and
Q8_0 tensors by a Q4_K_M-like mix), loaded with each matrix on the file's own codes, gives in
fp32 the greedy tokens transformers gives on the file dequantized by the ``gguf`` package;
``none`` and ``auto`` pick the layers they should, and the loaded codes are the file's."""
import os
import random

import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from gguf_writer import write_gguf
from pagoda import LLM
from pagoda.models import cpu_int4, cpu_int8
from pagoda.models.gguf_loader import load_gguf
from pagoda.models.quantized import dequantize
from tiny_models import TINY_VOCAB, greedy, hf_greedy, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Rows of 256 (K-quant super-blocks): hidden 256, MLP 512, head_dim 64.
SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64)
# q/k/o/gate/up Q4_K (4-bit kernel; q/k fused with a Q6_K v: int8), v and down Q6_K, the
# embedding Q8_0, the untied output projection Q6_K (int8 head).
MIX = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K,
       "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q8_0,
       "output": Q.Q6_K}
LENS, MAX_TOKENS = [3, 17, 40], [20, 9, 14]
ALL_ROWS = {"PAGODA_INT4_MAX_ROWS": str(1 << 20)}  # every step on the file's codes


def mix_type(gguf_name: str) -> Q:
    return MIX[gguf_name.split(".")[-2]]


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("kquant")), "llama", seed=71, **SHAPES)
    write_gguf(path, f"{path}/model.gguf", types=mix_type)
    rng = random.Random(71)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf",
                                                           dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    return f"{path}/model.gguf", prompts, refs


def quantized_modules(llm: LLM) -> dict[str, str]:
    model = llm.engine.model_runner.model
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, (cpu_int4.Int4Linear, cpu_int8.Int8Linear))}
    head = model.packed_head
    kinds["head"] = type(head).__name__ if head is not None else "dense"
    return kinds


@pytest.mark.parametrize("mode", ["auto", "auto-budget7", "auto-int8", "none"])
def test_kquant_greedy_matches_transformers(kquant, mode, monkeypatch):
    """``auto-int8``: the Q4_K codes on the int8 kernel, two a byte (else the 4-bit kernel)."""
    path, prompts, refs = kquant
    for key, value in ALL_ROWS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PAGODA_INT8_FOR_4BIT", "1" if mode.endswith("int8") else "0")
    extra = dict(max_num_batched_tokens=7) if mode.endswith("budget7") else {}
    llm = LLM(path, dtype="float32", quantization=mode.split("-")[0], **extra)
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs
    kinds = quantized_modules(llm)
    if mode == "none":
        assert set(kinds) == {"head"} and kinds["head"] != "Int8Head"
        assert llm.engine.quantization is None
    else:
        assert llm.engine.quantization == "auto"
        for layer in range(2):
            assert kinds[f"layers.{layer}.self_attn.qkv_proj"] == "Int8Linear"  # Q4_K + Q6_K
            four_bit = "Int8Linear" if mode.endswith("int8") else "Int4Linear"
            assert kinds[f"layers.{layer}.self_attn.o_proj"] == four_bit
            assert kinds[f"layers.{layer}.mlp.gate_up_proj"] == four_bit
            assert kinds[f"layers.{layer}.mlp.down_proj"] == "Int8Linear"
        assert kinds["head"] == "Int8Head"


def test_loaded_codes_are_the_file_s(kquant, monkeypatch):
    """Every quantized matrix dequantizes to the tensor the loader dequantizes (which the
    unit tests hold to gguf's), Q/K rows unpermuted alike; fused shards stack in order. The
    layers kept plain (``PAGODA_PACKED_LINEAR=0``), to read their weights: timed at load, a
    busy machine may pick oneDNN's packed form, which keeps none."""
    monkeypatch.setenv("PAGODA_PACKED_LINEAR", "0")
    path, _, _ = kquant
    ckpt = load_gguf(path, codes=True)
    assert {q.source for q in ckpt.quantized.values()} == {"Q4_K", "Q6_K", "Q8_0"}
    for name, q in ckpt.quantized.items():
        assert torch.equal(dequantize(q), ckpt.tensors[name]), name
    llm = LLM(path, dtype="float32", quantization="none")
    model = llm.engine.model_runner.model
    by_module = model.quantized_linears(ckpt.quantized)
    qkv = by_module["layers.1.self_attn.qkv_proj"]
    assert qkv.source == "Q4_K+Q6_K" and qkv.group == 16
    assert torch.equal(dequantize(qkv), model.layers[1].self_attn.qkv_proj.weight)
    assert torch.equal(dequantize(by_module["lm_head"]), model.lm_head.weight)


def test_deterministic_runs_auto_as_none(kquant):
    path, prompts, refs = kquant
    llm = LLM(path, dtype="float32", deterministic=True)
    kinds = quantized_modules(llm)
    assert llm.engine.quantization is None
    assert set(kinds) == {"head"} and kinds["head"] != "Int8Head"
    outs = llm.generate(prompts[:1], [greedy(MAX_TOKENS[0])])
    assert outs[0].token_ids == refs[0]


def test_lora_wraps_the_quantized_layers(kquant, monkeypatch):
    """--enable-lora over a K-quant file: each adapter slot wraps the layer in its quantized
    form; with no adapter asked for, the tokens are the base model's."""
    path, prompts, refs = kquant
    for key, value in ALL_ROWS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PAGODA_INT8_FOR_4BIT", "0")  # Q4_K on the 4-bit kernel
    llm = LLM(path, dtype="float32", enable_lora=True, max_lora_rank=8)
    model = llm.engine.model_runner.model
    bases = {type(model.get_submodule(f"layers.0.{p}").base).__name__
             for p in ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert bases == {"Int4Linear", "Int8Linear"}
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS])
    assert [o.token_ids for o in outs] == refs


def test_the_stored_type_names_the_weights_format(kquant, monkeypatch):
    """Under auto the engine names the type most weights are stored in (what Ollama shows as
    the quantization level); under none, the dtype."""
    from pagoda.entrypoints.ollama.models import _quantization, _weights

    path, _, _ = kquant
    monkeypatch.setenv("PAGODA_INT4_MAX_ROWS", "8")  # the quantized forms kept
    auto = LLM(path, dtype="float32").engine
    assert auto.quantization == "auto" and auto.weights_format == "Q4_K"
    assert _quantization(auto) == "Q4_K"
    assert _weights(auto, path)[1] == os.path.getsize(path)  # a GGUF's size on disk
    none = LLM(path, dtype="float32", quantization="none").engine
    assert none.weights_format is None and _quantization(none) == "F32"
