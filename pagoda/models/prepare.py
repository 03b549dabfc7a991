"""A loaded model made ready to serve, once: its context length, its 4-bit weights, its packed
weights and its ops, in that order.

The loader gives a model with its weights and the reference ops. :func:`prepare_model` then

1. sets the context length the engine serves (LongRoPE picks its factors from it: Phi-3);
2. under ``--quantization auto``, gives each linear layer whose GGUF tensor has codes a form
   on those codes beside the dense one (``file_quant.py``); under ``--quantization int4``,
   wraps the linear layers in their 4-bit form beside the dense one (a GGUF's own 4-bit
   codes where it has them), and converts MoE experts loaded dense to 4-bit only
   (``cpu_int4.py``);
3. on the CPU, packs the dense weights for oneDNN's GEMM, or for pagoda's own bf16 kernel,
   where that is faster (``cpu_linear.py``), the output projection included;
4. times up to how many rows the quantized forms are faster than the dense (packed) one, and
   drops the copies where they never are;
5. under ``--deterministic``, gives every linear (the output projection too) its
   batch-invariant form (``batch_invariant.py``): on CUDA the Triton product of fixed tiles;
   on the CPU bf16 layers on pagoda's own kernel (left unpacked for oneDNN, which it does not
   use), others in fixed row tiles over packed weights;
6. with LoRA on (``--enable-lora``), wraps each adaptable linear, in its final form, in a
   ``LoRALinear`` holding ``--max-loras`` empty adapter slots (``lora/layers.py``);
7. binds the decoder ops and the attention backend for the weights' dtype over the KV cache's
   (``bind_ops``; batch-invariant attention under ``--deterministic``), reading the switches
   now: the forward reads none.

Invariant: each step runs once, in this order (packing wraps the dense forms the int4 layers
fall back to, and the row limits are timed on the final dense form); nothing else in pagoda
changes a model's weights or ops after this (adapters fill the slots, never the base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from pagoda.attention import backend
from pagoda.config import LoRAConfig
from pagoda.lora.layers import attach_lora
from pagoda.lora.slots import LoRASlots, adapter_reader
from pagoda.models import batch_invariant, cpu_bf16, cpu_int4, cpu_int8, cpu_linear, file_quant
from pagoda.models.base import CausalLM
from pagoda.models.quantized import QuantizedTensor


@dataclass
class PreparedModel:
    """A model ready for the model runner, with what preparing it decided."""

    model: CausalLM
    device: torch.device
    dtype: torch.dtype  # the weights'
    kv_dtype: torch.dtype  # the KV cache's the attention backend was bound for
    int4_route: cpu_int4.Int4Route  # the rows a step's 4-bit layers count (speculation)
    int4_max_rows: int  # the 4-bit form runs steps of at most this many rows (0: never)
    lora: Optional[LoRASlots] = None  # the adapter slots (--enable-lora)
    deterministic: bool = False  # batch-invariant kernels (--deterministic)
    # What the weights run on: "int4", "auto" (a file's codes), or None (auto where no layer
    # kept a quantized form: a checkpoint without codes, or never faster here).
    quantization: Optional[str] = None
    int8_max_rows: int = 0  # the int8 forms (auto) run steps of at most this many rows


def prepare_model(
    model: CausalLM,
    device: torch.device,
    dtype: torch.dtype,
    kv_dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    context_len: Optional[int] = None,
    lora: Optional[LoRAConfig] = None,
    deterministic: bool = False,
    quantized: Optional[Mapping[str, QuantizedTensor]] = None,
) -> PreparedModel:
    """Ready ``model`` (weights of ``dtype`` on ``device``) for a KV cache of ``kv_dtype``
    (default: ``dtype``) and, when given, a served context of ``context_len`` tokens.
    ``deterministic``: batch-invariant kernels (the CPU's, or Triton's on CUDA; raises
    ValueError elsewhere).
    ``quantized``: the checkpoint's matrices as a GGUF stores them (HF names), run under
    ``quantization`` "auto" (and their 4-bit codes under "int4")."""
    on_triton = deterministic and backend.use_triton(device)  # CUDA's invariant kernels
    if deterministic and device.type != "cpu" and not on_triton:
        raise ValueError(f"--deterministic has no invariant kernels for {device} (needs triton)")
    if context_len is not None:
        model.set_context_len(context_len)
    route = cpu_int4.Int4Route()
    stored = model.quantized_linears(quantized or {}) if quantization else {}
    quantized_layers = file_quant.StoredLayers()
    if quantization == "int4":
        quantized_layers.int4 = cpu_int4.attach_int4(model, route, stored)
    elif quantization == "auto":
        quantized_layers = file_quant.attach_stored(model, route, stored)
    own_kernel = deterministic and (on_triton or cpu_bf16.kernel_takes(dtype, 2))
    if device.type == "cpu" and not own_kernel:
        model.packed_head = cpu_linear.pack_model(model, model.output_weight, deterministic)
    max_rows = cpu_int4.choose_max_rows(quantized_layers.int4, dtype)
    cpu_int4.choose_expert_max_rows(cpu_int4.int4_experts(model), dtype)
    int8_rows = cpu_int8.choose_int8_max_rows(quantized_layers.int8, dtype)
    stored_head = file_quant.output_tensor(model, stored) if quantization == "auto" else None
    if stored_head is not None:
        installed = cpu_int8.install_int8_head(model, stored_head, route)
        int8_rows = max(int8_rows, installed.max_rows if installed is not None else 0)
    file_quant.drop_unused(model)  # never faster here: the copies dropped
    if deterministic:
        head = model.packed_head or batch_invariant.PlainHead(model.output_weight)
        model.packed_head = batch_invariant.invariant_linears(
            model, head, model.output_weight, triton=on_triton
        )
    slots = None
    if lora is not None:
        layers, batch = attach_lora(model, lora.max_loras, lora.max_lora_rank, dtype, device)
        read = adapter_reader(model.arch, lora.max_lora_rank)
        slots = LoRASlots(layers, batch, lora.max_loras, lora.host_loras, read)
    model.bind_ops(device, dtype, kv_dtype or dtype, deterministic)
    kv = kv_dtype or dtype
    runs = quantization if max_rows or int8_rows or quantization == "int4" else None
    return PreparedModel(
        model, device, dtype, kv, route, max_rows, slots, deterministic, runs, int8_rows
    )
