"""A whole pack fetched as byte ranges on concurrent ``FetchPack`` streams into one buffer.

The sync client runs the ranges on a thread pool and the asyncio client as tasks; which ranges
there are, the buffer they fill, the progress they report and the final digest check are the
same for both and live here.
"""

from __future__ import annotations

from catalog.client.requests import ProgressCallback, pinned_ref
from catalog.client.transfer import PackReceiver
from catalog.digest import Digest
from catalog.errors import DataLoss
from catalog.hostmem import new_buffer
from catalog.model import Revision

#: Ranges of a parallel fetch are at least this large; smaller packs use one stream.
MIN_PARALLEL_RANGE = 4 << 20


class ParallelFetch:
    """The ranges of one parallel fetch of ``revision``'s pack, ``span`` bytes each (the last
    may be shorter).

    Fetch each of :meth:`receivers` on a stream of its own, call :meth:`landed` as each one
    completes (one call at a time), then :meth:`result`. The ranges name the revision by its
    digest, so an alias that moves mid-fetch cannot mix two revisions.
    """

    def __init__(self, revision: Revision, span: int, *, verify: bool) -> None:
        self.revision = revision
        self.ref = pinned_ref(revision)
        self.span = span
        self.verify = verify
        self.buffer = memoryview(new_buffer(revision.size_bytes))
        #: Bytes placed by the ranges that have landed.
        self.received = 0

    def receivers(self) -> list[PackReceiver]:
        """One receiver per range, each writing straight into its slice of :attr:`buffer`
        (not checked one by one: :meth:`result` checks the whole pack)."""
        size = self.revision.size_bytes
        return [
            PackReceiver(
                self.ref,
                start,
                self.span,
                verify=False,
                into=self.buffer[start : min(size, start + self.span)],
            )
            for start in range(0, size, self.span)
        ]

    def landed(self, receiver: PackReceiver, progress: ProgressCallback | None) -> None:
        """Count a completed range's bytes and report the fetch's progress."""
        self.received += receiver.received
        if progress:
            progress(self.received, self.revision.size_bytes)

    def result(self) -> tuple[Revision, memoryview]:
        """The revision and a read-only view of the whole pack, checked against its digest when
        ``verify`` (a pass over the pack: the asyncio client runs it on a worker thread).

        Raises:
            DataLoss: the bytes do not hash to the revision's digest.
        """
        if self.verify:
            expected = self.revision.digest
            actual = Digest.of(self.buffer, expected.algorithm)
            if actual != expected:
                raise DataLoss(f"fetch of {self.ref}: bytes hash to {actual}, expected {expected}")
        return self.revision, self.buffer.toreadonly()


def parallel_fetch(revision: Revision, parallel: int, *, verify: bool) -> ParallelFetch | None:
    """``revision``'s pack split into ``parallel`` ranges of at least
    :data:`MIN_PARALLEL_RANGE` bytes; ``None`` when that leaves one range (fetch it on one
    stream)."""
    size = revision.size_bytes
    span = max(MIN_PARALLEL_RANGE, -(-size // parallel))
    if span >= size:
        return None
    return ParallelFetch(revision, span, verify=verify)
