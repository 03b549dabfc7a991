"""The scheduler side of disaggregated prefill, with connector events played by hand:
loads, arrivals, failures (recompute / fail), aborts mid-pull, leases."""
import sys
import os

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import KVTransferConfig, SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.remote_kv import (LEASE_HOLDER_PREFIX, KVEvents, RemoteKV, RemotePrefill,  # noqa: E402
                                   check_remote_prefill, parse_kv_transfer_params)
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

BS = 4
PROMPT = list(range(100, 114))   # 14 tokens: 13 pulled = 4 blocks (the last partly)


def make(role, policy="recompute", num_blocks=32, lease=30.0):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, model_key="m")
    remote = RemoteKV(KVTransferConfig(role, "eng", lease, policy), kv, ("127.0.0.1", 9))
    sched = Scheduler(SchedulerConfig(64, 8, 512, True), kv, remote=remote)
    return sched, FakeRunner(sched)


def remote_params(num_tokens=14, blocks=(10, 11, 12, 13)):
    return parse_kv_transfer_params(
        RemotePrefill("p", "r#1", tuple(blocks), num_tokens, "h", 1).to_json())


def req(rid, kv_transfer=None, tokens=PROMPT, max_tokens=3):
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(rid, list(tokens), p, (1,), max_tokens, kv_transfer=kv_transfer)


def fill_pulled_slots(runner, sched, request):
    """Play the transfer: the pulled blocks now hold the prompt's KV."""
    for pos in range(request.num_prompt_tokens - 1):
        runner.slots[runner._slot(request.request_id, pos)] = tuple(request.all_token_ids[:pos + 1])


def test_decode_side_loads_then_computes_only_the_last_prompt_token():
    sched, runner = make("decode")
    r = req("a", remote_params())
    sched.add_request(r)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {} and len(out.kv_loads) == 1
    load = out.kv_loads[0]
    assert load.remote_block_ids == [10, 11, 12, 13] and len(load.local_block_ids) == 4
    assert r.status is RequestStatus.WAITING_FOR_REMOTE_KV and "a" in sched.loading
    assert sched.kv.pool.num_cached_blocks == 0          # not cacheable before the KV is in
    runner.execute(out)
    sched.check_invariants()
    fill_pulled_slots(runner, sched, r)
    sched.apply_kv_events(KVEvents(loaded=["a"]))
    assert r.status is RequestStatus.RUNNING and r.num_computed_tokens == 13
    assert sched.kv.pool.num_cached_blocks == 3          # the 3 full pulled blocks
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.new_requests[0].num_computed_tokens == 13
    sched.update_from_output(out, runner.execute(out))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
    assert sched.kv.pool.num_free_blocks == 32


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_failed_pull_recomputes_or_fails(policy):
    sched, runner = make("decode", policy)
    r = req("a", remote_params())
    sched.add_request(r)
    runner.execute(sched.schedule())
    sched.apply_kv_events(KVEvents(failed={"a": "lost"}))
    assert sched.make_stats().num_kv_load_failures == 1
    sched.check_invariants()
    out = sched.schedule()
    assert [r.lease_id for r in out.kv_releases] == ["r#1"]
    if policy == "recompute":
        # The request computes its whole prompt locally, then decodes to its end.
        assert out.num_scheduled_tokens == {"a": 14} and not out.kv_loads
        sched.update_from_output(out, runner.execute(out))
        steps = 0
        while sched.has_unfinished_requests():
            run_step(sched, runner)
            steps += 1
            assert steps < 20, "the recomputed request never finished"
        assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3
    else:
        pending = sched.take_pending_outputs()
        assert [(o.request_id, o.finish_reason) for o in pending] == [("a", "error")]
        assert "lost" in pending[0].finish_detail
        assert not sched.has_unfinished_requests()
    sched.check_invariants()
    assert sched.kv.pool.num_free_blocks == 32     # no block leaked, in either policy


def test_abort_mid_pull_keeps_blocks_until_the_transfer_ends():
    sched, runner = make("decode")
    sched.add_request(req("a", remote_params()))
    runner.execute(sched.schedule())
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv.pool.num_free_blocks == 32 - 4       # still being written: still held
    sched.check_invariants()
    sched.apply_kv_events(KVEvents(loaded=["a"]))
    assert sched.kv.pool.num_free_blocks == 32 and not sched.loading
    assert sched.kv.pool.num_cached_blocks == 0          # never named: nobody may hit it


