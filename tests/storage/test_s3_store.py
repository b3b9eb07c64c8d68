"""The S3 backend against a real SeaweedFS server (the session's ``seaweedfs`` fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from catalog.errors import InvalidArgument, Unavailable
from catalog.storage import BlobStore, open_store
from catalog.storage.fsspec_store import FsspecStore
from catalog.testing.seaweedfs import SeaweedFS
from tests.storage.contract import BlobStoreContract, MiB

pytestmark = pytest.mark.s3


class TestS3Store(BlobStoreContract):
    # SeaweedFS holds contending conditional puts to one key back in whole seconds (the
    # losers of an 8-writer race answer after 0-3 s), so one round is what the suite affords.
    race_rounds = 1

    @pytest.fixture
    def store(self, s3_store_url: str) -> Iterator[BlobStore]:
        # Small parts so that the suite's multi-MiB objects go through a real multipart upload
        # and are read back as concurrent ranged GETs (while being overwritten, in one test).
        with open_store(
            s3_store_url, part_size=5 * MiB, multipart_threshold=5 * MiB, read_part_size=1 * MiB
        ) as store:
            assert isinstance(store, FsspecStore)
            yield store


def test_the_environment_alone_configures_the_store(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """What an operator does: export AWS_* and pass only the URL, in a fresh process."""
    script = (
        "from catalog.storage import open_store\n"
        "store = open_store('s3://env-only-bucket/some/prefix', create_bucket=True)\n"
        "assert store.put('k', b'v', if_absent=True)\n"
        "print(store.get('k').decode(), store.url)\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(seaweedfs.env(), HOME=str(tmp_path))  # no ~/.aws from the machine
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["v", "s3://env-only-bucket/some/prefix"]


def test_the_generic_endpoint_variable_also_works(
    seaweedfs: SeaweedFS, s3_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = seaweedfs.env()["AWS_ENDPOINT_URL_S3"]
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with open_store(s3_store_url) as store:
        assert isinstance(store, FsspecStore)
        assert store.endpoint_url == endpoint
        store.put("k", b"v")
        assert store.get("k") == b"v"


def test_a_missing_bucket_is_unavailable_unless_created(s3_store_url: str) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:16]}"
    with pytest.raises(Unavailable, match=f"bucket '{bucket}' does not exist.*create_bucket"):
        open_store(f"s3://{bucket}")
    with open_store(f"s3://{bucket}/p", create_bucket=True) as store:
        store.put("k", b"v")
    with open_store(f"s3://{bucket}/p", create_bucket=True) as store:  # exists now: fine too
        assert store.get("k") == b"v"


def test_prefixes_isolate_stores(s3_store_url: str) -> None:
    with open_store(s3_store_url + "/one") as one, open_store(s3_store_url + "/one-more") as two:
        one.put("k", b"1")
        two.put("k", b"2")
        assert list(one.list()) == ["k"]
        assert one.get("k") == b"1"
        assert two.get("k") == b"2"


def test_wrong_credentials_are_unavailable_and_named(
    seaweedfs: SeaweedFS, s3_store_url: str
) -> None:
    with pytest.raises(Unavailable, match=f"s3 store {s3_store_url} at {seaweedfs.endpoint_url}"):
        open_store(s3_store_url, key="nobody", secret="not-the-secret", max_attempts=1)


def test_an_unreachable_endpoint_fails_fast(s3_store_url: str) -> None:
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1:9"):
        open_store(
            s3_store_url,
            endpoint_url="http://127.0.0.1:9",  # discard port: connection refused
            max_attempts=1,
            connect_timeout=2,
        )


def test_a_dead_server_makes_operations_unavailable() -> None:
    server = SeaweedFS().start()
    try:
        server.create_bucket("doomed")
        store = FsspecStore("doomed", max_attempts=1, connect_timeout=2, **server.store_options())
        store.put("blobs/x", b"1")
    finally:
        server.stop(timeout=0)  # no grace: the server just dies
    with pytest.raises(Unavailable, match="cannot get 'blobs/x'"):
        store.get("blobs/x")
    with pytest.raises(Unavailable, match="cannot put 'blobs/y'"):
        store.put("blobs/y", b"2", if_absent=True)
    with pytest.raises(Unavailable, match="cannot list"):
        list(store.list())
    store.close()


def test_listing_and_get_many_span_pages(s3_store_url: str) -> None:
    keys = [f"log/t/n/{i:012d}.json" for i in range(40)]
    with open_store(s3_store_url, list_page_size=7, max_concurrency=4) as store:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key: store.put(key, key.encode()), keys))
        assert list(store.list("log/")) == keys
        assert list(store.list("log/t/n/00000000001")) == keys[10:20]
        assert store.get_many(keys) == {key: key.encode() for key in keys}


def test_multipart_if_absent_skips_an_existing_object(s3_store_url: str, tmp_path: Path) -> None:
    source = tmp_path / "big"
    source.write_bytes(os.urandom(11 * MiB))
    with open_store(s3_store_url, part_size=5 * MiB, multipart_threshold=5 * MiB) as store:
        store.put("blob", b"small original")
        assert store.put_file("blob", source, if_absent=True) is False
        assert store.get("blob") == b"small original"
        assert store.put_file("blob", source) is True
        assert store.get("blob") == source.read_bytes()


@pytest.mark.parametrize("read_concurrency", [1, 3])
def test_reads_in_one_stream_or_in_parts(s3_store_url: str, read_concurrency: int) -> None:
    data = os.urandom(5 * MiB + 17)
    with open_store(
        s3_store_url, read_part_size=1 * MiB, read_concurrency=read_concurrency
    ) as store:
        store.put("blob", data)
        store.put("empty", b"")
        store.put("one-part", data[: 1 * MiB])
        assert store.get("blob") == data
        assert store.get("empty") == b""
        assert store.get("one-part") == data[: 1 * MiB]
        assert store.get("missing") is None
        assert store.get_many(["blob", "missing"]) == {"blob": data, "missing": None}


def test_bad_tuning_is_invalid(s3_store_url: str) -> None:
    with pytest.raises(InvalidArgument, match="part_size"):
        open_store(s3_store_url, part_size=1 * MiB)
    with pytest.raises(InvalidArgument, match="bad options"):
        open_store(s3_store_url, no_such_option=1)
