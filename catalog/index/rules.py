"""What every index backend checks before applying an event, and the words it fails with.

Backends keep their own state; this module only holds the checks that need no state (the shape
of an event, the alias naming rule, reading the pack manifest) and the error messages, so two
backends refuse the same event with the same exception and the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catalog.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    InvalidReference,
    NotFound,
)
from catalog.events import Event
from catalog.model import LATEST, AdapterName, check_part

EVENT_OPS = frozenset({"push", "alias", "delete", "metadata", "purge"})
MAX_REVISION = 0xFFFFFFFF  # what Ref.parse accepts, and what a 4-byte record field holds


@dataclass(frozen=True, slots=True)
class PackSummary:
    """The few pack manifest fields the index keeps per revision (the rest stays in the log)."""

    base_id: str = ""
    rank: int = 0
    alpha: float = 0.0
    dtype: str = ""
    target_modules: tuple[str, ...] = ()
    num_layers: int = 0
    num_experts: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> PackSummary:
        """Read ``base_id``, ``rank``, ``alpha``, ``dtype``, ``num_layers``, ``num_experts`` and
        the names in ``modules`` (or a ``target_modules`` list of names).

        Missing keys take defaults (the pack format may add or omit fields); a present key of the
        wrong type raises ``InvalidArgument`` naming it.
        """
        if not isinstance(manifest, dict):
            raise InvalidArgument(f"pack manifest must be an object, got {type(manifest).__name__}")
        return cls(
            base_id=_field(manifest, "base_id", str, ""),
            rank=_count(manifest, "rank"),
            alpha=_alpha(manifest),
            dtype=_field(manifest, "dtype", str, ""),
            target_modules=_module_names(manifest),
            num_layers=_count(manifest, "num_layers"),
            num_experts=_count(manifest, "num_experts"),
        )


def _field(manifest: dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = manifest.get(key)
    if value is None:
        return default
    if type(value) is kind:  # the common case, before the bool-excluding checks
        return value
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgument(f"pack manifest field {key!r} has type {type(value).__name__}")
    return value


def _alpha(manifest: dict[str, Any]) -> float:
    value = manifest.get("alpha")
    if type(value) is float:
        return value
    return float(_field(manifest, "alpha", (int, float), 0.0))


def _count(manifest: dict[str, Any], key: str) -> int:
    value: int = _field(manifest, key, int, 0)
    if not 0 <= value <= MAX_REVISION:
        raise InvalidArgument(f"pack manifest field {key!r} = {value} is out of range")
    return value


def _module_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    modules = manifest.get("modules")
    if modules is None:
        names = manifest.get("target_modules") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument("pack manifest field 'target_modules' must be a list of names")
        return tuple(names)
    if not isinstance(modules, list):
        raise InvalidArgument("pack manifest field 'modules' must be a list")
    try:
        names = tuple([module["name"] for module in modules])
    except (TypeError, KeyError, IndexError):
        names = None
    if names is not None and all(type(name) is str for name in names):
        return names
    found: list[str] = []  # the slow way, to name the bad entry
    for position, module in enumerate(modules):
        name = module.get("name") if isinstance(module, dict) else None
        if not isinstance(name, str):
            raise InvalidArgument(f"pack manifest modules[{position}] has no 'name' string")
        found.append(name)
    return tuple(found)


def check_alias_name(alias: str) -> str:
    """An alias an event may set: a valid name, not ``latest`` and not all digits.

    Raises ``InvalidName`` for a malformed name and ``InvalidArgument`` for the other two.
    """
    check_part("alias", alias)
    if alias == LATEST:
        raise InvalidArgument("alias 'latest' is managed by the catalog and cannot be set")
    if alias.isdigit():
        raise InvalidArgument(f"alias {alias!r} is all digits and would read as a revision number")
    return alias


def check_event_shape(event: Event) -> None:
    """Check all of ``event`` that needs no index state; raises ``InvalidArgument``."""
    if event.op not in EVENT_OPS:
        raise InvalidArgument(f"{event.adapter}: unknown event op {event.op!r}")
    if not isinstance(event.seq, int) or event.seq < 1:
        raise InvalidArgument(f"{event.adapter}: event seq {event.seq!r} must be >= 1")
    if not isinstance(event.revision, int) or not 0 <= event.revision <= MAX_REVISION:
        raise InvalidArgument(f"{event.adapter}: event revision {event.revision!r} is out of range")
    if not isinstance(event.at, float | int):
        raise InvalidArgument(f"{event.adapter}: event time {event.at!r} is not a number")
    if event.op == "push":
        if event.digest is None:
            raise InvalidArgument(f"{event.adapter}: push event seq {event.seq} has no digest")
        if event.revision < 1:
            raise InvalidArgument(f"{event.adapter}: push event seq {event.seq} has no revision")
        if not isinstance(event.size_bytes, int) or not 0 <= event.size_bytes < 1 << 63:
            raise InvalidArgument(f"{event.adapter}: push size {event.size_bytes!r} is invalid")
    elif event.op == "alias":
        check_alias_name(event.alias)
        if not isinstance(event.previous, int) or not 0 <= event.previous <= MAX_REVISION:
            raise InvalidArgument(f"{event.adapter}: alias previous {event.previous!r} is invalid")
    elif event.op == "purge":
        if event.revision != 0:
            raise InvalidArgument(f"{event.adapter}: purge event seq {event.seq} names a revision")
    elif event.revision < 1:
        raise InvalidArgument(f"{event.adapter}: {event.op} event seq {event.seq} has no revision")
    if event.op in ("push", "metadata") and not all(
        type(k) is str and type(v) is str for k, v in event.metadata.items()
    ):
        raise InvalidArgument(f"{event.adapter}: metadata keys and values must be strings")
    if not all(type(k) is str for k in event.removed):
        raise InvalidArgument(f"{event.adapter}: removed metadata keys must be strings")


def edited_metadata(
    metadata: dict[str, str], update: dict[str, str], removed: tuple[str, ...]
) -> dict[str, str]:
    """A revision's metadata after a ``metadata`` event: ``update`` merged, ``removed`` dropped."""
    merged = {**metadata, **update}
    for key in removed:
        merged.pop(key, None)
    return merged


