"""A laid-out pack cut at file offsets that are multiples of a window, for ``os.pwritev``.

A :class:`PackPlan`'s bytes lie in its parts: the header (4,232 bytes for a dense
seven-module adapter), then one part per layer and matrix (4 KiB to 155 KiB for the 0.5B
shapes at rank 16), so every part after the header starts at an offset no page boundary lines
up with, and a file written part by part takes a partial page at both ends of nearly every
``pwrite``. :func:`aligned_windows` regroups the same bytes into windows that
start at multiples of ``window`` bytes (64 KiB by default) and are exactly that long except the
last: one ``os.pwritev`` per window, whole pages every time. Parts stored as they are stay
views (no copy); ``lora_B``'s transposed parts are transposed straight into the caller's scratch,
only the bytes each window needs, so no window holds more than ``window`` bytes of scratch.
"""

from __future__ import annotations

from collections.abc import Iterator

from catalog.pack.format import PackPlan, SwappedMatrices

__all__ = ["DEFAULT_WINDOW", "aligned_windows"]

#: Bytes per window: 16 pages, the piece size a pack is written in (see catalog.client).
DEFAULT_WINDOW = 64 * 1024


def aligned_windows(
    plan: PackPlan, scratch: memoryview, window: int = DEFAULT_WINDOW
) -> Iterator[tuple[int, list[memoryview]]]:
    """``(file offset, buffers)`` covering ``plan``'s bytes in order, for
    ``os.pwritev(fd, buffers, offset)``: each offset a multiple of ``window``, each window's
    buffers ``window`` bytes in all (the last window: what is left). A buffer is a view of a
    part stored as it is, or of ``scratch`` holding transposed bytes; views of ``scratch`` are
    valid until the next window is asked for.

    Raises:
        ValueError: ``window`` is not positive, or ``scratch`` (writable) is smaller than
            ``window`` bytes.
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    scratch = scratch.cast("B") if scratch.format != "B" or scratch.ndim != 1 else scratch
    if scratch.nbytes < window:
        raise ValueError(f"a scratch of {scratch.nbytes} bytes cannot hold a {window}-byte window")
    parts: list[memoryview | SwappedMatrices] = [memoryview(plan.header)]
    for part in plan.parts:
        parts.append(part if isinstance(part, SwappedMatrices) else memoryview(part).cast("B"))
    index, within = 0, 0  # the part the next byte comes from, and where in it
    for start in range(0, plan.nbytes, window):
        buffers: list[memoryview] = []
        used = 0  # scratch bytes this window holds
        last_in_scratch = -1  # where the last buffer starts in scratch, if it is there
        wanted = min(window, plan.nbytes - start)
        while wanted:
            part = parts[index]
            take = min(part.nbytes - within, wanted)
            if not take:  # an empty part
                pass
            elif isinstance(part, SwappedMatrices):
                part.write_range(scratch[used : used + take], within, within + take)
                if last_in_scratch >= 0:  # right after the last buffer in scratch: one buffer
                    buffers[-1] = scratch[last_in_scratch : used + take]
                else:
                    last_in_scratch = used
                    buffers.append(scratch[used : used + take])
                used += take
            else:
                buffers.append(part[within : within + take])
                last_in_scratch = -1
            within += take
            wanted -= take
            if within == part.nbytes:
                index, within = index + 1, 0
        yield start, buffers
