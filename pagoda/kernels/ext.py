"""The one C++ extension of pagoda's CPU kernels: its build and its load.

Its sources (``kernels/csrc/``), one module between them:

- ``paged_decode.cpp``: paged decode attention (flash-decoding; ``attention/cpu_decode.py``);
- ``amx_attention.cpp``: the AMX prefill attention kernel; ``kv_write.cpp``: the KV write at
  ``slot_mapping`` (both called by ``attention/cpu_attention.py``);
- ``fused_ops.cpp``: RMSNorm (after a residual add), RoPE, SiLU/GELU(gate) * up and the
  greedy argmax (``kernels/cpu_fused.py``);
- ``gumbel_sample.cpp``: the Gumbel-max draw (``worker/gumbel.py``); ``token_mask.cpp``: the
  structured-outputs mask (``worker/sampler.py``);
- ``invariant_gemm.cpp``: the batch-invariant bf16 linear of ``--deterministic``
  (``models/batch_invariant.py``);
- ``int8_gemm.cpp``: the weight-only int8 linear of quantized GGUF tensors, a scale (and an
  offset) per group of inputs (``kernels/cpu_int8.py``, ``models/cpu_int8.py``);
- ``suffix_trie.cpp``: the suffix trie of speculative decoding (``engine/spec_timing.py``);
- ``lora_sgmv.cpp``: the grouped LoRA delta of a mixed batch, Punica's SGMV shrink / expand
  (``kernels/cpu_lora.py``);
- ``bf16.h``, ``fp8.h``: conversions they share.

The extension is built just in time on first use with ``torch.utils.cpp_extension.load``
(which needs a C++ compiler and ``ninja``), first with ``-O3 -march=native -fopenmp``, falling
back to more portable flags when that fails. Builds are cached under ``$PAGODA_EXT_DIR`` (else
``~/.cache/pagoda/ext``; ``envs.EXT_DIR``) in a folder named by a hash of the sources, the
flags, torch's and Python's versions and the CPU, so a cached build is only reused where it was
made for. Once built, loading it needs neither ninja nor the compiler. If no build succeeds,
:func:`available` returns ``False`` and one warning gives the reason; importing this module
never raises.

Invariant: the extension is loaded (or its failure recorded) at most once per process; every
caller gets the same module object.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from pagoda import envs

logger = logging.getLogger(__name__)

_EXT_NAME = "pagoda_paged_decode"  # its name from when it held the decode kernel alone
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (
    _CSRC / "paged_decode.cpp",
    _CSRC / "fused_ops.cpp",
    _CSRC / "kv_write.cpp",
    _CSRC / "amx_attention.cpp",
    _CSRC / "gumbel_sample.cpp",
    _CSRC / "token_mask.cpp",
    _CSRC / "suffix_trie.cpp",
    _CSRC / "lora_sgmv.cpp",
    _CSRC / "invariant_gemm.cpp",
    _CSRC / "int8_gemm.cpp",
)
# Not compiled on their own, but part of the build's hash.
_HEADERS = (_CSRC / "bf16.h", _CSRC / "fp8.h")
_OK_MARKER = ".pagoda-build-ok"
_FAILED_MARKER = ".pagoda-build-failed"
_STALE_LOCK_S = 15 * 60  # a build lock older than this was left by a killed build

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None  # why the extension is unavailable, once known
_build_seconds: Optional[float] = None


def available() -> bool:
    """True when the compiled extension is loaded (building it now if needed)."""
    return _load() is not None


def extension() -> Optional[ModuleType]:
    """The loaded extension module (every kernel of ``csrc/``), or None."""
    return _load()


def require_extension() -> ModuleType:
    """:func:`extension` where it must be loaded (a caller that checked :func:`available`):
    raises RuntimeError, with :func:`unavailable_reason`, where it is not."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"pagoda C++ CPU extension is unavailable: {_failure}")
    return mod


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None while it is True or not yet tried)."""
    _load()
    return _failure


def build_info() -> dict[str, object]:
    """How the loaded extension was built: flags, folder, seconds spent building (None if it
    was loaded from the cache), and the instruction sets it was compiled for."""
    mod = _load()
    if mod is None:
        return {"available": False, "reason": _failure}
    return {
        "available": True,
        "isa": mod.build_info(),
        "path": getattr(mod, "__file__", None),
        "build_seconds": _build_seconds,
        "flags": getattr(mod, "_pagoda_flags", None),
    }


# ---------------------------------------------------------------------------------------------
# Building and loading


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, fastest first. (-mprefer-vector-width=512 only matters for the
    auto-vectorised fallback code on AVX-512 machines, which gcc otherwise keeps at 256 bits.)"""
    native = ["-O3", "-march=native", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        native.insert(2, "-mprefer-vector-width=512")
    return [native, ["-O3", "-fopenmp"], ["-O3"]]


def _cpu_fingerprint() -> str:
    """Names the instruction sets -march=native would target (so a cache shared between
    machines never hands one CPU code built for another)."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "model name", "CPU part"):
                    parts.append(line.strip())
                    if key in ("flags", "Features"):
                        break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _build_name(flags: list[str]) -> str:
    """Module (and folder) name of a build: a hash of everything the binary depends on."""
    h = hashlib.sha256()
    for src in _SOURCES + _HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_fingerprint().encode())
    return f"{_EXT_NAME}_{h.hexdigest()[:16]}"


def _ext_root() -> Path:
    return envs.EXT_DIR()


def _find_ninja() -> bool:
    """Make sure ``ninja`` is on PATH (torch runs it by name): also look next to the Python
    executable (an unactivated virtualenv) and in the ``ninja`` Python package."""
    if shutil.which("ninja"):
        return True
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.append(ninja.BIN_DIR)
    except Exception:
        pass
    for d in candidates:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _import_built(directory: Path, name: str) -> Optional[ModuleType]:
    """Import a finished build from ``directory`` without ninja (None if there is none)."""
    if not (directory / _OK_MARKER).exists():
        return None
    for suffix in (".so", ".pyd"):
        path = directory / f"{name}{suffix}"
        if path.exists():
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                return None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    return None


def _clear_stale_lock(directory: Path) -> None:
    """torch's build lock is a file; one left by a killed build would block us forever."""
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _build(directory: Path, name: str, flags: list[str]) -> ModuleType:
    """Compile and import (torch serialises concurrent builds of one folder with a lock file;
    a process that finds the lock taken waits, then imports the result)."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(directory)
    ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
    mod = cpp_extension.load(
        name=name,
        sources=[str(s) for s in _SOURCES],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        build_directory=str(directory),
        verbose=False,
    )
    (directory / _OK_MARKER).write_text(" ".join(flags) + "\n")
    return mod


def _load() -> Optional[ModuleType]:
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        try:
            _module = _load_or_build()
        except Exception as e:  # never let a broken toolchain escape
            _failure = f"{type(e).__name__}: {e}"
        if _module is None:
            logger.warning(
                "pagoda C++ CPU kernels unavailable (using them raises; "
                "pagoda.kernels.ext.unavailable_reason() has details): %s",
                _summary(_failure or ""),
            )
        return _module


def _summary(reason: str, width: int = 500) -> str:
    """The gist of a failure: per failed build, its flags and the most telling line of the
    compiler output (an ``error`` line if there is one); compiler command lines are dropped."""
    blocks: list[list[str]] = []
    for ln in reason.splitlines():
        if ln.startswith("build with") or not blocks:
            blocks.append([])
        if ln.strip() and len(ln) < 300:
            blocks[-1].append(ln.strip())
    parts = []
    for blk in blocks:
        if not blk:
            continue
        body = [ln for ln in blk[1:] if not ln.startswith(("ninja:", "FAILED:", "["))]
        errs = [ln for ln in body if "error" in ln.lower() or "not found" in ln]
        detail = (errs or body or [""])[-1]
        parts.append(f"{blk[0]} {detail}".strip())
    text = " | ".join(parts)
    return text if len(text) <= width else text[:width] + "..."


def _load_or_build() -> Optional[ModuleType]:
    global _failure, _build_seconds
    root = _ext_root()
    builds = [(flags, _build_name(flags)) for flags in _flag_sets()]
    # A finished build (fastest flags first) is imported as is: no compiler, no ninja.
    errors: list[str] = []
    for flags, name in builds:
        try:
            mod = _import_built(root / name, name)
        except Exception as e:  # a corrupt cache entry: rebuilt below
            errors.append(f"cached build {root / name} failed to load: {e}")
            (root / name / _OK_MARKER).unlink(missing_ok=True)
            mod = None
        if mod is not None:
            mod._pagoda_flags = flags  # type: ignore[attr-defined]
            return mod
    if not _find_ninja():
        _failure = (
            "ninja is not installed (torch.utils.cpp_extension needs it to build the "
            "kernel: pip install ninja)"
        )
        return None
    # Flag sets that failed to compile before (marker left in their folder) are skipped,
    # unless all did: then everything is retried (the toolchain may have been fixed).
    todo = [(f, n) for f, n in builds if not (root / n / _FAILED_MARKER).exists()] or builds
    start = time.perf_counter()
    for flags, name in todo:
        directory = root / name
        try:
            mod = _build(directory, name, flags)
        except Exception as e:
            lines = str(e).strip().splitlines()
            msg = f"build with {' '.join(flags)} failed:\n" + "\n".join(lines[-15:])
            errors.append(msg)
            try:
                directory.mkdir(parents=True, exist_ok=True)
                (directory / _FAILED_MARKER).write_text(msg + "\n")
            except OSError:
                pass
            continue
        _build_seconds = time.perf_counter() - start
        mod._pagoda_flags = flags  # type: ignore[attr-defined]
        if errors:
            logger.info(
                "pagoda C++ CPU kernels built with %s after: %s",
                " ".join(flags),
                "; ".join(e.splitlines()[0] for e in errors),
            )
        return mod
    _failure = "no build succeeded: " + "\n".join(errors)
    return None
