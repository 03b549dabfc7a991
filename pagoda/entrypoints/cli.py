"""The ``pagoda`` command: ``pagoda serve``, ``pagoda generate`` and ``pagoda bench ...``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from dataclasses import fields
from typing import Optional, Sequence

from pagoda.config import EngineArgs

# ``pagoda bench NAME``: the module pagoda.bench.NAME (add_args, main), its help, and whether
# it builds an engine in this process (and so takes the engine's options).
BENCHES = [
    ("throughput", "offline throughput vs transformers", True),
    ("prefix", "prefix caching on vs off on shared prefixes", True),
    ("structured", "constrained decoding (a JSON schema) vs none, and what the masks cost", True),
    ("spec", "speculative decoding (ngram, suffix) vs none: grounded and saturated work", True),
    (
        "embed",
        "embeddings (--task embed) or reranking (--task rerank): pagoda offline and served "
        "vs sentence-transformers",
        True,
    ),
    ("lora", "LoRA adapters (0, 1, 4, 8 of them) vs the base model, offline", True),
    (
        "host",
        "the engine's host time per step, model work removed (the host side of a GPU step)",
        False,
    ),
    ("serve", "online serving benchmark against an HTTP endpoint", False),
    (
        "route",
        "routing policies over replicas (round robin, cache-aware, vllm-router kv_aware)",
        False,
    ),
    (
        "disagg",
        "router with prefill + decode instances vs one colocated server, same serving workload",
        False,
    ),
    ("plot", "latency CDFs and throughput over time of bench serve runs (--json files)", False),
]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineArgs()
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="a Hugging Face directory, a .gguf file, or a Hub id ORG/NAME[@REVISION] "
        "(ORG/NAME:QUANT: the repo's GGUF file with QUANT in its name), fetched through "
        "huggingface_hub's cache (default: bundled SmolLM2-135M)",
    )
    g.add_argument(
        "--gguf-file",
        default=None,
        metavar="FILE",
        help="the .gguf file to load from a GGUF repo (or a directory) given as --model",
    )
    g.add_argument(
        "--dtype",
        default=d.dtype,
        help="auto | bfloat16 | float16 | float32 (auto: bf16 on CUDA and AMX CPUs, "
        "fp32 without bf16 instructions; on AVX512-BF16 CPUs without AMX, fp32 "
        "weights with a bf16 KV cache where bf16 matmuls measure slower)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default=d.kv_cache_dtype,
        help="auto (the model's dtype) | bfloat16: with fp32 weights on the CPU, "
        "a bf16 KV cache (half the bytes per cached token) | fp8 (fp8_e4m3): "
        "K/V rounded to e4m3, one byte per value (docs/models.md)",
    )
    g.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int4"],
        help="auto (CPU): a GGUF's quantized matrices run as the file stores them (4-bit "
        "ones on the 4-bit kernel, Q5/Q6/Q8 ones on the int8 one), for steps of at most a "
        "few rows, a limit timed at start; other checkpoints, and --deterministic: none | "
        "none: every weight dequantized to --dtype | int4 (CPU): linear layers also keep "
        "4-bit weights (groups of 32: a GGUF Q4_* file's own codes, else re-rounded) "
        "(docs/models.md)",
    )
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="GiB for the KV cache on CPU (default 2)",
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="exact KV pool size in blocks (overrides the memory budget)",
    )
    g.add_argument(
        "--num-sliding-kv-blocks",
        type=int,
        default=None,
        help="exact size in blocks of the sliding-window layers' own KV pool (Gemma 2/3; "
        "default: what max-num-seqs windows can hold at once, docs/models.md)",
    )
    g.add_argument(
        "--disable-hybrid-kv-cache-manager",
        action="store_true",
        help="keep the sliding-window layers' KV in the one pool, whole context (as vLLM's "
        "flag: no blocks are freed as windows slide)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="the per-step token budget (default 2048; pagoda serve on the CPU: "
        "chosen from a prefill step timed at start, docs/server.md)",
    )
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument(
        "--short-prefill-tokens",
        type=int,
        default=None,
        help="prefills with at most this many tokens left to compute (a prefix-cache hit, a "
        "short turn) go before longer ones, and a prompt a cut would leave that short a tail "
        "of runs whole, up to this many tokens past the budget (default: a quarter of the "
        "budget; 0: arrival order, the budget a hard limit; docs/server.md)",
    )
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        default=d.scheduling_policy,
        help="fcfs: arrival order; priority: requests' priority field first (lower is "
        "sooner), then arrival, and a waiting request may preempt running ones of lower "
        "priority when the KV cache is full",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template to use instead of the model's (a file, or the text)",
    )
    g.add_argument(
        "--load-format",
        default=d.load_format,
        choices=["auto", "dummy"],
        help="dummy: random weights of the model's shapes, no checkpoint files",
    )
    g.add_argument(
        "--model-preset",
        default=None,
        help="built-in shapes for --load-format dummy: qwen3-0.6b, llama-3.2-1b, "
        "llama-3.1-8b (and tiny-qwen3, tiny-llama for tests)",
    )
    kv = parser.add_argument_group("disaggregated prefill")
    kv.add_argument(
        "--kv-role",
        default=d.kv_role,
        choices=["both", "prefill", "decode"],
        help="both: colocated (default); prefill / decode: one half of a pair "
        "behind `pagoda router`, KV moved by NIXL",
    )
    kv.add_argument(
        "--kv-secret",
        default=None,
        help="shared secret of the KV side channel (default $PAGODA_KV_SECRET)",
    )
    kv.add_argument(
        "--kv-lease-seconds",
        type=float,
        default=d.kv_lease_seconds,
        help="prefill: how long a finished request's KV waits to be pulled",
    )
    kv.add_argument(
        "--kv-load-failure",
        default=d.kv_load_failure,
        choices=["recompute", "fail"],
        help="decode: compute the prompt here, or fail the request, when a pull fails",
    )
    kv.add_argument("--kv-transfer-timeout", type=float, default=d.kv_transfer_timeout)
    kv.add_argument(
        "--kv-host", default=d.kv_host, help="the KV side channel's address (default 127.0.0.1)"
    )
    kv.add_argument("--kv-port", type=int, default=d.kv_port, help="0: any free port")
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of replaying CUDA graphs",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant execution: a request's tokens do not depend on what else is in "
        "the batch, chunking, prefix hits or speculation (CPU; also VLLM_BATCH_INVARIANT=1; "
        "docs/deterministic.md)",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule and launch the next step while the device runs this one "
        "(default: on for CUDA, off for the CPU, where nothing overlaps)",
    )
    g.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="speculative decoding without a draft model, vLLM's keys: '{\"method\": "
        '"ngram", "num_speculative_tokens": 4}\' or \'{"method": "suffix"}\' '
        "(docs/speculative_decoding.md; off by default)",
    )
    add_pooling_args(parser)


def add_pooling_args(parser: argparse.ArgumentParser) -> None:
    """Pooling models (embeddings, classification, scores; vLLM's flags, docs/models.md)."""
    d = EngineArgs()
    g = parser.add_argument_group("pooling models (embeddings, rerankers; docs/models.md)")
    g.add_argument(
        "--runner",
        default=d.runner,
        choices=["auto", "generate", "pooling"],
        help="pooling: serve embeddings / scores instead of text; auto: pooling for "
        "*Model, *EmbeddingModel and *ForSequenceClassification architectures and for "
        "encoders (BERT, RoBERTa, XLM-R), else generate",
    )
    g.add_argument(
        "--convert",
        default=d.convert,
        choices=["auto", "embed", "classify", "none"],
        help="what a decoder checkpoint is served as under --runner pooling: embed (its "
        "last hidden states pooled), classify (a classifier head, or "
        "classifier_from_token in --hf-overrides)",
    )
    g.add_argument(
        "--pooler-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='vLLM\'s pooler keys over the checkpoint\'s: \'{"pooling_type": "MEAN", '
        '"normalize": true, "dimensions": 256, "use_activation": true}\'',
    )
    g.add_argument(
        "--hf-overrides",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="keys over the checkpoint's config.json, as vLLM's; a Qwen3-Reranker: "
        '\'{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": '
        '["no", "yes"], "is_original_qwen3_reranker": true}\'',
    )


def add_kv_events_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KV cache events (for KV-aware routers, docs/routing.md)")
    g.add_argument(
        "--kv-events-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='vLLM\'s KVEventsConfig: \'{"enable_kv_cache_events": true, "endpoint": '
        '"tcp://127.0.0.1:5557", "replay_endpoint": ..., "topic": ...}\'',
    )
    g.add_argument(
        "--kv-events-endpoint",
        default=None,
        metavar="ADDRESS",
        help="publish KV cache events on this ZeroMQ address (e.g. tcp://127.0.0.1:5557)",
    )
    g.add_argument("--kv-events-replay-endpoint", default=None, metavar="ADDRESS")
    g.add_argument("--kv-events-topic", default=None)
    g.add_argument("--kv-events-buffer-steps", type=int, default=None)


KV_EVENTS_FLAGS = {
    "kv_events_endpoint": "endpoint",
    "kv_events_replay_endpoint": "replay_endpoint",
    "kv_events_topic": "topic",
    "kv_events_buffer_steps": "buffer_steps",
}


def _kv_events_config(ns: argparse.Namespace) -> Optional[dict]:
    """``--kv-events-config`` with the shorthand flags on top (any of them turns events on)."""
    config = dict(getattr(ns, "kv_events_config", None) or {})
    shorthand = {
        key: getattr(ns, flag)
        for flag, key in KV_EVENTS_FLAGS.items()
        if getattr(ns, flag, None) is not None
    }
    if shorthand:
        config.update(shorthand, enable_kv_cache_events=True)
    return config or None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    names = {f.name for f in fields(EngineArgs)}
    args = {k: v for k, v in vars(ns).items() if k in names}
    if "kv_events_config" in args:
        args["kv_events_config"] = _kv_events_config(ns)
    return EngineArgs(**args)


def cmd_generate(ns: argparse.Namespace) -> int:
    from pagoda.entrypoints.llm import LLM
    from pagoda.sampling import SamplingParams

    args = engine_args_from(ns)
    llm = LLM(**vars(args))
    params = SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        seed=ns.sample_seed,
    )
    start = time.perf_counter()
    if ns.chat:
        out = llm.chat([{"role": "user", "content": ns.prompt}], params)[0]
    else:
        out = llm.generate(ns.prompt, params)[0]
    elapsed = time.perf_counter() - start
    print(out.text)
    n = len(out.token_ids)
    ttft = out.time_to_first_token
    ttft_text = f"{ttft:.3f} s" if ttft is not None else "-"
    detail = f" ({out.outputs[0].finish_detail})" if out.outputs[0].finish_detail else ""
    print(
        f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, finish_reason="
        f"{out.finish_reason}{detail}, ttft={ttft_text}]",
        file=sys.stderr,
    )
    return 0