def test_local_prefix_hit_shrinks_the_pull():
    sched, runner = make("decode")
    sched.add_request(req("local", tokens=PROMPT[:9]))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
    sched.add_request(req("a", remote_params()))
    out = sched.schedule()
    (load,) = out.kv_loads
    assert load.remote_block_ids == [12, 13]             # blocks 0, 1 were local hits
    assert sched.requests["a"].num_cached_tokens == 8


def test_prompt_fully_in_the_local_cache_pulls_nothing():
    sched, runner = make("decode")
    sched.add_request(req("local", tokens=PROMPT + [5, 5]))
    while sched.has_unfinished_requests():
        run_step(sched, runner)
    sched.add_request(req("a", remote_params()))
    out = sched.schedule()
    assert not out.kv_loads and out.num_scheduled_tokens == {"a": 2}
    # The prefill instance is told at once, so its lease need not wait to expire.
    assert [r.lease_id for r in out.kv_releases] == ["r#1"]


@pytest.mark.parametrize("num_tokens, blocks, error", [
    (9, (10, 11, 12), "remote_num_tokens is 9, the prompt has 14"),
    (14, (10, 11, 12), "remote_block_ids has 3 blocks for 14 tokens of 4"),
    (14, (10, 11, 12, 13, 14), "remote_block_ids has 5 blocks"),
])
def test_remote_that_does_not_fit_the_prompt_is_refused_at_intake(num_tokens, blocks, error):
    """The one validator of remote prefill parameters (the engine calls it at intake, so
    the scheduler only ever sees parameters that cover the prompt exactly)."""
    remote = RemotePrefill("p", "r#1", blocks, num_tokens, "h", 1).signed(b"k", PROMPT)
    with pytest.raises(ValueError, match=error):
        check_remote_prefill(remote, PROMPT, BS, b"k")
    good = RemotePrefill("p", "r#1", (10, 11, 12, 13), 14, "h", 1)
    check_remote_prefill(good.signed(b"k", PROMPT), PROMPT, BS, b"k")
    with pytest.raises(ValueError, match="signature"):
        check_remote_prefill(good.signed(b"other", PROMPT), PROMPT, BS, b"k")


def test_prefill_side_leases_blocks_until_released_or_expired():
    sched, runner = make("prefill", lease=30.0)
    decode = parse_kv_transfer_params({"do_remote_decode": True})
    sched.add_request(req("a", decode, max_tokens=1))
    (out,) = run_step(sched, runner)
    assert out.finish_reason == "length"
    params = out.kv_transfer_params
    assert params.num_tokens == 14 and params.port == 9
    assert params.first_token_id == out.new_token_ids[0]
    lease = params.lease_id
    assert LEASE_HOLDER_PREFIX + lease in sched.kv.req_blocks
    assert sched.kv.pool.num_free_blocks == 32 - 4
    sched.check_invariants()
    sched.apply_kv_events(KVEvents(released=[lease]))
    assert sched.kv.pool.num_free_blocks == 32
    # An aborted request leaves no lease; an expired lease frees its blocks.
    sched.add_request(req("b", decode, max_tokens=1))
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert len(sched.remote.leases) == 0
    sched.add_request(req("c", decode, max_tokens=1))
    (out,) = run_step(sched, runner)
    assert len(sched.remote.leases) == 1
    assert out.kv_transfer_params.lease_id != lease      # lease ids never repeat
    sched.apply_kv_events(KVEvents(released=["unknown#9"]))          # ignored
    assert sched.kv.pool.num_free_blocks == 32 - 4
    sched.check_invariants()


def test_expired_lease_frees_blocks_and_each_new_lease_is_handed_to_the_connector():
    sched, runner = make("prefill")
    sched.add_request(req("a", parse_kv_transfer_params({"do_remote_decode": True}), max_tokens=1))
    (out,) = run_step(sched, runner)
    lease = out.kv_transfer_params.lease_id
    assert sched.take_new_leases() == [lease] and sched.take_new_leases() == []
    assert sched.kv.pool.num_free_blocks == 32 - 4
    sched.apply_kv_events(KVEvents(expired=[lease]))     # the connector owns the deadline
    assert sched.kv.pool.num_free_blocks == 32 and not sched.remote.leases
    sched.check_invariants()
