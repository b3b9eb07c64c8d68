"""Who may call what: principals and their tokens, and one table of every RPC's rule.

``loracat serve --auth FILE`` reads principals from a TOML file::

    [[principal]]
    name = "alice"
    token_sha256 = "<hex sha256 of the token>"   # the token itself is never stored
    tenants = ["acme", "acme-*"]                 # exact tenants or fnmatch globs
    role = "write"                               # read | write | engine | admin

Clients send ``authorization: Bearer <token>`` call metadata. :class:`Guard` wraps each method's
behaviour once, at registration (``catalog.service.handlers``), so every call passes through the
same check: a missing or unknown token is ``Unauthenticated``; a role without the method's
capability, or a tenant outside the principal's globs, is ``PermissionDenied``. The tenant check
comes before the catalog is asked anything, so the answer is the same whether or not the adapter
exists (no existence leak). Listings are filtered to reachable tenants, and ``Stats`` hides the
durable store's URL (a filesystem path on the embedded default) from non-admins.

Every call runs inside ``catalog.identity.acting_as(principal)``, so the core stamps the
principal on the events it writes and keys engine records by it; a server stream's generator
(``FetchPack``, ``Prefetch``, ``WatchHints``) is checked before its first message and then
stepped as its principal.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from itertools import chain
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from catalog._proto.loracat.v1 import catalog_pb2 as pb
from catalog.errors import (
    CatalogError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from catalog.identity import acting_as
from catalog.model import AdapterName, Ref, check_part

log = logging.getLogger(__name__)
#: Write-side calls go to this logger, one JSON line each, when ``serve --audit-log`` is given.
AUDIT_LOGGER = "loracat.audit"

#: What each role may do. ``read``: resolve, list, show, fetch, history, stats. ``write``: read
#: plus push, aliases, metadata and deletes. ``engine``: read plus residency, hints, prefetch.
#: ``admin``: everything, including gc, verify, reindex, checkpoint and the NVMe cache.
ROLE_CAPABILITIES: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "engine": frozenset({"read", "engine"}),
    "admin": frozenset({"read", "write", "engine", "admin"}),
}
_TOKEN_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Tenant globs: the tenant alphabet plus fnmatch's ``*``, ``?`` and ``[...]``.
_TENANT_GLOB = re.compile(r"[a-z0-9._*?\[\]!-]{1,64}")
_BEARER = "bearer "
#: The longest principal name kept (names appear in events and audit lines).
MAX_PRINCIPAL_NAME = 64


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its name, role and the tenants (globs) it may act on."""

    name: str
    role: str
    tenants: tuple[str, ...]

    def may(self, capability: str) -> bool:
        return capability in ROLE_CAPABILITIES[self.role]

    def reaches(self, tenant: str) -> bool:
        return any(fnmatchcase(tenant, glob) for glob in self.tenants)


#: Who calls a server started without ``--auth``: anyone, with every capability.
ANONYMOUS = Principal("", "admin", ("*",))


