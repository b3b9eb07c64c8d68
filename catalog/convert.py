"""The one place where catalog model types and generated protobuf messages meet."""

from __future__ import annotations

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.digest import Digest
from catalog.model import AdapterName, AdapterSummary, AliasMove, Revision


def revision_to_pb(revision: Revision) -> pb.Revision:
    return pb.Revision(
        name=str(revision.adapter),
        revision=revision.number,
        digest=str(revision.digest),
        base_id=revision.base_id,
        rank=revision.rank,
        alpha=revision.alpha,
        dtype=revision.dtype,
        size_bytes=revision.size_bytes,
        created_at=revision.created_at,
        target_modules=list(revision.target_modules),
        num_layers=revision.num_layers,
        num_experts=revision.num_experts,
        aliases=list(revision.aliases),
        metadata=dict(revision.metadata),
    )


def revision_from_pb(msg: pb.Revision) -> Revision:
    return Revision(
        adapter=AdapterName.parse(msg.name),
        number=msg.revision,
        digest=Digest.parse(msg.digest),
        base_id=msg.base_id,
        rank=msg.rank,
        alpha=msg.alpha,
        dtype=msg.dtype,
        size_bytes=msg.size_bytes,
        created_at=msg.created_at,
        target_modules=tuple(msg.target_modules),
        num_layers=msg.num_layers,
        num_experts=msg.num_experts,
        aliases=tuple(msg.aliases),
        metadata=dict(msg.metadata),
    )


def summary_to_pb(summary: AdapterSummary) -> pb.AdapterSummary:
    return pb.AdapterSummary(
        name=str(summary.adapter),
        latest=summary.latest,
        revision_count=summary.revision_count,
        aliases=dict(summary.aliases),
        created_at=summary.created_at,
        updated_at=summary.updated_at,
    )


def summary_from_pb(msg: pb.AdapterSummary) -> AdapterSummary:
    return AdapterSummary(
        adapter=AdapterName.parse(msg.name),
        latest=msg.latest,
        revision_count=msg.revision_count,
        aliases=dict(msg.aliases),
        created_at=msg.created_at,
        updated_at=msg.updated_at,
    )


def move_to_pb(move: AliasMove) -> pb.AliasMove:
    return pb.AliasMove(
        name=str(move.adapter),
        alias=move.alias,
        previous=move.previous,
        revision=move.revision,
        at=move.at,
        seq=move.seq,
        principal=move.principal,
    )


def move_from_pb(msg: pb.AliasMove) -> AliasMove:
    return AliasMove(
        adapter=AdapterName.parse(msg.name),
        alias=msg.alias,
        previous=msg.previous,
        revision=msg.revision,
        at=msg.at,
        seq=msg.seq,
        principal=msg.principal,
    )
