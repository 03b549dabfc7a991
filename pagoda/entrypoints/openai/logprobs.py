"""Logprobs as the OpenAI endpoints write them: chat's ``{"content": [{token, logprob, bytes,
top_logprobs}]}``, the legacy completions object (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``), a prompt's tokens in that object (``echo``), and vLLM's
``prompt_logprobs`` (per prompt token, by id: ``{logprob, rank, decoded_token}``).

A token is shown as the tokenizer decodes it alone. The legacy object's ``text_offset`` s
count from the start of the choice's text (the echoed prompt included); a stream's chunk
counts on from the text sent before it (a token whose text the detokenizer still holds
back, an incomplete character, is placed where the text so far ends).
"""

from __future__ import annotations

from typing import Any, Optional

from pagoda.core.outputs import TokenLogprobs
from pagoda.engine.outputs import RequestOutput


class Logprobs:
    """The renderings, over the served tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def chat(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [self._chat_entry(e) for e in entries]}

    def legacy(self, entries: list[TokenLogprobs], text_offset: int, k: int) -> dict[str, Any]:
        """The legacy object of generated tokens whose text starts at ``text_offset``."""
        tokens = [self.token_str(e.token_id) for e in entries]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [self._top_with_chosen(e, k) for e in entries],
            "text_offset": offsets,
        }

    def legacy_prompt(
        self, ids: list[int], entries: Optional[list[Optional[TokenLogprobs]]], k: int
    ) -> dict[str, list]:
        """The legacy object of a prompt's tokens: each with its logprob given what precedes
        it (the first has none, as in OpenAI's legacy API)."""
        if entries is None or any(e is None for e in entries[1:]):
            raise RuntimeError("the engine returned no logprobs for some prompt tokens")
        tokens = [self.token_str(t) for t in ids]
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        scored = [e for e in entries[1:] if e is not None]
        return {
            "tokens": tokens,
            "token_logprobs": [None, *(e.logprob for e in scored)],
            "top_logprobs": [None, *(self._top_with_chosen(e, k) for e in scored)],
            "text_offset": offsets,
        }

    def vllm_prompt(self, out: RequestOutput, k: int) -> list[Optional[dict]]:
        """vLLM's ``prompt_logprobs``: per prompt token (the first: null), the token and the
        ``k`` most likely ones, by id: {logprob, rank, decoded_token}."""
        result: list[Optional[dict]] = []
        for e in out.prompt_logprobs or []:
            if e is None:
                result.append(None)
                continue
            ranked = [(t, lp, r) for r, (t, lp) in enumerate(e.top[:k], start=1)]
            entry = {str(t): self._ranked(lp, r, t) for t, lp, r in ranked}
            entry.setdefault(str(e.token_id), self._ranked(e.logprob, e.rank, e.token_id))
            result.append(entry)
        return result

    def token_str(self, token_id: int) -> str:
        text: str = self.tokenizer.decode([token_id])
        return text

    def _chat_entry(self, e: TokenLogprobs) -> dict:
        tok = self.token_str(e.token_id)
        return {
            "token": tok,
            "logprob": e.logprob,
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {
                    "token": (s := self.token_str(t)),
                    "logprob": lp,
                    "bytes": list(s.encode("utf-8")),
                }
                for t, lp in e.top
            ],
        }

    def _top_with_chosen(self, e: TokenLogprobs, k: int) -> dict[str, float]:
        """The ``k`` most likely tokens and the chosen one (OpenAI's legacy API: up to k + 1
        entries), best first; a string two ids decode to keeps the likelier logprob."""
        top: dict[str, float] = {}
        for t, lp in e.top[:k]:
            top.setdefault(self.token_str(t), lp)
        top.setdefault(self.token_str(e.token_id), e.logprob)
        return top

    def _ranked(self, logprob: float, rank: int, token_id: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.token_str(token_id)}
