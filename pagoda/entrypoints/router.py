"""``pagoda router``: one OpenAI-compatible endpoint in front of prefill and decode instances
(disaggregated prefill, as in DistServe OSDI'24 and Splitwise).

For each completion or chat request it asks a prefill instance to run the prompt
(``max_tokens=1``, ``kv_transfer_params={"do_remote_decode": true}``), takes the
``kv_transfer_params`` it returns (where the prompt's KV waits), and sends the original
request with them to a decode instance, which pulls the KV and streams the answer through the
router. A prefill that fails is retried on another prefill instance; with no prefill instance
up, the decode instance runs the request colocated. Invariant: the client sees exactly one
response per request, streamed from one decode instance; a client that goes away closes the
decode stream, which aborts the request there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

logger = logging.getLogger("pagoda.router")

PREFILL_PARAMS = {
    "max_tokens": 1,
    "stream": False,
    "n": 1,
    "kv_transfer_params": {"do_remote_decode": True},
}
DROPPED_FOR_PREFILL = ("stream_options", "logprobs", "top_logprobs", "stop", "min_tokens")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Instance:
    url: str
    healthy: bool = True
    outstanding: int = 0


@dataclass
class Pool:
    """Instances of one role and the policy that picks among them."""

    instances: list[Instance]
    policy: str = "least_outstanding"
    _turn: itertools.count = field(default_factory=itertools.count)

    def pick(self, exclude: tuple[str, ...] = ()) -> Optional[Instance]:
        up = [i for i in self.instances if i.healthy and i.url not in exclude]
        if not up:
            return None
        if self.policy == "round_robin":
            return up[next(self._turn) % len(up)]
        return min(up, key=lambda i: i.outstanding)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pagoda_router_requests", "requests routed, by path", ["path"], registry=self.registry
        )
        self.prefill_retries = Counter(
            "pagoda_router_prefill_retries",
            "prefills retried on another instance",
            registry=self.registry,
        )
        self.colocated = Counter(
            "pagoda_router_colocated_fallbacks",
            "requests sent straight to a decode instance (no prefill up)",
            registry=self.registry,
        )


class Router:
    def __init__(
        self,
        prefill: list[str],
        decode: list[str],
        policy: str,
        health_interval_s: float,
        api_key: Optional[str] = None,
    ) -> None:
        if not decode:
            raise ValueError("--decode needs at least one URL")
        self.prefill = Pool([Instance(u.rstrip("/")) for u in prefill], policy)
        self.decode = Pool([Instance(u.rstrip("/")) for u in decode], policy)
        self.health_interval_s = health_interval_s
        self.api_key = api_key
        self.metrics = RouterMetrics()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT_S, connect=5.0))

    # ------------------------------------------------------------ health
    async def watch_health(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.health_interval_s)

    async def check_health(self) -> None:
        instances = self.prefill.instances + self.decode.instances
        results = await asyncio.gather(*(self._healthy(i.url) for i in instances))
        for instance, ok in zip(instances, results, strict=True):
            if ok != instance.healthy:
                logger.warning("%s is %s", instance.url, "up" if ok else "down")
            instance.healthy = ok

    async def _healthy(self, url: str) -> bool:
        try:
            return (await self.client.get(f"{url}/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    # ----------------------------------------------------------- routing
    def _headers(self, request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        auth = request.headers.get("authorization") or (
            f"Bearer {self.api_key}" if self.api_key else None
        )
        if auth:
            headers["authorization"] = auth
        return headers

    async def route(self, path: str, request: Request) -> Response:
        self.metrics.requests.labels(path).inc()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        headers = self._headers(request)
        prefilled = await self._prefill(path, body, headers)
        if isinstance(prefilled, Response):
            return prefilled  # the prefill instance refused it (4xx)
        if prefilled is not None:
            body = {**body, "kv_transfer_params": prefilled}
        return await self._decode(path, body, headers)

    async def _prefill(
        self, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> Optional[dict[str, Any] | Response]:
        """kv_transfer_params from a prefill instance; None when none could do it (the
        decode instance then runs the whole request); a Response for a client error."""
        prefill_body = {k: v for k, v in body.items() if k not in DROPPED_FOR_PREFILL}
        prefill_body.update(PREFILL_PARAMS)
        if "max_completion_tokens" in body:  # chat's name for it, which wins over max_tokens
            prefill_body["max_completion_tokens"] = 1
        tried: tuple[str, ...] = ()
        while (instance := self.prefill.pick(exclude=tried)) is not None:
            tried += (instance.url,)
            instance.outstanding += 1
            try:
                reply = await self.client.post(
                    f"{instance.url}{path}", json=prefill_body, headers=headers
                )
            except httpx.HTTPError as e:
                logger.warning("prefill on %s failed: %s", instance.url, e)
                instance.healthy = False
                self.metrics.prefill_retries.inc()
                continue
            finally:
                instance.outstanding -= 1
            if 400 <= reply.status_code < 500:
                return _passthrough(reply)
            params = reply.json().get("kv_transfer_params") if reply.status_code == 200 else None
            if params is None:
                logger.warning(
                    "prefill on %s answered %d without kv_transfer_params",
                    instance.url,
                    reply.status_code,
                )
                self.metrics.prefill_retries.inc()
                continue
            return params
        if self.prefill.instances:
            self.metrics.colocated.inc()
        return None

    async def _decode(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Response:
        instance = self.decode.pick()
        if instance is None:
            return _error(503, "no decode instance is up", code="no_decode_instance")
        instance.outstanding += 1
        upstream = self.client.build_request(
            "POST", f"{instance.url}{path}", json=body, headers=headers
        )
        try:
            reply = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            instance.outstanding -= 1
            instance.healthy = False
            return _error(503, f"decode instance {instance.url} failed: {e}", code="decode_failed")
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(
            self._relay(reply, instance),
            status_code=reply.status_code,
            headers=kept,
            media_type=reply.headers.get("content-type"),
        )

    @staticmethod
    async def _relay(reply: httpx.Response, instance: Instance) -> AsyncIterator[bytes]:
        """Stream the decode instance's bytes; closing it (client gone) aborts there."""
        try:
            async for chunk in reply.aiter_raw():
                yield chunk
        finally:
            instance.outstanding -= 1
            await reply.aclose()

    async def proxy_get(self, path: str) -> Response:
        instance = self.decode.pick()
        if instance is None:
            return _error(503, "no decode instance is up", code="no_decode_instance")
        try:
            reply = await self.client.get(f"{instance.url}{path}")
        except httpx.HTTPError as e:
            return _error(503, f"decode instance {instance.url} failed: {e}")
        return _passthrough(reply)


def _passthrough(reply: httpx.Response) -> Response:
    return Response(
        reply.content, status_code=reply.status_code, media_type=reply.headers.get("content-type")
    )


def _error(status: int, message: str, code: Optional[str] = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def build_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.check_health()
        task = asyncio.create_task(router.watch_health())
        yield
        task.cancel()
        await router.client.aclose()

    app = FastAPI(title="pagoda router", lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.route("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.route("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models() -> Response:
        return await router.proxy_get("/v1/models")

    @app.get("/health")
    async def health() -> Response:
        up = any(i.healthy for i in router.decode.instances)
        return JSONResponse(
            {"status": "ok" if up else "no decode instance"}, status_code=200 if up else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(ns: argparse.Namespace) -> int:
    import uvicorn

    router = Router(ns.prefill, ns.decode, ns.policy, ns.health_interval, ns.api_key)
    logger.warning(
        "router on %s:%d: prefill %s, decode %s",
        ns.host,
        ns.port,
        ns.prefill or "(none)",
        ns.decode,
    )
    uvicorn.run(build_app(router), host=ns.host, port=ns.port, log_level="warning")
    return 0
