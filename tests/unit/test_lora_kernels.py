"""The grouped LoRA kernels (Punica's SGMV: the C++ ``kernels/cpu_lora.py`` and the Triton
``lora/triton_lora.py``) against the reference ``punica.grouped_torch``.

Every case checks the contract of ``punica.py``: rows inside a segment get
``(x @ a[slot].T) @ b[slot].T`` added (fp32: to rounding noise; bf16: within bf16 rounding,
as the kernels may keep h in fp32 where the reference rounds it to bf16), rows outside every
segment keep the base output bit for bit. The layout has several slots interleaved (one slot
twice, apart), a base-only gap, a single row and a 300-row segment; the poison test fills every
slot no segment uses, and the x rows outside the segments, with NaN. Two mutants (a kernel
reading slot 0 for every segment, one writing a row past each segment) show the comparison
catches what it must. The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors
where there is no GPU, and are compiled for an H100 (sm_90) as ``test_triton_compile.py``
does. Fresh random inputs each run: the seed is in every failure message.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pagoda.kernels import cpu_lora  # noqa: E402
from pagoda.lora.punica import Kernel, LoRABatch, Segment, grouped_torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32, torch.bfloat16]

# (K, N, R): a small model's, SmolLM2-135M's fused linears (qkv 576 -> 960, o 576 -> 576,
# gate_up 576 -> 3072, down 1536 -> 576) at rank 16 and 48 (one rank-16 adapter on each of
# q, k and v), and shapes that are no multiples of a vector (R = 3 * 64 the largest).
SMALL = (64, 96, 8)
SMOLLM2_LINEARS = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]
SMOLLM2 = {f"{name}-r{rank}": (k, n, rank) for name, k, n in SMOLLM2_LINEARS for rank in (16, 48)}
ODD = {"odd-r5": (70, 100, 5), "odd-r192": (33, 17, 192)}
SHAPES = {"small": SMALL, **SMOLLM2, **ODD}

# (start, rows, slot): slots 2, 0, 3, 2, 0 interleaved; rows 8-9 and 315-319 base-only; row 10
# alone; rows 11-310 one segment. Slots 1, 4 and 5 are resident but unused.
NUM_ROWS = 320
NUM_SLOTS = 6
SEGMENTS: list[Segment] = [(0, 5, 2), (5, 3, 0), (10, 1, 3), (11, 300, 2), (311, 4, 0)]


@dataclass
class Impl:
    name: str
    run: Kernel
    device: torch.device


def implementation(name: str) -> Impl:
    """The kernel under test, or a skip where it cannot run here."""
    if name == "cpp":
        if not cpu_lora.available():
            pytest.skip("the C++ extension is not built")
        return Impl(name, cpu_lora.lora_sgmv, torch.device("cpu"))
    pytest.importorskip("triton")
    from pagoda.lora import triton_lora

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("no GPU, and TRITON_INTERPRET was not set before triton was imported")
    return Impl(name, triton_lora.lora_sgmv, TRITON_DEVICE)


@pytest.fixture(params=["cpp", "triton"])
def impl(request: pytest.FixtureRequest) -> Impl:
    return implementation(request.param)


@dataclass
class Case:
    seed: int
    x: torch.Tensor  # (T, K)
    a: torch.Tensor  # (S, R, K)
    b: torch.Tensor  # (S, N, R)
    base: torch.Tensor  # (T, N): the base linear's output
    segments: list[Segment]

    def batch(self) -> LoRABatch:
        batch = LoRABatch()
        batch.set(list(self.segments))
        return batch


def make_case(
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    segments: list[Segment] = SEGMENTS,
    poison: bool = False,
) -> Case:
    """Random inputs whose delta is of the base's size (about 1); ``poison``: NaN in every slot
    no segment reads and in the x rows outside the segments."""
    k, n, rank = shape
    seed = random.SystemRandom().randrange(1 << 31)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_ROWS, k, generator=gen)
    a = torch.randn(NUM_SLOTS, rank, k, generator=gen) / k**0.5
    b = torch.randn(NUM_SLOTS, n, rank, generator=gen) / rank**0.5
    base = torch.randn(NUM_ROWS, n, generator=gen)
    if poison:
        unused = sorted(set(range(NUM_SLOTS)) - {slot for _, _, slot in segments})
        a[unused], b[unused] = float("nan"), float("nan")
        x[~inside(segments)] = float("nan")
    return Case(seed, *(t.to(dtype).to(device) for t in (x, a, b, base)), segments)


def inside(segments: list[Segment]) -> torch.Tensor:
    """(T,) bool: the rows some segment covers."""
    mask = torch.zeros(NUM_ROWS, dtype=torch.bool)
    for start, rows, _ in segments:
        mask[start : start + rows] = True
    return mask


def apply(kernel: Kernel, case: Case) -> torch.Tensor:
    """The base output with ``kernel``'s delta added (in place, on a copy)."""
    out = case.base.clone()
    kernel(out, case.x, case.a, case.b, case.batch())
    return out


