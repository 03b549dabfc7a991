"""Linear layers with oneDNN-packed weights (models/cpu_linear.py): the same products as
F.linear to fp32 rounding, every linear layer but the output projection replaced, and an
fp32 engine with every layer packed still greedy-identical to transformers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from pagoda import LLM, SamplingParams
from pagoda.models import cpu_linear
from pagoda.models.cpu_linear import PACKED_LINEAR_ENV, PackedLinear
from tiny_models import TINY_VOCAB, linear_kinds, make_model

pytestmark = [pytest.mark.skipif(not cpu_linear.packing_supported(torch.float32),
                                 reason="this torch build has no oneDNN"),
              pytest.mark.usefixtures("random_seed")]


@pytest.mark.parametrize("rows", [1, 7, 33, 400])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows, bias):
    w = torch.randn(320, 96) * 0.1
    b = torch.randn(320) if bias else None
    x = torch.randn(rows, 96)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = PackedLinear.of(w, b)(x)
    assert got.shape == (rows, 320) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_packed")), "qwen2", seed=1)


def test_pack_model_replaces_every_linear_but_the_head(tiny, monkeypatch):
    monkeypatch.setenv(PACKED_LINEAR_ENV, "1")
    llm = LLM(tiny, dtype="float32")
    model = llm.engine.runner.model
    kinds = linear_kinds(model)
    assert kinds == {PackedLinear}
    assert model.layers[0].self_attn.qkv_proj.bias is not None        # Qwen2's QKV bias kept
    assert type(model.lm_head) is torch.nn.Linear and model.packed_head is not None
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")
    plain = LLM(tiny, dtype="float32").engine.runner.model
    assert type(plain.layers[0].mlp.down_proj) is torch.nn.Linear and plain.packed_head is None


@pytest.mark.parametrize("mode", ["0", "1"])
def test_fp32_engine_greedy_equals_transformers_packed_or_not(tiny, mode, monkeypatch):
    monkeypatch.setenv(PACKED_LINEAR_ENV, mode)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    prompts = [[(7 * i + 3) % TINY_VOCAB for i in range(n)] for n in (5, 23, 61)]
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20,
                        do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    outs = LLM(tiny, dtype="float32", max_num_batched_tokens=16).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=20))
    assert [o.token_ids for o in outs] == refs
