"""The server's LoRA adapters by name: what a request's ``model`` selects, what /v1/models lists.

The catalog maps a name to one :class:`~pagoda.lora_request.LoRARequest`. Adapters come from
``--lora-modules`` (read and checked against the served model before the server listens: a
bad one stops the start with its message) and, behind ``--allow-runtime-lora``, from vLLM's
``POST /v1/load_lora_adapter`` (only from directories under ``--lora-allowed-dir``, read off
the event loop so it keeps serving). Checking an adapter is reading it as the engine will
(``lora/adapter.py``: the base's shapes, ``--max-lora-rank``), so a bad one is refused here
with the tensor named, never halfway through a step. Each read runs on a thread of its own
with one torch thread: the server's threads other than the engine's run no OpenMP pool
(docs/server.md, "The engine is built on its own thread"), and the reader's ends with it.

Unloading drops the name at once: requests already running under the adapter finish (each
holds its LoRARequest), new ones get the 404 of an unknown model. Its weights leave the
engine's host set once no request the engine holds runs under it (``forget_when_idle``).

Invariant: a name maps to at most one adapter, and an id is handed out once per process (an
unload and a load of the same name take a new id), so no cached KV outlives its weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, TypeVar

from pagoda.engine.async_engine import EngineDeadError
from pagoda.entrypoints.errors import ApiError
from pagoda.entrypoints.openai.args import LoRAModule
from pagoda.lora_request import LoRARequest

if TYPE_CHECKING:
    from pagoda.engine.async_engine import AsyncEngine
    from pagoda.lora.adapter import Target
    from pagoda.models.config import ModelArch

logger = logging.getLogger("pagoda.server")
T = TypeVar("T")

FORGET_RETRY_S = 1.0  # how often an unloaded adapter's weights are offered to be dropped
LISTED_NAMES = 8  # a 404 for an unknown model lists at most this many adapter names
# What each refusal is called (OpenAI's ``code``).
NOT_ENABLED = "lora_not_enabled"
RUNTIME_OFF = "lora_runtime_updates_off"
PATH_NOT_ALLOWED = "lora_path_not_allowed"
ADAPTER_EXISTS = "lora_adapter_exists"
ADAPTER_NOT_FOUND = "lora_adapter_not_found"
INVALID_ADAPTER = "invalid_lora_adapter"


# ------------------------------------------------------------------ the flags
@dataclass(frozen=True)
class LoRAServing:
    """What the server's flags say about adapters."""

    enabled: bool = False  # --enable-lora (or --lora-modules): the engine serves adapters
    max_rank: int = 16  # --max-lora-rank
    modules: tuple[LoRAModule, ...] = ()  # --lora-modules, read at start
    allow_runtime: bool = False  # --allow-runtime-lora or VLLM_ALLOW_RUNTIME_LORA_UPDATING
    allowed_dirs: tuple[str, ...] = ()  # --lora-allowed-dir: runtime loads only below these


