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


def test_a_file_that_reports_no_size_is_read_to_its_end_on_a_kept_connection(sandbox, agent) -> None:
    """procfs says 0 bytes and holds more: the whole content comes back, and the keep-alive
    connection it came on answers the next requests (a Content-Length of 0 overrun by the body
    broke it: E2B's test_keep_memory_none_defaults_to_full_memory read boot_id so, then got a reset)."""
    path = "/proc/sys/kernel/random/boot_id"
    with open(path) as f:
        boot_id = f.read()
    assert len(boot_id) > 30 and sandbox.files.read(path) == boot_id
    with httpx.Client() as client:
        for _ in range(3):
            response = client.get(f"{agent.envd_url}/files", params={"path": path})
            assert response.status_code == 200 and response.text == boot_id
            assert "content-length" not in response.headers


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
        sandbox.files.list(missing)


def test_removing_a_missing_path_is_not_an_error(sandbox, agent) -> None:
    """As envd's os.RemoveAll: the path is gone afterwards either way."""
    sandbox.files.remove(str(agent.scratch / "never-was.txt"))
    sandbox.files.remove(str(agent.scratch / "never-was/below/it"))
    assert sandbox.files.exists(str(agent.scratch / "never-was.txt")) is False


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


def test_symlinks_are_reported_as_newer_envd_reports_them(sandbox, agent) -> None:
    """A link's EntryInfo: `type` and `mode` of what it resolves to, `isSymlink`, and the resolved
    absolute path as `symlinkTarget`. SDKs that know `isSymlink` (2.63) show a symlink; older
    ones, the target's type. A dangling link is a symlink in `type` too."""
    root = agent.scratch / "links"
    (root / "dir").mkdir(parents=True)
    (root / "dir/file.txt").write_text("target")
    (root / "dir/file.txt").chmod(0o640)
    command = "ln -s file.txt to-file && ln -s ../dir to-dir && ln -s gone dangling"
    sandbox.commands.run(command, cwd=str(root / "dir"))

    def stat(name: str) -> dict[str, object]:
        response = httpx.post(
            f"{agent.envd_url}/filesystem.Filesystem/Stat",
            json={"path": str(root / "dir" / name)},
            headers={"Connect-Protocol-Version": "1"},
        )
        return response.json()["entry"]

    to_file, to_dir, dangling = stat("to-file"), stat("to-dir"), stat("dangling")
    assert (to_file["type"], to_file["mode"], to_file["isSymlink"]) == ("FILE_TYPE_FILE", 0o640, True)
    assert to_file["symlinkTarget"] == str(root / "dir/file.txt")
    assert (to_dir["type"], to_dir["symlinkTarget"]) == ("FILE_TYPE_DIRECTORY", str(root / "dir"))
    assert (dangling["type"], dangling["symlinkTarget"]) == ("FILE_TYPE_SYMLINK", str(root / "dir/gone"))
    assert "isSymlink" not in stat("file.txt") and "symlinkTarget" not in stat("file.txt")
    info = sandbox.files.get_info(str(root / "dir/to-file"))
    assert (info.type, info.symlink_target) == (FileType.SYMLINK, str(root / "dir/file.txt"))
    listed = {e.name: (e.type, e.symlink_target) for e in sandbox.files.list(str(root / "dir"))}
    assert listed["file.txt"] == (FileType.FILE, None)
    assert listed["dangling"] == (FileType.SYMLINK, str(root / "dir/gone"))


def test_overwriting_a_file_replaces_its_metadata(sandbox, agent) -> None:
    path = str(agent.scratch / "meta-overwrite.txt")
    try:
        sandbox.files.write(path, "first", metadata={"author": "a", "stage": "draft"})
    except Exception as exc:  # xattrs unsupported on this filesystem (e.g. some tmpfs)
        pytest.skip(f"user xattrs not supported here: {exc}")
    assert sandbox.files.write(path, "second").metadata is None
    assert sandbox.files.get_info(path).metadata is None
    sandbox.files.write(path, "third", metadata={"stage": "final"})
    assert sandbox.files.write(
        path, "fourth", metadata={"reviewer": "b"}, use_octet_stream=True
    ).metadata == {"reviewer": "b"}
    assert sandbox.files.get_info(path).metadata == {"reviewer": "b"}


def test_invalid_metadata_is_refused_before_the_file_is_written(agent) -> None:
    path = agent.scratch / "bad-meta.txt"
    for name, value in (("X-Metadata-Key", "caf\xe9".encode("latin-1")), ("X-Metadata-Key", b"tab\there")):
        response = httpx.post(
            f"{agent.envd_url}/files",
            params={"path": str(path)},
            content=b"x",
            headers={"Content-Type": "application/octet-stream", name: value},
        )
        assert response.status_code == 400 and "metadata" in response.json()["message"]
    assert not path.exists()


def test_a_new_file_is_watched_as_create_chmod_write(sandbox, agent) -> None:
    """What envd's upload does to a new file, in watch events: E2B's suite counts them."""
    watched = agent.scratch / "watched-upload"
    watched.mkdir()
    handle = sandbox.files.watch_dir(str(watched))
    sandbox.files.write(str(watched / "new.txt"), "content")
    time.sleep(0.2)
    events = [(e.name, e.type.value) for e in handle.get_new_events()]
    handle.stop()
    assert events == [("new.txt", "create"), ("new.txt", "chmod"), ("new.txt", "write")]


def test_recursive_watch_covers_folders_made_after_it_started(sandbox, agent) -> None:
    watched = agent.scratch / "watched-later"
    watched.mkdir()
    handle = sandbox.files.watch_dir(str(watched), recursive=True)
    sandbox.files.make_dir(str(watched / "nested"))
    sandbox.files.write(str(watched / "nested/file.txt"), "x")
    # Made and filled by one command: faster than any watch can be added to the new folders.
    sandbox.commands.run(f"mkdir -p {watched}/a/b/c && echo y > {watched}/a/b/c/deep.txt")
    time.sleep(0.3)
    events = {(e.name, e.type.value) for e in handle.get_new_events()}
    handle.stop()
    assert {("nested", "create"), ("nested/file.txt", "create"), ("nested/file.txt", "write")} <= events
    assert {("a", "create"), ("a/b/c", "create"), ("a/b/c/deep.txt", "create")} <= events
