"""Write a GGUF of a model's weights in llama.cpp's Q4_K_M mix, to measure pagoda on the
K-quant files people download (the ``gguf`` package can read K-quants but not write them).

    python -m pagoda.bench.write_kquant --out /tmp/smollm2-q4_k_m.gguf [--model FILE.gguf]

The weights are the model's own (default: the bundled SmolLM2-135M, dequantized from its
file), re-quantized by the K-quant quantizers below into the mix llama.cpp's quantize tool
documents for Q4_K_M: Q4_K everywhere, Q6_K for attn_v and ffn_down in the layers that get
more bits (the first and last eighth, and every third in between) and for the output
projection (the token embedding when tied); a tensor whose rows do not fill whole 256-weight
super-blocks takes the fallback llama.cpp takes (Q4_K -> Q5_0, Q6_K -> Q8_0). Metadata and
vocabulary are copied from the source file.

The quantizers are written from the format (gguf_codes.py draws the layouts): per super-block
of 256, Q4_K keeps eight (scale, min) pairs of 6 bits under fp16 ``d`` and ``dmin``, chosen
from each group's range and refined by least squares; Q6_K sixteen int8 scales of groups of
16 under an fp16 ``d``. They need not round as llama.cpp's do; ``gguf.quants.dequantize``
reads what they write (tests/unit/test_gguf_codes.py).
"""

from __future__ import annotations

import argparse
import re
from typing import Optional

import gguf
import numpy as np

from pagoda.models.gguf_loader import _GGUFFile, _qtype, dequantize

Q = gguf.GGMLQuantizationType
QK_K = 256  # weights per K-quant super-block
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}  # rows not in whole super-blocks
_LAYER = re.compile(r"blk\.(\d+)\.")


def _fp16(x: np.ndarray) -> np.ndarray:
    """Rounded to fp16, back in fp32 (what a reader of the field gets)."""
    return x.astype(np.float16).astype(np.float32)


