"""Encoder pooling models through the engine and the offline API (``LLM(...).embed / score /
classify``) against Sentence Transformers on the same tiny random checkpoints, in fp32
(cosine >= 0.99999 per vector, scores within 1e-4, ranks identical) and bf16 (the tolerance
tests/model/test_encoders.py measured); batches larger than one step's token budget; and the
refusals (each a ValueError naming the field or flag, after which the engine keeps serving)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_encoders import QUERY, TEXTS, make_encoder, make_sentence_transformer

from pagoda import LLM
from pagoda.pooling_params import PoolingParams
from pagoda.request import EngineRequest
from pagoda.sampling import SamplingParams

MIN_COSINE = 0.99999
SCORE_ATOL = 1e-4
BF16_MIN_COSINE = 0.9999  # tests/model/test_encoders.py's measured bound
BUDGET = 40  # tokens per step: below the texts' total, so a batch spans several steps


def _cosines(ours: list[list[float]], ref: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(torch.tensor(ours), ref.float(), dim=-1)


def _step_sizes(llm: LLM) -> list[int]:
    """Records how many sequences each step of ``llm``'s engine runs."""
    sizes: list[int] = []
    runner = llm.engine.runner
    launch = runner.launch

    def counting(sched):
        if not sched.is_empty:
            sizes.append(len(sched.num_scheduled_tokens))
        return launch(sched)

    runner.launch = counting  # type: ignore[method-assign]
    return sizes


@pytest.fixture(scope="module")
def st_embedder(tmp_path_factory):
    """A BERT Sentence Transformer (mean pooling, normalized), Matryoshka-declared, and its
    engine (fp32, a small budget)."""
    path = str(tmp_path_factory.mktemp("st") / "bert-mean")
    st = make_sentence_transformer(path, "bert", "mean", True)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["matryoshka_dimensions"] = [8, 16, 32]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=BUDGET, max_num_seqs=8)
    return st, path, llm


def test_embed_matches_sentence_transformers_over_several_steps(st_embedder):
    st, _, llm = st_embedder
    assert llm.engine.runner_kind == "pooling" and llm.engine.pooling_tasks == {"embed"}
    texts = TEXTS * 3  # mixed lengths; more tokens than a step takes
    sizes = _step_sizes(llm)
    outs = llm.embed(texts)
    assert len(sizes) > 1 and max(sizes) > 1  # several steps, several sequences packed per step
    ref = st.encode(texts, convert_to_tensor=True)
    cos = _cosines([o.outputs.embedding for o in outs], ref)
    assert cos.min().item() >= MIN_COSINE, cos
    for out, text in zip(outs, texts, strict=True):
        assert out.prompt_token_ids == llm.tokenizer(text)["input_ids"]
        assert out.outputs.hidden_size == 64
    stats = llm.engine.stats()
    assert stats.num_pooling_requests >= len(texts)
    assert stats.num_pooling_tokens >= sum(len(o.prompt_token_ids) for o in outs)
    assert stats.num_generation_tokens == 0
    llm.engine.check_invariants()
    assert not llm.engine.has_unfinished_requests()


def test_matryoshka_dimensions_and_normalize_off(st_embedder):
    st, _, llm = st_embedder
    outs = llm.embed(TEXTS, PoolingParams(dimensions=16))
    ref = st.encode(TEXTS, convert_to_tensor=True, truncate_dim=16)
    assert all(o.outputs.hidden_size == 16 for o in outs)
    assert _cosines([o.outputs.embedding for o in outs], ref).min().item() >= MIN_COSINE
    raw = llm.embed(TEXTS, PoolingParams(normalize=False))
    norms = torch.tensor([o.outputs.embedding for o in raw]).norm(dim=-1)
    assert (norms - 1).abs().min() > 1e-3  # not normalized: the mean's own length


