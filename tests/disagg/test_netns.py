"""Prefill and decode in two network namespaces joined by a veth pair: the KV crosses a real
network interface (UCX over TCP), not loopback. Needs root and `ip netns`; skipped (with the
reason) where the machine does not allow it."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import TINY_VOCAB, make_model

pytest.importorskip("nixl")
DRIVER = Path(__file__).with_name("netns_driver.py")
REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.213.77"


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and the `ip` tool to create network namespaces")
    tag = f"pg{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    if _sh("ip", "netns", "add", a).returncode != 0:
        pytest.skip("`ip netns add` is not permitted here")
    try:
        steps = [("ip", "netns", "add", b),
                 ("ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb"),
                 ("ip", "link", "set", f"{tag}va", "netns", a),
                 ("ip", "link", "set", f"{tag}vb", "netns", b),
                 ("ip", "-n", a, "addr", "add", f"{SUBNET}.1/24", "dev", f"{tag}va"),
                 ("ip", "-n", b, "addr", "add", f"{SUBNET}.2/24", "dev", f"{tag}vb"),
                 ("ip", "-n", a, "link", "set", f"{tag}va", "up"),
                 ("ip", "-n", b, "link", "set", f"{tag}vb", "up"),
                 ("ip", "-n", a, "link", "set", "lo", "up"),
                 ("ip", "-n", b, "link", "set", "lo", "up")]
        for step in steps:
            r = _sh(*step)
            if r.returncode != 0:
                pytest.skip(f"could not set up the veth pair ({' '.join(step)}): {r.stderr}")
        yield a, b
    finally:
        _sh("ip", "netns", "del", a)
        _sh("ip", "netns", "del", b)


def _json_line(stream) -> str:
    """The next JSON line (NIXL logs to stdout too)."""
    for line in stream:
        if line.startswith("{"):
            return line
    return ""


def test_kv_crosses_a_veth_pair(namespaces, tmp_path):
    from pagoda import LLM, SamplingParams

    ns_a, ns_b = namespaces
    model = make_model(str(tmp_path / "tiny"), "llama", seed=9)
    rng = random.Random(1)
    prompt = [rng.randrange(3, TINY_VOCAB) for _ in range(37)]
    ref = LLM(model, dtype="float32", block_size=8).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8))[0].token_ids
    # Only TCP: shared memory (UCX's posix/cma transports) would work across network
    # namespaces too, and the point is to cross the veth pair.
    env = dict(os.environ, PYTHONPATH=str(REPO), UCX_TLS="tcp")
    common = ["--model", model, "--prompt", json.dumps(prompt)]
    prefill = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, str(DRIVER),
                                "prefill", "--host", f"{SUBNET}.1", *common],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        params = _json_line(prefill.stdout)
        assert params, prefill.stderr.read()
        assert json.loads(params)["remote_host"] == f"{SUBNET}.1"
        decode = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, str(DRIVER),
                                 "decode", "--host", f"{SUBNET}.2", *common], input=params,
                                capture_output=True, text=True, env=env, timeout=180)
        assert decode.returncode == 0, decode.stderr[-3000:]
        result = json.loads([ln for ln in decode.stdout.splitlines() if ln.startswith("{")][-1])
        assert result["failures"] == 0 and result["pulled"] == 5, decode.stderr[-2000:]  # 5 = ceil(36/8)
        assert result["token_ids"] == ref
        released = json.loads(_json_line(prefill.stdout))
        assert released == {"released": 1}
    finally:
        prefill.kill()
        prefill.wait()
