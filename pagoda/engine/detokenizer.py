"""Incremental detokenization and stop strings (with the hold-back a live stream needs).

Decoding token by token is wrong for byte-level BPE (one character may span tokens) and
decoding everything each step is quadratic. We keep two offsets into the output ids:
text is final up to ``read_offset``; ``prefix_offset`` starts a short window decoded again
each step so that the tokenizer sees enough context to merge bytes into characters.

Two tokenizers skip the window: a fast (Rust) tokenizer has its own incremental decoder,
``tokenizers.decoders.DecodeStream``, which does the same in a few hundred nanoseconds a
token (the window costs several microseconds, per running request per step); and the
token-id tokenizer of dummy models, whose text is each token's text joined.
"""

from __future__ import annotations

from typing import Any, Optional

REPLACEMENT_CHAR = "\ufffd"
PREFIX_WINDOW = 6


def _stream_decoder(tokenizer: Any, prompt_tail: list[int], skip_special: bool) -> Any:
    """A Rust incremental decoder giving the text ``tokenizer.decode`` would, or None.
    transformers' decode may also clean up spaces around punctuation, which the Rust
    decoder does not: such tokenizers keep the window."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    return DecodeStream(ids=prompt_tail, skip_special_tokens=skip_special)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        # A tokenizer whose text is each token's text joined needs no window (token ids).
        self._per_token = getattr(tokenizer, "text_is_per_token", False)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        # Seed the window with the prompt's tail so the first output token decodes in context.
        tail = prompt_token_ids[-PREFIX_WINDOW:]
        self._stream = (
            None if self._per_token else _stream_decoder(tokenizer, list(tail), skip_special_tokens)
        )
        self.ids: list[int] = list(tail)
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""
        # Like EOS and stop tokens, stop strings cannot end the first ``min_tokens`` outputs:
        # a match must end after the text those tokens made.
        self.min_tokens = min_tokens
        self.num_output_tokens = 0
        self._protected_len = 0
        self.num_taken = 0  # of the last update's tokens

    def update(self, new_token_ids: list[int]) -> Optional[str]:
        """Add tokens; return the stop string that ended the text, if one appeared. Several
        tokens (speculative decoding's accepted run) are taken one at a time, as they would
        be over several steps, and the ones after the token that completed a stop string are
        not taken: ``num_taken`` says how many were."""
        self.num_taken = 0
        for token in new_token_ids:
            checked = len(self.text)
            self.ids.append(token)
            self.num_output_tokens += 1
            self.num_taken += 1
            self._advance()
            if self.num_output_tokens == self.min_tokens:
                self._protected_len = len(self.text)
            if self.stop and self.num_output_tokens > self.min_tokens:
                stop = self._check_stop(max(checked, self._protected_len))
                if stop is not None:
                    return stop
        return None

    @property
    def stream_text(self) -> str:
        """The text a live stream may show: without a tail that could be the start of a stop
        string (it is cut if the string completes, so it must not have been sent)."""
        if not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]

    def _advance(self) -> None:
        if self._stream is not None:
            chunk = self._stream.step(self.tokenizer.backend_tokenizer, self.ids[-1])
            if chunk:
                self.text += chunk
            return
        decode = self.tokenizer.decode
        if self._per_token:
            self.text += decode(self.ids[-1:], skip_special_tokens=self.skip_special)
            self.prefix_offset = self.read_offset = len(self.ids)
            return
        prefix = decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special
        )
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.text += full[len(prefix) :]
            self.prefix_offset = max(self.read_offset, len(self.ids) - PREFIX_WINDOW)
            self.read_offset = len(self.ids)

    def _check_stop(self, checked: int) -> Optional[str]:
        """The earliest stop string that ends after text offset ``checked``."""
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            # Only the new text, plus the string's length of overlap, can hold a new match.
            i = self.text.find(s, max(0, checked - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s
