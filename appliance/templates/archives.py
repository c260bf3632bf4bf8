"""Images from local files: `oci:DIR`, `oci-archive:PATH` and `docker-archive:PATH` (docker save)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path, PurePosixPath

import trio

from appliance.templates.image_source import LayerBlob, LayerProgress, ResolvedImage, resolve_manifests
from appliance.templates.layer_cache import digest_hex, file_sha256
from appliance.templates.limits import BuildLimits, SizeBudget, SizeLimitExceeded
from appliance.templates.manifests import (
    Descriptor,
    DigestMismatch,
    ImageConfig,
    ManifestError,
    check_platform,
    sha256_digest,
    verify_digest,
)
from appliance.templates.reference import LocalReference
from appliance.templates.untrusted_tree import Tree, join_path, split_path

_REF_NAME = "org.opencontainers.image.ref.name"
_DOCKER_LAYER_PATH = "cube.docker-archive.path"
_TAR_HEADER = 512


def extract_plain_archive(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack the regular files and directories of an image archive (at most `max_bytes`), refusing
    paths that escape `dest`."""
    budget = SizeBudget(max_bytes, f"image archive {archive}", "build_unpacked_max_size")
    try:
        with tarfile.open(archive) as tar, Tree.open(dest) as tree:
            for member in tar:
                parts = split_path(member.name)
                if not parts or member.name.startswith("/") or ".." in parts:
                    raise ManifestError(f"{archive}: unsafe path {member.name!r} in archive")
                budget.spend(_TAR_HEADER + (member.size if member.isfile() else 0))
                if member.isdir():
                    tree.makedirs(join_path(parts))
                elif member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None
                    tree.makedirs(join_path(parts[:-1]))
                    tree.write_from(join_path(parts), source, 0o644)
    except SizeLimitExceeded as exc:
        raise ManifestError(str(exc)) from exc
    except (tarfile.TarError, OSError) as exc:
        raise ManifestError(f"cannot read image archive {archive}: {exc}") from exc