def assert_matches(got: torch.Tensor, case: Case) -> None:
    """got against grouped_torch: the segments' rows close, the other rows the base's bits."""
    want = apply(grouped_torch, case)
    rows = inside(case.segments).to(got.device)
    seed = case.seed
    assert got.dtype == want.dtype and got.shape == want.shape, seed
    assert torch.equal(got[~rows], case.base[~rows]), f"seed {seed}: a row outside was written"
    g, w = got[rows].float(), want[rows].float()
    assert torch.isfinite(g).all(), f"seed {seed}: non-finite output in a segment"
    # bf16: one rounding of out (2^-8 of ~1) and the reference's bf16 h (2^-9 per term).
    tol = 2e-5 if got.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_the_reference(impl: Impl, shape: tuple[int, int, int], dtype: torch.dtype):
    case = make_case(shape, dtype, impl.device)
    assert_matches(apply(impl.run, case), case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SMALL, SMOLLM2["qkv-r48"]], ids=["small", "qkv-r48"])
def test_poisoned_slots_and_rows_never_reach_the_output(
    impl: Impl, shape: tuple[int, int, int], dtype: torch.dtype
):
    case = make_case(shape, dtype, impl.device, poison=True)
    got = apply(impl.run, case)
    assert not torch.isnan(got[inside(SEGMENTS).to(got.device)]).any(), case.seed
    assert_matches(got, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_segments_of_one_row(impl: Impl, dtype: torch.dtype):
    """One row per adapter, as in a decode step where every request has its own."""
    segments = [(3 * i, 1, i % NUM_SLOTS) for i in range(40)]
    case = make_case(SMOLLM2["qkv-r16"], dtype, impl.device, segments)
    assert_matches(apply(impl.run, case), case)


def test_no_segments_is_a_no_op(impl: Impl):
    case = make_case(SMALL, torch.float32, impl.device, segments=[])
    assert torch.equal(apply(impl.run, case), case.base)


def slot_zero_mutant(kernel: Kernel) -> Kernel:
    """``kernel`` reading slot 0 for every segment."""

    def run(out, x, a, b, batch: LoRABatch) -> None:
        wrong = LoRABatch()
        wrong.set([(start, rows, 0) for start, rows, _ in batch.segments])
        kernel(out, x, a, b, wrong)

    return run


def row_past_the_end_mutant(kernel: Kernel) -> Kernel:
    """``kernel`` adding a segment's delta to the row after it too (rows clamped to T)."""

    def run(out, x, a, b, batch: LoRABatch) -> None:
        wrong = LoRABatch()
        wrong.set([(s, min(r + 1, out.shape[0] - s), slot) for s, r, slot in batch.segments])
        kernel(out, x, a, b, wrong)

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mutant", [slot_zero_mutant, row_past_the_end_mutant])
def test_the_comparison_catches_mutants(
    impl: Impl, dtype: torch.dtype, mutant: Callable[[Kernel], Kernel]
):
    case = make_case(SMALL, dtype, impl.device)
    assert_matches(apply(impl.run, case), case)  # the kernel itself passes
    with pytest.raises(AssertionError):
        assert_matches(apply(mutant(impl.run), case), case)


def test_a_bad_segment_raises_before_any_write():
    impl = implementation("cpp")
    case = make_case(SMALL, torch.float32, impl.device, segments=[(0, 4, 1), (NUM_ROWS - 2, 3, 0)])
    out = case.base.clone()
    with pytest.raises(RuntimeError, match="segment 1"):
        impl.run(out, case.x, case.a, case.b, case.batch())
    assert torch.equal(out, case.base)


# Compiled in a subprocess: this one runs the kernels interpreted (TRITON_INTERPRET=1), and
# interpreted @triton.jit functions cannot be compiled.
_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagoda.lora import triton_lora as tlr

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def spills(ptx):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return int(re.search(r"(\d+) bytes spill stores", out).group(1))

def build(label, kernel, ptrs, consts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if n.endswith("_ptr")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=aligned)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = c.asm["ptx"]
    return {"label": label, "cubin": len(c.asm.get("cubin", b"")) > 0, "spill": spills(ptx),
            "mma": ptx.count("mma.sync") + ptx.count("wgmma.mma_async")}

out = []
for dt in ("bf16", "fp16", "fp32"):
    prec = "ieee" if dt == "fp32" else "tf32"
    for br in (16, tlr.MAX_BLOCK_R):
        out.append(build(f"shrink {dt} R{br}", tlr._shrink_kernel,
            {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "h_ptr": "*fp32", "seg_ptr": "*i32"},
            dict(BLOCK_M=tlr.BLOCK_M, BLOCK_R=br, BLOCK_K=tlr.BLOCK_K, PRECISION=prec,
                 UPCAST=False)))
        out.append(build(f"expand {dt} R{br}", tlr._expand_kernel,
            {"h_ptr": "*fp32", "b_ptr": "*" + dt, "out_ptr": "*" + dt, "seg_ptr": "*i32"},
            dict(BLOCK_M=tlr.BLOCK_M, BLOCK_N=tlr.BLOCK_N, BLOCK_R=br, PRECISION=prec,
                 SOFT=False)))
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm90():
    """Both kernels lower to an H100 cubin for every dtype, spill no registers, and the 16-bit
    ones run their dots on the tensor cores."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    for r in results:
        assert r["cubin"] and r["spill"] == 0, r
        assert r["mma"] > 0 or "fp32" in r["label"], r
