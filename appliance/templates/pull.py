"""PULLING and UNPACKING: from an image reference to a root filesystem directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from appliance.errors import first_leaf
from appliance.templates.archives import open_local_source
from appliance.templates.image_source import ImageSource, ResolvedImage
from appliance.templates.jobs import PHASE_PROGRESS, BuildJob, JobStore, Phase
from appliance.templates.layer_cache import LayerCache
from appliance.templates.limits import BuildLimits, SizeBudget
from appliance.templates.manifests import Descriptor, ManifestError
from appliance.templates.reference import LocalReference, parse_image_reference
from appliance.templates.registry import RegistryImageSource
from appliance.templates.registry_auth import Credentials
from appliance.templates.unpack import apply_layer

_PARALLEL_DOWNLOADS = 3


@asynccontextmanager
async def open_image(
    image: str,
    work_dir: Path,
    cache: LayerCache,
    credentials: Credentials | None = None,
    insecure_registries: frozenset[str] = frozenset(),
    limits: BuildLimits | None = None,
) -> AsyncIterator[ImageSource]:
    """The source for an image reference: a registry, or a local layout/archive (extracted into work_dir)."""
    reference = parse_image_reference(image)
    if isinstance(reference, LocalReference):
        yield await open_local_source(reference, work_dir, limits or BuildLimits())
        return
    async with RegistryImageSource(reference, cache, credentials, insecure_registries) as source:
        yield source


def check_layer_sizes(image: ResolvedImage, limits: BuildLimits) -> None:
    for layer in image.layers:
        if layer.size > limits.layer_bytes:
            raise ManifestError(
                f"image {image.name}: layer {layer.digest} is {layer.size >> 20} MiB, more than "
                f"{limits.layer_bytes >> 20} MiB (build_layer_max_size in the config file)"
            )


async def fetch_and_unpack(
    store: JobStore,
    job: BuildJob,
    source: ImageSource,
    image: ResolvedImage,
    rootfs: Path,
    limits: BuildLimits | None = None,
) -> None:
    """PULLING (layers in parallel, into the cache) then UNPACKING (in order) into the empty dir `rootfs`.

    Refused: a layer larger than `limits.layer_bytes`, layers that decompress to more than
    `limits.unpacked_bytes` together."""
    limits = limits or BuildLimits()
    check_layer_sizes(image, limits)
    job.layers = [{"digest": d.digest, "size": d.size, "done": 0, "cached": False} for d in image.layers]
    store.set_progress(
        job, PHASE_PROGRESS[Phase.PULLING], f"pulling {len(image.layers)} layers of {image.name}"
    )
    total = sum(d.size for d in image.layers) or 1
    pulled_end = PHASE_PROGRESS[Phase.UNPACKING]
    blobs: list[Path | None] = [None] * len(image.layers)
    limiter = trio.CapacityLimiter(_PARALLEL_DOWNLOADS)

    async def fetch(index: int, layer: Descriptor) -> None:
        record = job.layers[index]

        def progress(done: int) -> None:
            record["done"] = done
            fetched = sum(int(r["done"]) for r in job.layers)
            store.set_progress(job, pulled_end * min(1.0, fetched / total))

        async with limiter:
            blob = await source.fetch_layer(layer, progress)
        record["cached"] = blob.from_cache
        blobs[index] = blob.path
        how = "from cache" if blob.from_cache else "downloaded"
        store.log(job, f"layer {layer.digest[:19]} {layer.size} bytes ({how})")

    try:
        async with trio.open_nursery() as nursery:
            for index, layer in enumerate(image.layers):
                nursery.start_soon(fetch, index, layer)
    except ExceptionGroup as group:
        raise first_leaf(group) from None  # the first failed layer is the reason; the others were cancelled

    store.set_phase(job, Phase.UNPACKING, f"applying {len(image.layers)} layers")
    span = PHASE_PROGRESS[Phase.BUILDING] - PHASE_PROGRESS[Phase.UNPACKING]
    diff_ids = image.config.diff_ids
    budget = SizeBudget(limits.unpacked_bytes, f"image {image.name} unpacked", "build_unpacked_max_size")
    if len(diff_ids) != len(image.layers):
        raise ManifestError(
            f"{image.name}: {len(image.layers)} layers but {len(diff_ids)} diff_ids in its config"
        )
    for index, (layer, blob) in enumerate(zip(image.layers, blobs, strict=True)):
        assert blob is not None
        what = f"layer {index + 1} ({layer.digest}) of {image.name}"
        await trio.to_thread.run_sync(apply_layer, rootfs, blob, diff_ids[index], what, budget)
        store.set_progress(job, PHASE_PROGRESS[Phase.UNPACKING] + span * (index + 1) / len(image.layers))


async def pull_image(
    store: JobStore,
    job: BuildJob,
    image: str,
    rootfs: Path,
    work_dir: Path,
    cache: LayerCache,
    credentials: Credentials | None = None,
    insecure_registries: frozenset[str] = frozenset(),
    limits: BuildLimits | None = None,
) -> ResolvedImage:
    """Resolve `image` (linux/amd64), fetch its layers and apply them to the empty dir `rootfs`."""
    async with open_image(image, work_dir, cache, credentials, insecure_registries, limits) as source:
        store.set_phase(job, Phase.PULLING, f"resolving {image}")
        resolved = await source.resolve()
        await fetch_and_unpack(store, job, source, resolved, rootfs, limits)
        return resolved
