"""The ``pagoda serve`` options (kept free of heavy imports: the CLI builds its parser eagerly)."""

from __future__ import annotations

import argparse
import json

from pagoda.entrypoints.tool_parsers import FORMATS as TOOL_FORMATS

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_RESPONSES_STORE_ENTRIES = 1024  # /v1/responses kept for previous_response_id
DEFAULT_RESPONSES_STORE_BYTES = 64 * 1024 * 1024


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--served-model-name", default=None, help="the name clients use (default: the model's name)"
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY' or Anthropic's 'x-api-key: KEY' (repeat "
        "for several tenants; also $PAGODA_API_KEY)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="requests waiting to be scheduled before new ones get 429",
    )
    g.add_argument(
        "--max-queued-prompt-tokens",
        type=int,
        default=None,
        help="prompt tokens waiting to be computed before new requests get 429 "
        "(default: the KV cache's size in tokens)",
    )
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    g.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch intra-op threads for the engine (default: all cores)",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=list(TOOL_FORMATS),
        help='how the model writes tool calls, for tool_choice "auto" (vLLM\'s names): '
        "hermes (<tool_call>{...}</tool_call>: Hermes, Qwen2.5, Qwen3), llama3_json "
        "(Llama 3.1-3.3), pythonic ([f(x=1)]: Llama 3.2, Llama 4), mistral ([TOOL_CALLS]), "
        "qwen3_coder (<function=...> XML), phi4_mini_json (functools[...]), gemma "
        '(```tool_code fences); "required" and named tool_choice need none',
    )
    _add_cors_args(g)
    g.add_argument(
        "--strict-fields",
        action="store_true",
        help="refuse (400) request fields the API does not declare; by default they are "
        "accepted, logged once and listed in the x-pagoda-ignored-fields response header",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        choices=["qwen3", "deepseek_r1"],
        help="how the model marks its thinking (<think>...</think>: qwen3 for Qwen3 / QwQ, "
        "deepseek_r1 where the template opens it): chat answers carry it as "
        "reasoning_content / reasoning, and tools and structured outputs apply after it",
    )
    g.add_argument(
        "--enable-debug-endpoints",
        action="store_true",
        help="GET /debug/state and POST /debug/fault (tests only)",
    )
    g.add_argument(
        "--no-inspector",
        dest="enable_inspector",
        action="store_false",
        help="turn off GET /inspect (the live view of the KV cache, prefix cache and "
        "scheduler) and its data routes /inspect/state and /inspect/events",
    )
    g.add_argument(
        "--inspector-show-text",
        action="store_true",
        help="show each request's prompt and output text in the inspector (off: only "
        "counts, block tables and timings)",
    )
    g.add_argument(
        "--responses-store-entries",
        type=int,
        default=DEFAULT_RESPONSES_STORE_ENTRIES,
        help="responses /v1/responses keeps (store: true) for GET and previous_response_id, "
        "in memory; the oldest are evicted first (0: none kept)",
    )
    g.add_argument(
        "--responses-store-bytes",
        type=int,
        default=DEFAULT_RESPONSES_STORE_BYTES,
        help="the bytes (JSON) the stored responses and their conversations may take",
    )
    g.add_argument("--uvicorn-log-level", default="warning")
    g.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="N replicas of the engine on this host, each pinned to its share of the cores, "
        "behind the cache-aware router on --host/--port (docs/routing.md)",
    )


def _list_arg(text: str) -> list[str]:
    """A JSON list of strings (vLLM's form: '["https://a.example"]') or a comma-separated
    list."""
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_cors_args(g: argparse._ArgumentGroup) -> None:
    """vLLM's CORS flags; CORS stays off (no browser on another origin may call the server)
    until --allowed-origins names one (or "*")."""
    g.add_argument(
        "--allowed-origins",
        type=_list_arg,
        default=[],
        help="origins a browser page may call from: a JSON list ('[\"http://localhost:3000\"]') "
        'or comma-separated; "*" for any (default: none, CORS off)',
    )
    g.add_argument("--allowed-methods", type=_list_arg, default=["*"], help="CORS methods")
    g.add_argument("--allowed-headers", type=_list_arg, default=["*"], help="CORS headers")
    g.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: let browsers send credentials (cookies, HTTP auth)",
    )
