"""The int8 forms of models/cpu_int8.py: a linear layer and the output projection switch to
their int8 weights for steps of at most ``max_rows`` rows (counted without drafts) and keep
the dense ones above; the int8 output projection serves the logits and the sampler's greedy
path alike; through the model runner on a tiny tied-embedding llama whose embedding is on the
Q8_0 grid, greedy fp32 equals transformers' on the same checkpoint, every step through the
int8 head."""
from __future__ import annotations

import os
import random

import pytest
import torch
import transformers
from runner_driver import run_greedy
from safetensors.torch import load_file, save_file
from test_int8_kernel import q8_0_from_weights, random_q
from tiny_models import TINY_VOCAB, make_model
from torch import nn

from pagoda import envs
from pagoda.kernels import ext
from pagoda.models import cpu_int8
from pagoda.models.cpu_int4 import Int4Route
from pagoda.models.cpu_int8 import Int8Head, Int8Linear
from pagoda.models.loader import load_model
from pagoda.models.prepare import prepare_model
from pagoda.models.quantized import QuantizedTensor, concat_rows, dequantize
from pagoda.worker import sampler
from pagoda.worker.model_runner import ModelRunner

pytestmark = [
    pytest.mark.skipif(not ext.available(), reason="C++ extension unavailable"),
    pytest.mark.usefixtures("one_thread"),
]
CPU = torch.device("cpu")


@pytest.fixture
def seed() -> int:
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((got.float() - ref).abs().max() <= 1e-5 * ref.abs().max())


@pytest.mark.parametrize("bias", [False, True])
def test_layer_routes_by_rows_and_route(seed, bias):
    q = random_q(48, 64, 6, 16, False)
    dense = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(dequantize(q) + 0.01)  # a different model, to tell the forms apart
    route = Int4Route()
    layer = Int8Linear(dense, q, route)
    layer.max_rows = 4
    small, big = torch.randn(4, 64), torch.randn(5, 64)
    ref = cpu_int8.reference_linear(small, q) + (0 if dense.bias is None else dense.bias)
    assert close(layer(small), ref), seed
    assert torch.equal(layer(big), dense(big)), seed
    route.rows = 1  # 1 + 4 drafts: the int8 form
    ref_big = cpu_int8.reference_linear(big, q) + (0 if dense.bias is None else dense.bias)
    assert close(layer(big), ref_big), seed
    route.rows = 5
    assert torch.equal(layer(small), dense(small)), seed


def test_fused_parts_compute_each_part(seed):
    """q, k, v of different formats stacked: the fused weight is each part's rows."""
    parts = [random_q(32, 64, 8, 32, False), random_q(16, 64, 5, 32, True),
             random_q(16, 64, 6, 32, False)]
    fused = concat_rows(parts)
    assert fused.shape == (64, 64) and fused.offset is not None
    assert torch.equal(dequantize(fused), torch.cat([dequantize(q) for q in parts]))
    x = torch.randn(3, 64)
    got = cpu_int8.Int8Weight(fused, torch.float32)(x)
    assert close(got, cpu_int8.reference_linear(x, fused)), seed
    mixed = [parts[0], random_q(16, 64, 6, 16, False)]  # groups of 32 and 16: stacked in 16s
    both = concat_rows(mixed)
    assert both.group == 16
    assert torch.equal(dequantize(both), torch.cat([dequantize(q) for q in mixed]))


