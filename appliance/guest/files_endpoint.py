"""envd's `/files`: download and upload (multipart, octet-stream, gzip, X-Metadata-* headers)."""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from appliance.guest.connect import ConnectError
from appliance.guest.filesystem_service import (
    METADATA_XATTR_PREFIX,
    make_directories,
    read_metadata,
    resolve_path,
)
from appliance.guest.http import HttpError, Request, Response
from appliance.guest.identity import as_user
from appliance.guest.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)
from appliance.guest.users import User

CHUNK = 1024 * 1024
# Writes are batched to this size and, above it, done in a worker thread so big uploads
# do not stall the event loop; small files stay on the loop (a thread hop costs more).
WRITE_BATCH = 1024 * 1024
METADATA_HEADER_PREFIX = "x-metadata-"
MAX_XATTR_NAME = 255  # the VFS's limit on a whole xattr name
MAX_METADATA_BYTES = 4096  # ext4 keeps an inode's xattrs in one block

HTTP_STATUS_FOR_ERRNO = {
    errno.ENOENT: 404,
    errno.EACCES: 403,
    errno.EPERM: 403,
    errno.EROFS: 403,
    errno.EISDIR: 400,
    errno.ENOTDIR: 400,
    errno.EINVAL: 400,
    errno.ENAMETOOLONG: 400,
    errno.EEXIST: 400,
    errno.ENOSPC: 507,
    errno.EDQUOT: 507,
}


def files_error(exc: OSError, path: str) -> HttpError:
    return HttpError(HTTP_STATUS_FOR_ERRNO.get(exc.errno or 0, 500), f"{exc.strerror or exc}: {path}")


def _resolve(path: str | None, user: User) -> str:
    if not path:
        raise HttpError(400, "path is required")
    try:
        return resolve_path(path, user)
    except ConnectError as exc:
        raise HttpError(400, exc.message) from exc


def _open_for_reading(path: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise files_error(exc, path) from exc
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise HttpError(400, f"path is a directory: {path}")
    return fd, info


async def download(request: Request, response: Response, user: User) -> None:
    path = _resolve(request.query_value("path"), user)
    # Only opening needs the user's identity: reads from the open descriptor are not checked.
    fd, info = await as_user(user, _open_for_reading, path)
    try:
        # Only an explicit `Accept-Encoding: gzip` (files.read(gzip=True)) gets compression:
        # httpx offers "gzip, deflate" on every request, and compressing all reads costs CPU.
        compress = request.headers.get("accept-encoding", "").strip().lower() == "gzip"
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", f'inline; filename="{os.path.basename(path)}"'),
        ]
        # A file that says it is empty may not be (procfs, sysfs: /proc/sys/kernel/random/boot_id):
        # sent to its end, chunked. A Content-Length of 0 that its content then overran left the
        # connection broken for the client's next request on it (reset once the agent closed it).
        sized = not compress and info.st_size > 0
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        elif sized:
            headers.append(("Content-Length", str(info.st_size)))
        await response.start(200, headers)
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if compress else None
        sent = 0
        while True:
            chunk = await _read(fd, info.st_size - sent)
            if not chunk:
                break
            sent += len(chunk)
            await response.write(compressor.compress(chunk) if compressor else chunk)
            if sized and sent >= info.st_size:
                break  # Content-Length promised exactly this much, even if the file grows
        if compressor:
            await response.write(compressor.flush())
        await response.finish()
    finally:
        os.close(fd)


async def _read(fd: int, expected_remaining: int) -> bytes:
    if expected_remaining < CHUNK:
        return os.read(fd, CHUNK)
    return await trio.to_thread.run_sync(os.read, fd, CHUNK)


