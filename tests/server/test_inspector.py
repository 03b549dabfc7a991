"""The inspector's routes on a live ``pagoda serve`` (tiny model): GET /inspect/state against
/metrics and the requests sent, the SSE stream's format and rate, --no-inspector, --api-key
and --inspector-show-text. The page in a real browser: test_inspector_browser.py."""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Iterator

import httpx
import pytest
from server_utils import ServerProcess, metric_values, start_server, wait_until_idle

from pagoda.engine.inspector import apply_delta

KEY = "inspector-secret"


def read_events(url: str, headers: dict, seconds: float, max_events: int = 1000) -> list[dict]:
    """The events of /inspect/events for ``seconds`` (or ``max_events``), each with the time
    it arrived, its kind (``update``: a keyframe; ``delta``) and ``doc``, the whole document
    as of that event (a keyframe, or the one before with the delta applied)."""
    events: list[dict] = []
    doc = None
    deadline = time.monotonic() + seconds
    with httpx.stream("GET", url + "/inspect/events", headers=headers, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        block: list[str] = []
        for line in resp.iter_lines():
            if line:
                block.append(line)
                continue
            fields = dict(ln.split(": ", 1) for ln in block if not ln.startswith(":") and ": " in ln)
            block = []
            kind = fields.get("event")
            if kind in ("update", "delta"):
                data = json.loads(fields["data"])
                if kind == "update":
                    doc = data
                else:
                    assert doc is not None, "a delta before any keyframe"
                    doc = apply_delta(doc, data)
                events.append({"at": time.monotonic(), "id": int(fields["id"]), "kind": kind,
                               "data": data, "doc": doc, "size": len(json.dumps(
                                   {k: v for k, v in data.items() if k != "steps"}))})
            if time.monotonic() > deadline or len(events) >= max_events:
                break
    return events


def complete(url: str, prompt: str, max_tokens: int, headers: dict | None = None) -> dict:
    model = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def in_background(url: str, prompt: str, max_tokens: int, headers: dict | None = None
                  ) -> threading.Thread:
    t = threading.Thread(target=complete, args=(url, prompt, max_tokens, headers), daemon=True)
    t.start()
    return t


def live_state(url: str, headers: dict | None = None, timeout_s: float = 60) -> dict:
    """/inspect/state once a request is live in it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = httpx.get(url + "/inspect/state", headers=headers, timeout=30).json()
        if doc["requests"]:
            return doc
        time.sleep(0.02)
    raise AssertionError("no live request seen in /inspect/state")


def check_doc(doc: dict) -> None:
    """The invariants every snapshot keeps."""
    pool, counters = doc["pool"], doc["counters"]
    n = doc["engine"]["num_blocks"]
    assert len(pool["states"]) == len(pool["ref_counts"]) == n
    assert set(pool["states"]) <= set(pool["legend"])
    free = sum(pool["states"].count(c) for c in "fc")
    assert free == counters["num_free_blocks"]
    held: dict[int, int] = {}
    for r in doc["requests"]:
        for b in r["block_ids"]:
            held[b] = held.get(b, 0) + 1
    for le in doc["leases"]:
        for b in le["block_ids"]:
            held[b] = held.get(b, 0) + 1
    assert held == {b: rc for b, rc in enumerate(pool["ref_counts"]) if rc}
    for i, (state, rc) in enumerate(zip(pool["states"], pool["ref_counts"])):
        assert (state in "fc") == (rc == 0), (i, state, rc)
    if doc["cache"] is not None:
        blocks = doc["cache"]["blocks"]
        assert len(blocks) == counters["num_cached_blocks"]
        assert sorted(b for b, *_ in blocks) == [i for i, s in enumerate(pool["states"]) if s in "cs"]
        for _, h, parent, hits in blocks:
            assert re.fullmatch(r"[0-9a-f]{16}", h) and hits >= 0
            assert parent is None or re.fullmatch(r"[0-9a-f]{16}", parent)


# ------------------------------------------------------------------ state
def test_page_is_self_contained(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/inspect")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<canvas" in page and "/events" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "loads from elsewhere"
    assert "import " not in page.split("<script>")[1].split("</script>")[0][:200]


def test_state_agrees_with_metrics_and_requests(server: ServerProcess) -> None:
    wait_until_idle(server.url)
    shared = "The history of the lighthouse keepers of the northern coast " * 12
    complete(server.url, shared + "first question", 4)
    complete(server.url, shared + "another one", 4)
    doc = httpx.get(server.url + "/inspect/state").json()
    check_doc(doc)
    m = metric_values(server.url)
    assert doc["schema"] == "pagoda.inspect/1"
    assert doc["engine"]["num_blocks"] == m["pagoda:kv_cache_total_blocks"]
    assert doc["counters"]["num_free_blocks"] == m["pagoda:kv_cache_free_blocks"]
    assert doc["counters"]["prefix_cache_hits"] == m["pagoda:prefix_cache_hits_total"]
    assert doc["engine"]["block_size"] == 16 and doc["engine"]["kv_role"] == "both"
    # The second request started on the first one's blocks: a chain with one hit each.
    hit = [b for b in doc["cache"]["blocks"] if b[3] >= 1]
    assert len(hit) >= 4
    hashes = {b[1] for b in doc["cache"]["blocks"]}
    assert all(b[2] in hashes for b in hit if b[2] is not None)
    steps = doc["steps"]
    assert steps and [s["seq"] for s in steps] == list(range(steps[0]["seq"], steps[-1]["seq"] + 1))
    assert any(s["prefill"] > 0 for s in steps) and any(s["decode"] > 0 for s in steps)
    for s in steps:
        # a prompt that a cut would leave a short tail of runs whole: at most
        # --short-prefill-tokens (by default a quarter of the budget) past it
        assert s["decode"] + s["prefill"] + s["recompute"] + s["spec"] <= s["budget"] * 5 // 4
        assert s["duration_s"] > 0


def test_live_request_shows_its_block_table_but_not_its_text(server: ServerProcess) -> None:
    wait_until_idle(server.url)
    t = in_background(server.url, "Count the stars: one two three", 600)
    doc = live_state(server.url)
    check_doc(doc)
    (r,) = doc["requests"]
    assert r["status"] in ("running", "waiting")
    assert "prompt" not in r and "output" not in r and "Count the stars" not in json.dumps(doc)
    if r["status"] == "running":
        assert len(r["block_ids"]) == -(-r["num_computed_tokens"] // 16)
    t.join(120)


# -------------------------------------------------------------------- SSE
def test_events_stream_a_keyframe_then_deltas(server: ServerProcess) -> None:
    wait_until_idle(server.url)
    t = in_background(server.url, "Tell a long story about a pagoda", 800)
    events = read_events(server.url, {}, seconds=2.5)
    t.join(120)
    assert events and events[0]["kind"] == "update", "no keyframe first"
    first = events[0]["doc"]
    assert first["cache"] is not None  # a keyframe carries the whole cache
    deltas = [e for e in events if e["kind"] == "delta"]
    assert deltas, "no delta after the keyframe"
    for e in events:  # every state the viewer rebuilds keeps the invariants
        check_doc(e["doc"])
        assert set(e["doc"]) == set(first)
        assert e["id"] == e["doc"]["version"]
    # Deltas carry what changed: far less than the keyframe (steps apart).
    changed = [e for e in deltas if e["data"]["base"] != e["data"]["version"]]
    assert changed and max(e["size"] for e in changed) < events[0]["size"] / 2
    # The rebuilt state is the server's: a request's progress only grows.
    live = [e["doc"]["requests"][0] for e in events if e["doc"]["requests"]]
    assert len(live) >= 2 and live[-1]["num_computed_tokens"] > live[0]["num_computed_tokens"]
    # At most ~10 events a second, and steps reach the viewer in order, none twice.
    span = events[-1]["at"] - events[0]["at"]
    assert len(events) <= 1 + span * 10 * 1.5 + 2
    seqs = [s["seq"] for e in events for s in e["data"]["steps"]]
    assert seqs == sorted(set(seqs))


def test_two_viewers_rebuild_the_same_states(server: ServerProcess) -> None:
    """Frames are encoded once for every viewer; each still rebuilds the whole state."""
    wait_until_idle(server.url)
    t = in_background(server.url, "Describe the tides of the northern coast", 600)
    got: list[list[dict]] = []
    readers = [threading.Thread(target=lambda: got.append(read_events(server.url, {}, 2.0)))
               for _ in range(2)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(60)
    t.join(120)
    assert len(got) == 2 and all(got)
    by_version = [{e["id"]: e["doc"] for e in events} for events in got]
    common = set(by_version[0]) & set(by_version[1])
    assert common, "the two viewers saw no version in common"
    for v in common:
        a, b = (dict(d[v], steps=None) for d in by_version)
        assert a == b, v


# ---------------------------------------------------------- switches, key
@pytest.fixture(scope="module")
def no_inspector(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--num-kv-blocks", "64",
                       "--no-inspector")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--num-kv-blocks", "64",
                       "--api-key", KEY, "--inspector-show-text")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


def test_no_inspector_is_404(no_inspector: ServerProcess) -> None:
    for path in ("/inspect", "/inspect/state", "/inspect/events"):
        assert httpx.get(no_inspector.url + path).status_code == 404, path


def test_api_key_guards_the_data_not_the_page(keyed: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/inspect/state", "/inspect/events"):
        assert httpx.get(keyed.url + path).status_code == 401, path
        bad = {"Authorization": "Bearer wrong"}
        assert httpx.get(keyed.url + path, headers=bad).status_code == 401, path
    assert httpx.get(keyed.url + "/inspect/state", headers=auth).status_code == 200
    assert read_events(keyed.url, auth, seconds=0.5, max_events=1)
    assert httpx.get(keyed.url + "/inspect").status_code == 200  # static: holds no data


def test_show_text_exposes_prompt_and_output(keyed: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    t = in_background(keyed.url, "A visible prompt about herons", 600, auth)
    doc = live_state(keyed.url, auth)
    t.join(120)
    assert doc["engine"]["show_text"] is True
    (r,) = doc["requests"]
    assert r["prompt"] == "A visible prompt about herons"
    assert isinstance(r["output"], str)
