"""catalog.keys: byte order is tuple order, prefixes never match a longer part, decode inverts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog import keys
from catalog.errors import InvalidArgument

name_part = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,62}", fullmatch=True)
number = st.integers(0, 2**64 - 1)
part = st.one_of(name_part, number)
parts = st.lists(part, max_size=5)


@given(parts)
def test_decode_inverts_encode(values: list[str | int]) -> None:
    assert keys.decode(keys.encode(*values)) == tuple(values)


@given(st.lists(name_part, min_size=1, max_size=3), st.lists(name_part, min_size=1, max_size=3))
def test_name_tuples_sort_like_tuples(left: list[str], right: list[str]) -> None:
    # strings never hold NUL, so the terminator sorts a shorter part before its extensions
    assert (keys.encode(*left) < keys.encode(*right)) == (tuple(left) < tuple(right))


@given(st.tuples(name_part, number), st.tuples(name_part, number))
def test_numbers_sort_numerically(left: tuple[str, int], right: tuple[str, int]) -> None:
    assert (keys.encode(*left) < keys.encode(*right)) == (left < right)


@given(st.lists(name_part, min_size=1, max_size=3), st.lists(part, max_size=3))
def test_a_prefix_matches_its_extensions(head: list[str], tail: list[str | int]) -> None:
    assert keys.encode(*head, *tail).startswith(keys.prefix(*head))
    assert keys.encode(*head) + keys.encode(*tail) == keys.encode(*head, *tail)


@given(name_part, name_part, name_part)
def test_a_prefix_never_matches_a_longer_part(tenant: str, extra: str, name: str) -> None:
    longer = tenant + extra
    assert not keys.encode(longer, name).startswith(keys.prefix(tenant))
    assert not keys.encode(tenant, name + extra).startswith(keys.prefix(tenant, name))


def test_the_acme_case() -> None:
    scan = keys.prefix("acme")
    assert keys.encode("acme", "x").startswith(scan)
    assert not keys.encode("acme2", "x").startswith(scan)
    assert not keys.encode("acme-x", "y").startswith(scan)
    assert keys.encode("acme", "x") < keys.encode("acme-x", "a") < keys.encode("acme2", "a")


def test_bytes_tail_is_prefix_scannable() -> None:
    digest = bytes.fromhex("abcdef0123456789")
    key = keys.encode("acme", "x", "sha256", digest)
    assert key.startswith(keys.prefix("acme", "x", "sha256", digest[:6]))
    assert keys.decode(key) == ("acme", "x", "sha256", digest)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (("a\x00b",), "NUL"),
        ((-1,), "outside"),
        ((2**64,), "outside"),
        ((b"x", "a"), "not the last"),
        ((True,), "bool"),
        ((1.5,), "unsupported type"),
    ],
)
def test_encode_refuses(values: tuple[object, ...], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        keys.encode(*values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [b"sabc", b"i\x00\x01", b"z", b"s\xff\xfe\x00"],
    ids=["unterminated", "short", "tag", "utf8"],
)
def test_decode_refuses(raw: bytes) -> None:
    with pytest.raises(InvalidArgument):
        keys.decode(raw)


def test_successor_bounds_a_prefix() -> None:
    scan = keys.prefix("acme")
    upper = keys.successor(scan)
    assert upper is not None
    assert scan < keys.encode("acme", "zzz") < upper
    assert keys.encode("acme2", "a") > upper
    assert keys.successor(b"\xff\xff") is None
    assert keys.successor(b"a\xff") == b"b"


def test_object_paths() -> None:
    assert keys.object_path("acme", "x", 7) == "acme/x/000000000007"
    assert keys.object_prefix("acme") == "acme/"
    assert not "acme2/x".startswith(keys.object_prefix("acme"))
    assert keys.object_path("a", 10) > keys.object_path("a", 9)
    for bad in ("", "a/b", "a\x00"):
        with pytest.raises(InvalidArgument):
            keys.object_path(bad)
    with pytest.raises(InvalidArgument):
        keys.object_path(10**12)
