"""Who lives where in the engine: the host tier of staged packs and the table of GPU slots.

Both tiers evict through one small policy interface (LRU is the baseline). Neither class locks:
the engine owns one lock and calls them while holding it, because a decision in one tier (evict
this slot) must be consistent with the other bookkeeping (bindings, pins) it keeps.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from catalog.errors import ResourceExhausted
from catalog.model import Revision
from engine_plugin.staging import StagedAdapter

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(Protocol[K]):
    """Chooses what to evict. Told about every use and removal; asked for one victim at a time."""

    def touch(self, key: K) -> None:
        """``key`` was used (or added) just now."""

    def forget(self, key: K) -> None:
        """``key`` left the tier; a no-op for unknown keys."""

    def victim(self, evictable: Callable[[K], bool]) -> K | None:
        """The key to evict next among those ``evictable`` accepts, or None."""


class LRUPolicy(Generic[K]):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def touch(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: K) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[K], bool]) -> K | None:
        for key in self._order:
            if evictable(key):
                return key
        return None


# --------------------------------------------------------------------------------- host tier


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_in: int = 0


class HostTier:
    """Staged packs in host memory (pinned where CUDA exists) under a byte budget.

    A pack larger than the whole budget is handed through without being kept.
    """

    def __init__(self, budget_bytes: int, policy: EvictionPolicy[str] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"host budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.policy: EvictionPolicy[str] = policy if policy is not None else LRUPolicy()
        self.counters = TierCounters()
        self._entries: dict[str, StagedAdapter] = {}
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Occupancy and counters: ``bytes``, ``budget_bytes``, ``entries``, ``hits``,
        ``misses``, ``evictions``, ``bytes_in``."""
        return {
            "bytes": self.nbytes,
            "budget_bytes": self.budget_bytes,
            "entries": len(self),
            **vars(self.counters),
        }

    def digests(self) -> list[str]:
        return list(self._entries)

    def get(self, digest: str) -> StagedAdapter | None:
        """The staged pack, counted as a hit or a miss."""
        staged = self._entries.get(digest)
        if staged is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.policy.touch(digest)
        return staged

    def peek(self, digest: str) -> StagedAdapter | None:
        """The staged pack without counting or touching it."""
        return self._entries.get(digest)

    def put(self, staged: StagedAdapter) -> list[str]:
        """Keep ``staged``, evicting least-wanted packs to fit; returns the evicted digests."""
        digest = staged.digest
        if digest in self._entries:
            self.policy.touch(digest)
            return []
        if staged.nbytes > self.budget_bytes:
            return []
        evicted: list[str] = []
        while self._bytes + staged.nbytes > self.budget_bytes:
            victim = self.policy.victim(lambda d: d in self._entries)
            if victim is None:
                break
            self.remove(victim)
            self.counters.evictions += 1
            evicted.append(victim)
        self._entries[digest] = staged
        self._bytes += staged.nbytes
        self.counters.bytes_in += staged.nbytes
        self.policy.touch(digest)
        return evicted

    def remove(self, digest: str) -> None:
        staged = self._entries.pop(digest, None)
        if staged is not None:
            self._bytes -= staged.nbytes
        self.policy.forget(digest)


# --------------------------------------------------------------------------------- GPU slots


class SlotState(enum.Enum):
    LOADING = "loading"  # claimed by one loader, being written; nobody else may use it
    READY = "ready"
    #: Released, its weights being zeroed off the releasing thread; nobody may use it, and its
    #: slot is freed only once zeroed (see ``ResidentEngine``'s hot swap).
    CLEARING = "clearing"


@dataclass(eq=False)
class SlotEntry:
    """One occupied slot. ``leases`` counts running forward/generate calls that use it."""

    slot: int
    revision: Revision
    state: SlotState = SlotState.LOADING
    leases: int = 0
    pinned: bool = False
    #: Superseded (hot swap) or detached: freed as soon as no running call uses it.
    retired: bool = False
    uses: int = 0
    #: Bytes copied into the slot for this revision (0 until loaded).
    nbytes: int = 0
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = str(self.revision.digest)

    @property
    def idle(self) -> bool:
        return self.leases == 0 and self.state is SlotState.READY


