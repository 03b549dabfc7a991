"""pack_ints: a step's integer inputs laid end to end in one host buffer."""
import random

import pytest
import torch

from pagoda.worker.host_buffer import pack_ints


def naive(parts) -> list[int]:
    out: list[int] = []
    for p in parts:
        if isinstance(p, tuple):
            rows, width = p
            for r in rows:
                out.extend(r + [0] * (width - len(r)))
        else:
            out.extend(p)
    return out


def test_flat_parts_and_ragged_tables_match_a_naive_packing():
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    rows = [[rng.randrange(1 << 40) for _ in range(rng.randint(1, 9))] for _ in range(7)]
    parts = [[rng.randrange(-5, 1 << 33) for _ in range(rng.randint(0, 40))],
             [], (rows, 9), [-1, 2**62], ([], 4), ([[3]], 1)]
    buf, sizes = pack_ints(parts, pin=False)
    assert buf.dtype == torch.int64 and buf.dim() == 1
    assert buf.tolist() == naive(parts), f"seed {seed}"
    assert sizes == [len(parts[0]), 0, 63, 2, 0, 1]


def test_a_row_wider_than_its_table_is_refused():
    with pytest.raises(ValueError):
        pack_ints([([[1, 2, 3]], 2)], pin=False)
