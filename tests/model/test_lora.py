"""Multi-LoRA (lora/): random PEFT adapters written by peft on tiny Llama, Qwen3, Gemma and
Phi-3 models; greedy fp32 tokens of every adapter, in batches that mix three adapters and the
base, equal transformers + peft (``PeftModel``) on the same files, under chunked prefill,
preemption and prefix-cache hits. Also: rows never read another slot's weights (the others
poisoned), one step really runs several adapters through one grouped call, the base weights
are never merged, and the scheduler holds adapters beyond --max-loras back without losing
anyone."""
from __future__ import annotations

import random
import re

import pytest
import torch
import transformers

from pagoda import LLM, LoRARequest, SamplingParams
from pagoda.lora import punica
from pagoda.lora.layers import LoRALinear
from tiny_lora import make_adapter, peft_model
from tiny_models import TINY_VOCAB, greedy, hf_greedy, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# family: the three adapters' (rank, targets); Phi-3's modules are fused in the checkpoint.
FAMILIES = {
    "llama": [(8, ["q_proj", "v_proj"]), (16, ALL_LLAMA), (8, ["o_proj", "down_proj", "up_proj"])],
    "qwen3": [(16, ["q_proj", "k_proj"]), (8, ALL_LLAMA), (16, ["gate_proj", "down_proj"])],
    "gemma2": [(8, ["q_proj", "v_proj", "o_proj"]), (16, ALL_LLAMA), (8, ["gate_proj"])],
    "phi3": [(8, ["qkv_proj"]), (16, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
             (8, ["gate_up_proj"])],
}
LENS = [5, 17, 33, 9]
NEW = 12
MODES = {
    "default": {},
    "budget7": dict(max_num_batched_tokens=7),
    "preempt": dict(block_size=8, num_kv_blocks=16, max_num_batched_tokens=32),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"lora-{name}")
    seed = 70 + list(FAMILIES).index(name)
    base = make_model(str(root / "base"), name, seed=seed)
    adapters = [
        make_adapter(base, str(root / f"a{i}"), r=r, targets=t, seed=seed + i + 1)
        for i, (r, t) in enumerate(FAMILIES[name])
    ]
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    refs = {None: [hf_greedy(hf, p, NEW) for p in prompts]}
    for path in adapters:
        pm = peft_model(base, path)
        refs[path] = [hf_greedy(pm, p, NEW) for p in prompts]
    return base, adapters, prompts, refs


def requests(adapters: list[str]) -> list[LoRARequest]:
    return [LoRARequest(f"ad{i}", i + 1, path) for i, path in enumerate(adapters)]


def mixed(prompts, adapters, refs):
    """Every prompt under the base and under each adapter, interleaved: (prompts, loras,
    expected tokens)."""
    loras = [None, *requests(adapters)]
    ps, ls, want = [], [], []
    for i, p in enumerate(prompts):
        for j in range(len(loras)):
            lora = loras[(i + j) % len(loras)]
            ps.append(p)
            ls.append(lora)
            want.append(refs[None if lora is None else lora.lora_path][i])
    return ps, ls, want


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_matches_peft(family, mode):
    base, adapters, prompts, refs = family
    assert all(refs[a] != refs[None] for a in adapters), "an adapter that changes nothing"
    ps, ls, want = mixed(prompts, adapters, refs)
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3, **MODES[mode])
    outs = llm.generate(ps, [greedy(NEW)] * len(ps), lora_request=ls)
    assert [o.token_ids for o in outs] == want
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_invariants()


def test_prefix_hits_stay_within_an_adapter(family):
    """A prompt served again hits the cache under the same adapter only; the tokens stay
    peft's either way."""
    base, adapters, prompts, refs = family
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3, block_size=4)
    a0, a1 = requests(adapters)[:2]
    long = prompts[2]
    first = llm.generate([long], [greedy(NEW)], lora_request=a0)[0]
    again = llm.generate([long], [greedy(NEW)], lora_request=a0)[0]
    other = llm.generate([long], [greedy(NEW)], lora_request=a1)[0]
    plain = llm.generate([long], [greedy(NEW)])[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 28
    assert other.num_cached_tokens == 0 and plain.num_cached_tokens == 0
    assert [first.token_ids, again.token_ids] == [refs[adapters[0]][2]] * 2
    assert other.token_ids == refs[adapters[1]][2] and plain.token_ids == refs[None][2]


def test_more_adapters_than_slots_all_served(family):
    """Three adapters over --max-loras 1: each step runs at most one; every request ends
    with peft's tokens, and the slot is refilled as adapters take turns."""
    base, adapters, prompts, refs = family
    ps, ls, want = mixed(prompts, adapters, refs)
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=1)
    seen: list[set[int]] = []
    step = llm.engine.core.step

    def counting_step(*args, **kwargs):
        running = {r.lora.lora_int_id for r in llm.engine.scheduler.running if r.lora}
        seen.append(running)
        return step(*args, **kwargs)

    llm.engine.core.step = counting_step
    outs = llm.generate(ps, [greedy(NEW)] * len(ps), lora_request=ls)
    assert [o.token_ids for o in outs] == want
    assert max(len(s) for s in seen) == 1
    assert llm.engine.runner.lora.loads >= 3


