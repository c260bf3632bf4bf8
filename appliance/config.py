"""The appliance's one configuration file (/etc/cube/appliance.toml) with env overrides.

Every key can be overridden by an environment variable `CUBE_<KEY>` (upper case),
which is how tests and the installer point a service at private directories.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/cube/appliance.toml")
# The checkout's image/ directory (kernel config fragments, rootfs recipes). A
# non-editable install has none beside the package: CUBE_IMAGE_DIR points it at one.
IMAGE_DIR = Path(os.environ.get("CUBE_IMAGE_DIR") or Path(__file__).resolve().parents[1] / "image")


@dataclass(frozen=True)
class Config:
    # Where things live.
    state_dir: Path = Path("/var/lib/cube")  # SQLite store, templates, CA, per-sandbox dirs
    cache_dir: Path = Path("/var/cache/cube")  # kernels, base images, layer cache (rebuildable)
    run_dir: Path = Path("/run/cube")  # sockets, pid file

    # Control plane and sandbox router.
    api_host: str = "127.0.0.1"
    api_port: int = 3000
    tls_port: int = 3443  # Host-routed `<port>-<id>.<domain>` traffic, appliance CA
    domain: str = "cube.local"
    # Any non-empty API key is accepted. Only allowed while api_host is loopback.
    local_dev: bool = False

    # Sandboxes.
    runtime: str = "auto"  # auto | uml | kvm
    default_template: str = "code-interpreter"
    default_timeout_s: int = 300
    pool_size: int = -1  # warm instances per template; -1 = sized to memory and demand (cubelet/pools.py)
    memory_budget_mb: int = -1  # memory all sandboxes may use; -1 = 75 % of MemTotal
    uml_kernel: Path | None = None  # None = built kernel from cache_dir, else Debian's linux.uml
    kvm_guest_kernel: Path | None = None
    uid_base: int = 200000  # sandbox N runs as uid_base + slot
    # UML boot limits (a pool refill, at low CPU weight, gets three times each). Raise both
    # on a software-emulated host (qemu TCG), where a guest boots in minutes.
    uml_first_output_timeout_s: int = 20  # nothing on the console by then: a hung launch
    uml_boot_timeout_s: int = 60  # launch to the guest agent answering
    # The longest a guest's agent may take to answer: a create's /init; a health probe gets a
    # fifth of it (three in a row unanswered: the guest counts as hung), a readiness probe while
    # it boots a tenth. Raise it with the boot limits on a software-emulated host.
    guest_agent_timeout_s: int = 10
    # kvm: launch (or restore) to the guest agent answering, and, for the boot that makes a
    # template's snapshot, to its default kernel answering. Raise it on an emulated host.
    kvm_boot_timeout_s: int = 60
    # Live (running or paused) sandboxes one team may have at once; a create past it is a 429.
    # 0: no cap. The admin token is not capped (the memory budget still is).
    max_sandboxes_per_team: int = 100
    # What one volume (`/volumes`, master/volumes.py) may hold, in MiB.
    volume_max_mb: int = 1024
    # Per-sandbox IO ceiling on the disk holding state_dir (cgroup v2 io.max, else v1 blkio),
    # for reads and writes each; 0 = unlimited.
    uml_io_bps_max: int = 256 << 20
    uml_io_iops_max: int = 8000

    # Network (CubeVS).
    host_network: str = "10.213.0.0/16"  # one /30 per sandbox slot for the host<->netns veth
    allow_unenforced_network: bool = False  # start sandboxes even when eBPF cannot be loaded
    # CIDRs (comma-separated) taken out of the always-blocked set (other sandboxes, this host,
    # link-local/metadata, loopback, private ranges), e.g. a LAN service sandboxes may use. Only
    # this key opens them; a sandbox's own allowOut never does. The most specific entry wins:
    # "10.0.0.0/8" here leaves host_network and the host's own addresses blocked.
    operator_open_networks: str = ""
    # What the egress proxy verifies ruled hosts' HTTPS certificates against (it resolves
    # secrets inside that TLS): unset, the host's trust store; set, only this PEM file's CAs.
    egress_upstream_ca_file: Path | None = None

    # Cluster (docs/CLUSTER.md): off unless etcd_endpoints names etcd's client URLs (comma-separated).
    etcd_endpoints: str = ""
    node_id: str = ""  # this node's name in the cluster; "" = the host's name
    node_url: str = ""  # where the other nodes reach this node's API; "" = http://<api_host>:<bound port>
    cluster_token_file: Path | None = None  # the secret every node of the cluster shares (mode 0600)
    # The other nodes call this node here only: mutual TLS, certificates from the CA every node
    # derives from the cluster token (cluster/tls.py); on api_host. 0 = any free port.
    cluster_port: int = 3444
    node_lease_ttl_s: int = 10  # a node that stops renewing its lease leaves the cluster after this
    # A secured etcd: the CA its https:// endpoints are verified by (None: the system's), a client
    # certificate and key (etcd's --client-cert-auth), a user whose password is in a 0600 file.
    etcd_ca_file: Path | None = None
    etcd_cert_file: Path | None = None
    etcd_key_file: Path | None = None
    etcd_user: str = ""
    etcd_password_file: Path | None = None

    extra: dict[str, str] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "cube.db"

    @property
    def templates_dir(self) -> Path:
        return self.state_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"


def _coerce(value: str, annotation: str) -> object:
    if "bool" in annotation:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if "int" in annotation:
        return int(value)
    if "Path" in annotation:
        return Path(value) if value else None
    return value


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if present), then apply `CUBE_*` environment overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path or Path(environ.get("CUBE_CONFIG", DEFAULT_CONFIG_PATH))
    raw: dict[str, object] = {}
    if path.exists():
        with path.open("rb") as f:
            raw = tomllib.load(f)
    values: dict[str, object] = {}
    extra: dict[str, str] = {}
    fields = {f.name: str(f.type) for f in dataclasses.fields(Config)}
    for key, value in raw.items():
        if key in fields and key != "extra":
            values[key] = _coerce(str(value), fields[key]) if not isinstance(value, bool | int) else value
        else:
            extra[key] = str(value)
    for name, annotation in fields.items():
        env_value = environ.get(f"CUBE_{name.upper()}")
        if env_value is not None and name != "extra":
            values[name] = _coerce(env_value, annotation)
    values["extra"] = extra
    return Config(**values)  # type: ignore[arg-type]
