"""A PEFT LoRA adapter read from disk and laid out for pagoda's fused linears.

LoRA (Hu et al., ICLR'22) adds ``(x A^T) B^T * scale`` to a frozen linear ``x W^T``, with A
(r, K) and B (N, r) of a small rank r. PEFT saves them per module of the Hugging Face model
(``...self_attn.q_proj.lora_A.weight``); pagoda's layers fuse q/k/v into ``qkv_proj`` and
gate/up into ``gate_up_proj``. :func:`read_adapter` gives each shard of a fused linear (q, k,
v; gate, up) its own pair: A (r, K) and B (n, r) of the shard's rows, with the scale folded
in. Phi-3's checkpoints (and so its adapters) are fused already: a whole ``qkv_proj``
adapter is one piece over all rows, which each shard takes its rows of (with the same A).

Invariant: an adapter that loads matches the base's shapes tensor by tensor, has finite
weights, and asks for nothing pagoda does not run; anything else is refused with an
:class:`AdapterError` naming the field or tensor, before it reaches the engine.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from pagoda.models.config import ModelArch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = "lora_A", "lora_B"

# A checkpoint name that lands in a fused linear: the fused layer and which shard.
_FUSED_SHARDS = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}
_ADAPTABLE = "q/k/v/o_proj, gate/up/down_proj (or the fused qkv_proj / gate_up_proj)"
# adapter_config.json fields whose meaning pagoda does not run, when set: why, by name.
_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters are not supported (only plain LoRA)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style) adapters are not supported",
    "lora_bias": "LoRA biases are not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
}


class AdapterError(ValueError):
    """An adapter pagoda cannot serve; the message names the field or the tensor."""


@dataclass(frozen=True)
class Target:
    """One linear of the base an adapter may change: its input width and the output shards
    (one for a plain linear; q, k, v or gate, up for a fused one), in the fused order."""

    in_features: int
    shards: tuple[int, ...]  # output rows of each shard
    shard_names: tuple[str, ...]  # their checkpoint names ("q_proj", "k_proj", "v_proj")
    # The fused output's rows as the layer holds them (partial rotary permutes q and k):
    # row i of the layer is row row_order[i] of the checkpoint's layout. None: as is.
    row_order: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return sum(self.shards)

    def shard_offset(self, shard: int) -> int:
        return sum(self.shards[:shard])


@dataclass(frozen=True)
class ShardLoRA:
    """One shard's delta: A (r, K) and B (n, r) over the shard's rows, scale folded in, fp32."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoRALayer:
    """One adapted linear: each shard's delta, in the fused order (None: not adapted)."""

    shards: tuple[Optional[ShardLoRA], ...]


@dataclass(frozen=True)
class Adapter:
    """An adapter ready to copy into a resident slot: its adapted linears by layer path
    (``layers.3.self_attn.qkv_proj``), and what it was read from."""

    path: str
    rank: int  # the largest piece's
    layers: Mapping[str, LoRALayer]
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        pairs = (s for ly in self.layers.values() for s in ly.shards if s is not None)
        return sum(t.numel() * t.element_size() for s in pairs for t in (s.a, s.b))


def targets_for(arch: ModelArch) -> dict[str, Target]:
    """The linears of a decoder of ``arch`` (``models/llama.py``'s layout) an adapter may
    change, by layer path; the MLP of a mixture-of-experts layer is not one of them."""
    from pagoda.models.llama import partial_rotary_order

    e, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    order = None
    if arch.rotary_dim != arch.head_dim:
        order = _qkv_row_order(arch, partial_rotary_order(arch.head_dim, arch.rotary_dim))
    targets: dict[str, Target] = {}
    for n in range(arch.num_layers):
        attn, mlp = f"layers.{n}.self_attn", f"layers.{n}.mlp"
        targets[f"{attn}.qkv_proj"] = Target(e, (q, kv, kv), ("q_proj", "k_proj", "v_proj"), order)
        targets[f"{attn}.o_proj"] = Target(q, (e,), ("o_proj",))
        if not arch.is_moe_layer(n):
            targets[f"{mlp}.gate_up_proj"] = Target(e, (i, i), ("gate_proj", "up_proj"))
            targets[f"{mlp}.down_proj"] = Target(i, (e,), ("down_proj",))
    return targets


