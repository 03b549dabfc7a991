"""The inspector's deltas (engine/inspector.py ``DeltaEncoder`` / ``apply_delta``, and the
page's ``applyDelta`` in inspect.html): a keyframe of the first snapshot with the deltas of
the next ones applied is, exactly, the keyframe of the last, over a random workload on the
fake runner (prefix hits, evictions, preemptions, leases, text), and a delta is small."""
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fake_runner import FakeRunner, run_step  # noqa: E402

from pagoda.config import SchedulerConfig  # noqa: E402
from pagoda.core.kv_cache_manager import KVCacheManager  # noqa: E402
from pagoda.core.scheduler import Scheduler  # noqa: E402
from pagoda.core.snapshot import CachedBlock, LeaseSnapshot  # noqa: E402
from pagoda.engine.inspector import (  # noqa: E402
    DeltaEncoder,
    EngineSnapshot,
    RequestDetail,
    apply_delta,
    snapshot_json,
)
from pagoda.engine.stats import EngineStats  # noqa: E402
from pagoda.request import Request, RequestStatus  # noqa: E402
from pagoda.sampling import SamplingParams  # noqa: E402

PAGE = Path(__file__).parents[2] / "pagoda" / "entrypoints" / "openai" / "static" / "inspect.html"
BS = 4
PREFIXES = [[100 + 20 * p + i for i in range(12)] for p in range(3)]  # three blocks each


def workload(seed: int, steps: int = 120, show_text: bool = False) -> list[EngineSnapshot]:
    """A snapshot after every step of a random workload on a small pool: requests arrive
    with shared prefixes or not, some are aborted, the pool runs full (evictions,
    preemptions), and a lease comes and goes."""
    rng = random.Random(seed)
    kv = KVCacheManager(24, BS, enable_prefix_caching=True, model_key="m")
    sched = Scheduler(SchedulerConfig(16, 6, 512, True), kv)
    runner = FakeRunner(sched)
    snaps, born, n = [], {}, 0
    for step in range(steps):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            prompt = rng.choice(PREFIXES) if rng.random() < 0.6 else []
            prompt = prompt + [rng.randrange(300, 400) for _ in range(rng.randrange(1, 14))]
            p = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 24))
            sched.add_request(Request(f"r{n}", prompt, p, (1,), p.max_tokens))
            born[f"r{n}"], n = step, n + 1
        live = [rid for rid, r in sched.requests.items() if not r.is_finished]
        if live and rng.random() < 0.05:
            sched.finish_requests([rng.choice(live)], RequestStatus.FINISHED_ABORTED)
        if sched.has_unfinished_requests():
            run_step(sched, runner)
        snap = sched.inspect()
        if 30 <= step < 60:  # a lease: the blocks are made up, the delta need not care
            lease = LeaseSnapshot("lease-1", tuple(range(step % 5)))
            snap = dataclasses.replace(snap, leases=(lease,))
        details = {
            rid: RequestDetail(
                float(born[rid]),
                float(born[rid] + 2) if step > born[rid] + 1 else None,
                f"prompt {rid}" if show_text else None,
                "x" * (step - born[rid]) if show_text else None,
            )
            for rid in sched.requests
        }
        stats = EngineStats(sched.make_stats(), 0, step)
        snaps.append(
            EngineSnapshot(step + 1, float(step), "m", "both", 512, snap, details, stats, show_text)
        )
    return snaps


def as_json(value: object) -> object:
    return json.loads(json.dumps(value))


def keyframe(snap: EngineSnapshot) -> dict:
    return as_json(snapshot_json(snap, []))  # type: ignore[return-value]


def replay(snaps: list[EngineSnapshot]) -> tuple[list[dict], list[dict]]:
    """The deltas of ``snaps[1:]`` from ``snaps[0]``, and the documents applying them gives."""
    enc = DeltaEncoder(snaps[0])
    doc, deltas, docs = keyframe(snaps[0]), [], []
    for snap in snaps[1:]:
        delta = as_json(enc.delta(snap))
        doc = apply_delta(doc, delta)  # type: ignore[arg-type]
        deltas.append(delta)
        docs.append(doc)
    return deltas, docs


@pytest.mark.parametrize("seed", range(6))
def test_keyframe_plus_deltas_is_the_last_keyframe(seed: int) -> None:
    snaps = workload(seed, show_text=seed % 2 == 1)
    deltas, docs = replay(snaps)
    for snap, doc in zip(snaps[1:], docs, strict=True):
        assert doc == keyframe(snap), snap.version
    # The workload did what it should: hits, evictions and preemptions all happened.
    last = snaps[-1].stats.scheduler
    assert last.prefix_cache_hits > 0 and last.num_preemptions > 0
    assert snaps[-1].scheduler.pool.num_evictions > 0
    assert any("+block_ids" in row for d in deltas for row in d.get("requests", {}).get("rows", []))
    assert any(d.get("cache", {}).get("removed") for d in deltas)
    assert any("leases" in d for d in deltas)


def test_deltas_between_snapshots_far_apart() -> None:
    """A stream that skipped snapshots (its viewer was slow) gets the delta between the two
    it has: the encoder diffs against what it sent last, not the snapshot before."""
    snaps = workload(11)
    for stride in (2, 7):
        picked = snaps[::stride]
        _, docs = replay(picked)
        assert docs[-1] == keyframe(picked[-1])


