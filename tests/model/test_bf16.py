"""bf16 end to end on the CPU: the dtype users run (``make run`` takes bf16 wherever the CPU
has it), through the engine, with every bf16 CPU path: the fused ops (RMSNorm with its add,
RoPE, SiLU·up, the greedy argmax straight from the hidden states) and the reference ops they
replace, the AMX prefill kernel and the reference prefill every other CPU takes.

Token equality with transformers is not the bar in bf16: two correct bf16 implementations
round differently, and greedy choices at near-ties flip. The bar is teacher forcing:
transformers in bf16 scores the very sequence pagoda produced, and each pagoda token must be
transformers' top choice or within ``MARGIN_STEPS`` bf16 rounding steps of it (the step of
the top logit's magnitude: 0.125 at SmolLM2's logits near 20, 0.0156 at the tiny models'
near 2). Measured, the largest gap is two steps on SmolLM2 and under one on the tiny models;
a real bug (a wrong kernel, a stray KV read, a RoPE at the wrong position) puts tokens
far further below the top, which the mutations in ``test_bf16_guard_catches_bugs`` show.
"""
from __future__ import annotations

import copy
import os
import random
from typing import Callable

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.attention import cpu_attention, cpu_decode, torch_ref
from pagoda.kernels import cpu_fused, ext
from pagoda.models import cpu_bf16, cpu_linear
from pagoda.models.loader import default_model_path
from pagoda.worker import model_runner
from tiny_models import TINY_VOCAB, linear_kinds, make_model

from native import needs_ext

BF16 = torch.bfloat16
MARGIN_STEPS = 4         # bf16 steps a token may lie below transformers' top choice
DIVERGENCE_STEPS = 4     # fp32's two candidates where bf16 parts ways, in the same steps
BF16_MANTISSA_BITS = 7
NEW_TOKENS = 24
FUSED_OPS = ("add_rms_norm", "rope_", "silu_mul")
# Greedy straight from the hidden states, in either form (sampler.greedy_from_hidden: the
# packed output projection and a row argmax for a few rows, else greedy_tokens).
FUSED_GREEDY = "greedy_from_hidden"

pytestmark = [needs_ext, pytest.mark.usefixtures("one_thread")]


def greedy(max_tokens: int) -> SamplingParams:
    # ignore_eos rather than min_tokens: plain greedy, so the fused greedy path may run.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def teacher_forced_gaps(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """For each of ``tokens`` (generated after ``prompt``), how far its logit lies below
    transformers' top logit at that position, given everything before it, in bf16 steps of
    the top logit's magnitude: (len(tokens),)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    top = logits.max(dim=-1).values
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    step = torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-3))) - BF16_MANTISSA_BITS)
    return (top - chosen) / step


def assert_teacher_forced(hf, prompts: list[list[int]], outs: list) -> None:
    for n, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.finish_reason == "length"
        gaps = teacher_forced_gaps(hf, prompt, out.token_ids)
        worst = int(gaps.argmax())
        assert gaps[worst] <= MARGIN_STEPS, (
            f"prompt {n}: token {worst} ({out.token_ids[worst]}) is {gaps[worst]:.1f} bf16 "
            f"steps below transformers' top choice (allowed {MARGIN_STEPS}); "
            f"{int((gaps > 0).sum())} of {len(gaps)} tokens are not its top choice")