def _qkv_row_order(arch: ModelArch, head_order: torch.Tensor) -> torch.Tensor:
    """The fused q|k|v rows after each q and k head's dims are permuted by ``head_order``."""
    d = arch.head_dim
    rows, start = [], 0
    for heads, permute in (
        (arch.num_heads, True),
        (arch.num_kv_heads, True),
        (arch.num_kv_heads, False),
    ):
        for h in range(heads):
            base = start + h * d
            rows.append(base + (head_order if permute else torch.arange(d)))
        start += heads * d
    return torch.cat(rows)


def read_adapter(path: str, targets: Mapping[str, Target], max_rank: int) -> Adapter:
    """The PEFT adapter in directory ``path``, checked against the base's ``targets`` and
    ``max_rank`` (``--max-lora-rank``)."""
    config = read_config(path)
    tensors = _read_tensors(path)
    pieces = _pieces(tensors, targets)
    rank = 0
    layers: dict[str, LoRALayer] = {}
    for module, by_shard in pieces.items():
        target = targets[module]
        scaled = []
        for shard, (name, a, b) in sorted(
            by_shard.items(), key=lambda kv: -1 if kv[0] is None else kv[0]
        ):
            _check_piece(name, a, b, target, shard, max_rank)
            rank = max(rank, a.shape[0])
            scaled.append((shard, a, b * _scale(config, name, a.shape[0])))
        layers[module] = _fuse(target, scaled)
    if not layers:
        raise AdapterError(f"adapter {path!r} has no LoRA weights for any of {_ADAPTABLE}")
    return Adapter(path, rank, layers, config)


def read_config(path: str) -> dict[str, Any]:
    """``adapter_config.json``, refused when it asks for what pagoda does not run."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter path {path!r} is not a directory")
    try:
        with open(file) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"LoRA adapter {path!r} has no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"LoRA adapter {path!r}: {CONFIG_FILE} is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"LoRA adapter {path!r}: {CONFIG_FILE} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"LoRA adapter {path!r}: peft_type {peft_type!r} is not LORA")
    for key, why in _REFUSED_FLAGS.items():
        if config.get(key):
            raise AdapterError(f"LoRA adapter {path!r}: {key} is set; {why}")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"LoRA adapter {path!r}: bias {config['bias']!r}; only 'none' is supported"
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"LoRA adapter {path!r}: modules_to_save {config['modules_to_save']!r} replaces "
            "whole modules of the base, which pagoda does not serve"
        )
    return config


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        pickled = os.path.exists(os.path.join(path, PICKLED_WEIGHTS_FILE))
        why = (
            f" (only {PICKLED_WEIGHTS_FILE}, a pickle, which pagoda never loads)" if pickled else ""
        )
        raise AdapterError(f"LoRA adapter {path!r} has no {WEIGHTS_FILE}{why}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"LoRA adapter {path!r}: {WEIGHTS_FILE} is unreadable: {e}") from None


Pieces = dict[str, dict[Optional[int], tuple[str, torch.Tensor, torch.Tensor]]]


def _pieces(tensors: Mapping[str, torch.Tensor], targets: Mapping[str, Target]) -> Pieces:
    """{layer path: {shard (None: the whole linear): (module name, A, B)}}."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, half = _split_key(key)
        halves.setdefault(module, {})[half] = tensor
    pieces: Pieces = {}
    for module, pair in halves.items():
        if set(pair) != {LORA_A, LORA_B}:
            missing = LORA_B if LORA_A in pair else LORA_A
            raise AdapterError(f"adapter tensor {module}.{missing}.weight is missing")
        path, shard = _place(module, targets)
        by_shard = pieces.setdefault(path, {})
        if shard in by_shard or (by_shard and (shard is None or None in by_shard)):
            raise AdapterError(f"adapter module {module!r} overlaps another piece of {path}")
        by_shard[shard] = (module, pair[LORA_A].float(), pair[LORA_B].float())
    return pieces


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    (``model.layers.0.self_attn.q_proj``, ``lora_A``)."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    parts = name.split(".")
    if "embed_tokens" in parts or "lm_head" in parts:
        raise AdapterError(
            f"adapter tensor {key!r}: embedding and lm_head adapters are not supported"
        )
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in (LORA_A, LORA_B):
        if "lora_embedding" in key:
            raise AdapterError(f"adapter tensor {key!r} adapts an embedding; not supported")
        raise AdapterError(f"adapter tensor {key!r} is not a LoRA A or B weight")
    return ".".join(parts[:-2]), parts[-2]


