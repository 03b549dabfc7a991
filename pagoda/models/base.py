"""What the rest of pagoda may use of a model: the :class:`CausalLM` interface, the
:class:`Encoder` one of the encoder-only pooling models, and the :class:`ExpertLayer` one
through which weight preparation reaches a mixture-of-experts layer.

A decoder family (``llama.py``, ``gemma.py``, the rows of ``registry.py``) is an ``nn.Module``
with these members; the loader builds it, ``prepare.py`` readies it once for the device and
the KV cache, and the model runner, the KV sizing and the CUDA graphs use nothing else of it.
Invariant: a member the runner or the engine reads of a model is listed here (mypy holds
them to it: they type the model as ``CausalLM``).
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    runtime_checkable,
)

import torch
from torch import nn

if TYPE_CHECKING:
    from pagoda.attention.backend import AttentionBackend
    from pagoda.attention.metadata import AttentionMetadata
    from pagoda.models.config import ModelArch
    from pagoda.models.encoder_config import EncoderArch
    from pagoda.models.ops import DecoderOps
    from pagoda.models.quantized import QuantizedTensor


class Rope(Protocol):
    """The model's RoPE tables, as far as the runner reads them."""

    max_positions: int  # positions the tables hold


class Modules(Protocol):
    """What walks a model's layers (quantization, packing) needs of nn.Module."""

    def modules(self) -> Iterator[nn.Module]: ...

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class CausalLM(Modules, Protocol):
    """A decoder over the paged KV cache: token ids and positions in, hidden states out."""

    arch: ModelArch
    rope: Rope
    ops: DecoderOps  # the norm / RoPE / activation set bound (prepare.py)
    attention: AttentionBackend  # the attention implementation bound
    packed_head: Optional[nn.Module]  # the output projection packed for the CPU's GEMM

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @property
    def output_weight(self) -> torch.Tensor: ...

    @property
    def cuda_graph_safe(self) -> bool: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def quantized_linears(
        self, tensors: Mapping[str, QuantizedTensor]
    ) -> dict[str, QuantizedTensor]: ...

    def build_rope(self, device: torch.device) -> None: ...

    def set_context_len(self, context_len: int) -> None: ...

    def bind_ops(
        self,
        device: torch.device,
        dtype: torch.dtype,
        kv_dtype: Optional[torch.dtype] = None,
        deterministic: bool = False,
    ) -> None: ...

    def bind(self, decoder_ops: DecoderOps, attention: AttentionBackend) -> None: ...

    # nn.Module's, used to place and draw the weights
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def to(self, *args: object, **kwargs: object) -> CausalLM: ...

    def get_submodule(self, target: str) -> nn.Module: ...  # LoRA wraps linears (lora/layers.py)


class Encoder(Modules, Protocol):
    """An encoder-only model (``bert.py``, ``roberta.py``): whole sequences packed one after the
    other (no padding, no KV cache), bidirectional attention within each; hidden states out,
    and, with a classifier head, logits from each sequence's first row."""

    arch: EncoderArch
    num_labels: int  # the classifier head's outputs; 0: no head (an embedding model)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: Sequence[int],
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor: ...

    def classify(self, cls_rows: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


class EncoderClass(Protocol):
    """An encoder family's class (``registry.ENCODERS``): built from its shapes."""

    def __call__(self, arch: EncoderArch) -> Encoder: ...


class CausalLMClass(Protocol):
    """A family's class (``registry.py``): built from the shapes and the positions it holds."""

    def __call__(self, arch: ModelArch, max_positions: int) -> CausalLM: ...


@runtime_checkable
class ExpertLayer(Protocol):
    """A mixture-of-experts layer as weight preparation sees it (``models/moe.py`` has one):
    its experts can be held in 4-bit form only (from before they load, or converted after),
    or each packed for the CPU's GEMM. The loader, ``cpu_int4`` and ``cpu_linear`` find such
    layers by this interface, not by their class (``moe.py`` imports those two)."""

    int4: Optional[object]  # the experts' 4-bit form, when they are held so

    def hold_int4(self, dtype: torch.dtype) -> bool: ...

    def quantize_experts(self) -> bool: ...

    def init_dummy_experts(self, generator: torch.Generator, std: float) -> None: ...

    def expert_matrices(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def pack_experts(self, pack: Callable[[torch.Tensor], torch.Tensor]) -> None: ...
