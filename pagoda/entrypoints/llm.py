"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Any, Optional, Sequence, Union, cast

from pagoda.config import EngineArgs
from pagoda.engine import pacing
from pagoda.engine.build import build_engine
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.request import EngineRequest
from pagoda.sampling import SamplingParams

PromptType = Union[str, list[int]]
Messages = list[dict[str, Any]]


class LLM:
    """Run a model over a list of prompts with continuous batching.

    Keyword arguments are those of :class:`pagoda.config.EngineArgs` (``model``, ``dtype``,
    ``block_size``, ``kv_cache_memory``, ``max_num_batched_tokens``, ``max_num_seqs``,
    ``max_model_len``, ``enable_chunked_prefill``, ``num_kv_blocks``, ...).
    """

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown engine argument(s): {sorted(unknown)}")
        self.engine: LLMEngine = build_engine(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: Optional[bool] = None,
    ) -> list[RequestOutput]:
        """Prompts are strings or lists of token ids; returns outputs in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        ids = []
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                ids.append(self._add(prompt, params))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Union[Messages, Sequence[Messages]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: Optional[bool] = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; uses the chat template."""
        prompts = [self.engine.encode_chat(conv) for conv in _as_conversations(messages)]
        return self.generate(prompts, sampling_params, use_tqdm)

    def reset_prefix_cache(self) -> int:
        """Drop every cached prefix block; returns how many were cached."""
        return self.engine.reset_prefix_cache()

    def _add(self, prompt: PromptType, params: SamplingParams) -> str:
        rid = str(next(self._ids))
        if isinstance(prompt, str):
            self.engine.add_request(
                EngineRequest(rid, self.engine.encode(prompt), params, prompt=prompt)
            )
        else:
            self.engine.add_request(EngineRequest(rid, list(prompt), params))
        return rid

    def _run(self, ids: list[str], use_tqdm: Optional[bool]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = _progress_bar(len(ids), use_tqdm)
        while len(results) < len(ids):
            for out in self.engine.step(final_only=True):
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
            pacing.after_step(self.engine)
        if bar is not None:
            bar.close()
        return [results[rid] for rid in ids]


def _as_prompt_list(prompts: Union[PromptType, Sequence[PromptType]]) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    # A list is told apart by its first item, which the type checker cannot follow.
    if items and isinstance(items[0], int):
        return [cast(list[int], items)]  # one prompt of token ids
    return cast(list[PromptType], items)


def _as_conversations(messages: Union[Messages, Sequence[Messages]]) -> Sequence[Messages]:
    """One conversation (a list of message dicts) or several (a list of such lists)."""
    if messages and isinstance(messages[0], dict):
        return [cast(Messages, messages)]
    return cast(Sequence[Messages], messages)


def _as_params_list(
    params: Union[SamplingParams, Sequence[SamplingParams], None], n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params


def _progress_bar(total: int, use_tqdm: Optional[bool]) -> Any:
    if use_tqdm is False or (use_tqdm is None and total < 32):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")
