"""The client's inbox write: aligned windows, and a short ``pwritev`` finished (no catalog)."""

from __future__ import annotations

import os

from catalog.client import local_push


def test_a_short_pwritev_is_finished(tmp_path, monkeypatch):
    real = os.pwritev
    calls = []

    def at_most_100_bytes(fd, buffers, offset):  # as a signal or a full page cache may
        calls.append(offset)
        taken, left = [], 100
        for b in buffers:
            if left <= 0:
                break
            taken.append(b[:left])
            left -= min(left, b.nbytes)
        return real(fd, taken, offset)

    monkeypatch.setattr(local_push.os, "pwritev", at_most_100_bytes)
    data = bytes(range(256)) * 3
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        pieces = [memoryview(data[:50]), memoryview(data[50:500]), memoryview(data[500:])]
        assert local_push._pwritev_all(fd, pieces, 0) == len(data)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data
    assert len(calls) == 8  # 768 bytes, 100 at a time


def test_pack_bytes_are_written_exactly_over_a_longer_file(tmp_path):
    data = os.urandom(200_003)  # not a whole number of windows
    path = tmp_path / "push-abcdefgh.pack"
    path.write_bytes(b"\xff" * 300_000)  # as a warm file's old bytes
    local_push._write_into(os.open(path, os.O_WRONLY), data)
    assert path.read_bytes() == data
