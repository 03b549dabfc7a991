"""Incremental detokenization and stop strings.

Decoding token by token is wrong for byte-level BPE (one character may span tokens) and
decoding everything each step is quadratic. We keep two offsets into the output ids:
text is final up to ``read_offset``; ``prefix_offset`` starts a short window decoded again
each step so that the tokenizer sees enough context to merge bytes into characters.
"""
from __future__ import annotations

from typing import Any, Optional

REPLACEMENT_CHAR = "\ufffd"
PREFIX_WINDOW = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        # Seed the window with the prompt's tail so the first output token decodes in context.
        tail = prompt_token_ids[-PREFIX_WINDOW:]
        self.ids: list[int] = list(tail)
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""
        self.stop_max_len = max((len(s) for s in stop), default=0)

    def update(self, new_token_ids: list[int]) -> Optional[str]:
        """Add tokens; return the stop string that ended the text, if one appeared."""
        checked = len(self.text)
        for token in new_token_ids:
            self.ids.append(token)
            self._advance()
        return self._check_stop(checked) if self.stop else None

    def _advance(self) -> None:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.text += full[len(prefix):]
            self.prefix_offset = max(self.read_offset, len(self.ids) - PREFIX_WINDOW)
            self.read_offset = len(self.ids)

    def _check_stop(self, checked: int) -> Optional[str]:
        # Only the new text, plus a stop string's length of overlap, can hold a new match.
        window_start = max(0, checked - self.stop_max_len + 1)
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            i = self.text.find(s, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        return s