# ------------------------------------------------------------------ the catalog
@dataclass(frozen=True)
class Entry:
    """One adapter the server serves."""

    lora: LoRARequest
    parent: str  # the base model's served name (/v1/models' ``parent``)
    num_bytes: int  # its weights, as read (Ollama's ``size``)
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterCatalog:
    """Adapters by name, over a base served as ``base_names`` (the first is its name)."""

    def __init__(
        self, serving: LoRAServing, base_names: Sequence[str], arch: Optional[ModelArch]
    ) -> None:
        self.serving = serving
        self.base_names = list(base_names)
        self._arch = arch
        self._targets: Optional[Mapping[str, Target]] = None
        self._entries: dict[str, Entry] = {}
        self._loading: set[str] = set()  # names being read by a runtime load
        self._last_id = 0

    # ---------------------------------------------------------------- reading
    def get(self, name: str) -> Optional[LoRARequest]:
        entry = self._entries.get(name)
        return entry.lora if entry is not None else None

    def entry(self, name: str) -> Optional[Entry]:
        return self._entries.get(name)

    def entries(self) -> list[Entry]:
        """Every adapter, in the order they were loaded."""
        return list(self._entries.values())

    def unknown_model(self, model: str) -> str:
        """The 404's message for a ``model`` that is neither the base nor an adapter."""
        served = f"this server serves {self.base_names[0]!r}"
        names = list(self._entries)
        if names:
            shown = ", ".join(repr(n) for n in names[:LISTED_NAMES])
            more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
            served += f" and the LoRA adapters {shown}{more}"
        return f"The model {model!r} does not exist; {served}"

    # ---------------------------------------------------------------- at start
    def add_modules(self) -> None:
        """Read and check every ``--lora-modules`` adapter (before the server listens);
        ValueError naming the module and what was wrong."""
        for module in self.serving.modules:
            where = f"--lora-modules {module.name}={module.path}"
            if not self.serving.enabled:
                raise ValueError(f"{where}: LoRA is off (--enable-lora)")
            try:
                self._check_name(module.name)
                parent = self._parent(module.base_model_name)
                num_bytes = on_reader_thread(partial(self._read, module.path, True))
            except (ApiError, ValueError, OSError) as e:
                raise ValueError(f"{where}: {e}") from None
            entry = self._add(module.name, module.path, parent, num_bytes)
            logger.info(
                "LoRA adapter %r (id %d) from %s", module.name, entry.lora.lora_int_id, module.path
            )

    def _parent(self, base_model_name: Optional[str]) -> str:
        if base_model_name is None:
            return self.base_names[0]
        if base_model_name not in self.base_names:
            raise ValueError(
                f"base_model_name {base_model_name!r} is not a name of the served model "
                f"({', '.join(repr(n) for n in self.base_names)})"
            )
        return base_model_name

    # ---------------------------------------------------------------- at runtime
    async def load(
        self, name: str, path: str, replace: bool = False
    ) -> tuple[LoRARequest, Optional[LoRARequest]]:
        """vLLM's ``/v1/load_lora_adapter``: the adapter at ``path`` (a directory under
        ``--lora-allowed-dir``) read in a worker thread, then served as ``name``; ``replace``
        (vLLM's ``load_inplace``): in place of the adapter of that name, under a new id.
        The new adapter and the one it replaced; ApiError naming the field."""
        self.check_runtime()
        if not name:
            raise ApiError(400, "lora_name must be a non-empty string", "lora_name")
        if name in self._loading:
            raise _exists(name)
        self._check_name(name, replace)
        real = self._allowed(path)
        self._loading.add(name)
        try:
            read = partial(self._read, real, False)
            num_bytes = await asyncio.to_thread(on_reader_thread, read)
        except (ValueError, OSError) as e:
            raise ApiError(400, f"lora_path {path!r}: {e}", "lora_path", INVALID_ADAPTER) from None
        finally:
            self._loading.discard(name)
        old = self._entries.pop(name, None)
        new = self._add(name, real, self.base_names[0], num_bytes).lora
        return new, old.lora if old is not None else None

    def unload(self, name: Optional[str], lora_int_id: Optional[int] = None) -> LoRARequest:
        """vLLM's ``/v1/unload_lora_adapter``: the adapter named (or of ``lora_int_id``) is
        no longer served; 404 when there is none."""
        self.check_runtime()
        if not name and lora_int_id is None:
            raise ApiError(400, "give lora_name (or lora_int_id)", "lora_name")
        entry = self._find(name, lora_int_id)
        del self._entries[entry.lora.lora_name]
        return entry.lora

    def check_runtime(self) -> None:
        """Runtime updates need LoRA on and the opt-in; a 404 otherwise, as vLLM's server
        (which does not serve these routes then), naming what to change."""
        if not self.serving.enabled:
            raise ApiError(
                404,
                "this server serves no LoRA adapters (start it with --enable-lora)",
                code=NOT_ENABLED,
            )
        if not self.serving.allow_runtime:
            raise ApiError(
                404,
                "runtime LoRA updates are off: start the server with --allow-runtime-lora "
                "(or VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) and --lora-allowed-dir DIR",
                code=RUNTIME_OFF,
            )

    def _find(self, name: Optional[str], lora_int_id: Optional[int]) -> Entry:
        for entry in self._entries.values():
            if name and entry.lora.lora_name != name:
                continue
            if lora_int_id is not None and entry.lora.lora_int_id != lora_int_id:
                continue
            return entry
        param = "lora_name" if name else "lora_int_id"
        which = repr(name) if name else f"of id {lora_int_id}"
        raise ApiError(404, f"The lora adapter {which} cannot be found.", param, ADAPTER_NOT_FOUND)

    def _allowed(self, path: str) -> str:
        """``path`` resolved (symlinks followed), when it and the files read from it lie
        under an allowed directory; 400 naming ``lora_path`` otherwise, 404 when it is not
        there (vLLM's answer for an adapter it cannot find). A runtime load never fetches
        from the Hub."""
        if not path:
            raise ApiError(400, "lora_path must be a non-empty string", "lora_path")
        dirs = [os.path.realpath(d) for d in self.serving.allowed_dirs]
        if not dirs:
            raise ApiError(
                400,
                f"lora_path {path!r} is refused: runtime loads are allowed only from the "
                "directories given with --lora-allowed-dir, and none was given",
                "lora_path",
                PATH_NOT_ALLOWED,
            )
        real = os.path.realpath(path)
        if not _under(real, dirs):
            raise ApiError(
                400,
                f"lora_path {path!r} is outside the directories runtime loads may read "
                f"(--lora-allowed-dir {' '.join(self.serving.allowed_dirs)})",
                "lora_path",
                PATH_NOT_ALLOWED,
            )
        if not os.path.isdir(real):
            raise ApiError(
                404,
                f"lora_path {path!r}: no adapter directory there",
                "lora_path",
                ADAPTER_NOT_FOUND,
            )
        for file in _adapter_files(real):
            if not _under(os.path.realpath(file), dirs):
                raise ApiError(
                    400,
                    f"lora_path {path!r}: {os.path.basename(file)} links outside the allowed "
                    "directories",
                    "lora_path",
                    PATH_NOT_ALLOWED,
                )
        return real

    # ---------------------------------------------------------------- both
    def _check_name(self, name: str, replace: bool = False) -> None:
        """A new adapter's name: not the base's, not an adapter's (unless it replaces it)."""
        if name in self.base_names:
            raise ApiError(
                400, f"lora_name {name!r} is the base model's name", "lora_name", ADAPTER_EXISTS
            )
        if name in self._entries and not replace:
            raise _exists(name)

    def _read(self, path: str, resolve: bool) -> int:
        """Read the adapter as the engine will (checked against the base and
        ``--max-lora-rank``); its weights' bytes. AdapterError (a ValueError) naming the
        field or tensor; ``resolve``: a Hub id is fetched (``--lora-modules`` only)."""
        from pagoda.lora.adapter import read_adapter, targets_for
        from pagoda.models.hub import resolve_adapter

        if self._targets is None:
            assert self._arch is not None, "an adapter catalog without the base's shapes"
            self._targets = targets_for(self._arch)
        local = resolve_adapter(path) if resolve else path
        return read_adapter(local, self._targets, self.serving.max_rank).num_bytes

    def _add(self, name: str, path: str, parent: str, num_bytes: int) -> Entry:
        self._last_id += 1
        entry = Entry(LoRARequest(name, self._last_id, path, parent), parent, num_bytes)
        self._entries[name] = entry
        return entry


