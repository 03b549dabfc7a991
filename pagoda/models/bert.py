"""The BERT encoder (bge, all-MiniLM, e5, gte; the ms-marco cross-encoders) over a packed batch,
and its sequence-classification head.

BERT (Devlin et al., NAACL'19): word + absolute position + token type embeddings, then
post-norm layers (LayerNorm(x + attention(x)), LayerNorm(x + MLP(x))) with bidirectional
attention. A step's sequences are packed one after the other with no padding and no KV cache:

    tokens:     [a0 a1 a2 a3 | b0 b1 | c0 c1 c2]     seq_lens = [4, 2, 3]
    positions:  [ 0  1  2  3 |  0  1 |  0  1  2]

Invariant: a token attends to every token of its own sequence and to nothing else, so a
sequence's hidden states do not depend on what it is packed with. Shapes: T = tokens of the
step, N = sequences, E = hidden size, H = heads, D = head dim.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.models.encoder_config import EncoderArch

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Embeddings(nn.Module):
    """Token + position + token type embeddings, then LayerNorm (transformers' names)."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.position_embeddings = nn.Embedding(arch.max_position_embeddings, arch.hidden_size)
        self.token_type_embeddings = nn.Embedding(arch.type_vocab_size, arch.hidden_size)
        self.LayerNorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.position_offset = arch.position_offset

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """All (T,) -> (T, E). ``positions`` count from 0 in each sequence."""
        x = self.word_embeddings(input_ids)  # (T, E)
        x = x + self.position_embeddings(positions + self.position_offset)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class AddNorm(nn.Module):
    """A projection added to the residual, then LayerNorm: transformers' ``*Output`` blocks."""

    def __init__(self, in_features: int, arch: EncoderArch) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, arch.hidden_size)
        self.LayerNorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x: (T, in), residual: (T, E) -> (T, E)."""
        return self.LayerNorm(self.dense(x) + residual)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int]
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence. q, k, v: (H, T, D) -> (H, T, D).

    One SDPA call per sequence, not one call with a block-diagonal (T, T) mask: on the CPU the
    masked call computes (and allocates) every one of the T^2 scores, those of other sequences
    included, while the loop computes only sum(L_i^2). Measured on the CPU the loop was faster
    on every mix of lengths tried, by most when many short sequences share a step (one long
    sequence dominating narrows the gap); its Python overhead (one call per sequence and
    layer) is small beside the matmuls."""
    outs, start = [], 0
    for n in seq_lens:
        span = slice(start, start + n)
        # 4-D (a batch of one): the CPU's fused (flash) kernel takes only 4-D inputs; a 3-D
        # call falls back to the unfused math path (matmul, mask, softmax, matmul).
        o = F.scaled_dot_product_attention(q[None, :, span], k[None, :, span], v[None, :, span])
        outs.append(o[0])
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class SelfAttention(nn.Module):
    """q, k and v in one projection (the checkpoint's query / key / value, fused at load)."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, 3 * arch.hidden_size)
        self.output = AddNorm(arch.hidden_size, arch)

    def forward(self, x: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
        t, e = x.shape
        qkv = self.qkv_proj(x).view(t, 3, self.num_heads, self.head_dim)  # (T, 3, H, D)
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each (H, T, D)
        o = packed_attention(q, k, v, seq_lens)  # (H, T, D)
        return self.output(o.transpose(0, 1).reshape(t, e), x)  # (T, E)


class Intermediate(nn.Module):
    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.dense = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.act = ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (T, I)


class EncoderLayer(nn.Module):
    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.attention = SelfAttention(arch)
        self.intermediate = Intermediate(arch)
        self.output = AddNorm(arch.intermediate_size, arch)

    def forward(self, x: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
        h = self.attention(x, seq_lens)  # (T, E)
        return self.output(self.intermediate(h), h)  # (T, E)


class Layers(nn.Module):
    """``encoder.layer.{i}``, as the checkpoints name them."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(arch) for _ in range(arch.num_layers))


