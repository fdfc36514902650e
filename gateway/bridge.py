"""The engine bridge: the only place the trio gateway meets Thespian.

One bridge thread owns the gateway's ``ActorSystem`` handle (the handle is not
thread-safe) and its :class:`~actors.boot.EngineLink`. Trio never calls
Thespian: it puts requests on a bounded queue; the bridge thread drains
everything that arrived since its last pass and sends it **in batches** (one
``EngineBatch`` per host), then listens for the engine's ``GatewayBatch``es
and hands each pass's messages to trio in one call
(``trio.from_thread.run_sync``), where they are fanned out to connections.

Embedded deployment: the bridge thread creates a ``simpleSystemBase`` system
and boots the engine, so every actor runs on the bridge thread. Multi-process:
it attaches to a booted ``multiprocTCPBase`` system by admin port.

Bounds: the request queue holds ``max_pending`` requests; when it is full,
:meth:`EngineBridge.submit` raises :class:`BridgeBusy` and the gateway answers
``rate_limited`` rather than queue without limit. The listen timeout (a few ms)
is the most a request waits for the bridge thread's next pass.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Literal

import attrs
import trio

from actors.boot import EngineLink, boot_engine
from actors.host import EngineConfig
from actors.messages import Dest
from actors.runtime import SystemConfig, start_system, stop_system

log = logging.getLogger(__name__)


class BridgeBusy(Exception):  # noqa: N818 - a normal, reportable condition
    """The request queue is full: the engine is behind."""


class BridgeStopped(Exception):  # noqa: N818
    """The bridge is not running."""


@attrs.frozen(kw_only=True)
class BridgeOptions:
    base: Literal["simpleSystemBase", "multiprocTCPBase"] = "simpleSystemBase"
    admin_port: int | None = None  # multiprocTCPBase: the booted system's admin port
    engine: EngineConfig | None = None  # simpleSystemBase: the engine to boot in-thread
    gateway_id: str = "gw1"
    max_pending: int = 100_000
    listen_s: float = 0.002


class EngineBridge:
    """A bridge thread between trio and the actor engine; see the module docstring."""

    def __init__(self, options: BridgeOptions) -> None:
        self.options = options
        self._requests: queue.Queue[tuple[Dest, Any] | Callable[[EngineLink], Any]] = (
            queue.Queue(maxsize=options.max_pending)
        )
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._idle = False
        self.sent_batches = 0
        self.sent_items = 0
        self.received = 0

    # -- trio side -------------------------------------------------------------------

    def submit(self, dest: Dest, item: Any) -> None:
        """Queue one request for the engine (non-blocking).

        Raises:
            BridgeBusy: the queue is full.
            BridgeStopped: the bridge is not running.
        """
        if self._stop.is_set() or self._thread is None:
            raise BridgeStopped("the engine bridge is not running")
        try:
            self._requests.put_nowait((dest, item))
        except queue.Full:
            raise BridgeBusy("the engine is behind; try again") from None

    def call(self, fn: Callable[[EngineLink], Any]) -> None:
        """Run ``fn(link)`` on the bridge thread (e.g. to open an account)."""
        self._requests.put(fn)

    async def start(self, deliver: Callable[[list[Any]], None]) -> None:
        """Start the bridge thread; returns when the engine is reachable.

        Args:
            deliver: called on the trio thread with each pass's engine messages.
        """
        token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._run, args=(token, deliver), name="engine-bridge", daemon=True
        )
        self._thread.start()
        await trio.to_thread.run_sync(self._ready.wait)
        if self._error is not None:
            raise RuntimeError(f"the engine bridge failed to start: {self._error}") from None

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await trio.to_thread.run_sync(self._thread.join)

    # -- the bridge thread ---------------------------------------------------------------

    def _run(self, token: trio.lowlevel.TrioToken, deliver: Callable[[list[Any]], None]) -> None:
        opts = self.options
        asys: Any = None
        try:
            if opts.base == "simpleSystemBase":
                asys = start_system(SystemConfig(base="simpleSystemBase"))
                assert opts.engine is not None, "the embedded bridge needs an engine config"
                boot_engine(asys, opts.engine)
            else:
                port = opts.admin_port or 19500
                asys = start_system(SystemConfig(base=opts.base, admin_port=port), attach=True)
            link = EngineLink(asys, opts.gateway_id)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            if asys is not None and opts.base == "simpleSystemBase":
                stop_system(asys)
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._pass(link, token, deliver)
        except trio.RunFinishedError:
            pass
        except Exception:
            log.exception("the engine bridge failed")
            raise
        finally:
            try:
                link.close()
            finally:
                if opts.base == "simpleSystemBase":
                    stop_system(asys)

    def _pass(self, link: EngineLink, token: trio.lowlevel.TrioToken,
              deliver: Callable[[list[Any]], None]) -> None:
        items: list[tuple[Dest, Any]] = []
        first = True
        while True:
            try:
                if first and self._idle and self.options.base == "simpleSystemBase":
                    # simpleSystemBase's listen() returns at once when no actor has work
                    # (it does not wait for its timeout), so an idle bridge would spin and
                    # starve the trio thread of the GIL: block on the queue briefly instead
                    # (a new request wakes it at once; due timers run on the next pass).
                    req = self._requests.get(timeout=self.options.listen_s)
                else:
                    req = self._requests.get_nowait()
            except queue.Empty:
                break
            finally:
                first = False
            if callable(req):
                if items:
                    self.sent_batches += link.send(items)
                    self.sent_items += len(items)
                    items = []
                try:
                    req(link)
                except Exception:
                    log.exception("an engine call failed")
            else:
                items.append(req)
        if items:
            self.sent_batches += link.send(items)
            self.sent_items += len(items)
        got = link.receive(self.options.listen_s)
        self._idle = not got and not items
        if got:
            self.received += len(got)
            trio.from_thread.run_sync(deliver, got, trio_token=token)
