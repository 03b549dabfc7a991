"""``pagoda bench embed``: embeddings (``--task embed``) and reranking (``--task rerank``)
through pagoda against Sentence Transformers, on the same files and dtype, same threads.

The workload is texts of mixed token lengths (uniform in ``--min-tokens``..``--max-tokens``,
seeded); with ``--task rerank``, one query and ``--num-texts`` documents, every (query,
document) pair within ``--max-tokens``. A ``--model-preset`` (bert-small, qwen3-0.6b) builds
random weights of that shape with a word-level tokenizer (one word, one token: exact lengths)
into a temporary directory, saved as a Sentence Transformers model (or a cross-encoder), so
both engines read the same checkpoint, tokenizer and pooling config (embed_models.py).

Three runs per round, interleaved for ``--rounds``: pagoda offline (``LLM.embed`` of every
text in one call, or ``LLM.score``), pagoda's server (``pagoda serve --runner pooling``, a
child process; ``/v1/embeddings`` in batches of ``--client-batch`` with ``--concurrency``
requests in flight, base64 as the openai client asks; or one ``/v1/rerank`` of every
document), and Sentence Transformers (``encode`` or ``CrossEncoder.predict``, batch size
``--st-batch-size``, 32 as users get it). Printed per run: texts/s, tokens/s (real tokens),
the fraction of the matmul limit (FLOPs of the real tokens, no padding, against
``measure_limits``), and Sentence Transformers' padded / real tokens; then the median ratios
pagoda / Sentence Transformers.

Invariant: a run's numbers are reported only when its vectors match Sentence Transformers'
(cosine per text, or scores within a tolerance, by dtype); a mismatch fails the command.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from pagoda.bench import embed_models, flops
from pagoda.bench.common import (
    dtype_name,
    machine_info,
    measure_limits,
    print_limits,
    print_machine,
    row,
    token_id_range,
    write_json,
)

# Cosine per text (embed) and |score difference| (rerank) that pass, by the engine's dtype:
# fp32 everywhere (weights and KV) or not.
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.999}
SCORE_ATOL = {"fp32": 1e-4, "bf16": 3e-2}
WARMUP_TEXTS = 4
RUNS = ("sentence_transformers", "pagoda_offline", "pagoda_server")  # a round's order
PAGODA_RUNS = RUNS[1:]


class MismatchError(RuntimeError):
    """pagoda's output differs from Sentence Transformers' beyond the tolerance."""


@dataclass(frozen=True)
class Setup:
    """What one invocation measures: the model's directory, its texts, how it pools."""

    model_path: str
    texts: list[str]  # the documents, for rerank
    query: Optional[str]
    decoder: bool
    preset: Optional[str]

    @property
    def rerank(self) -> bool:
        return self.query is not None


@dataclass
class RunResult:
    """One timed run: seconds, the outputs ((N, D) vectors or (N,) scores), real tokens, and
    for Sentence Transformers the tokens its padded batches computed."""

    elapsed_s: float
    outputs: torch.Tensor
    real_tokens: int
    padded_tokens: Optional[int] = None


Runner = Callable[[Setup], RunResult]