def token_sha256(token: str) -> str:
    """The hex sha256 of ``token``, as the auth file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_principals(path: Path) -> dict[str, Principal]:
    """The principals of the TOML file at ``path``, by token hash.

    Raises ``InvalidArgument`` naming the file, the principal and the key that is wrong (and
    ``InvalidArgument`` for an unreadable file): a bad file never half-loads.
    """
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidArgument(f"auth file {path}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"auth file {path}: not valid TOML: {exc}") from None
    entries = doc.get("principal", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidArgument(f"auth file {path}: expected [[principal]] tables")
    by_hash: dict[str, Principal] = {}
    names: set[str] = set()
    for number, entry in enumerate(entries, 1):
        where = f"auth file {path}, principal {number}"
        name = entry.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_PRINCIPAL_NAME:
            raise InvalidArgument(f"{where}: 'name' must be a string of 1-64 characters")
        if not name.isprintable():
            raise InvalidArgument(f"{where}: 'name' must be printable")
        where = f"auth file {path}, principal {name!r}"
        if name in names:
            raise InvalidArgument(f"{where}: the name is used twice")
        digest = entry.get("token_sha256")
        if not isinstance(digest, str) or not _TOKEN_SHA256.fullmatch(digest):
            raise InvalidArgument(f"{where}: 'token_sha256' must be 64 lowercase hex digits")
        if digest in by_hash:
            raise InvalidArgument(f"{where}: its token is also {by_hash[digest].name!r}'s")
        role = entry.get("role")
        if role not in ROLE_CAPABILITIES:
            raise InvalidArgument(f"{where}: 'role' must be one of {', '.join(ROLE_CAPABILITIES)}")
        tenants = entry.get("tenants")
        if (
            not isinstance(tenants, list)
            or not tenants
            or not all(isinstance(t, str) and _TENANT_GLOB.fullmatch(t) for t in tenants)
        ):
            raise InvalidArgument(
                f"{where}: 'tenants' must be a non-empty list of tenant names or globs"
            )
        names.add(name)
        by_hash[digest] = Principal(name, str(role), tuple(tenants))
    return by_hash


class Authenticator:
    """The principals of an auth file; ``reload`` swaps in a new version (SIGHUP)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._by_hash = load_principals(self.path)

    def reload(self) -> int:
        """Read the file again and use it from the next call on; returns how many principals
        it holds. Raises ``InvalidArgument`` (and keeps the previous principals) if it is bad."""
        by_hash = load_principals(self.path)
        self._by_hash = by_hash  # one reference swap: calls see the old or the new file
        return len(by_hash)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        """The principal whose token the call carries. Raises ``Unauthenticated``."""
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else str(value)
                break
        if header is None:
            raise Unauthenticated(
                "this catalog requires a token: send 'authorization: Bearer <token>'"
                " (loracat --token or $LORACAT_TOKEN; CatalogClient(..., token=...))"
            )
        if header[: len(_BEARER)].lower() != _BEARER or len(header) <= len(_BEARER):
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
        # The hash is the lookup key: a timing difference can reveal only hash bits, not token.
        principal = self._by_hash.get(token_sha256(header[len(_BEARER) :].strip()))
        if principal is None:
            raise Unauthenticated("the token is not valid (unknown or revoked)")
        return principal


# -- the table of methods ------------------------------------------------------------------------

TenantsOf = Callable[[Any], Sequence[str]]


def _of_name(request: Any) -> Sequence[str]:
    return (AdapterName.parse(request.name).tenant,)


def _of_ref(request: Any) -> Sequence[str]:
    return (Ref.parse(request.ref).adapter.tenant,)


def _of_refs(request: Any) -> Sequence[str]:
    # a reference that does not parse names no tenant and reaches nothing: the prefetch
    # reports it as failed on its own line, as it does without --auth
    tenants = set()
    for ref in request.refs:
        try:
            tenants.add(Ref.parse(ref).adapter.tenant)
        except InvalidArgument:
            continue
    return tuple(tenants)


def _of_prefix(request: Any) -> Sequence[str]:
    # "" lists every tenant: allowed, and the answer is filtered (see _reachable_adapters)
    if not request.prefix:
        return ()
    return (check_part("tenant", request.prefix.partition("/")[0]),)


def _of_push_header(first: Any) -> Sequence[str]:
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgument("a push must start with a header message")
    return (AdapterName.parse(first.header.name).tenant,)


def _of_inbox_push(request: Any) -> Sequence[str]:
    return (AdapterName.parse(request.header.name).tenant,)


def _reachable_adapters(principal: Principal, request: Any, response: Any) -> Any:
    kept = [a for a in response.adapters if principal.reaches(a.name.partition("/")[0])]
    if len(kept) != len(response.adapters):
        del response.adapters[:]
        response.adapters.extend(kept)
    return response


def redacted_store_url(url: str) -> str:
    """``url`` without its location: ``file:///srv/loracat/store`` -> ``file://``."""
    scheme = urlsplit(url).scheme
    return f"{scheme}://" if scheme else ""


