"""Random PEFT LoRA adapters for the tiny test models, written by peft itself."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def make_adapter(base: str, path: str, r: int = 8, targets: Sequence[str] = ("q_proj", "v_proj"),
                 seed: int = 0, std: float = 0.1, **config: Any) -> str:
    """Save a LoRA adapter of rank ``r`` over ``targets`` of the model at ``base`` to
    ``path``: A and B drawn N(0, std), so the adapter changes the model's greedy tokens."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.LoraConfig(r=r, lora_alpha=config.pop("lora_alpha", 2 * r),
                           target_modules=list(targets), init_lora_weights=False, **config)
    adapted = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    adapted.save_pretrained(path)
    return path


def peft_model(base: str, adapter: str) -> Any:
    """transformers + peft: the base with ``adapter`` applied (fp32), for reference tokens."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).eval()
