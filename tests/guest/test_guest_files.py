"""files.* through the unmodified Python SDK: /files and filesystem.Filesystem RPCs."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from e2b import FileNotFoundException, FileType, NotFoundException


def test_write_read_text_and_bytes(sandbox, agent) -> None:
    path = str(agent.scratch / "hello.txt")
    info = sandbox.files.write(path, "Hello, Cube!")
    assert (info.name, info.path, info.type) == ("hello.txt", path, FileType.FILE)
    assert sandbox.files.read(path) == "Hello, Cube!"
    sandbox.files.write(path, b"\x00\xffbinary")
    assert bytes(sandbox.files.read(path, format="bytes")) == b"\x00\xffbinary"


def test_write_creates_parents_and_relative_paths_use_home(sandbox, agent) -> None:
    sandbox.files.write("rel/dir/file.txt", "relative")
    assert (agent.home / "rel/dir/file.txt").read_text() == "relative"
    assert sandbox.files.read("rel/dir/file.txt") == "relative"


def test_octet_stream_and_gzip_upload_and_download(sandbox, agent) -> None:
    path = str(agent.scratch / "big.bin")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    sandbox.files.write(path, payload, use_octet_stream=True)
    assert (agent.scratch / "big.bin").read_bytes() == payload
    sandbox.files.write(path, b"compressible " * 1000, gzip=True)
    assert bytes(sandbox.files.read(path, format="bytes", gzip=True)) == b"compressible " * 1000
    raw = httpx.get(f"{agent.envd_url}/files", params={"path": path}, headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"


def test_streamed_upload_from_a_file_object(sandbox, agent) -> None:
    source = agent.scratch / "source.bin"
    source.write_bytes(b"x" * 200_000)
    with source.open("rb") as f:
        sandbox.files.write(str(agent.scratch / "copy.bin"), f)
    assert (agent.scratch / "copy.bin").read_bytes() == b"x" * 200_000


def test_write_files_multipart_multi_file(sandbox, agent) -> None:
    entries = [
        {"path": str(agent.scratch / "multi/a.txt"), "data": "A"},
        {"path": str(agent.scratch / "multi/b.bin"), "data": b"B" * 70_000},
    ]
    written = sandbox.files.write_files(entries)
    assert sorted(w.name for w in written) == ["a.txt", "b.bin"]
    assert (agent.scratch / "multi/a.txt").read_text() == "A"
    assert (agent.scratch / "multi/b.bin").read_bytes() == b"B" * 70_000


def test_metadata_round_trip(sandbox, agent) -> None:
    path = str(agent.scratch / "meta.txt")
    try:
        sandbox.files.write(path, "m", metadata={"origin": "test"})
    except Exception as exc:  # xattrs unsupported on this filesystem (e.g. some tmpfs)
        pytest.skip(f"user xattrs not supported here: {exc}")
    assert sandbox.files.get_info(path).metadata == {"origin": "test"}


def test_list_with_depth_and_types(sandbox, agent) -> None:
    root = agent.scratch / "tree"
    (root / "sub/deeper").mkdir(parents=True)
    (root / "top.txt").write_text("t")
    (root / "sub/inner.txt").write_text("i")
    (root / "link").symlink_to(root / "top.txt")
    shallow = {e.name: e.type for e in sandbox.files.list(str(root))}
    assert shallow == {"link": FileType.SYMLINK, "sub": FileType.DIR, "top.txt": FileType.FILE}
    deep = {e.path for e in sandbox.files.list(str(root), depth=3)}
    assert str(root / "sub/deeper") in deep and str(root / "sub/inner.txt") in deep


def test_exists_get_info_make_dir(sandbox, agent) -> None:
    directory = str(agent.scratch / "made/nested")
    assert sandbox.files.exists(directory) is False
    assert sandbox.files.make_dir(directory) is True
    assert sandbox.files.make_dir(directory) is False
    info = sandbox.files.get_info(directory)
    assert info.type == FileType.DIR and info.permissions.startswith("d")
    assert abs(info.modified_time.timestamp() - time.time()) < 60


def test_rename_and_remove(sandbox, agent) -> None:
    source = str(agent.scratch / "before.txt")
    sandbox.files.write(source, "moving")
    moved = sandbox.files.rename(source, str(agent.scratch / "after/after.txt"))
    assert moved.name == "after.txt" and sandbox.files.exists(source) is False
    sandbox.files.remove(str(agent.scratch / "after"))
    assert sandbox.files.exists(str(agent.scratch / "after")) is False


def test_missing_paths_raise_not_found(sandbox, agent) -> None:
    sandbox.files.write(str(agent.scratch / "plain.txt"), "not a directory")
    assert sandbox.files.exists(str(agent.scratch / "plain.txt/below")) is False
    missing = str(agent.scratch / "missing.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(missing)
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(missing)
    with pytest.raises(NotFoundException):
        sandbox.files.remove(missing)
    with pytest.raises(NotFoundException):
        sandbox.files.list(missing)


def test_watch_dir_sync(sandbox, agent) -> None:
    watched = agent.scratch / "watched-sync"
    watched.mkdir()
    handle = sandbox.files.watch_dir(str(watched))
    (watched / "new.txt").write_text("x")
    time.sleep(0.2)
    events = handle.get_new_events()
    handle.stop()
    assert ("new.txt", "create") in {(e.name, e.type.value) for e in events}


def test_watch_dir_async_recursive(agent, debug_sdk) -> None:
    from e2b_code_interpreter import AsyncSandbox

    watched = agent.scratch / "watched-async"
    (watched / "sub").mkdir(parents=True)

    async def scenario() -> list[tuple[str, str]]:
        sandbox = await AsyncSandbox.create()
        seen: list[tuple[str, str]] = []
        handle = await sandbox.files.watch_dir(
            str(watched), on_event=lambda e: seen.append((e.name, e.type.value)), recursive=True
        )
        await sandbox.files.write(str(watched / "sub/file.txt"), "async")
        await sandbox.files.remove(str(watched / "sub/file.txt"))
        for _ in range(50):
            if ("sub/file.txt", "remove") in seen:
                break
            await asyncio.sleep(0.05)
        await handle.stop()
        return seen

    seen = asyncio.run(scenario())
    assert ("sub/file.txt", "create") in seen and ("sub/file.txt", "remove") in seen
