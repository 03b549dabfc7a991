"""Shared by the attention-kernel tests: fill every cache slot no sequence owns with values
that would show in any output that read them."""
import torch


def poison_unused(kv: torch.Tensor, used: torch.Tensor) -> None:
    """kv: (2, num_blocks, block_size, Hkv, D) fp32, in place; used: (num_blocks, block_size)
    bool. Unused slots get NaN in K and a huge value in V, or the other way round."""
    unused = ~used
    poison = torch.where(torch.rand(used.shape) < 0.5, float("nan"), 3e38)
    kv[0][unused] = poison[unused][:, None, None]
    kv[1][unused] = torch.where(poison[unused].isnan(), 3e38, float("nan"))[:, None, None]
