"""The vLLM peer of ``pagoda bench throughput --compare vllm``: its child process and JSON-line
protocol, run with a stand-in ``vllm`` package in a stand-in venv (the real one is built by
scripts/peers/vllm_cpu.sh and is not part of the tests), and its errors."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch

from pagoda.bench import vllm_peer
from pagoda.bench.throughput import agreement
from pagoda.bench.vllm_peer import VllmOptions, VllmPeer, VllmPeerError

FAKE_VLLM = '''
__version__ = "0.0-fake"
SHORT = int(__import__("os").environ.get("FAKE_VLLM_SHORT", "0"))


class SamplingParams:
    def __init__(self, temperature, ignore_eos, max_tokens, min_tokens):
        assert temperature == 0.0 and ignore_eos and max_tokens == min_tokens
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, ids):
        self.token_ids, self.finish_reason = ids, "length"


class _Output:
    def __init__(self, ids):
        self.outputs = [_Completion(ids)]


class LLM:
    def __init__(self, **kwargs):
        self.kwargs, self.resets = kwargs, 0

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, inputs, params, use_tqdm=False):
        # Output i of a prompt is its first id + i (the stand-in for greedy decoding).
        return [_Output([p["prompt_token_ids"][0] + i for i in range(s.max_tokens - SHORT)])
                for p, s in zip(inputs, params)]
'''


@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
    """A venv whose bin/vllm-env puts a stand-in vllm package on the path."""
    pkg = tmp_path / "site" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                   "    return {'prompt_token_ids': prompt_token_ids}\n")
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    env = bin_dir / "vllm-env"
    env.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        export PYTHONPATH={tmp_path / "site"}
        exec "$@"
        """))
    python = bin_dir / "python"       # this interpreter, in its own venv (it has torch)
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for script in (env, python):
        script.chmod(0o755)
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "venv")


def options() -> VllmOptions:
    return VllmOptions(model="unused", dtype="float32", max_model_len=256, max_num_seqs=8,
                       max_num_batched_tokens=64)


PROMPTS = [[100, 101, 102], [200, 201], [300] * 9]
LENS = [5, 12, 3]
WARMUP = {"prompt_len": 4, "output_len": 2, "first_id": 100}


def test_peer_runs_rounds_over_the_json_protocol(fake_venv):
    with VllmPeer(options(), PROMPTS, LENS, WARMUP, fake_venv) as peer:
        assert peer.ready["vllm_version"] == "0.0-fake"
        assert peer.ready["load_s"] >= 0 and peer.ready["pid"] != os.getpid()
        rounds = [peer.run_round(), peer.run_round()]
        child = peer.proc
    for r in rounds:
        assert r.output_token_counts == LENS
        assert r.first_token_ids == [[p[0] + i for i in range(min(n, 8))]
                                     for p, n in zip(PROMPTS, LENS)]
    assert child.poll() is not None                      # closed: the child has exited


def test_a_short_output_fails_the_round_with_the_reason(fake_venv, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SHORT", "1")
    with pytest.raises(VllmPeerError, match="produced 1 tokens, expected 2"):
        VllmPeer(options(), PROMPTS, LENS, WARMUP, fake_venv).start()   # in the warm-up


def test_missing_venv_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/peers/vllm_cpu.sh"):
        vllm_peer.peer_command(tmp_path / "nowhere")


def test_agreement_counts_requests_with_the_same_first_ids():
    ours = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    theirs = [[1, 2, 3], [4, 5, 0], [0, 8, 9]]
    got = agreement(ours, theirs)
    assert got["requests"] == 3 and got["same_first_id"] == 2 and got["same_first_ids"] == 1


def test_vllm_dtype_defaults_to_pagodas_and_names_a_bad_one():
    import argparse

    from pagoda.bench import throughput
    assert throughput.vllm_dtype(argparse.Namespace(vllm_dtype=None), torch.float32) is torch.float32
    assert (throughput.vllm_dtype(argparse.Namespace(vllm_dtype="bfloat16"), torch.float32)
            is torch.bfloat16)
    with pytest.raises(VllmPeerError, match="--vllm-dtype 'int4'"):
        throughput.vllm_dtype(argparse.Namespace(vllm_dtype="int4"), torch.float32)