def _place(module: str, targets: Mapping[str, Target]) -> tuple[str, Optional[int]]:
    """The layer path and shard a PEFT module name lands in."""
    name = module[len("model.") :] if module.startswith("model.") else module
    parent, _, leaf = name.rpartition(".")
    if leaf in ("embed_tokens", "lm_head") or name in ("embed_tokens", "lm_head"):
        raise AdapterError(
            f"adapter module {module!r}: embedding and lm_head adapters are not supported"
        )
    if ".experts." in name or "block_sparse_moe" in name:
        raise AdapterError(f"adapter module {module!r}: adapters of MoE experts are not supported")
    if name in targets:
        return name, None
    fused = _FUSED_SHARDS.get(leaf)
    path = f"{parent}.{fused}"
    if fused is not None and path in targets:
        return path, targets[path].shard_names.index(leaf)
    raise AdapterError(f"adapter module {module!r} is not a linear pagoda can adapt ({_ADAPTABLE})")


def _check_piece(
    name: str, a: torch.Tensor, b: torch.Tensor, target: Target, shard: Optional[int], max_rank: int
) -> None:
    rows = target.out_features if shard is None else target.shards[shard]
    r = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or a.shape[1] != target.in_features:
        raise AdapterError(
            f"adapter tensor {name}.lora_A.weight has shape {tuple(a.shape)}; the base "
            f"expects (rank, {target.in_features})"
        )
    if b.dim() != 2 or tuple(b.shape) != (rows, r):
        raise AdapterError(
            f"adapter tensor {name}.lora_B.weight has shape {tuple(b.shape)}; the base "
            f"expects ({rows}, {r})"
        )
    if r > max_rank:
        raise AdapterError(
            f"adapter module {name!r} has rank {r}, above --max-lora-rank {max_rank}"
        )
    for half, t in ((LORA_A, a), (LORA_B, b)):
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"adapter tensor {name}.{half}.weight has non-finite values")


def _scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) under rsLoRA, with the
    per-module ``alpha_pattern`` taking precedence over ``lora_alpha``."""
    alpha = config.get("lora_alpha", 8)
    pattern = config.get("alpha_pattern") or {}
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def _fuse(
    target: Target, pieces: list[tuple[Optional[int], torch.Tensor, torch.Tensor]]
) -> LoRALayer:
    """Each shard's (A, B), rows in the layer's order (``row_order``). A piece of one shard
    is that shard's pair; a whole piece (Phi-3's fused ``qkv_proj``) gives every shard its
    A and the shard's rows of its B:

        q_proj, v_proj adapted:   q: (A_q, B_q)   k: None   v: (A_v, B_v)
        qkv_proj adapted:         q: (A, B[q rows])   k: (A, B[k rows])   v: (A, B[v rows])
    """
    whole = [(a, b) for shard, a, b in pieces if shard is None]
    by_shard = {shard: (a, b) for shard, a, b in pieces if shard is not None}
    order = target.row_order
    shards: list[Optional[ShardLoRA]] = []
    for i, rows in enumerate(target.shards):
        offset = target.shard_offset(i)
        if whole:
            a, b = whole[0]
            b = b if order is None else b[order]
            shards.append(ShardLoRA(a.contiguous(), b[offset : offset + rows].contiguous()))
        elif i in by_shard:
            a, b = by_shard[i]
            if order is not None:  # the permutation keeps each row within its shard
                b = b[order[offset : offset + rows] - offset]
            shards.append(ShardLoRA(a.contiguous(), b.contiguous()))
        else:
            shards.append(None)
    return LoRALayer(tuple(shards))
