"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over the
same front door as OpenAI's routes: the request models (``protocol.py``), the conversation
as the chat template takes it (``conversation.py``), the tool plan (``tool_choice.py``),
the answer as a message or its SSE events (``messages.py``, ``stream.py``) and the errors
in Anthropic's shape (``errors.py``)."""
