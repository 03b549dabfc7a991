"""Speculative decoding on the scheduler's side (no torch): the draft proposers, the policy,
and drafts through the scheduler on the fake runner: rejected drafts roll back, blocks held
only for them are freed, only accepted tokens are named in the prefix cache, and every
request reads only its own accepted KV."""
import os
import random
import sys
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, OracleDrafts, fake_token, run_step  # noqa: E402
from native import needs_ext  # noqa: E402

from pagoda.config import SchedulerConfig, SpeculativeConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402
from pagoda.spec_decode.ngram import NgramIndex  # noqa: E402
from pagoda.spec_decode.policy import (  # noqa: E402
    Candidate, SpecPolicy, StepCostModel, StepShape)
from pagoda.spec_decode.speculator import Speculator  # noqa: E402
from pagoda.spec_decode.suffix import (  # noqa: E402
    GlobalSuffixes, RequestSuffixes, SuffixTrie, check_trie)
from pagoda.worker.spec_verify import accept  # noqa: E402

EOS = (1,)


# ------------------------------------------------------------------ verification rule
def test_accept_keeps_matching_drafts_and_one_sample():
    assert accept([5, 6, 7], [5, 6, 9, 4]) == [5, 6, 9]
    assert accept([5, 6, 7], [5, 6, 7, 4]) == [5, 6, 7, 4]
    assert accept([5, 6, 7], [8, 6, 7, 4]) == [8]
    assert accept([], [3]) == [3]
    with pytest.raises(AssertionError):
        accept([5], [5])


