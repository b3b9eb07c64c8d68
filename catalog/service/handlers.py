"""The catalog's methods as ``grpc.aio`` handlers: index reads on the event loop, the rest on a
thread pool.

Why an event loop. At 10^6 revisions a ``Resolve`` that misses the answer cache makes about
fifteen LMDB calls, and py-lmdb releases the GIL around each one (transaction begin, every
cursor move, every value read). In a thread-per-call server, dozens of handler threads want the
GIL back, so each release hands it to another thread and the resolve queues again, fifteen times
a call: uniformly random refs ran at 0.52x a raw echo RPC at 64 callers. With the index reads run
inline on the loop, a release finds nobody waiting, and the same misses run at ~0.8x echo
(``bench/bench_scale.py``, whose echo server is an asyncio server too; the two server kinds side
by side: ``bench/bench_server_kind.py``).

What runs where:

* ``INLINE_METHODS`` read the LMDB index only, with no I/O beyond the page cache (a resolve
  takes tens of microseconds, a page of a listing a few milliseconds), so they run on the loop
  thread itself. The loop never waits for the catalog's swap lock
  (``catalog.locks.never_wait_here``): while a reindex waits to swap the index in behind a long
  reader (a verify, a gc), an index read moves to the pool and waits there, and every other
  call keeps being served;
* everything else (pushes, alias moves and deletes that write the durable log, fetches that may
  read S3, prefetch, hint streams, gc, verify, reindex, checkpoint, stats) runs on the thread
  pool, so a slow store never stalls the loop. A stream moves one message per hop between the
  pool and the loop; a client stream (``Push``) is read by the pool thread through the loop.

Each handler maps exceptions to status codes (``catalog.service.errors.status_for``), observes
its duration and status code in ``loracat_rpc_seconds`` (streams: until the last message)
and, with ``serve --access-log``, logs one line per call, and ``WatchHints``
refuses more than ``max_hint_watchers`` streams with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from time import monotonic, perf_counter
from typing import Any

import grpc

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.errors import ResourceExhausted
from catalog.locks import WouldBlock
from catalog.service.auth import Guard
from catalog.service.errors import ERROR_CLASS_KEY, status_for
from catalog.service.metrics import Observe, rpc_observer

SERVICE = pb.DESCRIPTOR.services_by_name["Catalog"]
SERVICE_NAME = SERVICE.full_name
HINT_WATCH_METHOD = "WatchHints"
#: Methods that only read the index: run inline on the event loop (see the module docstring).
INLINE_METHODS = frozenset({"Resolve", "ListAdapters", "ListRevisions", "AliasHistory"})

Behavior = Callable[[Any, Any], Any]
_END = object()
#: The status code a call that raised nothing is observed with.
OK = grpc.StatusCode.OK.name


class CallState:
    """What a handler running on a pool thread may ask of its call: whether it is still active,
    its metadata (for ``catalog.service.auth``), its peer and the time left before its deadline.

    (The ``grpc.aio`` context belongs to the loop; this copies what it needs there and reads a
    flag its done-callback sets.)
    """

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._done = threading.Event()
        context.add_done_callback(lambda _: self._done.set())
        self._metadata = context.invocation_metadata()
        self._peer = context.peer()  # who asked, for the request record
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else monotonic() + remaining

    def is_active(self) -> bool:
        return not self._done.is_set()

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return str(self._peer)

    def time_remaining(self) -> float | None:
        """Seconds until the client's deadline (negative once past); None without one."""
        return None if self._deadline is None else self._deadline - monotonic()


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: Exception,
    observe: Observe,
    start: float,
    peer: str,
) -> None:
    code, details, error_class = status_for(exc)
    # timed before the status goes out: a client that saw the error sees the call counted
    observe(perf_counter() - start, code.name, peer)
    if error_class:
        context.set_trailing_metadata(((ERROR_CLASS_KEY, error_class),))
    await context.abort(code, details)