@dataclass
class FileSink:
    """One destination file of an upload, written as data arrives."""

    path: str
    user: User
    metadata: dict[str, str]
    fd: int = -1
    pending: list[bytes] = field(default_factory=list)
    pending_size: int = 0

    async def open(self) -> None:
        self.fd = await as_user(self.user, self._create)

    def _create(self) -> int:
        """As the user: what they create (parents included) is theirs, what they may not touch fails."""
        if os.path.isdir(self.path):
            raise HttpError(400, f"path is a directory: {self.path}")
        try:
            make_directories(os.path.dirname(self.path))
            new = not os.path.lexists(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise files_error(exc, self.path) from exc
        if new:
            # Already the user's (fsuid), but envd chowns what it creates, so watchers see a new
            # file's create, chmod, write: E2B's suite counts those events.
            try:
                os.fchown(fd, self.user.uid, self.user.gid)
            except PermissionError:
                pass
        return fd

    async def write(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= WRITE_BATCH:
            await self.flush()

    async def flush(self) -> None:
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        try:
            if len(data) >= WRITE_BATCH:
                await trio.to_thread.run_sync(_write_all, self.fd, data)
            else:
                _write_all(self.fd, data)
        except OSError as exc:
            raise files_error(exc, self.path) from exc

    async def close(self) -> dict[str, object]:
        await self.flush()
        try:
            # The upload's metadata replaces the file's whole set (O_TRUNC keeps old xattrs).
            await as_user(self.user, _replace_metadata, self.fd, self.path, self.metadata)
            stored = read_metadata(self.path)  # what the file has, as a later stat reports it
        finally:
            os.close(self.fd)
            self.fd = -1
        info: dict[str, object] = {"name": os.path.basename(self.path), "type": "file", "path": self.path}
        if stored:
            info["metadata"] = stored
        return info

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _replace_metadata(fd: int, path: str, metadata: dict[str, str]) -> None:
    """`metadata` as the file's whole `user.e2b.*` set. Without xattr support (some tmpfs, /proc)
    an upload without metadata still succeeds; one with metadata fails."""
    try:
        stale = [name for name in os.listxattr(fd) if name.startswith(METADATA_XATTR_PREFIX)]
        for name in stale:
            if name[len(METADATA_XATTR_PREFIX) :] not in metadata:
                os.removexattr(fd, name)
        for key, value in metadata.items():
            os.setxattr(fd, METADATA_XATTR_PREFIX + key, value.encode())
    except OSError as exc:
        if exc.errno == errno.ENOTSUP and not metadata:
            return
        raise files_error(exc, path) from exc


def metadata_of(headers: dict[str, str]) -> dict[str, str]:
    """The upload's `X-Metadata-<key>: <value>` headers (names arrive lower-cased), checked as envd
    checks them: printable ASCII, a key, within what one ext4 block holds. HttpError 400 if not."""
    metadata = {
        name[len(METADATA_HEADER_PREFIX) :]: value
        for name, value in headers.items()
        if name.startswith(METADATA_HEADER_PREFIX)
    }
    total = 0
    for key, value in metadata.items():
        if not key or len(METADATA_XATTR_PREFIX) + len(key) > MAX_XATTR_NAME:
            raise HttpError(400, f"metadata key {key!r} is empty or too long")
        if not all(0x20 <= ord(c) <= 0x7E for c in key + value):
            raise HttpError(400, f"metadata {key!r}: keys and values must be printable ASCII")
        total += len(METADATA_XATTR_PREFIX) + len(key) + len(value)
    if total > MAX_METADATA_BYTES:
        raise HttpError(400, f"metadata takes {total} bytes, more than {MAX_METADATA_BYTES}")
    return metadata


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def upload(request: Request, response: Response, user: User) -> None:
    metadata = metadata_of(request.headers)
    query_path = request.query_value("path")
    content_type = request.headers.get("content-type", "")
    gzipped = request.headers.get("content-encoding", "").strip().lower() == "gzip"
    body = _decoded(request.body_chunks(), gzipped)
    try:
        if content_type.lower().startswith("multipart/form-data"):
            boundary = boundary_of(content_type)
            if not boundary:
                raise HttpError(400, "multipart body without boundary")
            written = await _write_parts(body, boundary, query_path, user, metadata)
        else:
            written = [await _write_file(body, _resolve(query_path, user), user, metadata)]
    except MultipartError as exc:
        raise HttpError(400, str(exc)) from exc
    except zlib.error as exc:
        raise HttpError(400, f"invalid gzip body: {exc}") from exc
    if not written:
        raise HttpError(400, "no file in the request")
    await response.send_json(200, written)


async def _decoded(chunks: AsyncIterator[bytes], gzipped: bool) -> AsyncIterator[bytes]:
    """The request body as it arrives, gunzipped for `Content-Encoding: gzip`."""
    decompressor = zlib.decompressobj(31) if gzipped else None  # 31: with the gzip header and trailer
    async for chunk in chunks:
        yield decompressor.decompress(chunk) if decompressor else chunk
    if decompressor:
        yield decompressor.flush()


async def _write_file(
    body: AsyncIterator[bytes], path: str, user: User, metadata: dict[str, str]
) -> dict[str, object]:
    """One file from the whole body (application/octet-stream)."""
    sink = FileSink(path, user, metadata)
    try:
        await sink.open()
        async for chunk in body:
            await sink.write(chunk)
        return await sink.close()
    except BaseException:
        sink.abort()
        raise


async def _write_parts(
    body: AsyncIterator[bytes], boundary: str, query_path: str | None, user: User, metadata: dict[str, str]
) -> list[dict[str, object]]:
    """A file per part of a multipart body: ?path= names a single one, each part's filename several."""
    parser = MultipartParser(boundary)
    written: list[dict[str, object]] = []
    sink: FileSink | None = None
    try:
        async for chunk in body:
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    sink = FileSink(_resolve(query_path or event.filename, user), user, metadata)
                    await sink.open()
                elif isinstance(event, PartData) and sink is not None:
                    await sink.write(event.data)
                elif isinstance(event, PartEnd) and sink is not None:
                    written.append(await sink.close())
                    sink = None
        parser.finish()
    finally:
        if sink is not None:
            sink.abort()
    return written
