"""Faults of the durable tier under load: a real SeaweedFS paused (SIGSTOP, SIGCONT) and killed
(SIGKILL, restart on the same port and data) while clients push and fetch through real gRPC.

What is checked, per operation and at the end:

* every call ends within its deadline (plus a small slack for scheduling) with OK,
  UNAVAILABLE or DEADLINE_EXCEEDED, and nothing else;
* every acknowledged push is still there, bit for bit, after the faults (``lost``);
* every revision that is visible fetches and verifies against its digest, including those of
  pushes whose client was told DEADLINE_EXCEEDED or UNAVAILABLE (``half_written``: must be 0);
* the catalog recovers by itself: after SIGCONT and after the restart a push and a fetch
  succeed again without restarting the catalog (the seconds it took are reported);
* the catalog's ``verify`` finds no problem, and a fresh index rebuilt from the store holds the
  same revisions.

Used by ``tests/security/test_s3_faults.py`` (slow) and ``bench/bench_s3_faults.py`` (figures
in ``docs/RELIABILITY.md``). The catalog runs without an NVMe cache, so every fetch reads S3.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.client import CatalogClient
from catalog.core import Catalog
from catalog.errors import CatalogError
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import every_item
from catalog.pack.synthetic import random_pack
from catalog.service.server import create_server
from catalog.storage import open_store
from catalog.testing.seaweedfs import SeaweedFS

BUCKET = "loracat-faults"
BASE_ID = "fault-base"
#: Calls slower than their deadline by more than this are counted as late.
SLACK_S = 1.0


@dataclass
class FaultPlan:
    """The timeline, in seconds from the start of the load."""

    pause_at: float = 4.0
    pause_s: float = 6.0  # longer than the client deadline: some calls must time out
    crash_at: float = 16.0
    down_s: float = 4.0
    total_s: float = 32.0
    pushers: int = 3
    fetchers: int = 3
    deadline_s: float = 5.0


@dataclass
class Outcome:
    kind: str  # push | fetch
    started: float
    elapsed: float
    code: str  # OK or the gRPC status name


@dataclass
class FaultReport:
    plan: FaultPlan
    outcomes: list[Outcome] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    lost: int = 0
    half_written: int = 0
    visible_unacknowledged: int = 0
    verify_problems: list[str] = field(default_factory=list)
    rebuilt_matches: bool = False

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, Counter[str]] = {"push": Counter(), "fetch": Counter()}
        for o in self.outcomes:
            table[o.kind][o.code] += 1
        return {kind: dict(counter) for kind, counter in table.items()}

    def late(self) -> int:
        return sum(1 for o in self.outcomes if o.elapsed > self.plan.deadline_s + SLACK_S)

    def recovery_s(self, event: str, kind: str) -> float | None:
        """Seconds from ``event`` (a key of ``events``) to the first OK ``kind`` started after."""
        at = self.events.get(event)
        if at is None:
            return None
        oks = [o.started + o.elapsed for o in self.outcomes if o.kind == kind and o.code == "OK"]
        after = [t for t in oks if t >= at]
        return round(min(after) - at, 2) if after else None

    def to_json(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "plan": vars(self.plan),
            "operations": {k: sum(v.values()) for k, v in counts.items()},
            "outcomes": counts,
            "failed_cleanly": sum(
                1 for o in self.outcomes if o.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            ),
            "other_errors": sum(
                1 for o in self.outcomes if o.code not in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED")
            ),
            "late": self.late(),
            "max_failed_call_s": round(
                max((o.elapsed for o in self.outcomes if o.code != "OK"), default=0.0), 2
            ),
            "lost": self.lost,
            "half_written": self.half_written,
            "visible_unacknowledged": self.visible_unacknowledged,
            "verify_problems": self.verify_problems,
            "rebuilt_index_matches": self.rebuilt_matches,
            "recovery_s": {
                f"{kind}_after_{event}": self.recovery_s(event, kind)
                for event in ("sigcont", "restarted")
                for kind in ("push", "fetch")
            },
        }


def _pack(seed: int) -> bytes:
    return random_pack(
        [("self_attn.q_proj", 256, 256), ("self_attn.v_proj", 256, 256)],
        num_layers=2,
        rank=8,
        base_id=BASE_ID,
        seed=seed,
    )


def open_s3_catalog(root: Path, seaweed: SeaweedFS, prefix: str) -> Catalog:
    """A catalog over ``s3://BUCKET/prefix`` whose S3 calls give up quickly (2 s to connect,
    4 s to read, 2 attempts, 12 s per operation), without an NVMe cache."""
    store = open_store(
        f"s3://{BUCKET}/{prefix}",
        **seaweed.store_options(),
        connect_timeout=2.0,
        read_timeout=4.0,
        max_attempts=2,
        deadline=12.0,
    )
    catalog = Catalog(
        store, root / "index", lambda path: LmdbIndex(path, sync=False), spool_dir=root / "spool"
    )
    catalog.recover()
    return catalog


def run_faults(work: Path, plan: FaultPlan | None = None) -> FaultReport:
    """Run the scenario in ``work`` (SeaweedFS data, catalog root); returns its report."""
    plan = plan or FaultPlan()
    report = FaultReport(plan)
    seaweed = SeaweedFS(data_dir=work / "seaweedfs")
    seaweed.start()
    try:
        seaweed.create_bucket(BUCKET)
        prefix = f"faults-{uuid.uuid4().hex[:8]}"
        catalog = open_s3_catalog(work / "catalog", seaweed, prefix)
        server, port = create_server(catalog, "127.0.0.1:0")
        address = f"127.0.0.1:{port}"
        try:
            acked = _load(address, seaweed, plan, report)
            _settle(catalog)
            _check(address, acked, report)
            report.verify_problems = list(catalog.verify()[2])
            rebuilt = open_s3_catalog(work / "rebuilt", seaweed, prefix)
            try:
                rebuilt.reindex()
                report.rebuilt_matches = _revisions(rebuilt) == _revisions(catalog)
            finally:
                rebuilt.close()
        finally:
            server.stop(grace=None).wait()
            catalog.close()
    finally:
        if not seaweed.running and seaweed.port:
            seaweed.restart()  # so stop() can clean up
        seaweed.stop(timeout=3)
    return report


def _revisions(catalog: Catalog) -> set[tuple[str, int, str]]:
    found = set()
    for summary in every_item(lambda token: catalog.list_adapters("", 1000, token)):
        revisions = every_item(
            lambda token, a=summary.adapter: catalog.list_revisions(a, 1000, token)  # type: ignore[misc]
        )
        for revision in revisions:
            found.add((str(revision.adapter), revision.number, str(revision.digest)))
    return found


def _load(
    address: str, seaweed: SeaweedFS, plan: FaultPlan, report: FaultReport
) -> dict[str, tuple[int, bytes]]:
    acked: dict[str, tuple[int, bytes]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    start = time.monotonic()
    counter = iter(range(1 << 30))

    def record(kind: str, began: float, code: str) -> None:
        with lock:
            report.outcomes.append(Outcome(kind, began - start, time.monotonic() - began, code))

    with CatalogClient(address, timeout=plan.deadline_s) as seed_client:
        seed_client.push("faults/seed", _pack(0))
        acked["faults/seed"] = (1, _pack(0))

    def pusher() -> None:
        with CatalogClient(address, timeout=plan.deadline_s) as client:
            while not stop.is_set():
                with lock:
                    i = next(counter) + 1
                name, data = f"faults/p-{i}", _pack(i)
                began = time.monotonic()
                try:
                    result = client.push(name, data, timeout=plan.deadline_s)
                except CatalogError as exc:
                    record("push", began, exc.grpc_code)
                    continue
                record("push", began, "OK")
                with lock:
                    acked[name] = (result.revision.number, data)

    def fetcher() -> None:
        with CatalogClient(address, timeout=plan.deadline_s) as client:
            while not stop.is_set():
                with lock:
                    names = list(acked)
                name = names[int(time.monotonic() * 1000) % len(names)]
                began = time.monotonic()
                try:
                    client.fetch(name, timeout=plan.deadline_s)
                except CatalogError as exc:
                    record("fetch", began, exc.grpc_code)
                    continue
                record("fetch", began, "OK")

    threads = [threading.Thread(target=pusher) for _ in range(plan.pushers)]
    threads += [threading.Thread(target=fetcher) for _ in range(plan.fetchers)]
    for t in threads:
        t.start()

    def at(seconds: float) -> None:
        time.sleep(max(0.0, start + seconds - time.monotonic()))

    at(plan.pause_at)
    seaweed.pause()
    report.events["sigstop"] = time.monotonic() - start
    at(plan.pause_at + plan.pause_s)
    seaweed.resume()
    report.events["sigcont"] = time.monotonic() - start
    at(plan.crash_at)
    seaweed.crash()
    report.events["sigkill"] = time.monotonic() - start
    at(plan.crash_at + plan.down_s)
    seaweed.restart()
    report.events["restarted"] = time.monotonic() - start
    at(plan.total_s)
    stop.set()
    for t in threads:
        t.join()
    return acked


def _settle(catalog: Catalog, timeout: float = 30.0) -> None:
    """Wait for the server's calls that outlived their clients (a store call runs to its own
    timeout) to finish, so the checks see the final state: no push left in the spool, no log
    write of unknown outcome left to settle (``catalog.intents``)."""
    deadline = time.monotonic() + timeout
    while (catalog.spool.held_bytes or catalog.intent_settler.pending()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)


def _check(address: str, acked: dict[str, tuple[int, bytes]], report: FaultReport) -> None:
    with CatalogClient(address, timeout=30) as client:
        for name, (number, data) in acked.items():
            try:
                if client.fetch(f"{name}@{number}") != data:
                    report.lost += 1
            except CatalogError:
                report.lost += 1
        for summary in client.iter_adapters():
            for revision in client.iter_revisions(summary.adapter):
                name = str(revision.adapter)
                if name not in acked:
                    report.visible_unacknowledged += 1
                try:
                    client.fetch(f"{name}@{revision.number}")  # verified against the digest
                except CatalogError:
                    report.half_written += 1
