"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``; for a pooling
model (``--runner pooling``), vLLM's ``embed``, ``classify``, ``score`` and ``encode``."""

from __future__ import annotations

import itertools
from dataclasses import fields, replace
from typing import Any, Callable, Optional, Sequence, TypeVar, Union, cast

import torch
import torch.nn.functional as F

from pagoda.config import EngineArgs
from pagoda.engine import pacing
from pagoda.engine.build import build_engine
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagoda.lora_request import LoRARequest
from pagoda.pooling_params import PoolingParams, PoolingTask
from pagoda.request import EngineRequest
from pagoda.sampling import SamplingParams

PromptType = Union[str, list[int]]
Messages = list[dict[str, Any]]
Out = TypeVar("Out")


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
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Prompts are strings or lists of token ids; returns outputs in prompt order.
        ``lora_request``: one adapter for every prompt, or one (or None: the base) each."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        loras = _as_lora_list(lora_request, len(prompt_list))
        return self._run(self._submit(prompt_list, params_list, loras), use_tqdm)

    def _submit(
        self,
        prompts: Sequence[PromptType],
        params: Sequence[Union[SamplingParams, PoolingParams]],
        loras: Optional[Sequence[Optional[LoRARequest]]] = None,
    ) -> list[str]:
        """Add every request, or none (the ones added are aborted if one is refused)."""
        ids: list[str] = []
        loras = loras or [None] * len(prompts)
        try:
            for prompt, p, lora in zip(prompts, params, loras, strict=True):
                ids.append(self._add(prompt, p, lora))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def chat(
        self,
        messages: Union[Messages, Sequence[Messages]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: Optional[bool] = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; uses the chat template."""
        prompts = [self.engine.encode_chat(conv) for conv in _as_conversations(messages)]
        return self.generate(prompts, sampling_params, use_tqdm)

    # ------------------------------------------------------------------ pooling
    def encode(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        pooling_params: Optional[PoolingParams] = None,
        use_tqdm: Optional[bool] = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """The pooled tensors as the engine gives them (``pooling_params.task``, default
        embed)."""
        params = pooling_params or PoolingParams()
        return self._pool(prompts, params, lambda t: PoolingOutput(t), use_tqdm)

    def embed(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        pooling_params: Optional[PoolingParams] = None,
        use_tqdm: Optional[bool] = None,
        truncate_prompt_tokens: Optional[int] = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (``.outputs.embedding``), in prompt order."""
        params = _for_task(pooling_params, "embed", truncate_prompt_tokens)
        return self._pool(prompts, params, lambda t: EmbeddingOutput(t.tolist()), use_tqdm)

    def classify(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        pooling_params: Optional[PoolingParams] = None,
        use_tqdm: Optional[bool] = None,
        truncate_prompt_tokens: Optional[int] = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (``.outputs.probs``), in prompt order."""
        params = _for_task(pooling_params, "classify", truncate_prompt_tokens)
        return self._pool(prompts, params, lambda t: ClassificationOutput(t.tolist()), use_tqdm)

    def score(
        self,
        text_1: Union[str, Sequence[str]],
        text_2: Union[str, Sequence[str]],
        pooling_params: Optional[PoolingParams] = None,
        use_tqdm: Optional[bool] = None,
        truncate_prompt_tokens: Optional[int] = None,
    ) -> list[ScoringRequestOutput]:
        """Scores of (text_1, text_2) pairs (``.outputs.score``): one-to-one (lists of one
        length) or one-to-many (one text_1). A cross-encoder reads each pair tokenized
        together; an embedding model scores the cosine of the two embeddings."""
        pairs = _score_pairs(text_1, text_2)
        if "score" in self.engine.pooling_tasks:
            params = _for_task(pooling_params, "score", truncate_prompt_tokens)
            return self._score_pairs(pairs, params, use_tqdm)
        tasks = self.engine.pooling_tasks
        if tasks and "embed" not in tasks:  # (a generation model is refused at intake)
            served = " and ".join(sorted(tasks))
            raise ValueError(f"task 'score' is not supported; this model serves {served}")
        params = _for_task(pooling_params, "embed", truncate_prompt_tokens)
        firsts = self.embed([q for q, _ in pairs], params, use_tqdm)
        seconds = self.embed([d for _, d in pairs], params, use_tqdm)
        return [
            PoolingRequestOutput(
                f"{a.request_id}-{b.request_id}",
                ScoringOutput(_cosine(a.outputs.embedding, b.outputs.embedding)),
                a.prompt_token_ids + b.prompt_token_ids,
            )
            for a, b in zip(firsts, seconds, strict=True)
        ]

    def _score_pairs(
        self, pairs: list[tuple[str, str]], params: PoolingParams, use_tqdm: Optional[bool]
    ) -> list[ScoringRequestOutput]:
        ids: list[str] = []
        try:
            for query, doc in pairs:
                rid = str(next(self._ids))
                tokens, types = self.engine.encode_pair(query, doc)
                self.engine.add_request(EngineRequest(rid, tokens, params, token_type_ids=types))
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        outs = self._run(ids, use_tqdm)
        return [_pooled(out, lambda t: ScoringOutput(float(t[0]))) for out in outs]

    def _pool(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        params: PoolingParams,
        make: Callable[[torch.Tensor], Out],
        use_tqdm: Optional[bool],
    ) -> list[PoolingRequestOutput[Out]]:
        prompt_list = _as_prompt_list(prompts)
        outs = self._run(self._submit(prompt_list, [params] * len(prompt_list)), use_tqdm)
        return [_pooled(out, make) for out in outs]

    def reset_prefix_cache(self) -> int:
        """Drop every cached prefix block; returns how many were cached."""
        return self.engine.reset_prefix_cache()

    def _add(
        self,
        prompt: PromptType,
        params: Union[SamplingParams, PoolingParams],
        lora: Optional[LoRARequest] = None,
    ) -> str:
        rid = str(next(self._ids))
        text = prompt if isinstance(prompt, str) else None
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.add_request(EngineRequest(rid, ids, params, prompt=text, lora_request=lora))
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


def _for_task(
    params: Optional[PoolingParams], task: PoolingTask, truncate: Optional[int]
) -> PoolingParams:
    params = replace(params or PoolingParams(task=task), task=task)
    if truncate is not None:
        params = replace(params, truncate_prompt_tokens=truncate)
    return params


def _pooled(out: RequestOutput, make: Callable[[torch.Tensor], Out]) -> PoolingRequestOutput[Out]:
    if out.pooled is None:
        detail = out.outputs[0].finish_detail if out.outputs else None
        raise RuntimeError(f"request {out.request_id} ended without a result: {detail}")
    return PoolingRequestOutput(
        out.request_id, make(out.pooled), out.prompt_token_ids, True, out.num_cached_tokens
    )


def _score_pairs(
    text_1: Union[str, Sequence[str]], text_2: Union[str, Sequence[str]]
) -> list[tuple[str, str]]:
    """vLLM's pairing: one to one, or one text_1 against many text_2."""
    firsts = [text_1] if isinstance(text_1, str) else list(text_1)
    seconds = [text_2] if isinstance(text_2, str) else list(text_2)
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds) or not seconds:
        raise ValueError(
            f"text_1 ({len(firsts)}) and text_2 ({len(seconds)}) must be one to one, or one "
            "text_1 against any number of text_2"
        )
    return list(zip(firsts, seconds, strict=True))


def _cosine(a: list[float], b: list[float]) -> float:
    return float(F.cosine_similarity(torch.tensor([a]), torch.tensor([b]))[0])


def _as_lora_list(
    lora: Union[LoRARequest, Sequence[Optional[LoRARequest]], None], n: int
) -> list[Optional[LoRARequest]]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * n
    if len(lora) != n:
        raise ValueError(f"lora_request has {len(lora)} entries for {n} prompts")
    return list(lora)