# ------------------------------------------------------------------------------- ngram
def _ngram_brute(seq, min_n, max_n, k):
    """The reference: longest n first, the latest earlier occurrence with a follower."""
    for n in range(min(max_n, len(seq)), min_n - 1, -1):
        suffix = seq[len(seq) - n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == suffix:
                out, src = [], start + n
                ext = list(seq)
                for _ in range(k):
                    ext.append(ext[src])
                    out.append(ext[src])
                    src += 1
                return out
    return []


@given(st.lists(st.integers(0, 4), max_size=40), st.integers(1, 3), st.integers(0, 3),
       st.integers(1, 6))
@settings(max_examples=300, deadline=None)
def test_ngram_index_equals_a_scan(seq, min_n, extra, k):
    max_n = min_n + extra
    index = NgramIndex(min_n, max_n)
    for end in range(0, len(seq) + 1, 3):  # grown incrementally, in uneven steps
        index.extend(seq[:end])
    index.extend(seq)
    assert index.propose(k) == _ngram_brute(seq, min_n, max_n, k)


def test_ngram_continues_a_loop_past_the_end():
    index = NgramIndex(2, 4)
    index.extend([9, 1, 2, 3, 1, 2, 3, 1, 2])
    assert index.propose(7) == [3, 1, 2, 3, 1, 2, 3]


def test_ngram_never_matches_the_suffix_itself():
    index = NgramIndex(1, 3)
    index.extend([4, 5, 6])
    assert index.propose(3) == []


# ------------------------------------------------------------------------------ suffix
def _substring_counts(seqs, depth):
    counts = Counter()
    for seq in seqs:
        for i in range(len(seq)):
            for j in range(i + 1, min(len(seq), i + depth) + 1):
                counts[tuple(seq[i:j])] += 1
    return counts


def _trie_counts(trie):
    kids = {}
    for parent, t, child in trie.edges():
        kids.setdefault(parent, []).append((t, child))
    out, stack = {}, [((), 0)]
    while stack:
        path, node = stack.pop()
        for t, child in kids.get(node, []):
            out[path + (t,)] = trie.count(child)
            stack.append((path + (t,), child))
    return out


def _native_trie():
    from pagoda.kernels import ext

    return ext.require_extension().SuffixTrie  # a failed build fails, never skips


# The Python reference and the C++ trie the engine uses where its extension is built
# (skipped only on a machine with no compiler, tests/native.py's rule).
TRIES = [pytest.param(lambda: SuffixTrie, id="python"),
         pytest.param(_native_trie, id="cpp", marks=needs_ext)]


@pytest.mark.parametrize("impl", TRIES)
@given(seqs=st.lists(st.lists(st.integers(0, 3), max_size=25), min_size=1, max_size=5),
       depth=st.integers(1, 6), data=st.data())
@settings(max_examples=120, deadline=None)
def test_suffix_trie_counts_every_substring_and_removes_cleanly(impl, seqs, depth, data):
    trie = impl()(depth)
    for s in seqs:
        trie.add(s)
    assert _trie_counts(trie) == dict(_substring_counts(seqs, depth))
    check_trie(trie)
    gone = data.draw(st.sets(st.integers(0, len(seqs) - 1)))
    for i in sorted(gone):
        trie.remove(seqs[i])
        check_trie(trie)
    kept = [s for i, s in enumerate(seqs) if i not in gone]
    assert _trie_counts(trie) == dict(_substring_counts(kept, depth))
    if not kept:
        assert trie.num_nodes == 0
    for s in kept:  # freed nodes are reused without a trace of their past
        trie.add(s)
    check_trie(trie)
    assert _trie_counts(trie) == dict(_substring_counts(kept + kept, depth))


@given(seqs=st.lists(st.lists(st.integers(0, 5), max_size=40), min_size=1, max_size=4),
       depth=st.integers(2, 8), k=st.integers(1, 8), data=st.data())
@settings(max_examples=150, deadline=None)
def test_cpp_trie_answers_as_the_python_reference(seqs, depth, k, data):
    native = _native_trie()
    tries = [SuffixTrie(depth), native(depth)]
    own = seqs[0]
    for trie in tries:
        for s in seqs[1:]:
            trie.add(s)
        trie.extend(7, own[: len(own) // 2])
        trie.extend(7, own[len(own) // 2:])
        if len(seqs) > 2:
            trie.remove(seqs[1])
    context = data.draw(st.lists(st.integers(0, 5), max_size=10))
    answers = []
    for trie in tries:
        node, length = trie.own_match(7, depth)
        node2, length2 = trie.longest_match(context, depth)
        answers.append((length, trie.draft(node, k, 0.2), length2, trie.draft(node2, k, 0.0),
                        _trie_counts(trie), trie.num_nodes))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("impl", TRIES)
def test_request_suffixes_grow_incrementally_like_a_fresh_trie(impl):
    rng = random.Random(1)
    seq = [rng.randrange(4) for _ in range(60)]
    grown = RequestSuffixes(5, impl())
    for end in range(0, 61, 7):
        grown.extend(seq[:end])
    grown.extend(seq)
    fresh = impl()(5)
    fresh.add(seq)
    assert _trie_counts(grown.trie) == _trie_counts(fresh)


@pytest.mark.parametrize("impl", TRIES)
def test_suffix_draft_follows_the_most_frequent_continuation(impl):
    own = RequestSuffixes(8, impl())
    # "1 2" was followed by 3 three times and by 4 once; the sequence ends in "1 2".
    own.extend([1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2, 3, 6, 1, 2])
    node, length = own.longest_match(7)
    assert length == 2
    draft = own.draft(node, 4, min_prob=0.0)
    assert draft.tokens[0] == 3 and draft.probs[0] == pytest.approx(0.75)
    assert draft.probs == sorted(draft.probs, reverse=True)
    assert own.draft(node, 4, min_prob=0.8).tokens == []  # 0.75 < 0.8: nothing


@pytest.mark.parametrize("impl", TRIES)
def test_global_suffixes_evict_the_oldest_request(impl):
    recent = GlobalSuffixes(4, max_requests=2, make_trie=impl())
    recent.add("a", [1, 2, 3])
    recent.add("b", [4, 5, 6])
    recent.add("c", [7, 8, 9])
    assert len(recent) == 2
    assert recent.longest_match([1, 2], 2)[1] == 0, "evicted, but still matched"
    assert recent.longest_match([7, 8], 2)[1] == 2
    node, length = recent.longest_match([0, 4, 5], 3)
    assert length == 2 and recent.draft(node, 3, 0.0).tokens == [6]


def test_suffix_proposer_drafts_from_another_requests_output():
    spec = Speculator(SpeculativeConfig(method="suffix", num_speculative_tokens=6))
    done = req("done", 4)
    for t in [50, 51, 52, 53, 54, 55, 56]:
        done.append_output_token(t)
    spec.finish(done)
    new = req("new", 4)
    for t in [50, 51, 52]:
        new.append_output_token(t)
    assert spec.proposer.propose(new, 6).tokens[:3] == [53, 54, 55]


# ------------------------------------------------------------------------------ policy
COST = StepCostModel(base_s=0.018, per_token_s=0.0002, per_context_s=1e-6)


def test_policy_drafts_at_batch_one_and_declines_a_large_batch_that_rejects():
    policy = SpecPolicy(COST)
    one = [Candidate("a", [1, 2, 3, 4], 500)]
    # At the prior (one draft token in two accepted) the fourth's 1/16 is about break-even.
    assert policy.choose(one, 100, StepShape(1, 1, 500)) == {"a": [1, 2, 3]}
    policy.observe("a", 4, 3)
    assert policy.choose(one, 100, StepShape(1, 1, 500)) == {"a": [1, 2, 3, 4]}
    for rid in "bcd":
        policy.observe(rid, 4, 0)  # rejected at once, again and again
        policy.observe(rid, 4, 0)
    many = [Candidate(r, [1, 2, 3], 2000) for r in "bcd"]
    assert policy.choose(many, 100, StepShape(64, 64, 64 * 2000)) == {}


def test_policy_prefers_the_likelier_drafts_and_keeps_them_in_order():
    policy = SpecPolicy(COST)
    for _ in range(10):
        policy.observe("good", 4, 4)
        policy.observe("bad", 4, 1)
    cands = [Candidate("bad", [1, 2, 3, 4], 100), Candidate("good", [5, 6, 7, 8], 100)]
    chosen = policy.choose(cands, 100, StepShape(48, 48, 48 * 100))
    assert chosen.get("good") == [5, 6, 7, 8]
    assert len(chosen.get("bad", [])) < 4
    assert policy.choose(cands, 2, StepShape(1, 1, 100)) == {"good": [5, 6]}  # budget: 2


def test_a_declined_request_forgets_slowly_and_is_tried_again():
    policy = SpecPolicy(COST)
    for _ in range(20):
        policy.observe("r", 4, 0)
    low = policy.rate("r")
    cands = [Candidate("r", [1], 1000)]
    for _ in range(60):
        policy.choose(cands, 10, StepShape(64, 64, 64_000))
    assert policy.rate("r") > low + 0.1


def test_not_adaptive_takes_every_draft_while_the_budget_lasts():
    policy = SpecPolicy(None)
    cands = [Candidate("a", [1, 2, 3], 10), Candidate("b", [4, 5, 6], 10)]
    assert policy.choose(cands, 4, StepShape(99, 99, 10 ** 6)) == {"a": [1, 2, 3], "b": [4]}


def test_config_keys_are_vllms_and_checked():
    c = SpeculativeConfig.from_mapping({"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 5, "prompt_lookup_min": 2})
    assert (c.num_tokens, c.lookup_min, c.lookup_max) == (3, 2, 5)
    with pytest.raises(ValueError, match="unknown key.*draft_model"):
        SpeculativeConfig.from_mapping({"method": "ngram", "draft_model": "x"})
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_mapping({"method": "eagle"})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig.from_mapping({"prompt_lookup_min": 5, "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.from_mapping({"num_speculative_tokens": 0})


# --------------------------------------------------------- through the scheduler (fake)
def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=False, error=0.3,
         k=4, spec=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching, model_key="m")
    drafts = OracleDrafts(error)
    speculator = None
    if spec:
        speculator = Speculator(SpeculativeConfig(num_speculative_tokens=k, adaptive=False))
        speculator.proposer = drafts
    sched = Scheduler(SchedulerConfig(budget, max_seqs, 512, True), kv, speculator)
    return sched, FakeRunner(sched), drafts


def req(rid, prompt_len, max_tokens=12, prompt=None, **params):
    p = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    tokens = prompt if prompt is not None else [200 + i % 50 for i in range(prompt_len)]
    return Request(rid, tokens, p, EOS, max_tokens)


def drain(sched, runner):
    tokens, reasons = {}, {}
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        for out in run_step(sched, runner):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        sched.check_invariants()
        for request in sched.running:  # holds exactly the blocks of what it computed
            assert len(sched.kv.block_ids(request.request_id)) == sched.kv.num_blocks_for(
                request.num_computed_tokens)
    assert not sched.has_unfinished_requests()
    return tokens, reasons


def _workload(sched, n=6, max_tokens=15):
    for i in range(n):
        sched.add_request(req(f"r{i}", 5 + 3 * i, max_tokens=max_tokens))


@pytest.mark.parametrize("num_blocks, budget, caching", [(64, 32, False), (64, 7, True),
                                                         (14, 16, False), (14, 9, True)])
def test_drafts_give_the_same_tokens_and_hold_only_what_they_keep(num_blocks, budget, caching):
    plain, plain_runner, _ = make(num_blocks, budget=budget, caching=caching, spec=False)
    _workload(plain)
    want = drain(plain, plain_runner)
    sched, runner, _ = make(num_blocks, budget=budget, caching=caching)
    _workload(sched)
    got = drain(sched, runner)
    assert got == want
    stats = sched.spec.stats
    assert stats.num_drafts and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert sched.kv.pool.num_free_blocks == num_blocks
    # With speculation the same output took fewer steps.
    assert len(runner.steps) < len(plain_runner.steps)


def test_an_eos_inside_an_accepted_run_ends_the_request_there():
    sched, runner, _ = make(error=0.0, k=6)
    eos_at = 3  # the fourth output token is EOS: drafted, accepted, and the rest dropped
    r = req("e", 5, max_tokens=20)
    r.eos_token_ids = (fake_token("e", 5 + eos_at),)
    sched.add_request(r)
    tokens, reasons = drain(sched, runner)
    assert reasons == {"e": "stop"}
    assert tokens["e"] == [fake_token("e", 5 + j) for j in range(eos_at + 1)]


def test_drafts_never_pass_max_tokens_or_the_context():
    sched, runner, _ = make(error=0.0, k=8)
    sched.add_request(req("m", 5, max_tokens=3))
    tokens, reasons = drain(sched, runner)
    assert reasons == {"m": "length"} and len(tokens["m"]) == 3
    assert all(len(d) <= 2 for s in runner.steps for d in s.spec_token_ids.values())


def test_only_accepted_tokens_are_named_in_the_prefix_cache():
    sched, runner, _ = make(caching=True, error=0.5)
    sched.add_request(req("c", 6, max_tokens=30))
    drain(sched, runner)
    pool, bs = sched.kv.pool, sched.kv.block_size
    r = req("c", 6, max_tokens=30)
    for j in range(30):
        r.append_output_token(fake_token("c", 6 + j))
    sched.kv._extend_hashes(r, r.num_tokens)
    named = set(pool.cached)
    assert named and named <= set(r.block_hashes[: r.num_tokens // bs])


def test_async_scheduling_waits_for_a_verified_row():
    from fake_runner import AsyncDriver

    sched, runner, _ = make()
    _workload(sched, n=3)
    driver = AsyncDriver(sched, runner)
    got = {}
    while driver.busy:
        for out in driver.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        sched.check_invariants()  # (the fake runner checks that drafts follow known tokens)
    assert sched.spec.stats.num_drafts > 0, "no draft under async scheduling"
    plain, plain_runner, _ = make(spec=False)
    _workload(plain, n=3)
    assert got == drain(plain, plain_runner)[0]


class SpecSchedulerMachine(RuleBasedStateMachine):
    """Random adds over shared prefixes, steps, aborts and cache resets, on a small pool with
    speculation (drafts right or wrong at random): invariants hold, the fake runner never
    sees wrong KV, nothing is lost, and every request's tokens are the fake model's."""

    def __init__(self):
        super().__init__()
        self.sched, self.runner, self.drafts = make(num_blocks=14, budget=9, max_seqs=4,
                                                     caching=True, error=0.4, k=5)
        self.next_id = 0
        self.added, self.finished = {}, set()
        self.tokens: dict[str, list[int]] = {}

    @rule(prefix=st.integers(0, 2), extra=st.integers(0, 6), max_tokens=st.integers(1, 9))
    def add(self, prefix, extra, max_tokens):
        rid = f"q{self.next_id}"
        self.next_id += 1
        prompt = [300 + prefix] * 8 + list(range(extra))
        self.sched.add_request(req(rid, 0, max_tokens, prompt=prompt))
        self.added[rid] = len(prompt)

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            for out in run_step(self.sched, self.runner):
                self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason:
                    self.finished.add(out.request_id)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        self.sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        self.finished.add(rid)

    @rule()
    def reset(self):
        self.sched.kv.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.sched.check_invariants()
        for rid, toks in self.tokens.items():
            start = self.added[rid]
            assert toks == [fake_token(rid, start + j) for j in range(len(toks))], rid

    def teardown(self):
        while self.sched.has_unfinished_requests():
            self.step(1)
        pool = self.sched.kv.pool
        assert pool.num_free_blocks == pool.num_blocks
        assert set(self.drafts.finished) <= set(self.added)


TestSpecSchedulerMachine = SpecSchedulerMachine.TestCase
TestSpecSchedulerMachine.settings = settings(max_examples=80, stateful_step_count=30,
                                             deadline=None)
