"""RoBERTa and XLM-RoBERTa (bge-m3, bge-reranker, multilingual e5): BERT's layers with
fairseq's position numbering and their own classification head.

RoBERTa (Liu et al., 2019) numbers a sequence's positions from ``pad_token_id + 1`` (the
embedding adds ``arch.position_offset`` to each 0-based position), keeps a single token type,
and classifies with ``classifier.dense`` + tanh + ``classifier.out_proj`` on the <s> row (no
pooler). Invariant: the same as ``bert.py``'s: a sequence's hidden states depend on it alone.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.models.bert import BertEncoder
from pagoda.models.encoder_config import EncoderArch


class ClassificationHead(nn.Module):
    """dense + tanh + out_proj over each sequence's <s> row."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.dense = nn.Linear(arch.hidden_size, arch.hidden_size)
        self.out_proj = nn.Linear(arch.hidden_size, arch.num_labels)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        """(N, E) -> logits (N, num_labels)."""
        return self.out_proj(torch.tanh(self.dense(cls_rows)))


class RobertaEncoder(BertEncoder):
    """BERT's encoder; positions offset by the padding index (``EncoderArch``), and RoBERTa's
    classifier head instead of BERT's pooler + classifier."""

    def build_head(self, arch: EncoderArch) -> None:
        self.pooler = None
        self.classifier = ClassificationHead(arch) if arch.num_labels else None
