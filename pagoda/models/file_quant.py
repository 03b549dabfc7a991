"""A quantized file's matrices run as the file stores them (``--quantization auto``): each
linear layer whose GGUF tensor has codes (gguf_codes.py) keeps, beside its dense form, a form
that computes with the file's own codes and scales, never rounded again.

- 4-bit codes in groups of 32 (Q4_0, Q4_1, Q4_K): the 4-bit kernel (``cpu_int4.Int4Linear``
  from ``Int4Weight.from_quantized``), or the int8 kernel with the codes two a byte where that
  is faster on this CPU (``cpu_int8.four_bit_here``, timed at load);
- the rest (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, and a fused projection whose shards mix types, as
  Q4_K_M's q/k (Q4_K) and v (Q6_K) do): the int8 kernel (``cpu_int8.Int8Linear``), which
  takes codes of up to 8 bits in groups of 16 or 32;
- the output projection (the token embedding when tied: Q8_0 or Q6_K in most files): the int8
  kernel too (``cpu_int8.install_int8_head``, after weight packing).

As with ``--quantization int4``, a layer serves steps of at most its timed row limit with the
file's codes and larger ones with the dense (dequantized) weights; a kind never faster on
this CPU is dropped (``drop_unused``). MoE experts stay dense (dequantized) here.

Invariant: a layer's quantized form computes ``x @ dequantize(q).T`` for the ``q`` the file
stores (fp32 sums); nothing here rounds a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from pagoda.models import cpu_int4, cpu_int8
from pagoda.models.base import CausalLM, Modules
from pagoda.models.quantized import QuantizedTensor


@dataclass
class StoredLayers:
    """The layers given a form on the file's codes, by kernel."""

    int4: list[cpu_int4.Int4Linear] = field(default_factory=list)
    int8: list[cpu_int8.Int8Linear] = field(default_factory=list)


def attach_stored(
    model: Modules, route: cpu_int4.Int4Route, stored: Mapping[str, QuantizedTensor]
) -> StoredLayers:
    """Wrap each ``nn.Linear`` (not the output projection) whose weight ``stored`` holds (by
    module name, ``CausalLM.quantized_linears``) in the form its codes run on."""
    layers = StoredLayers()
    places = []
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            q = stored.get(f"{path}.{name}" if path else name)
            if type(child) is nn.Linear and name != "lm_head" and q is not None:
                places.append((parent, name, child, q))
    four_bit = [q for _, _, _, q in places if cpu_int4.runs_as_int4(q)]
    dtype = places[0][2].weight.dtype if places else torch.float32
    on_int8 = cpu_int8.four_bit_here(four_bit, dtype)
    for parent, name, child, q in places:
        if cpu_int4.runs_as_int4(q) and not on_int8:
            layer = cpu_int4.Int4Linear(child, route, q)
            setattr(parent, name, layer)
            layers.int4.append(layer)
        elif cpu_int8.supported(q):
            wide = cpu_int8.Int8Linear(child, q, route)
            setattr(parent, name, wide)
            layers.int8.append(wide)
    return layers


def output_tensor(model: CausalLM, stored: Mapping[str, QuantizedTensor]) -> QuantizedTensor | None:
    """The output projection as the file stores it: ``lm_head``'s, or the token embedding's
    where the two are tied."""
    return stored.get("embed_tokens" if model.arch.tie_word_embeddings else "lm_head")


def drop_unused(model: Modules) -> None:
    """Put back the dense form of every quantized layer whose row limit is 0 (never faster
    on this CPU), freeing its codes."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            quantized = isinstance(child, (cpu_int4.Int4Linear, cpu_int8.Int8Linear))
            if quantized and not child.max_rows:
                setattr(parent, name, child.dense)
