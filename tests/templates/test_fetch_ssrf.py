"""`ADD <url>` runs on the host: it must not reach what only the host can (#14 item 5).

The "forbidden" targets are HTTP servers on 127.0.0.1 that record every request; a second server
on 127.0.0.2 stands for a public host where the test needs one (the config opens only that
address). No request is ever sent anywhere but loopback: the address checks for private,
link-local and metadata ranges are tested as a table, without traffic.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from host_standins import build_context_dir
from registry_world import RecordingServer, Respond, send

from appliance.config import Config
from appliance.templates.builds import TemplateBuilds
from appliance.templates.fetch import refusal
from appliance.templates.jobs import BuildJob, Phase

Servers = Callable[..., RecordingServer]
PUBLIC_STAND_IN = "127.0.0.2"
ALLOW_STAND_IN = {"build_fetch_allow": f"{PUBLIC_STAND_IN}/32"}


@pytest.fixture
def servers() -> Iterator[Servers]:
    started: list[RecordingServer] = []

    def start(respond: Respond, address: str = "127.0.0.1") -> RecordingServer:
        started.append(RecordingServer(respond, address))
        return started[-1]

    yield start
    for server in started:
        server.close()


async def add_url(builds: TemplateBuilds, scratch: Path, url: str) -> BuildJob:
    context = scratch / "ctx"
    context.mkdir(exist_ok=True)
    return await build_context_dir(builds, context, f"FROM scratch\nADD {url} /downloaded\n")


def assert_refused(job: BuildJob, config: Config, reason: str) -> None:
    assert job.phase == Phase.FAILED, "the download went through"
    assert reason in job.reason, job.reason
    assert not (config.templates_dir / job.template_id).exists()
    assert not any((config.cache_dir / "build-work").glob("job-*")), "the build's files are gone"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433", "127.1"],
)
async def test_add_url_to_a_loopback_address_is_refused(
    builds: TemplateBuilds,
    config: Config,
    scratch: Path,
    servers: Servers,
    host: str,
) -> None:
    target = servers(send(200, b"host-only secret"))
    port = target.http.server.server_address[1]
    job = await add_url(builds, scratch, f"http://{host}:{port}/secret")
    assert_refused(job, config, "refused:")
    assert "loopback" in job.reason
    assert target.paths == [], "nothing may reach the forbidden server"


@pytest.mark.parametrize("config_extra", [ALLOW_STAND_IN])
@pytest.mark.parametrize("location", ["http://127.0.0.1:{port}/secret", "http://localhost:{port}/secret"])
async def test_a_redirect_to_a_forbidden_address_is_refused(
    builds: TemplateBuilds,
    config: Config,
    scratch: Path,
    servers: Servers,
    location: str,
) -> None:
    target = servers(send(200, b"host-only secret"))
    port = target.http.server.server_address[1]
    public = servers(send(302, headers={"Location": location.format(port=port)}), PUBLIC_STAND_IN)
    job = await add_url(builds, scratch, f"{public.url}/file")
    assert_refused(job, config, "refused:")
    assert public.paths == ["/file"] and target.paths == []


@pytest.mark.parametrize("config_extra", [ALLOW_STAND_IN])
async def test_redirects_are_bounded_and_only_to_http(
    builds: TemplateBuilds, config: Config, scratch: Path, servers: Servers
) -> None:
    loop = servers(send(302, headers={"Location": "/again"}), PUBLIC_STAND_IN)
    job = await add_url(builds, scratch, f"{loop.url}/start")
    assert_refused(job, config, "more than 5 redirects")
    assert len(loop.paths) == 6
    to_file = servers(send(302, headers={"Location": "file:///etc/passwd"}), PUBLIC_STAND_IN)
    job = await add_url(builds, scratch, f"{to_file.url}/start")
    assert_refused(job, config, "only http and https URLs")


@pytest.mark.parametrize("config_extra", [{**ALLOW_STAND_IN, "build_fetch_max_size": "1M"}])
@pytest.mark.parametrize("declared", [True, False])
async def test_a_download_larger_than_the_cap_is_refused(
    builds: TemplateBuilds,
    config: Config,
    scratch: Path,
    servers: Servers,
    declared: bool,
) -> None:
    body = bytes(2 << 20)

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if declared:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass  # the client stopped reading
        handler.close_connection = True

    big = servers(respond, PUBLIC_STAND_IN)
    job = await add_url(builds, scratch, f"{big.url}/big")
    assert_refused(job, config, "than 1 MiB")


@pytest.mark.parametrize("config_extra", [{**ALLOW_STAND_IN, "build_fetch_timeout_s": "2"}])
async def test_a_download_that_never_ends_is_cut_off(
    builds: TemplateBuilds, config: Config, scratch: Path, servers: Servers
) -> None:
    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(600):  # a byte every 100 ms, for up to a minute
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client gave up, as it must
        handler.close_connection = True

    slow = servers(trickle, PUBLIC_STAND_IN)
    job = await add_url(builds, scratch, f"{slow.url}/slow")
    assert_refused(job, config, "took longer than 2s")


PUBLIC = ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34"]
REFUSED = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "fc00::1": "private",
    "fd00:ec2::254": "private",  # AWS's IPv6 metadata address
    "169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "100.64.0.1": "not a public address",  # shared address space (carrier NAT)
    "100.100.100.200": "not a public address",  # Alibaba Cloud metadata
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "255.255.255.255": "private",
    "240.0.0.1": "private",
    "192.0.2.1": "private",
    "198.18.0.1": "private",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped
    "::ffff:169.254.169.254": "link-local",
    "2002:a9fe:a9fe::1": "link-local",  # 6to4 of 169.254.169.254
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
}


def test_which_addresses_are_refused() -> None:
    for text in PUBLIC:
        assert refusal(ipaddress.ip_address(text)) is None, text
    for text, reason in REFUSED.items():
        found = refusal(ipaddress.ip_address(text))
        assert found is not None and reason in found, (text, found)
    allowed = (ipaddress.ip_network("127.0.0.0/8"),)
    assert refusal(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert refusal(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) is None
    assert refusal(ipaddress.ip_address("10.0.0.1"), allowed) is not None