class TiedHead(nn.Module):
    """What install_int8_head needs of a model: its output weight and packed head."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.output_weight = weight
        self.packed_head: nn.Module | None = None


def test_head_serves_logits_and_greedy_by_the_steps_rows(monkeypatch, seed):
    monkeypatch.setenv(envs.INT4_MAX_ROWS.name, "3")
    vocab, e = 300, 64
    q = q8_0_from_weights(torch.randn(vocab, e))
    weight = (dequantize(q) * 1.01).to(torch.bfloat16)  # the dense form: another model
    model = TiedHead(weight)
    route = Int4Route()
    head = cpu_int8.install_int8_head(model, q, route)  # type: ignore[arg-type]
    assert isinstance(head, Int8Head) and model.packed_head is head and head.max_rows == 3
    rows = [sampler.SamplingRow(sampler.SamplingParams(temperature=0.0), [1, 2], 2, [])] * 5
    for n in (1, 3, 5):
        hidden = torch.randn(n, e).to(torch.bfloat16)
        int8_ref = cpu_int8.reference_linear(hidden, q)
        dense_ref = torch.nn.functional.linear(hidden, weight).float()
        want = int8_ref if n <= 3 else dense_ref
        assert (head(hidden).float() - want).abs().max() <= 2**-7 * want.abs().max(), seed
        tokens = sampler.greedy_from_hidden(hidden, weight, rows[:n], head)
        assert tokens is not None
        assert torch.equal(tokens, want.argmax(-1)), seed
    # Speculation: 2 rows without drafts, 5 with them: the int8 form for all 5.
    route.rows = 2
    hidden = torch.randn(5, e).to(torch.bfloat16)
    tokens = sampler.greedy_from_hidden(hidden, weight, rows, head)
    assert tokens is not None
    assert torch.equal(tokens, cpu_int8.reference_linear(hidden, q).argmax(-1)), seed


def test_a_zero_limit_leaves_the_dense_head(monkeypatch):
    monkeypatch.setenv(envs.INT4_MAX_ROWS.name, "0")
    q = q8_0_from_weights(torch.randn(64, 32))
    model = TiedHead(dequantize(q))
    assert cpu_int8.install_int8_head(model, q) is None  # type: ignore[arg-type]
    assert model.packed_head is None


def on_a_q8_0_grid(src: str) -> QuantizedTensor:
    """Replace the tied embedding of the checkpoint at ``src`` by Q8_0 values whose scales are
    powers of two (so bf16 holds every weight exactly, as fp32 does); returns their codes."""
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    w = tensors["model.embed_tokens.weight"].float()
    q = q8_0_from_weights(w)
    scale = torch.exp2(torch.log2(q.scale).ceil())  # >= d: the codes stay within 127
    codes = (w.view(*scale.shape, 32) / scale[..., None]).round().to(torch.int8)
    q = QuantizedTensor(codes.view(w.shape), scale, None, 32, 8, "Q8_0")
    tensors["model.embed_tokens.weight"] = dequantize(q)
    save_file(tensors, path, metadata={"format": "pt"})
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_greedy_through_the_int8_head(monkeypatch, tmp_path, dtype):
    """Every step on the int8 head (the limit above any step's rows): fp32 greedy equals
    transformers' on the checkpoint; bf16 greedy equals the dense head's (the same weights,
    sums in another order)."""
    path = make_model(str(tmp_path), "llama", seed=5, tie_word_embeddings=True)
    q = on_a_q8_0_grid(path)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (5, 11, 3)]

    def greedy(int8: bool) -> list[list[int]]:
        prepared = prepare_model(load_model(path, dtype, CPU).model, CPU, dtype)
        if int8:
            assert torch.equal(prepared.model.output_weight.float(), dequantize(q))
            head = cpu_int8.install_int8_head(prepared.model, q, prepared.int4_route)
            assert head is not None
            calls = []
            forward = head.int8.forward
            monkeypatch.setattr(head.int8, "forward", lambda x: calls.append(1) or forward(x))
        out = run_greedy(ModelRunner(prepared, 16, 16), prompts, 6)
        if int8:
            assert len(calls) == 6  # every step
        return out

    monkeypatch.setenv(envs.INT4_MAX_ROWS.name, "1000")
    got = greedy(int8=True)
    if dtype == torch.float32:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        want = []
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    else:
        want = greedy(int8=False)
    assert got == want
