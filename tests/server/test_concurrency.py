"""50 concurrent streaming clients, a fifth of which hang up mid-stream: the others get all
their tokens, and afterwards nothing runs or waits and every KV block is free again."""
from __future__ import annotations

import asyncio
import time

import httpx
from server_utils import metric_values, wait_until_idle

NUM_CLIENTS = 50
DISCONNECT_EVERY = 5
MAX_TOKENS = 24
LONG_MAX_TOKENS = 900    # the ones that hang up would run for a long while


async def _one(client, model: str, i: int) -> tuple[int, int, str | None]:
    """(index, tokens received, finish_reason); the disconnecting ones stop after 3 chunks."""
    leaves = i % DISCONNECT_EVERY == 0
    stream = await client.completions.create(
        model=model, prompt=f"client {i}: the quick brown fox", temperature=0.7, seed=i,
        max_tokens=LONG_MAX_TOKENS if leaves else MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks, reason, usage = 0, None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            chunks += 1
            reason = choice.finish_reason or reason
        if leaves and chunks >= 3:
            await stream.close()
            return i, -1, None
    return i, usage.completion_tokens, reason


async def _run_all(url: str, model: str) -> list[tuple[int, int, str | None]]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                           timeout=120) as client:
        return await asyncio.gather(*(_one(client, model, i) for i in range(NUM_CLIENTS)))


def test_fifty_streams_with_disconnects_leave_nothing_behind(server, model_name: str) -> None:
    before = metric_values(server.url)
    results = asyncio.run(_run_all(server.url, model_name))
    stayed = [r for r in results if r[0] % DISCONNECT_EVERY != 0]
    assert len(stayed) == NUM_CLIENTS - NUM_CLIENTS // DISCONNECT_EVERY
    for i, tokens, reason in stayed:
        assert (tokens, reason) == (MAX_TOKENS, "length"), f"client {i}"

    after = wait_until_idle(server.url)
    assert after["pagoda:num_requests_running"] == 0
    assert after["pagoda:num_requests_waiting"] == 0
    assert after["pagoda:kv_cache_free_blocks"] == after["pagoda:kv_cache_total_blocks"]
    aborted = (after['pagoda:request_success_total{finished_reason="abort"}']
               - before['pagoda:request_success_total{finished_reason="abort"}'])
    assert aborted == NUM_CLIENTS // DISCONNECT_EVERY
    state = httpx.get(server.url + "/debug/state").json()   # runs check_invariants()
    assert state["invariants_ok"] and state["num_unfinished"] == 0
    assert state["num_free_blocks"] == state["num_blocks"]


def test_non_streaming_disconnect_aborts(server, model_name: str) -> None:
    """A client that gives up on a non-streaming request frees its blocks too."""
    before = metric_values(server.url)
    body = {"model": model_name, "prompt": "a long wait", "max_tokens": 900,
            "ignore_eos": True}

    async def give_up() -> None:
        async with httpx.AsyncClient(base_url=server.url) as c:
            task = asyncio.ensure_future(c.post("/v1/completions", json=body, timeout=60))
            deadline = time.monotonic() + 30
            while metric_values(server.url)["pagoda:num_requests_running"] == 0:
                assert not task.done(), "the request ended before it was seen running"
                assert time.monotonic() < deadline, "the request never started running"
                await asyncio.sleep(0.02)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    asyncio.run(give_up())
    after = wait_until_idle(server.url)
    assert after["pagoda:num_requests_running"] == 0
    assert after["pagoda:kv_cache_free_blocks"] == after["pagoda:kv_cache_total_blocks"]
    aborted = (after['pagoda:request_success_total{finished_reason="abort"}']
               - before['pagoda:request_success_total{finished_reason="abort"}'])
    assert aborted == 1
