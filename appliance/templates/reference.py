"""Where an image comes from: a registry reference or a local archive/layout.

Accepted forms (the `--image` flag, a Dockerfile's FROM):
  REGISTRY/NAME[:TAG][@DIGEST]   registry (docker:// prefix allowed); Docker Hub when no registry
  oci:DIR[:REF]                  an OCI image layout directory
  oci-archive:PATH[:REF]         a tar of an OCI image layout
  docker-archive:PATH[:NAME:TAG] the output of `docker save`
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_NAME_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


class InvalidReference(ValueError):
    pass


@dataclass(frozen=True)
class RegistryReference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str  # e.g. library/python
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_ref(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class LocalReference:
    transport: str  # oci | oci-archive | docker-archive
    path: Path
    ref: str | None  # tag inside the layout/archive, None = the only image

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.ref}" if self.ref else "")


ImageReference = RegistryReference | LocalReference


def parse_image_reference(text: str) -> ImageReference:
    text = text.strip()
    for transport in ("oci-archive", "docker-archive", "oci"):
        if text.startswith(transport + ":"):
            return _parse_local(transport, text[len(transport) + 1 :])
    return parse_registry_reference(text.removeprefix("docker://"))


def _parse_local(transport: str, rest: str) -> LocalReference:
    # The path may itself contain ':' only if it exists as written; otherwise the
    # last ':' separates a reference (skopeo's convention).
    if not rest:
        raise InvalidReference(f"{transport}: needs a path")
    if ":" in rest and not Path(rest).exists():
        path, _, ref = rest.partition(":")
        return LocalReference(transport, Path(path), ref or None)
    return LocalReference(transport, Path(rest), None)


def parse_registry_reference(text: str) -> RegistryReference:
    if not text:
        raise InvalidReference("empty image reference")
    name, digest = text, None
    if "@" in text:
        name, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid digest in image reference {text!r}")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in image reference {text!r}")
    first, _, remainder = name.partition("/")
    # Like docker: the first component is a registry when it looks like a host.
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    for component in repository.split("/"):
        if not _NAME_COMPONENT_RE.match(component):
            raise InvalidReference(f"invalid repository name {repository!r} in image reference {text!r}")
    if tag is None and digest is None:
        tag = "latest"
    return RegistryReference(registry, repository, tag, digest)