def _stats_for(principal: Principal, request: Any, response: Any) -> Any:
    if not principal.may("admin"):
        response.store_url = redacted_store_url(response.store_url)
    return response


@dataclass(frozen=True, slots=True)
class MethodRule:
    """What a method needs: a capability, and the tenants a request acts on (None: not
    tenant-scoped), plus an optional filter of the answer for the caller."""

    capability: str
    tenants: TenantsOf | None = None
    answer: Callable[[Principal, Any, Any], Any] | None = None


#: Every RPC of the Catalog service. A method missing here is refused at server start.
METHOD_RULES: dict[str, MethodRule] = {
    "Push": MethodRule("write", _of_push_header),
    # A colocated push (catalog.local_push): the inbox's place, then a push naming a file in it.
    "GetPushInbox": MethodRule("write"),
    "PushFromInbox": MethodRule("write", _of_inbox_push),
    "Resolve": MethodRule("read", _of_ref),
    "ListAdapters": MethodRule("read", _of_prefix, _reachable_adapters),
    "ListRevisions": MethodRule("read", _of_name),
    "SetAlias": MethodRule("write", _of_name),
    "Rollback": MethodRule("write", _of_name),
    "AliasHistory": MethodRule("read", _of_name),
    "SetMetadata": MethodRule("write", _of_ref),
    "Delete": MethodRule("write", _of_ref),
    "Purge": MethodRule("write", _of_name),
    "FetchPack": MethodRule("read", _of_ref),
    "Stats": MethodRule("read", None, _stats_for),
    "GarbageCollect": MethodRule("admin"),
    "Verify": MethodRule("admin"),
    "Reindex": MethodRule("admin"),
    "Checkpoint": MethodRule("admin"),
    "Prefetch": MethodRule("engine", _of_refs),
    "PinPack": MethodRule("admin", _of_ref),
    "UnpinPack": MethodRule("admin", _of_ref),
    "EvictPack": MethodRule("admin", _of_ref),
    "ListCache": MethodRule("admin"),
    # The colocated read path (issue 14): zero-copy reads of the NVMe tier by an engine on the
    # catalog's host. Whoever can open the cache files reads every tenant's packs: file
    # permissions, not this table, guard that.
    "GetPackCacheLocation": MethodRule("engine"),
    "LeasePack": MethodRule("engine", _of_ref),
    # Writes only under the server's --peft-export-root, into a directory holding the
    # caller's nonce (catalog.peft_export); reads the ref's pack like FetchPack.
    "ExportPeftDir": MethodRule("engine", _of_ref),
    "ReleasePackLease": MethodRule("engine"),
    "ReportPackReads": MethodRule("engine", _of_refs),
    "RegisterEngine": MethodRule("engine"),
    "ReportResidency": MethodRule("engine"),
    "WatchHints": MethodRule("engine"),
    # Every tenant's refs and callers, so an operator's: `loracat trace export`.
    "ExportRequests": MethodRule("admin"),
}
#: Capabilities whose calls change something: these get an audit line.
AUDITED = frozenset({"write", "admin"})
#: How much of a request's target an audit line keeps.
AUDIT_TARGET_CHARS = 200


class CallContext(Protocol):
    def invocation_metadata(self) -> Any: ...


Behavior = Callable[[Any, Any], Any]


