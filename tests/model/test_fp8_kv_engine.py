"""The fp8 (e4m3) KV cache through the engine (``--kv-cache-dtype fp8``), on the tiny random
models of test_bf16, in every scheduling mode (chunked prefill, preemption, prefix hits).

Rounding K/V to e4m3 changes the answer, so transformers is not the bar. The bars:
- fp32 weights over an fp8 cache: the C++ kernels and the PyTorch reference backend
  (``PAGODA_ATTENTION=torch``) read the same rounded values and compute in fp32, so their
  greedy tokens are identical;
- bf16 weights over an fp8 cache, through the AMX prefill kernel where the CPU has it and the
  reference elsewhere: transformers in bf16 scores pagoda's tokens (teacher forcing) and each
  must lie within ``FP8_MARGIN_STEPS`` bf16 steps of its top choice, a bar that the mutants
  of test_bf16 (a decode that skips the newest token, a KV write that zeroes keys) fail;
- the pool holds twice the tokens of a bf16 one, and no block leaks.
"""
from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.attention.cpu_attention import ATTENTION_BACKEND_ENV
from test_bf16 import (MODES, MUTANTS, NEW_TOKENS, assert_teacher_forced, greedy,  # noqa: F401
                       tiny_case, tiny_prompts)
import test_bf16

from native import needs_ext

FP8 = torch.float8_e4m3fn
FP8_MARGIN_STEPS = 24   # measured on the tiny models: at most 17; the mutants below, 44 to 136

pytestmark = [needs_ext, pytest.mark.usefixtures("one_thread")]


def run(path: str, prompts: list[list[int]], **kwargs) -> tuple[LLM, list]:
    llm = LLM(path, kv_cache_dtype="fp8", **kwargs)
    assert llm.engine.kv_dtype == FP8
    assert all(c.dtype == FP8 for c in llm.engine.runner.kv_caches)
    outs = llm.generate(prompts, greedy(NEW_TOKENS))
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks
    return llm, outs


@pytest.mark.parametrize("mode", list(MODES))
def test_fp32_weights_kernels_match_the_reference_backend(tiny_case, mode, monkeypatch):
    path = tiny_case[0]
    prompts = tiny_prompts(mode)
    _, ours = run(path, prompts, dtype="float32", **MODES[mode])
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    _, ref = run(path, prompts, dtype="float32", **MODES[mode])
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in ref]


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_weights_stay_near_transformers(tiny_case, mode, amx):
    path, _, hf = tiny_case
    prompts = tiny_prompts(mode)
    llm, outs = run(path, prompts, dtype="bfloat16", **MODES[mode])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(test_bf16, "MARGIN_STEPS", FP8_MARGIN_STEPS)
        assert_teacher_forced(hf, prompts, [o.outputs[0] for o in outs])
    if mode == "prefix":
        again = llm.generate(prompts, greedy(NEW_TOKENS))
        assert all(o.num_cached_tokens >= 32 for o in again)


@pytest.mark.parametrize("mutant", ["decode-without-newest-token", "kv-write-zeroing-some-keys"])
def test_the_fp8_bar_catches_bugs(tiny_case, mutant, monkeypatch):
    owner, name, make_mutant = MUTANTS[mutant]
    target = owner()
    monkeypatch.setattr(target, name, make_mutant(getattr(target, name)))
    path, _, hf = tiny_case
    prompts = tiny_prompts("default")
    _, outs = run(path, prompts, dtype="bfloat16")
    monkeypatch.setattr(test_bf16, "MARGIN_STEPS", FP8_MARGIN_STEPS)
    with pytest.raises(AssertionError, match="bf16 steps below"):
        assert_teacher_forced(hf, prompts, [o.outputs[0] for o in outs])


def test_fp8_cache_holds_twice_the_tokens(tiny_case):
    path = tiny_case[0]
    bf16 = LLM(path, dtype="bfloat16", kv_cache_memory=0.001)
    fp8 = LLM(path, dtype="bfloat16", kv_cache_dtype="fp8", kv_cache_memory=0.001)
    # Blocks are whole: the floor of twice the bytes' worth may hold one more.
    assert fp8.engine.num_blocks in (2 * bf16.engine.num_blocks, 2 * bf16.engine.num_blocks + 1)
