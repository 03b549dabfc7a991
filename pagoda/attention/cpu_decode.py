"""A C++ CPU kernel for paged decode attention (PagedAttention, Kwon et al., SOSP'23), with a
flash-decoding style online softmax (running max, running sum and an fp32 accumulator).

Invariant: a query of sequence ``b`` reads exactly the K/V rows of tokens ``[0, seq_lens[b])``
through its block table (token ``i`` at block ``block_tables[b, i // block_size]``, offset
``i % block_size``), each row once per (sequence, KV head) and straight from the blocks: no
padded copy of the context is made, and no other cache slot is touched, so garbage in slots
outside a sequence's context can never reach its output.

The kernel (``csrc/paged_decode.cpp``) parallelises over (sequence, KV head) units with
``at::parallel_for``; each unit serves the ``G = H // Hkv`` query heads of its KV head together
(grouped-query attention), converting bf16 to fp32 with a bit shift so the loops vectorise.
When there are too few units to keep the threads busy, long contexts are split into chunks and
the chunks' partial softmax states are merged (flash-decoding).

The extension is built just in time on first use with ``torch.utils.cpp_extension.load``
(which needs a C++ compiler and ``ninja``), first with ``-O3 -march=native -fopenmp``, falling
back to more portable flags when that fails. Builds are cached under ``$PAGODA_EXT_DIR`` (else
``~/.cache/pagoda/ext``) in a folder named by a hash of the sources, the flags, torch's and
Python's versions and the CPU, so a cached build is only reused where it was made for. Once
built, loading it needs neither ninja nor the compiler. If no build succeeds, :func:`available`
returns ``False`` and one warning gives the reason; importing this module never raises.
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

logger = logging.getLogger(__name__)

_EXT_NAME = "pagoda_paged_decode"
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (_CSRC / "paged_decode.cpp",)
_OK_MARKER = ".pagoda-build-ok"
_STALE_LOCK_S = 15 * 60  # a build lock older than this was left by a killed build

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None      # why the extension is unavailable, once known
_build_seconds: Optional[float] = None


def available() -> bool:
    """True when the compiled extension is loaded (building it now if needed)."""
    return _load() is not None


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
    return {"available": True, "isa": mod.build_info(), "path": getattr(mod, "__file__", None),
            "build_seconds": _build_seconds, "flags": getattr(mod, "_pagoda_flags", None)}


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention of one query token per sequence over its paged context.

    q: (B, H, D), dtype of the cache; kv_cache: (2, num_blocks, block_size, Hkv, D) with K at
    index 0 and V at 1 (any strides but a contiguous head dim); block_tables: (B, W) int64,
    padded arbitrarily past each sequence's blocks; seq_lens: (B,) int64, the context length
    including the new token (1 <= seq_lens[b] <= W * block_size). Query head ``h`` attends with
    KV head ``h // (H // Hkv)``. Returns (B, H, D) in q's dtype, written into ``out`` if given
    (then ``out`` must be (B, H, D) with q's dtype and a contiguous head dim).
    Supported dtypes: float32, bfloat16, float16. Raises RuntimeError if the extension is not
    available (check :func:`available` first) or on bad shapes or out-of-range block ids.
    """
    return _call("paged_decode", q, kv_cache, block_tables, seq_lens, scale, out)


def _call(fn: str, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
          seq_lens: torch.Tensor, scale: float, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Run the extension's ``fn`` (``paged_decode``, or ``paged_decode_portable``, which always
    uses the auto-vectorised tile code instead of the AVX-512 one: for tests)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"pagoda CPU paged-decode extension is unavailable: {_failure}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.dtype != torch.int64 or not block_tables.is_contiguous():
        block_tables = block_tables.to(torch.int64).contiguous()
    if seq_lens.dtype != torch.int64 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    getattr(mod, fn)(out, q, kv_cache, block_tables, seq_lens, float(scale))
    return out


# ---------------------------------------------------------------------------------------------
# Building and loading


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, fastest first."""
    sets: list[list[str]] = []
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        sets.append(["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"])
    sets.append(["-O3", "-march=native", "-fopenmp"])
    sets.append(["-O3", "-fopenmp"])
    sets.append(["-O3"])
    return sets


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


def _build_dir(flags: list[str]) -> Path:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_fingerprint().encode())
    root = os.environ.get("PAGODA_EXT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pagoda", "ext")
    return Path(root) / f"{_EXT_NAME}-{h.hexdigest()[:16]}"


def _find_ninja() -> bool:
    """Make sure ``ninja`` is on PATH (torch runs it by name): also look next to the Python
    executable (an unactivated virtualenv) and in the ``ninja`` Python package."""
    if shutil.which("ninja"):
        return True
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]
        candidates.append(ninja.BIN_DIR)
    except Exception:
        pass
    for d in candidates:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _import_built(directory: Path) -> Optional[ModuleType]:
    """Import a finished build from ``directory`` without ninja (None if there is none)."""
    if not (directory / _OK_MARKER).exists():
        return None
    for suffix in (".so", ".pyd"):
        path = directory / f"{_EXT_NAME}{suffix}"
        if path.exists():
            spec = importlib.util.spec_from_file_location(_EXT_NAME, path)
            if spec is None or spec.loader is None:
                return None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    return None


def _clear_stale_lock(directory: Path) -> None:
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _build(directory: Path, flags: list[str]) -> ModuleType:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(directory)
    ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
    mod = cpp_extension.load(name=_EXT_NAME, sources=[str(s) for s in _SOURCES],
                             extra_cflags=flags, extra_ldflags=ldflags,
                             build_directory=str(directory), verbose=False)
    (directory / _OK_MARKER).write_text(" ".join(flags) + "\n")
    return mod


def _load() -> Optional[ModuleType]:
    global _module, _failure, _build_seconds
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        errors: list[str] = []
        flag_sets = _flag_sets()
        try:
            dirs = [_build_dir(f) for f in flag_sets]
        except OSError as e:
            _failure = f"cannot read the kernel sources: {e}"
            logger.warning("pagoda CPU paged-decode kernel unavailable: %s", _failure)
            return None
        # A finished build for any flag set (fastest first) is used as is.
        for flags, d in zip(flag_sets, dirs):
            try:
                mod = _import_built(d)
            except Exception as e:  # a corrupt cache entry: rebuild below
                errors.append(f"cached build in {d} failed to load: {e}")
                mod = None
            if mod is not None:
                mod._pagoda_flags = flags  # type: ignore[attr-defined]
                _module = mod
                return mod
        if not _find_ninja():
            _failure = ("ninja is not installed (torch.utils.cpp_extension needs it to build "
                        "the kernel: pip install ninja)")
            logger.warning("pagoda CPU paged-decode kernel unavailable: %s", _failure)
            return None
        start = time.perf_counter()
        for flags, d in zip(flag_sets, dirs):
            try:
                mod = _build(d, flags)
            except Exception as e:
                text = str(e).strip().splitlines()
                errors.append(f"build with {' '.join(flags)} failed: " + "\n".join(text[-15:]))
                continue
            _build_seconds = time.perf_counter() - start
            mod._pagoda_flags = flags  # type: ignore[attr-defined]
            _module = mod
            if errors:
                logger.info("pagoda CPU paged-decode kernel built with %s after: %s",
                            " ".join(flags), "; ".join(e.splitlines()[0] for e in errors))
            return mod
        _failure = "no build succeeded: " + "\n".join(errors)
        logger.warning("pagoda CPU paged-decode kernel unavailable: %s", _failure)
        return None
