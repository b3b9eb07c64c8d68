from __future__ import annotations

import json

from catalog import shutdown
from catalog.shutdown import ShutdownMarker


def test_clean_close_needs_no_rebuild(tmp_path):
    marker = ShutdownMarker(tmp_path / "state")
    assert marker.open() is False
    marker.close()
    assert ShutdownMarker(tmp_path / "state").open() is False


def test_unclean_stop_in_the_same_boot_needs_no_rebuild(tmp_path):
    ShutdownMarker(tmp_path / "state").open()  # never closed: a SIGKILL
    assert ShutdownMarker(tmp_path / "state").open() is False


def test_the_in_use_marker_is_durable_before_the_index_is_used(tmp_path, monkeypatch):
    """open() fsyncs the marker and then its directory: a power cut must not bring back the
    last close's "clean" marker after writes the index never fsyncs."""
    import os
    import stat

    ShutdownMarker(tmp_path / "state").close()
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ShutdownMarker(tmp_path / "state").open()
    assert synced == ["file", "dir"]


def test_unclean_stop_before_a_reboot_needs_a_rebuild(tmp_path, monkeypatch):
    ShutdownMarker(tmp_path / "state").open()
    monkeypatch.setattr(shutdown, "current_boot_id", lambda: "another-boot")
    assert ShutdownMarker(tmp_path / "state").open() is True


def test_unreadable_marker_needs_a_rebuild(tmp_path):
    (tmp_path / "state").write_text("{not json")
    assert ShutdownMarker(tmp_path / "state").open() is True
    assert json.loads((tmp_path / "state").read_text())["clean"] is False


def test_reboot_after_unclean_stop_rebuilds_a_stale_index(tmp_path, packs):
    import shutil

    from tests.servers import running_catalog

    root = tmp_path / "root"
    with running_catalog(root) as served, served.client() as client:
        client.push("acme/m", packs["qv-r4"])
    shutil.copytree(root / "index", tmp_path / "index-after-first-push")
    with running_catalog(root) as served, served.client() as client:
        client.push("acme/m", packs["all-r8"])
    # A machine crash that lost the index's unsynced last write: the index is the older copy,
    # and the marker says it was in use during another boot.
    shutil.rmtree(root / "index")
    shutil.copytree(tmp_path / "index-after-first-push", root / "index")
    (root / "index.state").write_text(json.dumps({"boot_id": "old", "clean": False}))
    with running_catalog(root) as served, served.client() as client:
        assert client.resolve("acme/m").number == 2
