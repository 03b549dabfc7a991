"""The CUDA-graph batch-size ladder and padding choice (capture itself needs a GPU:
tests/gpu/test_cuda_engine.py)."""
from __future__ import annotations

import pytest

from pagoda.worker.cuda_graph import batch_size_ladder


@pytest.mark.parametrize("max_num_seqs, expected", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 32, 48, 64]),
])
def test_ladder(max_num_seqs, expected):
    assert batch_size_ladder(max_num_seqs) == expected


def test_ladder_for_256_ends_at_256_in_steps_of_16():
    sizes = batch_size_ladder(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b - a == 16 for a, b in zip(sizes[4:], sizes[5:]))
