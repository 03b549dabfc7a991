"""Decoder pooling models through the engine and the offline API: embedders (``--runner
pooling --convert embed``) pooled LAST and MEAN over chunked prefill (a budget smaller than the
prompts, prompts of mixed lengths sharing steps), prefix-cache hits (LAST starts on a cached
prefix; MEAN computes every row), against transformers' ``AutoModel`` pooled alike; and a
Qwen3-Reranker-style scorer (``--hf-overrides`` classifier_from_token) against transformers'
``AutoModelForCausalLM``: sigmoid(logit(yes) - logit(no)) at the last token. fp32: cosine
>= 0.99999, scores within 1e-4, ranks identical. Every block is free after each batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_VOCAB, make_model

from pagoda import LLM, PoolingParams

MIN_COSINE = 0.99999
SCORE_ATOL = 1e-4
LENS = [3, 17, 9, 26, 40]
BUDGET = 8  # tokens per step: every prompt but the first spans several steps
ENGINE = dict(dtype="float32", max_num_batched_tokens=BUDGET, block_size=4, num_kv_blocks=64)


def _prompts(lens: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in lens]


def _reference(path: str, prompts: list[list[int]], kind: str) -> torch.Tensor:
    import transformers

    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [model(torch.tensor([p])).last_hidden_state[0] for p in prompts]
    pooled = torch.stack([r[-1] if kind == "LAST" else r.mean(0) for r in rows])
    return F.normalize(pooled, dim=-1)


def _assert_close(outs, ref: torch.Tensor) -> None:
    ours = torch.tensor([o.outputs.embedding for o in outs])
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min().item() >= MIN_COSINE, cos


def _assert_all_blocks_free(llm: LLM) -> None:
    engine = llm.engine
    engine.check_invariants()
    stats = engine.scheduler.make_stats()
    assert not engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_blocks  # cached blocks count as free


@pytest.mark.parametrize("family,kind", [("llama", "MEAN"), ("qwen3", "LAST"), ("qwen3", "MEAN")])
def test_embeddings_under_chunked_prefill_match_transformers(tmp_path, family, kind):
    path = make_model(str(tmp_path / family), family)
    llm = LLM(
        path, runner="pooling", convert="embed", pooler_config={"pooling_type": kind}, **ENGINE
    )
    assert llm.engine.runner_kind == "pooling" and llm.engine.pooling_tasks == {"embed"}
    prompts = _prompts(LENS)
    steps: list[dict[str, int]] = []
    launch = llm.engine.runner.launch

    def recording(sched):
        steps.append(dict(sched.num_scheduled_tokens))
        return launch(sched)

    llm.engine.runner.launch = recording  # type: ignore[method-assign]
    outs = llm.embed(prompts)
    assert max(len(s) for s in steps) > 1  # chunks of several prompts share a step
    assert max(sum(s.values()) for s in steps) <= BUDGET
    _assert_close(outs, _reference(path, prompts, kind))
    assert [o.prompt_token_ids for o in outs] == prompts
    _assert_all_blocks_free(llm)
    # the other pooling gives another vector: each comparison checks its own
    other = _reference(path, prompts, "LAST" if kind == "MEAN" else "MEAN")
    ours = torch.tensor([o.outputs.embedding for o in outs])
    assert F.cosine_similarity(ours, other, dim=-1).max() < 0.999


@pytest.mark.parametrize("kind", ["LAST", "MEAN"])
def test_prefix_cache_hit_last_starts_on_the_cache_mean_computes_every_row(tmp_path, kind):
    path = make_model(str(tmp_path / "qwen3"), "qwen3")
    llm = LLM(path, runner="pooling", pooler_config={"pooling_type": kind}, **ENGINE)
    prefix = _prompts([24], seed=1)[0]  # a shared instruction: 6 full blocks
    prompts = [prefix + tail for tail in _prompts([5, 11, 2], seed=2)]
    first = llm.embed(prompts[:1])
    rest = llm.embed(prompts[1:])
    cached = [o.num_cached_tokens for o in rest]
    if kind == "LAST":
        assert cached == [len(prefix)] * 2  # the prefix's blocks, not recomputed
    else:
        assert cached == [0, 0]  # MEAN needs every row: no lookup
    _assert_close(first + rest, _reference(path, prompts, kind))
    _assert_all_blocks_free(llm)


def test_qwen3_reranker_scores_match_transformers(tmp_path):
    import transformers

    path = make_model(str(tmp_path / "reranker"), "qwen3")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # The tiny tokenizer has no "yes" / "no" tokens; two of its single tokens stand in.
    no, yes = "Ġthe", "Ġfox"
    assert tok.convert_tokens_to_ids(no) != tok.unk_token_id and tok.convert_tokens_to_ids(yes)
    overrides = {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": [no, yes],
        "is_original_qwen3_reranker": True,
    }
    llm = LLM(path, runner="pooling", hf_overrides=overrides, **ENGINE)
    assert llm.engine.pooling_tasks == {"classify", "score"}
    query = "Judge: which text says the fox jumps?"
    docs = ["The quick brown fox jumps over the lazy dog.", "def f(x): return x * 2",
            "Paged attention keeps the KV cache in fixed-size blocks.", "the fox"]  # fmt: skip
    ours = torch.tensor([o.outputs.score for o in llm.score(query, docs)])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids_no, ids_yes = tok.convert_tokens_to_ids(no), tok.convert_tokens_to_ids(yes)
    ref = []
    for doc in docs:
        ids = tok(query, text_pair=doc)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        ref.append(torch.sigmoid(logits[ids_yes] - logits[ids_no]))
    ref_t = torch.stack(ref)
    torch.testing.assert_close(ours, ref_t, atol=SCORE_ATOL, rtol=0)
    assert ours.argsort().tolist() == ref_t.argsort().tolist()
    assert ref_t.std() > 10 * SCORE_ATOL
    _assert_all_blocks_free(llm)


def test_decoder_refusals_leak_no_block(tmp_path):
    path = make_model(str(tmp_path / "llama"), "llama", max_position_embeddings=64)
    llm = LLM(path, runner="pooling", **ENGINE)
    for call, match in [
        (lambda: llm.embed([list(range(3, 70))]), "truncate_prompt_tokens"),
        (lambda: llm.embed([[5, 6]], PoolingParams(dimensions=8)), "dimensions"),
        (lambda: llm.embed([[5, TINY_VOCAB]]), "prompt token ids"),
        (lambda: llm.score("a", "b"), None),  # an embedder scores by cosine instead
    ]:
        if match is None:
            assert -1.0 <= call()[0].outputs.score <= 1.0
            continue
        with pytest.raises(ValueError, match=match):
            call()
    for keep in (64, -1):  # -1: the model's context length (64), as vLLM
        out = llm.embed([list(range(3, 70))], truncate_prompt_tokens=keep)[0]
        assert out.prompt_token_ids == list(range(6, 70))
    _assert_all_blocks_free(llm)
    with pytest.raises(ValueError, match="--speculative-config"):
        LLM(path, runner="pooling", speculative_config={"method": "ngram"}, **ENGINE)
    with pytest.raises(ValueError, match="--pooler-config"):
        LLM(path, runner="pooling", pooler_config={"pooling": "MEAN"}, **ENGINE)
    with pytest.raises(ValueError, match="--hf-overrides key 'hidden_size'"):
        LLM(path, runner="pooling", hf_overrides={"hidden_size": 32}, **ENGINE)


def test_mean_pooling_under_async_scheduling(tmp_path):
    """A pooled vector read one step late, as on CUDA (async scheduling is on there)."""
    path = make_model(str(tmp_path / "llama"), "llama")
    engine_args = {**ENGINE, "async_scheduling": True}
    llm = LLM(path, runner="pooling", pooler_config={"pooling_type": "MEAN"}, **engine_args)
    assert llm.engine.async_scheduling
    prompts = _prompts(LENS)
    _assert_close(llm.embed(prompts), _reference(path, prompts, "MEAN"))
    _assert_all_blocks_free(llm)
    raw = llm.encode(prompts[:2], PoolingParams(normalize=False))
    ref = _reference(path, prompts[:2], "MEAN")
    torch.testing.assert_close(F.normalize(torch.stack([r.outputs.data for r in raw])), ref,
                               atol=1e-5, rtol=0)  # fmt: skip