def _positional_model(ns: argparse.Namespace) -> None:
    """``pagoda serve MODEL`` (as ``vllm serve MODEL``) is ``--model MODEL``."""
    tag = getattr(ns, "model_tag", None)
    if tag is not None and ns.model not in (None, tag):
        raise ValueError(f"two models: {tag!r} and --model {ns.model!r}")
    ns.model = ns.model or tag


def _lora_implied(ns: argparse.Namespace) -> None:
    """``--lora-modules`` turns on ``--enable-lora`` (vLLM refuses it without)."""
    if getattr(ns, "lora_modules", None) and not ns.enable_lora:
        logging.getLogger("pagoda.serve").info("--lora-modules given: LoRA is on")
        ns.enable_lora = True


def cmd_serve(ns: argparse.Namespace) -> int:
    _positional_model(ns)
    _lora_implied(ns)
    if ns.data_parallel_size > 1:
        from pagoda.entrypoints import data_parallel

        serve_argv = ns.raw_argv[ns.raw_argv.index("serve") + 1 :]
        return data_parallel.run(ns, serve_argv)
    from pagoda.entrypoints.openai.api_server import run_server

    return run_server(ns, engine_args_from(ns))


def add_router_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill",
        nargs="*",
        default=[],
        metavar="URL",
        help="prefill instances (pagoda serve --kv-role prefill)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        default=[],
        metavar="URL",
        help="decode instances (pagoda serve --kv-role decode)",
    )
    parser.add_argument(
        "--replicas",
        nargs="+",
        default=[],
        metavar="URL",
        help="instances that run whole requests (pagoda serve), without prefill instances",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--policy",
        choices=["least_outstanding", "round_robin", "cache_aware"],
        default="least_outstanding",
        help="cache_aware: where the prompt's prefix is cached, weighed against load "
        "(docs/routing.md); among prefill instances when there are some",
    )
    parser.add_argument(
        "--kv-events",
        action="append",
        default=[],
        metavar="URL=ENDPOINT",
        help="cache_aware: an instance's KV event endpoint (pagoda serve "
        "--kv-events-endpoint), for the precise index; repeat per instance",
    )
    parser.add_argument("--kv-events-replay", action="append", default=[], metavar="URL=ENDPOINT")
    parser.add_argument(
        "--cache-load-weight",
        type=float,
        default=0.25,
        help="cache_aware: the weight of an instance's outstanding requests against its "
        "cached prefix (0: always the best prefix)",
    )
    parser.add_argument(
        "--cache-index-size",
        type=int,
        default=200_000,
        help="cache_aware without events: chunks of routed text remembered per instance",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="MODEL",
        help="cache_aware with --kv-events: the instances' model (GGUF file or HF directory), "
        "to tokenize prompts in the router instead of asking an instance's /tokenize "
        "(checked against the instances first)",
    )
    parser.add_argument(
        "--chat-template", default=None, help="with --tokenizer: the instances' --chat-template"
    )
    parser.add_argument("--health-interval", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument(
        "--api-key", default=None, help="sent to the instances when the client sends none"
    )


def _router_main(ns: argparse.Namespace) -> int:
    from pagoda.entrypoints.router.app import main as router_main

    return router_main(ns)


def build_parser(bench_name: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; ``bench_name`` is the one ``pagoda bench`` module whose options are
    added (the others are only listed, so no other command imports the benchmarks)."""
    parser = argparse.ArgumentParser(prog="pagoda", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, help_text, takes_engine_args in BENCHES:
        cmd = bench_sub.add_parser(name, help=help_text)
        if name == bench_name:  # only the bench that runs is imported
            module = importlib.import_module(f"pagoda.bench.{name}")
            module.add_args(cmd)
            if takes_engine_args:
                add_engine_args(cmd)
            cmd.set_defaults(func=module.main)

    from pagoda.entrypoints.openai.args import add_lora_args, add_server_args

    srv = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    srv.add_argument(
        "model_tag", nargs="?", default=None, metavar="MODEL", help="the same as --model MODEL"
    )
    add_server_args(srv)
    add_engine_args(srv)
    add_lora_args(srv)
    add_kv_events_args(srv)
    srv.set_defaults(func=cmd_serve)

    rt = sub.add_parser("router", help="one endpoint in front of prefill and decode instances")
    add_router_args(rt)
    rt.set_defaults(func=_router_main)
    return parser


def bench_named(argv: Sequence[str]) -> Optional[str]:
    """NAME in ``pagoda [--log-level L] bench NAME ...`` (None for any other command)."""
    words = [
        w
        for i, w in enumerate(argv)
        if not w.startswith("-") and argv[i - 1 : i] != ["--log-level"]
    ]
    return words[1] if len(words) > 1 and words[0] == "bench" else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(bench_named(argv))
    ns = parser.parse_args(argv)
    ns.raw_argv = argv  # pagoda serve --data-parallel-size hands its own to the replicas
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagoda: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
