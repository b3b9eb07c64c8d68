"""A catalog that identifies revisions by blake3: push, resolve, fetch and verify end to end."""

from __future__ import annotations

import pytest

from catalog.client import CatalogClient
from catalog.digest import Digest
from catalog.errors import DataLoss, InvalidArgument
from catalog.service.server import create_server, open_catalog


@pytest.fixture
def blake3_client(tmp_path):  # type: ignore[no-untyped-def]
    catalog = open_catalog(tmp_path / "root", digest_algorithm="blake3")
    server, port = create_server(catalog)
    client = CatalogClient(f"127.0.0.1:{port}")
    try:
        yield client
    finally:
        client.close()
        server.stop(None)
        catalog.close()


def test_revisions_are_named_and_checked_by_blake3(blake3_client, packs):  # type: ignore[no-untyped-def]
    data = packs["all-r8"]
    pushed = blake3_client.push("acme/b3", data)  # the client states a sha256 digest
    digest = pushed.revision.digest
    assert digest == Digest.of(data, "blake3")
    assert blake3_client.resolve(f"acme/b3@{digest.short}").number == pushed.revision.number
    assert bytes(blake3_client.fetch("acme/b3")) == data
    assert bytes(blake3_client.fetch("acme/b3", offset=5, length=50)) == data[5:55]
    again = blake3_client.push("acme/b3", data)
    assert not again.created and again.revision.number == pushed.revision.number


def test_a_stated_digest_that_does_not_match_is_refused(tmp_path, packs):  # type: ignore[no-untyped-def]
    from catalog.model import AdapterName

    catalog = open_catalog(tmp_path / "root", digest_algorithm="blake3")
    try:
        wrong = str(Digest.of(b"other bytes", "sha256"))
        with pytest.raises(DataLoss, match="expected sha256:"):
            catalog.push_bytes(AdapterName.parse("acme/x"), packs["qv-r4"], expected_digest=wrong)
        assert catalog.index_is_empty()
    finally:
        catalog.close()


def test_an_unknown_algorithm_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match="md5"):
        open_catalog(tmp_path / "root", digest_algorithm="md5")
