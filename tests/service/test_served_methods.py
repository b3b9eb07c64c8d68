"""The wrapper each servicer method gets at registration: status mapping, latency, bounds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from catalog.client import CatalogClient
from catalog.core import Catalog
from catalog.errors import Internal, NotFound, ResourceExhausted
from catalog.service.server import create_server, open_catalog


def _count(method: str, code: str | None = None) -> float:
    """Calls of ``method`` observed so far (with status ``code``, or with any)."""
    codes = [code] if code else [c.name for c in grpc.StatusCode]
    return sum(
        REGISTRY.get_sample_value("loracat_rpc_seconds_count", {"method": method, "code": c}) or 0.0
        for c in codes
    )


@contextmanager
def _serving(root: Path, **limits: int) -> Iterator[tuple[Catalog, CatalogClient]]:
    catalog = open_catalog(root, cache_bytes=0)
    server, port = create_server(catalog, **limits)
    try:
        with CatalogClient(f"127.0.0.1:{port}", timeout=20) as client:
            yield catalog, client
    finally:
        server.stop(None).wait()
        catalog.close()


def _until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    ready = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        ready.wait(0.01)


def test_catalog_errors_keep_their_class_and_latency_is_observed(tmp_path, packs):
    with _serving(tmp_path / "root") as (_, client):
        client.push("acme/w", packs["qv-r4"])
        before = _count("Resolve")
        ok, missing = _count("Resolve", "OK"), _count("Resolve", "NOT_FOUND")
        assert client.resolve("acme/w").number == 1
        with pytest.raises(NotFound, match="acme/missing"):
            client.resolve("acme/missing")
        with pytest.raises(NotFound, match="99"):
            client.resolve("acme/w@99")
        # every call is timed, failed ones too, each under its status code
        assert _count("Resolve") == before + 3
        assert (_count("Resolve", "OK"), _count("Resolve", "NOT_FOUND")) == (ok + 1, missing + 2)


def test_a_streaming_handler_maps_errors_and_is_timed(tmp_path):
    with _serving(tmp_path / "root") as (_, client):
        before = _count("FetchPack")
        with pytest.raises(NotFound):
            client.fetch("acme/nothing")
        assert _count("FetchPack") >= before + 1


def test_an_unexpected_exception_is_internal_and_names_its_type(tmp_path, monkeypatch):
    with _serving(tmp_path / "root") as (catalog, client):

        def broken(ref: object) -> None:
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(catalog, "resolve_at_generation", broken)
        with pytest.raises(Internal, match="ZeroDivisionError: a bug"):
            client.resolve("acme/any")


def test_hint_watchers_do_not_starve_unary_calls_and_are_bounded(tmp_path, packs):
    with _serving(tmp_path / "root", max_workers=2, max_hint_watchers=3) as (catalog, client):
        client.push("acme/h", packs["qv-r4"])
        client.register_engine("engine-h", "tiny-llama-test", 8, 16)
        watched = _count("WatchHints")
        streams = [client.watch_hints("engine-h") for _ in range(3)]
        failures: list[BaseException] = []

        def read(stream) -> None:  # type: ignore[no-untyped-def]
            try:
                list(stream)
            except Exception as exc:  # a cancelled stream ends this way
                failures.append(exc)

        readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]
        for reader in readers:
            reader.start()
        try:
            _until(lambda: catalog.hints.subscribers() == 3)
            # three watchers hold three threads; unary calls still run, several at once
            results: list[int] = []
            callers = [
                threading.Thread(target=lambda: results.append(client.resolve("acme/h").number))
                for _ in range(6)
            ]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(30)
            assert results == [1] * 6
            # a fourth watcher is refused with a precise status
            with pytest.raises(ResourceExhausted, match="3 hint watchers"):
                list(client.watch_hints("engine-h"))
        finally:
            for stream in streams:
                stream.cancel()
            for reader in readers:
                reader.join(30)
        # a cancelled watcher gives its slot back (its call is timed once the slot is free)
        _until(lambda: _count("WatchHints") == watched + 4)
        again = client.watch_hints("engine-h")
        reader = threading.Thread(target=read, args=(again,), daemon=True)
        reader.start()
        try:
            _until(lambda: catalog.hints.subscribers() == 1)
        finally:
            again.cancel()
            reader.join(30)


def test_calls_that_wait_on_the_store_do_not_hold_up_index_reads(tmp_path, packs):
    """Index reads run on the event loop and the rest on the pool: a stuck store call (here a
    Stats that blocks) leaves resolves answering, and finishes normally once released."""
    with _serving(tmp_path / "root", max_workers=2, max_hint_watchers=0) as (catalog, client):
        client.push("acme/p", packs["qv-r4"])
        release = threading.Event()
        entered = threading.Event()
        stats = catalog.stats

        def stuck() -> dict:  # type: ignore[type-arg]
            entered.set()
            assert release.wait(30)
            return stats()

        catalog.stats = stuck  # type: ignore[method-assign]
        answers: list[dict] = []  # type: ignore[type-arg]
        waiting = [
            threading.Thread(target=lambda: answers.append(client.stats())) for _ in range(2)
        ]
        for thread in waiting:
            thread.start()
        try:
            assert entered.wait(30)
            # both pool threads are stuck: resolves and listings still answer
            for _ in range(20):
                assert client.resolve("acme/p").number == 1
            assert [s.adapter for s in client.list_adapters("acme").items] == [
                catalog.resolve("acme/p").adapter
            ]
            assert answers == []
        finally:
            release.set()
            for thread in waiting:
                thread.join(30)
        assert len(answers) == 2 and all(a["revisions"] == 1 for a in answers)


def test_the_loop_keeps_serving_while_an_index_swap_waits(tmp_path, packs):
    """A reindex waiting to swap the index in behind a long reader must not stall the event
    loop: the waiting resolve moves to the pool, health checks still answer on the loop."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _serving(tmp_path / "root") as (catalog, client):
        client.push("acme/s", packs["qv-r4"])
        swap = catalog._swap  # the lock a reindex takes exclusively to swap the index in
        swap.acquire_shared()  # a long reader (a verify, say)
        swapped = threading.Event()

        def reindex_swap() -> None:
            with swap.exclusive():
                swapped.set()

        writer = threading.Thread(target=reindex_swap)
        answers: list[int] = []
        resolver = threading.Thread(target=lambda: answers.append(client.resolve("acme/s").number))
        try:
            writer.start()
            _until(lambda: swap._writers_waiting == 1)
            resolver.start()
            with grpc.insecure_channel(client.target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(3):
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert answers == [] and not swapped.is_set()
        finally:
            swap.release_shared()
        writer.join(30)
        resolver.join(30)
        assert swapped.is_set() and answers == [1]


def test_stopping_with_a_stalled_push_in_flight_returns_and_leaves_no_thread(tmp_path):
    """A push whose client stops sending holds a pool thread that waits on the loop for the
    next message; stopping the server must end that call within the grace period."""
    import grpc

    from catalog._proto.loracat.v1 import catalog_pb2 as pb
    from catalog._proto.loracat.v1 import catalog_pb2_grpc as pb_grpc

    catalog = open_catalog(tmp_path / "root", cache_bytes=0)
    others = set(threading.enumerate())  # other tests' servers may be running
    server, port = create_server(catalog)
    release = threading.Event()
    codes: list[grpc.StatusCode] = []

    def ours() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if _server_thread(t) and t not in others]

    def stalled() -> Iterator[pb.PushRequest]:
        yield pb.PushRequest(header=pb.PushHeader(name="acme/stalled", size_bytes=10))
        release.wait(60)
        yield pb.PushRequest(chunk=b"x" * 10)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CatalogStub(channel)

        def push() -> None:
            try:
                stub.Push(stalled(), timeout=60)
            except grpc.RpcError as exc:
                codes.append(exc.code())

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        try:
            _until(lambda: any(t.name.startswith("loracat-rpc") for t in ours()))
            time.sleep(0.2)  # the header is in; the pool thread now waits for a chunk
            assert server.stop(grace=0.5).wait(20)
            pusher.join(20)
            assert codes and codes[0] != grpc.StatusCode.OK
            _until(lambda: not ours())
            with pytest.raises(NotFound):  # nothing of the cut push was committed
                catalog.resolve("acme/stalled")
        finally:
            release.set()
            catalog.close()


def _server_thread(thread: threading.Thread) -> bool:
    """The server's own threads: its event loop, its pool and its stopper."""
    return thread.name.startswith(("loracat-rpc", "loracat-grpc"))
