"""SIGKILL a reindex inside its directory swap: the next open finds the index it had.

``Catalog.reindex`` (``catalog.maintenance``) builds ``index.reindex`` beside the index, then
renames ``index`` to ``index.old`` and ``index.reindex`` to ``index``. A crash between the two
renames leaves no ``index`` at all: the next open must put ``index.old`` back rather than start
an empty index (which the service would then rebuild from the whole log, a slow start on a large
store). A crash before the first rename leaves a finished ``index.reindex`` that the open drops;
one after both leaves ``index.old`` beside the new index, which the open removes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from catalog.core import Catalog
from catalog.index.lmdb_index import LmdbIndex
from catalog.model import AdapterName
from catalog.pack.synthetic import random_pack
from catalog.storage import open_store

# Runs a reindex in a child process and SIGKILLs it just before the rename whose source or
# destination has the name given (os.replace is wrapped for the whole child: it dies anyway).
_REINDEX_THEN_DIE = """
import os, shutil, signal, sys
from pathlib import Path
from catalog.core import Catalog
from catalog.index.lmdb_index import LmdbIndex
from catalog.storage import open_store

root, die_at = Path(sys.argv[1]), sys.argv[2]
real_replace = os.replace

def replace_or_die(src, dst):
    if die_at in (Path(src).name, Path(dst).name):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

real_rmtree = shutil.rmtree

def rmtree_or_die(path, *args, **kwargs):
    # "after": die when the swap, both renames done, comes to drop the old index
    if die_at == "after" and Path(path).name == "index.old" and Path(path).exists():
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kwargs)

os.replace = replace_or_die
shutil.rmtree = rmtree_or_die
catalog = Catalog(open_store((root / "store").as_uri()), root / "index", LmdbIndex,
                  prefetch_workers=1)
catalog.reindex()
"""


def open_catalog(root: Path) -> Catalog:
    return Catalog(
        open_store((root / "store").as_uri()), root / "index", LmdbIndex, prefetch_workers=1
    )


def fill(root: Path) -> dict[str, str]:
    """Three revisions over two adapters, one aliased; returns ``{ref: digest}``."""
    catalog = open_catalog(root)
    try:
        for seed, (name, aliases) in enumerate(
            [("acme/chat", ["serving"]), ("acme/chat", []), ("beta/code", [])]
        ):
            pack = random_pack([("q_proj", 16, 16)], num_layers=1, rank=2, base_id="b", seed=seed)
            catalog.push_bytes(AdapterName.parse(name), pack, aliases=aliases)
        refs = ["acme/chat@1", "acme/chat@2", "acme/chat@serving", "beta/code@1"]
        return {ref: str(catalog.resolve(ref).digest) for ref in refs}
    finally:
        catalog.close()


@pytest.mark.parametrize(
    ("die_at", "left_behind"),
    [
        ("index.reindex", {"index.old", "index.reindex"}),
        ("index.old", {"index", "index.reindex"}),
        ("after", {"index", "index.old"}),
    ],
    ids=["between-the-renames", "before-the-renames", "after-the-renames"],
)
def test_a_reindex_killed_inside_its_swap_leaves_the_index_it_had(
    tmp_path: Path, die_at: str, left_behind: set[str]
) -> None:
    resolved = fill(tmp_path)
    child = subprocess.run(
        [sys.executable, "-c", _REINDEX_THEN_DIE, str(tmp_path), die_at],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert {p.name for p in tmp_path.glob("index*")} == left_behind

    catalog = open_catalog(tmp_path)
    try:
        assert {p.name for p in tmp_path.glob("index*")} == {"index"}
        # The index it had, not an empty one (nothing has replayed the log into it).
        assert not catalog.index_is_empty()
        assert {ref: str(catalog.resolve(ref).digest) for ref in resolved} == resolved
        adapters, revisions, _, _ = catalog.reindex()
        assert (adapters, revisions) == (2, 3)
        assert {ref: str(catalog.resolve(ref).digest) for ref in resolved} == resolved
    finally:
        catalog.close()
