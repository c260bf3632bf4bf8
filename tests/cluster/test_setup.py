"""Setting a node up for a cluster without systemd: `installer/install.sh`'s cluster options
refused when wrong (before it does anything), and `cube node setup` (what the installer's
--cluster / --join and the ISO's first boot run): the config it writes parses into a cluster node's
settings, the token file is private and never printed, and etcd started from the rendered config
file serves the JSON gateway the appliance's client speaks."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from click.testing import CliRunner
from freeports import free_ports

from appliance.cli.main import main
from appliance.cluster.etcd import EtcdClient
from appliance.cluster.node import ClusterSettings
from appliance.cluster.setup import BLOCK_BEGIN
from appliance.config import load_config

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "installer" / "install.sh"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "--join", "http://10.0.0.1:2379"], "--cluster (a new cluster) and --join"),
        (["--join"], "--join needs etcd client URLs"),
        (["--join", "ftp://10.0.0.1:2379"], "--join needs etcd client URLs"),
        (["--join", "http://10.0.0.1"], "--join needs etcd client URLs"),
        (["--advertise", "10.0.0.5"], "go with --cluster or --join"),
        (["--cluster", "--advertise", "node-a"], "--advertise needs this node's IP address"),
        (["--cluster", "--token-file", "/etc/hostname"], "--token-file goes with --join"),
        (["--join", "http://10.0.0.1:2379", "--token-file", "/nonexistent"], "no such readable file"),
        (["--cluster", "--etcd-member", "n1=http://10.0.0.1:2380"], "--etcd-member goes with --join"),
        (["--etcd-member", "n1=http://10.0.0.1:2380"], "go with --cluster or --join"),
    ],
)
def test_the_installer_refuses_wrong_cluster_options_before_doing_anything(
    args: list[str], message: str, tmp_path: Path
) -> None:
    # --root: were a refusal missed, it would install into tmp_path, never onto this host.
    root = tmp_path / "root"
    ran = subprocess.run(
        ["bash", str(INSTALLER), "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert message in ran.stderr
    assert not root.exists()


def setup(config: Path, *args: str, env: dict[str, str] | None = None, exit_code: int = 0) -> str:
    result = CliRunner().invoke(
        main, ["--config", str(config), "node", "setup", *args], env=env or {}, catch_exceptions=False
    )
    assert result.exit_code == exit_code, result.output
    return result.output


def test_a_new_cluster_s_config_etcd_file_and_unit(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "appliance.toml"
    config.parent.mkdir()
    shutil.copy(REPO / "installer" / "appliance.toml", config)
    client_port, peer_port = free_ports(2, range(32_000, 32_700))
    paths = {
        "--token-file": tmp_path / "etc" / "cluster-token",
        "--etcd-dir": tmp_path / "state" / "etcd",
        "--etcd-config": tmp_path / "etc" / "etcd.yaml",
        "--etcd-unit": tmp_path / "units" / "cube-etcd.service",
    }
    options = [str(x) for pair in paths.items() for x in pair]
    ports = ["--etcd-client-port", str(client_port), "--etcd-peer-port", str(peer_port)]
    output = setup(config, "--new", "127.0.0.1", "--node-id", "n1", *options, *ports)

    token_file = paths["--token-file"]
    token = token_file.read_text().strip()
    assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in output
    loaded = load_config(config, environ={})
    settings = ClusterSettings.from_config(loaded)
    assert settings is not None
    assert (settings.endpoints, settings.node_id, settings.token) == (
        [f"http://127.0.0.1:{client_port}"],
        "n1",
        token,
    )
    assert (loaded.api_host, loaded.node_url) == ("0.0.0.0", "http://127.0.0.1:3000")
    assert loaded.cluster_port == 3444 and "https://127.0.0.1:3444: open that port" in output
    text = config.read_text()
    assert '# api_host = "127.0.0.1"  (set in the cluster block)' in text
    assert stat.S_IMODE(paths["--etcd-dir"].stat().st_mode) == 0o700
    unit = paths["--etcd-unit"].read_text()
    assert (
        f"--config-file {paths['--etcd-config']}\n" in unit
        and f"ReadWritePaths={paths['--etcd-dir']}" in unit
    )

    # Again (the installer run twice): one block, the same token.
    setup(config, "--new", "127.0.0.1", "--node-id", "n1", *options, *ports)
    assert config.read_text().count(BLOCK_BEGIN) == 1 and token_file.read_text().strip() == token

    # etcd from the rendered file serves the JSON gateway (etcd 3.4 needs it enabled in a file).
    with etcd_from(paths["--etcd-config"], client_port, tmp_path / "etcd.log"):

        async def put_and_get() -> bytes | None:
            async with EtcdClient(settings.endpoints) as client:
                await client.put(b"/cube/setup-test", b"works")
                found = await client.get(b"/cube/setup-test")
                return found.value if found else None

        assert trio.run(put_and_get) == b"works"


@contextlib.contextmanager
def etcd_from(config_file: Path, client_port: int, log: Path) -> Iterator[None]:
    """etcd started from `config_file`, healthy on `client_port`; stopped when the block ends."""
    etcd = subprocess.Popen(
        [shutil.which("etcd") or "/usr/bin/etcd", "--config-file", str(config_file)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert etcd.poll() is None, log.read_text()[-2000:]
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{client_port}/health", trust_env=False).json()["health"]
                    == "true"
                ):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        yield
    finally:
        etcd.terminate()
        etcd.wait(timeout=30)


def test_a_joining_node_hosts_a_new_member_of_the_etcd_cluster(etcd_of: Any, tmp_path: Path) -> None:
    """`--join --etcd-member` (HA): after `etcdctl member add`, the joining node's etcd starts from
    the rendered file as a member of the existing cluster and serves its data; a wrong
    INITIAL_CLUSTER is refused before anything is written."""
    first = etcd_of.members[0]
    config = tmp_path / "etc" / "appliance.toml"
    config.parent.mkdir()
    shutil.copy(REPO / "installer" / "appliance.toml", config)
    client_port, peer_port = free_ports(2, range(32_000, 32_700))
    peer = f"http://127.0.0.1:{peer_port}"
    paths = {
        "--token-file": tmp_path / "etc" / "cluster-token",
        "--etcd-dir": tmp_path / "state" / "etcd",
        "--etcd-config": tmp_path / "etc" / "etcd.yaml",
        "--etcd-unit": tmp_path / "units" / "cube-etcd.service",
    }
    options = [str(x) for pair in paths.items() for x in pair]
    options += ["--etcd-client-port", str(client_port), "--etcd-peer-port", str(peer_port)]
    join = ["--join", first.client_url, "--node-address", "127.0.0.1", "--node-id", "n2", *options]
    env = {"CUBE_CLUSTER_TOKEN": "t" * 40}
    for wrong in (f"m0={first.peer_url}", f"m0={first.peer_url},n2=http://127.0.0.1:1", "n2"):
        refused = setup(config, *join, "--etcd-member", wrong, env=env, exit_code=1)
        assert "--etcd-member" in refused
    refused = setup(config, "--new", "127.0.0.1", "--etcd-member", f"n2={peer}", env=env, exit_code=1)
    assert "--etcd-member goes with --join" in refused
    assert not paths["--etcd-config"].exists() and not paths["--token-file"].exists()

    added = httpx.post(
        f"{first.client_url}/v3/cluster/member/add", json={"peerURLs": [peer]}, trust_env=False
    )
    assert added.status_code == 200, added.text
    setup(config, *join, "--etcd-member", f'"m0={first.peer_url},n2={peer}"', env=env)
    rendered = paths["--etcd-config"].read_text()
    assert 'initial-cluster-state: "existing"' in rendered
    assert f'initial-cluster: "m0={first.peer_url},n2={peer}"' in rendered
    assert f"--config-file {paths['--etcd-config']}" in paths["--etcd-unit"].read_text()

    async def put_at_first_get_at_new() -> bytes | None:
        async with (
            EtcdClient([first.client_url]) as old,
            EtcdClient([f"http://127.0.0.1:{client_port}"]) as new,
        ):
            await old.put(b"/cube/ha-test", b"replicated")
            found = await new.get(b"/cube/ha-test")
            return found.value if found else None

    with etcd_from(paths["--etcd-config"], client_port, tmp_path / "etcd.log"):
        assert trio.run(put_at_first_get_at_new) == b"replicated"
        # The new member publishes its name through the cluster once it runs (bounded: a raft write).
        deadline = time.monotonic() + 30
        while True:
            members = httpx.post(f"{first.client_url}/v3/cluster/member/list", json={}, trust_env=False)
            names = sorted(m.get("name", "") for m in members.json()["members"])
            if names == ["m0", "n2"]:
                break
            assert time.monotonic() < deadline, members.text
            time.sleep(0.1)


def test_joining_needs_the_token_and_valid_endpoints_and_never_prints_the_token(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('api_host = "127.0.0.1"\napi_port = 3100\n\n[extra]\nx = "1"\n')
    before = config.read_text()
    token_file = tmp_path / "cluster-token"
    join = ["--join", "http://10.0.0.1:2379,http://10.0.0.2:2379", "--node-address", "10.0.0.7"]
    refused = setup(config, *join, "--token-file", str(token_file), exit_code=1)
    assert "joining needs the cluster's token" in refused
    for bad, message in (
        (
            ["--join", "http://10.0.0.1:2379/v3", "--node-address", "10.0.0.7"],
            "no credentials, path or query",
        ),
        (
            ["--join", "http://u:p@10.0.0.1:2379", "--node-address", "10.0.0.7"],
            "no credentials, path or query",
        ),
        (["--join", "10.0.0.1:2379", "--node-address", "10.0.0.7"], "bad etcd endpoint"),
        (["--join", "http://10.0.0.1:2379"], "--join needs --node-address"),
        (["--join", "http://10.0.0.1:2379", "--node-address", "0.0.0.0"], "this node's own IP address"),
        ([*join, "--node-id", "../x"], "bad node id"),
        (["--new", "10.0.0.7", *join], "give either --new ADDRESS"),
    ):
        assert message in setup(config, *bad, "--token-file", str(token_file), exit_code=1), bad
    short = setup(
        config, *join, "--token-file", str(token_file), env={"CUBE_CLUSTER_TOKEN": "short"}, exit_code=1
    )
    assert "too short" in short
    assert config.read_text() == before and not token_file.exists()  # nothing written

    token = "t0ken-" + "x" * 40
    output = setup(
        config, *join, "--token-file", str(token_file), "--node-id", "n7", env={"CUBE_CLUSTER_TOKEN": token}
    )
    assert token not in output
    assert token_file.read_text().strip() == token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    loaded = load_config(config, environ={})
    assert loaded.etcd_endpoints == "http://10.0.0.1:2379,http://10.0.0.2:2379"
    assert (loaded.node_id, loaded.node_url, loaded.api_port) == ("n7", "http://10.0.0.7:3100", 3100)
    text = config.read_text()
    assert text.index(BLOCK_BEGIN) < text.index("[extra]")  # top-level keys, not the table's
    assert tomllib.loads(text)["extra"] == {"x": "1"}

    # A token file others can read is refused, and not rewritten.
    token_file.chmod(0o644)
    assert "readable by its owner only" in setup(config, *join, "--token-file", str(token_file), exit_code=1)


ISO_LIB = REPO / "image" / "iso" / "overlay" / "usr" / "lib" / "cube"


def first_boot(state: Path, cmdline: str, seed: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The ISO's cube-cluster.sh on `state` (CUBE-DATA) with this kernel command line and fw_cfg
    seed; its address given, systemctl a no-op (no systemd here), the checkout's `cube`."""
    (state / "cmdline").write_text(cmdline + "\n")
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "CUBE_STATE": str(state),
        "CUBE_CMDLINE": str(state / "cmdline"),
        "CUBE_SEED_DIR": str(seed or state / "no-seed"),
        "CUBE_ADDRESS": "10.0.0.7",
        "CUBE_SYSTEMCTL": "true",
        "CUBE": str(Path(sys.executable).parent / "cube"),
        "CUBE_ETCD_UNIT": str(state / "cube-etcd.service"),
    }
    return subprocess.run(
        [str(ISO_LIB / "cube-cluster.sh")], env=env, capture_output=True, text=True, timeout=120
    )


