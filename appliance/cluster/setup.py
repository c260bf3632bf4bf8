"""Setting a node up for a cluster (`cube node setup`, called by `installer/install.sh --cluster`
and `--join`, and by the ISO's first boot): what it writes, rendered here so it can be tested
without systemd.

- a new cluster: this node hosts an etcd member: its config file (`etcd.yaml`: the v3 gRPC
  gateway enabled, which the appliance's client speaks; data under the appliance's state
  directory) and our systemd unit for it (`cube-etcd.service`), and a new cluster token;
- joining: the etcd endpoints and the cluster token given (a file, or CUBE_CLUSTER_TOKEN); with
  `--etcd-member INITIAL_CLUSTER` (what `etcdctl member add` printed) this node also hosts a new
  member of the existing etcd cluster (HA: three members), its config and unit as for a new one,
  `initial-cluster-state: existing`;
- both: the cluster keys in appliance.toml (`cluster_port`, where the other nodes call this one
  over TLS, among them), in a block of their own that a later setup replaces
  (an earlier assignment of the same key is commented out: TOML refuses a key twice).
The token is written to a file only its owner can read and is never printed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from appliance.cluster.node import read_token
from appliance.config import Config

BLOCK_BEGIN = "# >>> cluster (written by `cube node setup`; run it again to change) >>>"
BLOCK_END = "# <<< cluster <<<"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_UNIT_NAME = "cube-etcd.service"
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class SetupError(ValueError):
    pass


def parse_endpoints(text: str) -> list[str]:
    """etcd client URLs, comma-separated: each `http(s)://host:port`, nothing else."""
    endpoints = [e.strip() for e in text.split(",") if e.strip()]
    if not endpoints:
        raise SetupError("no etcd endpoints given (http://HOST:2379,...)")
    for endpoint in endpoints:
        try:
            parts = urlsplit(endpoint)
            port = parts.port
        except ValueError as exc:
            raise SetupError(f"bad etcd endpoint {endpoint!r}: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise SetupError(f"bad etcd endpoint {endpoint!r}: use http://HOST:PORT or https://HOST:PORT")
        if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise SetupError(f"bad etcd endpoint {endpoint!r}: no credentials, path or query")
    return [e.rstrip("/") for e in endpoints]


def check_node_id(node_id: str) -> str:
    if not _NODE_ID.match(node_id):
        raise SetupError(
            f"bad node id {node_id!r}: 1-63 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
        )
    return node_id


def check_address(address: str) -> str:
    """The address the other nodes reach this one at: an IP address, not loopback or unspecified."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise SetupError(
            f"bad address {address!r}: give this node's IP address on the cluster's network"
        ) from exc
    if ip.is_unspecified:
        raise SetupError(f"bad address {address!r}: give this node's own IP address, not {address}")
    return address


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def check_initial_cluster(text: str, name: str, peer: str) -> str:
    """`etcdctl member add`'s ETCD_INITIAL_CLUSTER (`name=http://HOST:PORT,...`): well formed and
    naming this member at its own peer URL (else etcd would refuse to start, or join as another)."""
    members = {}
    for part in (p.strip() for p in text.strip().strip('"').split(",") if p.strip()):
        member, _, url = part.partition("=")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SetupError(f"bad --etcd-member entry {part!r}: {exc}") from exc
        if not _NODE_ID.match(member) or parts.scheme not in ("http", "https") or port is None:
            raise SetupError(f"bad --etcd-member entry {part!r}: use NAME=http://HOST:PORT,...")
        members[member] = url.rstrip("/")
    if members.get(name) != peer:
        raise SetupError(
            f"--etcd-member must name this member {name}={peer} (run `etcdctl member add {name}"
            f" --peer-urls={peer}` and pass the ETCD_INITIAL_CLUSTER it prints)"
        )
    return ",".join(f"{member}={url}" for member, url in members.items())


