"""Ollama's routes beside generation, each a route-table handler: ``GET /`` (and ``HEAD``:
"Ollama is running", what clients probe), ``/api/version``, ``/api/tags`` (the served model,
then each LoRA adapter, its ``details.parent_model`` the base),
``/api/show`` (its template, parameters, details, ``model_info``, capabilities), ``/api/ps``
(the loaded model: always the one served, never unloaded). Embeddings are ``embed.py``'s.

The version reported is an Ollama release's (:data:`VERSION`): clients gate features on it
(structured outputs, tools, ``think``), all of which this dialect serves. Invariant: every
answer here is the same for the same server and adapters (no clock but the server's start
and each adapter's load), so a router in front relays the instance's answer as it is.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from pagoda.entrypoints.adapters import Entry
from pagoda.entrypoints.dialect import Endpoint, ServerContext, reported
from pagoda.entrypoints.ollama.errors import OLLAMA
from pagoda.entrypoints.ollama.models import (
    Description,
    capabilities,
    describe,
    model_info,
    resolve,
    tagged,
)
from pagoda.entrypoints.ollama.protocol import ShowRequest

VERSION = "0.12.0"  # an Ollama release with every feature this dialect serves
RUNNING = "Ollama is running"
NEVER = "9999-12-31T23:59:59Z"  # /api/ps' expires_at: the served model is never unloaded


def root(ctx: ServerContext) -> Endpoint:
    async def ollama_is_running() -> Response:
        return PlainTextResponse(RUNNING)

    return Endpoint(ollama_is_running, OLLAMA)


def version(ctx: ServerContext) -> Endpoint:
    async def ollama_version() -> dict[str, str]:
        return {"version": VERSION}

    return Endpoint(ollama_version, OLLAMA)


def tags(ctx: ServerContext) -> Endpoint:
    async def ollama_tags() -> dict[str, Any]:
        d = describe(ctx)
        adapters = [_adapter_entry(d, e) for e in ctx.door.adapters.entries()]
        return {"models": [{**_entry(d), "modified_at": _modified(ctx.created)}, *adapters]}

    return Endpoint(ollama_tags, OLLAMA)


def ps(ctx: ServerContext) -> Endpoint:
    on_gpu = str(getattr(ctx.door.engine, "device", "cpu")).startswith("cuda")

    async def ollama_ps() -> dict[str, Any]:
        d = describe(ctx)
        loaded = {
            **_entry(d),
            "expires_at": NEVER,
            "size_vram": d.size if on_gpu else 0,
            "context_length": d.context_length,
        }
        return {"models": [loaded]}

    return Endpoint(ollama_ps, OLLAMA)


def show(ctx: ServerContext) -> Endpoint:
    async def ollama_show(body: ShowRequest) -> Response:
        ignored = ctx.policy.check(body)
        resolve(ctx, body.model or body.name, required=False)
        return reported(JSONResponse(_show(ctx)), ignored)

    return Endpoint(ollama_show, OLLAMA, OLLAMA.error_responses(400, 401, 404, 413))


# ---------------------------------------------------------------- helpers
def _entry(d: Description) -> dict[str, Any]:
    return {
        "name": d.name,
        "model": d.name,
        "size": d.size,
        "digest": d.digest,
        "details": d.details(),
    }


def _adapter_entry(d: Description, entry: Entry) -> dict[str, Any]:
    """A LoRA adapter as /api/tags lists it: the base's details, the base as its parent,
    its own weights' size."""
    name = tagged(entry.lora.lora_name)
    digest = hashlib.sha256(f"{name}\x00{entry.lora.lora_path}".encode()).hexdigest()
    return {
        "name": name,
        "model": name,
        "size": entry.num_bytes,
        "digest": digest,
        "details": {**d.details(), "parent_model": tagged(entry.parent)},
        "modified_at": _modified(entry.created),
    }


def _modified(when: int) -> str:
    """When a model was loaded (the base: the server's start), RFC 3339."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(ctx: ServerContext) -> dict[str, Any]:
    d = describe(ctx)
    template = getattr(ctx.door.engine, "chat_template", None) or ""
    parameters = _parameters(ctx)
    root = ctx.config.model_root or ctx.config.model_names[0]
    modelfile = f"# the model pagoda serves\nFROM {root}\n" + "".join(
        f"PARAMETER {line}\n" for line in parameters
    )
    return {
        "license": "",
        "modelfile": modelfile,
        "parameters": "\n".join(parameters),
        "template": template,
        "details": d.details(),
        "model_info": model_info(ctx, d),
        "capabilities": capabilities(ctx),
        "modified_at": _modified(ctx.created),
    }


def _parameters(ctx: ServerContext) -> list[str]:
    """Ollama's ``parameters``: here the stop tokens the model ends its turns with."""
    engine = ctx.door.engine
    lines = []
    for token_id in engine.arch.eos_token_ids:
        try:
            text = ctx.door.tokenizer.decode([token_id], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - a tokenizer without this call: no line
            continue
        if text:
            lines.append(f'stop "{text}"')
    return lines
