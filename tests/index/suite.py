"""The RevisionIndex conformance suite: every backend's test class subclasses it.

A backend's test module defines ``class TestX(RevisionIndexSuite)`` with ``make_index``; every
test here then runs against that backend, so the suite states the ABC's semantics once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog.digest import Digest
from catalog.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    InvalidName,
    InvalidReference,
    NotFound,
)
from catalog.events import Event
from catalog.index.base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, RevisionIndex
from catalog.model import AdapterName, Ref, Selector, every_item
from tests.index.writer import MANIFEST, Writer, digest_of, name

ACME_X = name("acme/x")
ACME_Y = name("acme/y")


def snapshot(index: RevisionIndex) -> dict[str, Any]:
    """Everything an index answers, as plain data, for comparing two indexes."""
    adapters: list[dict[str, Any]] = []
    token = ""
    while True:
        page = index.list_adapters(page_size=7, page_token=token)
        adapters.extend(summary.to_json() for summary in page.items)
        token = page.next_token
        if not token:
            break
    revisions: dict[str, list[dict[str, Any]]] = {}
    history: dict[str, list[dict[str, Any]]] = {}
    states: dict[str, Any] = {}
    resolved: dict[str, Any] = {}
    for summary in adapters:
        adapter = AdapterName.parse(summary["name"])
        rows: list[dict[str, Any]] = []
        token = ""
        while True:
            revision_page = index.list_revisions(adapter, page_size=3, page_token=token)
            rows.extend(revision.to_json() for revision in revision_page.items)
            token = revision_page.next_token
            if not token:
                break
        revisions[str(adapter)] = rows
        history[str(adapter)] = [move.to_json() for move in index.alias_history(adapter)]
        states[str(adapter)] = index.adapter_state(adapter)
        state = states[str(adapter)]
        for alias in sorted(state.aliases if state else ()):
            # resolving by alias and by number reads the aliases another way than the listing
            by_alias = index.resolve(Ref.parse(f"{adapter}@{alias}"))
            resolved[f"{adapter}@{alias}"] = by_alias.to_json()
            resolved[f"{adapter}@{by_alias.number}"] = index.resolve(
                Ref.parse(f"{adapter}@{by_alias.number}")
            ).to_json()
    counts = {
        k: v
        for k, v in index.counts().items()
        if k in ("adapters", "revisions", "aliases", "purged")
    }
    return {
        "adapters": adapters,
        "revisions": revisions,
        "history": history,
        "states": states,
        "resolved": resolved,
        "refs": sorted((str(d), n) for d, n in index.referenced_digests()),
        "intents": [event.to_json() for event in index.intents()],
        "counts": counts,
    }


def busy_history(writer: Writer) -> None:
    """A log with every op, several tenants, deletes, alias moves and metadata."""
    for text in ("acme/x", "acme2/x", "acme/y", "acme-x/z", "b/c"):
        for _ in range(3):
            writer.push(name(text))
    writer.alias(ACME_X, "serving", 2)
    writer.alias(ACME_X, "canary", 3)
    writer.alias(ACME_X, "serving", 3)
    writer.metadata(ACME_X, 1, {"eval.acc": "0.91"})
    writer.delete(ACME_X, 1)
    writer.alias(ACME_Y, "serving", 1)
    writer.alias(ACME_Y, "serving", 0)
    writer.delete(ACME_Y, 3)
    writer.push(ACME_Y, digest=digest_of("acme/x@2"))  # same bytes as another adapter's revision


def purged_history(writer: Writer) -> None:
    """acme/x pushed, aliased, edited, deleted and purged; acme/y beside it, aliased."""
    for _ in range(3):
        writer.push(ACME_X)
    writer.push(ACME_Y)
    writer.alias(ACME_X, "serving", 2)
    writer.alias(ACME_Y, "serving", 1)
    writer.metadata(ACME_X, 2, {"eval.acc": "0.9"})
    writer.alias(ACME_X, "serving", 0)
    for number in (1, 2, 3):
        writer.delete(ACME_X, number)
    writer.purge(ACME_X)


class RevisionIndexSuite:
    """Subclasses implement :meth:`make_index`."""

    def make_index(self, path: Path) -> RevisionIndex:
        raise NotImplementedError

    @pytest.fixture
    def open_index(self, tmp_path: Path) -> Iterator[Callable[[str], RevisionIndex]]:
        """Opens indexes by label under ``tmp_path`` (the same label reopens) and closes them."""
        opened: list[RevisionIndex] = []

        def open_index(label: str) -> RevisionIndex:
            index = self.make_index(tmp_path / label)
            opened.append(index)
            return index

        yield open_index
        for index in opened:
            index.close()

    @pytest.fixture
    def index(self, open_index: Callable[[str], RevisionIndex]) -> RevisionIndex:
        return open_index("index")

    @pytest.fixture
    def writer(self, index: RevisionIndex) -> Writer:
        return Writer(index)

    def test_generation_moves_with_every_applied_write(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        first = index.generation()
        assert index.generation() == first  # reads leave it alone
        writer.push(ACME_X)
        writer.push(ACME_X)
        writer.alias(ACME_X, "serving", 1)
        writer.metadata(ACME_X, 2, {"k": "v"})
        writer.alias(ACME_X, "serving", 0)
        writer.delete(ACME_X, 1)
        assert index.generation() != first
        before = index.generation()
        with pytest.raises(Conflict):
            index.apply(Event(**{**_fields(writer.events[0]), "seq": 1}))  # stale: refused
        index.resolve(Ref.parse("acme/x"))
        assert index.generation() == before  # a refused write and a read change nothing
        for step in (lambda: writer.push(ACME_Y), lambda: writer.alias(ACME_Y, "a", 1)):
            previous = index.generation()
            step()
            assert index.generation() != previous

    def test_resolve_at_generation_names_the_state_it_read(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        writer.push(ACME_X)
        generation, revision = index.resolve_at_generation(Ref.parse("acme/x"))
        assert generation == index.generation()
        assert revision == index.resolve(Ref.parse("acme/x"))
        writer.push(ACME_X)
        moved, newer = index.resolve_at_generation(Ref.parse("acme/x"))
        assert moved == index.generation() != generation
        assert (revision.number, newer.number) == (1, 2)
        with pytest.raises(NotFound):
            index.resolve_at_generation(Ref.parse("acme/nothing"))

    # -- pushing and numbering ------------------------------------------------------------------

    def test_unknown_adapter_has_no_state(self, index: RevisionIndex) -> None:
        assert index.adapter_state(ACME_X) is None
        assert index.get_revision(ACME_X, 1) is None

    def test_pushes_are_numbered_from_one(self, index: RevisionIndex, writer: Writer) -> None:
        first = writer.push(ACME_X)
        second = writer.push(ACME_X)
        assert (first.revision, second.revision) == (1, 2)
        state = index.adapter_state(ACME_X)
        assert state is not None
        assert (state.next_seq, state.next_revision, state.latest, state.live_revisions) == (
            3,
            3,
            2,
            2,
        )
        assert state.created_at == first.at
        assert state.updated_at == second.at

    def test_push_records_the_pack_summary(self, index: RevisionIndex, writer: Writer) -> None:
        event = writer.push(ACME_X, metadata={"source": "rl-run-7"})
        revision = index.get_revision(ACME_X, 1)
        assert revision is not None
        assert revision.digest == event.digest
        assert revision.size_bytes == event.size_bytes
        assert revision.created_at == event.at
        assert (revision.base_id, revision.rank, revision.alpha, revision.dtype) == (
            "tiny-llama-64",
            8,
            16.0,
            "bfloat16",
        )
        assert revision.target_modules == ("q_proj", "v_proj")
        assert (revision.num_layers, revision.num_experts) == (2, 0)
        assert revision.metadata == {"source": "rl-run-7"}

    def test_manifest_keys_may_be_missing(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X, manifest={"rank": 4})
        revision = index.resolve(Ref.parse("acme/x"))
        assert (revision.rank, revision.base_id, revision.alpha, revision.target_modules) == (
            4,
            "",
            0.0,
            (),
        )

    def test_manifest_of_wrong_type_is_refused(self, index: RevisionIndex, writer: Writer) -> None:
        with pytest.raises(InvalidArgument, match="rank"):
            writer.push(ACME_X, manifest={"rank": "eight"})
        with pytest.raises(InvalidArgument, match="modules"):
            writer.push(ACME_X, manifest={"modules": [{"no-name": 1}]})
        assert index.adapter_state(ACME_X) is None

    def test_many_module_sets_and_bases(self, index: RevisionIndex, writer: Writer) -> None:
        for number in range(1, 6):
            modules = [{"name": f"m{i}"} for i in range(number)]
            writer.push(ACME_X, manifest={**MANIFEST, "modules": modules, "base_id": f"b{number}"})
        for number in range(1, 6):
            revision = index.get_revision(ACME_X, number)
            assert revision is not None
            assert revision.target_modules == tuple(f"m{i}" for i in range(number))
            assert revision.base_id == f"b{number}"

    def test_push_with_wrong_number_conflicts(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        event = writer.push_event(ACME_X)
        for wrong in (1, 3):
            with pytest.raises(Conflict, match="next revision is 2"):
                index.apply(Event(**{**_fields(event), "revision": wrong}))
        assert index.adapter_state(ACME_X).next_revision == 2  # type: ignore[union-attr]

    def test_push_without_digest_is_invalid(self, index: RevisionIndex, writer: Writer) -> None:
        event = writer.push_event(ACME_X)
        with pytest.raises(InvalidArgument, match="no digest"):
            index.apply(Event(**{**_fields(event), "digest": None}))
        assert index.adapter_state(ACME_X) is None

    def test_unknown_op_is_invalid(self, index: RevisionIndex, writer: Writer) -> None:
        with pytest.raises(InvalidArgument, match="unknown event op"):
            index.apply(writer.event(ACME_X, "rename", revision=1))

    # -- sequence numbers -----------------------------------------------------------------------

    def test_stale_seq_conflicts(self, index: RevisionIndex, writer: Writer) -> None:
        first = writer.push(ACME_X)
        racer = writer.push_event(ACME_X)
        writer.push(ACME_X)  # the other writer wins seq 2
        with pytest.raises(Conflict, match="seq 2 is not the next seq 3"):
            index.apply(racer)
        with pytest.raises(Conflict):
            index.apply(first)
        assert index.adapter_state(ACME_X).next_seq == 3  # type: ignore[union-attr]

    def test_seq_ahead_conflicts(self, index: RevisionIndex, writer: Writer) -> None:
        event = writer.push_event(ACME_X)
        with pytest.raises(Conflict, match="not the next seq 1"):
            index.apply(Event(**{**_fields(event), "seq": 2}))
        assert index.adapter_state(ACME_X) is None

    def test_first_event_must_be_a_push(self, index: RevisionIndex, writer: Writer) -> None:
        with pytest.raises(FailedPrecondition, match="does not exist"):
            writer.alias(ACME_X, "serving", 1)
        with pytest.raises(FailedPrecondition):
            writer.delete(ACME_X, 1)
        assert index.adapter_state(ACME_X) is None

    def test_refused_event_consumes_no_seq(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        with pytest.raises(FailedPrecondition):
            writer.alias(ACME_X, "serving", 9)
        assert writer.alias(ACME_X, "serving", 1).seq == 2

    # -- aliases --------------------------------------------------------------------------------

    def test_alias_compare_and_swap(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        writer.push(ACME_X)
        writer.alias(ACME_X, "serving", 1, previous=0)
        with pytest.raises(Conflict, match="points at revision 1, not nothing"):
            writer.alias(ACME_X, "serving", 2, previous=0)
        with pytest.raises(Conflict, match="not revision 2"):
            writer.alias(ACME_X, "serving", 1, previous=2)
        writer.alias(ACME_X, "serving", 2, previous=1)
        assert index.resolve(Ref.parse("acme/x@serving")).number == 2
        assert index.adapter_state(ACME_X).aliases == {"serving": 2}  # type: ignore[union-attr]

    def test_alias_removal(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        writer.alias(ACME_X, "serving", 1)
        writer.alias(ACME_X, "serving", 0, previous=1)
        with pytest.raises(NotFound, match="alias 'serving' of acme/x"):
            index.resolve(Ref.parse("acme/x@serving"))
        with pytest.raises(FailedPrecondition, match="'serving' is not set"):
            writer.alias(ACME_X, "serving", 0, previous=0)
        assert index.get_revision(ACME_X, 1).aliases == ("latest",)  # type: ignore[union-attr]

    def test_alias_to_missing_or_deleted_revision(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        writer.push(ACME_X)
        writer.push(ACME_X)
        with pytest.raises(FailedPrecondition, match="revision 3 does not exist"):
            writer.alias(ACME_X, "serving", 3)
        writer.delete(ACME_X, 1)
        with pytest.raises(FailedPrecondition, match="revision 1 was deleted"):
            writer.alias(ACME_X, "serving", 1)

    @pytest.mark.parametrize(
        ("alias", "error", "words"),
        [
            ("latest", InvalidArgument, "managed by the catalog"),
            ("42", InvalidArgument, "all digits"),
            ("Serving", InvalidName, "invalid alias"),
            ("", InvalidName, "invalid alias"),
        ],
    )
    def test_unsettable_aliases(
        self, index: RevisionIndex, writer: Writer, alias: str, error: type, words: str
    ) -> None:
        writer.push(ACME_X)
        with pytest.raises(error, match=words):
            writer.alias(ACME_X, alias, 1, previous=0)

    def test_revision_lists_its_aliases(self, index: RevisionIndex, writer: Writer) -> None:
        for _ in range(3):
            writer.push(ACME_X)
        writer.alias(ACME_X, "serving", 2)
        writer.alias(ACME_X, "canary", 3)
        writer.alias(ACME_X, "blue", 2)
        by_number = {r.number: r.aliases for r in index.list_revisions(ACME_X).items}
        assert by_number == {1: (), 2: ("blue", "serving"), 3: ("canary", "latest")}
        assert index.resolve(Ref.parse("acme/x@blue")).aliases == ("blue", "serving")

    def test_alias_history(self, index: RevisionIndex, writer: Writer) -> None:
        for _ in range(3):
            writer.push(ACME_X)
        moves = [
            writer.alias(ACME_X, "serving", 1),
            writer.alias(ACME_X, "canary", 3),
            writer.alias(ACME_X, "serving", 2),
            writer.alias(ACME_X, "serving", 0),
        ]
        history = index.alias_history(ACME_X, "serving")
        assert [(m.previous, m.revision) for m in history] == [(0, 1), (1, 2), (2, 0)]
        assert [m.seq for m in history] == [moves[0].seq, moves[2].seq, moves[3].seq]
        assert [m.at for m in history] == [moves[0].at, moves[2].at, moves[3].at]
        everything = index.alias_history(ACME_X)
        assert [(m.alias, m.seq) for m in everything] == [(e.alias, e.seq) for e in moves]
        assert index.alias_history(ACME_X, "never") == []

    def test_alias_history_needs_a_known_adapter(self, index: RevisionIndex) -> None:
        with pytest.raises(NotFound, match="adapter acme/x not found"):
            index.alias_history(ACME_X)

    def test_alias_history_refuses_bad_alias(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        with pytest.raises(InvalidName):
            index.alias_history(ACME_X, "NOT/valid")

    def test_alias_history_is_per_adapter(self, index: RevisionIndex, writer: Writer) -> None:
        acme2 = name("acme2/x")
        writer.push(ACME_X)
        writer.push(acme2)
        writer.alias(acme2, "serving", 1)
        assert index.alias_history(ACME_X) == []

    # -- latest and deletes ---------------------------------------------------------------------

    def test_latest_tracks_deletes(self, index: RevisionIndex, writer: Writer) -> None:
        for _ in range(3):
            writer.push(ACME_X)
        writer.delete(ACME_X, 3)
        assert index.resolve(Ref.parse("acme/x")).number == 2
        writer.delete(ACME_X, 1)
        assert index.resolve(Ref.parse("acme/x")).number == 2
        writer.delete(ACME_X, 2)
        with pytest.raises(NotFound, match="acme/x has no live revision"):
            index.resolve(Ref.parse("acme/x"))
        state = index.adapter_state(ACME_X)
        assert state is not None
        assert (state.latest, state.live_revisions, state.next_revision) == (0, 0, 4)
        assert writer.push(ACME_X).revision == 4  # numbers are never reused
        assert index.resolve(Ref.parse("acme/x")).aliases == ("latest",)

    def test_latest_ignores_other_adapters(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        writer.push(ACME_X)
        for _ in range(5):
            writer.push(ACME_Y)
        writer.delete(ACME_X, 2)
        assert index.resolve(Ref.parse("acme/x")).number == 1
        writer.delete(ACME_X, 1)
        assert index.adapter_state(ACME_X).latest == 0  # type: ignore[union-attr]

    def test_delete_of_aliased_revision_names_the_alias(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        writer.push(ACME_X)
        writer.push(ACME_X)
        writer.alias(ACME_X, "serving", 1)
        writer.alias(ACME_X, "canary", 1)
        with pytest.raises(FailedPrecondition, match="canary, serving"):
            writer.delete(ACME_X, 1)
        writer.alias(ACME_X, "serving", 2)
        writer.alias(ACME_X, "canary", 0)
        writer.delete(ACME_X, 1)
        assert index.get_revision(ACME_X, 1) is None

    def test_latest_does_not_block_delete(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        assert index.adapter_state(ACME_X).live_revisions == 0  # type: ignore[union-attr]

    def test_delete_missing_or_deleted(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        with pytest.raises(FailedPrecondition, match="revision 2 does not exist"):
            writer.delete(ACME_X, 2)
        writer.delete(ACME_X, 1)
        with pytest.raises(FailedPrecondition, match="revision 1 was deleted"):
            writer.delete(ACME_X, 1)

    # -- metadata -------------------------------------------------------------------------------

    def test_metadata_merges(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X, metadata={"a": "1", "b": "2"})
        writer.metadata(ACME_X, 1, {"b": "3", "eval.acc": "0.93"})
        revision = index.get_revision(ACME_X, 1)
        assert revision is not None
        assert revision.metadata == {"a": "1", "b": "3", "eval.acc": "0.93"}
        assert revision.rank == 8  # the rest of the record is untouched

    def test_metadata_removes_keys(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X, metadata={"a": "1", "b": "2", "c": "3"})
        writer.apply(
            writer.event(ACME_X, "metadata", revision=1, metadata={"d": "4"}, removed=("b", "zz"))
        )
        revision = index.get_revision(ACME_X, 1)
        assert revision is not None and revision.metadata == {"a": "1", "c": "3", "d": "4"}

    # -- filtered listings ----------------------------------------------------------------------

    def test_search_filters_on_latest_base_tags_and_alias(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        other = {**MANIFEST, "base_id": "other-base"}
        writer.push(name("acme/a"), metadata={"task": "chat"})
        writer.push(name("acme/b"), manifest=other, metadata={"task": "chat"})
        writer.push(name("acme/c"))
        writer.apply(writer.event(name("acme/c"), "alias", revision=1, alias="serving"))
        # the latest revision decides: acme/d was on the other base, is on ours now
        writer.push(name("acme/d"), manifest=other, metadata={"task": "sql"})
        writer.push(name("acme/d"), metadata={"task": "chat"})
        writer.push(name("zeta/e"), metadata={"task": "chat"})

        def found(prefix: str = "", **filters: Any) -> list[str]:
            return [
                str(a.adapter)
                for a in every_item(
                    lambda token: index.search_adapters(prefix, 1, token, **filters)
                )
            ]

        base = MANIFEST["base_id"]
        assert found(base_id=base) == ["acme/a", "acme/c", "acme/d", "zeta/e"]
        assert found(base_id="other-base") == ["acme/b"]
        assert found(tags={"task": "chat"}) == ["acme/a", "acme/b", "acme/d", "zeta/e"]
        assert found("acme", base_id=base, tags={"task": "chat"}) == ["acme/a", "acme/d"]
        assert found(alias="serving") == ["acme/c"]
        assert found(alias="latest") == ["acme/a", "acme/b", "acme/c", "acme/d", "zeta/e"]
        assert found(base_id="nobody") == []
        assert found() == [str(a.adapter) for a in index.list_adapters().items]
        # every revision deleted: no latest, so no base or tag can match
        writer.delete(name("acme/a"), 1)
        assert found(tags={"task": "chat"}) == ["acme/b", "acme/d", "zeta/e"]
        with pytest.raises(InvalidName):
            index.search_adapters(alias="Bad Alias")
        with pytest.raises(InvalidArgument):
            index.search_adapters(base_id=base, page_token="not-a-token")

    def test_search_pages_resume_after_the_last_adapter_examined(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        for number in range(12):
            writer.push(name(f"acme/p{number:02d}"), metadata={"even": str(number % 2 == 0)})
        page = index.search_adapters(page_size=2, tags={"even": "True"})
        assert [a.adapter.name for a in page.items] == ["p00", "p02"]
        rest = index.search_adapters(
            page_size=100, page_token=page.next_token, tags={"even": "True"}
        )
        assert [a.adapter.name for a in rest.items] == ["p04", "p06", "p08", "p10"]
        assert rest.next_token == ""

    def test_metadata_of_deleted_revision(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        with pytest.raises(FailedPrecondition, match="was deleted"):
            writer.metadata(ACME_X, 1, {"a": "1"})

    def test_returned_metadata_is_a_copy(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X, metadata={"a": "1"})
        index.resolve(Ref.parse("acme/x")).metadata["a"] = "changed"
        assert index.resolve(Ref.parse("acme/x")).metadata == {"a": "1"}

    # -- resolving ------------------------------------------------------------------------------

    def test_resolve_by_number_alias_and_digest(self, index: RevisionIndex, writer: Writer) -> None:
        pushes = [writer.push(ACME_X) for _ in range(3)]
        writer.alias(ACME_X, "serving", 2)
        digest = pushes[0].digest
        assert digest is not None
        assert index.resolve(Ref.parse("acme/x@1")).number == 1
        assert index.resolve(Ref.parse("acme/x@serving")).number == 2
        assert index.resolve(Ref.parse("acme/x")).number == 3
        assert index.resolve(Ref.parse(f"acme/x@{digest}")).number == 1
        for width in (12, 13, 31, 63):
            ref = Ref.parse(f"acme/x@sha256:{digest.hex[:width]}")
            assert index.resolve(ref).digest == digest

    def test_digest_prefix_too_short(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        with pytest.raises(InvalidReference, match="12 to 64"):
            Ref.parse("acme/x@sha256:abcdef01234")
        with pytest.raises(InvalidReference, match="12 to 64"):
            index.resolve(Ref(ACME_X, Selector.DIGEST, "sha256:abc"))

    def test_ambiguous_digest_prefix(self, index: RevisionIndex, writer: Writer) -> None:
        shared = "abcdef012345"
        writer.push(ACME_X, digest=Digest("sha256", shared + "0" * 52))
        writer.push(ACME_X, digest=Digest("sha256", shared + "1" + "0" * 51))
        with pytest.raises(InvalidReference, match="ambiguous: it matches 2 digests"):
            index.resolve(Ref.parse(f"acme/x@sha256:{shared}"))
        assert index.resolve(Ref.parse(f"acme/x@sha256:{shared}1")).number == 2
        assert index.resolve(Ref.parse(f"acme/x@sha256:{shared}0")).number == 1

    def test_digest_is_per_adapter(self, index: RevisionIndex, writer: Writer) -> None:
        other = writer.push(ACME_Y)
        writer.push(ACME_X)
        with pytest.raises(NotFound, match=f"no live revision of acme/x has digest {other.digest}"):
            index.resolve(Ref.parse(f"acme/x@{other.digest}"))

    def test_digest_of_deleted_revision(self, index: RevisionIndex, writer: Writer) -> None:
        gone = writer.push(ACME_X)
        writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        with pytest.raises(NotFound, match="has digest"):
            index.resolve(Ref.parse(f"acme/x@{gone.digest}"))

    def test_same_bytes_twice_resolve_to_newest(self, index: RevisionIndex, writer: Writer) -> None:
        same = digest_of("same")
        writer.push(ACME_X, digest=same)
        writer.push(ACME_X)
        writer.push(ACME_X, digest=same)
        assert index.resolve(Ref.parse(f"acme/x@{same}")).number == 3
        writer.delete(ACME_X, 3)
        assert index.resolve(Ref.parse(f"acme/x@{same}")).number == 1

    def test_not_found_names_the_missing_thing(self, index: RevisionIndex, writer: Writer) -> None:
        with pytest.raises(NotFound, match="adapter acme/x not found"):
            index.resolve(Ref.parse("acme/x"))
        writer.push(ACME_X)
        writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        with pytest.raises(NotFound, match="revision acme/x@1 was deleted"):
            index.resolve(Ref.parse("acme/x@1"))
        with pytest.raises(NotFound, match="revision acme/x@7 does not exist"):
            index.resolve(Ref.parse("acme/x@7"))
        with pytest.raises(NotFound, match="alias 'prod' of acme/x not found"):
            index.resolve(Ref.parse("acme/x@prod"))
        with pytest.raises(NotFound, match="adapter acme/nope not found"):
            index.resolve(Ref.parse("acme/nope@1"))

    def test_get_revision_of_deleted_or_odd_numbers(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        writer.push(ACME_X)
        writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        assert index.get_revision(ACME_X, 1) is None
        assert index.get_revision(ACME_X, 0) is None
        assert index.get_revision(ACME_X, 3) is None
        assert index.get_revision(ACME_X, 2) is not None

    # -- listing --------------------------------------------------------------------------------

    def _adapters(self, writer: Writer) -> list[str]:
        texts = ["acme/x", "acme/y", "acme2/a", "acme-x/z", "acme.b/q", "b/c", "acme/x2", "a/a"]
        for text in texts:
            writer.push(name(text))
        return sorted(texts, key=lambda t: tuple(t.split("/")))

    def _all_pages(self, index: RevisionIndex, prefix: str, size: int) -> list[list[str]]:
        pages: list[list[str]] = []
        token = ""
        while True:
            page = index.list_adapters(prefix, page_size=size, page_token=token)
            pages.append([str(s.adapter) for s in page.items])
            token = page.next_token
            if not token:
                return pages

    def test_list_adapters_pages_through_everything(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        expected = self._adapters(writer)
        pages = self._all_pages(index, "", 3)
        assert [len(p) for p in pages] == [3, 3, 2]
        assert [n for page in pages for n in page] == expected
        assert self._all_pages(index, "", 8) == [expected]  # exact fit: no empty last page
        assert self._all_pages(index, "", MAX_PAGE_SIZE + 5) == [expected]

    def test_list_adapters_prefix_is_safe(self, index: RevisionIndex, writer: Writer) -> None:
        self._adapters(writer)
        assert [n for page in self._all_pages(index, "acme", 1) for n in page] == [
            "acme/x",
            "acme/x2",
            "acme/y",
        ]
        assert self._all_pages(index, "acme/x", 10) == [["acme/x"]]
        assert self._all_pages(index, "acme2", 10) == [["acme2/a"]]
        assert self._all_pages(index, "zzz", 10) == [[]]

    def test_list_adapters_summaries(self, index: RevisionIndex, writer: Writer) -> None:
        for _ in range(3):
            writer.push(ACME_X)
        writer.alias(ACME_X, "serving", 2)
        writer.delete(ACME_X, 1)
        (summary,) = index.list_adapters("acme/x").items
        assert (summary.latest, summary.revision_count, summary.aliases) == (3, 2, {"serving": 2})
        assert summary.updated_at == writer.clock

    def test_list_adapters_page_sizes(self, index: RevisionIndex, writer: Writer) -> None:
        expected = self._adapters(writer)
        assert len(index.list_adapters(page_size=0).items) == min(DEFAULT_PAGE_SIZE, len(expected))
        assert len(index.list_adapters(page_size=1).items) == 1
        with pytest.raises(InvalidArgument, match="negative"):
            index.list_adapters(page_size=-1)

    @pytest.mark.parametrize("token", ["garbage!", "AAAA", "x", "AXN4eXo", "AQ"])
    def test_bad_page_token(self, index: RevisionIndex, writer: Writer, token: str) -> None:
        self._adapters(writer)
        with pytest.raises(InvalidArgument, match="page_token"):
            index.list_adapters(page_size=1, page_token=token)

    def test_page_token_of_another_listing(self, index: RevisionIndex, writer: Writer) -> None:
        self._adapters(writer)
        token = index.list_adapters(page_size=1).next_token
        with pytest.raises(InvalidArgument, match="another listing"):
            index.list_adapters("acme", page_size=1, page_token=token)
        with pytest.raises(InvalidArgument, match="page_token"):
            index.list_revisions(ACME_X, page_size=1, page_token=token)

    def test_page_token_survives_changes(self, index: RevisionIndex, writer: Writer) -> None:
        self._adapters(writer)
        first = index.list_adapters("acme", page_size=1)
        assert [str(s.adapter) for s in first.items] == ["acme/x"]
        writer.push(name("acme/a"))  # sorts before the token: not returned
        writer.push(name("acme/xa"))
        rest = self._all_pages_from(index, "acme", first.next_token)
        assert rest == ["acme/x2", "acme/xa", "acme/y"]

    def _all_pages_from(self, index: RevisionIndex, prefix: str, token: str) -> list[str]:
        names: list[str] = []
        while token:
            page = index.list_adapters(prefix, page_size=2, page_token=token)
            names.extend(str(s.adapter) for s in page.items)
            token = page.next_token
        return names

    @pytest.mark.parametrize("prefix", ["ACME", "acme/", "/x", "acme/x/y", "a b"])
    def test_bad_prefix(self, index: RevisionIndex, prefix: str) -> None:
        with pytest.raises(InvalidName):
            index.list_adapters(prefix)

    def test_list_revisions_pages(self, index: RevisionIndex, writer: Writer) -> None:
        for _ in range(7):
            writer.push(ACME_X)
        writer.push(name("acme/x2"))
        writer.delete(ACME_X, 3)
        numbers: list[int] = []
        token = ""
        while True:
            page = index.list_revisions(ACME_X, page_size=2, page_token=token)
            numbers.extend(r.number for r in page.items)
            token = page.next_token
            if not token:
                break
        assert numbers == [1, 2, 4, 5, 6, 7]

    def test_list_revisions_unknown_or_empty(self, index: RevisionIndex, writer: Writer) -> None:
        with pytest.raises(NotFound, match="adapter acme/x not found"):
            index.list_revisions(ACME_X)
        writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        assert index.list_revisions(ACME_X).items == ()

    # -- blob references ------------------------------------------------------------------------

    def test_refcounts(self, index: RevisionIndex, writer: Writer) -> None:
        shared = digest_of("shared")
        writer.push(ACME_X, digest=shared)
        writer.push(ACME_Y, digest=shared)
        writer.push(ACME_Y, digest=shared)
        own = writer.push(ACME_X).digest
        assert own is not None
        assert index.digest_refcount(shared) == 3
        assert dict(index.referenced_digests()) == {shared: 3, own: 1}
        writer.delete(ACME_Y, 1)
        assert index.digest_refcount(shared) == 2
        writer.delete(ACME_X, 1)
        writer.delete(ACME_Y, 2)
        assert index.digest_refcount(shared) == 0
        assert dict(index.referenced_digests()) == {own: 1}

    def test_referenced_digests_many(self, index: RevisionIndex, writer: Writer) -> None:
        events = [writer.push(ACME_X) for _ in range(2100)]  # more than one read chunk
        found = dict(index.referenced_digests())
        assert found == {event.digest: 1 for event in events}

    # -- intents --------------------------------------------------------------------------------

    def test_intents_add_apply_drop(self, index: RevisionIndex, writer: Writer) -> None:
        first = writer.push_event(ACME_X)
        other = writer.push_event(ACME_Y)
        index.add_intent(first)
        index.add_intent(other)
        assert index.intents() == [first, other]
        assert index.counts()["intents"] == 2
        writer.apply(first)
        assert index.intents() == [other]
        index.drop_intent(ACME_Y, other.seq)
        assert index.intents() == []
        index.drop_intent(ACME_Y, 99)  # dropping nothing is fine

    def test_refused_apply_keeps_the_intent(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        event = writer.event(ACME_X, "delete", revision=5)
        index.add_intent(event)
        with pytest.raises(FailedPrecondition):
            index.apply(event)
        assert index.intents() == [event]

    def test_malformed_intent_is_refused(self, index: RevisionIndex, writer: Writer) -> None:
        event = writer.push_event(ACME_X)
        with pytest.raises(InvalidArgument):
            index.add_intent(Event(**{**_fields(event), "digest": None}))

    # -- purge of deleted names -----------------------------------------------------------------

    def test_purge_forgets_a_deleted_name(self, index: RevisionIndex, writer: Writer) -> None:
        purged_history(writer)
        purge = writer.events[-1]
        assert index.adapter_state(ACME_X) is None
        assert index.next_seq(ACME_X) == purge.seq + 1
        assert [s.adapter for s in index.list_adapters().items] == [ACME_Y]
        assert index.list_adapters("acme/x").items == ()
        with pytest.raises(NotFound, match="adapter acme/x not found"):
            index.alias_history(ACME_X)
        with pytest.raises(NotFound, match="adapter acme/x not found"):
            index.list_revisions(ACME_X)
        with pytest.raises(NotFound, match="adapter acme/x not found"):
            index.resolve(Ref.parse("acme/x@1"))
        assert index.get_revision(ACME_X, 1) is None
        counts = index.counts()
        assert (counts["adapters"], counts["purged"], counts["revisions"]) == (1, 1, 1)
        # the untouched neighbour keeps everything
        assert index.alias_history(ACME_Y)[0].alias == "serving"

    def test_purge_is_refused_while_revisions_live(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        for _ in range(3):
            writer.push(ACME_X)
        writer.delete(ACME_X, 1)
        before = snapshot(index)
        with pytest.raises(FailedPrecondition, match=r"acme/x: revisions 2, 3 still live"):
            index.apply(writer.event(ACME_X, "purge"))
        assert snapshot(index) == before
        writer.delete(ACME_X, 3)
        with pytest.raises(FailedPrecondition, match=r"acme/x: revision 2 still live; delete it"):
            index.apply(writer.event(ACME_X, "purge"))
        state = index.adapter_state(ACME_X)
        assert state is not None and state.next_seq == 6  # refusals consumed no seq

    def test_purge_of_a_name_without_events_is_refused(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        with pytest.raises(FailedPrecondition, match="acme/x: it has no events to purge"):
            index.apply(Event(ACME_X, 1, "purge", 1.0))
        purged_history(writer)
        with pytest.raises(FailedPrecondition, match="no events to purge"):
            index.apply(writer.event(ACME_X, "purge"))  # purged already

    def test_purge_event_names_no_revision(self, index: RevisionIndex, writer: Writer) -> None:
        purged_history(writer)
        with pytest.raises(InvalidArgument, match=r"purge event seq \d+ names a revision"):
            index.apply(writer.event(ACME_Y, "purge", revision=1))

    def test_push_after_purge_starts_a_new_adapter(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        purged_history(writer)
        purge = writer.events[-1]
        pushed = writer.push(ACME_X, digest=digest_of("acme/x again"))
        assert (pushed.seq, pushed.revision) == (purge.seq + 1, 1)
        state = index.adapter_state(ACME_X)
        assert state is not None
        assert (state.next_seq, state.next_revision, state.latest) == (purge.seq + 2, 2, 1)
        assert (state.aliases, state.created_at) == ({}, pushed.at)
        assert index.alias_history(ACME_X) == []
        assert index.resolve(Ref.parse("acme/x")).digest == digest_of("acme/x again")
        assert index.counts()["purged"] == 0
        # and it can be deleted and purged again
        writer.delete(ACME_X, 1)
        again = writer.purge(ACME_X)
        assert index.next_seq(ACME_X) == again.seq + 1
        assert index.counts()["purged"] == 1

    def test_replay_with_purges_matches(
        self, index: RevisionIndex, writer: Writer, open_index: Callable[[str], RevisionIndex]
    ) -> None:
        purged_history(writer)
        acme_z = name("acme/z")
        writer.push(acme_z)
        writer.delete(acme_z, 1)
        writer.purge(acme_z)  # stays purged
        writer.push(ACME_X)  # comes back
        batched = open_index("batched")
        assert batched.apply_many(iter(writer.events)) == len(writer.events)
        one_by_one = open_index("one-by-one")
        for event in writer.events:
            one_by_one.apply(event)
        for fresh in (batched, one_by_one):
            assert snapshot(fresh) == snapshot(index)
            for adapter in (ACME_X, ACME_Y, acme_z):
                assert fresh.next_seq(adapter) == index.next_seq(adapter)
        assert index.counts()["purged"] == 1

    # -- batches, replay, counts ----------------------------------------------------------------

    def test_apply_many_matches_apply(
        self, index: RevisionIndex, writer: Writer, open_index: Callable[[str], RevisionIndex]
    ) -> None:
        busy_history(writer)
        fresh = open_index("replay")
        assert fresh.apply_many(iter(writer.events)) == len(writer.events)
        assert snapshot(fresh) == snapshot(index)

    def test_replay_one_by_one_matches(
        self, index: RevisionIndex, writer: Writer, open_index: Callable[[str], RevisionIndex]
    ) -> None:
        busy_history(writer)
        fresh = open_index("one-by-one")
        for event in writer.events:
            fresh.apply(event)
        assert snapshot(fresh) == snapshot(index)

    def test_apply_many_stops_at_the_refused_event(
        self, index: RevisionIndex, writer: Writer
    ) -> None:
        events = [writer.push_event(ACME_X)]
        events.append(Event(**{**_fields(events[0]), "seq": 2, "revision": 2}))
        events.append(Event(**{**_fields(events[0]), "seq": 3, "op": "delete", "revision": 7}))
        events.append(Event(**{**_fields(events[0]), "seq": 3, "revision": 3}))
        with pytest.raises(FailedPrecondition, match="revision 7 does not exist"):
            index.apply_many(events)
        state = index.adapter_state(ACME_X)
        assert state is not None
        assert (state.next_seq, state.latest) == (3, 2)

    def test_counts(self, index: RevisionIndex, writer: Writer) -> None:
        busy_history(writer)
        counts = index.counts()
        assert (counts["adapters"], counts["revisions"], counts["aliases"]) == (5, 14, 2)
        assert counts["intents"] == 0
        assert counts["bytes_on_disk"] >= 0

    def test_closed_index_refuses_calls(self, index: RevisionIndex, writer: Writer) -> None:
        writer.push(ACME_X)
        index.close()
        with pytest.raises(FailedPrecondition, match="closed"):
            index.resolve(Ref.parse("acme/x"))
        index.close()  # idempotent

    def test_concurrent_writers_and_readers(self, index: RevisionIndex) -> None:
        errors: list[BaseException] = []
        adapters = [name(f"t{i}/a") for i in range(4)]

        def write(adapter: AdapterName) -> None:
            try:
                for number in range(1, 51):
                    index.apply(
                        Event(
                            adapter,
                            number,
                            "push",
                            float(number),
                            revision=number,
                            digest=digest_of(f"{adapter}{number}"),
                            manifest=MANIFEST,
                        )
                    )
            except BaseException as exc:  # reported below
                errors.append(exc)

        def read() -> None:
            try:
                for _ in range(200):
                    for adapter in adapters:
                        try:
                            revision = index.resolve(Ref(adapter, Selector.ALIAS, "latest"))
                        except NotFound:
                            continue
                        assert revision.aliases == ("latest",)
                    index.list_adapters()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(a,)) for a in adapters]
        threads += [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert index.counts()["revisions"] == 200


def _fields(event: Event) -> dict[str, Any]:
    return {field: getattr(event, field) for field in Event.__dataclass_fields__}