class SlotsExhausted(ResourceExhausted):
    """Every slot is leased by a running call, pinned, or being loaded."""


class SlotTable:
    """Which revision occupies which slot; leases, pins, retirement and the victim choice.

    Free slots are handed out lowest first, which keeps the occupied slots packed at the low
    end (the wide decode path reads slots ``0..k``).
    """

    def __init__(self, num_slots: int, policy: EvictionPolicy[str] | None = None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.policy: EvictionPolicy[str] = policy if policy is not None else LRUPolicy()
        self._by_digest: dict[str, SlotEntry] = {}
        self._by_slot: dict[int, SlotEntry] = {}
        self._free = list(range(num_slots))

    def __iter__(self) -> Iterator[SlotEntry]:
        return iter(sorted(self._by_slot.values(), key=lambda e: e.slot))

    def entries(self) -> Iterable[SlotEntry]:
        """Every entry, in no particular order (cheaper than iterating, which sorts)."""
        return self._by_slot.values()

    def __len__(self) -> int:
        return len(self._by_slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def get(self, digest: str) -> SlotEntry | None:
        return self._by_digest.get(digest)

    def at(self, slot: int) -> SlotEntry | None:
        return self._by_slot.get(slot)

    def lease(self, entry: SlotEntry) -> None:
        entry.leases += 1
        entry.uses += 1
        self.policy.touch(entry.digest)

    def unlease(self, entry: SlotEntry) -> None:
        if entry.leases <= 0:
            raise RuntimeError(f"slot {entry.slot} released more often than leased")
        entry.leases -= 1

    def evictable(self, entry: SlotEntry) -> bool:
        return entry.idle and not entry.pinned

    def claim(self, revision: Revision) -> tuple[SlotEntry, SlotEntry | None]:
        """Reserve a slot for ``revision`` (state LOADING, one lease for the loader).

        Takes a free slot, else the policy's victim among idle unpinned slots. Returns the new
        entry and the evicted one (whose slot the caller must clear before writing).

        Raises:
            SlotsExhausted: every slot is leased, pinned or loading.
        """
        evicted: SlotEntry | None = None
        if self._free:
            slot = min(self._free)
            self._free.remove(slot)
        else:
            victim = self.policy.victim(
                lambda d: d in self._by_digest and self.evictable(self._by_digest[d])
            )
            if victim is None:
                raise SlotsExhausted(self._exhausted_message())
            evicted = self._by_digest[victim]
            self._drop(evicted)
            slot = evicted.slot
        entry = SlotEntry(slot=slot, revision=revision)
        self._by_digest[entry.digest] = entry
        self._by_slot[slot] = entry
        self.lease(entry)
        return entry, evicted

    def release(self, entry: SlotEntry) -> None:
        """Forget ``entry`` and free its slot (the caller has cleared it)."""
        self._drop(entry)
        self._free.append(entry.slot)

    def withdraw(self, entry: SlotEntry) -> None:
        """Forget ``entry`` without freeing its slot: a slot that could not be zeroed is never
        handed out again (the table has one slot fewer from then on)."""
        self._drop(entry)

    def _drop(self, entry: SlotEntry) -> None:
        self._by_digest.pop(entry.digest, None)
        self._by_slot.pop(entry.slot, None)
        self.policy.forget(entry.digest)

    def _exhausted_message(self) -> str:
        busy = [e for e in self if e.leases]
        pinned = [e for e in self if e.pinned and not e.leases]

        def names(entries: list[SlotEntry]) -> str:
            return ", ".join(f"{e.revision.adapter}@{e.revision.number}" for e in entries) or "-"

        return (
            f"all {self.num_slots} adapter slots are busy or pinned "
            f"(in use by running batches: {names(busy)}; pinned: {names(pinned)}); "
            "wait for running requests, unpin or detach an adapter, or raise num_slots"
        )
