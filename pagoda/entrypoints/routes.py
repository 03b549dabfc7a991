"""Every HTTP route of ``pagoda serve``, in one table that both sides build from:
``pagoda serve`` registers each route's handler from it (``openai/api_server.py``), and
``pagoda router`` (and ``pagoda serve --data-parallel-size``, which runs it) its routing,
so an endpoint added to the server works behind the router too (a test holds the server's
routes to this table).

A route names its handler as ``"module:factory"``: the server imports the module and calls
``factory(ctx)`` for the endpoint (``dialect.py``); the router never imports it, so this
table stays light (no torch). Adding an API dialect is one module and its lines here.

How the router serves each:

- ``PROMPT``: the policy picks where the prompt is computed (cache-aware, disaggregated
  prefill / decode), the answer is streamed back;
- ``INSTANCE``: proxied to one instance as it came (method, body, query, the client's key),
  its answer (a stream too) relayed; ``?instance=N`` picks the N-th, else the policy's
  least loaded (an instance's own view: ``/inspect``, ``/debug/state``);
- ``EVERY``: sent as it came to every instance in turn (prefill ones first), stopping at
  the first that refuses it, whose answer is relayed; else the first instance's answer.
  For what must be the same everywhere: the runtime LoRA adapter loads, so that a request
  naming an adapter finds it wherever it is routed;
- ``LOCAL``: the router answers itself (``/health``, ``/metrics`` are the router's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Routing(Enum):
    PROMPT = "prompt"
    INSTANCE = "instance"
    EVERY = "every"
    LOCAL = "local"


@dataclass(frozen=True)
class Route:
    method: str  # "GET" | "POST"
    path: str  # FastAPI's form: "{model_id:path}" for a parameter
    routing: Routing
    handler: str  # "module:factory", the factory making the server's endpoint (dialect.py)
    optional: bool = False  # served only with a flag (debug) or a part that can be off


OPENAI = "pagoda.entrypoints.openai"
ANTHROPIC_API = "pagoda.entrypoints.anthropic"
OLLAMA_API = "pagoda.entrypoints.ollama"

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/completions", Routing.PROMPT, f"{OPENAI}.completions:endpoint"),
    Route("POST", "/v1/chat/completions", Routing.PROMPT, f"{OPENAI}.chat:endpoint"),
    # Pooling models (--runner pooling): OpenAI's embeddings, vLLM's rerank, score, classify
    Route("POST", "/v1/embeddings", Routing.INSTANCE, f"{OPENAI}.embeddings:endpoint"),
    Route("POST", "/v1/rerank", Routing.INSTANCE, f"{OPENAI}.scoring:rerank"),
    Route("POST", "/rerank", Routing.INSTANCE, f"{OPENAI}.scoring:rerank"),
    Route("POST", "/v2/rerank", Routing.INSTANCE, f"{OPENAI}.scoring:rerank"),
    Route("POST", "/score", Routing.INSTANCE, f"{OPENAI}.scoring:score"),
    Route("POST", "/v1/score", Routing.INSTANCE, f"{OPENAI}.scoring:score"),
    Route("POST", "/classify", Routing.INSTANCE, f"{OPENAI}.classify:endpoint"),
    Route("POST", "/v1/classify", Routing.INSTANCE, f"{OPENAI}.classify:endpoint"),
    Route("GET", "/v1/models", Routing.INSTANCE, f"{OPENAI}.info:models"),
    Route("GET", "/v1/models/{model_id:path}", Routing.INSTANCE, f"{OPENAI}.info:model"),
    Route("GET", "/version", Routing.INSTANCE, f"{OPENAI}.info:version"),
    Route("POST", "/tokenize", Routing.INSTANCE, f"{OPENAI}.info:tokenize"),
    Route("POST", "/detokenize", Routing.INSTANCE, f"{OPENAI}.info:detokenize"),
    Route("GET", "/tokenizer_info", Routing.INSTANCE, f"{OPENAI}.info:tokenizer_info"),
    Route("GET", "/inspect", Routing.INSTANCE, f"{OPENAI}.inspector:page", optional=True),
    Route("GET", "/inspect/state", Routing.INSTANCE, f"{OPENAI}.inspector:state", optional=True),
    Route("GET", "/inspect/events", Routing.INSTANCE, f"{OPENAI}.inspector:events", optional=True),
    Route("GET", "/debug/state", Routing.INSTANCE, f"{OPENAI}.debug:state", optional=True),
    Route("POST", "/debug/fault", Routing.INSTANCE, f"{OPENAI}.debug:fault", optional=True),
    # vLLM's runtime LoRA routes (refused with a 404 unless --allow-runtime-lora)
    Route("POST", "/v1/load_lora_adapter", Routing.EVERY, f"{OPENAI}.lora:load"),
    Route("POST", "/v1/unload_lora_adapter", Routing.EVERY, f"{OPENAI}.lora:unload"),
    Route("GET", "/health", Routing.LOCAL, f"{OPENAI}.info:health"),
    Route("GET", "/metrics", Routing.LOCAL, f"{OPENAI}.info:metrics"),
    # Anthropic's Messages API: INSTANCE, as the router reads only OpenAI bodies for PROMPT
    Route("POST", "/v1/messages", Routing.INSTANCE, f"{ANTHROPIC_API}.messages:endpoint"),
    Route(
        "POST",
        "/v1/messages/count_tokens",
        Routing.INSTANCE,
        f"{ANTHROPIC_API}.messages:count_tokens",
    ),
    # Ollama's API: INSTANCE, as the router reads only OpenAI bodies for PROMPT
    Route("GET", "/", Routing.INSTANCE, f"{OLLAMA_API}.info:root"),
    Route("HEAD", "/", Routing.INSTANCE, f"{OLLAMA_API}.info:root"),
    Route("GET", "/api/version", Routing.INSTANCE, f"{OLLAMA_API}.info:version"),
    Route("GET", "/api/tags", Routing.INSTANCE, f"{OLLAMA_API}.info:tags"),
    Route("POST", "/api/show", Routing.INSTANCE, f"{OLLAMA_API}.info:show"),
    Route("GET", "/api/ps", Routing.INSTANCE, f"{OLLAMA_API}.info:ps"),
    Route("POST", "/api/chat", Routing.INSTANCE, f"{OLLAMA_API}.chat:endpoint"),
    Route("POST", "/api/generate", Routing.INSTANCE, f"{OLLAMA_API}.generate:endpoint"),
    Route("POST", "/api/embed", Routing.INSTANCE, f"{OLLAMA_API}.embed:embed"),
    Route("POST", "/api/embeddings", Routing.INSTANCE, f"{OLLAMA_API}.embed:embeddings"),
    # OpenAI's Responses API: INSTANCE, as the router reads only completions' and chat's
    # prompts, and a stored response lives on the instance that answered it
    Route("POST", "/v1/responses", Routing.INSTANCE, f"{OPENAI}.responses:endpoint"),
    Route("GET", "/v1/responses/{response_id}", Routing.INSTANCE, f"{OPENAI}.responses:retrieve"),
    Route("DELETE", "/v1/responses/{response_id}", Routing.INSTANCE, f"{OPENAI}.responses:delete"),
)