def _unary(behavior: Behavior, observe: Observe, pool: Executor, run_inline: bool) -> Any:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        inline = run_inline
        start = perf_counter()
        peer = context.peer()
        try:
            try:
                if inline:
                    response = behavior(request, context)
            except WouldBlock:  # an index swap is under way: wait for it on the pool
                inline = False
            if not inline:
                loop = asyncio.get_running_loop()
                response = await loop.run_in_executor(pool, behavior, request, CallState(context))
        except Exception as exc:
            await _abort(context, exc, observe, start, peer)
        observe(perf_counter() - start, OK, peer)
        return response

    return handle


class _Pump:
    """A sync iterator stepped from pool threads, one step at a time (closing waits for a step
    under way, so the generator is never closed while it runs)."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._make = make
        self._iterator: Iterator[Any] | None = None
        self._lock = threading.Lock()

    def step(self) -> Any:
        with self._lock:
            if self._iterator is None:
                self._iterator = iter(self._make())
            return next(self._iterator, _END)

    def close(self) -> None:
        with self._lock:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()


def _server_stream(behavior: Behavior, observe: Observe, pool: Executor) -> Any:
    async def handle(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        start = perf_counter()
        peer = context.peer()
        loop = asyncio.get_running_loop()
        state = CallState(context)
        pump = _Pump(lambda: behavior(request, state))
        failed = False
        try:
            while (item := await loop.run_in_executor(pool, pump.step)) is not _END:
                yield item
        except Exception as exc:
            failed = True
            await _abort(context, exc, observe, start, peer)
        finally:
            # also when the client went away mid-stream: end the generator on the pool (its
            # own cleanup, such as a watcher's slot, runs there), then time the call
            def close_and_time() -> None:
                pump.close()
                if not failed:
                    observe(perf_counter() - start, OK, peer)

            try:
                pool.submit(close_and_time)
            except RuntimeError:  # the pool is shut down: the server is stopping
                close_and_time()

    return handle


async def _next_or_end(messages: AsyncIterator[Any]) -> Any:
    try:
        return await messages.__anext__()
    except StopAsyncIteration:
        return _END


def _client_stream(behavior: Behavior, observe: Observe, pool: Executor) -> Any:
    async def handle(
        messages: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        start = perf_counter()
        peer = context.peer()
        loop = asyncio.get_running_loop()

        def requests() -> Iterator[Any]:  # iterated on a pool thread
            while True:
                message = asyncio.run_coroutine_threadsafe(_next_or_end(messages), loop).result()
                if message is _END:
                    return
                yield message

        try:
            response = await loop.run_in_executor(pool, behavior, requests(), CallState(context))
        except Exception as exc:
            await _abort(context, exc, observe, start, peer)
        observe(perf_counter() - start, OK, peer)
        return response

    return handle


def _bounded_stream(behavior: Behavior, slots: int) -> Behavior:
    free = threading.BoundedSemaphore(slots)

    def bounded(request: Any, context: Any) -> Iterator[Any]:
        if not free.acquire(blocking=False):
            raise ResourceExhausted(
                f"the catalog already serves {slots} hint watchers; retry later"
            )
        try:
            yield from behavior(request, context)
        finally:
            free.release()

    return bounded


def catalog_handlers(
    servicer: object,
    pool: Executor,
    *,
    max_hint_watchers: int,
    guard: Guard | None = None,
    access_log: logging.Logger | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """One ``grpc.aio`` method handler per method of the ``Catalog`` service, calling the
    same-named method of ``servicer`` (sync methods taking ``(request, context)``), behind
    ``guard`` (authentication, authorization, audit) when one is given; ``access_log`` gets a
    line per call."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        behavior: Behavior = getattr(servicer, method.name)
        if method.name == HINT_WATCH_METHOD:
            behavior = _bounded_stream(behavior, max_hint_watchers)
        if guard is not None:  # outermost: nothing runs for a caller it refuses
            behavior = guard.wrap(
                method.name,
                behavior,
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
            )
        observe = rpc_observer(method.name, access_log)
        decode = getattr(pb, method.input_type.name).FromString
        encode = getattr(pb, method.output_type.name).SerializeToString
        if method.client_streaming and method.server_streaming:
            raise NotImplementedError(f"{method.name}: bidirectional streams are not served")
        if method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _client_stream(behavior, observe, pool), decode, encode
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(behavior, observe, pool), decode, encode
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behavior, observe, pool, method.name in INLINE_METHODS), decode, encode
            )
    return handlers