class PathSpy:
    """Counts calls of the fused ops and of the two bf16 prefill paths during a run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}
        for name in FUSED_OPS:
            monkeypatch.setattr(cpu_fused, name, self._counting(name, getattr(cpu_fused, name)))
        monkeypatch.setattr(torch_ref, "prefill_chunks",
                            self._counting("reference_prefill", torch_ref.prefill_chunks))
        real = model_runner.greedy_from_hidden

        def greedy(*args, **kwargs):
            tokens = real(*args, **kwargs)
            if tokens is not None:
                self.calls[FUSED_GREEDY] = self.calls.get(FUSED_GREEDY, 0) + 1
            return tokens

        monkeypatch.setattr(model_runner, "greedy_from_hidden", greedy)
        mod = ext.extension()
        monkeypatch.setattr(mod, "amx_paged_attention",
                            self._counting("amx_prefill", mod.amx_paged_attention))

    def _counting(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def check(self, fused: bool, tiles: bool) -> None:
        """``tiles``: prefill chunks went to the tile kernel (AMX or AVX512-BF16)."""
        for name in (*FUSED_OPS, FUSED_GREEDY):
            assert (self.calls.get(name, 0) > 0) == fused, (name, self.calls)
        assert (self.calls.get("amx_prefill", 0) > 0) == tiles, self.calls
        assert (self.calls.get("reference_prefill", 0) > 0) == (not tiles), self.calls


# ------------------------------------------------------------------ tiny random models
# Head dim 16 is one the AMX kernel cannot take (its prefill goes to the reference), 32 one
# it takes.
TINY = {"llama-d16": ("llama", 16), "qwen3-d32": ("qwen3", 32)}
SHARED = [random.Random(11).randrange(3, TINY_VOCAB) for _ in range(40)]
MODES = {
    "default": {},
    "chunked": dict(max_num_batched_tokens=7, block_size=4),
    # 12 blocks x 8 tokens cannot hold all four requests at once: forces preemption.
    "preempt": dict(block_size=8, num_kv_blocks=12, max_num_batched_tokens=32),
    # The prompts share 40 tokens; a second pass over them hits the whole prompts.
    "prefix": dict(block_size=8),
}


def tiny_prompts(mode: str) -> list[list[int]]:
    rng = random.Random(5)
    tails = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (3, 17, 9, 30)]
    if mode == "prefix":
        return [SHARED + t for t in tails]
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] + t
            for n, t in zip((1, 20, 40, 33), tails)]


@pytest.fixture(scope="module", params=list(TINY))
def tiny_case(request, tmp_path_factory):
    family, head_dim = TINY[request.param]
    path = make_model(str(tmp_path_factory.mktemp(request.param)), family, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=BF16).eval()
    assert hf.config.head_dim == head_dim
    return path, head_dim, hf


@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_bf16_engine_agrees_with_transformers(tiny_case, mode, amx, fused, monkeypatch):
    path, head_dim, hf = tiny_case
    amx_prefill = amx and cpu_attention.use_amx(torch.device("cpu"), BF16, head_dim)
    assert amx_prefill == (amx and head_dim % cpu_attention.AMX_HEAD_DIM_MULTIPLE == 0)
    tiles = cpu_attention.prefill_kernel(torch.device("cpu"), BF16, BF16, head_dim) != "sdpa"
    prompts = tiny_prompts(mode)
    llm = LLM(path, dtype="bfloat16", **MODES[mode])
    spy = PathSpy(monkeypatch)
    outs = llm.generate(prompts, greedy(NEW_TOKENS))
    assert_teacher_forced(hf, prompts, outs)
    spy.check(fused, tiles)
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    if mode == "prefix":
        again = llm.generate(prompts, greedy(NEW_TOKENS))
        assert all(o.num_cached_tokens >= 32 for o in again), [o.num_cached_tokens for o in again]
        assert_teacher_forced(hf, prompts, again)
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


# Each form cpu_linear.pack_model may give a bf16 linear layer, forced: pagoda's own kernel,
# oneDNN's packed weight, torch's plain one (the layer type each leaves, and the head's).
LINEAR_FORMS = {
    "kernel": ({"PAGODA_BF16_KERNEL": "1"}, cpu_bf16.InvariantLinear),
    "packed": ({"PAGODA_BF16_KERNEL": "0", "PAGODA_PACKED_LINEAR": "1"}, cpu_linear.PackedLinear),
    "plain": ({"PAGODA_BF16_KERNEL": "0", "PAGODA_PACKED_LINEAR": "0"}, torch.nn.Linear),
}


@pytest.mark.parametrize("form", list(LINEAR_FORMS))
def test_tiny_bf16_agrees_with_transformers_on_each_linear_form(tiny_case, form, monkeypatch):
    path, _, hf = tiny_case
    if form == "kernel" and not cpu_bf16.kernel_native():
        pytest.skip("the bf16 kernel runs its portable loop here: never chosen")
    if form == "packed" and not cpu_linear.packing_supported(BF16):
        pytest.skip("oneDNN cannot pack bf16 here")
    env, kind = LINEAR_FORMS[form]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    llm = LLM(path, dtype="bfloat16", **MODES["chunked"])
    model = llm.engine.runner.model
    kinds = linear_kinds(model)
    assert kinds == {kind}
    assert type(model.packed_head) is (type(None) if form == "plain" else kind)
    prompts = tiny_prompts("chunked")
    assert_teacher_forced(hf, prompts, llm.generate(prompts, greedy(NEW_TOKENS)))


def rope_on_q_only(rope: Callable) -> Callable:
    def mutant(q, k, cos, sin, positions):
        rope(q, k.clone(), cos, sin, positions)           # k stays unrotated
    return mutant


def decode_without_newest(decode: Callable) -> Callable:
    def mutant(q, kv_cache, block_tables, seq_lens, scale, out=None, **options):
        return decode(q, kv_cache, block_tables, (seq_lens - 1).clamp_min(1), scale, out=out,
                      **options)
    return mutant


def kv_write_zeroing_some_keys(write: Callable) -> Callable:
    def mutant(kv_cache, k, v, slot_mapping):
        k = k.clone()
        k[::3] = 0
        return write(kv_cache, k, v, slot_mapping)
    return mutant


MUTANTS = {"rope-on-q-only": (lambda: cpu_fused, "rope_", rope_on_q_only),
           "decode-without-newest-token": (lambda: cpu_decode, "paged_decode_attention",
                                           decode_without_newest),
           "kv-write-zeroing-some-keys": (ext.extension, "write_kv",
                                          kv_write_zeroing_some_keys)}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_bf16_guard_catches_bugs(tiny_case, mutant, monkeypatch):
    """The teacher-forced check is a test that can fail: each of three small bugs in the
    bf16 path (RoPE left off k, the decode kernel missing the newest token, a third of the
    keys written as zeros) puts tokens far below transformers' top choice."""
    path, _, hf = tiny_case
    monkeypatch.delenv(cpu_fused.FUSED_ENV, raising=False)
    owner, name, make_mutant = MUTANTS[mutant]
    target = owner()
    monkeypatch.setattr(target, name, make_mutant(getattr(target, name)))
    prompts = tiny_prompts("default")
    outs = LLM(path, dtype="bfloat16").generate(prompts, greedy(NEW_TOKENS))
    with pytest.raises(AssertionError, match="bf16 steps below"):
        assert_teacher_forced(hf, prompts, outs)


