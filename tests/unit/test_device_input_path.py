"""The CUDA model-runner input path, exercised on the CPU: one packed host buffer split into
device views, AttentionMetadata with packed prefills, and the Triton kernels (under
TRITON_INTERPRET=1) bound into the model. Greedy tokens must equal the CPU path's, through
prefills, chunked prefills over a cached context, decodes and mixed batches.

The CUDA-graph decode path is checked the same way, with each "graph" replaying the forward
eagerly on its static buffers: padding rows (slot -1, seq_len 1), stale block-table columns and
the fixed split count must not change a token. (Capture, replay and pinned memory themselves
need a GPU: tests/gpu/.)
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (on a GPU, "
                "tests/gpu/ covers this path)", allow_module_level=True)

from pagoda.attention import backend, triton_attention  # noqa: E402
from pagoda.attention.metadata import AttentionMetadata  # noqa: E402
from pagoda.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from pagoda.models import ops  # noqa: E402
from pagoda.models.loader import load_model  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402
from pagoda.worker.cuda_graph import DecodeGraphs, _Graph  # noqa: E402
from pagoda.models.prepare import prepare_model
from pagoda.worker.model_runner import ModelRunner  # noqa: E402

CPU = torch.device("cpu")
BLOCK_SIZE = 16


def script(runner: ModelRunner, pipelined: bool = False) -> list[dict[str, int]]:
    """A: 20-token prompt; B: 5; C: 40 tokens arriving at step 2 and prefilled in two chunks
    (the second over 24 cached tokens) next to the decodes of A and B. ``pipelined``: as
    with async scheduling, each step is launched before the previous one is collected, so
    its decodes take their input tokens from the previous step's samples on the device."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = {"A": list(range(10, 30)), "B": [3, 1, 4, 1, 5], "C": list(range(100, 140))}
    blocks = {"A": [7, 2], "B": [5], "C": [0, 9, 3, 8]}

    def new(rid: str) -> NewRequestData:
        return NewRequestData(rid, prompts[rid], len(prompts[rid]), params, (), blocks[rid], 0)

    def cached(rid: str, computed: int) -> CachedRequestData:
        return CachedRequestData(rid, [], computed)

    steps = [
        SchedulerOutput([new("A"), new("B")], [], {"A": 20, "B": 5}),
        SchedulerOutput([], [cached("A", 20), cached("B", 5)], {"A": 1, "B": 1}),
        SchedulerOutput([new("C")], [cached("A", 21), cached("B", 6)], {"A": 1, "B": 1, "C": 24}),
        SchedulerOutput([], [cached("A", 22), cached("B", 7), cached("C", 24)],
                        {"A": 1, "B": 1, "C": 16}),
        SchedulerOutput([], [cached("A", 23), cached("B", 8), cached("C", 40)],
                        {"A": 1, "B": 1, "C": 1}),
    ]
    if not pipelined:
        return [runner.execute_model(s).sampled_token_ids for s in steps]
    outs, in_flight = [], None
    for step in steps:
        launched = runner.launch(step)
        if in_flight is not None:
            outs.append(runner.collect(in_flight).sampled_token_ids)
        in_flight = launched
    return outs + [runner.collect(in_flight).sampled_token_ids]


