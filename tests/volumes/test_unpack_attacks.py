"""The host's side of bringing a volume back from a guest: the tar a (hostile) guest streams is
taken apart into the volume's tree with no-follow operations only (`unpack_volume`). Each test
crafts the archive a guest could send and checks that nothing outside the volume was read or
written, and what the volume holds. Root: the unpacking gives entries the guest's owners."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from appliance.cubelet.volume_unpack import DATA_DIR, INCOMING_DIR, OLD_DIR, unpack_volume

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking gives entries their owners: root"),
]

CAP = 1 << 20


def _archive(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _entry(name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", **fields: object) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, content if kind == tarfile.REGTYPE else None


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    directory = tmp_path / "vol"
    (directory / DATA_DIR).mkdir(parents=True)
    (directory / DATA_DIR / "before.txt").write_text("from before the mount")
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_text("host secret")
    return directory


def _files_outside(outside: Path) -> list[str]:
    return sorted(p.name for p in outside.iterdir())


def test_links_out_of_the_volume_are_kept_as_links_and_never_followed(
    volume: Path, outside: Path, tmp_path: Path
) -> None:
    archive = _archive(
        tmp_path / "a.tar",
        _entry("./", tarfile.DIRTYPE, mode=0o755),
        _entry("./shadow", tarfile.SYMTYPE, linkname="/etc/shadow"),
        _entry("./up", tarfile.SYMTYPE, linkname=str(outside)),
        _entry("./up/planted", content=b"written through a link"),  # into `outside`? never
        _entry("./dots", tarfile.SYMTYPE, linkname="../../../../../.."),
        _entry("./dots/" + str(outside).lstrip("/") + "/planted2", content=b"x"),
        _entry("./up/secret", content=b"overwrite the host's file"),
    )
    skipped = unpack_volume(archive, volume, CAP)
    data = volume / DATA_DIR
    assert os.readlink(data / "shadow") == "/etc/shadow"
    assert os.readlink(data / "up") == str(outside)
    assert _files_outside(outside) == ["secret"] and (outside / "secret").read_text() == "host secret"
    # What was written "through" a link landed inside the volume (the link resolved in its root).
    written = [p for p in data.rglob("*") if p.is_file() and not p.is_symlink()]
    assert all(str(p).startswith(str(data)) for p in written)
    assert not (data / "before.txt").exists()  # the volume is what the guest had: it was replaced
    assert not (volume / INCOMING_DIR).exists() and not (volume / OLD_DIR).exists()
    assert skipped == []


def test_names_leaving_the_tree_hardlinks_out_and_devices_are_left_out(
    volume: Path, outside: Path, tmp_path: Path
) -> None:
    archive = _archive(
        tmp_path / "b.tar",
        _entry("../escaped", content=b"x"),
        _entry("/abs-escaped", content=b"abs"),  # an absolute name is taken inside the tree
        _entry("./a/../../escaped2", content=b"x"),
        _entry("./hard", tarfile.LNKTYPE, linkname=str(outside / "secret")),
        _entry("./hard2", tarfile.LNKTYPE, linkname="../outside/secret"),
        _entry("./disk", tarfile.BLKTYPE, devmajor=8, devminor=0),
        _entry("./fifo", tarfile.FIFOTYPE),
        _entry("./suid", content=b"#!/bin/sh\n", mode=0o4755, uid=0),
        _entry("./owned", content=b"mine", uid=1000, gid=1000, mode=0o600),
    )
    skipped = unpack_volume(archive, volume, CAP)
    data = volume / DATA_DIR
    assert set(skipped) == {"../escaped", "./a/../../escaped2", "./hard", "./hard2", "./disk", "./fifo"}
    assert not (tmp_path / "escaped").exists() and not (volume / "escaped").exists()
    assert (data / "abs-escaped").read_bytes() == b"abs"
    assert (outside / "secret").stat().st_nlink == 1  # no link to a host file was made
    assert sorted(p.name for p in data.iterdir()) == ["abs-escaped", "owned", "suid"]
    assert stat.S_IMODE((data / "suid").stat().st_mode) == 0o755  # no setuid bit on the host
    info = (data / "owned").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1000, 1000, 0o600)


def test_files_past_the_cap_are_left_out(volume: Path, tmp_path: Path) -> None:
    archive = _archive(
        tmp_path / "c.tar",
        _entry("./a.bin", content=b"a" * (CAP // 2)),
        _entry("./big.bin", content=b"b" * CAP),
        _entry("./c.bin", content=b"c" * (CAP // 4)),
    )
    assert unpack_volume(archive, volume, CAP) == ["./big.bin"]
    data = volume / DATA_DIR
    assert sorted(p.name for p in data.iterdir()) == ["a.bin", "c.bin"]


def test_a_broken_archive_leaves_the_volume_as_it_was(volume: Path, tmp_path: Path) -> None:
    good = _archive(tmp_path / "d.tar", _entry("./new.txt", content=b"n" * 5000))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good.read_bytes()[:1500])  # cut inside the file's data
    with pytest.raises((tarfile.TarError, OSError)):
        unpack_volume(broken, volume, CAP)
    data = volume / DATA_DIR
    assert sorted(p.name for p in data.iterdir()) == ["before.txt"]
    assert not (volume / INCOMING_DIR).exists()


def test_more_entries_than_the_image_could_hold_are_left_out(volume: Path, tmp_path: Path) -> None:
    limit = CAP // 4096 + 1024  # inodes a capped image can have at most, and then some
    archive = _archive(tmp_path / "e.tar", *(_entry(f"./f{i}") for i in range(limit + 50)))
    skipped = unpack_volume(archive, volume, CAP)
    assert len(skipped) == 50 and len(list((volume / DATA_DIR).iterdir())) == limit
