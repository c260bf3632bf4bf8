"""Templates: the root filesystem image and the metadata a sandbox is started from.

Where things are:
  (TemplateManifest, what a built template is on disk, is in appliance/records.py)
  catalog.py         lookup by id/alias, versions, publish, delete, garbage collection
  builds.py          TemplateBuilds: the build service (jobs run in its nursery)
  jobs.py            BuildJob, phases, JSON persistence under <state_dir>/template-builds
  api.py             HTTP blueprint (the `cube tpl` build verbs: appliance/cli/templates.py)
  build_caches.py    size cap + least-recently-used eviction of the layer and step caches
  requests.py        build requests and template settings, validated
  sandbox_steps.py   what the service provides for BOOTING/PROBING/finalize and Dockerfile RUN
                     (the cubelet's implementation: appliance/cubelet/template_sandboxes.py)
  guest_diff.py      run in a RUN step's guest: what the command changed, as a layer
From images:
  reference.py       image references (registry, oci:, oci-archive:, docker-archive:)
  registry.py, registry_auth.py   distribution v2 client, bearer/basic auth
  manifests.py       manifests, indexes, configs, platform choice
  image_source.py    what every source hands a build; index -> linux/amd64 manifest -> config
  archives.py        local layouts and archives
  layer_cache.py     verified blobs by digest, resumable
  pull.py            PULLING + UNPACKING for a job
  unpack.py          applying layers (whiteouts, opaque dirs, ownership, xattrs, devices)
Finishing:
  guest_setup.py     agent, init, start script, accounts, DNS injected into every rootfs
  ext4.py            rootfs.ext4 via mkfs.ext4 -d
  probe.py           readiness probe
Dockerfiles:
  dockerfile.py, dockerignore.py, build_context.py, step_cache.py, dockerfile_build.py
  (multi-stage, COPY --from, ADD of URLs and local archives, LABEL into the template's labels)
The default Debian-recipe template: default.py.
"""
