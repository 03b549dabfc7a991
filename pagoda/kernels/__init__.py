"""The ground floor: pagoda's own kernels, knowing nothing of models, attention or engine.

- ``ext.py``: builds (once, cached) and loads the one C++ extension of ``csrc/`` (paged decode,
  AMX prefill attention, KV write, fused ops, Gumbel sampling, token masks, the suffix trie);
- ``cpu_fused.py``: the fused bf16 CPU ops over it (RMSNorm, RoPE, SiLU/GELU * up, argmax);
- ``triton_fused.py``: the fused GPU ops in Triton (RMSNorm, q/k norm with RoPE, SiLU * up).

The floors above call them (``attention/`` its decode wrapper and backends, ``models/ops.py``
the op sets, ``worker/`` the sampler's kernels); nothing here imports those floors.
"""
