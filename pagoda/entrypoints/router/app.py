"""``pagoda router``: one OpenAI-compatible endpoint in front of prefill and decode instances
(disaggregated prefill, as in DistServe OSDI'24 and Splitwise), or of replicas.

Replicas (``--replicas``, or decode instances with no prefill ones) run whole requests; the
router picks one by the policy: least outstanding, round robin, or cache-aware
(``route_policy.py``: where the request's prefix is cached, weighed against load). With
prefill instances, the policy picks among them (where prompts are computed, so where
prefixes are cached) and decode instances go least-outstanding.

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
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pagoda.entrypoints.router.kv_events import KVEventSubscriber
from pagoda.entrypoints.router.policy import CacheAwarePolicy, Names
from pagoda.entrypoints.router.prefix_index import ApproxPrefixIndex, EventPrefixIndex
from pagoda.entrypoints.router.tokenizer import RouterTokenizer
from pagoda.entrypoints.routes import ROUTES, Routing

logger = logging.getLogger("pagoda.router")
# Request headers an instance reads besides the key, passed on as they came.
FORWARDED_HEADERS = ("x-api-key", "anthropic-version", "anthropic-beta")

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
    outstanding: int = 0  # requests this router has in flight there
    foreign: int = 0  # requests it last reported beyond those (other clients, routers)

    @property
    def load(self) -> int:
        return self.outstanding + self.foreign


@dataclass
class Pool:
    """Instances of one role and the policy that picks among them."""

    instances: list[Instance]
    policy: str = "least_outstanding"
    _turn: itertools.count = field(default_factory=itertools.count)

    def pick(
        self,
        exclude: tuple[str, ...] = (),
        cache: Optional[CacheAwarePolicy] = None,
        names: Optional[Names] = None,
    ) -> Optional[Instance]:
        up = [i for i in self.instances if i.healthy and i.url not in exclude]
        if not up:
            return None
        if self.policy == "round_robin":
            return up[next(self._turn) % len(up)]
        if cache is not None and names is not None:
            picked = cache.pick(up, names)
            assert isinstance(picked, Instance)
            return picked
        return min(up, key=lambda i: i.load)


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
        self.failovers = Counter(
            "pagoda_router_failovers",
            "requests sent to another instance after one failed before answering",
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pagoda_router_prompt_tokenizations",
            "prompts tokenized for the precise cache-aware index, by where: the router's "
            "own tokenizer (--tokenizer) or an instance's /tokenize",
            ["where"],
            registry=self.registry,
        )
        self.cache_matched = Counter(
            "pagoda_router_cache_matched_fraction",
            "sum over requests of the fraction of the prompt the chosen instance held "
            "(cache_aware; divide by pagoda_router_requests_total)",
            registry=self.registry,
        )


class InstanceMetrics:
    """Per instance, read when /metrics is (a prometheus_client collector): whether the
    router counts it up, and its KV event subscriber's counters and precise index size."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "pagoda_router_instance_up",
            "1 while the router routes to the instance (its last health check or request "
            "passed), else 0",
            labels=["instance"],
        )
        for instance in self.router.prefill.instances + self.router.decode.instances:
            up.add_metric([instance.url], 1.0 if instance.healthy else 0.0)
        yield up
        yield from self._kv_events()

    def _kv_events(self) -> Iterator[Metric]:
        label = ["instance"]
        next_seq = GaugeMetricFamily(
            "pagoda_router_kv_events_next_seq",
            "the KV event batch expected next from the instance (its count, once caught up)",
            labels=label,
        )
        batches = CounterMetricFamily(
            "pagoda_router_kv_event_batches", "KV event batches applied", labels=label
        )
        resyncs = CounterMetricFamily(
            "pagoda_router_kv_event_resyncs",
            "times the instance's index was cleared and rebuilt, by reason: restart (its "
            "numbers went back), disconnect, whole_cache (a replay past its buffer began "
            "with the whole cache), lost (batches nothing could give), asked (the router "
            "saw it fail)",
            labels=["instance", "reason"],
        )
        blocks = GaugeMetricFamily(
            "pagoda_router_indexed_blocks",
            "blocks the precise index holds for the instance (full-attention layers)",
            labels=label,
        )
        precise = self.router.cache.precise if self.router.cache is not None else None
        for url, subscriber in self.router.subscribers.items():
            stats = subscriber.stats()
            if stats.next_seq is not None:
                next_seq.add_metric([url], stats.next_seq)
            batches.add_metric([url], stats.num_batches)
            for reason, count in stats.resyncs.items():
                resyncs.add_metric([url, reason], count)
            if precise is not None:
                blocks.add_metric([url], precise.size(url))
        yield from (next_seq, batches, resyncs, blocks)


class Router:
    def __init__(
        self,
        prefill: list[str],
        decode: list[str],
        policy: str,
        health_interval_s: float,
        api_key: Optional[str] = None,
        cache: Optional[CacheAwarePolicy] = None,
        tokenizer: Optional[RouterTokenizer] = None,
    ) -> None:
        if not decode:
            raise ValueError("--decode (or --replicas) needs at least one URL")
        # The policy picks where prompts are computed: among prefill instances when there
        # are some (decode instances then go least outstanding), else among the replicas.
        self.prefill = Pool([Instance(u.rstrip("/")) for u in prefill], policy)
        decode_policy = policy if not prefill else "least_outstanding"
        self.decode = Pool([Instance(u.rstrip("/")) for u in decode], decode_policy)
        self.cache = cache if policy == "cache_aware" else None
        self.tokenizer = tokenizer  # the precise index's ids without a /tokenize call
        self.subscribers: dict[str, KVEventSubscriber] = {}  # instance URL -> its events
        self.health_interval_s = health_interval_s
        self.api_key = api_key
        self.metrics = RouterMetrics()
        self.metrics.registry.register(InstanceMetrics(self))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT_S, connect=5.0))

    @property
    def prompt_pool(self) -> Pool:
        """Where prompts are computed (and prefixes cached)."""
        return self.prefill if self.prefill.instances else self.decode

    def subscribe(self, url: str, endpoint: str, replay: Optional[str] = None) -> None:
        """Feed the precise index from an instance's KV events."""
        assert self.cache is not None and self.cache.precise is not None
        precise, url = self.cache.precise, url.rstrip("/")
        self.subscribers[url] = KVEventSubscriber(
            endpoint, lambda events: precise.apply(url, events), replay
        )

    # ------------------------------------------------------------ health
    async def watch_health(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.health_interval_s)

    async def check_health(self) -> None:
        instances = self.prefill.instances + self.decode.instances
        results = await asyncio.gather(*(self._healthy(i) for i in instances))
        for instance, ok in zip(instances, results, strict=True):
            if ok != instance.healthy:
                logger.warning("%s is %s", instance.url, "up" if ok else "down")
            self._set_health(instance, ok)

    def _set_health(self, instance: Instance, ok: bool) -> None:
        if not ok and instance.healthy and self.cache is not None:
            self.cache.drop(instance.url)  # a dead instance's cache is gone
            subscriber = self.subscribers.get(instance.url)
            if subscriber is not None:  # what it holds when back comes from its events
                subscriber.resync()
        instance.healthy = ok

    async def _healthy(self, instance: Instance) -> bool:
        try:
            ok = (await self.client.get(f"{instance.url}/health", timeout=2.0)).status_code
        except httpx.HTTPError:
            return False
        if ok == 200:
            await self._read_load(instance)
        return ok == 200

    async def _read_load(self, instance: Instance) -> None:
        """The instance's own count of running and waiting requests (its /metrics): what
        exceeds this router's in-flight count there came from elsewhere."""
        try:
            reply = await self.client.get(f"{instance.url}/metrics", timeout=2.0)
        except httpx.HTTPError:
            return
        if reply.status_code == 200:
            reported = instance_load(reply.text)
            if reported is not None:
                instance.foreign = max(0, reported - instance.outstanding)

    # ----------------------------------------------------------- routing
    def _headers(self, request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        auth = request.headers.get("authorization") or (
            f"Bearer {self.api_key}" if self.api_key else None
        )
        if auth:
            headers["authorization"] = auth
        for name in FORWARDED_HEADERS:  # Anthropic's key and version, as the client sent them
            if name in request.headers:
                headers[name] = request.headers[name]
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
        names = await self._names(body, headers)
        prefilled = await self._prefill(path, body, headers, names)
        if isinstance(prefilled, Response):
            return prefilled  # the prefill instance refused it (4xx)
        if prefilled is not None:
            body = {**body, "kv_transfer_params": prefilled}
        return await self._decode(path, body, headers, None if self.prefill.instances else names)

    async def _names(self, body: dict[str, Any], headers: dict[str, str]) -> Optional[Names]:
        if self.cache is None:
            return None
        return await self.cache.names(body, lambda b: self._tokenize(b, headers))

    async def _tokenize(self, body: dict[str, Any], headers: dict[str, str]) -> Optional[list]:
        """The prompt's token ids: the router's own once they have agreed with an
        instance's /tokenize, else the instance's (None if neither can say)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        tok = self.tokenizer if self.tokenizer is not None and not self.tokenizer.disabled else None
        mine = tok.tokens(body) if tok is not None else None
        if tok is not None and mine is not None and tok.trusted(body):
            self.metrics.prompt_tokens.labels("router").inc()
            return mine
        self.metrics.prompt_tokens.labels("instance").inc()
        theirs = await self._remote_tokens(body, headers)
        if tok is not None and mine is not None and theirs is not None:
            tok.check(body, mine, theirs)
        return theirs

    async def _remote_tokens(self, body: dict[str, Any], headers: dict[str, str]) -> Optional[list]:
        instance = self.prompt_pool.pick()
        if instance is None:
            return None
        if "messages" in body:
            ask = {"messages": body["messages"]}
        else:
            ask = {"prompt": body.get("prompt")}
        try:
            reply = await self.client.post(
                f"{instance.url}/tokenize", json=ask, headers=headers, timeout=10.0
            )
        except httpx.HTTPError:
            return None
        return reply.json().get("tokens") if reply.status_code == 200 else None

    def _chose(self, instance: Instance, names: Optional[Names]) -> None:
        if self.cache is not None and names is not None:
            if names.names:
                matched = self.cache.match(instance.url, names)
                self.metrics.cache_matched.inc(matched / len(names.names))
            self.cache.routed(instance.url, names)

    async def _prefill(
        self,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        names: Optional[Names] = None,
    ) -> Optional[dict[str, Any] | Response]:
        """kv_transfer_params from a prefill instance; None when none could do it (the
        decode instance then runs the whole request); a Response for a client error."""
        prefill_body = {k: v for k, v in body.items() if k not in DROPPED_FOR_PREFILL}
        prefill_body.update(PREFILL_PARAMS)
        if "max_completion_tokens" in body:  # chat's name for it, which wins over max_tokens
            prefill_body["max_completion_tokens"] = 1
        tried: tuple[str, ...] = ()
        while (instance := self.prefill.pick(tried, self.cache, names)) is not None:
            tried += (instance.url,)
            self._chose(instance, names)
            instance.outstanding += 1
            try:
                reply = await self.client.post(
                    f"{instance.url}{path}", json=prefill_body, headers=headers
                )
            except httpx.HTTPError as e:
                logger.warning("prefill on %s failed: %s", instance.url, e)
                self._set_health(instance, False)
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

    async def _decode(
        self,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        names: Optional[Names] = None,
    ) -> Response:
        """Send the request to a decode instance (a replica) and stream its answer back. An
        instance that fails before answering is marked down and another is tried: nothing
        has reached the client yet, so nothing is repeated to it."""
        tried: tuple[str, ...] = ()
        while True:
            instance = self.decode.pick(tried, self.cache, names)
            if instance is None:
                if tried:
                    return _error(
                        503, f"decode instances failed: {', '.join(tried)}", code="decode_failed"
                    )
                return _error(503, "no decode instance is up", code="no_decode_instance")
            tried += (instance.url,)
            self._chose(instance, names)
            instance.outstanding += 1
            upstream = self.client.build_request(
                "POST", f"{instance.url}{path}", json=body, headers=headers
            )
            try:
                reply = await self.client.send(upstream, stream=True)
                break
            except httpx.HTTPError as e:
                instance.outstanding -= 1
                logger.warning("decode on %s failed: %s", instance.url, e)
                self._set_health(instance, False)
                self.metrics.failovers.inc()
        return self._relayed(reply, instance)

    def _relayed(self, reply: httpx.Response, instance: Instance) -> StreamingResponse:
        """The instance's answer to the client as it comes, with its status and headers."""
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

    async def proxy(self, request: Request) -> Response:
        """A route served by one instance (routes.py's INSTANCE): the request as it came
        (method, path, query, body, the client's key) to ``?instance=N`` or the least
        loaded decode instance, its answer relayed as it comes (a stream too)."""
        instance = self._proxy_target(request)
        if instance is None:
            return _error(503, "no decode instance is up", code="no_decode_instance")
        query = httpx.QueryParams(
            [(k, v) for k, v in request.query_params.multi_items() if k != "instance"]
        )
        headers = self._headers(request)
        headers["content-type"] = request.headers.get("content-type", "application/json")
        upstream = self.client.build_request(
            request.method,
            f"{instance.url}{request.url.path}",
            params=query,
            content=await request.body(),
            headers=headers,
        )
        try:
            reply = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            return _error(503, f"instance {instance.url} failed: {e}")
        instance.outstanding += 1  # _relay gives it back when the answer ends
        return self._relayed(reply, instance)

    async def broadcast(self, request: Request) -> Response:
        """A route every instance must serve alike (routes.py's EVERY: runtime LoRA
        loads): the request as it came to each instance in turn, prefill ones first; the
        first refusal is the answer (those before it took the request: logged), else the
        first instance's answer."""
        body, headers = await request.body(), self._headers(request)
        headers["content-type"] = request.headers.get("content-type", "application/json")
        first: Optional[httpx.Response] = None
        for n, instance in enumerate(self.prefill.instances + self.decode.instances):
            url = f"{instance.url}{request.url.path}"
            try:
                reply = await self.client.request(
                    request.method, url, content=body, headers=headers
                )
            except httpx.HTTPError as e:
                failed = _error(503, f"instance {instance.url} failed: {e}")
                return _refused(request, n, instance, failed)
            if reply.status_code >= 400:
                return _refused(request, n, instance, _passthrough(reply))
            first = first or reply
        assert first is not None  # the router has at least one instance
        return _passthrough(first)

    def _proxy_target(self, request: Request) -> Optional[Instance]:
        """``?instance=N``: the N-th decode instance (down or not, to look at it); else
        the policy's pick among those up."""
        chosen = request.query_params.get("instance")
        if chosen is not None and chosen.isdigit() and int(chosen) < len(self.decode.instances):
            return self.decode.instances[int(chosen)]
        return self.decode.pick()


LOAD_GAUGES = ("pagoda:num_requests_running", "pagoda:num_requests_waiting")


def instance_load(metrics_text: str) -> Optional[int]:
    """Running plus waiting requests from a pagoda instance's /metrics (None: not given)."""
    total, seen = 0.0, 0
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{", 1)[0] in LOAD_GAUGES:
            try:
                total += float(value.split()[0])
            except (ValueError, IndexError):
                return None
            seen += 1
    return int(total) if seen else None


def _refused(request: Request, taken: int, instance: Instance, answer: Response) -> Response:
    """A broadcast's answer when ``instance`` refused it, after ``taken`` took it."""
    if taken:
        logger.warning(
            "%s: %d instances took it before %s refused it", request.url.path, taken, instance.url
        )
    return answer


def _passthrough(reply: httpx.Response) -> Response:
    """An instance's whole answer, with its headers (x-pagoda-ignored-fields, ...)."""
    kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
    return Response(reply.content, status_code=reply.status_code, headers=kept)


def _error(status: int, message: str, code: Optional[str] = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def build_router(ns: argparse.Namespace) -> Router:
    """The router of ``pagoda router``'s arguments, subscribed to the instances' KV events
    when ``--kv-events URL=ENDPOINT`` names them (cache_aware: the precise index)."""
    decode = list(ns.decode or []) + list(getattr(ns, "replicas", None) or [])
    events = _url_map(getattr(ns, "kv_events", None) or [], "--kv-events")
    replays = _url_map(getattr(ns, "kv_events_replay", None) or [], "--kv-events-replay")
    cache = None
    if ns.policy == "cache_aware":
        cache = CacheAwarePolicy(
            ApproxPrefixIndex(ns.cache_index_size),
            EventPrefixIndex() if events else None,
            ns.cache_load_weight,
        )
    elif events:
        raise ValueError("--kv-events feeds --policy cache_aware; give that policy too")
    tokenizer = None
    if getattr(ns, "tokenizer", None):
        if cache is None or cache.precise is None:
            raise ValueError("--tokenizer serves --policy cache_aware with --kv-events")
        tokenizer = RouterTokenizer.load(ns.tokenizer, getattr(ns, "chat_template", None))
    router = Router(ns.prefill, decode, ns.policy, ns.health_interval, ns.api_key, cache, tokenizer)
    known = {i.url for i in router.prompt_pool.instances}
    for url, endpoint in events.items():
        if url not in known:
            raise ValueError(f"--kv-events names {url}, which is not an instance it routes to")
        router.subscribe(url, endpoint, replays.get(url))
    return router


def _url_map(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        url, sep, endpoint = pair.partition("=")
        if not sep or not endpoint:
            raise ValueError(f"{flag} takes URL=ENDPOINT, got {pair!r}")
        out[url.rstrip("/")] = endpoint
    return out


def build_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.check_health()
        task = asyncio.create_task(router.watch_health())
        yield
        task.cancel()
        await router.client.aclose()
        for sub in router.subscribers.values():
            sub.close()

    app = FastAPI(title="pagoda router", lifespan=lifespan)
    for route in ROUTES:
        if route.routing is Routing.PROMPT:
            app.add_api_route(route.path, _prompt_handler(router, route.path), methods=["POST"])
        elif route.routing is Routing.INSTANCE:
            app.add_api_route(route.path, _proxy_handler(router), methods=[route.method])
        elif route.routing is Routing.EVERY:
            app.add_api_route(route.path, _broadcast_handler(router), methods=[route.method])
    _add_local_routes(app, router)
    return app


def _prompt_handler(router: Router, path: str) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        return await router.route(path, request)

    return handle


def _proxy_handler(router: Router) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        return await router.proxy(request)

    return handle


def _broadcast_handler(router: Router) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        return await router.broadcast(request)

    return handle


def _add_local_routes(app: FastAPI, router: Router) -> None:
    @app.get("/health")
    async def health() -> Response:
        up = any(i.healthy for i in router.decode.instances)
        return JSONResponse(
            {"status": "ok" if up else "no decode instance"}, status_code=200 if up else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def main(ns: argparse.Namespace) -> int:
    import uvicorn

    router = build_router(ns)
    logger.warning(
        "router on %s:%d: prefill %s, decode %s",
        ns.host,
        ns.port,
        ns.prefill or "(none)",
        ns.decode,
    )
    uvicorn.run(build_app(router), host=ns.host, port=ns.port, log_level="warning")
    return 0
