"""The one conformance suite every BlobStore backend passes (zarr-python's ``StoreTests`` idea).

A backend's test module subclasses :class:`BlobStoreContract` and provides a ``store`` fixture
returning a fresh, empty store; every test here then runs against that backend.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from catalog.digest import Digest
from catalog.errors import InvalidArgument
from catalog.events import LOG_PREFIX, blob_key, log_key, log_prefix, parse_log_key
from catalog.model import AdapterName
from catalog.storage import BlobStore, open_store

MiB = 1 << 20

BAD_KEYS = ["", "/abs", "a//b", "a/", "../up", "a/../b", "a/./b", ".", "a\\b", "a\nb"]


class BlobStoreContract:
    #: Whether ``open_store(store.url)`` reaches the same objects (not so for ``memory://``).
    reopenable = True
    #: Rounds of the conditional-put race; a backend whose server is slow under contention
    #: may run fewer.
    race_rounds = 3

    @pytest.fixture
    def store(self) -> Iterator[BlobStore]:
        raise NotImplementedError("a backend's test class provides the store fixture")

    # -- get / put -----------------------------------------------------------------------------

    def test_missing_key_reads_as_none(self, store: BlobStore) -> None:
        assert store.get("nothing/here") is None
        assert store.get_range("nothing/here", 0, 10) is None
        assert store.size("nothing/here") is None
        assert not store.exists("nothing/here")

    def test_put_then_get_returns_the_same_bytes(self, store: BlobStore) -> None:
        every_byte = bytes(range(256)) * 3
        assert store.put("a/b/c", every_byte) is True
        assert store.get("a/b/c") == every_byte
        assert isinstance(store.get("a/b/c"), bytes)

    def test_put_accepts_memoryview_and_empty_objects(self, store: BlobStore) -> None:
        backing = bytearray(b"0123456789")
        store.put("view", memoryview(backing)[2:6])
        backing[2:6] = b"XXXX"  # the store must have copied the bytes
        assert store.get("view") == b"2345"
        store.put("empty", b"")
        assert store.get("empty") == b""
        assert store.size("empty") == 0
        assert store.exists("empty")

    def test_put_overwrites(self, store: BlobStore) -> None:
        store.put("k", b"first")
        assert store.put("k", b"second, longer") is True
        assert store.get("k") == b"second, longer"
        store.put("k", b"3")
        assert store.get("k") == b"3"

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_invalid_keys_are_refused(self, store: BlobStore, key: str) -> None:
        with pytest.raises(InvalidArgument):
            store.put(key, b"x")
        with pytest.raises(InvalidArgument):
            store.get(key)

    # -- conditional put -----------------------------------------------------------------------

    def test_if_absent_writes_a_missing_key(self, store: BlobStore) -> None:
        assert store.supports_conditional_put
        assert store.put("cas", b"mine", if_absent=True) is True
        assert store.get("cas") == b"mine"

    def test_if_absent_keeps_the_existing_object(self, store: BlobStore) -> None:
        store.put("cas", b"original")
        assert store.put("cas", b"intruder", if_absent=True) is False
        assert store.get("cas") == b"original"

    def test_concurrent_if_absent_has_exactly_one_winner(self, store: BlobStore) -> None:
        writers = 8
        start = threading.Barrier(writers)

        def claim(i: int) -> bool:
            start.wait()
            return store.put("log/t/race/000000000001.json", b"writer %d" % i, if_absent=True)

        for _ in range(self.race_rounds):
            store.delete("log/t/race/000000000001.json")
            with ThreadPoolExecutor(writers) as pool:
                won = list(pool.map(claim, range(writers)))
            assert won.count(True) == 1
            winner = won.index(True)
            assert store.get("log/t/race/000000000001.json") == b"writer %d" % winner

    # -- ranges, size, delete ------------------------------------------------------------------

    def test_get_range(self, store: BlobStore) -> None:
        data = bytes(range(100))
        store.put("r", data)
        assert store.get_range("r", 0, 10) == data[:10]
        assert store.get_range("r", 42, 8) == data[42:50]
        assert store.get_range("r", 95, 50) == data[95:]  # clipped at the end
        assert store.get_range("r", 0, 1000) == data
        assert store.get_range("r", 100, 5) == b""
        assert store.get_range("r", 500, 5) == b""
        assert store.get_range("r", 10, 0) == b""

    def test_get_range_refuses_negative_values(self, store: BlobStore) -> None:
        store.put("r", b"abc")
        with pytest.raises(InvalidArgument):
            store.get_range("r", -1, 2)
        with pytest.raises(InvalidArgument):
            store.get_range("r", 0, -2)

    def test_size_and_exists(self, store: BlobStore) -> None:
        store.put("s", b"x" * 1234)
        assert store.size("s") == 1234
        assert store.exists("s")

    def test_delete_is_idempotent(self, store: BlobStore) -> None:
        store.put("d/x", b"1")
        store.delete("d/x")
        assert store.get("d/x") is None
        assert list(store.list("d/")) == []
        store.delete("d/x")
        store.delete("never/existed")

    # -- listing -------------------------------------------------------------------------------

    def test_list_is_flat_and_lexicographic(self, store: BlobStore) -> None:
        # '-' < '.' < '/' < '0': a depth-first walk would put "a/b" before "a-b" and "a.b".
        keys = ["a/b", "a.b", "a/c/d", "a0", "a-b", "b/x/y/z", "ab", "a/c0"]
        for key in keys:
            store.put(key, key.encode())
        assert list(store.list()) == sorted(keys)
        assert list(store.list("")) == sorted(keys)

    def test_list_prefix_is_a_string_prefix(self, store: BlobStore) -> None:
        for key in ["a/b/x", "a/b/y/z", "a/bc", "a/bcd/e", "a/b0", "ab/c", "z"]:
            store.put(key, b"")
        assert list(store.list("a/b/")) == ["a/b/x", "a/b/y/z"]
        assert list(store.list("a/b")) == ["a/b/x", "a/b/y/z", "a/b0", "a/bc", "a/bcd/e"]
        assert list(store.list("a/bc")) == ["a/bc", "a/bcd/e"]
        assert list(store.list("a/bcd/")) == ["a/bcd/e"]
        assert list(store.list("a")) == ["a/b/x", "a/b/y/z", "a/b0", "a/bc", "a/bcd/e", "ab/c"]
        assert list(store.list("nope/")) == []
        assert list(store.list("a/b/x/")) == []

    def test_list_refuses_invalid_prefixes(self, store: BlobStore) -> None:
        with pytest.raises(InvalidArgument):
            list(store.list("../"))

    def test_event_log_and_blob_layout(self, store: BlobStore) -> None:
        chat, chat2 = AdapterName("acme", "chat"), AdapterName("acme", "chat2")
        for seq in (10, 2, 1, 11, 100):
            store.put(log_key(chat, seq), b"{}")
        store.put(log_key(chat2, 1), b"{}")
        digest = Digest("sha256", "ab" + "0" * 62)
        store.put(blob_key(digest), b"pack")

        listed = list(store.list(log_prefix(chat)))
        assert [parse_log_key(key) for key in listed] == [(chat, s) for s in (1, 2, 10, 11, 100)]
        assert list(store.list(LOG_PREFIX)) == [*listed, log_key(chat2, 1)]
        assert list(store.list("blobs/")) == [blob_key(digest)]

    # -- bulk ----------------------------------------------------------------------------------

    def test_get_many(self, store: BlobStore) -> None:
        keys = [f"many/{i:04d}" for i in range(150)]
        for key in keys[::2]:
            store.put(key, key.encode())
        found = store.get_many(keys)
        assert found == {key: (key.encode() if i % 2 == 0 else None) for i, key in enumerate(keys)}
        assert store.get_many([]) == {}

    def test_put_file_of_several_mib(self, store: BlobStore, tmp_path: Path) -> None:
        source = tmp_path / "pack.bin"
        data = os.urandom(12 * MiB + 123)
        source.write_bytes(data)
        assert store.put_file("blobs/big", source) is True
        assert store.size("blobs/big") == len(data)
        assert store.get("blobs/big") == data
        assert store.get_range("blobs/big", 7 * MiB - 3, 10) == data[7 * MiB - 3 : 7 * MiB + 7]

        other = tmp_path / "other.bin"
        other.write_bytes(os.urandom(6 * MiB))
        assert store.put_file("blobs/big", other, if_absent=True) is False
        assert store.get("blobs/big") == data
        assert store.put_file("blobs/fresh", other, if_absent=True) is True
        assert store.get("blobs/fresh") == other.read_bytes()

    def test_put_file_of_a_missing_file_is_invalid(self, store: BlobStore, tmp_path: Path) -> None:
        with pytest.raises(InvalidArgument):
            store.put_file("k", tmp_path / "absent")
        assert store.get("k") is None

    def test_readers_never_see_a_partial_object(self, store: BlobStore) -> None:
        versions = [bytes([i]) * (2 * MiB) for i in range(4)]
        store.put("hot", versions[0])
        stop = threading.Event()
        seen: set[bytes] = set()

        def read() -> None:
            while not stop.is_set():
                data = store.get("hot")
                assert data is not None
                seen.add(data[:1] + data[-1:] + len(data).to_bytes(8, "big"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(12):
                store.put("hot", versions[i % 4])
        finally:
            stop.set()
            reader.join()
        assert seen <= {v[:1] + v[-1:] + len(v).to_bytes(8, "big") for v in versions}

    def test_url_reopens_the_same_objects(self, store: BlobStore) -> None:
        store.put("persist/me", b"still here")
        with open_store(store.url) as again:
            if not self.reopenable:
                assert list(again.list()) == []
                return
            assert again.get("persist/me") == b"still here"
            assert list(again.list()) == ["persist/me"]
