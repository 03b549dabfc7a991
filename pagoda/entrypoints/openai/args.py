"""The ``pagoda serve`` options (kept free of heavy imports: the CLI builds its parser eagerly)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Optional

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


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's LoRA flags (docs/lora.md), and the runtime loads' opt-in and directories."""
    from pagoda.config import EngineArgs

    d = EngineArgs()
    g = parser.add_argument_group("LoRA adapters (docs/lora.md)")
    g.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters over the model: a request selects one by its model name",
    )
    g.add_argument(
        "--lora-modules",
        type=parse_lora_module,
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME=PATH",
        help="adapters served from the start (turns on --enable-lora): name=path (a PEFT "
        "adapter directory or a Hub id) or vLLM's JSON form "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\'; each is read and checked '
        "before the server listens",
    )
    g.add_argument(
        "--max-loras", type=int, default=d.max_loras, help="distinct adapters in one step"
    )
    g.add_argument(
        "--max-lora-rank", type=int, default=d.max_lora_rank, help="the largest rank served"
    )
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        default=d.max_cpu_loras,
        help="adapters kept read in host memory (default: --max-loras)",
    )
    g.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="take POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1); loads only from --lora-allowed-dir",
    )
    g.add_argument(
        "--lora-allowed-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="a directory runtime loads may read adapters from (repeat for several; "
        "default: none, so every runtime load is refused)",
    )


@dataclass(frozen=True)
class LoRAModule:
    """One ``--lora-modules`` item: ``name=path`` or vLLM's JSON form."""

    name: str
    path: str
    base_model_name: Optional[str] = None


LORA_MODULE_KEYS = ("name", "path", "base_model_name")  # the JSON form's (vLLM's)


def parse_lora_module(text: str) -> LoRAModule:
    """``name=path`` or ``{"name": ..., "path": ..., "base_model_name": ...}`` (the type of
    ``--lora-modules``)."""
    text = text.strip()
    if text.startswith("{"):
        return _module_from_json(text)
    name, eq, path = text.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(
            f"expected name=path or a JSON object with name and path, got {text!r}"
        )
    return LoRAModule(name.strip(), path.strip())


def _module_from_json(text: str) -> LoRAModule:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    unknown = sorted(set(value) - set(LORA_MODULE_KEYS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown keys {unknown}; a LoRA module takes {', '.join(LORA_MODULE_KEYS)}"
        )
    for key in ("name", "path"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise argparse.ArgumentTypeError(f"{key} must be a non-empty string in {text!r}")
    base = value.get("base_model_name")
    if base is not None and not isinstance(base, str):
        raise argparse.ArgumentTypeError(f"base_model_name must be a string in {text!r}")
    return LoRAModule(value["name"], value["path"], base)


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