def test_rows_never_read_other_slots(family):
    """Every slot poisoned with NaN before any adapter loads: the slots an adapter is
    copied into are cleared first, the rest stay NaN, and no row (base rows included)
    reads them: the tokens are peft's and transformers'."""
    base, adapters, prompts, refs = family
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=4)
    for layer in llm.engine.runner.lora.layers.values():
        for a, b, _, _ in layer.shards:
            a.fill_(float("nan"))
            b.fill_(float("nan"))
    ps, ls, want = mixed(prompts, adapters[:2], {k: refs[k] for k in (None, *adapters[:2])})
    outs = llm.generate(ps, [greedy(NEW)] * len(ps), lora_request=ls)
    assert [o.token_ids for o in outs] == want
    layer = next(iter(llm.engine.runner.lora.layers.values()))
    assert all(torch.isnan(a[2:]).all() for a, _, _, _ in layer.shards)  # never used, never cleaned


def test_one_grouped_call_runs_several_adapters(family):
    """The delta is computed per row group in one call per linear (not a merged copy of the
    weights per adapter): a call sees rows of two adapters and base rows; the base weights
    are unchanged by serving."""
    base, adapters, prompts, refs = family
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3)
    layers = llm.engine.runner.lora.layers
    weights_before = {k: v.clone() for k, v in llm.engine.runner.model.state_dict().items()
                      if not re.search(r"\.[ab]\d+$", k)}
    calls: list[list[punica.Segment]] = []
    for layer in layers.values():
        inner = layer.kernel

        def spy(out, x, a, b, batch, inner=inner):
            calls.append(list(batch.segments))
            inner(out, x, a, b, batch)

        layer.kernel = spy
    ps, ls, want = mixed(prompts, adapters, refs)
    outs = llm.generate(ps, [greedy(NEW)] * len(ps), lora_request=ls)
    assert [o.token_ids for o in outs] == want
    rows = sum(len(p) for p in ps)
    assert any(len({slot for _, _, slot in segs}) >= 2 and sum(n for _, n, _ in segs) < rows
               for segs in calls)
    for k, v in llm.engine.runner.model.state_dict().items():
        if k in weights_before:
            assert torch.equal(v, weights_before[k]), k


def test_speculation_with_adapters(family):
    """ngram drafts verified under each request's adapter: peft's tokens."""
    base, adapters, prompts, refs = family
    ps, ls, want = mixed(prompts, adapters, refs)
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                  "prompt_lookup_min": 1})
    outs = llm.generate(ps, [greedy(NEW)] * len(ps), lora_request=ls)
    assert [o.token_ids for o in outs] == want


# ------------------------------------------------------------------ refused, by name
def test_bad_adapters_refused_by_name(tmp_path):
    base = make_model(str(tmp_path / "base"), "llama", seed=3)
    llm = LLM(base, dtype="float32", enable_lora=True, max_lora_rank=8)
    big = make_adapter(base, str(tmp_path / "big"), r=16, seed=4)
    dora = make_adapter(base, str(tmp_path / "dora"), r=4, seed=5, use_dora=True)
    saved = make_adapter(base, str(tmp_path / "saved"), r=4, seed=6, modules_to_save=["lm_head"])
    embed = make_adapter(base, str(tmp_path / "embed"), r=4, seed=7, targets=["embed_tokens"])
    cases = {big: "above --max-lora-rank 8", dora: "use_dora", saved: "modules_to_save",
             embed: "embedding", str(tmp_path / "missing"): "does not exist"}
    for i, (path, words) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=words):
            llm.generate([[5, 6, 7]], [greedy(2)], lora_request=LoRARequest(f"x{i}", i + 1, path))
    plain = LLM(base, dtype="float32")
    good = make_adapter(base, str(tmp_path / "good"), r=4, seed=8)
    with pytest.raises(ValueError, match="--enable-lora"):
        plain.generate([[5, 6]], [greedy(2)], lora_request=LoRARequest("g", 1, good))
    out = llm.generate([[5, 6, 7]], [greedy(3)], lora_request=LoRARequest("g", 9, good))
    assert len(out[0].token_ids) == 3  # refusals left the engine serving
    llm.engine.check_invariants()


def test_shape_mismatch_names_the_tensor(tmp_path):
    base = make_model(str(tmp_path / "base"), "llama", seed=3)
    other = make_model(str(tmp_path / "other"), "llama", seed=3, hidden_size=32,
                       intermediate_size=64)
    wrong = make_adapter(other, str(tmp_path / "wrong"), r=4, seed=4)
    llm = LLM(base, dtype="float32", enable_lora=True)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape"):
        llm.generate([[5, 6, 7]], [greedy(2)], lora_request=LoRARequest("w", 1, wrong))