class BertPooler(nn.Module):
    """BERT's pooler: dense + tanh over the [CLS] row (read by the classifier only)."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.dense = nn.Linear(arch.hidden_size, arch.hidden_size)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows))  # (N, E)


# Checkpoint names that land in the fused projection: (fused name, which third).
_FUSED = {"self.query": 0, "self.key": 1, "self.value": 2}
# Checkpoint tensors with no place in an encoder: pretraining heads, buffers.
_SKIPPED = ("cls.", "lm_head.", "embeddings.position_ids")
# TF-converted checkpoints name LayerNorm's parameters gamma and beta.
_RENAMED = {"gamma": "weight", "beta": "bias"}


class BertEncoder(nn.Module):
    """BERT over a packed batch: hidden states (T, E); with a classifier head when the
    checkpoint is a ``*ForSequenceClassification`` (``arch.num_labels > 0``)."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.arch = arch
        self.num_labels = arch.num_labels
        self.embeddings = Embeddings(arch)
        self.encoder = Layers(arch)
        self.build_head(arch)

    def build_head(self, arch: EncoderArch) -> None:
        """BERT's: the pooler (dense + tanh on [CLS]), then ``classifier`` to the labels."""
        self.pooler: Optional[nn.Module] = BertPooler(arch) if arch.num_labels else None
        self.classifier: Optional[nn.Module] = (
            nn.Linear(arch.hidden_size, arch.num_labels) if arch.num_labels else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: Sequence[int],
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids, positions, token_type_ids: (T,), sequences packed in ``seq_lens``
        order. Returns the last layer's hidden states (T, E)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids)  # (T, E)
        for layer in self.encoder.layer:
            x = layer(x, seq_lens)
        return x

    def classify(self, cls_rows: torch.Tensor) -> torch.Tensor:
        """Each sequence's first row (N, E) -> its logits (N, num_labels), before any
        activation (pooling.py applies it)."""
        if self.classifier is None:
            raise ValueError(f"{self.arch.architecture or 'this model'} has no classifier head")
        pooled = cls_rows if self.pooler is None else self.pooler(cls_rows)  # (N, E)
        return self.classifier(pooled)  # (N, num_labels)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (transformers' names, with or without the family's prefix)
        into the parameters; query / key / value go to their third of ``qkv_proj``."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._param_name(name)
            if target is None:
                continue
            param_name, third = target
            if param_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            _copy_into(params[param_name], third, tensor, name)
            loaded.add(param_name if third is None else f"{param_name}#{third}")
        expected = {p for p in params if "qkv_proj" not in p}
        expected |= {f"{p}#{i}" for p in params if "qkv_proj" in p for i in range(3)}
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

    def _param_name(self, name: str) -> Optional[tuple[str, Optional[int]]]:
        """(parameter, which third of a fused one) for a checkpoint name; None: not loaded."""
        name = name.removeprefix(self.arch.family.weight_prefix)
        unused_head = (name.startswith("pooler.") and self.pooler is None) or (
            name.startswith("classifier.") and self.classifier is None
        )
        if name.startswith(_SKIPPED) or unused_head:
            return None
        stem, _, leaf = name.rpartition(".")
        name = f"{stem}.{_RENAMED.get(leaf, leaf)}"
        for part, third in _FUSED.items():
            if f".attention.{part}." in name:
                return name.replace(f".attention.{part}.", ".attention.qkv_proj."), third
        return name, None


@torch.no_grad()
def _copy_into(
    param: torch.Tensor, third: Optional[int], tensor: torch.Tensor, source: str
) -> None:
    dest = param.data
    if third is not None:
        size = dest.shape[0] // 3
        dest = dest.narrow(0, third * size, size)
    if dest.shape != tensor.shape:
        raise ValueError(
            f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, "
            f"the model expects {tuple(dest.shape)}"
        )
    dest.copy_(tensor)
