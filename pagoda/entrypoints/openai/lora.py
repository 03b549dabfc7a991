"""vLLM's runtime adapter routes: ``POST /v1/load_lora_adapter`` ``{"lora_name",
"lora_path"}`` and ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``, answered as vLLM
answers them: 200 with a plain-text message, or OpenAI's error shape (400: a name already
loaded, a bad adapter naming its tensor, a path outside ``--lora-allowed-dir``; 404: an
adapter that is not there, and both routes while runtime updates are off, as vLLM's server,
which does not serve them then).

The catalog (``entrypoints/adapters.py``) does the work; an unloaded (or replaced) adapter's
weights leave the engine once nothing runs under it (``FrontDoor.retire``). Invariant: a
request already running under an unloaded adapter finishes under it; a new one gets a 404.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi.responses import PlainTextResponse, Response

from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.field_policy import Tolerant
from pagoda.entrypoints.openai.errors import OPENAI

logger = logging.getLogger("pagoda.server")

ERRORS = OPENAI.error_responses(400, 401, 404, 413)


class LoadLoRAAdapterRequest(Tolerant):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace the adapter of that name (a new id)


class UnloadLoRAAdapterRequest(Tolerant):
    lora_name: Optional[str] = None
    lora_int_id: Optional[int] = None  # vLLM's alternative to the name


def load(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/load_lora_adapter``."""
    door = ctx.door

    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        ignored = ctx.policy.check(body)
        lora, replaced = await door.adapters.load(body.lora_name, body.lora_path, body.load_inplace)
        if replaced is not None:
            door.retire(replaced)
        logger.info(
            "loaded LoRA adapter %r (id %d) from %s",
            lora.lora_name,
            lora.lora_int_id,
            lora.lora_path,
        )
        message = f"Success: LoRA adapter '{lora.lora_name}' added successfully."
        return reported(PlainTextResponse(message), ignored)

    return Endpoint(load_lora_adapter, OPENAI, ERRORS)


def unload(ctx: ServerContext) -> Endpoint:
    """The route table's handler of ``POST /v1/unload_lora_adapter``."""
    door = ctx.door

    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        ignored = ctx.policy.check(body)
        lora = door.adapters.unload(body.lora_name, body.lora_int_id)
        door.retire(lora)
        logger.info("unloaded LoRA adapter %r (id %d)", lora.lora_name, lora.lora_int_id)
        message = f"Success: LoRA adapter '{lora.lora_name}' removed successfully."
        return reported(PlainTextResponse(message), ignored)

    return Endpoint(unload_lora_adapter, OPENAI, ERRORS)