def test_sampled_tokens_depend_on_the_adapter_not_the_batch(family):
    """Seeded sampling under an adapter: the same tokens alone and in a mixed batch."""
    base, adapters, prompts, _ = family
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3)
    a = requests(adapters)[1]
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=NEW)
    alone = llm.generate([prompts[1]], [params], lora_request=a)[0].token_ids
    ps, ls, _ = mixed(prompts, adapters, {None: [[]] * 4, **{p: [[]] * 4 for p in adapters}})
    ps, ls = [prompts[1], *ps], [a, *ls]
    outs = llm.generate(ps, [params] * len(ps), lora_request=ls)
    assert outs[0].token_ids == alone


def test_layers_are_wrapped_once(family):
    base, _, _, _ = family
    llm = LLM(base, dtype="float32", enable_lora=True)
    wrapped = [m for m in llm.engine.runner.model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * 2 and not any(isinstance(m.base, LoRALinear) for m in wrapped)


# ------------------------------------------------------------------ bf16, int4 bases
def test_bf16_adapters_agree_with_peft(family):
    """bf16: each token under each adapter is peft-in-bf16's top choice or within the bf16
    tests' margin of it (teacher forcing, as test_bf16.py), in a mixed batch."""
    from test_bf16 import assert_teacher_forced

    base, adapters, prompts, _ = family
    llm = LLM(base, dtype="bfloat16", enable_lora=True, max_loras=3)
    loras = [None, *requests(adapters)]
    ps = [p for p in prompts for _ in loras]
    ls = [lora for _ in prompts for lora in loras]
    outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)]
                        * len(ps), lora_request=ls)
    for lora in loras:
        if lora is None:
            ref = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        else:
            ref = peft_model(base, lora.lora_path).to(torch.bfloat16)
        mine = [i for i, x in enumerate(ls) if x == lora]
        assert_teacher_forced(ref, [ps[i] for i in mine], [outs[i] for i in mine])


def test_int4_base_with_adapters(tmp_path, monkeypatch):
    """--quantization int4 base, adapters in the model's dtype: every step on the 4-bit
    weights, tokens equal peft over the checkpoint the 4-bit codes stand for."""
    from test_int4_engine import dequantized_copy

    from pagoda.models import cpu_int4

    base = make_model(str(tmp_path / "base"), "llama", seed=11)
    ref_path = dequantized_copy(base, str(tmp_path / "dequantized"))
    adapters = [make_adapter(base, str(tmp_path / f"a{i}"), r=8, targets=ALL_LLAMA, seed=20 + i)
                for i in range(2)]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
    refs = {None: [hf_greedy(hf, p, NEW) for p in prompts]}
    for path in adapters:
        refs[path] = [hf_greedy(peft_model(ref_path, path), p, NEW) for p in prompts]
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, str(1 << 20))
    llm = LLM(base, dtype="float32", quantization="int4", enable_lora=True, max_loras=2)
    wrapped = llm.engine.runner.lora.layers.values()
    assert all(isinstance(layer.base, cpu_int4.Int4Linear) for layer in wrapped)
    ps, ls, want = mixed(prompts, adapters, refs)
    outs = llm.generate(ps, [greedy(NEW)] * len(ps), lora_request=ls)
    assert [o.token_ids for o in outs] == want


def test_partial_rotary_phi_adapter(tmp_path):
    """Phi-4-mini style partial rotary: pagoda permutes q and k rows of the fused qkv for
    its RoPE table, and an adapter's B rows must follow; tokens equal peft's."""
    base = make_model(str(tmp_path / "base"), "phi3", seed=44, partial_rotary_factor=0.75)
    adapter = make_adapter(base, str(tmp_path / "a"), r=8, targets=["qkv_proj", "o_proj"], seed=45)
    rng = random.Random(4)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in LENS]
    want = [hf_greedy(peft_model(base, adapter), p, NEW) for p in prompts]
    llm = LLM(base, dtype="float32", enable_lora=True)
    outs = llm.generate(prompts, [greedy(NEW)] * len(prompts),
                        lora_request=LoRARequest("a", 1, adapter))
    assert [o.token_ids for o in outs] == want


def test_structured_outputs_under_adapters(tmp_path):
    """A grammar holds under every adapter of a mixed batch (the masks are the sampler's,
    the deltas the model's: they meet only in the logits)."""
    from pagoda.sampling import StructuredOutputsParams

    base = make_model(str(tmp_path / "base"), "llama", seed=5)
    adapters = [make_adapter(base, str(tmp_path / f"a{i}"), r=8, targets=ALL_LLAMA, seed=6 + i)
                for i in range(2)]
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=2)
    choices = ("alpha", "beta", "gamma delta")
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    loras = [None, *requests(adapters)] * 2
    outs = llm.generate([[5, 6, 7, 8]] * len(loras), [params] * len(loras), lora_request=loras)
    assert all(o.outputs[0].text in choices for o in outs), [o.outputs[0].text for o in outs]
