"""Structured outputs: constrained decoding (Willard & Louf, "Efficient Guided Generation for
LLMs", 2023; here with llguidance's lazy token masks, Moskal et al.) on the engine side.

Each constrained request has a matcher that has consumed exactly its accepted output tokens.
After the scheduler decides a step, the core asks for the allowed-token bitmask of every
request that samples in it (one bit per vocabulary entry, little-endian 32-bit words) and
hands the masks to the runner with the step; the sampler sets every other logit to -inf
before it draws (or takes the argmax). When a step's tokens are read, each matcher
consumes its request's token; a matcher that has reached the end of its grammar ends its
request ("stop"). Invariant: a constrained request only ever samples a token its matcher
allows, so its output always parses unless ``max_tokens`` cuts it.

Compiled grammars are cached by (kind, text) for the engine's one tokenizer: a request with a
schema seen before starts from a copy of the compiled matcher.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

from pagoda.sampling import StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance

logger = logging.getLogger(__name__)

CACHE_SIZE = 64  # compiled grammars kept
# JSON as json.dumps writes it: no free whitespace between tokens (which a weak or random
# model would fill with newlines until max_tokens), ", " and ": " as separators.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
REGEX_META = set("\\.+*?()|[]{}^$")


class GrammarCompiler:
    """Grammars (JSON schema, regex, choice, Lark) -> llguidance matchers, cached."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._ll: Optional[llguidance.LLTokenizer] = None  # built on first use (~1 s)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for ``spec``; ValueError naming the field if it does not compile."""
        template = self._cache.get(spec.key)
        if template is None:
            template = self._compile(spec)
            self._cache[spec.key] = template
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec.key)
        return template.deep_copy()

    def _compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        import llguidance

        field, grammar = _grammar(spec)
        if spec.reasoning_tags is not None:
            grammar = self._after_reasoning(grammar, spec.reasoning_tags)
        limits = llguidance.LLParserLimits(verbose_errors=False)  # errors name no internals
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{field} is not valid: {matcher.get_error()}")
        return matcher

    def _after_reasoning(self, grammar: str, tags: tuple[str, str]) -> str:
        """``grammar`` after a reasoning model's thinking: an optional start tag, any tokens
        but the end tag, the end tag, then the answer (llguidance's grammar references)."""
        start, end = (self._single_token(tag) for tag in tags)
        try:
            answer = json.loads(grammar)["grammars"][0]  # JSON schema and regex grammars
        except (ValueError, TypeError, KeyError, IndexError):
            answer = {"lark_grammar": grammar}  # a Lark grammar's text
        answer["name"] = "answer"
        think = f"start: <[{start}]>? <[^{end}]>* <[{end}]> @answer"
        return json.dumps({"grammars": [{"lark_grammar": think}, answer]})

    def _single_token(self, text: str) -> int:
        ids = self._hf_tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"structured_outputs after reasoning needs {text!r} to be one token of this "
                "model's tokenizer (is the reasoning parser this model's?)"
            )
        return int(ids[0])

    def tokenizer(self) -> llguidance.LLTokenizer:
        """The tokenizer in llguidance's form, converted on first use (~0.3 s)."""
        if self._ll is None:
            if not hasattr(self._hf_tokenizer, "backend_tokenizer"):
                raise ValueError(
                    "structured_outputs needs the model's Hugging Face tokenizer "
                    "(this model has none)"
                )
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos
            )
        return self._ll


def _grammar(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(the field it came from, llguidance grammar text)."""
    from llguidance import LLMatcher

    if spec.json is not None:
        try:
            schema = json.loads(spec.json)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        return "json", LLMatcher.grammar_from_json_schema(
            json.dumps(schema),
            defaults=JSON_OPTIONS,  # type: ignore[arg-type]
        )
    if spec.json_object:
        return "json_object", LLMatcher.grammar_from_json_schema(
            '{"type": "object"}',
            defaults=JSON_OPTIONS,  # type: ignore[arg-type]
        )
    if spec.regex is not None:
        return "regex", LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = "|".join(_escape_regex(c) for c in spec.choice)
        return "choice", LLMatcher.grammar_from_regex(f"({alternatives})")
    assert spec.grammar is not None
    return "grammar", LLMatcher.grammar_from_lark(spec.grammar)


def _escape_regex(text: str) -> str:
    """``text`` as a literal in llguidance's (Rust) regex syntax: meta characters escaped."""
    return "".join("\\" + ch if ch in REGEX_META else ch for ch in text)


class StructuredOutputs:
    """The matchers of the engine's constrained requests, by core request id."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._matchers: dict[str, llguidance.LLMatcher] = {}

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def check(self, spec: StructuredOutputsParams) -> None:
        """Compile (or find compiled) at intake, so a bad grammar is a 400 before anything
        is queued."""
        self.compiler.matcher(spec)

    def add(self, request_id: str, spec: StructuredOutputsParams) -> None:
        self._matchers[request_id] = self.compiler.matcher(spec)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    def bitmasks(self, request_id: str, drafts: list[int]) -> list[bytes]:
        """Speculative decoding: the masks at the position after each prefix of ``drafts``
        (which the grammar allows: ``valid_prefix``), the matcher left as it was."""
        matcher = self._matchers[request_id]
        masks = [matcher.compute_bitmask()]
        for token in drafts:
            if not matcher.consume_token(token):
                raise AssertionError(f"a draft the grammar refuses: {matcher.get_error()}")
            masks.append(matcher.compute_bitmask())
        if drafts:
            matcher.rollback(len(drafts))
        return masks

    def valid_prefix(self, request_id: str, drafts: list[int]) -> int:
        """How many of the drafts, from the first, the request's grammar allows (all of
        them for a request without one)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return len(drafts)
        return matcher.validate_tokens(drafts)

    def accept(self, request_id: str, token_id: int) -> tuple[bool, bool]:
        """Advance by a sampled token: (whether the grammar allowed it, whether it is now
        complete and takes no more tokens)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return True, False
        ok = matcher.consume_token(token_id)
        if not ok:
            logger.warning(
                "request %s: token %d broke its grammar: %s",
                request_id,
                token_id,
                matcher.get_error(),
            )
        return ok, matcher.is_stopped()
