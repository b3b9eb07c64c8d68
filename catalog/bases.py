"""What makes two base-model ids the same base.

A pack records the base it was trained for as a string (``base_model_name_or_path``): a hub id
(``Qwen/Qwen2.5-0.5B``) or, for a model loaded from disk, a local path, which the same folder
can spell many ways (``./base``, ``base/``, ``/x/../base``, a symlink). Engines compare bases
through :func:`base_identity`, so that only a real difference refuses an adapter.
"""

from __future__ import annotations

from pathlib import Path


def base_identity(text: str | None) -> str:
    """A base id for comparison: an existing local path becomes its resolved absolute path;
    anything else (a hub id) is compared as written, less surrounding whitespace; None or
    empty gives ``""`` (no base declared)."""
    text = (text or "").strip()
    if not text:
        return ""
    path = Path(text).expanduser()
    try:
        if path.exists():
            return str(path.resolve())
    except OSError:  # a hub id too long or odd for the filesystem to look up
        pass
    return text


def same_base(a: str | None, b: str | None) -> bool:
    """Whether ``a`` and ``b`` name one base (either empty: nothing to compare, so yes)."""
    left, right = base_identity(a), base_identity(b)
    return not left or not right or left == right
