"""The 4-bit weights of ``--quantization int4`` (models/cpu_int4.py) against fp32 references:
the rounding recovers a GGUF Q4_1 grid exactly, the kernel computes ``x @ dequantize(W).T``,
and each layer routes steps by their row count. Fresh random inputs every run (seed shown)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.models import cpu_int4, cpu_linear
from pagoda.models.cpu_int4 import Int4Linear, Int4Weight


@pytest.fixture
def seed() -> int:
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


def q4_1_weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights on a Q4_1 grid as llama.cpp writes them: per group of 32 an fp16 scale d and
    minimum m, codes 0..15 with both ends used; (weights fp32, codes)."""
    groups = k // 32
    codes = torch.randint(0, 16, (n, groups, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    codes = codes[..., torch.randperm(32)]
    d = (torch.rand(n, groups, 1) * 0.02 + 1e-3).half().float()
    m = (-8 * d + torch.randn(n, groups, 1) * 1e-3).half().float()
    return (d * codes + m).reshape(n, k), codes.reshape(n, k).int()


def test_rounding_recovers_a_q4_1_grid(seed):
    w, codes = q4_1_weights(48, 96)
    q, scale, zero = cpu_int4.quantize(w)
    assert torch.equal(q, codes), seed
    back = cpu_int4.dequantize(q, scale, zero)
    assert (back - w).abs().max() <= 1e-6 * w.abs().max(), seed


def test_rounding_error_is_at_most_half_a_level(seed):
    w = torch.randn(40, 64)
    q, scale, zero = cpu_int4.quantize(w)
    assert q.min() >= 0 and q.max() <= 15
    err = (cpu_int4.dequantize(q, scale, zero) - w).abs().reshape(40, 2, 32)
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7).all(), seed


def test_a_constant_group_is_exact():
    w = torch.full((2, 32), 0.25)
    w[1] = -3.0
    assert torch.equal(cpu_int4.dequantize(*cpu_int4.quantize(w)), w)


def test_in_features_must_fill_groups():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        cpu_int4.quantize(torch.randn(4, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_kernel_computes_the_dequantized_product(seed, dtype, rows):
    n, k = 96, 160
    w = torch.randn(n, k).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    ref = cpu_int4.reference_linear(x, w)
    got = Int4Weight.from_dense(w, dtype)(x)
    assert got.dtype == dtype and got.shape == (rows, n)
    # fp32: the order of the sums; bf16: the output rounded to bf16 (2^-8 relative).
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (got.float() - ref).abs().max() <= tol * ref.abs().max(), seed


def test_non_contiguous_rows_are_accepted(seed):
    w = torch.randn(32, 64)
    x = torch.randn(64, 5).t()
    assert torch.allclose(Int4Weight.from_dense(w, torch.float32)(x), cpu_int4.reference_linear(x, w),
                          rtol=1e-5, atol=1e-5), seed


@pytest.mark.parametrize("bias", [False, True])
def test_layer_routes_by_row_count(seed, bias):
    dense = nn.Linear(64, 48, bias=bias)
    layer = Int4Linear(dense)
    layer.max_rows = 4
    small, big = torch.randn(4, 64), torch.randn(5, 64)
    assert torch.equal(layer(big), dense(big)), seed          # the dense form, untouched
    ref = cpu_int4.reference_linear(small, dense.weight)
    if bias:
        ref = ref + dense.bias
    got = layer(small)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), seed
    assert (got - dense(small)).abs().max() > 1e-4            # ... and it is the 4-bit one


def test_a_route_picks_the_form_by_the_steps_rows_without_drafts(seed):
    """Speculative decoding: a step of 1 + 6 rows whose route says 1 (its drafts not
    counted) takes the 4-bit form; a route of 5 the dense one, whatever the input's rows."""
    route = cpu_int4.Int4Route()
    dense = nn.Linear(64, 48, bias=False)
    layer = Int4Linear(dense, route)
    layer.max_rows = 4
    verify, decode = torch.randn(7, 64), torch.randn(1, 64)
    route.rows = 1
    four_bit = cpu_int4.reference_linear(verify, dense.weight)
    assert (layer(verify) - four_bit).abs().max() <= 1e-5 * four_bit.abs().max(), seed
    route.rows = 5
    assert torch.equal(layer(decode), dense(decode)), seed
    route.rows = None  # no drafts: the input's rows
    assert torch.equal(layer(verify), dense(verify)), seed
    layers = cpu_int4.attach_int4(Tiny(), route)
    assert layers and all(m.route is route for m in layers)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128, bias=False)
        self.down = nn.Linear(128, 64, bias=False)
        self.odd = nn.Linear(48, 32, bias=False)      # in_features not a multiple of 32
        self.lm_head = nn.Linear(64, 100, bias=False)


def test_attach_wraps_every_linear_but_the_head_and_odd_widths():
    model = Tiny()
    layers = cpu_int4.attach_int4(model)
    assert [type(m) for m in (model.up, model.down)] == [Int4Linear, Int4Linear]
    assert type(model.odd) is nn.Linear and type(model.lm_head) is nn.Linear
    assert layers == [model.up, model.down]


def test_packing_packs_the_dense_form_and_the_limit_reaches_every_layer(monkeypatch, seed):
    monkeypatch.setenv(cpu_linear.PACKED_LINEAR_ENV, "1")
    if not cpu_linear.packing_supported(torch.float32):
        pytest.skip("this torch build cannot pack fp32 weights")
    model = Tiny()
    up = model.up.weight.detach().clone()
    layers = cpu_int4.attach_int4(model)
    cpu_linear.pack_model(model)
    assert isinstance(model.up.dense, cpu_linear.PackedLinear)
    monkeypatch.setenv(cpu_int4.MAX_ROWS_ENV, "6")
    assert cpu_int4.choose_max_rows(layers, torch.float32) == 6
    assert all(m.max_rows == 6 for m in layers)
    x = torch.randn(7, 64)
    assert torch.allclose(model.up(x), F.linear(x, up), rtol=1e-5, atol=1e-5), seed


def test_timed_limit_is_one_of_the_timed_row_counts():
    layers = cpu_int4.attach_int4(Tiny())
    limit = cpu_int4.choose_max_rows(layers, torch.float32)
    assert limit == 0 or limit in cpu_int4.TIMING_ROWS
    assert all(m.max_rows == limit for m in layers)


@pytest.mark.parametrize("name, device, dtype, message", [
    ("int8", "cpu", torch.bfloat16, "unsupported quantization 'int8'"),
    ("int4", "cuda", torch.bfloat16, "CPU-only"),
    ("int4", "cpu", torch.float16, "bfloat16 or float32"),
])
def test_unsupported_settings_are_refused(name, device, dtype, message):
    with pytest.raises(ValueError, match=message):
        cpu_int4.resolve_quantization(name, torch.device(device), dtype)


def test_none_means_no_quantization():
    cpu = torch.device("cpu")
    assert cpu_int4.resolve_quantization(None, cpu, torch.float32) is None
    assert cpu_int4.resolve_quantization("none", cpu, torch.float32) is None
    assert cpu_int4.resolve_quantization("int4", cpu, torch.bfloat16) == "int4"


# The 4-bit experts of MoE layers (Int4Stack / Int4Experts).

@pytest.mark.parametrize("shape", [(16, 32), (48, 64), (96, 64), (128, 96), (1536, 256)])
def test_unpacking_inverts_the_kernels_packing(seed, shape):
    """Whatever block layout this CPU's kernel packs in (tails of fewer than 64 rows too)."""
    codes = torch.randint(0, 16, shape, dtype=torch.int32)
    back = cpu_int4.unpack_codes(cpu_int4.pack_codes(codes), *shape)
    assert back.dtype == torch.uint8 and torch.equal(back.int(), codes), seed


@pytest.mark.parametrize("out_features", [48, 64, 192])
@pytest.mark.parametrize("layout", ["plain blocks", "learned order"])
def test_an_expert_dequantizes_to_what_its_codes_stand_for(seed, out_features, layout,
                                                           monkeypatch):
    """Both ways of reading the codes back: the plain block layout read as the transpose
    (where this CPU packs so and the rows fill its blocks), and the learned order (any)."""
    if layout == "learned order":
        monkeypatch.setattr(cpu_int4, "packing_block", lambda: None)
    w = torch.randn(3, out_features, 96)
    stack = cpu_int4.Int4Stack(3, out_features, 96, torch.float32)
    for e in range(3):
        stack.store(e, w[e])
    for e in range(3):
        want = cpu_int4.dequantize(*cpu_int4.quantize(w[e]))
        assert torch.equal(stack.dequantized(e), want.t()), seed


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("max_rows", [0, 8])
def test_an_expert_product_is_the_dequantized_product(seed, rows, max_rows):
    w = torch.randn(2, 96, 64)
    stack = cpu_int4.Int4Stack(2, 96, 64, torch.float32)
    stack.store(0, w[0])
    stack.store(1, w[1])
    stack.max_rows = max_rows
    x = torch.randn(rows, 64)
    assert torch.allclose(stack(1, x), cpu_int4.reference_linear(x, w[1]), rtol=1e-5,
                          atol=1e-5), seed


def test_gate_and_up_rows_pack_the_same_in_either_order(seed):
    gate, up, down = torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32)
    a = cpu_int4.Int4Experts(2, 64, 32, torch.float32)
    a.load(1, 0, gate)
    assert a.waiting == 1
    a.load(1, None, down)
    a.load(1, 1, up)
    b = cpu_int4.Int4Experts(2, 64, 32, torch.float32)
    b.load(1, 1, up)
    b.load(1, 0, gate)
    assert a.waiting == b.waiting == 0
    whole = cpu_int4.dequantize(*cpu_int4.quantize(torch.cat([gate, up])))
    assert torch.equal(a.gate_up.dequantized(1), whole.t())
    assert torch.equal(b.gate_up.dequantized(1), whole.t())
    assert torch.equal(a.down.dequantized(1), cpu_int4.dequantize(*cpu_int4.quantize(down)).t())


def test_expert_shapes_the_kernel_cannot_take_are_refused():
    assert cpu_int4.int4_shape_supported(96, 64)
    assert not cpu_int4.int4_shape_supported(96, 48)  # inputs not whole groups
    assert not cpu_int4.int4_shape_supported(40, 64)  # rows not a multiple of 16
    with pytest.raises(ValueError, match="no 4-bit kernel"):
        cpu_int4.Int4Stack(2, 64, 48, torch.float32)
