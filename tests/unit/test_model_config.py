import json

import pytest
import torch

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.models.config import ModelArch, UnsupportedModelError
from pagoda.models.loader import load_model, resolve_dtype, resolve_kv_cache_dtype

BASE = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def test_unsupported_architecture_is_named():
    cfg = dict(BASE, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelArch.from_hf_config(cfg)


def test_unsupported_rope_scaling_and_activation_are_named():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelArch.from_hf_config(dict(BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelArch.from_hf_config(dict(BASE, hidden_act="gelu"))


def test_family_features_and_rope_parameters():
    qwen3 = ModelArch.from_hf_config(dict(BASE, model_type="qwen3", head_dim=16))
    assert qwen3.qk_norm and qwen3.head_dim == 16 and not qwen3.attention_bias
    assert ModelArch.from_hf_config(dict(BASE, model_type="qwen2")).attention_bias
    # transformers 5 writes rope settings under rope_parameters.
    arch = ModelArch.from_hf_config(dict(BASE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "original_max_position_embeddings": 8192}))
    assert arch.rope_theta == 500000.0 and arch.rope_scaling["factor"] == 8.0
    assert arch.eos_token_ids == ()
    assert ModelArch.from_hf_config(dict(BASE, eos_token_id=[3, 4])).eos_token_ids == (3, 4)


def test_unsupported_dtypes_are_named(tmp_path):
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", torch.device("cpu"))
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, torch_dtype="int4")))
    with pytest.raises(ValueError, match="int4"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(str(tmp_path / "nope"), torch.float32, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    assert SchedulerConfig(8, 4, 100, enable_chunked_prefill=False).step_token_budget == 100
    assert SchedulerConfig(8, 4, 100, enable_chunked_prefill=True).step_token_budget == 8


def test_kv_cache_dtype_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_cache_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_kv_cache_dtype(None, torch.bfloat16, cuda) == torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.bfloat16, cuda) == torch.bfloat16
    fp8 = torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8", torch.float32, cpu) == fp8
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16, cpu) == fp8
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e5m2'"):
        resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16, cpu)
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16, cuda) == fp8   # the Triton kernels
    with pytest.raises(ValueError, match="CPU only"):
        resolve_kv_cache_dtype("fp8", torch.bfloat16, torch.device("mps"))
    with pytest.raises(ValueError, match="bfloat16 or float32 weights"):
        resolve_kv_cache_dtype("fp8", torch.float16, cpu)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_kv_cache_dtype("bfloat16", torch.float32, cuda)
    with pytest.raises(ValueError, match="wider"):
        resolve_kv_cache_dtype("float32", torch.bfloat16, cpu)


@pytest.mark.parametrize("flags, bf16_over_fp32, expected", [
    ("avx2 fma", 7.0, (torch.float32, torch.float32)),
    ("avx512f avx512_bf16 amx_bf16", 3.0, (torch.bfloat16, torch.bfloat16)),
    ("avx512f avx512_bf16", 1.9, (torch.float32, torch.bfloat16)),   # the Xeon without AMX
    ("avx512f avx512_bf16", 0.6, (torch.bfloat16, torch.bfloat16)),  # bf16 matmuls faster
])
def test_dtype_auto_on_the_cpu(monkeypatch, flags, bf16_over_fp32, expected):
    from pagoda.models import loader
    monkeypatch.setattr(loader, "cpu_supports_bf16", lambda: "bf16" in flags)
    monkeypatch.setattr(loader, "cpu_has_amx_bf16", lambda: "amx_bf16" in flags)
    monkeypatch.setattr(loader, "matmul_seconds",
                        lambda dtype: bf16_over_fp32 if dtype is torch.bfloat16 else 1.0)
    loader.auto_cpu_dtypes.cache_clear()
    try:
        cpu = torch.device("cpu")
        weights = resolve_dtype("auto", cpu)
        assert (weights, resolve_kv_cache_dtype("auto", weights, cpu, dtype_auto=True)) == expected
        # An explicit --dtype keeps its own dtype for the cache.
        assert resolve_kv_cache_dtype("auto", torch.float32, cpu) is torch.float32
    finally:
        loader.auto_cpu_dtypes.cache_clear()
