"""Responses of the administrative RPCs as the plain dicts both clients return.

One function per response, shared by the sync and the asyncio client so their answers are the
same shape (``loracat ... --json`` prints them).
"""

from __future__ import annotations

from typing import Any

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.model import Hint, PrefetchProgress


def stats_doc(response: pb.StatsResponse) -> dict[str, Any]:
    return {
        "adapters": response.adapters,
        "revisions": response.revisions,
        "aliases": response.aliases,
        "index_bytes": response.index_bytes,
        "store_url": response.store_url,
        "engines": response.engines,
        "tiers": [
            {
                "tier": t.tier,
                "bytes": t.bytes,
                "entries": t.entries,
                "hits": t.hits,
                "misses": t.misses,
                "evictions": t.evictions,
                "capacity_bytes": t.capacity_bytes,
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
            }
            for t in response.tiers
        ],
        # counters travel as doubles; every one of them counts whole things
        "counters": {
            k: int(v) if float(v).is_integer() else v for k, v in response.counters.items()
        },
    }


def gc_doc(response: pb.GarbageCollectResponse, dry_run: bool) -> dict[str, Any]:
    return {
        "deleted": list(response.deleted),
        "freed_bytes": response.freed_bytes,
        "kept": response.kept,
        "dry_run": dry_run,
    }


def verify_doc(response: pb.VerifyResponse) -> dict[str, Any]:
    return {
        "checked_blobs": response.checked_blobs,
        "checked_events": response.checked_events,
        "problems": list(response.problems),
    }


def reindex_doc(response: pb.ReindexResponse) -> dict[str, Any]:
    return {
        "adapters": response.adapters,
        "revisions": response.revisions,
        "events": response.events,
        "seconds": response.seconds,
    }


def checkpoint_doc(response: pb.CheckpointResponse) -> dict[str, Any]:
    return {field.name: getattr(response, field.name) for field in response.DESCRIPTOR.fields} | {
        "pruned": list(response.pruned)
    }


def cache_entries(response: pb.ListCacheResponse) -> list[dict[str, Any]]:
    return [
        {
            "digest": e.digest,
            "size_bytes": e.size_bytes,
            "pins": e.pins,
            "inserted_at": e.inserted_at,
        }
        for e in response.entries
    ]


def prefetch_progress(item: pb.PrefetchProgress) -> PrefetchProgress:
    return PrefetchProgress(item.ref, item.state, item.digest, item.size_bytes, item.error)


def hint_from_pb(hint: pb.Hint) -> Hint:
    return Hint(hint.kind, hint.ref, hint.digest, hint.base_id, hint.reason, hint.at)


def register_request(
    engine_id: str, base_id: str, num_slots: int, max_rank: int, host_bytes: int
) -> pb.RegisterEngineRequest:
    return pb.RegisterEngineRequest(
        engine_id=engine_id,
        base_id=base_id,
        num_slots=num_slots,
        max_rank=max_rank,
        host_bytes=host_bytes,
    )