def test_refusals_name_the_field_and_the_engine_keeps_serving(st_embedder):
    _, _, llm = st_embedder
    engine = llm.engine
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # > 128 tokens
    bad = [
        (lambda: llm.embed(TEXTS, PoolingParams(dimensions=12)), "dimensions must be one of"),
        (lambda: llm.embed(TEXTS, PoolingParams(dimensions=128)), "dimensions 128 is larger"),
        (lambda: llm.embed([long_text]), "truncate_prompt_tokens"),
        (lambda: llm.embed([[]]), "prompt must not be empty"),
        (lambda: llm.classify(TEXTS), "task 'classify'"),
        (lambda: llm.generate(TEXTS), "--runner pooling"),
        (lambda: PoolingParams(dimensions=0), "dimensions must be a positive integer"),
        (lambda: PoolingParams(task="rerank"), "task must be one of"),  # type: ignore[arg-type]
        (
            lambda: engine.add_request(
                EngineRequest("x", [5, 6], PoolingParams(), token_type_ids=[0])
            ),
            "token_type_ids",
        ),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
        engine.check_invariants()
    assert not engine.has_unfinished_requests()  # a refused batch leaves nothing behind
    # An over-long input is served with truncate_prompt_tokens: its last k tokens.
    ids = llm.tokenizer(long_text)["input_ids"]
    assert len(ids) > 128
    cut = llm.embed([long_text], truncate_prompt_tokens=100)[0]
    assert cut.prompt_token_ids == ids[-100:]
    assert cut.outputs.embedding == llm.embed([ids[-100:]])[0].outputs.embedding
    assert len(llm.embed(TEXTS)) == len(TEXTS)  # still serving


def test_generation_engine_refuses_pooling_requests(tmp_path):
    from tiny_models import make_model

    llm = LLM(make_model(str(tmp_path / "llama")), dtype="float32", num_kv_blocks=16)
    assert llm.engine.runner_kind == "generate" and not llm.engine.pooling_tasks
    with pytest.raises(ValueError, match="--runner pooling"):
        llm.embed(["the fox"])
    llm.engine.check_invariants()
    assert llm.generate("the fox", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_cross_encoder_scores_and_ranks_match(tmp_path, family):
    from sentence_transformers import CrossEncoder

    path = make_encoder(str(tmp_path / family), family, num_labels=1)
    ce = CrossEncoder(path, device="cpu")
    llm = LLM(path, dtype="float32", max_num_batched_tokens=BUDGET)
    assert llm.engine.pooling_tasks == {"classify", "score"}
    outs = llm.score(QUERY, TEXTS)  # one to many
    ours = torch.tensor([o.outputs.score for o in outs])
    ref = torch.as_tensor(ce.predict([(QUERY, t) for t in TEXTS])).float()
    torch.testing.assert_close(ours, ref, atol=SCORE_ATOL, rtol=0)
    assert ours.argsort(descending=True).tolist() == ref.argsort(descending=True).tolist()
    assert ref.std() > 10 * SCORE_ATOL  # far enough apart for ranks to mean something
    pairs = llm.score([QUERY] * 2, TEXTS[:2])  # one to one
    torch.testing.assert_close(torch.tensor([o.outputs.score for o in pairs]), ref[:2],
                               atol=SCORE_ATOL, rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="task 'embed'"):
        llm.embed(TEXTS)
    with pytest.raises(ValueError, match="text_1"):
        llm.score(TEXTS[:2], TEXTS[:3])


def test_classify_gives_softmax_probabilities_or_raw_logits(tmp_path):
    import transformers

    path = make_encoder(str(tmp_path / "ce3"), "bert", num_labels=3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = torch.cat([hf(**tok(t, return_tensors="pt")).logits for t in TEXTS])  # (N, 3)
    llm = LLM(path, dtype="float32")
    assert llm.engine.pooling_tasks == {"classify"}  # several labels: no one score
    probs = torch.tensor([o.outputs.probs for o in llm.classify(TEXTS)])
    torch.testing.assert_close(probs, logits.softmax(-1), atol=SCORE_ATOL, rtol=0)
    assert probs.argmax(-1).tolist() == logits.argmax(-1).tolist()
    raw = llm.classify(TEXTS, PoolingParams(task="classify", activation=False))
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in raw]), logits,
                               atol=SCORE_ATOL, rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="task 'score'"):
        llm.score(QUERY, TEXTS)


