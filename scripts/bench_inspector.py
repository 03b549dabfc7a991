"""What a viewer of the inspector costs the engine: W1-style single-stream decode throughput
(``pagoda bench serve --max-concurrency 1``) with the inspector closed and open, alternated
round by round against one ``pagoda serve``.

    .venv/bin/python scripts/bench_inspector.py --rounds 4                  # an SSE reader
    .venv/bin/python scripts/bench_inspector.py --rounds 4 --viewer browser # the page itself

``--viewer sse`` reads /inspect/events in a thread of this script (the server's cost only);
``--viewer browser`` opens /inspect in headless Chromium (the server's cost plus the
browser's CPU on the same machine). Results are printed as a table; docs/inspector.md has a
run. Holds /tmp/pagoda-bench.lock while it runs, as other benchmarks on a shared box do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/pagoda-bench.lock")


def start_server(port: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "--port", str(port), *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"pagoda serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("pagoda serve did not come up")


def bench_round(url: str, ns: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "pagoda.entrypoints.cli",
        "bench",
        "serve",
        "--base-url",
        url,
        "--max-concurrency",
        "1",
        "--request-rate",
        "inf",
        "--num-prompts",
        str(ns.num_prompts),
        "--input-len",
        str(ns.input_len),
        "--output-len",
        str(ns.output_len),
        "--seed",
        "0",
        "--json",
        str(out),
    ]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(out.read_text())["results"]
    return report


class SSEViewer:
    """Reads /inspect/events until stopped; counts its events (keyframes and deltas) and
    bytes."""

    def __init__(self, url: str) -> None:
        self.url, self.stop_flag = url, threading.Event()
        self.updates = self.bytes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.stream("GET", self.url + "/inspect/events", timeout=None) as r:
            for line in r.iter_lines():
                self.bytes += len(line) + 1
                self.updates += line.startswith(("event: update", "event: delta"))
                if self.stop_flag.is_set():
                    return

    def __enter__(self) -> "SSEViewer":
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop_flag.set()
        self.thread.join(5)


class Browser:
    """Headless Chromium, launched once (its start-up is not a viewer's cost); each
    ``viewer(url)`` is the page open for one round, and counts the browser's CPU time."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        exe = shutil.which("chromium") or shutil.which("google-chrome")
        self._browser = self._pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])

    def viewer(self, url: str) -> "BrowserPage":
        return BrowserPage(self._browser, url)

    def close(self) -> None:
        self._browser.close()
        self._pw.stop()


def chromium_cpu_seconds() -> float:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"chromium" not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


class BrowserPage:
    def __init__(self, browser: Any, url: str) -> None:
        self._browser, self.url = browser, url
        self.updates = self.bytes = 0

    def __enter__(self) -> "BrowserPage":
        self._page = self._browser.new_page(viewport={"width": 1400, "height": 1000})
        self._page.goto(self.url + "/inspect")
        self._page.wait_for_selector("#conn.live")
        time.sleep(2)  # let the page settle before the round
        self._cpu0, self._t0 = chromium_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *_: Any) -> None:
        self.cpu = (chromium_cpu_seconds() - self._cpu0) / (time.monotonic() - self._t0)
        self.updates = self._page.evaluate("window.pagodaInspector.steps.length")
        self._page.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--serve-args", default="", help="extra pagoda serve options")
    p.add_argument("--viewer", choices=["sse", "browser"], default="sse")
    p.add_argument("--rounds", type=int, default=4, help="closed/open pairs")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    ns = p.parse_args()
    if LOCK.exists():
        raise SystemExit(f"{LOCK} exists: someone is benchmarking; try again later")
    LOCK.touch()
    proc: Optional[subprocess.Popen] = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix="bench-inspector-"))
        url = ns.base_url
        if url is None:
            proc = start_server(ns.port, ns.serve_args.split(), tmp / "server.log")
            url = f"http://127.0.0.1:{ns.port}"
        bench_round(url, ns, tmp / "warmup.json")
        browser = Browser() if ns.viewer == "browser" else None
        viewer: Callable[[str], Any] = SSEViewer if browser is None else browser.viewer
        results: dict[str, list[dict]] = {"closed": [], "open": []}
        for i in range(ns.rounds):
            for mode in ("closed", "open") if i % 2 == 0 else ("open", "closed"):
                out = tmp / f"{mode}-{i}.json"
                if mode == "open":
                    with viewer(url) as v:
                        r = bench_round(url, ns, out)
                    r["viewer_updates"] = v.updates
                    r["viewer_cpu"] = getattr(v, "cpu", None)
                else:
                    r = bench_round(url, ns, out)
                results[mode].append(r)
                print(
                    f"round {i} {mode:6s}: {r['output_throughput']:.1f} output tok/s, "
                    f"TPOT p50 {r['tpot_ms']['p50']:.2f} ms, TTFT p50 {r['ttft_ms']['p50']:.0f} ms"
                    + (f", {r['viewer_updates']} viewer updates" if mode == "open" else "")
                    + (
                        f", Chromium {100 * r['viewer_cpu']:.0f} % of a core"
                        if r.get("viewer_cpu") is not None
                        else ""
                    ),
                    flush=True,
                )
        if browser is not None:
            browser.close()
        report(results)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        LOCK.unlink(missing_ok=True)
    return 0


def report(results: dict[str, list[dict]]) -> None:
    """Decode speed (1 / median TPOT, what a viewer could slow) is the headline; output
    tokens/s also carries TTFT, which on a shared machine is the noisier of the two."""
    print("\n| inspector | rounds | decode tok/s (1/TPOT p50) median [min, max] | output tok/s |")
    print("|---|---|---|---|")
    decode = {}
    for mode, rs in results.items():
        d = [1000 / r["tpot_ms"]["p50"] for r in rs]
        decode[mode] = statistics.median(d)
        out = statistics.median(r["output_throughput"] for r in rs)
        print(
            f"| {mode} | {len(rs)} | {decode[mode]:.1f} [{min(d):.1f}, {max(d):.1f}] | {out:.1f} |"
        )
    print(f"\nopen / closed decode speed: {decode['open'] / decode['closed']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
