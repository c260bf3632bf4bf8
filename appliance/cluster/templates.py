"""Templates across nodes: a node asked for a template it lacks pulls it from a node that has it.

A template is its manifest (`template.json`) and its image (`rootfs.ext4`); a KVM template
snapshot is a per-host cache made from them, never copied. The image is content-addressed: its
SHA-256, computed once and kept beside it (`rootfs.ext4.sha256`, valid while the file's size,
mtime and inode are those it was computed for).

The pull (`TemplateShare.ensure`, on the node a create is placed on, before the create runs):
1. a node whose record lists the name is asked, with the cluster token and the caller's team,
   what the name means to that team (`GET /cube/cluster/templates/resolve?name=`): the manifest
   and the image's digest and size, or 404 (another team's template is never described);
2. the image is fetched by its digest (`GET /cube/cluster/blobs/<sha256>`), streamed into a new
   file made with O_EXCL | O_NOFOLLOW in the template's new directory (opened O_NOFOLLOW: the
   bytes are written only through descriptors, never a path a symlink could redirect), hashed as
   it arrives, zero blocks left as holes;
3. a size or digest that differs from the one described discards everything; else the file is
   renamed into place and the manifest written (`publish_template`), which makes it exist.
Concurrent creates of one missing template wait for the one pull. Both endpoints answer only a
request with the cluster token (proxy/node_hop.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.cluster.forwarding import principal_headers
from appliance.cluster.membership import NodeRecord
from appliance.config import Config
from appliance.records import MANIFEST_NAME, ROOTFS_NAME, TemplateManifest
from appliance.templates.catalog import (
    begin_template,
    discard_template,
    publish_template,
    split_name_tag,
    validate_name,
)
from appliance.tenancy import Principal

log = logging.getLogger(__name__)

RESOLVE_PATH = "/cube/cluster/templates/resolve"
BLOBS_PATH = "/cube/cluster/blobs/"
DIGEST_SIDECAR = ROOTFS_NAME + ".sha256"
PART_NAME = ROOTFS_NAME + ".part"
CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TemplatePullFailed(Exception):
    """A template another node has could not be brought here (the create answers 503)."""


@dataclass(frozen=True)
class Artifact:
    sha256: str
    size: int


def is_digest(text: str) -> bool:
    return bool(_SHA256_HEX.match(text))


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _cached(dir_fd: int, st: os.stat_result) -> Artifact | None:
    try:
        fd = os.open(DIGEST_SIDECAR, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as sidecar:
        try:
            cached = json.loads(sidecar.read(4096))
        except ValueError:
            return None
    if not isinstance(cached, dict) or cached.get("stat") != _stat_key(st):
        return None
    digest = cached.get("sha256")
    return Artifact(digest, st.st_size) if isinstance(digest, str) and is_digest(digest) else None


def _write_sidecar(dir_fd: int, st: os.stat_result, artifact: Artifact) -> None:
    """Best effort: a read-only template directory (the ISO's) hashes again next time."""
    tmp = DIGEST_SIDECAR + ".tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        fd = os.open(tmp, _NEW_FLAGS, 0o644, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as sidecar:
            json.dump({"sha256": artifact.sha256, "stat": _stat_key(st)}, sidecar)
        os.replace(tmp, DIGEST_SIDECAR, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        log.info("cluster: cannot keep the digest of the image in fd %d: %s", dir_fd, exc)


def _open_image(directory: Path) -> tuple[int, int, os.stat_result]:
    """(directory fd, image fd, its stat): neither opened through a symlink; the image regular."""
    dir_fd = os.open(directory, _DIR_FLAGS)
    try:
        fd = os.open(ROOTFS_NAME, _READ_FLAGS, dir_fd=dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        os.close(dir_fd)
        raise OSError(f"{directory / ROOTFS_NAME} is not a regular file")
    return dir_fd, fd, st


def image_digest(directory: Path) -> Artifact:
    """The SHA-256 and size of the template image in `directory`, from its sidecar when that still
    describes the file, else hashed now (and kept). Blocking: run it in a thread."""
    dir_fd, fd, st = _open_image(directory)
    try:
        cached = _cached(dir_fd, st)
        if cached is not None:
            return cached
        with os.fdopen(os.dup(fd), "rb") as image:
            digest = hashlib.file_digest(image, "sha256").hexdigest()
        artifact = Artifact(digest, st.st_size)
        if _stat_key(os.fstat(fd)) == _stat_key(st):  # not changed while it was read
            _write_sidecar(dir_fd, st, artifact)
        return artifact
    finally:
        os.close(fd)
        os.close(dir_fd)


def open_blob(manifests: Iterable[TemplateManifest], sha256: str) -> tuple[int, int] | None:
    """(fd, size) of the image of one of `manifests` whose kept digest is `sha256`; None if none
    (only digests already computed are served: the describe call computes them). Blocking."""
    for manifest in manifests:
        try:
            dir_fd, fd, st = _open_image(manifest.directory)
        except OSError:
            continue
        try:
            cached = _cached(dir_fd, st)
        finally:
            os.close(dir_fd)
        if cached is not None and cached.sha256 == sha256:
            return fd, st.st_size
        os.close(fd)
    return None


def describe(manifest: TemplateManifest, artifact: Artifact) -> dict[str, Any]:
    data = json.loads(manifest.to_json())
    data.pop("directory")
    return {"manifest": data, "image": dataclasses.asdict(artifact)}


def _described(answer: Any) -> tuple[dict[str, Any], Artifact]:
    """The manifest fields and image another node described; ValueError if malformed."""
    if not isinstance(answer, dict) or not isinstance(answer.get("manifest"), dict):
        raise ValueError("no manifest")
    image = answer.get("image")
    if not isinstance(image, dict) or not isinstance(image.get("size"), int) or image["size"] < 0:
        raise ValueError("no image size")
    if not isinstance(image.get("sha256"), str) or not is_digest(image["sha256"]):
        raise ValueError("no image digest")
    manifest = answer["manifest"]
    validate_name(str(manifest.get("template_id", "")))  # a directory name here: no '/', no '..'
    return manifest, Artifact(image["sha256"], image["size"])


def _message(answer: httpx.Response) -> str:
    """The E2B error body's message, else the start of the body."""
    try:
        return str(answer.json()["message"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:200]


class _Receiver:
    """The pulled image's new file, written through descriptors only, hashed as it comes; all-zero
    blocks are skipped (holes), so a sparse image stays sparse. Blocking methods: run in a thread."""

    def __init__(self, directory: Path, expected: Artifact) -> None:
        self.expected = expected
        self.dir_fd = os.open(directory, _DIR_FLAGS)
        try:
            self.fd = os.open(PART_NAME, _NEW_FLAGS, 0o644, dir_fd=self.dir_fd)
        except BaseException:
            os.close(self.dir_fd)
            raise
        self.hash = hashlib.sha256()
        self.received = 0

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.expected.size:
            raise TemplatePullFailed(f"the image is longer than the {self.expected.size} bytes described")
        self.hash.update(chunk)
        if chunk.count(0) == len(chunk):
            os.lseek(self.fd, len(chunk), os.SEEK_CUR)
        else:
            _write_all(self.fd, chunk)

    def finish(self) -> os.stat_result:
        """Checked, made durable and renamed into place; its stat (the sidecar's key)."""
        if self.received != self.expected.size:
            raise TemplatePullFailed(f"the image ended at {self.received} of {self.expected.size} bytes")
        if self.hash.hexdigest() != self.expected.sha256:
            raise TemplatePullFailed(
                f"the image's digest is sha256:{self.hash.hexdigest()}, not the sha256:"
                f"{self.expected.sha256} described: not kept"
            )
        os.ftruncate(self.fd, self.received)
        os.fsync(self.fd)
        os.rename(PART_NAME, ROOTFS_NAME, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        st = os.fstat(self.fd)
        _write_sidecar(self.dir_fd, st, self.expected)
        return st

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class TemplateShare:
    """This node's side of template distribution: describing and serving its templates to the
    other nodes, and pulling one it lacks from them."""

    def __init__(
        self,
        config: Config,
        token: str,
        client: httpx.AsyncClient,
        templates: Callable[[], dict[str, TemplateManifest]],
        resolve: Callable[[str, Principal], TemplateManifest | None],
    ) -> None:
        self.config = config
        self.token = token
        self.client = client
        self.templates = templates
        self.resolve = resolve
        self._pulls: dict[str, trio.Lock] = {}

    # Serving.

    async def describe(self, name: str, principal: Principal) -> dict[str, Any] | None:
        """What `name` means to `principal` here, with its image's digest; None if nothing."""
        manifest = self.resolve(name, principal)
        if manifest is None:
            return None
        artifact = await trio.to_thread.run_sync(image_digest, manifest.directory)
        return describe(manifest, artifact)

    async def open_blob(self, sha256: str) -> tuple[int, int] | None:
        if not is_digest(sha256):
            return None
        manifests = list(self.templates().values())
        return await trio.to_thread.run_sync(open_blob, manifests, sha256)

    # Pulling.

    async def ensure(self, name: str, principal: Principal, sources: list[NodeRecord]) -> None:
        """Make the template `name` means to `principal` usable here if it is not, pulling it from
        the first of `sources` (nodes whose records list it) that describes it to `principal`.
        Nothing happens when no source describes it (the create then answers its own 404)."""
        if self.resolve(name, principal) is not None:
            return
        base = split_name_tag(name)[0]
        failures = []
        for node in sources:
            if base not in node.templates:
                continue
            try:
                answer = await self.client.get(
                    node.cluster_url + RESOLVE_PATH,
                    params={"name": name},
                    headers=self._headers(principal),
                )
                if answer.status_code == 404:
                    continue
                if answer.status_code != 200:
                    raise ValueError(f"it answered {answer.status_code}: {_message(answer)}")
                manifest, artifact = _described(answer.json())
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(f"node {node.node_id}: {exc}")
                continue
            try:
                return await self._pull_once(node, manifest, artifact)
            except (httpx.HTTPError, OSError, TemplatePullFailed) as exc:
                log.warning("cluster: pulling template %s from node %s: %s", name, node.node_id, exc)
                failures.append(f"node {node.node_id}: {exc}")
        if failures:
            raise TemplatePullFailed(f"template {name!r} could not be fetched: " + "; ".join(failures))

    def _headers(self, principal: Principal | None) -> list[tuple[str, str]]:
        return [(k.decode(), v.decode()) for k, v in principal_headers(self.token, principal)]

    async def _pull_once(self, node: NodeRecord, manifest: dict[str, Any], artifact: Artifact) -> None:
        template_id = str(manifest["template_id"])
        lock = self._pulls.setdefault(template_id, trio.Lock())
        async with lock:
            if (self.config.templates_dir / template_id / MANIFEST_NAME).exists():
                return  # pulled meanwhile (or here all along, for another team)
            await self._pull(node, manifest, artifact)
        if not lock.statistics().tasks_waiting:
            self._pulls.pop(template_id, None)

    async def _pull(self, node: NodeRecord, fields: dict[str, Any], artifact: Artifact) -> None:
        template_id = str(fields["template_id"])
        directory = self.config.templates_dir / template_id
        try:
            manifest = TemplateManifest.from_json(json.dumps({**fields, "directory": str(directory)}))
        except (TypeError, ValueError) as exc:
            raise TemplatePullFailed(f"node {node.node_id} described an unreadable manifest: {exc}") from exc
        log.info(
            "cluster: pulling template %s (%d bytes) from node %s", template_id, artifact.size, node.node_id
        )
        begin_template(self.config, template_id)
        try:
            receiver = await trio.to_thread.run_sync(_Receiver, directory, artifact)
            try:
                async with self.client.stream(
                    "GET", node.cluster_url + BLOBS_PATH + artifact.sha256, headers=self._headers(None)
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise TemplatePullFailed(f"it answered {response.status_code}: {_message(response)}")
                    async for chunk in response.aiter_bytes(CHUNK):
                        await trio.to_thread.run_sync(receiver.write, chunk)
                await trio.to_thread.run_sync(receiver.finish)
            finally:
                receiver.close()
            publish_template(self.config, manifest, alias=None)
        except BaseException:
            discard_template(self.config, template_id)
            raise
        log.info("cluster: template %s pulled from node %s", template_id, node.node_id)
