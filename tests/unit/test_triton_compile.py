"""The Triton kernels compile for real GPUs, here, without one: each kernel is lowered through
Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for an
H100 (sm_90) with the constexprs the wrappers use for Qwen3-0.6B shapes, and must fit the
shared memory of the target. The interpreter tests check the arithmetic; this checks that the
compiler accepts the kernels (types, layouts, tl.dot shapes) before a GPU session runs them.

Arguments are specialised as Triton's JIT does on a real launch for these shapes: pointers and
integers divisible by 16 carry ``tt.divisibility = 16`` (it decides whether K/V rows load as
16-byte vectors). The PTX then goes through ptxas once more with ``-v``: no kernel may spill
registers to local memory, which would cost far more than the loads it serves. And the bf16
attention kernels must use the tensor cores (Hopper's wgmma for the prefill) and
asynchronous copies for their K/V tiles. The fp8 (e4m3) cache variants, which take the cache
as bytes (``*u8``) and encode / decode e4m3 in the kernel, compile too, under the same limits.

The compile runs in a subprocess: the interpreter tests set TRITON_INTERPRET=1 in this process,
which turns @triton.jit functions into interpreted ones that cannot be compiled.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Not imported here: a triton imported before the interpreter tests set TRITON_INTERPRET=1 makes
# their kernels' calls to other @triton.jit functions fail (pytest runs modules in one process).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SM90_MAX_SHARED_BYTES = 227 * 1024     # dynamic shared memory per block on H100 / H200

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pagoda.attention import triton_attention as ta
from pagoda.kernels import triton_fused as tf
from pagoda.kernels import triton_gemm as tg

TARGET = GPUTarget("cuda", 90, 32)
HEAD_DIM, GROUP, BLOCK_SIZE, NUM_KV_HEADS = 128, 2, 16, 8   # Qwen3-0.6B
INDEX_PTRS = {"query_start_ptr", "context_lens_ptr", "block_tables_ptr", "seq_lens_ptr",
              "slot_ptr", "pos_ptr"}
FP32_PTRS = {"mid_o_ptr", "mid_lse_ptr", "cos_ptr", "sin_ptr"}
FP32_SCALARS = {"scale_log2", "eps", "softcap_log2"}
# Integer arguments that need not be multiples of 16 (block-table width, split count, sizes).
# M: the invariant product's rows, never specialised (do_not_specialize).
ANY_INT = {"stride_bt", "stride_mlh", "n", "inter", "num_q_heads", "num_k_heads", "window", "M"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
CACHE_PTRS = {"k_cache_ptr", "v_cache_ptr"}   # an fp8 cache: its bytes

def signature(kernel, dtype, consts):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in CACHE_PTRS and consts.get("FP8_CACHE"):
            sig[name] = "*u8"
        elif name in INDEX_PTRS:
            sig[name] = "*i64"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig

def aligned(kernel, consts):
    # The JIT's specialisation of 16-byte aligned tensors and strides divisible by 16.
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if name not in consts and name not in ANY_INT and name not in FP32_SCALARS}

def registers(ptx):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return (int(re.search(r"Used (\d+) registers", out).group(1)),
            int(re.search(r"(\d+) bytes spill stores", out).group(1)))

def build(label, kernel, dtype, consts, options=None):
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, consts), constexprs=consts,
                    attrs=aligned(kernel, consts))
    compiled = triton.compile(src, target=TARGET, options=options)
    ptx = compiled.asm["ptx"]
    regs, spill = registers(ptx)
    return {"label": label, "shared": compiled.metadata.shared, "registers": regs,
            "spill_bytes": spill, "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync"), "cp_async": ptx.count("cp.async"),
            "cubin": "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0}

bd = triton.next_power_of_2(HEAD_DIM)
results = []
# (query dtype, fp8 cache): the cache in the queries' dtype, and an fp8 one under each.
for dtype, fp8 in (("bf16", False), ("fp32", False), ("bf16", True), ("fp32", True)):
    ieee = dtype == "fp32"
    kv = " fp8" if fp8 else ""
    # The num_warps / num_stages the wrappers launch with.
    launch = {k: ta._launch_options(k, torch.float32 if ieee else torch.bfloat16,
                                    ta.FP8 if fp8 else torch.bfloat16)
              for k in ("prefill", "decode")}
    # The tiles the wrappers launch for this dtype.
    decode_n = ta.DECODE_BLOCK_N_FP32 if ieee else ta.DECODE_BLOCK_N
    prefill_m, prefill_n = ((ta.PREFILL_BLOCK_M_FP32, ta.PREFILL_BLOCK_N_FP32) if ieee
                            else (ta.PREFILL_BLOCK_M, ta.PREFILL_BLOCK_N))
    # Plain, and (bf16 without fp8) with a sliding window and soft-capped scores (Gemma).
    for extra in ("", " window+softcap") if (dtype, fp8) == ("bf16", False) else ("",):
        flags = dict(HAS_WINDOW=bool(extra), HAS_SOFTCAP=bool(extra))
        for splits in ((1, 8) if dtype == "bf16" else (8,)):
            results.append(build(f"decode {dtype}{kv}{extra} splits={splits}",
                ta._decode_split_kernel, dtype,
                dict(NUM_SPLITS=splits, KEY_SPLIT=0, GROUP=GROUP, BLOCK_G=16, HEAD_DIM=HEAD_DIM,
                     BLOCK_D=bd,
                     BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=decode_n, IEEE=ieee, UPCAST=False,
                     FP8_CACHE=fp8, **flags), launch["decode"]))
        results.append(build(f"prefill {dtype}{kv}{extra}", ta._prefill_kernel, dtype,
            dict(GROUP=GROUP, HEAD_DIM=HEAD_DIM, BLOCK_D=bd, BLOCK_SIZE=BLOCK_SIZE,
                 BLOCK_M=prefill_m, BLOCK_N=prefill_n, IEEE=ieee, UPCAST=False, FP8_CACHE=fp8,
                 **flags), launch["prefill"]))
# --deterministic: the decode split every KEY_SPLIT keys, as paged_attention_invariant launches
# it (16 splits: contexts up to 4096), and its reduce
results.append(build("decode bf16 key_split", ta._decode_split_kernel, "bf16",
    dict(NUM_SPLITS=16, KEY_SPLIT=ta.KEY_SPLIT, GROUP=GROUP, BLOCK_G=16, HEAD_DIM=HEAD_DIM,
         BLOCK_D=bd, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=ta.DECODE_BLOCK_N, IEEE=False,
         UPCAST=False, FP8_CACHE=False, HAS_WINDOW=False, HAS_SOFTCAP=False)))
for window, key_split in ((False, 0), (True, 0), (False, ta.KEY_SPLIT)):
    label = "reduce" + (" window" if window else "") + (" key_split" if key_split else "")
    results.append(build(label, ta._decode_reduce_kernel,
        "bf16", dict(NUM_SPLITS=8, KEY_SPLIT=key_split, HEAD_DIM=HEAD_DIM, BLOCK_D=bd,
                     BLOCK_N=ta.DECODE_BLOCK_N, HAS_WINDOW=window)))
# --deterministic's linears: the invariant product, as invariant_linear launches it
for dtype in ("bf16", "fp32"):
    for bias in (False, True):
        results.append(build(f"gemm {dtype}{' bias' if bias else ''}",
            tg._invariant_gemm_kernel, dtype,
            dict(HAS_BIAS=bias, BLOCK_M=tg.BLOCK_M, BLOCK_N=tg.BLOCK_N, BLOCK_K=tg.BLOCK_K,
                 IEEE=dtype == "fp32", UPCAST=False, SOFT=False), tg.LAUNCH))
for dtype, fp8 in (("bf16", False), ("bf16", True), ("fp32", True)):
    results.append(build(f"write_kv {dtype}{' fp8' if fp8 else ''}", ta._write_kv_kernel,
        dtype, dict(NUM_KV_HEADS=NUM_KV_HEADS, HEAD_DIM=HEAD_DIM, BLOCK_H=NUM_KV_HEADS,
                    BLOCK_D=bd, BLOCK_SIZE=BLOCK_SIZE, FP8_CACHE=fp8)))
HIDDEN, INTER, HEADS = 1024, 3072, 16                   # Qwen3-0.6B
for hidden in (HIDDEN, 4096):                           # and Llama-3.1-8B's hidden size
    results.append(build(f"rms_norm+add {hidden}", tf._rms_norm_kernel, "bf16",
        dict(HAS_RES=True, BLOCK=hidden, SOFT=False)))
results.append(build("qk_norm_rope", tf._qk_norm_rope_kernel, "bf16",
    dict(HAS_NORM=True, HALF=HEAD_DIM // 2, BLOCK_HQ=HEADS, BLOCK_HK=NUM_KV_HEADS, SOFT=False)))
results.append(build("silu_mul", tf._silu_mul_kernel, "bf16",
    dict(BLOCK=tf.SILU_BLOCK, SOFT=False)))
print(json.dumps(results))
"""


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's bundled ptxas is unavailable here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 28
    for r in results:
        assert r["cubin"], r
        assert r["shared"] <= SM90_MAX_SHARED_BYTES, r
        assert r["spill_bytes"] == 0, f"{r['label']} spills registers: {r}"
        assert 0 < r["registers"] <= 255, r
    by_label = {r["label"]: r for r in results}
    # Hopper's warpgroup MMA for the prefill's 64-row tiles; the decode's 16-row tiles take
    # mma.sync. K/V tiles of both stream through asynchronous copies (software pipelining).
    # So do they over an fp8 cache, its bytes widened in registers between the two.
    for kv in ("", " fp8", " window+softcap"):
        assert by_label[f"prefill bf16{kv}"]["wgmma"] > 0, by_label[f"prefill bf16{kv}"]
        for label in (f"decode bf16{kv} splits=1", f"decode bf16{kv} splits=8"):
            assert by_label[label]["mma_sync"] > 0, by_label[label]
        for label in (f"prefill bf16{kv}", f"decode bf16{kv} splits=8"):
            assert by_label[label]["cp_async"] > 0, by_label[label]
    # the invariant product's bf16 tiles on the tensor cores, streamed by asynchronous copies
    for label in ("gemm bf16", "gemm bf16 bias", "decode bf16 key_split"):
        r = by_label[label]
        assert r["wgmma"] + r["mma_sync"] > 0 and r["cp_async"] > 0, r