def iso_state(tmp_path: Path, name: str) -> Path:
    state = tmp_path / name
    state.mkdir()
    shutil.copy(ISO_LIB / "appliance.toml", state / "appliance.toml")
    return state


def test_the_iso_first_boot_choice_single_new_or_join(tmp_path: Path) -> None:
    single = iso_state(tmp_path, "single")
    before = (single / "appliance.toml").read_text()
    ran = first_boot(single, "boot=live components")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (single / "cluster-mode").read_text() == "mode=single\n"
    assert (single / "appliance.toml").read_text() == before and not (single / "cluster-token").exists()

    new = iso_state(tmp_path, "new")
    ran = first_boot(new, "boot=live components cube.cluster=new")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    token = (new / "cluster-token").read_text()
    assert stat.S_IMODE((new / "cluster-token").stat().st_mode) == 0o600 and token.strip() not in ran.stdout
    loaded = load_config(new / "appliance.toml", environ={})
    assert (loaded.etcd_endpoints, loaded.node_url) == ("http://10.0.0.7:2379", "http://10.0.0.7:3000")
    # Every ISO's host name is `cube`: each node gets a name of its own, chosen once.
    assert re.fullmatch(r"cube-[0-9a-f]{6}", loaded.node_id), loaded.node_id
    assert "enable-grpc-gateway: true" in (new / "etcd.yaml").read_text()
    assert f"--config-file {new / 'etcd.yaml'}" in (new / "cube-etcd.service").read_text()
    again = first_boot(new, "boot=live components")  # the next boot: the choice is kept
    assert again.returncode == 0, again.stdout + again.stderr
    assert (new / "cluster-token").read_text() == token and "a new cluster" in again.stdout
    assert load_config(new / "appliance.toml", environ={}).node_id == loaded.node_id

    joining = iso_state(tmp_path, "join")
    seed = tmp_path / "fw_cfg"
    (seed / "cluster").mkdir(parents=True)
    (seed / "cluster" / "raw").write_text(
        "mode=join\nnode=rack2-b\netcd=http://10.0.0.1:2379,http://10.0.0.2:2379\n"
    )
    (seed / "cluster-token").mkdir()
    (seed / "cluster-token" / "raw").write_text("s" * 48 + "\n")
    ran = first_boot(joining, "boot=live components", seed)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (joining / "cluster-token").read_text().strip() == "s" * 48 and "s" * 48 not in ran.stdout
    assert stat.S_IMODE((joining / "cluster-token").stat().st_mode) == 0o600
    loaded = load_config(joining / "appliance.toml", environ={})
    assert loaded.etcd_endpoints == "http://10.0.0.1:2379,http://10.0.0.2:2379"
    assert loaded.node_id == "rack2-b"
    assert not (joining / "etcd.yaml").exists()

    # Join named on the command line without endpoints: a single node for now, asked again next boot.
    unnamed = iso_state(tmp_path, "unnamed")
    ran = first_boot(unnamed, "boot=live cube.cluster=join")
    assert ran.returncode == 0 and "joining needs cube.etcd=ENDPOINTS" in ran.stdout

    # A node name that is no plain name is refused before anything is written.
    odd = iso_state(tmp_path, "odd")
    ran = first_boot(odd, "boot=live cube.cluster=new cube.node=../etc")
    assert ran.returncode == 0 and "bad node name ../etc" in ran.stdout, ran.stdout + ran.stderr
    assert not (odd / "cluster-mode").exists() and not (odd / "cluster-token").exists()
    assert not (unnamed / "cluster-mode").exists()


