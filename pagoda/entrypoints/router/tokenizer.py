"""The instances' tokenizer, in the router: a request's token ids for the precise
cache-aware index without a ``/tokenize`` round trip to a busy instance.

Invariant: the router uses its own token ids only once they have agreed with an instance's
``/tokenize`` for that kind of request (chat, or text prompt); a disagreement (another chat
template, another tokenizer) switches the router back to asking the instances, with a
warning, so a wrong tokenizer can cost hits but never route on ids the instances would not
compute.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from pagoda.entrypoints.openai.protocol import ChatMessage
from pagoda.utils import read_chat_template

logger = logging.getLogger("pagoda.router")


class RouterTokenizer:
    def __init__(self, tokenizer: Any, chat_template: Optional[str], source: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source = source
        self.agreed: set[str] = set()  # kinds checked against an instance
        self.disabled = False

    @classmethod
    def load(cls, model: str, chat_template: Optional[str] = None) -> RouterTokenizer:
        """The tokenizer of ``model`` (a GGUF file or a Hugging Face directory) as the
        engine loads it, with ``--chat-template`` (a file or the text) over the model's."""
        if model.endswith(".gguf"):
            from pagoda.models.gguf_loader import load_gguf_tokenizer

            tokenizer = load_gguf_tokenizer(model)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        template = read_chat_template(chat_template) or getattr(tokenizer, "chat_template", None)
        return cls(tokenizer, template, model)

    @staticmethod
    def kind(body: dict[str, Any]) -> Optional[str]:
        """What the instance would tokenize: "chat" (messages through the template),
        "prompt" (one text), or None (ids already, a batch, or nothing the router can say)."""
        if "messages" in body:
            return "chat"
        return "prompt" if isinstance(body.get("prompt"), str) else None

    def tokens(self, body: dict[str, Any]) -> Optional[list[int]]:
        """The request's prompt ids as the instance computes them (None: cannot say)."""
        kind = self.kind(body)
        if kind == "prompt":
            return list(self.tokenizer.encode(body["prompt"], add_special_tokens=True))
        if kind != "chat" or not self.chat_template or not isinstance(body["messages"], list):
            return None
        try:
            messages = [ChatMessage.model_validate(m).to_template() for m in body["messages"]]
            text = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=False,
                chat_template=self.chat_template,
            )
        except Exception:  # noqa: BLE001 - bad messages, or a template raising anything:
            return None  # the instance will answer (or refuse) it itself
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def trusted(self, body: dict[str, Any]) -> bool:
        """Whether the router's ids for this kind of request have agreed with an instance."""
        return not self.disabled and self.kind(body) in self.agreed

    def check(self, body: dict[str, Any], mine: list[int], theirs: list[int]) -> None:
        """Compare the router's ids with an instance's; trust them, or stop using them."""
        kind = self.kind(body)
        if kind is None or self.disabled:
            return
        if mine == theirs:
            self.agreed.add(kind)
            return
        self.disabled = True
        logger.warning(
            "the router's tokenizer (%s) disagrees with the instances' /tokenize on a %s "
            "request (%d ids vs %d): asking the instances from now on",
            self.source,
            kind,
            len(mine),
            len(theirs),
        )
