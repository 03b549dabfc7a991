"""LoRARequest: which adapter a request runs under, as vLLM's ``LoRARequest`` names it.

The front door (or an offline caller) makes one per adapter when it is registered; requests
carry it unchanged to the scheduler (which counts distinct adapters per step), the KV cache
manager (the adapter enters every prefix-cache hash) and the model runner (which loads the
adapter's weights into a resident slot). Pure data: ``core/`` reads it without torch.
Invariant: ``lora_int_id`` names one adapter's weights for the life of the process; loading
other weights under the same name takes a new id, so no cached KV outlives its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # what clients send as ``model``
    lora_int_id: int  # >= 1, unique per loaded adapter (0 would be the base model)
    lora_path: str  # a PEFT adapter directory (or a Hub id, resolved when it is loaded)
    base_model_name: Optional[str] = None  # the ``parent`` /v1/models lists

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")

    @property
    def cache_key(self) -> str:
        """What the prefix-cache hash chain starts from for this adapter."""
        return f"{self.lora_int_id}:{self.lora_name}"
