"""The model's ops and attention backend are chosen once, when it is built (models/ops.py,
attention/backend.py ``select``), by device, dtype and the switches PAGODA_FUSED,
PAGODA_ATTENTION and PAGODA_AMX; the forward then asks nothing. Also the metadata's packed
prefill chunks: built once per metadata, whoever built it."""
from __future__ import annotations

import pytest
import torch

from pagoda.attention import backend, cpu_attention, torch_ref
from pagoda.attention.metadata import (AttentionMetadata, ChunkSpan, PrefillChunk,
                                       pack_prefills, pack_spans)
from pagoda.kernels import cpu_fused
from pagoda.models import ops
from pagoda.models.loader import load_model
from pagoda.models.prepare import prepare_model
from pagoda.worker.model_runner import ModelRunner
from runner_driver import run_greedy

from native import has_amx, has_bf16_attention, needs_ext

CPU = torch.device("cpu")
BF16 = torch.bfloat16


def tiny(dtype: torch.dtype, preset: str = "tiny-qwen3"):
    """A loaded model, prepared (its ops bound) as the engine prepares it."""
    model = load_model(None, dtype, CPU, load_format="dummy", model_preset=preset).model
    return prepare_model(model, CPU, dtype).model


def layer_ops(model) -> set[str]:
    """The names of the ops sets bound to every layer norm, attention and MLP."""
    names = {model.norm.ops.name}
    for layer in model.layers:
        names |= {layer.input_layernorm.ops.name, layer.post_attention_layernorm.ops.name,
                  layer.self_attn.ops.name, layer.mlp.ops.name}
    return names


@needs_ext
def test_ops_follow_dtype_and_the_fused_switch(monkeypatch):
    monkeypatch.delenv(cpu_fused.FUSED_ENV, raising=False)
    model = tiny(BF16)
    assert model.ops is ops.CPU_FUSED and layer_ops(model) == {"cpu-fused"}
    assert model.layers[0].self_attn.q_norm.ops is ops.REFERENCE   # per-head: the reference
    assert layer_ops(tiny(torch.float32)) == {"torch"}              # fp32: the reference
    monkeypatch.setenv(cpu_fused.FUSED_ENV, "0")
    model.bind_ops(CPU, BF16)
    assert layer_ops(model) == {"torch"}


def test_triton_rope_only_for_power_of_two_head_dims():
    pytest.importorskip("triton")
    assert ops.triton_ops(64).rope is not ops.rope
    assert ops.triton_ops(96).rope is ops.rope and ops.triton_ops(96).name == "triton"


@needs_ext
def test_attention_backend_follows_the_switches(monkeypatch):
    monkeypatch.delenv(backend.ATTENTION_BACKEND_ENV, raising=False)
    monkeypatch.delenv(cpu_attention.AMX_ENV, raising=False)
    monkeypatch.delenv(cpu_attention.BF16_ATTENTION_ENV, raising=False)
    fp32 = backend.select(CPU, torch.float32, torch.float32, 64)
    assert fp32.name == "cpp-decode+sdpa" and not fp32.uses_packed_prefills
    bf16 = backend.select(CPU, BF16, BF16, 64)
    assert bf16.uses_packed_prefills == (has_amx() or has_bf16_attention())
    assert bf16.name.endswith("amx-prefill") == has_amx()
    assert not backend.select(CPU, BF16, BF16, 16).uses_packed_prefills   # head dim 16: no
    monkeypatch.setenv(cpu_attention.AMX_ENV, "0")
    no_amx = backend.select(CPU, BF16, BF16, 64)
    assert no_amx.name == ("cpp-decode+avx512bf16-prefill" if has_bf16_attention()
                           else "cpp-decode+sdpa")
    monkeypatch.setenv(cpu_attention.BF16_ATTENTION_ENV, "0")
    assert backend.select(CPU, BF16, BF16, 64).name == "cpp-decode+sdpa"
    monkeypatch.setenv(backend.ATTENTION_BACKEND_ENV, "torch")
    assert backend.select(CPU, BF16, BF16, 64) is backend.TORCH
    assert backend.select(torch.device("cuda"), BF16, BF16, 64) is backend.TORCH


def test_a_narrower_cache_runs_attention_in_its_dtype(monkeypatch):
    """fp32 weights over a bf16 cache: q, k, v rounded to bf16, the output widened back;
    over an fp8 cache the queries keep the model's dtype. A layer's window and softcap pass
    through."""
    monkeypatch.setenv(backend.ATTENTION_BACKEND_ENV, "torch")
    seen: list[tuple] = []

    def spy(q, k, v, kv_cache, meta, scale, *, window=0, softcap=0.0):
        seen.append((q.dtype, window, softcap))
        return q.clone()

    monkeypatch.setattr(backend, "TORCH", backend.AttentionBackend("torch", spy))
    narrowed = backend.select(CPU, torch.float32, BF16, 64)
    q = torch.randn(3, 2, 64)
    out = narrowed.forward(q, q[:, :1], q[:, :1], torch.empty(0, dtype=BF16), None, 1.0,
                           window=5, softcap=2.0)
    assert seen == [(BF16, 5, 2.0)] and out.dtype == torch.float32
    assert backend.select(CPU, torch.float32, torch_ref.FP8, 64) is backend.TORCH


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_the_forward_asks_nothing(monkeypatch, dtype):
    """Once the runner has bound the model, a step reads no switch and calls no chooser."""
    model = tiny(dtype)
    prompts = [[7, 8, 9, 10, 11], list(range(40, 77))]
    want = run_greedy(ModelRunner(prepare_model(model, CPU, dtype), 16, 16), prompts, 3)
    runner = ModelRunner(prepare_model(model, CPU, dtype), 16, 16)

    def asked(*args, **kwargs):
        raise AssertionError("dispatch in the forward")

    for owner, name in [(ops, "select"), (backend, "select"), (backend, "use_triton"),
                        (cpu_attention, "use_cpu_kernels"), (cpu_attention, "prefill_kernel"),
                        (cpu_attention, "_amx_enabled")]:
        monkeypatch.setattr(owner, name, asked)
    assert run_greedy(runner, prompts, 3) == want


def test_hand_built_metadata_packs_its_prefills_once():
    chunks = [PrefillChunk(2, 3, 3, torch.tensor([4])),
              PrefillChunk(5, 2, 18, torch.tensor([1, 6]))]
    meta = AttentionMetadata(torch.zeros(7, dtype=torch.int64), 2,
                             torch.zeros(2, 1, dtype=torch.int64),
                             torch.ones(2, dtype=torch.int64), 1, chunks, 16)
    packed = meta.packed(CPU)
    assert packed is meta.packed(CPU) is meta.packed_prefills        # kept, not repacked
    assert packed.query_start_loc.tolist() == [0, 3, 5]
    assert packed.context_lens.tolist() == [3, 18]
    assert packed.block_tables.tolist() == [[4, 0], [1, 6]] and packed.max_query_len == 3
    spans = pack_spans([ChunkSpan(2, 3, 3, [4]), ChunkSpan(5, 2, 18, [1, 6])], CPU)
    again = pack_prefills(meta, CPU)
    for a, b in ((spans, packed), (again, packed)):
        assert all(torch.equal(x, y) for x, y in zip(
            (a.query_start_loc, a.context_lens, a.block_tables),
            (b.query_start_loc, b.context_lens, b.block_tables)))
    empty = AttentionMetadata(torch.zeros(1, dtype=torch.int64), 1,
                              torch.zeros(1, 1, dtype=torch.int64),
                              torch.ones(1, dtype=torch.int64), 1, [], 16)
    assert empty.packed(CPU) is None
