import pytest

from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.request import Request
from pagoda.sampling import SamplingParams


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(100, 100 + n)), SamplingParams(), eos_token_ids=(1,), max_tokens=8)


def test_allocate_release_and_invariants():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free_blocks == 1
    pool.check_invariants({"x": a})
    pool.take(a[:1])
    pool.check_invariants({"x": a, "y": a[:1]})
    pool.release(a)
    assert pool.num_free_blocks == 3  # the shared block is still held once
    pool.check_invariants({"y": a[:1]})
    pool.release(a[:1])
    assert pool.num_free_blocks == 4
    pool.check_invariants({})


def test_pool_errors():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="only 2 free"):
        pool.allocate(3)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([0])
    with pytest.raises(RuntimeError, match="holds no cached KV"):
        pool.take([1])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_check_invariants_catches_wrong_holders():
    pool = BlockPool(3)
    a = pool.allocate(2)
    with pytest.raises(AssertionError):
        pool.check_invariants({"x": a[:1]})


def test_freed_anonymous_blocks_are_reused_first():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    r = _req("r", 10)
    assert kv.allocate_slots(r, 10) == [0, 1, 2]
    kv.free(r)
    # Without a hash a free block is worth nothing: it goes to the front of the free list.
    assert kv.pool.allocate(6) == [0, 1, 2, 3, 4, 5]


def test_freed_cached_blocks_go_to_the_back_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    r = _req("r", 10)
    assert kv.allocate_slots(r, 10) == [0, 1, 2]
    kv.free(r)
    # Block 2 is partial (anonymous): front. Blocks 0, 1 are cached: back, the tail (1)
    # before the head (0), so eviction takes a chain's tail first.
    assert kv.pool.allocate(6) == [2, 3, 4, 5, 1, 0]


def test_allocate_slots_grows_by_whole_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = _req("r", 5)
    assert len(kv.allocate_slots(r, 5)) == 2          # tokens 0..4 -> 2 blocks
    r.num_computed_tokens = 5
    assert kv.allocate_slots(r, 3) == []              # 8 tokens still fit in 2 blocks
    assert len(kv.allocate_slots(r, 4)) == 1          # 9 tokens -> 3 blocks
    other = _req("o", 8)
    assert kv.allocate_slots(other, 8) is None        # needs 2, only 1 free: nothing taken
    assert kv.pool.num_free_blocks == 1
    kv.check_invariants()


def test_sibling_blocks_never_cover_the_last_prompt_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    donor, child = _req("d", 8), _req("c", 8)
    kv.allocate_slots(donor, 8)
    donor.num_computed_tokens = 8
    # 8 prompt tokens = 2 full blocks, but token 7 must be computed by the child: share 1.
    shared = kv.sibling_blocks(child, donor)
    assert shared == kv.block_ids("d")[:1]
    assert kv.allocate_slots(child, 4, shared) == [2]
    assert kv.block_ids("c") == [kv.block_ids("d")[0], 2]
    kv.check_invariants()
    kv.free(donor)
    kv.check_invariants()
    assert kv.pool.ref_counts[kv.block_ids("c")[0]] == 1
