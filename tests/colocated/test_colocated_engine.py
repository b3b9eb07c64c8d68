"""A resident engine on the catalog's host: real PEFT adapters attached through the colocated
read path serve exactly what PEFT computes, and exactly what the streamed path attaches."""

from __future__ import annotations

import torch

from catalog.client import CatalogClient
from engine_plugin import ResidentEngine
from tests.colocated.conftest import Served
from tests.engine.conftest import Arch, llama, make_ids, rel_err

__all__ = ["llama"]  # the session fixture, shared with tests/engine


def test_an_engine_attaches_through_the_colocated_path_as_over_the_stream(
    llama: Arch, served: Served
) -> None:
    names = ["t/qv-r8", "t/all-r4"]
    with CatalogClient(served.address, colocated=False) as pusher:
        for name in names:
            pusher.push(name, llama.packs[name])
    ids = make_ids(3, 5)
    logits = {}
    for colocated in (True, False):
        with CatalogClient(served.address, colocated=colocated) as client:
            engine = ResidentEngine(
                llama.fresh_base(), catalog=client, num_slots=3, max_rank=16, base_id=llama.base_id
            )
            with engine:
                for name in names:
                    engine.attach(name)
                logits[colocated] = engine.forward(ids, [names[0], None, names[1]]).logits
            path = client.colocated
            if colocated:
                assert path is not None and path.counters["reads"] == len(names), path.reason
    assert torch.equal(logits[True], logits[False])
    for row, adapter in enumerate([names[0], None, names[1]]):
        want = llama.reference_logits(adapter, ids[row : row + 1])
        assert rel_err(logits[True][row : row + 1], want) < 1e-4
