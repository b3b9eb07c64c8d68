"""The conformance suite against LMDB, plus what only a persistent index has to get right."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import keys
from catalog.errors import CatalogError, Conflict, FailedPrecondition, NotFound, ResourceExhausted
from catalog.events import Event
from catalog.index.base import RevisionIndex
from catalog.index.lmdb_index import SCHEMA_VERSION, LmdbIndex
from catalog.index.memory_index import MemoryIndex
from catalog.model import Ref
from tests.index.suite import ACME_X, RevisionIndexSuite, busy_history, snapshot
from tests.index.writer import MANIFEST, Writer, digest_of, name

REPO = Path(__file__).resolve().parents[2]


class TestLmdbIndex(RevisionIndexSuite):
    def make_index(self, path: Path) -> RevisionIndex:
        # a small first map so that growing it is exercised by ordinary tests too
        return LmdbIndex(path, map_size=256 * 1024, sync=False)


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    index = LmdbIndex(tmp_path / "ix")
    writer = Writer(index)
    busy_history(writer)
    pending = writer.push_event(name("acme/x"))
    index.add_intent(pending)
    before = snapshot(index)
    index.close()
    with LmdbIndex(tmp_path / "ix") as reopened:
        assert snapshot(reopened) == before
        assert reopened.intents() == [pending]
        reopened.apply(pending)  # interned ids from the first session still resolve
        assert reopened.intents() == []
        assert reopened.resolve(Ref.parse("acme/x")).target_modules == ("q_proj", "v_proj")


def test_same_answers_as_memory_index(tmp_path: Path) -> None:
    memory = Writer(MemoryIndex())
    busy_history(memory)
    with LmdbIndex(tmp_path / "ix") as index:
        assert index.apply_many(memory.events) == len(memory.events)
        assert snapshot(index) == snapshot(memory.index)


def test_map_grows_under_concurrent_readers(tmp_path: Path) -> None:
    index = LmdbIndex(tmp_path / "ix", map_size=64 * 1024, sync=False, batch_events=50)
    writer = Writer(index)
    writer.push(ACME_X)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                assert index.resolve(Ref.parse("acme/x@1")).number == 1
                index.list_revisions(ACME_X, page_size=50)
        except BaseException as exc:  # reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        events = [_push(f"t{i % 50}/a{i // 50}", 1, i) for i in range(3000)]
        assert index.apply_many(events) == 3000
        for stale in events[:20]:  # refused events end their transaction without stalling
            with pytest.raises(Conflict):
                index.apply(stale)
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert errors == []
    counts = index.counts()
    assert counts["revisions"] == 3001
    assert counts["map_size"] > 64 * 1024
    index.close()


def _push(adapter: str, number: int, label: int) -> Event:
    return Event(
        name(adapter),
        number,
        "push",
        float(label),
        revision=number,
        digest=digest_of(f"{adapter}{label}"),
        size_bytes=label,
        manifest=MANIFEST,
        metadata={"label": str(label)},
    )


_GROWER = """
import sys
from catalog.index.lmdb_index import LmdbIndex
from tests.index.test_lmdb_index import _push

label, count = sys.argv[2], int(sys.argv[3])
with LmdbIndex(sys.argv[1], map_size=64 * 1024, sync=False, batch_events=500) as index:
    index.apply_many(_push(f"{label}/a{i}", 1, i) for i in range(count))
    print(index.counts()["map_size"])
