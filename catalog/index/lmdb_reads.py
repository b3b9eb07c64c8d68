"""Reading the LMDB index inside one transaction: resolving references, building revisions,
collecting aliases.

:class:`~catalog.index.lmdb_index.LmdbIndex` opens the transaction and decides what a call
answers; these are the lookups several of its calls (and the event handlers) share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from catalog import keys
from catalog.digest import parse_digest_prefix
from catalog.index import records, rules
from catalog.index.lmdb_batch import Interner
from catalog.index.lmdb_layout import Databases, str_at
from catalog.index.records import AdapterRecord
from catalog.model import LATEST, AdapterName, Ref, Revision, Selector

if TYPE_CHECKING:
    from catalog.index.environment import Txn

__all__ = ["IndexReads"]


class IndexReads:
    """Lookups over the index's sub-databases within a caller's transaction."""

    def __init__(self, dbs: Databases, interner: Interner) -> None:
        self._dbs = dbs
        self._interner = interner

    def resolve(self, txn: Txn, ref: Ref) -> Revision:
        """The live revision ``ref`` names; ``NotFound`` naming what is missing,
        ``InvalidReference`` for an ambiguous or malformed digest prefix."""
        adapter = ref.adapter
        adapter_key = keys.encode(adapter.tenant, adapter.name)
        stored = txn.get(adapter_key, db=self._dbs.adapters)
        if stored is None:
            raise rules.unknown_adapter(adapter)
        record = AdapterRecord.decode(stored)
        number = self._number_of(txn, adapter_key, record, ref)
        value = txn.get(adapter_key + keys.encode(number), db=self._dbs.revisions)
        if value is None:
            raise rules.missing_revision(adapter, number, record.next_revision)
        return self.revision(txn, adapter, adapter_key, number, value, record.latest)

    def _number_of(self, txn: Txn, adapter_key: bytes, record: AdapterRecord, ref: Ref) -> int:
        if ref.selector is Selector.REVISION:
            return int(ref.value)
        if ref.selector is Selector.ALIAS:
            if ref.value == LATEST:
                if not record.latest:
                    raise rules.no_live_revision(ref.adapter)
                return record.latest
            found = txn.get(adapter_key + keys.encode(ref.value), db=self._dbs.aliases)
            if found is None:
                raise rules.unknown_alias(ref.adapter, ref.value)
            return records.decode_number(found)
        return self._number_by_digest(txn, adapter_key, ref)

    def _number_by_digest(self, txn: Txn, adapter_key: bytes, ref: Ref) -> int:
        algorithm, hex_prefix = parse_digest_prefix(ref.value)
        # whole bytes go in the scan prefix; an odd last hex digit is checked on each match
        raw_prefix = bytes.fromhex(hex_prefix[: len(hex_prefix) // 2 * 2])
        scan = adapter_key + keys.encode(algorithm, raw_prefix)
        matches: dict[bytes, list[int]] = {}
        cursor = txn.cursor(db=self._dbs.digests)
        positioned = cursor.set_range(scan)
        while positioned:
            key = cursor.key()
            if not key.startswith(scan):
                break
            raw = key[len(scan) - len(raw_prefix) :]
            if raw.hex().startswith(hex_prefix):
                matches[raw] = records.decode_numbers(cursor.value())
            positioned = cursor.next()
        if not matches:
            raise rules.unknown_digest(ref.adapter, ref.value)
        if len(matches) > 1:
            raise rules.ambiguous_digest(ref.adapter, ref.value, len(matches))
        # identical bytes pushed twice: the newest revision holding them
        return max(next(iter(matches.values())))

    def revision(
        self,
        txn: Txn,
        adapter: AdapterName,
        adapter_key: bytes,
        number: int,
        value: bytes,
        latest: int,
    ) -> Revision:
        """The revision stored as ``value``, with the aliases pointing at it (``latest`` is
        the adapter's latest live number)."""
        aliases = self.aliases_at(txn, adapter_key, number)
        if number == latest:
            aliases.append(LATEST)
        return records.decode_revision(
            adapter, number, value, self._interner.lookup(txn), tuple(sorted(aliases))
        )

    def aliases_at(self, txn: Txn, adapter_key: bytes, number: int) -> list[str]:
        """The explicit aliases pointing at revision ``number``."""
        scan = adapter_key + keys.encode(number)
        found: list[str] = []
        cursor = txn.cursor(db=self._dbs.revision_aliases)
        positioned = cursor.set_range(scan)
        while positioned:
            key = cursor.key()
            if not key.startswith(scan):
                break
            found.append(str_at(key, len(scan)))
            positioned = cursor.next()
        return found

    def adapter_aliases(self, txn: Txn, adapter_key: bytes) -> dict[str, int]:
        """Every explicit alias of the adapter -> the revision it points at."""
        found: dict[str, int] = {}
        cursor = txn.cursor(db=self._dbs.aliases)
        positioned = cursor.set_range(adapter_key)
        while positioned:
            key = cursor.key()
            if not key.startswith(adapter_key):
                break
            found[str_at(key, len(adapter_key))] = records.decode_number(cursor.value())
            positioned = cursor.next()
        return found