# -- the words both backends fail with --------------------------------------------------------


def stale_seq(event: Event, next_seq: int) -> Conflict:
    return Conflict(
        f"{event.adapter}: event seq {event.seq} is not the next seq {next_seq}"
        " (another writer got there first)"
    )


def wrong_push_number(event: Event, next_revision: int) -> Conflict:
    return Conflict(
        f"{event.adapter}: push numbered {event.revision} but the next revision is {next_revision}"
    )


def stale_alias(event: Event, current: int) -> Conflict:
    return Conflict(
        f"{event.adapter}: alias {event.alias!r} points at {_target(current)},"
        f" not {_target(event.previous)} as expected"
    )


def _target(number: int) -> str:
    return f"revision {number}" if number else "nothing"


def unset_alias(event: Event) -> FailedPrecondition:
    return FailedPrecondition(f"{event.adapter}: alias {event.alias!r} is not set")


def not_live(event: Event, next_revision: int) -> FailedPrecondition:
    what = "was deleted" if 0 < event.revision < next_revision else "does not exist"
    return FailedPrecondition(
        f"{event.op} of {event.adapter}@{event.revision}: revision {event.revision} {what}"
    )


def aliased_delete(event: Event, aliases: list[str]) -> FailedPrecondition:
    names = ", ".join(sorted(aliases))
    plural = "es" if len(aliases) > 1 else ""
    return FailedPrecondition(
        f"cannot delete {event.adapter}@{event.revision}: alias{plural} {names} point at it;"
        " move them first"
    )


def purge_unknown(event: Event) -> FailedPrecondition:
    return FailedPrecondition(f"cannot purge {event.adapter}: it has no events to purge")


def purge_live(event: Event, numbers: list[int]) -> FailedPrecondition:
    """Refusal of a purge while revisions live; ``numbers`` are some or all of them."""
    listed = ", ".join(map(str, sorted(numbers)))
    plural = "s" if len(numbers) > 1 else ""
    return FailedPrecondition(
        f"cannot purge {event.adapter}: revision{plural} {listed} still live;"
        f" delete {'them' if plural else 'it'} first (rm --all)"
    )


def unknown_adapter(adapter: AdapterName) -> NotFound:
    return NotFound(f"adapter {adapter} not found")


def no_live_revision(adapter: AdapterName) -> NotFound:
    return NotFound(f"adapter {adapter} has no live revision (every revision was deleted)")


def unknown_alias(adapter: AdapterName, alias: str) -> NotFound:
    return NotFound(f"alias {alias!r} of {adapter} not found")


def missing_revision(adapter: AdapterName, number: int, next_revision: int) -> NotFound:
    what = "was deleted" if 0 < number < next_revision else "does not exist"
    return NotFound(f"revision {adapter}@{number} {what}")


def unknown_digest(adapter: AdapterName, digest_prefix: str) -> NotFound:
    return NotFound(f"no live revision of {adapter} has digest {digest_prefix}")


def ambiguous_digest(adapter: AdapterName, digest_prefix: str, matches: int) -> InvalidReference:
    return InvalidReference(
        f"digest prefix {digest_prefix} of {adapter} is ambiguous: it matches {matches} digests;"
        " give more hex digits"
    )