"""


def _grow_in_another_process(path: Path, label: str, count: int) -> int:
    """Push ``count`` adapters under tenant ``label`` from a child process; its map size."""
    grown = subprocess.run(
        [sys.executable, "-c", _GROWER, str(path), label, str(count)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(grown.stdout)


def test_a_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    # Several processes may open one index; LMDB refuses a transaction of a process whose map is
    # smaller than the one another process grew it to (MapResizedError) until it adopts it.
    with LmdbIndex(tmp_path / "ix", map_size=64 * 1024, sync=False) as index:
        index.apply(_push("acme/x", 1, 0))
        first = _grow_in_another_process(tmp_path / "ix", "one", 2000)
        assert first > 64 * 1024
        index.apply(_push("acme/y", 1, 1))  # a write adopts the grown map
        second = _grow_in_another_process(tmp_path / "ix", "two", 20_000)
        assert second > first
        assert index.resolve(Ref.parse("two/a19999")).number == 1  # and so does a read
        counts = index.counts()
        assert (counts["revisions"], counts["map_size"]) == (22_002, second)


def test_full_map_is_resource_exhausted_and_writes_nothing(tmp_path: Path) -> None:
    index = LmdbIndex(tmp_path / "ix", map_size=64 * 1024, max_map_size=128 * 1024)
    index.apply(_push("acme/x", 1, 0))
    big = [_push(f"acme/a{i}", 1, i) for i in range(5000)]
    with pytest.raises(ResourceExhausted, match="max_map_size"):
        index.apply_many(big)
    assert index.counts()["revisions"] < 5001
    assert index.resolve(Ref.parse("acme/x")).number == 1
    index.close()


def test_apply_many_across_batches_commits_up_to_the_refused_event(tmp_path: Path) -> None:
    with LmdbIndex(tmp_path / "ix", batch_events=4) as index:
        events = [_push("acme/x", n, n) for n in range(1, 11)]
        events[8] = Event(name("acme/x"), 9, "delete", 9.0, revision=77)
        with pytest.raises(FailedPrecondition, match="revision 77"):
            index.apply_many(events)
        state = index.adapter_state(ACME_X)
        assert state is not None
        assert (state.next_seq, state.latest) == (9, 8)


def test_other_schema_is_refused(tmp_path: Path) -> None:
    LmdbIndex(tmp_path / "ix").close()
    env = lmdb.open(str(tmp_path / "ix"), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(keys.encode("schema"), str(SCHEMA_VERSION + 1).encode(), db=meta)
    env.close()
    with pytest.raises(FailedPrecondition, match="rebuild it with reindex"):
        LmdbIndex(tmp_path / "ix")


def test_bytes_on_disk_counts_the_data_file(tmp_path: Path) -> None:
    with LmdbIndex(tmp_path / "ix") as index:
        empty = index.counts()["bytes_on_disk"]
        index.apply_many(_push(f"acme/a{i}", 1, i) for i in range(2000))
        counts = index.counts()
        assert counts["bytes_on_disk"] > empty
        assert counts["bytes_used"] <= counts["bytes_on_disk"]


# -- property: LMDB answers exactly what the in-memory index answers -----------------------------

ADAPTERS = ["acme/x", "acme2/x", "acme/x2"]
ALIASES = ["serving", "canary"]

operation = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(ADAPTERS), st.integers(0, 3)),
    st.tuples(st.just("alias"), st.sampled_from(ADAPTERS), st.sampled_from(ALIASES),
              st.integers(0, 6), st.booleans()),
    st.tuples(st.just("delete"), st.sampled_from(ADAPTERS), st.integers(1, 6)),
    st.tuples(st.just("metadata"), st.sampled_from(ADAPTERS), st.integers(1, 6),
              st.sampled_from(["a", "b"])),
)  # fmt: skip


def _run(writer: Writer, op: tuple[object, ...]) -> str:
    """Apply one generated operation; the outcome is the error class and message, or ok."""
    kind, adapter_text = op[0], name(str(op[1]))
    try:
        if kind == "push":
            writer.push(adapter_text, digest=digest_of(f"bytes{op[2]}"))  # shared bytes too
        elif kind == "alias":
            _, _, alias, revision, stale = op
            state = writer.index.adapter_state(adapter_text)
            current = state.aliases.get(str(alias), 0) if state else 0
            writer.alias(adapter_text, str(alias), int(revision), current + 1 if stale else current)  # type: ignore[call-overload]
        elif kind == "delete":
            writer.delete(adapter_text, int(op[2]))  # type: ignore[call-overload]
        else:
            writer.metadata(adapter_text, int(op[2]), {str(op[3]): str(len(writer.events))})  # type: ignore[call-overload]
    except CatalogError as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(operation, max_size=40))
def test_lmdb_matches_memory_on_random_histories(
    tmp_path: Path, ops: list[tuple[object, ...]]
) -> None:
    label = f"ix{len(list(tmp_path.iterdir()))}"
    memory = Writer(MemoryIndex())
    with LmdbIndex(tmp_path / label, map_size=1 << 20, sync=False, batch_events=3) as index:
        durable = Writer(index)
        for op in ops:
            assert _run(durable, op) == _run(memory, op)
        assert snapshot(index) == snapshot(memory.index)
        for ref in ("acme/x", "acme/x@serving", "acme2/x@1"):
            assert _resolve(index, ref) == _resolve(memory.index, ref)
        with LmdbIndex(tmp_path / f"{label}-replay", sync=False, batch_events=3) as replay:
            replay.apply_many(durable.events)
            assert snapshot(replay) == snapshot(index)


def _resolve(index: RevisionIndex, ref: str) -> object:
    try:
        return index.resolve(Ref.parse(ref)).to_json()
    except NotFound as error:
        return str(error)
