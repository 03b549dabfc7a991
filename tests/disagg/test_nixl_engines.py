"""A prefill engine and a decode engine (one process, two NIXL agents over UCX): the decode
side pulls the prompt KV and continues, token-identical to a colocated engine; leases are
released by the pull or expire; failures recompute or fail as configured."""
import random
import time

import pytest

from pagoda import LLM, SamplingParams
from pagoda.request import EngineRequest
from pagoda.config import EngineArgs
from pagoda.engine.build import build_engine
from tiny_models import TINY_VOCAB, make_model

pytest.importorskip("nixl")
pytestmark = pytest.mark.usefixtures("one_thread")

SECRET = "test-secret"
BLOCK = 8
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("disagg")), "llama", seed=5)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (40, 17, 33)]
    prompts.append(prompts[0][:24] + list(range(7, 19)))   # shares 3 blocks with prompts[0]
    colocated = LLM(path, dtype="float32", block_size=BLOCK)
    refs = [o.token_ids for o in colocated.generate(prompts, greedy())]
    return path, prompts, refs


def greedy(max_tokens=MAX_TOKENS):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)


def engine(path, role, **kw):
    args = dict(model=path, dtype="float32", block_size=BLOCK, num_kv_blocks=64,
                kv_role=role, kv_secret=SECRET)
    return build_engine(EngineArgs(**{**args, **kw}))


@pytest.fixture
def pair(model):
    path = model[0]
    engines = [engine(path, "prefill"), engine(path, "decode")]
    yield engines
    for e in engines:
        e.close()


def run(e, rid, prompt, params, **kw):
    e.add_request(EngineRequest(rid, prompt, params, **kw))
    for _ in range(10_000):
        for out in e.step():
            if out.finished and out.request_id == rid:
                return out
    raise AssertionError("request did not finish")


def prefill(p, rid, prompt):
    out = run(p, rid, prompt, SamplingParams(temperature=0.0, max_tokens=1),
              kv_transfer_params={"do_remote_decode": True})
    assert out.kv_transfer_params is not None
    return out.kv_transfer_params


