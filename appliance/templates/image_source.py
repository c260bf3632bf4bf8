"""What every image source (registry, OCI layout, archives) hands the build: config + layer files."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.templates.manifests import (
    Descriptor,
    ImageConfig,
    ImageManifest,
    ManifestError,
    check_platform,
    parse_manifest_document,
    select_platform,
)

# Called with the number of bytes of a layer that are available so far.
LayerProgress = Callable[[int], None]


@dataclass(frozen=True)
class ResolvedImage:
    name: str  # what the user asked for, for messages
    digest: str  # manifest digest (the template's `source`)
    config: ImageConfig
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class LayerBlob:
    path: Path  # the layer as stored: gzip, zstd or plain tar
    from_cache: bool


class ImageSource(Protocol):
    async def resolve(self) -> ResolvedImage:
        """Read the manifest (picking linux/amd64 from an index) and the image config."""
        ...

    async def fetch_layer(self, layer: Descriptor, progress: LayerProgress) -> LayerBlob:
        """A local file with the layer's verified content."""
        ...


async def resolve_manifests(
    name: str,
    top: tuple[bytes, str, str],
    read_manifest: Callable[[Descriptor], Awaitable[tuple[bytes, str]]],
    read_config: Callable[[Descriptor], Awaitable[bytes]],
) -> ResolvedImage:
    """The image behind a top-level manifest document (raw, media type, digest): an index picks
    its linux/amd64 entry; the config must be linux/amd64. The readers return verified content
    (and the manifest's media type)."""
    raw, media_type, digest = top
    document = parse_manifest_document(raw, media_type)
    if isinstance(document, list):
        entry = select_platform(document, name)
        raw, media_type = await read_manifest(entry)
        digest = entry.digest
        document = parse_manifest_document(raw, media_type)
    if not isinstance(document, ImageManifest):
        raise ManifestError(f"image {name}: an index entry points at another index")
    config = ImageConfig.from_bytes(await read_config(document.config))
    check_platform(config, name)
    return ResolvedImage(name, digest, config, document.layers)