def test_bf16_embeddings_within_the_measured_tolerance(tmp_path):
    path = str(tmp_path / "roberta-cls")
    st = make_sentence_transformer(path, "roberta", "cls", True)
    llm = LLM(path, dtype="bfloat16", max_num_batched_tokens=BUDGET)
    ours = [o.outputs.embedding for o in llm.embed(TEXTS)]
    assert _cosines(ours, st.encode(TEXTS, convert_to_tensor=True)).min() >= BF16_MIN_COSINE


def test_prometheus_counts_pooling_requests_and_tokens(st_embedder):
    from prometheus_client import CollectorRegistry

    from pagoda.engine.metrics import EngineMetrics

    _, _, llm = st_embedder
    metrics = EngineMetrics(CollectorRegistry())
    metrics.update(llm.engine.stats())
    before = llm.engine.stats()
    outs = llm.embed(TEXTS)
    n_tokens = sum(len(o.prompt_token_ids) for o in outs)
    after = llm.engine.stats()
    assert after.num_pooling_requests - before.num_pooling_requests == len(TEXTS)
    assert after.num_pooling_tokens - before.num_pooling_tokens == n_tokens
    metrics.update(after)
    reg = metrics.registry
    assert reg.get_sample_value("pagoda:pooling_requests_total") == after.num_pooling_requests
    assert reg.get_sample_value("pagoda:pooling_tokens_total") == after.num_pooling_tokens
    # a finished pooling request counts as a success (its one output has no completion)
    engine = llm.engine
    engine.add_request(EngineRequest("m", outs[0].prompt_token_ids, PoolingParams()))
    done = []
    while not done:
        done = [o for o in engine.step() if o.finished]
    assert done[0].outputs == [] and done[0].pooled is not None
    assert done[0].finish_reason == "stop" and done[0].num_prompt_tokens == len(
        outs[0].prompt_token_ids
    )
    assert done[0].pooled.dtype == torch.float32 and done[0].pooled.device.type == "cpu"
    assert done[0].metrics.time_to_first_token is not None
    metrics.on_step(engine.stats(), done, 0.0)
    assert reg.get_sample_value("pagoda:request_success_total", {"finished_reason": "stop"}) == 1


def test_async_engine_serves_a_pooling_engine(st_embedder):
    import asyncio

    from pagoda.engine.async_engine import AdmissionLimits, AsyncEngine

    st, _, llm = st_embedder
    ids = [llm.tokenizer(t)["input_ids"] for t in TEXTS]

    async def main() -> list:
        ae = AsyncEngine(llm.engine, AdmissionLimits())
        ae.start()
        try:
            streams = [
                await ae.add_request(EngineRequest(f"a{i}", p, PoolingParams()))
                for i, p in enumerate(ids)
            ]
            with pytest.raises(ValueError, match="--runner pooling"):
                await ae.add_request(EngineRequest("g", ids[0], SamplingParams()))
            outs = []
            for stream in streams:
                out = await stream.next()
                assert out is not None and out.finished  # one output: the final one
                outs.append(out)
            await ae.call(lambda engine: engine.check_invariants())
            return outs
        finally:
            ae.shutdown()

    outs = asyncio.run(main())
    ref = st.encode(TEXTS, convert_to_tensor=True)
    cos = F.cosine_similarity(torch.stack([o.pooled for o in outs]), ref.float(), dim=-1)
    assert cos.min().item() >= MIN_COSINE
