"""What the tests may expect of the C++ CPU kernels on this machine.

A machine with a C++ compiler must have the extension built: there a failed build is a test
failure, never a skip (it would silently drop every native kernel and the tests that guard
them). Only the AMX kernel may be skipped, on CPUs without AMX-BF16.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import pytest

from pagoda.kernels import ext


def compiler() -> Optional[str]:
    """The C++ compiler torch's extension builder would use, if there is one."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def has_amx() -> bool:
    return ext.available() and bool(ext.extension().amx_available())


def has_bf16_attention() -> bool:
    return ext.available() and bool(ext.extension().bf16_attention_available())


# Tests of the C++ kernels: skipped only where nothing could build them.
needs_ext = pytest.mark.skipif(
    not ext.available() and compiler() is None,
    reason="no C++ compiler on this machine: the C++ kernels cannot be built")
# Tests of the AMX kernel itself: skipped on CPUs without AMX-BF16.
needs_amx = pytest.mark.skipif(not has_amx(), reason="no AMX-BF16 on this CPU")


def tile_kernels() -> list:
    """The forms of the prefill tile kernel this machine runs (True: AMX, False: AVX512-BF16),
    as pytest params; the missing ones skip."""
    return [pytest.param(True, id="amx", marks=needs_amx),
            pytest.param(False, id="avx512", marks=pytest.mark.skipif(
                not has_bf16_attention(), reason="no AVX512-BF16 attention kernel"))]
