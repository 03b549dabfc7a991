"""One side of the two-namespace test (run by test_netns.py with `ip netns exec`): a prefill
engine that prints its kv_transfer_params and waits for the pull, or a decode engine that
takes them and prints the tokens it generates. JSON lines on stdout; nothing else."""
from __future__ import annotations

import argparse
import json
import sys
import time

from pagoda import SamplingParams
from pagoda.config import EngineArgs
from pagoda.engine.build import build_engine
from pagoda.engine.llm_engine import LLMEngine
from pagoda.request import EngineRequest

SECRET = "netns-secret"


def finish(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams, **kw):
    engine.add_request(EngineRequest(rid, prompt, params, **kw))
    while True:
        for out in engine.step():
            if out.finished:
                return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["prefill", "decode"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--prompt", required=True, help="JSON list of token ids")
    ap.add_argument("--max-tokens", type=int, default=8)
    ns = ap.parse_args()
    prompt = json.loads(ns.prompt)
    engine = build_engine(EngineArgs(model=ns.model, dtype="float32", block_size=8,
                                  num_kv_blocks=64, kv_role=ns.role, kv_secret=SECRET,
                                  kv_host=ns.host, kv_transfer_timeout=60.0))
    if ns.role == "prefill":
        out = finish(engine, "r", prompt, SamplingParams(temperature=0.0, max_tokens=1),
                     kv_transfer_params={"do_remote_decode": True})
        print(json.dumps(out.kv_transfer_params), flush=True)
        deadline = time.monotonic() + 60
        while engine.kv.pool.num_free_blocks < engine.num_blocks:   # until the pull ends it
            if time.monotonic() > deadline:
                sys.exit("the decode side never released the lease")
            engine.poll_kv_transfers()
            time.sleep(0.01)
        print(json.dumps({"released": engine.stats().kv_transfer.num_leases_released}), flush=True)
    else:
        params = json.loads(sys.stdin.readline())
        greedy = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens,
                                min_tokens=ns.max_tokens)
        out = finish(engine, "r", prompt, greedy, kv_transfer_params=params)
        print(json.dumps({"token_ids": out.token_ids,
                          "pulled": engine.kv_connector.num_blocks_pulled,
                          "failures": engine.stats().scheduler.num_kv_load_failures}), flush=True)
    engine.close()


if __name__ == "__main__":
    main()
