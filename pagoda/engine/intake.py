"""Intake: a request checked and turned into the core requests that serve it.

Every check an ``EngineRequest`` gets before it is queued is here: the runner and task it
needs (``--runner``), its prompt's ids against the vocabulary and the context, its sampling
params (bad words tokenized, token ids in range, a grammar compiled), priority and cache
salt, ``kv_transfer_params`` (disaggregated prefill: the role and the signed lease), its LoRA
adapter (read and checked against the base), and a pooling request's fields against the
model's pooler (truncation, Matryoshka widths). It
then makes the ``n`` core requests of a generating request (``id:i`` when n > 1: the first
computes the prompt, the scheduler holds the others until it has) or the one core request of
a pooling request (its prompt truncated to its last ``truncate_prompt_tokens``).
Invariant: every failure is a ``ValueError`` whose message starts with the request's field
that was wrong (the API layers turn it into a 400 naming it), raised before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from pagoda.core.remote_kv import KVTransferRequest, check_remote_prefill, parse_kv_transfer_params
from pagoda.engine.served_model import ServedModel
from pagoda.engine.structured import StructuredOutputs
from pagoda.lora_request import LoRARequest
from pagoda.pooling_params import PoolingParams
from pagoda.request import NO_SAMPLING, EngineRequest, Request
from pagoda.sampling import SamplingParams
from pagoda.worker.pooler import Pooler


@dataclass(frozen=True)
class Intake:
    """The rules a served model's requests are checked by."""

    model: ServedModel
    policy: str  # the scheduler's (--scheduling-policy): priority needs "priority"
    structured: StructuredOutputs  # compiles (and caches) a request's grammar
    kv_role: Optional[str]  # --kv-role (disaggregated prefill)
    block_size: int
    kv_secret: bytes  # signs the remote-prefill leases this instance checks
    pooler: Optional[Pooler] = None  # a pooling model's
    # LoRA on: reads a request's adapter into the host set (lora/slots.py), raising a
    # ValueError (AdapterError) naming what was wrong; None: the engine serves no adapters.
    read_adapter: Optional[Callable[[LoRARequest], None]] = None

    def core_requests(self, request: EngineRequest, now: float) -> list[Request]:
        """The core requests serving ``request`` (one, or n for n > 1); ValueError naming
        the field that was wrong."""
        self.check_runner(request)
        if isinstance(request.params, PoolingParams):
            return [self._pooling_request(request, request.params, now)]
        params = self._checked_params(request, request.params)
        kv_transfer = self._validate_kv_transfer(
            request.kv_transfer_params, params, request.prompt_token_ids
        )
        self.check_lora(request)
        return self._children(request, params, kv_transfer, now)

    def check_lora(self, request: EngineRequest) -> None:
        """A request's adapter: LoRA must be on, and the adapter readable and fit for the
        base; disaggregated prefill does not carry adapters (refused, not served wrong)."""
        lora = request.lora_request
        if lora is None:
            return
        if self.read_adapter is None:
            raise ValueError(
                f"lora_request {lora.lora_name!r}: this engine serves no LoRA adapters "
                "(start it with --enable-lora)"
            )
        if request.kv_transfer_params is not None:
            raise ValueError(
                "kv_transfer_params: disaggregated prefill does not carry LoRA adapters; "
                f"serve {lora.lora_name!r} colocated"
            )
        try:
            self.read_adapter(lora)
        except (ValueError, OSError) as e:
            raise ValueError(f"lora_request {lora.lora_name!r}: {e}") from None

    def check_runner(self, request: EngineRequest) -> None:
        """A pooling request needs a pooling engine serving its task, a generation request
        a generation engine (``--runner``)."""
        params = request.params
        if not isinstance(params, PoolingParams):
            if self.model.runner_kind == "pooling":
                raise ValueError(
                    f"model {self.model.name!r} is served with --runner pooling: it computes "
                    f"{_tasks_text(self.model.pooling_tasks)}, not text"
                )
            return
        if self.model.runner_kind != "pooling":
            raise ValueError(
                f"task {params.task!r} needs a pooling model: model {self.model.name!r} is "
                "served for generation (start it with --runner pooling)"
            )
        if params.task not in self.model.pooling_tasks:
            raise ValueError(
                f"task {params.task!r} is not supported by model {self.model.name!r}; it "
                f"serves {_tasks_text(self.model.pooling_tasks)}"
            )

    def _pooling_request(
        self, request: EngineRequest, params: PoolingParams, now: float
    ) -> Request:
        """A pooling request: one core request that computes its prompt (truncated to its
        last ``truncate_prompt_tokens``) and ends with its pooled vector."""
        assert self.pooler is not None  # check_runner: this is a pooling engine
        self.pooler.check(params)
        self._check_common(request)
        if request.kv_transfer_params is not None:
            raise ValueError("kv_transfer_params: not for pooling requests")
        self.check_lora(request)
        ids, types = self._pooling_prompt(request, params)
        return Request(
            request.request_id,
            ids,
            NO_SAMPLING,
            (),
            0,
            now,
            cache_salt=request.cache_salt,
            priority=request.priority,
            pooling_params=params,
            token_type_ids=types,
            reads_every_row=self.pooler.reads_every_row,
            lora=request.lora_request,
        )

    def _pooling_prompt(
        self, request: EngineRequest, params: PoolingParams
    ) -> tuple[list[int], Optional[list[int]]]:
        """The prompt's ids and segments as computed: its last ``truncate_prompt_tokens``, at
        most the model's context."""
        ids, types = request.prompt_token_ids, request.token_type_ids
        self._validate_token_ids(ids)
        if types is not None and (
            len(types) != len(ids) or any(type(t) is not int or t not in (0, 1) for t in types)
        ):
            raise ValueError("token_type_ids must hold one 0 or 1 per prompt token")
        keep, limit = params.truncate_prompt_tokens, self.model.max_model_len
        if keep == -1:  # vLLM's: as many as the model takes
            keep = limit
        if keep is not None and keep > limit:
            raise ValueError(f"truncate_prompt_tokens {keep} exceeds the model's {limit} tokens")
        if keep is not None and len(ids) > keep:
            ids, types = ids[-keep:], types[-keep:] if types is not None else None
        if len(ids) > self.model.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model takes at most {self.model.max_model_len} "
                "(truncate_prompt_tokens keeps the last ones)"
            )
        return list(ids), list(types) if types is not None else None

    def _check_common(self, request: EngineRequest) -> None:
        """What every request is checked for, generating or pooling."""
        if request.priority and self.policy != "priority":
            raise ValueError(
                f"priority {request.priority} needs a server started with"
                " --scheduling-policy priority"
            )
        salt = request.cache_salt
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError("cache_salt must be a non-empty string")

    def _checked_params(self, request: EngineRequest, params: SamplingParams) -> SamplingParams:
        """The request's sampling params with its bad words tokenized, once every field the
        engine checks at intake is valid."""
        self._check_common(request)
        params = self._with_bad_word_ids(params)
        self._validate_prompt(request.prompt_token_ids, params)
        if params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)  # compiled (or cached) now
        return params

    def _children(
        self,
        request: EngineRequest,
        params: SamplingParams,
        kv_transfer: Optional[KVTransferRequest],
        now: float,
    ) -> list[Request]:
        """The n core requests of a user request (``id:i`` when n > 1): the first computes
        the prompt, and the scheduler holds the others until it has, to share its blocks."""
        rid, prompt_ids = request.request_id, request.prompt_token_ids
        max_tokens = self.model.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        return [
            Request(
                rid if params.n == 1 else f"{rid}:{i}",
                prompt_ids,
                params,
                self.model.arch.eos_token_ids,
                max_tokens,
                now,
                prefix_donor=None if i == 0 else f"{rid}:0",
                cache_salt=request.cache_salt,
                kv_transfer=kv_transfer if i == 0 else None,
                seed_offset=i,
                priority=request.priority,
                lora=request.lora_request,
            )
            for i in range(params.n)
        ]

    def _with_bad_word_ids(self, params: SamplingParams) -> SamplingParams:
        """``bad_words`` as token sequences (as vLLM reads them: each word as written and
        after a space, the two tokenizations a word has inside a text)."""
        if not params.bad_words:
            return params
        sequences = [list(seq) for seq in params.bad_words_token_ids]
        for word in params.bad_words:
            for text in (word, " " + word.lstrip()):
                ids = list(self.model.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in sequences:
                    sequences.append(ids)
        return params.clone(bad_words_token_ids=sequences)

    def _validate_token_ids(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model.arch.vocab_size
        bad = [
            t for t in prompt_token_ids if type(t) is not int or not 0 <= t < vocab
        ]  # type(): bools are not ids
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")

    def _validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._validate_token_ids(prompt_token_ids)
        vocab = self.model.arch.vocab_size
        for name, ids in (
            ("logit_bias", list(params.logit_bias)),
            ("allowed_token_ids", params.allowed_token_ids or []),
            ("bad_words_token_ids", [t for seq in params.bad_words_token_ids for t in seq]),
        ):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name} token ids must be in [0, {vocab}); got {outside[:3]}")
        if len(prompt_token_ids) >= self.model.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; the context length is "
                f"{self.model.max_model_len}, leaving no room to generate"
            )
        if params.max_tokens is not None and (
            len(prompt_token_ids) + params.max_tokens > self.model.max_model_len
        ):
            raise ValueError(
                f"max_tokens {params.max_tokens} + prompt {len(prompt_token_ids)} "
                f"tokens exceeds the context length {self.model.max_model_len}"
            )

    def _validate_kv_transfer(
        self, raw: Optional[dict], params: SamplingParams, prompt_token_ids: list[int]
    ) -> Optional[KVTransferRequest]:
        kv_transfer = parse_kv_transfer_params(raw)
        if kv_transfer is None:
            return None
        role = self.kv_role
        if kv_transfer.do_remote_decode and role != "prefill":
            raise ValueError(
                f"kv_transfer_params.do_remote_decode needs an instance started "
                f"with --kv-role prefill (this one is {role!r})"
            )
        if kv_transfer.do_remote_decode and params.n != 1:
            raise ValueError("n must be 1 with kv_transfer_params.do_remote_decode")
        if kv_transfer.remote_prefill is not None and role != "decode":
            raise ValueError(
                f"kv_transfer_params.do_remote_prefill needs an instance started "
                f"with --kv-role decode (this one is {role!r})"
            )
        if kv_transfer.remote_prefill is not None:
            check_remote_prefill(
                kv_transfer.remote_prefill, prompt_token_ids, self.block_size, self.kv_secret
            )
        return kv_transfer


def _tasks_text(tasks: frozenset[str]) -> str:
    return " and ".join(sorted(tasks)) if tasks else "nothing"