# ------------------------------------------------------------------ the bundled SmolLM2
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "List three prime numbers and say why they are prime.",
]
# Chunks of 16 tokens, and 10 blocks of 16 for four ~60-token requests: preemption.
# The bf16 kernels against transformers on the same (dequantized, bf16) weights: the file's
# own 4-bit codes (--quantization auto) are a different rounding of the file's values, and
# are checked against transformers in fp32 (test_smollm2.py, test_gguf_kquant.py).
SMOLLM2_ENGINE = dict(max_num_batched_tokens=16, num_kv_blocks=10, quantization="none")


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    directory, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                             dtype=torch.float32).eval()
    bf16 = copy.deepcopy(fp32).to(BF16)
    prompts = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=False)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    return prompts, fp32, bf16


@pytest.mark.slow
def test_smollm2_bf16_engine_agrees_with_transformers(smollm2, amx, fused, monkeypatch):
    """Under chunked prefill and preemption; then a second pass over the same prompts, which
    hits the prefix cache."""
    prompts, _, hf = smollm2
    amx_prefill = amx and cpu_attention.use_amx(torch.device("cpu"), BF16, 64)
    assert amx_prefill == amx
    tiles = cpu_attention.prefill_kernel(torch.device("cpu"), BF16, BF16, 64) != "sdpa"
    llm = LLM(dtype="bfloat16", **SMOLLM2_ENGINE)
    spy = PathSpy(monkeypatch)
    outs = llm.generate(prompts, greedy(NEW_TOKENS))
    assert_teacher_forced(hf, prompts, outs)
    spy.check(fused, tiles)
    assert llm.engine.scheduler.num_preemptions > 0
    again = llm.generate(prompts, greedy(NEW_TOKENS))
    assert any(o.num_cached_tokens > 0 for o in again)
    assert_teacher_forced(hf, prompts, again)
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_smollm2_bf16_with_speculation_agrees_with_transformers(smollm2, amx):
    """Speculative decoding in bf16: a verified row's positions are decode rows of a larger
    batch than one token's, so bf16 rounds them differently and near-ties may flip, as they
    do when other requests join a batch. The bar is the teacher-forced one, on a prompt the
    model copies (drafts accepted) and on the questions."""
    prompts, _, hf = smollm2
    llm = LLM(dtype="bfloat16", speculative_config={
        "method": "ngram", "num_speculative_tokens": 6, "adaptive": False})
    copy_text = ("Repeat the following text word for word.\n\nThe river rises in the hills "
                 "above the old mill and runs south through the town.")
    prompts = [llm.engine.encode_chat([{"role": "user", "content": copy_text}]), *prompts[:2]]
    outs = llm.generate(prompts, greedy(NEW_TOKENS))
    assert_teacher_forced(hf, prompts, outs)
    assert llm.engine.stats().scheduler.spec.num_accepted_tokens > 5


LONG_RUN = 96