def on_reader_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a short-lived thread of its own with one torch thread (so no OpenMP pool
    opens beside the engine's); what it returned, or what it raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        import torch

        torch.set_num_threads(1)
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            outcome["error"] = e

    reader = threading.Thread(target=run, name="pagoda-lora-reader", daemon=True)
    reader.start()
    reader.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


def _exists(name: str) -> ApiError:
    return ApiError(
        400, f"The lora adapter {name!r} has already been loaded.", "lora_name", ADAPTER_EXISTS
    )


def _under(path: str, dirs: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, d]) == d for d in dirs)


def _adapter_files(directory: str) -> list[str]:
    from pagoda.lora.adapter import CONFIG_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE

    names = (CONFIG_FILE, WEIGHTS_FILE, PICKLED_WEIGHTS_FILE)
    return [p for p in (os.path.join(directory, n) for n in names) if os.path.lexists(p)]


# ------------------------------------------------------------------ the engine's copy
async def forget_when_idle(async_engine: AsyncEngine[Any], lora_int_id: int) -> None:
    """Drop an unloaded adapter's weights from the engine (``LoRASlots.forget``), on the
    engine thread, once no request the engine holds runs under it: asked again every
    FORGET_RETRY_S until then (a request still waiting would otherwise read it from disk
    again). Gives up quietly when the engine has died."""
    while True:
        try:
            if await async_engine.call(partial(_forget_if_idle, lora_int_id)):
                logger.info("LoRA adapter id %d: its weights left the engine", lora_int_id)
                return
        except EngineDeadError:
            return
        await asyncio.sleep(FORGET_RETRY_S)


def _forget_if_idle(lora_int_id: int, engine: Any) -> bool:
    """On the engine thread: ``LLMEngine.forget_adapter`` (which keeps the weights while a
    live request runs under them); whether they left."""
    return bool(engine.forget_adapter(lora_int_id))