@pytest.fixture
def no_build_dir_left() -> Iterator[None]:
    """`pip install REPO` (what the installer runs) builds in the tree: build/ (git-ignored)."""
    existed = (REPO / "build").exists()
    yield
    if not existed:
        shutil.rmtree(REPO / "build", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CUBE_CLUSTER_FULL") != "1",
    reason="a real installer run (a venv, pip): CUBE_CLUSTER_FULL=1",
)
@pytest.mark.usefixtures("no_build_dir_left")
def test_the_installer_s_cluster_modes_in_a_root(tmp_path: Path) -> None:
    """install.sh --cluster, then --join with its token on another root, then --uninstall: under
    --root (no systemd, no start), so the host is never touched."""
    roots = {name: tmp_path / name for name in ("first", "second")}
    for root in roots.values():
        for directory in ("opt", "etc/systemd/system", "etc/logrotate.d", "usr/local/bin", "var/lib", "run"):
            (root / directory).mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}

    def install(root: Path, *args: str) -> str:
        ran = subprocess.run(
            ["bash", str(INSTALLER), "--root", str(root), "--no-build", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        return ran.stdout + ran.stderr

    first = roots["first"]
    output = install(first, "--cluster", "--advertise", "10.0.0.1", "--node-id", "n1")
    token = (first / "etc/cube/cluster-token").read_text().strip()
    assert len(token) == 64 and token not in output
    assert stat.S_IMODE((first / "etc/cube/cluster-token").stat().st_mode) == 0o600
    etcd_yaml = (first / "etc/cube/etcd.yaml").read_text()
    assert "enable-grpc-gateway: true" in etcd_yaml and f'data-dir: "{first}/var/lib/cube/etcd"' in etcd_yaml
    assert "ExecStart=" in (first / "etc/systemd/system/cube-etcd.service").read_text()
    loaded = load_config(first / "etc/cube/appliance.toml", environ={})
    assert (loaded.etcd_endpoints, loaded.node_id) == ("http://10.0.0.1:2379", "n1")

    second = roots["second"]
    output = install(
        second,
        "--join",
        "http://10.0.0.1:2379",
        "--advertise",
        "10.0.0.2",
        "--token-file",
        str(first / "etc/cube/cluster-token"),
    )
    assert token not in output
    assert (second / "etc/cube/cluster-token").read_text().strip() == token
    assert not (second / "etc/systemd/system/cube-etcd.service").exists()
    loaded = load_config(second / "etc/cube/appliance.toml", environ={})
    assert (loaded.etcd_endpoints, loaded.node_url) == ("http://10.0.0.1:2379", "http://10.0.0.2:3000")

    install(first, "--uninstall")
    assert not (first / "etc/systemd/system/cube-etcd.service").exists() and not (first / "etc/cube").exists()