# ---------------------------------------------------------------------------------- arguments
def add_args(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own arguments (the CLI adds the engine's: --model, --model-preset,
    --dtype, --max-num-batched-tokens, ...)."""
    g = parser.add_argument_group("workload")
    g.add_argument("--task", choices=["embed", "rerank"], default="embed")
    g.add_argument(
        "--num-texts",
        type=int,
        default=None,
        help="texts (rerank: documents); default 2000 for bert-small, 16 for qwen3-0.6b "
        "(minutes on 2 cores), 100 documents for rerank",
    )
    g.add_argument("--min-tokens", type=int, default=16)
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--query-tokens", type=int, default=16, help="rerank: the query's words")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three runs")
    g.add_argument("--client-batch", type=int, default=32, help="texts per /v1/embeddings call")
    g.add_argument("--concurrency", type=int, default=4, help="server requests in flight")
    g.add_argument("--st-batch-size", type=int, default=32)
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--no-server", dest="server", action="store_false", help="skip the server")
    g.add_argument("--json", default=None, metavar="PATH", help="write every number here")


def _check_args(ns: argparse.Namespace) -> None:
    for name in ("rounds", "client_batch", "concurrency", "st_batch_size", "min_tokens"):
        if getattr(ns, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    if ns.num_texts is not None and ns.num_texts < 1:
        raise ValueError(f"--num-texts must be >= 1, got {ns.num_texts}")
    if ns.max_tokens < ns.min_tokens:
        raise ValueError(f"--max-tokens ({ns.max_tokens}) < --min-tokens ({ns.min_tokens})")
    if ns.model_preset is None and ns.model is None:
        raise ValueError("give --model PATH or --model-preset (bert-small, qwen3-0.6b)")
    if ns.model_preset is not None and ns.model_preset not in embed_models.PRESETS:
        raise ValueError(
            f"--model-preset {ns.model_preset!r}: pagoda bench embed builds "
            f"{sorted(embed_models.PRESETS)}"
        )


# ----------------------------------------------------------------------------------- workload
def prepare(ns: argparse.Namespace, dtype: torch.dtype, tmp: str) -> Setup:
    """The model directory (built from the preset, or ``--model``) and its texts."""
    if ns.model_preset is None:
        return _given_model(ns)
    preset = embed_models.PRESETS[ns.model_preset]
    num = ns.num_texts or (100 if ns.task == "rerank" else preset.default_num_texts)
    path = os.path.join(tmp, ns.model_preset)
    hi = min(ns.max_tokens, preset.config["max_position_embeddings"])
    if ns.task == "rerank":
        embed_models.save_cross_encoder(path, preset, dtype, ns.data_seed)
        q = ns.query_tokens
        lo = ns.min_tokens + q + embed_models.num_special_tokens(preset, pair=True)
        lengths = embed_models.token_lengths(num, lo, max(lo, hi), ns.data_seed)
        docs = embed_models.preset_texts(preset, lengths, ns.data_seed, pair_with=q)
        query = embed_models.word_texts(
            preset.config["vocab_size"], preset.specials, [q], ns.data_seed + 1
        )[0]
        return Setup(path, docs, query, False, ns.model_preset)
    embed_models.save_sentence_transformer(path, preset, dtype, ns.data_seed)
    lengths = embed_models.token_lengths(num, min(ns.min_tokens, hi), hi, ns.data_seed)
    texts = embed_models.preset_texts(preset, lengths, ns.data_seed)
    return Setup(path, texts, None, preset.is_decoder, ns.model_preset)


def _given_model(ns: argparse.Namespace) -> Setup:
    """``--model PATH``: texts of random token ids decoded by its tokenizer (lengths near the
    drawn ones; the real counts are what is reported)."""
    import json

    from transformers import AutoTokenizer

    from pagoda.bench.common import hf_model_path

    path = hf_model_path(ns.model)
    tok = AutoTokenizer.from_pretrained(path)
    num = ns.num_texts or (100 if ns.task == "rerank" else 2000)
    lengths = embed_models.token_lengths(num, ns.min_tokens, ns.max_tokens, ns.data_seed)
    special = tok.num_special_tokens_to_add(pair=ns.task == "rerank")
    if ns.task == "rerank":
        special += ns.query_tokens
    texts = decoded_texts(tok, [max(1, n - special) for n in lengths], ns.data_seed)
    query = decoded_texts(tok, [ns.query_tokens], ns.data_seed + 1)[0]
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type", "")
    decoder = model_type not in ("bert", "roberta", "xlm-roberta")
    return Setup(path, texts, query if ns.task == "rerank" else None, decoder, None)


def decoded_texts(tok: Any, num_tokens: Sequence[int], seed: int) -> list[str]:
    """Random non-special token ids, ``num_tokens[i]`` of them, decoded to text."""
    import random

    rng = random.Random(seed)
    lo, hi = token_id_range(len(tok))
    return [
        tok.decode([rng.randrange(lo, hi) for _ in range(n)], skip_special_tokens=True)
        for n in num_tokens
    ]


# ------------------------------------------------------------------------------------- checks
def tolerance_kind(dtype: torch.dtype, kv_dtype: Optional[torch.dtype]) -> str:
    """ "fp32" only when weights and KV cache are both fp32."""
    fp32 = dtype == torch.float32 and kv_dtype in (None, torch.float32)
    return "fp32" if fp32 else "bf16"


def check_vectors(ours: torch.Tensor, ref: torch.Tensor, min_cosine: float, label: str) -> float:
    """The smallest per-text cosine of ``ours`` against ``ref``; MismatchError below
    ``min_cosine``, naming the text."""
    if ours.shape != ref.shape:
        raise MismatchError(f"{label}: vectors of shape {tuple(ours.shape)}, expected "
                            f"{tuple(ref.shape)}")  # fmt: skip
    cos = F.cosine_similarity(ours.float(), ref.float(), dim=-1)
    worst = int(cos.argmin())
    if cos[worst] < min_cosine:
        raise MismatchError(
            f"{label}: text {worst}'s vector has cosine {cos[worst].item():.6f} with "
            f"Sentence Transformers' (at least {min_cosine} needed)"
        )
    return cos[worst].item()


def check_scores(ours: torch.Tensor, ref: torch.Tensor, atol: float, label: str) -> float:
    """The largest |score difference|; MismatchError beyond ``atol``, naming the document."""
    if ours.shape != ref.shape:
        raise MismatchError(f"{label}: {tuple(ours.shape)} scores, expected {tuple(ref.shape)}")
    diff = (ours.float() - ref.float()).abs()
    worst = int(diff.argmax())
    if diff[worst] > atol:
        raise MismatchError(
            f"{label}: document {worst}'s score {ours[worst].item():.5f} differs from "
            f"Sentence Transformers' {ref[worst].item():.5f} by more than {atol}"
        )
    return diff[worst].item()


def max_cross_cosine(ref: torch.Tensor) -> float:
    """The closest two different texts' reference vectors: how wrong a vector may be and
    still pass (a check is only as sharp as this is below the threshold)."""
    if len(ref) < 2:
        return float("nan")
    unit = F.normalize(ref.float(), dim=-1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-1.0)
    return sims.max().item()


def check_run(setup: Setup, run: RunResult, ref: torch.Tensor, kind: str, label: str) -> float:
    if setup.rerank:
        return check_scores(run.outputs, ref, SCORE_ATOL[kind], label)
    return check_vectors(run.outputs, ref, MIN_COSINE[kind], label)


# -------------------------------------------------------------------------------- the runners
def pagoda_offline(llm: Any) -> Runner:
    def run(setup: Setup) -> RunResult:
        start = time.perf_counter()
        if setup.rerank:
            outs = llm.score(setup.query, setup.texts, use_tqdm=False)
            values = torch.tensor([o.outputs.score for o in outs])
        else:
            outs = llm.embed(setup.texts, use_tqdm=False)
            values = torch.tensor([o.outputs.embedding for o in outs])
        elapsed = time.perf_counter() - start
        return RunResult(elapsed, values, sum(len(o.prompt_token_ids) for o in outs))

    return run


def pagoda_server(url: str, client_batch: int, concurrency: int) -> Runner:
    def run(setup: Setup) -> RunResult:
        start = time.perf_counter()
        if setup.rerank:
            assert setup.query is not None
            values, tokens = _rerank(url, setup.query, setup.texts)
        else:
            values, tokens = asyncio.run(_embed(url, setup.texts, client_batch, concurrency))
        return RunResult(time.perf_counter() - start, values, tokens)

    return run


async def _embed(
    url: str, texts: list[str], client_batch: int, concurrency: int
) -> tuple[torch.Tensor, int]:
    """Every text through ``/v1/embeddings``, ``concurrency`` batches in flight."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    batches = [texts[i : i + client_batch] for i in range(0, len(texts), client_batch)]

    async def one(client: httpx.AsyncClient, batch: list[str]) -> tuple[torch.Tensor, int]:
        async with gate:
            r = await client.post(
                "/v1/embeddings", json={"input": batch, "encoding_format": "base64"}
            )
        r.raise_for_status()
        body = r.json()
        rows = sorted(body["data"], key=lambda d: d["index"])
        vecs = torch.stack([_from_base64(d["embedding"]) for d in rows])
        return vecs, body["usage"]["prompt_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        parts = await asyncio.gather(*(one(client, b) for b in batches))
    return torch.cat([v for v, _ in parts]), sum(n for _, n in parts)


def _from_base64(text: str) -> torch.Tensor:
    """The little-endian float32 bytes OpenAI's base64 embeddings hold."""
    raw = bytearray(base64.b64decode(text))
    return torch.frombuffer(raw, dtype=torch.float32)


def _rerank(url: str, query: str, docs: list[str]) -> tuple[torch.Tensor, int]:
    """One ``/v1/rerank`` of every document; scores back in document order."""
    import httpx

    r = httpx.post(url + "/v1/rerank", json={"query": query, "documents": docs}, timeout=None)
    r.raise_for_status()
    body = r.json()
    scores = torch.empty(len(docs))
    for item in body["results"]:
        scores[item["index"]] = item["relevance_score"]
    usage = body.get("usage") or {}
    return scores, int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)


class PaddingCounter:
    """Counts the tokens the model computed (padded batches) and the real ones, from the
    attention masks of the features reaching Sentence Transformers' first module (its
    Transformer calls the model's ``forward`` directly, past any hook on the model)."""

    def __init__(self, st: Any) -> None:
        self.padded = self.real = 0
        st[0].register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        features = args[0] if args else kwargs.get("features", {})
        mask = features.get("attention_mask")
        if mask is not None:
            self.padded += mask.numel()
            self.real += int(mask.sum())

    def take(self) -> tuple[int, int]:
        counts, self.padded, self.real = (self.padded, self.real), 0, 0
        return counts


def sentence_transformers_run(st: Any, batch_size: int) -> Runner:
    counter = PaddingCounter(st)

    def run(setup: Setup) -> RunResult:
        counter.take()
        start = time.perf_counter()
        if setup.rerank:
            pairs = [(setup.query, d) for d in setup.texts]
            values = torch.as_tensor(st.predict(pairs, batch_size=batch_size))
        else:
            values = st.encode(setup.texts, batch_size=batch_size, convert_to_tensor=True)
        elapsed = time.perf_counter() - start
        padded, real = counter.take()
        return RunResult(elapsed, values.float().cpu(), real, padded)

    return run


# ---------------------------------------------------------------------------------- the engines
def load_sentence_transformers(setup: Setup, dtype: torch.dtype) -> Any:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    cls = CrossEncoder if setup.rerank else SentenceTransformer
    return cls(setup.model_path, device="cpu", model_kwargs={"dtype": dtype})


def pagoda_engine_args(ns: argparse.Namespace, setup: Setup) -> Any:
    """The offline engine's args. Prefix caching is off: every round embeds the same texts,
    and a decoder's last-token pooling would read round 1's prompts from the cache (the
    workload's texts share nothing, so a user embedding new texts gets no hits either)."""
    from pagoda.entrypoints.cli import engine_args_from

    base = engine_args_from(ns)
    convert = "embed" if setup.decoder and not setup.rerank else base.convert
    return dataclasses.replace(
        base, model=setup.model_path, model_preset=None, load_format="auto",
        runner="pooling", convert=convert, enable_prefix_caching=False,
    )  # fmt: skip


def server_args(engine_args: Any, ns: argparse.Namespace, port: int, threads: int) -> list[str]:
    """``pagoda serve`` with the offline engine's model, dtype, budget and threads."""
    args = [
        "serve", engine_args.model, "--runner", "pooling", "--convert", engine_args.convert,
        "--dtype", ns.dtype, "--port", str(port), "--num-threads", str(threads),
        "--max-num-batched-tokens", str(engine_args.token_budget),
        "--max-num-seqs", str(engine_args.max_num_seqs), "--no-prefix-caching",
    ]  # fmt: skip
    if engine_args.kv_cache_memory is not None:
        args += ["--kv-cache-memory", str(engine_args.kv_cache_memory)]
    return args


# ------------------------------------------------------------------------------------ numbers
def run_numbers(run: RunResult, lens: Sequence[int], run_flops: int, limit: float) -> dict:
    """Rates of one run: texts and real tokens (pagoda's count of the workload, the same for
    every run; ``counted_tokens`` is what the run itself reported) per second."""
    r = {
        "elapsed_s": run.elapsed_s,
        "texts_per_s": len(lens) / run.elapsed_s,
        "tokens_per_s": sum(lens) / run.elapsed_s,
        "counted_tokens": run.real_tokens,
        "flops": run_flops,
        "fraction_of_limit": run_flops / run.elapsed_s / limit,
    }
    if run.padded_tokens is not None:
        r["padded_tokens"] = run.padded_tokens
        r["padding_overhead"] = run.padded_tokens / max(1, run.real_tokens)
    return r


def workload_flops(shape: flops.ModelShape, lens: Sequence[int], decoder: bool) -> int:
    return sum(flops.pooling_flops(shape, n, bidirectional=not decoder) for n in lens)


def summarize(rounds: dict[str, list[dict]]) -> dict:
    """Medians of each run's texts/s and the ratios pagoda / Sentence Transformers."""
    med = {k: statistics.median(r["texts_per_s"] for r in v) for k, v in rounds.items() if v}
    st = med["sentence_transformers"]
    out: dict[str, Any] = {f"{k}_median_texts_per_s": v for k, v in med.items()}
    for k in PAGODA_RUNS:
        if k in med:
            out[f"{k}_over_st"] = med[k] / st
    return out


def print_run(label: str, r: dict) -> None:
    text = (
        f"{r['texts_per_s']:.1f} texts/s, {r['tokens_per_s']:.0f} tok/s, "
        f"{100 * r['fraction_of_limit']:.1f} % of limit"
    )
    if "padding_overhead" in r:
        text += f", padded/real {r['padding_overhead']:.2f}"
    print(row(label, text))


def print_summary(s: dict) -> None:
    print("== medians (texts/s) ==")
    for k in RUNS:
        if f"{k}_median_texts_per_s" in s:
            print(row(k.replace("_", " "), s[f"{k}_median_texts_per_s"]))
    for k in PAGODA_RUNS:
        if f"{k}_over_st" in s:
            print(row(f"{k.split('_')[1]} / ST", f"{s[f'{k}_over_st']:.2f}x"))


# --------------------------------------------------------------------------------------- main
def main(ns: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    from pagoda.models.loader import resolve_dtype

    _check_args(ns)
    dtype = resolve_dtype(ns.dtype, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-embed-") as tmp:
        setup = prepare(ns, dtype, tmp)
        try:
            report = measure(ns, setup, Path(tmp))
        except MismatchError as e:
            print(f"pagoda: error: {e}", file=sys.stderr)
            return 1
    if ns.json:
        write_json(ns.json, report)
        print(row("json", ns.json))
    return 0


def measure(ns: argparse.Namespace, setup: Setup, tmp: Path) -> dict:
    """Load the three engines, check pagoda against Sentence Transformers, time the rounds."""
    from pagoda.bench.procs import Procs, wait_healthy
    from pagoda.entrypoints.llm import LLM
    from pagoda.utils import free_port

    engine_args = pagoda_engine_args(ns, setup)
    llm = LLM(**vars(engine_args))
    engine = llm.engine
    dtype, threads = engine.dtype, torch.get_num_threads()
    st = load_sentence_transformers(setup, dtype)
    machine = machine_info()
    print_machine(machine)
    limits = measure_limits(engine.arch, engine_args, dtype)
    print_limits(limits, dtype)
    limit = limits[dtype_name(dtype)]["best_flops_per_s"]
    runners: dict[str, Runner] = {
        "sentence_transformers": sentence_transformers_run(st, ns.st_batch_size),
        "pagoda_offline": pagoda_offline(llm),
    }
    procs = Procs(tmp)
    try:
        if ns.server:
            port = free_port()
            procs.start("server", server_args(engine_args, ns, port, threads), None)
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, procs)
            runners["pagoda_server"] = pagoda_server(url, ns.client_batch, ns.concurrency)
        return _rounds(ns, setup, engine, runners, limits, limit, machine, engine_args, threads)
    finally:
        procs.stop()


def warm_up(setup: Setup, runners: dict[str, Runner]) -> None:
    """Each runner once on a few texts, untimed: first-call allocations, kernel choices."""
    few = dataclasses.replace(setup, texts=setup.texts[:WARMUP_TEXTS])
    for run in runners.values():
        run(few)


def worse(setup: Setup, a: Optional[float], b: float) -> float:
    """The worse of two check results: the smaller cosine, the larger score difference."""
    if a is None:
        return b
    return max(a, b) if setup.rerank else min(a, b)


def _rounds(
    ns: argparse.Namespace,
    setup: Setup,
    engine: Any,
    runners: dict[str, Runner],
    limits: dict,
    limit: float,
    machine: dict,
    engine_args: Any,
    threads: int,
) -> dict:
    order = [k for k in RUNS if k in runners]
    warm_up(setup, runners)
    kind = tolerance_kind(engine.dtype, getattr(engine, "kv_dtype", None))
    lens = _token_lens(engine, setup)
    run_flops = workload_flops(flops.ModelShape.from_arch(engine.arch), lens, setup.decoder)
    print_workload(ns, setup, lens, engine, kind, threads)
    rounds: dict[str, list[dict]] = {k: [] for k in order}
    checks: dict[str, float] = {}
    ref = torch.empty(0)
    for i in range(ns.rounds):
        print(f"== round {i + 1} ==")
        for k in order:
            run = runners[k](setup)
            if k == "sentence_transformers" and i == 0:
                ref = run.outputs  # what every pagoda run is checked against
            elif k != "sentence_transformers":
                checks[k] = worse(setup, checks.get(k), check_run(setup, run, ref, kind, k))
            rounds[k].append(run_numbers(run, lens, run_flops, limit))
            print_run(k.replace("_", " "), rounds[k][-1])
    print_checks(setup, checks, ref, kind)
    summary = summarize(rounds)
    print_summary(summary)
    return {
        "command": list(sys.argv),
        "machine": machine,
        "task": ns.task,
        "model": setup.model_path if setup.preset is None else None,
        "model_preset": setup.preset,
        "dtype": dtype_name(engine.dtype),
        "threads": threads,
        "engine_args": dataclasses.asdict(engine_args),
        "workload": _workload(ns, setup, lens),
        "matmul": limits,
        "limit_flops_per_s": limit,
        "check": {
            "tolerance": kind,
            "min_cosine" if not setup.rerank else "score_atol": (
                MIN_COSINE[kind] if not setup.rerank else SCORE_ATOL[kind]
            ),
            "worst": checks,
            "max_cross_cosine": None if setup.rerank else max_cross_cosine(ref),
            "passed": True,
        },
        "rounds": rounds,
        "summary": summary,
        "load_average_after": os.getloadavg(),
    }


def _token_lens(engine: Any, setup: Setup) -> list[int]:
    """Each text's (or pair's) real token count, as pagoda tokenizes it."""
    if setup.rerank:
        return [len(engine.encode_pair(setup.query, d)[0]) for d in setup.texts]
    return [len(engine.encode(t)) for t in setup.texts]


def _workload(ns: argparse.Namespace, setup: Setup, lens: list[int]) -> dict:
    return {
        "num_texts": len(setup.texts),
        "min_tokens": ns.min_tokens,
        "max_tokens": ns.max_tokens,
        "query_tokens": ns.query_tokens if setup.rerank else None,
        "data_seed": ns.data_seed,
        "real_tokens": sum(lens),
        "client_batch": ns.client_batch,
        "concurrency": ns.concurrency,
        "st_batch_size": ns.st_batch_size,
    }


def print_workload(
    ns: argparse.Namespace,
    setup: Setup,
    lens: list[int],
    engine: Any,
    kind: str,
    threads: int,
) -> None:
    print("== workload ==")
    what = (
        f"1 query x {len(setup.texts)} documents" if setup.rerank else f"{len(setup.texts)} texts"
    )
    print(row("model", f"{setup.preset or setup.model_path} ({engine.model_name})"))
    print(row("task", f"{ns.task}: {what}"))
    print(row("tokens", f"{sum(lens)} real, {min(lens)}..{max(lens)} per text"))
    print(row("dtype / threads", f"{dtype_name(engine.dtype)} / {threads}"))
    print(row("server", f"batches of {ns.client_batch}, {ns.concurrency} in flight"))
    print(row("Sentence Transformers", f"batch size {ns.st_batch_size}"))
    limit = SCORE_ATOL[kind] if setup.rerank else MIN_COSINE[kind]
    print(row("check", f"every pagoda run against ST's first: {kind} tolerance {limit}"))


def print_checks(setup: Setup, checks: dict[str, float], ref: torch.Tensor, kind: str) -> None:
    print("== pagoda vs Sentence Transformers (every run) ==")
    what = "max |score diff|" if setup.rerank else "min cosine"
    for k, v in checks.items():
        print(row(k.replace("_", " "), f"{what} {v:.6f} ({kind} tolerance)"))
    if not setup.rerank:
        print(row("closest two texts", f"cosine {max_cross_cosine(ref):.4f} (ST's vectors)"))
