"""SamplingParams: what a request asks of the sampler, validated once at the door.

Every invalid value raises ``ValueError`` whose message starts with the field's name,
so the API layer can turn it into a 400 that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
# Temperatures below this are treated as greedy: dividing logits by them overflows.
GREEDY_TEMPERATURE = 1e-5
MAX_GRAMMAR_CHARS = 200_000  # a JSON schema, regex or grammar longer than this is refused
MAX_CHOICES = 256
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound: -100 bans a token, 100 all but forces it
MAX_ALLOWED_TOKEN_IDS = 100_000
MAX_BAD_WORDS = 64


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's ``structured_outputs``): exactly one of a JSON
    schema, any JSON object, a regex, one of a list of strings, or a Lark grammar. Compiled
    and enforced by ``engine/structured.py``."""

    json: Optional[str] = None  # a JSON schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    grammar: Optional[str] = None  # Lark (llguidance's dialect)
    # A reasoning model's thinking tags (start, end): the grammar holds from after the end
    # tag; before it the model thinks freely (set by the server's reasoning parser).
    reasoning_tags: Optional[tuple[str, str]] = None

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("json", "regex", "choice", "grammar")
            if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, json_object, regex, choice "
                f"and grammar (got {given or 'none'})"
            )
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
            if value is not None and len(value) > MAX_GRAMMAR_CHARS:
                raise ValueError(
                    f"structured_outputs.{name} has {len(value)} characters; "
                    f"at most {MAX_GRAMMAR_CHARS}"
                )
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice must hold 1 to {MAX_CHOICES} strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must hold non-empty strings")
            if sum(len(c) for c in self.choice) > MAX_GRAMMAR_CHARS:
                raise ValueError("structured_outputs.choice is too long")

    @property
    def key(self) -> str:
        """What identifies the compiled grammar (with the tokenizer)."""
        after = "" if self.reasoning_tags is None else "after:" + "\x00".join(self.reasoning_tags)
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                return f"{after}{name}:{value}"
        if self.choice is not None:
            return after + "choice:" + "\x00".join(self.choice)
        return after + "json_object"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: Optional[int] = None  # top-k logprobs per generated token (0: only the sampled one)
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    allowed_token_ids: Optional[list[int]] = None  # vLLM's: only these may be sampled
    # vLLM's: words never generated. The engine tokenizes them (with and without a leading
    # space) into bad_words_token_ids; a sequence's last token is banned wherever the
    # output so far ends with the rest of it.
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list("stop", self.stop)
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids)
        if type(self.top_k) is int and self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        _check_int("n", self.n, lo=1, hi=MAX_N)
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, lo=0)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        self._validate_stops()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0, hi=MAX_LOGPROBS)
        self._validate_logit_bias()
        self._validate_token_sets()
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must be an object of token id -> bias")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(
                f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}"
            )
        for token, bias in self.logit_bias.items():
            _check_int("logit_bias", token, lo=0)
            _check_float("logit_bias", bias, lo=-MAX_LOGIT_BIAS, hi=MAX_LOGIT_BIAS)

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_LEN} characters")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0)

    def _validate_token_sets(self) -> None:
        if self.allowed_token_ids is not None:
            ids = _as_list("allowed_token_ids", self.allowed_token_ids)
            if not ids or len(ids) > MAX_ALLOWED_TOKEN_IDS:
                raise ValueError(
                    f"allowed_token_ids must hold 1 to {MAX_ALLOWED_TOKEN_IDS} token ids"
                )
            for t in ids:
                _check_int("allowed_token_ids", t, lo=0)
            self.allowed_token_ids = ids
        self.bad_words = _as_list("bad_words", self.bad_words)
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words has {len(self.bad_words)} words; at most {MAX_BAD_WORDS}")
        for w in self.bad_words:
            if not isinstance(w, str) or not w.strip() or len(w) > MAX_STOP_STRING_LEN:
                raise ValueError(
                    f"bad_words must hold non-empty strings of at most {MAX_STOP_STRING_LEN} "
                    f"characters, got {w!r}"
                )
        for seq in self.bad_words_token_ids:
            if not isinstance(seq, list) or not seq:
                raise ValueError("bad_words_token_ids must hold non-empty lists of token ids")
            for t in seq:
                _check_int("bad_words_token_ids", t, lo=0)

    def clone(self, **changes: object) -> "SamplingParams":
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)


def _as_list(name: str, value: object) -> list:
    """None or a list / tuple of items; anything else (a bare number, a set) is an error."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)


def _check_int(
    name: str, value: object, lo: Optional[int] = None, hi: Optional[int] = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


def _check_float(
    name: str, value: object, lo: Optional[float] = None, hi: Optional[float] = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        as_float = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be finite, got {value}") from None
    if math.isnan(as_float) or math.isinf(as_float):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
