"""Provenance names the principal the push was authenticated as, and a client cannot forge it."""

from __future__ import annotations

import pytest

from catalog.errors import InvalidArgument
from tests.security.conftest import TOKENS, auth_catalog  # noqa: F401  (fixture)


def test_the_pushing_principal_is_recorded(auth_catalog, packs):  # noqa: F811
    with auth_catalog.client(TOKENS["write"]) as writer:
        revision = writer.push("acme/prov", packs["all-r8"]).revision
        assert revision.metadata["provenance.principal"] == "write-user"
        with pytest.raises(InvalidArgument, match="reserved"):
            writer.push(
                "acme/prov2", packs["qv-r4"], metadata={"provenance.principal": "admin-user"}
            )
        with pytest.raises(InvalidArgument, match="reserved"):
            writer.set_metadata("acme/prov", {"provenance.principal": "admin-user"})
        assert writer.resolve("acme/prov").metadata["provenance.principal"] == "write-user"