def _fit_affine(x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (scale, min) of ``x ~ scale * q - min`` per group (last axis); groups with
    one distinct code keep the range fit."""
    n = x.shape[-1]
    sq, sx = q.sum(-1), x.sum(-1)
    det = n * (q * q).sum(-1) - sq * sq
    ok = det > 0
    safe = np.where(ok, det, 1)
    scale = (n * (q * x).sum(-1) - sq * sx) / safe
    mn = (scale * sq - sx) / n
    return np.where(ok, scale, np.nan), np.where(ok, mn, np.nan)


def _q4_k_grid(x: np.ndarray, scale: np.ndarray, mn: np.ndarray) -> tuple[np.ndarray, ...]:
    """The 6-bit grid of (scale, min) under fp16 d, dmin, and the codes on it: x (n, 8, 32)."""
    scale, mn = np.maximum(scale, 0), np.maximum(mn, 0)
    d, dmin = _fp16(scale.max(-1) / 63), _fp16(mn.max(-1) / 63)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0, 63)
    m = np.clip(np.rint(mn / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63)
    step, low = (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None]
    q = np.clip(np.rint((x + low) / np.where(step > 0, step, 1)), 0, 15)
    q = np.where(step > 0, q, 0)
    err = ((step * q - low - x) ** 2).sum((-1, -2))
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8), err


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(rows, K) float32, K a multiple of 256 -> (rows, K // 256 * 144) uint8 Q4_K blocks."""
    rows, k = x.shape
    g = x.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(g.min(-1), 0)
    best = _q4_k_grid(g, (g.max(-1) - lo) / 15, -lo)
    for _ in range(2):  # refit each group's (scale, min) to its codes, keep what is better
        scale, mn = _fit_affine(g, best[4].astype(np.float32))
        keep = np.isnan(scale)
        scale = np.where(keep, best[0][:, None] * best[2], scale)
        mn = np.where(keep, best[1][:, None] * best[3], mn)
        trial = _q4_k_grid(g, scale, mn)
        better = trial[5] < best[5]
        best = tuple(np.where(better.reshape((-1,) + (1,) * (b.ndim - 1)), t, b)
                     for t, b in zip(trial, best, strict=True))  # fmt: skip
    d, dmin, sc, m, q, _ = best
    out = np.zeros((g.shape[0], 144), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
    out[:, 2:4] = dmin.astype(np.float16).reshape(-1, 1).view(np.uint8)
    out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # groups 2i (low nibbles) and 2i + 1 (high) share bytes
    out[:, 16:144] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return out.reshape(rows, k // QK_K * 144)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, K) float32, K a multiple of 256 -> (rows, K // 256 * 210) uint8 Q6_K blocks:
    each group of 16 scaled so that its largest magnitude lands on code -32."""
    rows, k = x.shape
    g = x.astype(np.float32).reshape(-1, 16, 16)
    peak = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    scale = peak / -32
    d = _fp16(np.abs(scale).max(-1) / 127)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), -127, 127)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(g / np.where(step != 0, step, 1)), -32, 31)
    q = (np.where(step != 0, q, 0) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    out = np.zeros((g.shape[0], 210), dtype=np.uint8)
    low = q & 15  # quarters 0 and 1 in the low nibbles, 2 and 3 in the high ones
    ql = np.concatenate([low[:, :, j] | (low[:, :, j + 2] << 4) for j in (0, 1)], -1)
    out[:, 0:128] = ql.reshape(-1, 128)
    high = (q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    out[:, 128:192] = np.bitwise_or.reduce(high, axis=2).reshape(-1, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
    return out.reshape(rows, k // QK_K * 210)


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    """``x`` (rows, K) in ``qtype``: the K-quants here, the rest by the ``gguf`` package."""
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    if qtype == Q.Q6_K:
        return quantize_q6_k(x)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def more_bits(layer: int, layers: int) -> bool:
    """The layers Q4_K_M gives Q6_K attn_v / ffn_down: the first and last eighth, and every
    third layer between."""
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], layers: int, tied: bool) -> Optional[Q]:
    """The type of GGUF tensor ``name`` of (rows, K) ``shape`` in the Q4_K_M mix (None: kept
    as F32, as norms and vectors are)."""
    if len(shape) != 2:
        return None
    qtype = Q.Q4_K
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = Q.Q6_K
    elif (m := _LAYER.match(name)) and (".attn_v." in name or ".ffn_down." in name):
        qtype = Q.Q6_K if more_bits(int(m.group(1)), layers) else Q.Q4_K
    return qtype if shape[1] % QK_K == 0 else FALLBACK[qtype]


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key of the source but the container's own and the file type."""
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)


def write_q4_k_m(source: str, out: str) -> dict[str, int]:
    """Re-quantize ``source`` into ``out``; returns how many tensors took each type."""
    g = _GGUFFile(source)
    arch = g.fields["general.architecture"]
    layers = int(g.fields[f"{arch}.block_count"])
    tied = not any(t.name == "output.weight" for t in g.tensors)
    writer = gguf.GGUFWriter(out, arch)
    _copy_metadata(gguf.GGUFReader(source), writer)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    counts: dict[str, int] = {}
    for info in g.tensors:
        w = dequantize(g.raw(info), _qtype(info.ggml_type, info.name), info.shape).numpy()
        qtype = q4_k_m_type(info.name, info.shape, layers, tied)
        if qtype is None:
            writer.add_tensor(info.name, w)
        else:
            writer.add_tensor(info.name, quantize(w, qtype), raw_dtype=qtype)
        counts[(qtype or Q.F32).name] = counts.get((qtype or Q.F32).name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    from pagoda.models.loader import default_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--model", default=None, help="the source GGUF (default: the bundled one)")
    ns = p.parse_args(argv)
    counts = write_q4_k_m(ns.model or default_model_path(), ns.out)
    print(f"wrote {ns.out}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
