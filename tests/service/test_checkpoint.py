"""Log checkpoints: checkpoint + tail replays to what the full log replays to, and a checkpoint
that is corrupt, truncated or contradicts the log is never trusted."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from catalog import checkpoint as checkpoints
from catalog.checkpoint import (
    CHECKPOINT_PREFIX,
    checkpoint_key,
    list_checkpoints,
    load_log,
    prune_checkpoints,
    verify_checkpoints,
    write_checkpoint,
)
from catalog.core import Catalog
from catalog.errors import Conflict, DataLoss, InvalidArgument
from catalog.events import LOG_PREFIX, Event, log_key
from catalog.index.base import RevisionIndex
from catalog.index.lmdb_index import LmdbIndex
from catalog.index.memory_index import MemoryIndex
from catalog.model import AdapterName
from catalog.pack.synthetic import random_pack
from catalog.storage import BlobStore, open_store

STORES = ["memory", "file", pytest.param("s3", marks=pytest.mark.s3)]


class CountingStore(BlobStore):
    """A store that records which keys were read, around another store."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.read: list[str] = []

    def get(self, key: str) -> bytes | None:
        self.read.append(key)
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        self.read.append(key)
        return self.inner.get_range(key, start, length)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        wanted = list(keys)
        self.read.extend(wanted)
        return self.inner.get_many(wanted)

    def put(self, key: str, data: bytes | memoryview, *, if_absent: bool = False) -> bool:
        return self.inner.put(key, data, if_absent=if_absent)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)


@pytest.fixture(scope="module")
def packs() -> list[bytes]:
    return [
        random_pack([("q_proj", 16, 16)], num_layers=2, rank=2, base_id="b", seed=seed)
        for seed in range(6)
    ]


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "file":
        url = (tmp_path / "store").as_uri()
    else:
        url = request.getfixturevalue("s3_store_url")
    with open_store(url) as opened:
        yield opened


@pytest.fixture
def memory_store() -> BlobStore:
    return open_store("memory://")


def open_catalog(store: BlobStore, root: Path) -> Catalog:
    return Catalog(store, root / "index", lambda _: MemoryIndex(), prefetch_workers=1)


def history_before(catalog: Catalog, packs: list[bytes]) -> None:
    """Pushes, alias moves, a rollback, eval metadata and a delete over three adapters."""
    catalog.push_bytes(AdapterName("acme", "chat"), packs[0], aliases=["serving"])
    catalog.push_bytes(AdapterName("acme", "chat"), packs[1], metadata={"run": "7"})
    catalog.set_alias(AdapterName("acme", "chat"), "serving", 2, expected=1)
    catalog.set_metadata("acme/chat@2", {"eval.win_rate": "0.61"})
    catalog.push_bytes(AdapterName("beta", "code"), packs[2])
    catalog.push_bytes(AdapterName("beta", "code"), packs[3], aliases=["canary"])
    catalog.delete("beta/code@1")
    catalog.push_bytes(AdapterName("acme", "sql"), packs[4])


def history_after(catalog: Catalog, packs: list[bytes]) -> None:
    """More events for adapters in the checkpoint, and new adapters sorting before, between
    and after them."""
    catalog.rollback(AdapterName("acme", "chat"), "serving")
    catalog.push_bytes(AdapterName("acme", "chat"), packs[5])
    catalog.push_bytes(AdapterName("aaa", "first"), packs[0])
    catalog.push_bytes(AdapterName("acme", "chat2"), packs[1], aliases=["serving"])
    catalog.push_bytes(AdapterName("zzz", "last"), packs[2])
    # forced: beta/code has a canary alias, and the aliases' removal belongs in the history too
    catalog.delete("beta/code", all_revisions=True, force=True)


def snapshot(index: RevisionIndex) -> dict[str, Any]:
    """Everything a client can list: adapters, their live revisions and alias histories."""
    out: dict[str, Any] = {}
    for summary in index.list_adapters("", 1000).items:
        adapter = summary.adapter
        out[str(adapter)] = {
            "summary": summary.to_json(),
            "revisions": [r.to_json() for r in index.list_revisions(adapter, 1000).items],
            "aliases": [m.to_json() for m in index.alias_history(adapter)],
        }
    return out