@pytest.mark.slow
def test_smollm2_bf16_follows_fp32_until_a_near_tie(smollm2, record_property):
    """pagoda bf16 against pagoda fp32 over a long greedy run, with the default engine
    settings and paths: the runs may part only where fp32 itself hesitates, its top token and
    bf16's within ``DIVERGENCE_STEPS`` bf16 steps. The first divergence of each prompt is
    reported. The bf16 run also passes the teacher-forced check against transformers."""
    prompts, hf32, hf16 = smollm2
    prompts = prompts[:2]
    runs = {dtype: LLM(dtype=dtype).generate(prompts, greedy(LONG_RUN))
            for dtype in ("float32", "bfloat16")}
    assert_teacher_forced(hf16, prompts, runs["bfloat16"])
    firsts = []
    for n, (prompt, a, b) in enumerate(zip(prompts, runs["float32"], runs["bfloat16"])):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                     None)
        firsts.append(first)
        if first is None:
            continue
        gap = teacher_forced_gaps(hf32, prompt, b.token_ids[:first + 1])[-1]
        assert gap <= DIVERGENCE_STEPS, (
            f"prompt {n}: bf16 left fp32 at token {first} by {gap:.1f} bf16 steps "
            f"(fp32 chose {a.token_ids[first]}, bf16 {b.token_ids[first]})")
    record_property("first_divergence", firsts)
    print(f"bf16 vs fp32, first divergence per prompt (of {LONG_RUN} tokens): {firsts}")


# ------------------------------------------------------------------ fp32 weights, bf16 KV cache
# --kv-cache-dtype bfloat16 with --dtype float32 (the CPU's faster GEMMs where bf16 matmul is
# slow, half the KV bytes): attention runs in bf16, everything else in fp32. The bar is the
# same teacher-forced one, against transformers in fp32.
MIXED = dict(dtype="float32", kv_cache_dtype="bfloat16")


def assert_bf16_cache(llm: LLM) -> None:
    assert llm.engine.dtype == torch.float32 and llm.engine.kv_dtype == BF16
    assert all(c.dtype == BF16 for c in llm.engine.runner.kv_caches)


@pytest.fixture(scope="module")
def tiny_fp32_hf(tiny_case):
    path = tiny_case[0]
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_fp32_with_bf16_kv_agrees_with_transformers(tiny_case, tiny_fp32_hf, mode, amx):
    path = tiny_case[0]
    prompts = tiny_prompts(mode)
    llm = LLM(path, **MIXED, **MODES[mode])
    assert_bf16_cache(llm)
    outs = llm.generate(prompts, greedy(NEW_TOKENS))
    assert_teacher_forced(tiny_fp32_hf, prompts, outs)
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    if mode == "prefix":
        again = llm.generate(prompts, greedy(NEW_TOKENS))
        assert all(o.num_cached_tokens >= 32 for o in again), [o.num_cached_tokens for o in again]
        assert_teacher_forced(tiny_fp32_hf, prompts, again)
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


@pytest.mark.parametrize("mutant", ["decode-without-newest-token", "kv-write-zeroing-some-keys"])
def test_bf16_kv_guard_catches_bugs(tiny_case, tiny_fp32_hf, mutant, monkeypatch):
    owner, name, make_mutant = MUTANTS[mutant]
    target = owner()
    monkeypatch.setattr(target, name, make_mutant(getattr(target, name)))
    prompts = tiny_prompts("default")
    outs = LLM(tiny_case[0], **MIXED).generate(prompts, greedy(NEW_TOKENS))
    with pytest.raises(AssertionError, match="bf16 steps below"):
        assert_teacher_forced(tiny_fp32_hf, prompts, outs)


def test_bf16_kv_cache_holds_twice_the_tokens(tiny_case):
    path = tiny_case[0]
    fp32 = LLM(path, dtype="float32", kv_cache_memory=0.001)
    mixed = LLM(path, **MIXED, kv_cache_memory=0.001)
    # Blocks are whole: the floor of twice the bytes' worth may hold one more.
    assert mixed.engine.num_blocks in (2 * fp32.engine.num_blocks, 2 * fp32.engine.num_blocks + 1)


@pytest.mark.slow
def test_smollm2_fp32_with_bf16_kv_agrees_with_transformers(smollm2):
    """Chunked prefill and preemption, then a second pass that hits the prefix cache."""
    prompts, hf32, _ = smollm2
    llm = LLM(**MIXED, **SMOLLM2_ENGINE)
    assert_bf16_cache(llm)
    outs = llm.generate(prompts, greedy(NEW_TOKENS))
    assert_teacher_forced(hf32, prompts, outs)
    assert llm.engine.scheduler.num_preemptions > 0
    again = llm.generate(prompts, greedy(NEW_TOKENS))
    assert any(o.num_cached_tokens > 0 for o in again)
    assert_teacher_forced(hf32, prompts, again)
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks
