"""Responses as the model types and plain dicts both clients return.

One function per response, shared by the sync and the asyncio client so their answers are the
same shape (``loracat ... --json`` prints the dicts). ``catalog.client.requests`` builds the
requests.
"""

from __future__ import annotations

from typing import Any

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.client.requests import PushResult
from catalog.convert import move_from_pb, revision_from_pb, summary_from_pb
from catalog.model import AdapterSummary, AliasMove, Hint, Page, PrefetchProgress, Revision


def push_result(response: pb.PushResponse) -> PushResult:
    return PushResult(revision_from_pb(response.revision), response.created)


def adapters_page(response: pb.ListAdaptersResponse) -> Page[AdapterSummary]:
    return Page(tuple(summary_from_pb(s) for s in response.adapters), response.next_page_token)


def revisions_page(response: pb.ListRevisionsResponse) -> Page[Revision]:
    return Page(tuple(revision_from_pb(r) for r in response.revisions), response.next_page_token)


def alias_moves(response: pb.AliasHistoryResponse) -> list[AliasMove]:
    return [move_from_pb(m) for m in response.moves]


def exported(response: pb.ExportPeftDirResponse) -> tuple[Revision, int]:
    """The revision a PEFT export wrote and the files' total size."""
    return revision_from_pb(response.revision), response.bytes_written


def request_records(message: pb.RecordedRequests) -> list[dict[str, Any]]:
    """One message of the server's request record as ``export_requests`` rows."""
    return [
        {
            "time": r.time,
            "kind": r.kind,
            "ref": r.ref,
            "size_bytes": r.size_bytes,
            "engine": r.engine,
        }
        for r in message.requests
    ]


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
