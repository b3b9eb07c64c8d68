"""``catalog.atomic_files``: a target holds its old contents or the whole new ones, never a part;
no temporary file outlives a write; modes and fsyncs are what the caller asked for."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog import atomic_files
from catalog.atomic_files import fsync_directory, open_atomically, write_atomically
from catalog.pack.atomic_write import write_atomically as write_adapter_file


@pytest.fixture
def umask_027() -> Iterator[None]:
    """A umask other than the usual 022, so that a mode which ignores it shows."""
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each ``os.fsync`` call synced, in order: "file" or "dir"."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def _leftovers(directory: Path, target: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p != target)


def test_writes_bytes_text_and_chunks_over_old_contents(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomically(target, b"old", fsync=False)
    write_atomically(target, "new é\n", fsync=False)
    assert target.read_bytes() == "new é\n".encode()
    write_atomically(target, [b"a", memoryview(b"bc"), bytearray(b"d")], fsync=False)
    assert target.read_bytes() == b"abcd"
    write_atomically(target, memoryview(b"xyz")[1:], fsync=False)
    assert target.read_bytes() == b"yz"
    assert _leftovers(tmp_path, target) == []


def test_readers_see_the_old_contents_until_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with open_atomically(target, fsync=False) as handle:
        handle.write(b"new contents")
        handle.flush()
        assert target.read_bytes() == b"old"
        (temporary,) = _leftovers(tmp_path, target)
        assert temporary.startswith(".f.") and temporary.endswith(".tmp")  # beside the target
    assert target.read_bytes() == b"new contents"
    assert _leftovers(tmp_path, target) == []


def test_a_failure_mid_write_leaves_the_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk gone"), open_atomically(target, fsync=True) as h:
        h.write(b"half of the new")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, target) == []
    # A chunk that cannot be written, after one that was.
    with pytest.raises(TypeError):
        write_atomically(target, [b"first", "not bytes"], fsync=True)  # type: ignore[list-item]
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, target) == []


def test_a_failure_mid_write_of_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError), open_atomically(tmp_path / "new", fsync=False, text=True) as h:
        h.write("part")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_fsync_or_rename_leaves_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(5, f"{failing} failed")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match=f"{failing} failed"):
        write_atomically(target, b"new", fsync=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, target) == []


def test_default_mode_is_what_open_gives_and_an_explicit_mode_wins(
    tmp_path: Path, umask_027: None
) -> None:
    write_atomically(tmp_path / "plain", b"x", fsync=False)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640  # 0o666 less umask 027
    write_atomically(tmp_path / "shared", b"x", fsync=False, mode=0o644)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644
    (tmp_path / "private").write_bytes(b"old")
    os.chmod(tmp_path / "private", 0o600)
    write_atomically(tmp_path / "private", b"new", fsync=False)  # the mode is the new file's
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o640


def test_the_pack_packages_write_keeps_its_adapter_mode_and_fsync(
    tmp_path: Path, umask_027: None, fsyncs: list[str]
) -> None:
    write_adapter_file(tmp_path / "adapter_model.safetensors", b"x")
    assert stat.S_IMODE((tmp_path / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert fsyncs == ["file"]
    write_adapter_file(tmp_path / "adapter_config.json", b"{}", fsync=False)
    assert fsyncs == ["file"]


@pytest.mark.parametrize(
    ("fsync", "fsync_dir", "expected"),
    [
        (False, False, []),
        (True, False, ["file"]),
        (True, True, ["file", "dir"]),
    ],
)
def test_fsyncs_are_the_ones_asked_for(
    tmp_path: Path, fsyncs: list[str], fsync: bool, fsync_dir: bool, expected: list[str]
) -> None:
    write_atomically(tmp_path / "f", b"data", fsync=fsync, fsync_dir=fsync_dir)
    assert fsyncs == expected


def test_the_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    seen: list[bytes | None] = []

    def recording(directory: str | os.PathLike[str]) -> None:
        assert Path(directory) == tmp_path
        seen.append(target.read_bytes() if target.exists() else None)

    monkeypatch.setattr(atomic_files, "fsync_directory", recording)
    write_atomically(target, b"new", fsync=True, fsync_dir=True)
    assert seen == [b"new"]


def test_fsync_directory_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    fsync_directory(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_directory(tmp_path / "f")
