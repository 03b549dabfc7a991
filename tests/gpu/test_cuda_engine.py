"""The whole engine on CUDA (Triton attention, pinned async inputs, CUDA graphs) on tiny
random models, against Hugging Face transformers. Marked ``gpu``; skipped without CUDA.

- fp32: greedy tokens identical to transformers' ``generate``, graphs on and off;
- bf16: each token pagoda picks is (within a small logit gap) transformers' top choice for
  the same sequence, teacher-forced (near-ties may flip argmax in bf16);
- CUDA-graph replay gives the same tokens as eager mode, on batches that need padding;
- async scheduling (the default on CUDA) gives the same tokens as synchronous steps, and a
  step waits for the GPU only to read its sampled tokens.
"""
from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.request import EngineRequest
from tiny_models import TINY_VOCAB, make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAMILIES = ["llama", "qwen3"]
PROMPT_LENS = [3, 17, 40, 64, 129]
MAX_TOKENS = [24, 9, 17, 30, 12]
BF16_LOGIT_GAP = 0.05   # of the logits' range: how far below HF's best pagoda's pick may be


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    import transformers

    family = request.param
    path = make_model(str(tmp_path_factory.mktemp(family)), family,
                      seed=FAMILIES.index(family))
    rng = random.Random(11)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, MAX_TOKENS)]
    return path, prompts, refs


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)


def run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, [greedy(m) for m in MAX_TOKENS[:len(prompts)]], use_tqdm=False)
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_fp32_greedy_matches_transformers(case, enforce_eager, async_scheduling):
    path, prompts, refs = case
    llm = LLM(path, device="cuda", dtype="float32", enforce_eager=enforce_eager,
              max_num_seqs=8, block_size=16, async_scheduling=async_scheduling)
    runner = llm.engine.runner
    assert runner.kv_caches[0].is_cuda
    assert llm.engine.async_scheduling is async_scheduling
    assert (runner.cuda_graph_sizes == []) == enforce_eager, runner.cuda_graph_sizes
    assert run(llm, prompts) == refs
    llm.engine.check_invariants()


def test_fp32_chunked_prefill_and_mixed_batches_match(case):
    """A small token budget: prompts are chunked and share steps with decodes; a small KV
    cache: requests are preempted with their last token in flight."""
    path, prompts, refs = case
    llm = LLM(path, device="cuda", dtype="float32", max_num_batched_tokens=24, block_size=16)
    assert run(llm, prompts) == refs
    small = LLM(path, device="cuda", dtype="float32", max_num_batched_tokens=32, block_size=8,
                num_kv_blocks=24)
    assert run(small, prompts) == refs
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv.pool.num_free_blocks == small.engine.num_blocks


def test_async_seeded_sampling_matches_sync():
    """Seeded sampling, filters and penalties: the same tokens one step ahead or not. (Every
    request ends by length, so both modes run the same batches: GEMMs of other shapes could
    move a logit by an ulp.)"""
    rng = random.Random(5)
    prompts = [[rng.randrange(10, 500) for _ in range(n)] for n in (5, 40, 90, 7)]
    params = [SAMPLED, SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.8, seed=4, max_tokens=9,
                             ignore_eos=True)]
    got = []
    for async_scheduling in (False, True):
        llm = LLM(load_format="dummy", model_preset="tiny-qwen3", device="cuda",
                  dtype="float32", max_num_seqs=8, async_scheduling=async_scheduling)
        outs = llm.generate(prompts, params, use_tqdm=False)
        got.append([[c.token_ids for c in o.outputs] for o in outs])
    assert got[0] == got[1]


