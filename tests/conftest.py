import os
import sys

import pytest

# tests/ holds helpers shared by the test folders (tiny_models.py).
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run tiny ops: extra intra-op threads only spin, badly so on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
