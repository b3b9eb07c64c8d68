"""Engine-side programs the colocated tests run in processes of their own.

    python -m tests.colocated.children fetch-loop ADDRESS REF DIGEST COUNT
    python -m tests.colocated.children fetch-once ADDRESS REF [USER]
    python -m tests.colocated.children pause-mid-read ADDRESS REF TTL_S

Each prints one JSON line per result on stdout. ``pause-mid-read`` prints ``{"reading": true}``
once its colocated read has checked its first chunk (inside the read's LMDB transaction, under
its lease), then waits for a line on stdin before it reads on: the parent SIGKILLs it (or the
catalog) there.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import catalog.client.tier_reader as tier_reader
from catalog.client import CatalogClient
from catalog.digest import Digest
from catalog.errors import CatalogError


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def fetch_loop(address: str, ref: str, digest: str, count: int) -> None:
    """Fetch ``ref`` ``count`` times; every buffer is hashed in full against ``digest``."""
    expected = Digest.parse(digest)
    bad = errors = 0
    with CatalogClient(address) as client:
        for _ in range(count):
            try:
                data = client.fetch(ref)
            except CatalogError as exc:
                errors += 1
                emit(error=f"{type(exc).__name__}: {exc}")
                continue
            if Digest.of(data, expected.algorithm) != expected:
                bad += 1
        path = client.colocated
        assert path is not None
        emit(bad=bad, errors=errors, reason=path.reason, **path.counters)


def fetch_once(address: str, ref: str, user: str = "") -> None:
    """Fetch ``ref`` once; with ``user``, as that user (the client is made first, as root:
    the interpreter's files may be unreadable to that user)."""
    with CatalogClient(address) as client:
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
        revision, data = client.fetch_with_revision(ref)
        path = client.colocated
        assert path is not None
        emit(
            good=Digest.of(data, revision.digest.algorithm) == revision.digest,
            reason=path.reason,
            **path.counters,
        )


def pause_mid_read(address: str, ref: str, ttl_s: float) -> None:
    real_checksum = tier_reader.checksum
    paused = [False]

    def checksum_then_pause(chunk: bytes | memoryview, *fmt: int) -> bytes:
        value = real_checksum(chunk, *fmt)
        if not paused[0]:
            paused[0] = True
            emit(reading=True)
            sys.stdin.readline()
        return value

    tier_reader.checksum = checksum_then_pause  # type: ignore[assignment]
    with CatalogClient(address) as client:
        path = client.colocated
        assert path is not None
        path.lease_ttl_s = ttl_s
        try:
            revision, data = client.fetch_with_revision(ref)
        except CatalogError as exc:
            emit(error=f"{type(exc).__name__}: {exc}")
            return
        emit(good=Digest.of(data, revision.digest.algorithm) == revision.digest, **path.counters)


def main(argv: list[str]) -> None:
    command, address, ref, *rest = argv
    if command == "fetch-loop":
        fetch_loop(address, ref, rest[0], int(rest[1]))
    elif command == "fetch-once":
        fetch_once(address, ref, *rest)
    elif command == "pause-mid-read":
        pause_mid_read(address, ref, float(rest[0]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
