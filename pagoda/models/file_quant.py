"""A quantized file's matrices run as the file stores them (``--quantization auto``): each
linear layer whose GGUF tensor has codes (gguf_codes.py) keeps, beside its dense form, a form
that computes with the file's own codes and scales, never rounded again.

- 4-bit codes in groups of 32 (Q4_0, Q4_1, Q4_K): the 4-bit kernel (``cpu_int4.Int4Linear``
  from ``Int4Weight.from_quantized``);
- the rest (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, and a fused projection whose shards mix widths):
  dense for now (the int8 kernel takes them where it is built).

As with ``--quantization int4``, a layer serves steps of at most its timed row limit with the
file's codes and larger ones with the dense (dequantized) weights.

Invariant: a layer's quantized form computes ``x @ dequantize(q).T`` for the ``q`` the file
stores (fp32 sums); nothing here rounds a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from torch import nn

from pagoda.models import cpu_int4
from pagoda.models.base import Modules
from pagoda.models.quantized import QuantizedTensor


@dataclass
class StoredLayers:
    """The layers given a form on the file's codes, by kernel."""

    int4: list[cpu_int4.Int4Linear] = field(default_factory=list)


def attach_stored(
    model: Modules, route: cpu_int4.Int4Route, stored: Mapping[str, QuantizedTensor]
) -> StoredLayers:
    """Wrap each ``nn.Linear`` (not the output projection) whose weight ``stored`` holds (by
    module name, ``CausalLM.quantized_linears``) in the form its codes run on."""
    layers = StoredLayers()
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            q = stored.get(f"{path}.{name}" if path else name)
            if type(child) is not nn.Linear or name == "lm_head" or q is None:
                continue
            if cpu_int4.runs_as_int4(q):
                layer = cpu_int4.Int4Linear(child, route, q)
                setattr(parent, name, layer)
                layers.int4.append(layer)
    return layers
