"""4-bit experts for mixture-of-experts models (``--quantization int4``; models/moe.py,
models/cpu_int4.py): each expert's GEMMs compute ``x @ dequantize(quantize(W)).T`` both on the
4-bit kernel (few rows) and dequantized on the fly (many rows); through the engine, greedy fp32
tokens equal transformers' on a checkpoint whose weights were replaced by what the codes stand
for; the loaded experts hold the 4-bit bytes only, never the dense ones."""
from __future__ import annotations

import os
import random
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import TINY_VOCAB, greedy, hf_greedy, make_model

from pagoda import LLM
from pagoda.models import cpu_int4, moe
from pagoda.models.cpu_int4 import Int4Stack
from pagoda.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# Experts 64 wide: the kernel needs whole groups of 32 inputs (the families' tests use 48).
CASES = {
    "qwen3_moe": ("qwen3_moe", dict(moe_intermediate_size=64)),
    "mixtral": ("mixtral", dict(intermediate_size=64)),
}
PROMPT_LENS = [3, 17, 40, 64]
MAX_TOKENS = [24, 9, 17, 30]
EXPERT_NAME = re.compile(r".*\.experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)\.weight")
ALL_ROWS = "100000"  # PAGODA_INT4_MAX_ROWS: every product on the 4-bit kernel


@pytest.fixture
def seed() -> int:
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory) -> str:
    family, overrides = CASES[request.param]
    return make_model(str(tmp_path_factory.mktemp(request.param)), family, seed=31, **overrides)


def sparse_layers(model: torch.nn.Module) -> list[moe.SparseMoE]:
    return [m for m in model.modules() if isinstance(m, moe.SparseMoE)]


def rounded(w: torch.Tensor) -> torch.Tensor:
    return cpu_int4.dequantize(*cpu_int4.quantize(w)).to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("regime", ["kernel", "dequantized"])
def test_experts_compute_x_at_the_dequantized_weights(checkpoint, regime, dtype, seed,
                                                      monkeypatch):
    """A sparse layer of 4-bit experts against the same layer with dense experts holding
    ``dequantize(quantize(W))``, on 40 tokens (10 rows an expert on average), with the row
    limit forced so that every product takes the named regime."""
    dense = load_model(checkpoint, dtype, CPU).model
    quantized = load_model(checkpoint, dtype, CPU, quantization="int4").model
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, ALL_ROWS if regime == "kernel" else "0")
    cpu_int4.choose_expert_max_rows(cpu_int4.int4_experts(quantized), dtype)
    calls = {"kernel": 0}
    kernel = Int4Stack.kernel

    def counting(self, expert, x):
        calls["kernel"] += 1
        return kernel(self, expert, x)

    monkeypatch.setattr(Int4Stack, "kernel", counting)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ref, layer in zip(sparse_layers(dense), sparse_layers(quantized), strict=True):
        assert layer.int4 is not None and ref.int4 is None
        with torch.no_grad():
            ref.gate_up.copy_(torch.stack([rounded(w) for w in ref.gate_up]))
            ref.down.copy_(torch.stack([rounded(w) for w in ref.down]))
        x = torch.randn(40, ref.hidden_size).to(dtype)
        with torch.no_grad():
            want, got = ref(x).float(), layer(x).float()
        assert torch.isfinite(got).all()
        err = (got - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), (regime, dtype, err, seed)
    # Each active expert runs gate_up and down: 2 kernel calls each, or none at all.
    assert (calls["kernel"] > 0) == (regime == "kernel"), calls


def test_loaded_experts_hold_the_4bit_bytes_only(checkpoint):
    """The experts' bytes after loading with int4 are the 4-bit size (codes, and a scale and
    zero per group in the model's dtype), a third of bf16's; the dense stacks are empty."""
    for load_format in ("auto", "dummy"):
        model = load_model(checkpoint, torch.bfloat16, CPU, load_format=load_format,
                           quantization="int4").model
        for layer in sparse_layers(model):
            n, e, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
            weights = n * (2 * i * e + e * i)
            held = sum(t.numel() * t.element_size()
                       for t in [*layer.parameters(), *layer.buffers()])
            router = layer.gate.weight.numel() * layer.gate.weight.element_size()
            assert layer.gate_up.numel() == layer.down.numel() == 0
            assert held - router == weights * cpu_int4.bytes_per_weight(torch.bfloat16)
            assert held - router <= 0.32 * weights * 2, "more than 4-bit: a dense copy"
            assert layer.int4 is not None and layer.int4.waiting == 0


def test_dummy_experts_are_drawn_and_finite(checkpoint):
    model = load_model(checkpoint, torch.bfloat16, CPU, load_format="dummy",
                       quantization="int4", seed=5).model
    layer = sparse_layers(model)[0]
    assert layer.int4 is not None
    w = layer.int4.gate_up.dequantized(0).float()
    assert torch.isfinite(w).all() and 0.01 < w.std().item() < 0.04  # N(0, 0.02^2), rounded
    assert not torch.equal(w, layer.int4.gate_up.dequantized(1).float())


def rounded_copy(src: str, dst: str, names: re.Pattern) -> str:
    """``src`` with every weight whose name matches ``names`` replaced by its 4-bit rounding."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    for name, w in tensors.items():
        if names.fullmatch(name):
            tensors[name] = rounded(w)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


# (PAGODA_INT4_MAX_ROWS, which weights the reference rounds): every product on the 4-bit
# kernel, projections and experts alike; or none (0): the projections stay dense and the
# experts are dequantized on the fly, so only the experts are rounded.
REGIMES = {
    "all-kernel": (ALL_ROWS, re.compile(r".*(_proj|\.experts\.\d+\.w[123])\.weight")),
    "experts-dequantized": ("0", EXPERT_NAME),
}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("mode", ["default", "preempt"])
def test_engine_greedy_matches_transformers_on_rounded_weights(checkpoint, regime, mode,
                                                               tmp_path, monkeypatch):
    rows, names = REGIMES[regime]
    ref_path = rounded_copy(checkpoint, str(tmp_path / "rounded"), names)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert refs != [hf_greedy(plain, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)], \
        "the 4-bit rounding must change the answer, or this test cannot tell the forms apart"
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, rows)
    kwargs = {} if mode == "default" else dict(block_size=8, num_kv_blocks=12,
                                               max_num_batched_tokens=32)
    llm = LLM(checkpoint, dtype="float32", quantization="int4", **kwargs)
    assert all(m.int4 is not None for m in sparse_layers(llm.engine.runner.model))
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS], use_tqdm=False)
    llm.engine.check_invariants()
    assert [list(o.outputs[0].token_ids) for o in outs] == refs
