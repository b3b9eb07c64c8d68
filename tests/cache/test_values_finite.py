"""The NVMe tier's record that a pack's values were checked finite (meta format 3)."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest

from catalog.cache.layout import FLAG_VALUES_FINITE, EntryMeta, checksum, entry_key
from catalog.cache.pack_cache import PackCache
from catalog.digest import Digest
from catalog.pack import TensorBytes, expected_tensors, read_pack, write_pack
from catalog.pack.finite import pack_values_finite
from tests.pack.synth import small_manifest


def finite_pack(*, nan_in: str | None = None) -> bytes:
    """A small F32 pack of finite values; ``nan_in``: a tensor name that gets one NaN."""
    manifest = small_manifest()
    rng = np.random.default_rng(3)
    tensors = {}
    for name, shape in expected_tensors(manifest).items():
        values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
        tensors[name] = values
    names = list(read_pack(write_pack(manifest, _as_bytes(manifest, tensors))).tensor_names())
    if nan_in is not None:
        key = next(n for n in tensors if nan_in in n)
        tensors[key][1] = np.nan
    data = write_pack(manifest, _as_bytes(manifest, tensors))
    assert list(read_pack(data).tensor_names()) == names
    return data


def _as_bytes(manifest, values):  # type: ignore[no-untyped-def]
    shapes = expected_tensors(manifest)
    return {
        name: TensorBytes("F32", shapes[name], memoryview(v.tobytes()))
        for name, v in values.items()
    }


def test_format_3_records_the_flag_and_formats_1_and_2_still_read() -> None:
    data = bytes(range(256)) * 40
    for finite in (True, False):
        meta = EntryMeta.for_data(data, 4096, values_finite=finite)
        assert meta.fmt == 3
        decoded = EntryMeta.decode(meta.encode())
        assert decoded == meta and decoded.values_finite is finite
        assert decoded.with_pins(2).values_finite is finite
    # A format-2 meta (no flags byte) as the previous version wrote it: never vouched for.
    old = EntryMeta(
        len(data),
        4096,
        7,
        0,
        b"".join(checksum(data[i : i + 4096], 2) for i in range(0, len(data), 4096)),
        fmt=2,
    )
    raw = old.encode()
    assert len(raw) == len(meta.encode()) - 1
    assert EntryMeta.decode(raw).values_finite is False
    with pytest.raises(ValueError, match="no flags"):
        EntryMeta(old.size, 4096, 7, 0, old.checksums, fmt=2, values_finite=True).encode()
    bad = bytearray(meta.encode())
    bad[struct.calcsize(">BBQIIQI")] = 0x80
    with pytest.raises(ValueError, match="unknown flags"):
        EntryMeta.decode(bytes(bad))
    assert FLAG_VALUES_FINITE == 1


def test_pack_values_finite_checks_every_tensor() -> None:
    assert pack_values_finite(finite_pack()) is True
    assert pack_values_finite(finite_pack(nan_in="lora_B")) is False
    assert pack_values_finite(finite_pack(nan_in="lora_A")) is False
    assert pack_values_finite(b"not a pack") is False


def test_a_fill_records_what_the_check_found(tmp_path: Path) -> None:
    good, bad = finite_pack(), finite_pack(nan_in="lora_B")
    cache = PackCache(tmp_path / "cache", 1 << 20, values_finite=pack_values_finite)
    for data in (good, bad):
        digest = Digest.of(data)
        assert bytes(cache.read_through(digest, lambda d=data: d, name_for_errors="p")) == data
    cache.close()
    env = lmdb.open(str(tmp_path / "cache"), readonly=True, max_dbs=4, lock=False)
    with env.begin() as txn:
        entries = env.open_db(b"entries", txn=txn)
        flags = {
            data: EntryMeta.decode(txn.get(entry_key(Digest.of(data)), db=entries)).values_finite
            for data in (good, bad)
        }
    env.close()
    assert flags == {good: True, bad: False}
