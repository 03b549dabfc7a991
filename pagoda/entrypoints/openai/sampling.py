"""What both OpenAI endpoints share on the way in: their sampling fields (OpenAI's and vLLM's)
as the engine's ``SamplingParams``, vLLM's ``truncate_prompt_tokens``, and the
:class:`ApiRequest` made of them. Errors name the field as the request spelled it
(``max_completion_tokens`` when that is what it sent, ``top_logprobs`` on chat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Request

from pagoda.entrypoints.dialect import tenant_salt
from pagoda.entrypoints.errors import ApiError, engine_value_error
from pagoda.entrypoints.front_door import ApiRequest, FieldNames, FrontDoor, Prompt
from pagoda.entrypoints.openai.protocol import SamplingFields
from pagoda.entrypoints.openai.structured import error_renames, structured_params
from pagoda.entrypoints.reasoning import Thinking
from pagoda.entrypoints.tools import ToolPlan
from pagoda.lora_request import LoRARequest
from pagoda.sampling import SamplingParams


@dataclass(frozen=True)
class Asked:
    """What an endpoint asks under its own names: how many tokens (``max_name`` says which
    field gave it) and how many logprobs (``logprobs_name``)."""

    max_tokens: Optional[int]
    max_name: str
    logprobs: Optional[int]
    logprobs_name: str
    prompt_logprobs: Optional[int] = None  # top tokens kept per prompt token
    default_max: Optional[int] = None  # when the request gives no max


def max_tokens_name(req: Any) -> str:
    """The field a request's token limit came from (chat's name wins over the older one)."""
    return "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"


def sampling_params(req: SamplingFields, asked: Asked, door: FrontDoor) -> SamplingParams:
    if req.stream and req.prompt_logprobs is not None:
        raise ApiError(400, "prompt_logprobs cannot be streamed", "prompt_logprobs")
    max_tokens = asked.max_tokens if asked.max_tokens is not None else asked.default_max
    values: dict[str, Any] = dict(
        prompt_logprobs=asked.prompt_logprobs,
        n=req.n,
        seed=req.seed,
        stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [],
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=asked.logprobs,
        skip_special_tokens=req.skip_special_tokens,
        max_tokens=max_tokens,
    )
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": door.top_k(req.top_k),
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    values["logit_bias"] = _logit_bias(req.logit_bias)
    values["allowed_token_ids"] = req.allowed_token_ids
    values["bad_words"] = req.bad_words or []
    try:
        values["structured_outputs"] = structured_params(req)
    except ValueError as e:
        raise engine_value_error(e, error_renames(req), "structured_outputs") from None
    try:
        return SamplingParams(**values)
    except ValueError as e:
        renames = {"max_tokens": asked.max_name, "logprobs": asked.logprobs_name}
        raise engine_value_error(e, renames) from None


def truncated(prompts: list[Prompt], keep: Optional[int], max_model_len: int) -> list[Prompt]:
    """vLLM's ``truncate_prompt_tokens``: each prompt's last ``keep`` tokens (-1: as many
    as the context holds, less one for the answer); a cut prompt has no text of its own."""
    if keep is None:
        return prompts
    limit = max_model_len - 1
    if keep == -1:
        keep = limit
    if not 1 <= keep <= limit:
        raise ApiError(
            400,
            f"truncate_prompt_tokens must be -1 or in [1, {limit}], got {keep}",
            "truncate_prompt_tokens",
        )
    return [p if len(p.ids) <= keep else Prompt(p.ids[-keep:]) for p in prompts]


def engine_request(
    req: SamplingFields,
    raw: Request,
    prompts: list[Prompt],
    params: SamplingParams,
    arrival: float,
    prompt_field: str,
    tools: Optional[ToolPlan] = None,
    thinking: Optional[Thinking] = None,
    lora: Optional[LoRARequest] = None,
) -> ApiRequest:
    """The engine request of an OpenAI request (the request's cache salt wins over its
    API key's), under the LoRA adapter its ``model`` named, if any."""
    return ApiRequest(
        prompts,
        params,
        arrival,
        cache_salt=req.cache_salt or tenant_salt(raw),
        priority=req.priority or 0,
        kv_transfer_params=req.kv_transfer_params,
        tools=tools,
        thinking=thinking,
        names=FieldNames(error_renames(req), prompt_field),
        lora=lora,
    )


def _logit_bias(raw: Optional[dict[str, float]]) -> dict[int, float]:
    """OpenAI's ``logit_bias`` has token ids as JSON object keys, so strings."""
    if not raw:
        return {}
    bias: dict[int, float] = {}
    for key, value in raw.items():
        if not key.isdigit() or len(key) > 12:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        bias[int(key)] = value
    return bias
