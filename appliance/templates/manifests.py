"""OCI / Docker schema 2 manifests, indexes (manifest lists) and image configs, as plain data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)

# Sandboxes are x86-64 Linux machines; nothing else can run in them.
WANTED_OS = "linux"
WANTED_ARCHITECTURE = "amd64"


class ManifestError(Exception):
    """The image's metadata is unusable (unsupported format, wrong platform, bad digest)."""


class DigestMismatch(ManifestError):
    pass


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, expected: str, what: str) -> None:
    algorithm, _, _ = expected.partition(":")
    if algorithm != "sha256":
        raise ManifestError(f"{what}: unsupported digest algorithm {algorithm!r} (only sha256)")
    actual = sha256_digest(data)
    if actual != expected:
        raise DigestMismatch(f"{what}: content has digest {actual}, expected {expected}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Descriptor:
        try:
            return cls(
                media_type=str(data.get("mediaType", "")),
                digest=str(data["digest"]),
                size=int(data["size"]),
                platform=dict(data.get("platform") or {}),
                annotations=dict(data.get("annotations") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed descriptor {data!r}: {exc}") from exc


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config a template uses."""

    os: str
    architecture: str
    diff_ids: tuple[str, ...]
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    exposed_ports: tuple[int, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ImageConfig:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"image config is not JSON: {exc}") from exc
        run = data.get("config") or {}
        ports = []
        for spec in (run.get("ExposedPorts") or {}).keys():
            number, _, protocol = spec.partition("/")
            if protocol in ("", "tcp") and number.isdigit():
                ports.append(int(number))
        return cls(
            os=str(data.get("os", "")),
            architecture=str(data.get("architecture", "")),
            diff_ids=tuple((data.get("rootfs") or {}).get("diff_ids") or ()),
            env=tuple(run.get("Env") or ()),
            entrypoint=tuple(run.get("Entrypoint") or ()),
            cmd=tuple(run.get("Cmd") or ()),
            workdir=str(run.get("WorkingDir") or ""),
            user=str(run.get("User") or ""),
            exposed_ports=tuple(sorted(ports)),
            labels={str(k): str(v) for k, v in (run.get("Labels") or {}).items()},
        )

    def env_dict(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            env[key] = value
        return env


def parse_manifest_document(raw: bytes, media_type_hint: str = "") -> ImageManifest | list[Descriptor]:
    """An image manifest, or the entries of an index / manifest list."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"manifest is not JSON: {exc}") from exc
    media_type = data.get("mediaType") or media_type_hint
    if data.get("schemaVersion") == 1:
        raise ManifestError(
            "Docker schema 1 manifests are not supported; push the image with a current client"
        )
    if media_type in INDEX_MEDIA_TYPES or (not media_type and "manifests" in data):
        return [Descriptor.from_json(entry) for entry in data.get("manifests") or ()]
    if media_type in (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST) or (not media_type and "layers" in data):
        return ImageManifest(
            config=Descriptor.from_json(data["config"]),
            layers=tuple(Descriptor.from_json(layer) for layer in data.get("layers") or ()),
        )
    raise ManifestError(f"unsupported manifest media type {media_type!r}")


def select_platform(entries: list[Descriptor], image: str) -> Descriptor:
    """The linux/amd64 entry of an index; a clear error naming what exists otherwise."""
    for entry in entries:
        if (
            entry.platform.get("os") == WANTED_OS
            and entry.platform.get("architecture") == WANTED_ARCHITECTURE
        ):
            return entry
    available = sorted(
        {
            "/".join(
                p
                for p in (e.platform.get("os"), e.platform.get("architecture"), e.platform.get("variant"))
                if p
            )
            for e in entries
            if e.platform
        }
    )
    raise ManifestError(
        f"image {image} has no {WANTED_OS}/{WANTED_ARCHITECTURE} variant "
        f"(it has: {', '.join(available) or 'no platform information'}); sandboxes run linux/amd64 only"
    )


def check_platform(config: ImageConfig, image: str) -> None:
    if (config.os, config.architecture) != (WANTED_OS, WANTED_ARCHITECTURE):
        raise ManifestError(
            f"image {image} is {config.os or '?'}/{config.architecture or '?'}; "
            f"sandboxes run {WANTED_OS}/{WANTED_ARCHITECTURE} only"
        )