class EagerReplay:
    """Stands in for a captured CUDA graph: replay() reruns the forward on the same buffers."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def replay(self) -> None:
        self.forward()

    def pool(self) -> None:
        return None


class EagerDecodeGraphs(DecodeGraphs):
    replays: list[int] = []

    def _capture_one(self, size, pool):
        head, tables = self._static_inputs(size)
        meta = self._metadata(head, tables)
        hidden = torch.full((size, self.model.arch.hidden_size), float("nan"))

        def forward() -> None:
            self.replays.append(size)
            hidden.copy_(self.model(head[0], head[1], self.kv_caches, meta))

        return _Graph(EagerReplay(forward), head, tables, hidden)


@pytest.mark.parametrize("fused,pipelined", [(False, False), (True, False), (False, True)],
                         ids=["reference-ops", "triton-fused-ops", "pipelined"])
def test_device_input_path_with_triton_matches_cpu_path(monkeypatch, fused, pipelined):
    """With ``fused``, the model's norms, q/k norm + RoPE and SiLU·up also take the Triton
    kernels of kernels/triton_fused.py, as on a GPU."""
    loaded = load_model(None, torch.float32, CPU, load_format="dummy", model_preset="tiny-qwen3")
    want = script(ModelRunner(prepare_model(loaded.model, CPU, torch.float32), 12, BLOCK_SIZE))
    calls: list[str] = []
    if fused:
        from pagoda.kernels import triton_fused

        def counted(name):
            fn = getattr(triton_fused, name)

            def wrapper(*args, **kwargs):
                calls.append(name)
                return fn(*args, **kwargs)
            return wrapper

        for name in ("rms_norm", "qk_norm_rope_", "silu_mul"):
            monkeypatch.setattr(triton_fused, name, counted(name))
    seen: list[AttentionMetadata] = []

    def triton_everywhere(q, k, v, kv_cache, meta, scale, **options):
        assert isinstance(meta, AttentionMetadata)
        assert (meta.packed_prefills is None) == (not meta.prefills)
        seen.append(meta)
        return triton_attention.paged_attention(q, k, v, kv_cache, meta, scale, **options)

    runner = ModelRunner(prepare_model(loaded.model, CPU, torch.float32), 12, BLOCK_SIZE)
    runner.is_cuda = True          # the device input path, on CPU tensors
    decoder_ops = ops.triton_ops(loaded.arch.head_dim) if fused else loaded.model.ops
    loaded.model.bind(decoder_ops, backend.AttentionBackend("triton", triton_everywhere, True))
    got = script(runner, pipelined)
    assert got == want
    assert all(len(step) for step in got)
    assert any(m.prefills and m.num_decode_tokens for m in seen), "no mixed batch ran"
    if fused:
        assert len(calls) >= 5 * 2 * 4, "the fused ops were not used"   # steps x layers x ops


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
def test_decode_graph_path_matches_cpu_path(monkeypatch, pipelined):
    """Decode-only steps of 2 and 3 requests go through the graphs of 2 and 4 (one pad row);
    ``pipelined``, their input tokens are written into the graph's buffer on the device."""
    loaded = load_model(None, torch.float32, CPU, load_format="dummy", model_preset="tiny-qwen3")
    want = script(ModelRunner(prepare_model(loaded.model, CPU, torch.float32), 12, BLOCK_SIZE))

    runner = ModelRunner(prepare_model(loaded.model, CPU, torch.float32), 12, BLOCK_SIZE)
    runner.is_cuda = True
    loaded.model.bind(loaded.model.ops, backend.triton_backend())   # Triton attention
    runner.graphs = EagerDecodeGraphs(loaded.model, runner.kv_caches, BLOCK_SIZE, 4, 256, CPU)
    runner.graphs.capture()
    EagerDecodeGraphs.replays = []
    assert runner.cuda_graph_sizes == [1, 2, 4]
    got = script(runner, pipelined)
    assert got == want
    assert EagerDecodeGraphs.replays == [2, 4]     # steps 1 and 4; the others are mixed


def test_deterministic_graph_path_matches_eager(monkeypatch):
    """--deterministic on CUDA's kernels (the invariant Triton product and attention): decode
    steps replayed through the graphs of 2 and 4 rows (a pad row, the graph's static tables and
    split count) give the tokens of the same runner without graphs."""
    monkeypatch.setattr(backend, "use_triton", lambda device: True)
    loaded = load_model(None, torch.float32, CPU, load_format="dummy", model_preset="tiny-qwen3")
    prepared = prepare_model(loaded.model, CPU, torch.float32, deterministic=True)
    assert loaded.model.attention.name == "triton-invariant"
    eager = ModelRunner(prepared, 12, BLOCK_SIZE)
    eager.is_cuda = True
    want = script(eager)

    runner = ModelRunner(prepared, 12, BLOCK_SIZE)
    runner.is_cuda = True
    runner.graphs = EagerDecodeGraphs(loaded.model, runner.kv_caches, BLOCK_SIZE, 4, 256, CPU)
    runner.graphs.capture()
    EagerDecodeGraphs.replays = []
    assert script(runner) == want
    assert EagerDecodeGraphs.replays == [2, 4]
