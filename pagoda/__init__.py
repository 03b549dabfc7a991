"""pagoda: an LLM inference engine with a paged KV cache, continuous batching and chunked
prefill. ``from pagoda import LLM, SamplingParams, PoolingParams, LoRARequest``."""

from pagoda.lora_request import LoRARequest
from pagoda.pooling_params import PoolingParams
from pagoda.sampling import SamplingParams

__all__ = ["LLM", "LoRARequest", "PoolingParams", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):  # import torch only when the engine is asked for
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
