"""Every HTTP route of ``pagoda serve``, in one table that ``pagoda router`` (and
``pagoda serve --data-parallel-size``, which runs it) builds its routes from, so an endpoint
added to the server works behind the router too (a test holds the server's routes to this
table).

How the router serves each:

- ``PROMPT``: the policy picks where the prompt is computed (cache-aware, disaggregated
  prefill / decode), the answer is streamed back;
- ``INSTANCE``: proxied to one instance as it came (method, body, query, the client's key),
  its answer (a stream too) relayed; ``?instance=N`` picks the N-th, else the policy's
  least loaded (an instance's own view: ``/inspect``, ``/debug/state``);
- ``LOCAL``: the router answers itself (``/health``, ``/metrics`` are the router's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Routing(Enum):
    PROMPT = "prompt"
    INSTANCE = "instance"
    LOCAL = "local"


@dataclass(frozen=True)
class Route:
    method: str  # "GET" | "POST"
    path: str  # FastAPI's form: "{model_id:path}" for a parameter
    routing: Routing
    optional: bool = False  # served only with a flag (debug) or a part that can be off


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/completions", Routing.PROMPT),
    Route("POST", "/v1/chat/completions", Routing.PROMPT),
    Route("GET", "/v1/models", Routing.INSTANCE),
    Route("GET", "/v1/models/{model_id:path}", Routing.INSTANCE),
    Route("GET", "/version", Routing.INSTANCE),
    Route("POST", "/tokenize", Routing.INSTANCE),
    Route("POST", "/detokenize", Routing.INSTANCE),
    Route("GET", "/tokenizer_info", Routing.INSTANCE),
    Route("GET", "/inspect", Routing.INSTANCE, optional=True),
    Route("GET", "/inspect/state", Routing.INSTANCE, optional=True),
    Route("GET", "/inspect/events", Routing.INSTANCE, optional=True),
    Route("GET", "/debug/state", Routing.INSTANCE, optional=True),
    Route("POST", "/debug/fault", Routing.INSTANCE, optional=True),
    Route("GET", "/health", Routing.LOCAL),
    Route("GET", "/metrics", Routing.LOCAL),
)
