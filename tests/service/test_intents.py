"""A durable log write that fails with an unknown outcome keeps its intent, which is settled
as the log says (``catalog.intents``): applied when the write had landed, dropped when not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from catalog.errors import NotFound, Unavailable
from catalog.events import LOG_PREFIX
from catalog.model import AdapterName
from catalog.pack.synthetic import random_pack
from catalog.service.server import open_catalog

PACK = random_pack([("q_proj", 16, 16)], num_layers=2, rank=2, base_id="b", seed=1)
OTHER = random_pack([("q_proj", 16, 16)], num_layers=2, rank=2, base_id="b", seed=2)


def failing_log_writes(catalog, *, landed: bool, times: int = 1):  # type: ignore[no-untyped-def]
    """The store's next ``times`` log writes raise ``Unavailable`` (after writing, with
    ``landed``), as a store that timed out mid-request does."""
    real_put = catalog.store.put
    left = [times]

    def put(key, data, *, if_absent=False):  # type: ignore[no-untyped-def]
        if key.startswith(LOG_PREFIX) and left[0] > 0:
            left[0] -= 1
            if landed:
                real_put(key, data, if_absent=if_absent)
            raise Unavailable(f"store: cannot put {key}: timed out")
        return real_put(key, data, if_absent=if_absent)

    catalog.store.put = put


def settled(catalog) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while catalog.intent_settler.pending() or catalog.index.intents():
        assert time.monotonic() < deadline, catalog.index.intents()
        time.sleep(0.02)


def revisions(catalog) -> list[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    return [
        (str(r.adapter), r.number, str(r.digest))
        for s in catalog.list_adapters("", 100, "").items
        for r in catalog.list_revisions(s.adapter, 100, "").items
    ]


def test_a_log_write_that_landed_is_applied(tmp_path: Path) -> None:
    catalog = open_catalog(tmp_path / "root", (tmp_path / "store").as_uri())
    try:
        failing_log_writes(catalog, landed=True)
        with pytest.raises(Unavailable):
            catalog.push_bytes(AdapterName.parse("acme/landed"), PACK, base_id="b")
        settled(catalog)
        assert catalog.resolve("acme/landed").number == 1  # as the durable log says
        catalog.push_bytes(AdapterName.parse("acme/landed"), OTHER, base_id="b")
        assert catalog.resolve("acme/landed").number == 2
        live = revisions(catalog)
    finally:
        catalog.close()
    rebuilt = open_catalog(tmp_path / "rebuilt", (tmp_path / "store").as_uri())
    try:
        rebuilt.reindex()
        assert revisions(rebuilt) == live
    finally:
        rebuilt.close()


def test_a_log_write_that_did_not_land_is_forgotten(tmp_path: Path) -> None:
    catalog = open_catalog(tmp_path / "root", (tmp_path / "store").as_uri())
    try:
        failing_log_writes(catalog, landed=False)
        with pytest.raises(Unavailable):
            catalog.push_bytes(AdapterName.parse("acme/lost"), PACK, base_id="b")
        settled(catalog)
        with pytest.raises(NotFound):
            catalog.resolve("acme/lost")
        assert catalog.push_bytes(AdapterName.parse("acme/lost"), PACK, base_id="b")[0].number == 1
    finally:
        catalog.close()


def test_an_intent_left_at_close_is_settled_at_the_next_start(tmp_path: Path) -> None:
    catalog = open_catalog(tmp_path / "root", (tmp_path / "store").as_uri())
    try:
        failing_log_writes(catalog, landed=True)
        catalog.intent_settler.close()  # as a process that ends before the store answers
        with pytest.raises(Unavailable):
            catalog.push_bytes(AdapterName.parse("acme/later"), PACK, base_id="b")
        assert len(catalog.index.intents()) == 1
    finally:
        catalog.close()
    reopened = open_catalog(tmp_path / "root", (tmp_path / "store").as_uri())
    try:
        assert reopened.resolve("acme/later").number == 1
    finally:
        reopened.close()


def test_a_write_settles_its_adapters_earlier_intent_first(tmp_path: Path) -> None:
    from catalog.errors import Conflict

    catalog = open_catalog(tmp_path / "root", (tmp_path / "store").as_uri())
    try:
        failing_log_writes(catalog, landed=True)
        catalog.intent_settler.close()  # nothing settles it in the background
        with pytest.raises(Unavailable):
            catalog.push_bytes(AdapterName.parse("acme/next"), PACK, base_id="b")
        # the next write would take the landed event's place: it settles it and asks to retry
        with pytest.raises(Conflict):
            catalog.push_bytes(AdapterName.parse("acme/next"), OTHER, base_id="b")
        assert catalog.resolve("acme/next").number == 1
        assert catalog.push_bytes(AdapterName.parse("acme/next"), OTHER, base_id="b")[0].number == 2
        assert catalog.index.intents() == []
    finally:
        catalog.close()
