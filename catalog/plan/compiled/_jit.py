"""The one decorator the compiled replays use: numba's ``njit`` with an on-disk cache.

``cache=True`` keeps the machine code beside the sources (``__pycache__``), or under
``NUMBA_CACHE_DIR`` / the user's cache directory when the package directory is read-only, so
only the first run on a machine pays the compile. ``nogil=True`` lets replays run in threads
side by side. The decorator is typed so that mypy still checks the kernels as Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., object])


def jit(function: F) -> F:
    """``function`` compiled to machine code on first call (and cached on disk)."""
    return cast(F, numba.njit(cache=True, nogil=True)(function))
