"""OCI distribution (registry v2) client: manifests, configs and layer blobs, on Trio via httpx."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import TracebackType

import httpx
import trio

from appliance.config import Config
from appliance.templates.image_source import LayerBlob, LayerProgress, ResolvedImage, resolve_manifests
from appliance.templates.layer_cache import LayerCache
from appliance.templates.manifests import (
    MANIFEST_MEDIA_TYPES,
    Descriptor,
    sha256_digest,
    verify_digest,
)
from appliance.templates.reference import RegistryReference
from appliance.templates.registry_auth import Credentials, RegistryAuth, RegistryAuthError

_CHUNK = 1 << 16
_TIMEOUT = httpx.Timeout(30.0, read=120.0)


class RegistryError(Exception):
    pass


class ImageNotFound(RegistryError):
    pass


def registry_base_url(host: str, insecure_registries: frozenset[str]) -> str:
    """https, except for loopback registries and those the operator listed as plain HTTP."""
    hostname = httpx.URL(f"http://{host}").host
    loopback = hostname == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        pass
    scheme = "http" if loopback or host in insecure_registries else "https"
    return f"{scheme}://{host}"


def insecure_registries(config: Config) -> frozenset[str]:
    """Registries served over plain HTTP: `insecure_registries = "host:port,..."` in the config file."""
    return frozenset(h.strip() for h in config.extra.get("insecure_registries", "").split(",") if h.strip())


def _registry_error_text(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or response.text[:200]
    except ValueError:
        return response.text[:200]


class RegistryImageSource:
    """One image in one repository; use as `async with`."""

    def __init__(
        self,
        ref: RegistryReference,
        cache: LayerCache,
        credentials: Credentials | None = None,
        insecure_registries: frozenset[str] = frozenset(),
    ) -> None:
        self.ref = ref
        self._cache = cache
        self._base = f"{registry_base_url(ref.api_host, insecure_registries)}/v2/{ref.repository}"
        self._http = httpx.AsyncClient(timeout=_TIMEOUT, follow_redirects=True)
        self._auth = RegistryAuth(self._http, ref.registry, ref.repository, credentials)

    async def __aenter__(self) -> RegistryImageSource:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.aclose()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._auth.header:
            headers["Authorization"] = self._auth.header
        return headers

    async def _get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET with one retry after answering an auth challenge."""
        for attempt in range(2):
            try:
                response = await self._http.get(url, headers=self._headers(headers))
            except httpx.HTTPError as exc:
                raise RegistryError(f"cannot reach registry {self.ref.registry}: {exc}") from exc
            if response.status_code != 401:
                return response
            if attempt == 0:
                await self._auth.answer_challenge(response)
        raise RegistryAuthError(
            f"registry {self.ref.registry} denied access to {self.ref.repository}: "
            f"{_registry_error_text(response)}"
        )

    async def _get_manifest(self, reference: str) -> tuple[bytes, str]:
        response = await self._get(
            f"{self._base}/manifests/{reference}", {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
        )
        if response.status_code == 404:
            raise ImageNotFound(f"image {self.ref} not found: {_registry_error_text(response)}")
        if response.status_code != 200:
            raise RegistryError(
                f"registry {self.ref.registry} answered {response.status_code} for manifest {reference}: "
                f"{_registry_error_text(response)}"
            )
        return response.content, response.headers.get("content-type", "").split(";")[0].strip()

    async def resolve(self) -> ResolvedImage:
        raw, media_type = await self._get_manifest(self.ref.manifest_ref)
        if self.ref.digest:
            verify_digest(raw, self.ref.digest, f"manifest of {self.ref}")
        return await resolve_manifests(
            str(self.ref), (raw, media_type, sha256_digest(raw)), self._read_manifest, self._read_config
        )

    async def _read_manifest(self, entry: Descriptor) -> tuple[bytes, str]:
        raw, media_type = await self._get_manifest(entry.digest)
        verify_digest(raw, entry.digest, f"linux/amd64 manifest of {self.ref}")
        return raw, media_type

    async def _read_config(self, descriptor: Descriptor) -> bytes:
        response = await self._get(f"{self._base}/blobs/{descriptor.digest}")
        if response.status_code != 200:
            raise RegistryError(f"image {self.ref}: config blob answered {response.status_code}")
        verify_digest(response.content, descriptor.digest, f"config of {self.ref}")
        return response.content

    async def fetch_layer(self, layer: Descriptor, progress: LayerProgress) -> LayerBlob:
        async with self._cache.lock(layer.digest):
            if self._cache.has(layer.digest):
                progress(layer.size)
                return LayerBlob(self._cache.blob_path(layer.digest), from_cache=True)
            partial, offset = self._cache.prepare_partial(layer.digest)
            if offset >= layer.size > 0:  # a complete download that was never committed
                return LayerBlob(await self._cache.commit(layer.digest, f"layer {layer.digest}"), False)
            await self._download(layer, partial, offset, progress)
            return LayerBlob(
                await self._cache.commit(layer.digest, f"layer {layer.digest} of {self.ref}"),
                from_cache=False,
            )

    async def _download(self, layer: Descriptor, partial: Path, offset: int, progress: LayerProgress) -> None:
        url = f"{self._base}/blobs/{layer.digest}"
        for attempt in range(2):
            headers = self._headers({"Range": f"bytes={offset}-"} if offset else None)
            try:
                async with self._http.stream("GET", url, headers=headers) as response:
                    if response.status_code == 401 and attempt == 0:
                        await self._auth.answer_challenge(response)
                        continue
                    if response.status_code == 404:
                        raise ImageNotFound(f"layer {layer.digest} of {self.ref} is missing in the registry")
                    if response.status_code not in (200, 206):
                        raise RegistryError(
                            f"registry {self.ref.registry} answered {response.status_code} "
                            f"for layer {layer.digest}"
                        )
                    # 200 to a Range request: the registry restarts from byte 0.
                    mode = "ab" if response.status_code == 206 else "wb"
                    done = offset if response.status_code == 206 else 0
                    async with await trio.open_file(partial, mode) as out:
                        async for chunk in response.aiter_bytes(_CHUNK):
                            await out.write(chunk)
                            done += len(chunk)
                            progress(done)
                    return
            except httpx.HTTPError as exc:
                raise RegistryError(
                    f"download of layer {layer.digest} from {self.ref.registry} failed "
                    f"after {offset} bytes (it resumes on the next build): {exc}"
                ) from exc
        raise RegistryAuthError(f"registry {self.ref.registry} denied access to layer {layer.digest}")