def _target(request: Any) -> str:
    for field in ("name", "ref", "prefix"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value[:AUDIT_TARGET_CHARS]
    if isinstance(request, pb.PushRequest) and request.WhichOneof("payload") == "header":
        return request.header.name[:AUDIT_TARGET_CHARS]
    if isinstance(request, pb.PushFromInboxRequest):
        return request.header.name[:AUDIT_TARGET_CHARS]
    return ""


def _stepped_as(principal: str, stream: Iterable[Any]) -> Iterator[Any]:
    """``stream`` with every step (and its closing) run as ``principal``: a server stream's
    generator runs a step at a time on whichever pool thread the handler hands it to."""
    iterator = iter(stream)
    try:
        while True:
            with acting_as(principal):
                item = next(iterator, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            with acting_as(principal):
                close()


_DONE = object()


class Guard:
    """Authentication, authorization and the audit log around every method of the service.

    ``authenticator=None`` serves everyone as :data:`ANONYMOUS` (a server without ``--auth``);
    ``audit`` (a logger) gets one JSON line per write-side call, with the principal, method,
    target and outcome, never the token.
    """

    def __init__(
        self, authenticator: Authenticator | None, audit: logging.Logger | None = None
    ) -> None:
        self.authenticator = authenticator
        self.audit = audit

    def wrap(
        self,
        method: str,
        behavior: Behavior,
        *,
        client_streaming: bool,
        server_streaming: bool = False,
    ) -> Behavior:
        """``behavior`` with the checks of ``METHOD_RULES[method]`` in front. Raises
        ``KeyError`` at registration for a method without a rule."""
        rule = METHOD_RULES[method]
        audited = self.audit is not None and rule.capability in AUDITED

        def guarded(request: Any, context: CallContext) -> Any:
            first = next(request, None) if client_streaming else request
            if client_streaming:
                request = chain((first,), request)
            principal: Principal | None = None
            outcome = "OK"
            try:  # refusals are audited too, under the principal when it is known
                principal = self._authenticate(context)
                self._authorize(principal, rule, first)
                with acting_as(principal.name):
                    response = behavior(request, context)
                if server_streaming:  # its body runs later, a step at a time
                    response = _stepped_as(principal.name, response)
            except CatalogError as exc:
                outcome = exc.grpc_code
                raise
            except Exception:
                outcome = "INTERNAL"
                raise
            finally:
                if audited:
                    self._audit(principal, method, first, outcome)
            if rule.answer is not None and principal is not None:  # set when no error
                response = rule.answer(principal, request, response)
            return response

        return guarded

    def _authenticate(self, context: CallContext) -> Principal:
        if self.authenticator is None:
            return ANONYMOUS
        return self.authenticator.authenticate(context.invocation_metadata())

    def _authorize(self, principal: Principal, rule: MethodRule, request: Any) -> None:
        if not principal.may(rule.capability):
            raise PermissionDenied(
                f"principal {principal.name!r} (role {principal.role}) may not do this:"
                f" it needs the {rule.capability} capability"
            )
        if rule.tenants is not None:
            for tenant in rule.tenants(request):
                if not principal.reaches(tenant):
                    raise PermissionDenied(
                        f"principal {principal.name!r} may not act on tenant {tenant!r}"
                    )

    def _audit(self, principal: Principal | None, method: str, request: Any, outcome: str) -> None:
        assert self.audit is not None
        line = {
            "at": round(time.time(), 3),
            "principal": None if principal is None else principal.name,
            "method": method,
            "target": _target(request) if request is not None else "",
            "outcome": outcome,
        }
        self.audit.info(json.dumps(line, sort_keys=True))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, *, authenticated: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without ``--auth`` unless ``--insecure`` says so.

    Raises ``InvalidArgument`` naming the address and both ways out.
    """
    if not authenticated and not insecure and not is_loopback(host):
        raise InvalidArgument(
            f"refusing to serve {host} without --auth: anyone who reaches it could read, push"
            " and delete every tenant's adapters; pass --auth FILE, or --insecure to accept that"
        )


def open_audit_log(destination: str) -> logging.Logger:
    """The audit logger writing one line per write-side call to ``destination`` (a file, or
    ``-`` for stderr). Raises ``InvalidArgument`` when the file cannot be opened."""
    audit = logging.getLogger(AUDIT_LOGGER)
    try:
        handler: logging.Handler = (
            logging.StreamHandler() if destination == "-" else logging.FileHandler(destination)
        )
    except OSError as exc:
        raise InvalidArgument(f"audit log {destination}: cannot open it: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False  # audit lines go to their own file only
    return audit