def wait_all_free(e, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e.poll_kv_transfers()
        if e.kv.pool.num_free_blocks == e.num_blocks:
            return
        time.sleep(0.01)
    raise AssertionError(f"{e.num_blocks - e.kv.pool.num_free_blocks} blocks still held")


def test_decode_continues_from_pulled_kv_token_identical(model, pair):
    path, prompts, refs = model
    p, d = pair
    for i, prompt in enumerate(prompts[:3]):
        params = prefill(p, f"r{i}", prompt)
        assert params["remote_num_tokens"] == len(prompt)
        assert p.stats().kv_transfer.num_leases == 1              # held until pulled
        out = run(d, f"r{i}", prompt, greedy(), kv_transfer_params=params)
        assert out.token_ids == refs[i]
        wait_all_free(p)                                 # the READ's notification ended it
    assert p.stats().kv_transfer.num_leases_released == 3 and p.stats().kv_transfer.num_leases_expired == 0
    assert d.stats().scheduler.num_kv_load_failures == 0
    # Only all-but-the-last prompt token is pulled: ceil((len - 1) / BLOCK) blocks each.
    assert d.kv_connector.num_blocks_pulled == sum(-(-(len(q) - 1) // BLOCK)
                                                  for q in prompts[:3])
    d.check_invariants()
    p.check_invariants()


def test_a_prompt_too_short_to_pull_still_ends_the_lease_at_once(model, pair):
    path, prompts, refs = model
    p, d = pair
    short = prompts[0][:7]                   # less than a block: computed on the decode side
    params = prefill(p, "s", short)
    out = run(d, "s", short, greedy())
    assert d.kv_connector.num_blocks_pulled == 0
    run(d, "s2", short, greedy(), kv_transfer_params=params)
    wait_all_free(p)                         # released over the side channel, not expired
    assert p.stats().kv_transfer.num_leases_released == 1 and p.stats().kv_transfer.num_leases_expired == 0
    assert out.token_ids == run(d, "s3", short, greedy()).token_ids


def test_the_pulled_kv_is_what_decode_uses(model, pair):
    """Corrupt the prefill side's KV before the pull: the decode output must change."""
    path, prompts, refs = model
    p, d = pair
    params = prefill(p, "x", prompts[0])
    for layer in p.runner.kv_caches:
        layer.normal_()
    out = run(d, "x", prompts[0], greedy(), kv_transfer_params=params)
    assert out.token_ids != refs[0]


def test_blocks_in_the_decode_prefix_cache_are_not_pulled_again(model, pair):
    path, prompts, refs = model
    p, d = pair
    run(d, "local", prompts[0], greedy())                # decode side caches prompts[0]
    params = prefill(p, "shared", prompts[3])
    out = run(d, "shared", prompts[3], greedy(), kv_transfer_params=params)
    assert out.token_ids == refs[3]
    assert out.num_cached_tokens == 24                   # 3 blocks found locally
    assert d.kv_connector.num_blocks_pulled == -(-(len(prompts[3]) - 1) // BLOCK) - 3
    wait_all_free(p)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_expired_lease_recomputes_or_fails(model, policy):
    path, prompts, refs = model
    p = engine(path, "prefill", kv_lease_seconds=0.05)
    d = engine(path, "decode", kv_load_failure=policy)
    try:
        params = prefill(p, "late", prompts[0])
        time.sleep(0.1)
        p.poll_kv_transfers()
        assert p.stats().kv_transfer.num_leases_expired == 1
        assert p.kv.pool.num_free_blocks == p.num_blocks
        out = run(d, "late", prompts[0], greedy(), kv_transfer_params=params)
        assert d.stats().scheduler.num_kv_load_failures == 1
        if policy == "recompute":
            assert out.token_ids == refs[0]
        else:
            assert out.finish_reason == "error" and out.token_ids == []
            assert "no longer holds" in out.outputs[0].finish_detail
        assert d.kv.pool.num_free_blocks == d.num_blocks
        d.check_invariants()
    finally:
        p.close()
        d.close()


def test_incompatible_instances_refuse_to_transfer(model):
    path, prompts, refs = model
    p = engine(path, "prefill", dtype="bfloat16")
    d = engine(path, "decode", kv_load_failure="fail")
    try:
        params = prefill(p, "r", prompts[0])
        out = run(d, "r", prompts[0], greedy(), kv_transfer_params=params)
        assert out.finish_reason == "error"
        assert "incompatible KV layout: dtype" in out.outputs[0].finish_detail
        assert d.kv_connector.num_blocks_pulled == 0
        # A prefill with another block size is refused before any handshake: its blocks
        # cannot hold the prompt as this instance lays it out.
        p16 = engine(path, "prefill", block_size=16)
        try:
            params = prefill(p16, "r16", prompts[0])
            with pytest.raises(ValueError, match="remote_block_ids has 3 blocks"):
                d.add_request(EngineRequest("r16", prompts[0], greedy(), kv_transfer_params=params))
        finally:
            p16.close()
    finally:
        p.close()
        d.close()


def test_wrong_secret_is_refused(model):
    path, prompts, refs = model
    p = engine(path, "prefill")
    d = engine(path, "decode", kv_secret="another")
    try:
        params = prefill(p, "r", prompts[0])
        with pytest.raises(ValueError, match="signature"):
            d.add_request(EngineRequest("r", prompts[0], greedy(), kv_transfer_params=params))
        assert not d.has_unfinished_requests()
    finally:
        p.close()
        d.close()


@pytest.mark.parametrize("change", [
    {"remote_port": 1}, {"remote_host": "10.0.0.1"}, {"remote_engine_id": "someone-else"},
    {"remote_block_ids": [0, 1, 2, 3, 63]}, {"remote_num_tokens": 41},
    {"remote_request_id": "other#1"}, {"signature": ""}])
def test_forged_params_are_refused_before_any_connection(model, pair, change):
    path, prompts, _ = model
    p, d = pair
    params = prefill(p, "f", prompts[0])
    with pytest.raises(ValueError, match="kv_transfer_params"):
        d.add_request(EngineRequest("f", prompts[0], greedy(), kv_transfer_params={**params, **change}))
    # Genuine parameters for another prompt are refused too: they are bound to the prompt.
    with pytest.raises(ValueError, match="signature"):
        d.add_request(EngineRequest("g", prompts[1], greedy(), kv_transfer_params=params))
    assert not d.has_unfinished_requests() and d.kv_connector.num_blocks_pulled == 0


def test_role_checks_name_the_problem(model, pair):
    path, prompts, _ = model
    p, d = pair
    with pytest.raises(ValueError, match="--kv-role prefill"):
        d.add_request(EngineRequest("a", prompts[0], greedy(), kv_transfer_params={"do_remote_decode": True}))
    with pytest.raises(ValueError, match="--kv-role decode"):
        p.add_request(EngineRequest("b", prompts[0], greedy(),
                      kv_transfer_params={"do_remote_prefill": True, "remote_engine_id": "e",
                                          "remote_request_id": "r", "remote_block_ids": [0],
                                          "remote_num_tokens": 5, "remote_host": "h",
                                          "remote_port": 1}))
    with pytest.raises(ValueError, match="n must be 1"):
        p.add_request(EngineRequest("c", prompts[0], SamplingParams(n=2),
                      kv_transfer_params={"do_remote_decode": True}))


def test_abort_right_after_the_pull_starts_leaks_nothing(model, pair):
    """(The loading-state abort itself is unit-tested in tests/unit/test_remote_kv.py: on
    loopback a pull usually ends within the step that starts it.)"""
    path, prompts, refs = model
    p, d = pair
    params = prefill(p, "ab", prompts[0])
    d.add_request(EngineRequest("ab", prompts[0], greedy(), kv_transfer_params=params))
    d.step()
    d.abort_request("ab")
    for _ in range(200):
        d.step() if d.has_unfinished_requests() else d.poll_kv_transfers()
        if not d.scheduler.loading:
            break
        time.sleep(0.005)
    assert not d.scheduler.loading
    assert d.kv.pool.num_free_blocks == d.num_blocks
    d.check_invariants()
    wait_all_free(p)


def test_structured_output_on_the_decode_side(model, pair):
    """A constrained request whose prompt KV was pulled: its first token (sampled on the
    decode side after the pull) and every later one follow the grammar, and the tokens equal
    a colocated engine's."""
    import json

    from pagoda.sampling import StructuredOutputsParams

    path = model[0]
    p, d = pair
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 999}},
              "required": ["n"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=json.dumps(schema)))
    # A prompt of whole characters (random ids may end mid-character, and the detokenizer
    # would join those bytes to the output's text).
    prompt = p.encode("the quick brown fox jumps over the lazy dog " * 4)
    want = LLM(path, dtype="float32", block_size=BLOCK).generate(prompt, params)[0]
    kv = prefill(p, "p-so", prompt)
    out = run(d, "d-so", prompt, params, kv_transfer_params=kv)
    assert d.kv_connector.num_blocks_pulled > 0, "nothing was pulled"
    assert out.finish_reason == "stop" and out.token_ids == want.token_ids
    assert 0 <= json.loads(out.text)["n"] <= 999
    wait_all_free(d)


