"""engine/kv_plan.py: the KV pools planned from shapes, flags and a budget, without a model."""
from __future__ import annotations

import pytest
import torch

from pagoda.core.sliding_kv import sliding_pool_blocks
from pagoda.engine.kv_plan import KVPlan, KVRequest, block_cap, plan_pools
from pagoda.models.config import ModelArch
from pagoda.models.presets import preset_config
from pagoda.worker.kv_cache import bytes_per_block, layer_counts

GEMMA3 = ModelArch.from_hf_config(preset_config("gemma-3-1b"))  # 22 sliding + 4 global layers
LLAMA = ModelArch.from_hf_config(preset_config("tiny-qwen3"))
BF16 = torch.bfloat16
MIB = 1 << 20


def req(**kw) -> KVRequest:
    base = dict(block_size=16, max_model_len=16384, max_num_seqs=4, token_budget=512)
    return KVRequest(**{**base, **kw})


def test_one_kind_of_layer_gets_one_pool_sized_from_memory_and_capped() -> None:
    per_block = bytes_per_block(LLAMA, 16, BF16)
    plan = plan_pools(LLAMA, BF16, req(max_model_len=64), 10_000 * per_block)
    assert plan == KVPlan(block_cap(req(max_model_len=64)))  # 4 * 64 / 16 = 16 blocks
    assert plan_pools(LLAMA, BF16, req(), 100 * per_block + 5) == KVPlan(100)


def test_both_kinds_split_the_budget_without_exceeding_it() -> None:
    memory = 256 * MIB
    one = plan_pools(GEMMA3, BF16, req(hybrid=False), memory)
    plan = plan_pools(GEMMA3, BF16, req(), memory)
    wanted = sliding_pool_blocks(GEMMA3.sliding_window, 16, 4, 512)
    assert plan.sliding_blocks == wanted and one.sliding_blocks is None
    assert plan.num_blocks > one.num_blocks  # the split holds more context
    full, sliding = layer_counts(GEMMA3)
    per_layer = bytes_per_block(GEMMA3, 16, BF16) // GEMMA3.num_layers
    assert (full * plan.num_blocks + sliding * wanted) * per_layer <= memory


@pytest.mark.parametrize("flags", [dict(hybrid=False), dict(one_table=True)])
def test_no_split_when_turned_off_or_one_table_is_needed(flags) -> None:
    assert plan_pools(GEMMA3, BF16, req(**flags), 256 * MIB).sliding_blocks is None


def test_no_split_where_the_window_costs_what_it_saves() -> None:
    """Contexts no longer than the window: the sliding pool would hold all of them."""
    short = req(max_model_len=GEMMA3.sliding_window, max_num_seqs=64)
    assert plan_pools(GEMMA3, BF16, short, 256 * MIB).sliding_blocks is None


def test_exact_block_counts() -> None:
    assert plan_pools(GEMMA3, BF16, req(num_blocks=5000), None) == KVPlan(
        5000, sliding_pool_blocks(GEMMA3.sliding_window, 16, 4, 512))
    assert plan_pools(GEMMA3, BF16, req(num_blocks=20), None) == KVPlan(20)  # no smaller
    assert plan_pools(GEMMA3, BF16, req(num_blocks=500, num_sliding_blocks=90), None) == KVPlan(
        500, 90)


def test_a_sliding_pool_too_small_for_one_request_is_refused_by_name() -> None:
    least = sliding_pool_blocks(GEMMA3.sliding_window, 16, 1, 512)
    with pytest.raises(ValueError, match=f"num_sliding_kv_blocks {least - 1} .* {least} blocks"):
        plan_pools(GEMMA3, BF16, req(num_sliding_blocks=least - 1), 256 * MIB)


def test_a_budget_that_holds_no_block_is_refused() -> None:
    with pytest.raises(ValueError, match="holds no block"):
        plan_pools(LLAMA, BF16, req(), 10)