def etcd_config_text(
    name: str,
    data_dir: Path,
    address: str,
    client_port: int = ETCD_CLIENT_PORT,
    peer_port: int = ETCD_PEER_PORT,
    initial_cluster: str | None = None,
) -> str:
    """etcd 3.4's config file for the first member of a new cluster at `address` (also serving
    clients on loopback), or with `initial_cluster` (`etcdctl member add`'s) a member added to an
    existing one. From a config file etcd serves the JSON gateway only when told to."""
    client = f"http://{_host(address)}:{client_port}"
    peer = etcd_peer_url(address, peer_port)
    listen_clients = (
        client if ipaddress.ip_address(address).is_loopback else f"{client},http://127.0.0.1:{client_port}"
    )
    values = {
        "name": name,
        "data-dir": str(data_dir),
        "listen-client-urls": listen_clients,
        "advertise-client-urls": client,
        "listen-peer-urls": peer,
        "initial-advertise-peer-urls": peer,
        "initial-cluster": initial_cluster or f"{name}={peer}",
        "initial-cluster-state": "existing" if initial_cluster else "new",
        "initial-cluster-token": f"cube-{name}",
        "enable-grpc-gateway": True,
    }
    lines = ["# etcd member of the Cube appliance's cluster (docs/CLUSTER.md); written by `cube node setup`."]
    lines += [f"{key}: {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def etcd_peer_url(address: str, peer_port: int = ETCD_PEER_PORT) -> str:
    return f"http://{_host(address)}:{peer_port}"


def etcd_unit_text(etcd: Path, config_file: Path, data_dir: Path) -> str:
    return f"""[Unit]
Description=etcd member of the Cube appliance's cluster (docs/CLUSTER.md)
Documentation=man:etcd
After=network-online.target
Wants=network-online.target
Before=cube.service

[Service]
Type=notify
ExecStart={etcd} --config-file {config_file}
Restart=on-failure
RestartSec=5
LimitNOFILE=65536
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={data_dir}

[Install]
WantedBy=multi-user.target
"""


def with_cluster_config(text: str, values: dict[str, str | int]) -> str:
    """appliance.toml's `text` with `values` in the cluster block (replacing an earlier block; an
    assignment of one of those keys outside it commented out), before the first table."""
    kept: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.strip() == BLOCK_BEGIN:
            inside = True
        elif line.strip() == BLOCK_END:
            inside = False
        elif not inside:
            key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
            kept.append(f"# {line}  (set in the cluster block)" if key in values else line)
    block = [BLOCK_BEGIN, *(f"{key} = {json.dumps(value)}" for key, value in values.items()), BLOCK_END]
    first_table = next((i for i, line in enumerate(kept) if line.lstrip().startswith("[")), None)
    if first_table is None:
        while kept and not kept[-1].strip():
            kept.pop()
        lines = [*kept, "", *block]
    else:
        lines = [*kept[:first_table], *block, "", *kept[first_table:]]
    result = "\n".join(lines) + "\n"
    tomllib.loads(result)  # what we write parses
    return result


def write_private(path: Path, text: str) -> None:
    """`text` in a new file only its owner may read, renamed over `path` (never through a link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def new_token() -> str:
    return secrets.token_hex(32)


def _token(token_file: Path, generate: bool) -> str:
    """The cluster token: the file's if it exists (checked: 0600, long enough), else
    CUBE_CLUSTER_TOKEN's, else (a new cluster) a new one; written to the file if it was not."""
    if token_file.exists():
        return read_token(token_file)
    token = os.environ.get("CUBE_CLUSTER_TOKEN", "").strip()
    if not token and not generate:
        raise SetupError(
            f"joining needs the cluster's token: --token-file with a copy of the first node's"
            f" {token_file.name} (mode 0600), or CUBE_CLUSTER_TOKEN in the environment"
        )
    if token and len(token) < 32:
        raise SetupError("CUBE_CLUSTER_TOKEN is too short (at least 32 characters)")
    token = token or new_token()
    write_private(token_file, token + "\n")
    return token


def setup_node(
    config: Config,
    config_path: Path,
    address: str | None,
    endpoints: str | None,
    *,
    node_id: str | None = None,
    node_address: str | None = None,
    token_file: Path | None = None,
    etcd_dir: Path | None = None,
    etcd_config: Path | None = None,
    etcd_unit: Path = Path("/etc/systemd/system") / ETCD_UNIT_NAME,
    etcd_client_port: int = ETCD_CLIENT_PORT,
    etcd_peer_port: int = ETCD_PEER_PORT,
    etcd_member: str | None = None,
) -> list[str]:
    """Write what the node needs (module docstring); what was written, one line each."""
    config_path = config_path.resolve()  # the file an operator's link names (the ISO's /etc/cube)
    if (address is None) == (endpoints is None):
        raise SetupError(
            "give either --new ADDRESS (a new cluster, its etcd member here) or --join ENDPOINTS"
        )
    name = check_node_id(node_id or socket.gethostname())
    reached_at = node_address or address
    if reached_at is None:
        raise SetupError("--join needs --node-address: this node's IP address the other nodes reach it at")
    check_address(reached_at)
    if address is not None:
        check_address(address)
        endpoint_list = [f"http://{_host(address)}:{etcd_client_port}"]
    else:
        endpoint_list = parse_endpoints(endpoints or "")
    initial_cluster = None
    if etcd_member is not None:
        if address is not None:
            raise SetupError("--etcd-member goes with --join (--new makes the first member itself)")
        initial_cluster = check_initial_cluster(etcd_member, name, etcd_peer_url(reached_at, etcd_peer_port))
    etc = config_path.parent
    token_file = token_file or etc / "cluster-token"
    _token(token_file, generate=address is not None)
    written = [f"cluster token: {token_file} (0600)"]
    member_at = address or (reached_at if initial_cluster else None)
    if member_at is not None:
        data_dir = etcd_dir or config.state_dir / "etcd"
        config_file = etcd_config or etc / "etcd.yaml"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        rendered = etcd_config_text(
            name, data_dir, member_at, etcd_client_port, etcd_peer_port, initial_cluster
        )
        write_public(config_file, rendered)
        etcd = Path(shutil.which("etcd") or "/usr/bin/etcd")
        write_public(etcd_unit, etcd_unit_text(etcd, config_file, data_dir))
        written += [f"etcd config: {config_file} (data in {data_dir})", f"etcd unit: {etcd_unit}"]
    values: dict[str, str | int] = {
        "api_host": "::" if ":" in reached_at else "0.0.0.0",  # the other nodes call this one
        "etcd_endpoints": ",".join(endpoint_list),
        "node_id": name,
        "node_url": f"http://{_host(reached_at)}:{config.api_port}",
        # The other nodes call this one here only, over TLS (cluster/tls.py).
        "cluster_port": config.cluster_port,
        "cluster_token_file": str(token_file),
    }
    text = config_path.read_text() if config_path.exists() else ""
    write_public(config_path, with_cluster_config(text, values))
    written.append(
        f"config: {config_path} (node {name} at {values['node_url']}, etcd {values['etcd_endpoints']};"
        f" the other nodes reach it at https://{_host(reached_at)}:{config.cluster_port}: open that port"
        " to them)"
    )
    return written