def test_bf16_tokens_are_transformers_top_choices(case):
    import transformers

    path, prompts, _ = case
    llm = LLM(path, device="cuda", dtype="bfloat16", block_size=16)
    got = run(llm, prompts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    for prompt, tokens in zip(prompts, got):
        seq = torch.tensor([prompt + tokens], device="cuda")
        with torch.inference_mode():
            logits = hf(seq).logits[0, len(prompt) - 1:-1].float()        # (N, V)
        picked = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
        gap = logits.max(dim=1).values - picked                            # (N,)
        scale = (logits.max(dim=1).values - logits.min(dim=1).values)      # (N,)
        assert (gap <= BF16_LOGIT_GAP * scale).all(), (gap / scale).max().item()


def test_cuda_graph_replay_matches_eager(case):
    """Batches of 5 and 3 decodes run padded in the graphs of 8 and 4."""
    path, prompts, _ = case
    graphs = LLM(path, device="cuda", dtype="float32", max_num_seqs=8, block_size=16)
    assert graphs.engine.runner.cuda_graph_sizes == [1, 2, 4, 8]
    eager = LLM(path, device="cuda", dtype="float32", max_num_seqs=8, block_size=16,
                enforce_eager=True)
    for subset in (prompts, prompts[:3], prompts[:1]):
        assert run(graphs, subset) == run(eager, subset)


def test_dummy_preset_runs_with_graphs():
    """A real preset's shapes (Qwen3-0.6B, bf16, random weights) through graphs and eager."""
    llm = LLM(load_format="dummy", model_preset="qwen3-0.6b", device="cuda", dtype="bfloat16",
              max_num_seqs=16, max_model_len=2048)
    assert llm.engine.model_name == "dummy:qwen3-0.6b"
    assert llm.engine.runner.cuda_graph_sizes[-1] == 16
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 150000) for _ in range(n)] for n in (5, 300, 1000)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [20, 20, 20]


def test_profile_activation_bytes_for_qwen3_preset():
    """The peak of a 2048-token step of Qwen3-0.6B's shapes: positive, and far below 1 GiB
    (hidden, QKV, MLP and attention buffers of 2048 tokens, 256 rows of fp32 logits)."""
    from pagoda.models.loader import load_model
    from pagoda.models.prepare import prepare_model
    from pagoda.worker.kv_cache import profile_activation_bytes

    device = torch.device("cuda")
    model = load_model(None, torch.bfloat16, device, load_format="dummy",
                       model_preset="qwen3-0.6b", max_positions=4096).model
    model = prepare_model(model, device, torch.bfloat16).model  # as the engine profiles it
    peak = profile_activation_bytes(model, 2048, 256, 16, torch.bfloat16, device)
    assert 0 < peak < (1 << 30), peak


SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=7,
                         repetition_penalty=1.1, frequency_penalty=0.2, max_tokens=12,
                         ignore_eos=True)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=12,
                                                   ignore_eos=True), SAMPLED],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_one_host_device_sync_per_step(params, async_scheduling, monkeypatch):
    """Inside a step the host waits for the GPU once: on the event after the sampled
    tokens' copy (``StepHandle.read_tokens``); no other call synchronizes (the sync debug
    mode warns on any that does). Steps with prefill chunks, decodes in CUDA graphs, and
    every sampling filter included."""
    import warnings

    from pagoda.worker.model_runner import StepHandle

    reads = []
    real_read = StepHandle.read_tokens

    def counting_read(handle):
        reads.append(handle.ready is not None)
        return real_read(handle)
    monkeypatch.setattr(StepHandle, "read_tokens", counting_read)
    llm = LLM(load_format="dummy", model_preset="tiny-qwen3", device="cuda", dtype="bfloat16",
              max_num_seqs=8, max_num_batched_tokens=64, async_scheduling=async_scheduling)
    engine = llm.engine
    rng = random.Random(3)
    for i, n in enumerate((5, 40, 90)):
        engine.add_request(EngineRequest(str(i), [rng.randrange(10, 500) for _ in range(n)], params))
    engine.step()                    # first launches of this batch's kernels
    counts, first = [], len(reads)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(8):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            counts.append([str(w.message)[:120] for w in caught
                           if "synchroniz" in str(w.message)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(c) == 0 for c in counts), counts
    assert reads[first:] == [True] * 8, reads       # one wait per step, on the event


def test_deterministic_bf16_alone_equals_among_mates_and_chunked(case):
    """--deterministic on the GPU (the invariant Triton product and attention): a request's
    bf16 greedy tokens and logprobs, alone, among the other prompts, chunked by a budget of
    16, and replayed through CUDA graphs, are the same to the bit."""
    path, prompts, _ = case
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)

    def target_of(llm: LLM, batch: list[list[int]]) -> tuple:
        out = llm.generate(batch, params, use_tqdm=False)[-1].outputs[0]
        return out.token_ids, out.cumulative_logprob

    llm = LLM(path, device="cuda", dtype="bfloat16", deterministic=True, max_num_seqs=8)
    assert llm.engine.runner.model.attention.name == "triton-invariant"
    alone = target_of(llm, prompts[-1:])
    assert target_of(llm, prompts) == alone
    chunked = LLM(path, device="cuda", dtype="bfloat16", deterministic=True,
                  max_num_batched_tokens=16, enforce_eager=True)
    assert target_of(chunked, prompts) == alone