def test_speculative_decoding_on_the_decode_side(model):
    """A decode instance with speculation: a request whose prompt KV was pulled decodes with
    drafts (the prompt loops, so prompt lookup finds them) and equals a colocated engine."""
    path = model[0]
    unit = [random.Random(8).randrange(3, TINY_VOCAB) for _ in range(7)]
    prompt = unit * 5
    params = greedy(30)
    want = LLM(path, dtype="float32", block_size=BLOCK).generate(prompt, params)[0]
    spec = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    p, d = engine(path, "prefill"), engine(path, "decode", speculative_config=spec)
    try:
        kv = prefill(p, "p-spec", prompt)
        out = run(d, "d-spec", prompt, params, kv_transfer_params=kv)
        assert d.kv_connector.num_blocks_pulled > 0, "nothing was pulled"
        assert out.token_ids == want.token_ids
        assert d.stats().scheduler.spec.num_accepted_tokens > 0, "no draft was accepted"
        wait_all_free(p)
        d.check_invariants()
    finally:
        p.close()
        d.close()


def test_under_the_switch_a_pulled_request_equals_colocated_alone_to_the_bit(model):
    """--deterministic through disaggregated prefill (issue 39, docs/deterministic.md), in
    bf16: the prompt is computed on the prefill side among other prompts, pulled, and decoded
    among other (sampled) decodes; its tokens and its logprobs equal, to the bit, those of a
    colocated engine that ran it alone."""
    path, prompts, _ = model
    target = prompts[0]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    alone = LLM(path, dtype="bfloat16", block_size=BLOCK, deterministic=True)
    want = alone.generate([target], params)[0].outputs[0]
    p = engine(path, "prefill", dtype="bfloat16", deterministic=True)
    d = engine(path, "decode", dtype="bfloat16", deterministic=True)
    rng = random.Random(9)
    mates = [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randrange(5, 60))]
             for _ in range(6)]
    try:
        for i, mate in enumerate(mates):
            p.add_request(EngineRequest(f"p-mate{i}", mate, greedy(1)))
        kv = prefill(p, "p-target", target)
        for i, mate in enumerate(mates):
            sampled = SamplingParams(temperature=0.8, seed=i, max_tokens=20, ignore_eos=True)
            d.add_request(EngineRequest(f"d-mate{i}", mate, sampled))
        got = run(d, "d-target", target, params, kv_transfer_params=kv).outputs[0]
        assert d.kv_connector.num_blocks_pulled > 0, "nothing was pulled"
        assert got.token_ids == want.token_ids
        assert got.cumulative_logprob == want.cumulative_logprob
    finally:
        p.close()
        d.close()
