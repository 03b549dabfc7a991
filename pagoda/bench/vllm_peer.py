"""vLLM's CPU backend as a benchmark peer (``pagoda bench throughput --compare vllm``).

vLLM runs in a virtualenv of its own (``bash scripts/peers/vllm_cpu.sh`` builds ``.venv-vllm``),
in a child process that lives as long as the benchmark: ``vllm_runner.py``, run by path
through the venv's ``bin/vllm-env`` (TCMalloc and Intel OpenMP preloaded). The parent writes
the workload to a JSON file; the child builds ``vllm.LLM`` once, warms up, and then runs the
whole workload each time it is asked (a JSON line each way), so that rounds of pagoda (in
this process) and vLLM can alternate without reloading either engine.

vLLM needs a Hugging Face directory; a GGUF (pagoda's bundled model is one) is converted once
with transformers, dequantized to the engine's dtype, and cached under
``~/.cache/pagoda/hf-from-gguf/`` (``$PAGODA_CACHE_DIR`` moves it).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pagoda import envs

SETUP_COMMAND = "bash scripts/peers/vllm_cpu.sh"
RUNNER = Path(__file__).resolve().with_name("vllm_runner.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = ".venv-vllm"
READY_TIMEOUT_S = 3600.0  # the first start compiles the model for minutes
ROUND_TIMEOUT_S = 3600.0
CONVERTED_MARK = "pagoda-converted.json"
LOG_TAIL_CHARS = 3000
# The child's model is a local directory and nothing may phone home from a benchmark.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class VllmPeerError(RuntimeError):
    """The vLLM peer is missing, failed to start, or failed a round."""


# ---------------------------------------------------------------------------------- the venv
def venv_path(venv: Optional[str] = None) -> Path:
    """``venv``, else ``$VLLM_VENV``, else ``.venv-vllm``; relative ones from the checkout's
    root, as ``scripts/peers/vllm_cpu.sh`` reads them."""
    path = Path(venv or envs.VLLM_VENV() or DEFAULT_VENV).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def peer_command(venv: Path) -> list[str]:
    """The command that runs the runner in the venv; FileNotFoundError if it is missing."""
    env_script, python = venv / "bin" / "vllm-env", venv / "bin" / "python"
    if not (os.access(env_script, os.X_OK) and os.access(python, os.X_OK)):
        raise FileNotFoundError(
            f"no vLLM CPU peer venv at {venv} (no bin/vllm-env): run "
            f"`{SETUP_COMMAND}` from the repository root first"
        )
    return [str(env_script), str(python), str(RUNNER)]


# --------------------------------------------------------------------------------- the model
def pagoda_cache() -> Path:
    return envs.CACHE_DIR()


def cache_root() -> Path:
    return pagoda_cache() / "hf-from-gguf"


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hf_model_dir(model_path: str, dtype: torch.dtype) -> str:
    """A Hugging Face directory vLLM can load: ``model_path`` itself if it is one, else the
    cached conversion of the GGUF file (made now if absent)."""
    if os.path.isdir(model_path):
        return model_path
    if not model_path.endswith(".gguf"):
        raise ValueError(
            f"vLLM peer: expected a model directory or a .gguf file, got {model_path!r}"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / f"{file_digest(model_path)[:16]}-{dtype_name}"
    if not (target / CONVERTED_MARK).is_file():
        convert_gguf(model_path, target, dtype)
    return str(target)


def convert_gguf(gguf_path: str, target: Path, dtype: torch.dtype) -> None:
    """Dequantize a GGUF with transformers and save it (safetensors + config + tokenizer) at
    ``target``, written beside it first and renamed into place."""
    from transformers import AutoTokenizer

    from pagoda.bench.common import load_hf_model

    directory, name = os.path.split(os.path.abspath(gguf_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    staging.chmod(0o755)
    try:
        model = load_hf_model(gguf_path, dtype)
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(staging)
        mark = {"source": os.path.abspath(gguf_path), "dtype": str(dtype)}
        (staging / CONVERTED_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------- the child
LoRASpec = tuple[str, int, str]  # an adapter as vLLM's LoRARequest takes it: name, id, path


@dataclass(frozen=True)
class VllmRound:
    """One timed run of the workload in the child."""

    elapsed_s: float
    output_token_counts: list[int]
    first_token_ids: list[list[int]]


@dataclass(frozen=True)
class VllmOptions:
    """What the child's ``vllm.LLM`` gets (the engine's settings, mirrored from pagoda's)."""

    model: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    max_loras: Optional[int] = None  # LoRA on, with this many adapters per batch
    max_lora_rank: int = 16

    def llm_kwargs(self) -> dict:
        lora = (
            {"enable_lora": True, "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank}
            if self.max_loras is not None
            else {}
        )
        return lora | {
            "model": self.model,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
        }


def parse_message(line: str) -> Optional[dict]:
    """A protocol line's JSON object, or None for anything else."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class VllmPeer:
    """The persistent vLLM child: ``start()`` (or ``with``), ``run_round()``, ``close()``."""

    def __init__(
        self,
        options: VllmOptions,
        prompts: Sequence[list[int]],
        output_lens: Sequence[int],
        warmup: dict,
        venv: Optional[str] = None,
    ):
        self.options = options
        self.command = peer_command(venv_path(venv))
        self.workdir = Path(tempfile.mkdtemp(prefix="pagoda-vllm-"))
        self.log_path = pagoda_cache() / "vllm-peer.log"  # the last run's, kept
        self.job = {
            "llm": options.llm_kwargs(),
            "prompts": [list(p) for p in prompts],
            "output_lens": [int(n) for n in output_lens],
            "warmup": warmup,
        }
        self.proc: Optional[subprocess.Popen] = None
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        self.ready: dict = {}

    def __enter__(self) -> "VllmPeer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> dict:
        """Launch the child and wait until it has loaded and warmed up; its "ready" message."""
        job_path = self.workdir / "job.json"
        job_path.write_text(json.dumps(self.job))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.command + [str(job_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
            cwd=self.workdir,
            env={**os.environ, **CHILD_ENV},
        )
        log.close()
        threading.Thread(target=self._read_lines, daemon=True).start()
        self.ready = self._receive("ready", READY_TIMEOUT_S)
        return self.ready

    def run_round(self, loras: Optional[Sequence[Optional[LoRASpec]]] = None) -> VllmRound:
        """One timed run of the whole workload in the child; ``loras``: each request's
        adapter (name, id, path) or None, when the child runs with LoRA on."""
        self._send({"cmd": "run", "loras": list(loras) if loras is not None else None})
        reply = self._receive("result", ROUND_TIMEOUT_S)
        return VllmRound(
            float(reply["elapsed_s"]),
            list(reply["output_token_counts"]),
            [list(ids) for ids in reply["first_token_ids"]],
        )

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    self._send_to(proc, {"cmd": "quit"})
                    proc.wait(timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _read_lines(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the child closed its stdout: it has exited

    def _send(self, message: dict) -> None:
        if self.proc is None:
            raise VllmPeerError("the vLLM peer is not running")
        try:
            self._send_to(self.proc, message)
        except OSError as e:  # a broken pipe: the child has gone
            raise VllmPeerError(
                f"vLLM peer: cannot send {message}: {e}" + self._log_tail()
            ) from None

    @staticmethod
    def _send_to(proc: subprocess.Popen, message: dict) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()

    def _receive(self, event: str, timeout: float) -> dict:
        """The child's next message, which must be ``event``; VllmPeerError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise VllmPeerError(
                    f"vLLM peer: no {event!r} after {timeout:.0f} s" + self._log_tail()
                ) from None
            if line is None:
                code = self.proc.wait() if self.proc is not None else None
                raise VllmPeerError(
                    f"vLLM peer exited (status {code}) before {event!r}" + self._log_tail()
                )
            reply = parse_message(line)
            if reply is None:
                continue  # not the protocol's (nothing else should write there)
            if reply.get("event") != event:
                raise VllmPeerError(f"vLLM peer: {reply.get('message', reply)}" + self._log_tail())
            return reply

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n{text[-LOG_TAIL_CHARS:]}"