class OciLayoutSource:
    """An OCI image layout directory (`oci:`), or an extracted `oci-archive:`."""

    def __init__(self, layout: Path, ref: str | None, name: str) -> None:
        self._layout = layout
        self._ref = ref
        self._name = name

    def _blob(self, digest: str) -> Path:
        return self._layout / "blobs" / "sha256" / digest_hex(digest)

    def _read_verified(self, descriptor: Descriptor, what: str) -> bytes:
        try:
            data = self._blob(descriptor.digest).read_bytes()
        except FileNotFoundError as exc:
            raise ManifestError(f"{self._name}: {what} blob {descriptor.digest} is missing") from exc
        verify_digest(data, descriptor.digest, f"{self._name}: {what}")
        return data

    def _pick_from_index(self) -> Descriptor:
        try:
            index = json.loads((self._layout / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{self._name}: not an OCI image layout ({exc})") from exc
        entries = [Descriptor.from_json(entry) for entry in index.get("manifests") or ()]
        if self._ref is not None:
            entries = [e for e in entries if e.annotations.get(_REF_NAME) == self._ref]
            if not entries:
                raise ManifestError(f"{self._name}: no image tagged {self._ref!r} in the layout")
        if len(entries) != 1:
            raise ManifestError(
                f"{self._name}: the layout holds {len(entries)} images; name one as oci:DIR:REF"
            )
        return entries[0]

    async def resolve(self) -> ResolvedImage:
        entry = await trio.to_thread.run_sync(self._pick_from_index)
        raw, media_type = await self._read_manifest(entry)
        return await resolve_manifests(
            self._name, (raw, media_type, entry.digest), self._read_manifest, self._read_config
        )

    async def _read_manifest(self, entry: Descriptor) -> tuple[bytes, str]:
        return await trio.to_thread.run_sync(self._read_verified, entry, "manifest"), entry.media_type

    async def _read_config(self, descriptor: Descriptor) -> bytes:
        return await trio.to_thread.run_sync(self._read_verified, descriptor, "config")

    async def fetch_layer(self, layer: Descriptor, progress: LayerProgress) -> LayerBlob:
        path = self._blob(layer.digest)
        if not path.is_file():
            raise ManifestError(f"{self._name}: layer blob {layer.digest} is missing")
        actual = await trio.to_thread.run_sync(file_sha256, path)
        if actual != layer.digest:
            raise DigestMismatch(f"{self._name}: layer {layer.digest} has content digest {actual}")
        progress(layer.size)
        return LayerBlob(path, from_cache=False)


class DockerArchiveSource:
    """An extracted `docker save` archive: manifest.json naming a config file and layer tars."""

    def __init__(self, root: Path, ref: str | None, name: str) -> None:
        self._root = root
        self._ref = ref
        self._name = name

    async def resolve(self) -> ResolvedImage:
        return await trio.to_thread.run_sync(self._resolve_sync)

    def _resolve_sync(self) -> ResolvedImage:
        try:
            raw = (self._root / "manifest.json").read_bytes()
            entries = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{self._name}: not a docker-archive (manifest.json: {exc})") from exc
        if self._ref is not None:
            entries = [e for e in entries if self._ref in (e.get("RepoTags") or ())]
            if not entries:
                raise ManifestError(f"{self._name}: no image tagged {self._ref!r} in the archive")
        if len(entries) != 1:
            raise ManifestError(
                f"{self._name}: the archive holds {len(entries)} images; name one as PATH:NAME:TAG"
            )
        entry = entries[0]
        config_raw = self._member(entry["Config"]).read_bytes()
        config = ImageConfig.from_bytes(config_raw)
        check_platform(config, self._name)
        layer_paths = list(entry.get("Layers") or ())
        if len(layer_paths) != len(config.diff_ids):
            raise ManifestError(
                f"{self._name}: {len(layer_paths)} layers but {len(config.diff_ids)} diff_ids"
            )
        # docker save stores layers uncompressed, so each is named by its diff_id;
        # unpacking checks the content against it.
        layers = tuple(
            Descriptor(
                "application/vnd.docker.image.rootfs.diff.tar",
                diff_id,
                self._member(path).stat().st_size,
                annotations={_DOCKER_LAYER_PATH: path},
            )
            for path, diff_id in zip(layer_paths, config.diff_ids, strict=True)
        )
        return ResolvedImage(self._name, sha256_digest(config_raw), config, layers)

    def _member(self, name: str) -> Path:
        parts = PurePosixPath(name).parts
        if ".." in parts or name.startswith("/"):
            raise ManifestError(f"{self._name}: unsafe path {name!r} in manifest.json")
        return self._root.joinpath(*parts)

    async def fetch_layer(self, layer: Descriptor, progress: LayerProgress) -> LayerBlob:
        path = self._member(layer.annotations[_DOCKER_LAYER_PATH])
        progress(layer.size)
        return LayerBlob(path, from_cache=False)


async def open_local_source(
    ref: LocalReference, work_dir: Path, limits: BuildLimits
) -> OciLayoutSource | DockerArchiveSource:
    """Archives are extracted into `work_dir` (the job's scratch space) first."""
    if not ref.path.exists():
        raise ManifestError(f"{ref}: {ref.path} does not exist")
    if ref.transport == "oci":
        return OciLayoutSource(ref.path, ref.ref, str(ref))
    extracted = work_dir / "archive"
    extracted.mkdir(parents=True, exist_ok=True)
    await trio.to_thread.run_sync(extract_plain_archive, ref.path, extracted, limits.unpacked_bytes)
    if ref.transport == "oci-archive":
        return OciLayoutSource(extracted, ref.ref, str(ref))
    return DockerArchiveSource(extracted, ref.ref, str(ref))
