"""What every image source (registry, OCI layout, archives) hands the build: config + layer files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.templates.manifests import Descriptor, ImageConfig

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
