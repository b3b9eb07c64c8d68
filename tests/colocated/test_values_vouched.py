"""A colocated read says whether the catalog checked the pack's values finite when it filled
the NVMe tier (meta format 3); the stream never does."""

from __future__ import annotations

from catalog.client import CatalogClient
from tests.colocated.conftest import Served, big_pack


def test_a_colocated_read_of_a_checked_entry_is_vouched_for(served: Served) -> None:
    pack = big_pack(2, seed=53)
    with CatalogClient(served.address) as client:
        revision = client.push("acme/vouched", pack).revision
        client.evict_pack("acme/vouched")  # the push admitted it to the tier: start cold
        data, checked = client.fetch_checked(revision)  # cold: leased, filled, checked
        assert bytes(data) == pack and checked is True
        data, checked = client.fetch_checked(revision)  # whole in the tier: unleased
        assert bytes(data) == pack and checked is True
        assert client.colocated is not None and client.colocated.counters["unleased_reads"] == 1
    with CatalogClient(served.address, colocated=False) as streamed:
        data, checked = streamed.fetch_checked(revision)
        assert bytes(data) == pack and checked is False
