"""OCI distribution (registry v2) client: manifests, configs and layer blobs, on Trio via httpx.

A registry is reached over https unless the operator listed it in `insecure_registries`; what it
sends is bounded (manifests and configs in memory, each layer to its declared size and
`build_layer_max_size`). Credentials go only to the registry itself (httpx drops the
Authorization header on a redirect to another origin) and to a token realm over https (see
registry_auth).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import httpx
import trio

from appliance.config import Config
from appliance.templates.image_source import LayerBlob, LayerProgress, ResolvedImage, resolve_manifests
from appliance.templates.layer_cache import LayerCache
from appliance.templates.limits import config_list
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
_MAX_DOCUMENT_BYTES = 4 << 20  # a manifest, index or config (containerd's limit for manifests)


class RegistryError(Exception):
    pass


class ImageNotFound(RegistryError):
    pass


def registry_base_url(host: str, insecure_registries: frozenset[str]) -> str:
    """https, except for the registries the operator listed as plain HTTP (loopback ones too: a
    build request must not make the host talk plain HTTP to its own services)."""
    return f"{'http' if host in insecure_registries else 'https'}://{host}"


def insecure_registries(config: Config) -> frozenset[str]:
    """Registries (and token services) served over plain HTTP: `insecure_registries =
    "host:port,..."` in the config file."""
    return frozenset(config_list(config, "insecure_registries"))


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
        self._http = httpx.AsyncClient(timeout=_TIMEOUT, follow_redirects=True, trust_env=False)
        self._auth = RegistryAuth(self._http, ref.registry, ref.repository, credentials, insecure_registries)

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

    async def _get_document(self, url: str, headers: dict[str, str]) -> httpx.Response:
        """GET a manifest or config, its body read into memory up to _MAX_DOCUMENT_BYTES."""
        async with self._http.stream("GET", url, headers=headers) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes(_CHUNK):
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    limit = _MAX_DOCUMENT_BYTES >> 20
                    raise RegistryError(f"registry {self.ref.registry} sent more than {limit} MiB for {url}")
        return httpx.Response(
            response.status_code, headers=response.headers, content=bytes(body), request=response.request
        )

    async def _get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET with one retry after answering an auth challenge."""
        for attempt in range(2):
            try:
                response = await self._get_document(url, self._headers(headers))
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

    async def _save_blob(
        self, response: httpx.Response, layer: Descriptor, partial: Path, offset: int, progress: LayerProgress
    ) -> None:
        """The body into the partial file, never more than the layer's declared size (what is
        beyond cannot match the digest: the partial goes and the build fails)."""
        # 200 to a Range request: the registry restarts from byte 0.
        mode = "ab" if response.status_code == 206 else "wb"
        done = offset if response.status_code == 206 else 0
        async with await trio.open_file(partial, mode) as out:
            async for chunk in response.aiter_bytes(_CHUNK):
                done += len(chunk)
                if done > layer.size:
                    await out.aclose()
                    partial.unlink(missing_ok=True)
                    raise RegistryError(
                        f"registry {self.ref.registry} sent more than the {layer.size} bytes of layer "
                        f"{layer.digest}"
                    )
                await out.write(chunk)
                progress(done)

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
                    await self._save_blob(response, layer, partial, offset, progress)
                    return
            except httpx.HTTPError as exc:
                raise RegistryError(
                    f"download of layer {layer.digest} from {self.ref.registry} failed "
                    f"after {offset} bytes (it resumes on the next build): {exc}"
                ) from exc
        raise RegistryAuthError(f"registry {self.ref.registry} denied access to layer {layer.digest}")