def test_a_delta_is_what_changed() -> None:
    snaps = workload(3, steps=200)
    deltas, docs = replay(snaps)
    sent = sum(len(json.dumps(d)) for d in deltas)
    whole = sum(len(json.dumps(keyframe(s))) for s in snaps[1:])
    assert sent * 4 < whole, (sent, whole)
    # Nothing changed: only the version, its base and the time.
    enc = DeltaEncoder(snaps[10])
    same = dataclasses.replace(snaps[10], version=99)
    assert enc.delta(same) == {"version": 99, "base": 11, "time": 10.0}
    # A changed row carries only the fields that changed (and its id).
    patched = 0
    for base, d in zip([keyframe(snaps[0]), *docs[:-1]], deltas, strict=True):
        before = {r["id"]: r for r in base["requests"]}
        for row in d.get("requests", {}).get("rows", []):
            old = before.get(row["id"])
            if old is not None:
                patched += 1
                assert all(old[k] != v for k, v in row.items() if k not in ("id", "+block_ids"))
    assert patched > 50


def test_pool_runs_and_their_joins() -> None:
    snaps = workload(5, steps=40)
    deltas, _ = replay(snaps)
    runs = [run for d in deltas for run in d.get("pool", [])]
    assert runs
    for d in deltas:
        starts = [r[0] for r in d.get("pool", [])]
        ends = [r[0] + len(r[1]) for r in d.get("pool", [])]
        assert all(e < s for e, s in zip(ends, starts[1:])), "runs overlap or touch"
        for _, states, refs in d.get("pool", []):
            assert len(states) == len(refs) >= 1


def test_cache_out_of_naming_order_is_sent_whole() -> None:
    """A name removed and given again between two snapshots moves to the end of the pool's
    list; a block moved out of that order cannot be a prefix-and-tail change."""
    a = CachedBlock(0, b"a" * 8, None, 0)
    b = CachedBlock(1, b"b" * 8, b"a" * 8, 1)
    c = CachedBlock(2, b"c" * 8, b"b" * 8, 0)
    snap = workload(0, steps=2)[-1]

    def with_cache(blocks: tuple, version: int) -> EngineSnapshot:
        pool = dataclasses.replace(snap.scheduler.pool, cached=blocks, cache_version=version)
        return dataclasses.replace(
            snap, version=version, scheduler=dataclasses.replace(snap.scheduler, pool=pool)
        )

    cases = [
        ((a, b, c), (b, a), "blocks"),  # order broken: whole
        ((a, b, c), (a, CachedBlock(2, c[1], c[2], 4), CachedBlock(7, *b[1:])), "blocks"),
        ((a, b, c), (a, CachedBlock(2, c[1], c[2], 4)), "removed"),  # b evicted, c re-counted
        ((a, b), (a, b, c), "added"),
    ]
    for before, after, kind in cases:
        delta = as_json(DeltaEncoder(with_cache(before, 1)).delta(with_cache(after, 2)))
        change = delta["cache"]  # type: ignore[index]
        assert kind in change and (kind == "blocks") == ("removed" not in change)
        doc = apply_delta(keyframe(with_cache(before, 1)), delta)  # type: ignore[arg-type]
        assert doc["cache"] == keyframe(with_cache(after, 2))["cache"]


def test_a_delta_applies_only_to_its_base() -> None:
    snaps = workload(1, steps=5)
    enc = DeltaEncoder(snaps[1])
    delta = as_json(enc.delta(snaps[2]))
    with pytest.raises(ValueError, match="from version 2 applied to 1"):
        apply_delta(keyframe(snaps[0]), delta)  # type: ignore[arg-type]


# ------------------------------------------------------------- the page's
def page_delta_code() -> str:
    """The page's delta functions: the script between its ``<delta>`` markers, pure JS."""
    m = re.search(r"// <delta>\n(.*?)// </delta>", PAGE.read_text(encoding="utf-8"), re.S)
    assert m, "inspect.html lost its <delta> markers"
    return m.group(1)


def test_the_page_applies_deltas_as_the_reference_does(tmp_path: Path) -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no node on this machine to run the page's script")
    snaps = workload(4, show_text=True)
    enc = DeltaEncoder(snaps[0])
    frames = {"first": keyframe(snaps[0]),
              "deltas": [as_json(enc.delta(s)) for s in snaps[1:]],
              "wrong_base": as_json(DeltaEncoder(snaps[0]).delta(snaps[2]))}
    (tmp_path / "frames.json").write_text(json.dumps(frames))
    script = page_delta_code() + """
const fs = require("fs");
const frames = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
let doc = frames.first;
const docs = [];
for (const d of frames.deltas) { doc = applyDelta(doc, d); docs.push(doc); }
let refused = false;
try { applyDelta(docs[docs.length - 1], frames.wrong_base); } catch (e) { refused = true; }
process.stdout.write(JSON.stringify({ docs, refused }));
"""
    (tmp_path / "apply.js").write_text(script)
    out = subprocess.run([node, str(tmp_path / "apply.js"), str(tmp_path / "frames.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["refused"]
    assert len(result["docs"]) == len(snaps) - 1
    for snap, doc in zip(snaps[1:], result["docs"], strict=True):
        assert doc == keyframe(snap), snap.version
