"""How many kernels a decode step launches per layer on the CUDA path, counted on the CPU.

At small batches a decode step costs about one launch per kernel, even inside a CUDA graph,
so the count is the batch-1 latency's floor. The model runs as on a GPU: Triton attention
and the Triton fused ops, under TRITON_INTERPRET=1. Every ATen op that does work counts (a
view or an allocation launches nothing), and so does every Triton launch. Before the fused
ops a layer was about sixty launches; now it must stay at about a dozen.
"""
from __future__ import annotations

import os
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts launches on CPU tensors under TRITON_INTERPRET=1",
                allow_module_level=True)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pagoda.attention import backend, triton_attention  # noqa: E402
from pagoda.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from pagoda.kernels import cpu_fused, triton_fused  # noqa: E402
from pagoda.models import ops  # noqa: E402
from pagoda.models.loader import load_model  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402
from pagoda.models.prepare import prepare_model
from pagoda.worker.model_runner import ModelRunner  # noqa: E402

CPU = torch.device("cpu")
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select",
             "unsqueeze", "t", "transpose", "expand", "alias", "detach", "as_strided",
             "permute", "squeeze", "unbind", "empty", "empty_like", "new_empty",
             "empty_strided"}
MAX_LAUNCHES_PER_LAYER = 12


class LaunchCounter(TorchDispatchMode):
    """ATen ops that launch a kernel, outside Triton launches (whose interpreter copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.inside_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH and not self.inside_triton:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class CountedKernel:
    """A Triton kernel whose launches are counted."""

    def __init__(self, kernel, name: str, counts: Counter, counter: LaunchCounter) -> None:
        self.kernel, self.name, self.counts, self.counter = kernel, name, counts, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] += 1
            self.counter.inside_triton = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.counter.inside_triton = False
        return run


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
def test_a_decode_layer_launches_about_a_dozen_kernels(monkeypatch, preset):
    loaded = load_model(None, torch.bfloat16, CPU, load_format="dummy", model_preset=preset)
    model = loaded.model
    if not triton_fused.rope_supported(model.arch.head_dim):
        pytest.skip("head dim")
    monkeypatch.setattr(cpu_fused, "enabled", lambda x: False)             # as on a GPU
    runner = ModelRunner(prepare_model(model, CPU, torch.bfloat16), 8, 16)
    runner.is_cuda = True
    model.bind(ops.triton_ops(model.arch.head_dim), backend.triton_backend())   # as on a GPU
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    runner.execute_model(SchedulerOutput(
        [NewRequestData("A", list(range(10, 30)), 20, params, (), [3, 4], 0)], [], {"A": 20}))
    decode = SchedulerOutput([], [CachedRequestData("A", [], 20)], {"A": 1})
    batch = runner._batch(runner._gather_inputs(decode))

    counter, triton_counts = LaunchCounter(), Counter()
    for module in (triton_fused, triton_attention):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, CountedKernel(getattr(module, name), name,
                                                                triton_counts, counter))
    with torch.inference_mode(), counter:
        model(batch.input_ids, batch.positions, runner.kv_caches, batch.attn)
    layers = model.arch.num_layers
    total = sum(counter.ops.values()) + sum(triton_counts.values())
    detail = f"ATen {dict(counter.ops)}, Triton {dict(triton_counts)}"
    assert total / layers <= MAX_LAUNCHES_PER_LAYER, detail
    assert triton_counts["_rms_norm_kernel"] == 2 * layers + 1, detail   # 2 a layer + final
    assert triton_counts["_qk_norm_rope_kernel"] == layers, detail
    assert triton_counts["_silu_mul_kernel"] == layers, detail