def full_log_snapshot(store: BlobStore) -> dict[str, Any]:
    """The baseline, independent of the code under test: GET every log object, apply them in
    (adapter, seq) order."""
    events = [Event.decode(store.get(key) or b"", key=key) for key in store.list(LOG_PREFIX)]
    index = MemoryIndex()
    index.apply_many(sorted(events, key=lambda e: (e.adapter, e.seq)))
    return snapshot(index)


def log_keys(store: BlobStore) -> list[str]:
    return list(store.list(LOG_PREFIX))


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_checkpoint_plus_tail_replays_to_what_the_full_log_does(
    store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(store, tmp_path)
    try:
        history_before(catalog, packs)
        first = write_checkpoint(store)
        assert first.written and first.events == len(log_keys(store)) and first.adapters == 3
        history_after(catalog, packs)
        tail = len(log_keys(store)) - first.events

        replay = load_log(store)
        assert (replay.checkpoint, replay.tail_events, replay.skipped) == (first.name, tail, ())
        assert list(replay) == list(load_log(store, use_checkpoints=False))
        rebuilt = LmdbIndex(tmp_path / "rebuilt")
        assert rebuilt.apply_many(replay) == replay.events == len(log_keys(store))
        assert snapshot(rebuilt) == full_log_snapshot(store) == snapshot(catalog.index)
        rebuilt.close()

        second = write_checkpoint(store)
        assert (second.previous, second.new_events) == (first.name, tail)
        from_second = load_log(store)
        assert (from_second.checkpoint, from_second.tail_events) == (second.name, 0)
        index = MemoryIndex()
        index.apply_many(from_second)
        assert snapshot(index) == snapshot(catalog.index)
    finally:
        catalog.close()


def test_empty_store(memory_store: BlobStore) -> None:
    replay = load_log(memory_store)
    assert list(replay) == []
    assert (replay.checkpoint, replay.events) == ("", 0)
    info = write_checkpoint(memory_store)
    assert (info.name, info.written, info.events) == ("", False, 0)
    assert list_checkpoints(memory_store) == []
    assert verify_checkpoints(memory_store) == []


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_a_checkpoint_reads_only_the_previous_one_and_the_tail(
    store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    counting = CountingStore(store)
    catalog = open_catalog(store, tmp_path)
    try:
        history_before(catalog, packs)
        first = write_checkpoint(counting)
        assert sorted(counting.read) == log_keys(store)  # the first one reads the whole log
        covered = set(log_keys(store))
        history_after(catalog, packs)
        tail = sorted(set(log_keys(store)) - covered)

        counting.read.clear()
        replay = load_log(counting)
        assert replay.checkpoint == first.name
        assert counting.read == [first.name, *tail]

        counting.read.clear()
        second = write_checkpoint(counting)
        assert counting.read == [first.name, *tail]
        assert (second.new_events, second.events) == (len(tail), len(covered) + len(tail))
        index = MemoryIndex()
        index.apply_many(load_log(store))
        assert snapshot(index) == snapshot(catalog.index)
    finally:
        catalog.close()


def test_nothing_new_writes_nothing(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    first = write_checkpoint(memory_store)
    again = write_checkpoint(memory_store)
    assert (again.name, again.written, again.new_events) == (first.name, False, 0)
    assert again.events == first.events and again.size_bytes == first.size_bytes
    assert list_checkpoints(memory_store) == [first.name]
    catalog.close()


def test_only_the_newest_checkpoints_are_kept(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    names = []
    for number, pack in enumerate(packs[:4]):
        catalog.push_bytes(AdapterName("acme", f"a{number}"), pack)
        names.append(write_checkpoint(memory_store, keep=None).name)
    assert list_checkpoints(memory_store) == names[::-1]  # newest first
    catalog.push_bytes(AdapterName("acme", "a9"), packs[4])
    newest = write_checkpoint(memory_store)  # keeps 2 by default
    assert set(newest.pruned) == set(names[:3])
    assert list_checkpoints(memory_store) == [newest.name, names[3]]
    assert prune_checkpoints(memory_store, keep=1) == [names[3]]
    with pytest.raises(InvalidArgument, match="keep"):
        prune_checkpoints(memory_store, keep=0)
    with pytest.raises(InvalidArgument, match="keep"):
        write_checkpoint(memory_store, keep=0)
    catalog.close()


def test_the_checkpoint_describes_itself(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    info = write_checkpoint(memory_store)
    blob = memory_store.get(info.name)
    assert blob is not None and len(blob) == info.size_bytes
    assert info.name == checkpoint_key(info.events, json.loads(raw_lines(blob)[0])["created_at"])
    lines = raw_lines(blob)
    assert len(b"\n".join(lines)) + 1 == info.raw_bytes
    header = json.loads(lines[0])
    assert (header["format"], header["version"], header["events"]) == (
        "loracat-checkpoint",
        1,
        info.events,
    )
    assert header["covers"] == {"acme/chat": 5, "acme/sql": 1, "beta/code": 4}
    # every event line is the log object, byte for byte
    assert lines[1:-1] == [memory_store.get(key) for key in sorted_log_keys(memory_store)]
    assert json.loads(lines[-1]).keys() == {"sha256"}
    catalog.close()


def decompressed(blob: bytes) -> bytes:
    # streamed frames do not record their size, so the one-shot decompress() cannot be used
    return zstandard.ZstdDecompressor().decompressobj().decompress(blob)


def raw_lines(blob: bytes) -> list[bytes]:
    return decompressed(blob).removesuffix(b"\n").split(b"\n")


def sorted_log_keys(store: BlobStore) -> list[str]:
    """Log keys in (adapter, seq) order, the order of a checkpoint."""
    return sorted(log_keys(store), key=lambda k: (k.split("/")[1], k.split("/")[2], k))


def recompressed(blob: bytes, edit: Any) -> bytes:
    text = decompressed(blob)
    return zstandard.ZstdCompressor().compress(edit(text))


def garbled_header(blob: bytes) -> bytes:
    """A new frame with a sound checksum around a header that is not JSON."""
    return checkpoints._compress(b"{not json", raw_lines(blob)[1:-1], 3)[0]


CORRUPTIONS = {
    # a valid zstd frame whose body changed: only the sha256 notices
    "body-edited": lambda blob: recompressed(blob, lambda t: t.replace(b'"run":"7"', b'"run":"8"')),
    "bytes-flipped": lambda blob: blob[:40] + bytes(b ^ 0x5A for b in blob[40:60]) + blob[60:],
    "not-zstd": lambda blob: b"this is not a checkpoint",
    "empty": lambda blob: b"",
    "header-garbled": garbled_header,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_skipped_for_an_older_one(
    corruption: str,
    memory_store: BlobStore,
    packs: list[bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    older = write_checkpoint(memory_store)
    history_after(catalog, packs)
    newest = write_checkpoint(memory_store)
    blob = memory_store.get(newest.name)
    assert blob is not None
    # a test may overwrite a checkpoint; write_checkpoint never does
    memory_store.put(newest.name, CORRUPTIONS[corruption](blob))

    with caplog.at_level(logging.WARNING, logger="catalog.checkpoint"):
        replay = load_log(memory_store)
    assert (replay.checkpoint, replay.skipped) == (older.name, (newest.name,))
    assert newest.name in caplog.text
    assert list(replay) == list(load_log(memory_store, use_checkpoints=False))
    assert len(verify_checkpoints(memory_store)) == 1
    # the next checkpoint is built from the sound one, not the corrupt one
    catalog.push_bytes(AdapterName("acme", "new"), packs[0])
    rebuilt = write_checkpoint(memory_store, keep=None)
    assert rebuilt.previous == older.name
    index = MemoryIndex()
    index.apply_many(load_log(memory_store))
    assert snapshot(index) == snapshot(catalog.index)
    catalog.close()


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.9, -1])
def test_a_truncated_checkpoint_is_skipped(
    keep_fraction: float, memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    only = write_checkpoint(memory_store)
    blob = memory_store.get(only.name)
    assert blob is not None
    if keep_fraction < 0:  # a whole zstd frame whose text stops before the checksum line
        bad = recompressed(blob, lambda text: text[: text.rindex(b'{"sha256"')])
    else:
        bad = blob[: int(len(blob) * keep_fraction)]
    memory_store.put(only.name, bad)
    replay = load_log(memory_store)
    assert (replay.checkpoint, replay.skipped, replay.tail_events) == (
        "",
        (only.name,),
        only.events,
    )
    index = MemoryIndex()
    index.apply_many(replay)
    assert snapshot(index) == snapshot(catalog.index)
    catalog.close()


def test_a_checkpoint_that_vanishes_after_listing_is_passed_over(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    class PrunedMeanwhile(CountingStore):
        def get(self, key: str) -> bytes | None:
            return None if key == doomed else self.inner.get(key)

    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    older = write_checkpoint(memory_store)
    history_after(catalog, packs)
    doomed = write_checkpoint(memory_store).name
    replay = load_log(PrunedMeanwhile(memory_store))
    assert (replay.checkpoint, replay.skipped) == (older.name, ())
    catalog.close()


def test_a_gap_in_the_tail_is_data_loss(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    write_checkpoint(memory_store)
    history_after(catalog, packs)
    chat = AdapterName("acme", "chat")  # 5 events in the checkpoint, 6 and 7 in the tail
    memory_store.delete(log_key(chat, 6))
    with pytest.raises(DataLoss, match="acme/chat has a gap: event 6 is missing"):
        load_log(memory_store)
    with pytest.raises(DataLoss, match="gap"):
        write_checkpoint(memory_store)
    catalog.close()


def test_a_gap_in_an_adapter_the_checkpoint_does_not_know_is_data_loss(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    write_checkpoint(memory_store)
    history_after(catalog, packs)  # acme/chat2: push (1) and alias (2)
    memory_store.delete(log_key(AdapterName("acme", "chat2"), 1))
    with pytest.raises(DataLoss, match="acme/chat2 has a gap: event 1 is missing"):
        load_log(memory_store)
    catalog.close()


def test_a_gap_without_any_checkpoint_is_data_loss(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    memory_store.delete(log_key(AdapterName("beta", "code"), 2))
    with pytest.raises(DataLoss, match="beta/code has a gap: event 2 is missing"):
        load_log(memory_store)
    catalog.close()


def test_log_objects_under_the_checkpoint_that_vanished_are_reported(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    write_checkpoint(memory_store)
    expected = list(load_log(memory_store))
    memory_store.delete(log_key(AdapterName("acme", "chat"), 2))
    for seq in (1, 2, 3):
        memory_store.delete(log_key(AdapterName("beta", "code"), seq))
    with caplog.at_level(logging.WARNING, logger="catalog.checkpoint"):
        replay = load_log(memory_store)
    assert replay.missing_from_log == 4 and "4 event(s)" in caplog.text
    assert list(replay) == expected  # the checkpoint's copies
    catalog.close()


def test_a_tail_object_holding_another_event_is_data_loss(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    write_checkpoint(memory_store)
    catalog.push_bytes(AdapterName("acme", "sql"), packs[5])
    wrong = memory_store.get(log_key(AdapterName("acme", "sql"), 1))
    assert wrong is not None
    memory_store.put(log_key(AdapterName("acme", "sql"), 2), wrong)
    with pytest.raises(DataLoss, match="holds event acme/sql#1"):
        load_log(memory_store)
    memory_store.put(log_key(AdapterName("acme", "sql"), 2), b"{not json")
    with pytest.raises(DataLoss, match="corrupt log event"):
        load_log(memory_store)
    catalog.close()


def test_a_checkpoint_contradicting_its_header_is_refused_not_applied(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path
) -> None:
    """A sound checksum proves the writer finished, not that it was right: events that do not
    match the header (here one event is missing) raise rather than build a wrong index."""
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    info = write_checkpoint(memory_store)
    blob = memory_store.get(info.name)
    assert blob is not None
    lines = raw_lines(blob)
    header = json.loads(lines[0])
    header["events"] -= 1
    header["covers"]["acme/chat"] -= 1  # adds up, but the events still run to 4
    forged, _ = checkpoints._compress(json.dumps(header).encode(), lines[1:2] + lines[3:-1], 3)
    memory_store.put(info.name, forged)
    replay = load_log(memory_store)
    assert replay.checkpoint == info.name  # its checksum and header hold...
    with pytest.raises(DataLoss, match="contradicts its own header"):
        list(replay)  # ...but its events do not
    assert "contradicts its own header" in verify_checkpoints(memory_store)[0]
    catalog.close()


def test_a_checkpoint_is_never_overwritten(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = open_catalog(memory_store, tmp_path)
    history_before(catalog, packs)
    events = len(log_keys(memory_store))
    monkeypatch.setattr(checkpoints.time, "time", lambda: 1_800_000_000.0)
    taken = checkpoint_key(events, 1_800_000_000.0)
    memory_store.put(taken, b"another writer's checkpoint")
    with pytest.raises(Conflict, match="another writer"):
        write_checkpoint(memory_store)
    assert memory_store.get(taken) == b"another writer's checkpoint"
    catalog.close()


def test_names_sort_by_coverage_and_unknown_objects_are_ignored(memory_store: BlobStore) -> None:
    assert checkpoint_key(123, 1.5) == "checkpoints/000000000123-0000000001500.jsonl.zst"
    assert checkpoint_key(9, 2e9) < checkpoint_key(10, 1e9)
    memory_store.put(f"{CHECKPOINT_PREFIX}README", b"x")
    memory_store.put(checkpoint_key(1, 1.0), b"x")
    assert list_checkpoints(memory_store) == [checkpoint_key(1, 1.0)]


def test_a_foreign_key_under_the_log_is_data_loss(memory_store: BlobStore) -> None:
    event = Event(AdapterName("acme", "x"), 1, "delete", 1.0, revision=1)
    memory_store.put(log_key(event.adapter, 1), event.encode())
    memory_store.put("log/acme/x/notes.txt", b"hello")
    with pytest.raises(DataLoss, match="unexpected object in the durable log"):
        load_log(memory_store)


def test_an_event_numbered_zero_is_data_loss(memory_store: BlobStore) -> None:
    event = Event(AdapterName("acme", "x"), 1, "delete", 1.0, revision=1)
    memory_store.put(log_key(event.adapter, 1), event.encode())
    memory_store.put(log_key(event.adapter, 0), event.encode())
    with pytest.raises(DataLoss, match=r"000000000000\.json"):
        load_log(memory_store)


def test_reindex_wired_to_load_log_rebuilds_the_same_index(
    memory_store: BlobStore, packs: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring the core takes: ``replay_into`` = ``index.apply_many(load_log(store))``."""
    monkeypatch.setattr(
        Catalog, "replay_into", lambda self, index: index.apply_many(load_log(self.store))
    )
    catalog = Catalog(memory_store, tmp_path / "index", LmdbIndex, prefetch_workers=1)
    try:
        history_before(catalog, packs)
        write_checkpoint(memory_store)
        history_after(catalog, packs)
        before = snapshot(catalog.index)
        adapters, revisions, events, _ = catalog.reindex()
        live = sum(len(a["revisions"]) for a in before.values())
        assert (adapters, revisions, events) == (len(before), live, len(log_keys(memory_store)))
        assert snapshot(catalog.index) == before == full_log_snapshot(memory_store)
    finally:
        catalog.close()
