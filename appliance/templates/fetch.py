"""`ADD <url>` downloads, which run on the host: they must not become a way to read what only the
host can reach (its loopback services, the private network it sits in, cloud metadata).

Every hop is checked before it is sent: the URL's host is resolved here, and the request goes to
the address that was checked (the name stays in the Host header and TLS's SNI and certificate
check), so a DNS answer cannot change between the check and the connection. Refused: loopback,
private, link-local (169.254.169.254 and fe80::), shared (100.64/10), multicast, unspecified,
reserved and every other non-public address, IPv4-mapped/6to4/NAT64 IPv6 forms of them, and
Teredo; a name with any such address is refused as a whole. Redirects are followed by hand, each
checked the same way (at most MAX_REDIRECTS). The body is capped (`build_fetch_max_size`) and the
whole download bounded in time (`build_fetch_timeout_s`). The operator may open networks with
`build_fetch_allow` (a local mirror; the tests' loopback server).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from pathlib import Path

import httpx
import trio

from appliance.templates.limits import BuildLimits, IpNetwork
from appliance.templates.requests import redact_urls

MAX_REDIRECTS = 5
_CHUNK = 1 << 20
_TIMEOUT = httpx.Timeout(30.0, read=300.0)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchFailed(Exception):
    pass


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IpAddress, allow: tuple[IpNetwork, ...] = ()) -> str | None:
    """Why the host must not fetch from `address` (None: it is a public address, or allowed)."""
    if any(address.version == network.version and address in network for network in allow):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.teredo is not None:
            return "a Teredo tunnel address"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return refusal(embedded, allow)
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address (cloud metadata lives there)"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a public address"),
    )
    return next((reason for failed, reason in checks if failed), None)


async def public_address(host: str, port: int, allow: tuple[IpNetwork, ...]) -> str:
    """The address to connect to for `host`: every address it resolves to must be public (or
    allowed)."""
    try:
        addresses = [ipaddress.ip_address(host)]
        literal = True
    except ValueError:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise FetchFailed(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        literal = False
    if not addresses:
        raise FetchFailed(f"{host} has no address")
    for address in addresses:
        reason = refusal(address, allow)
        if reason is not None:
            subject = host if literal else f"{host} resolves to {address}"
            raise FetchFailed(
                f"refused: {subject}, {reason} (build_fetch_allow in the config file opens a network)"
            )
    return str(addresses[0])


async def _checked_get(client: httpx.AsyncClient, url: httpx.URL, limits: BuildLimits) -> httpx.Response:
    """Send GET `url` to the checked address; the caller reads and closes the response."""
    if url.scheme not in ("http", "https") or not url.host:
        raise FetchFailed(f"only http and https URLs can be fetched, not {redact_urls(str(url))}")
    port = url.port or (443 if url.scheme == "https" else 80)
    address = await public_address(url.host, port, limits.fetch_allow)
    host_header = url.host if url.port is None else f"{url.host}:{url.port}"
    if ":" in url.host:
        host_header = f"[{url.host}]" if url.port is None else f"[{url.host}]:{url.port}"
    request = client.build_request(
        "GET",
        url.copy_with(host=address),
        headers={"Host": host_header},
        extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
    )
    return await client.send(request, stream=True)


async def _save_body(response: httpx.Response, target: Path, limit: int) -> str:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FetchFailed(f"the file is {int(declared) >> 20} MiB, more than {limit >> 20} MiB")
    hasher, size = hashlib.sha256(), 0
    async with await trio.open_file(target, "wb") as out:
        async for chunk in response.aiter_bytes(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise FetchFailed(f"the file is larger than {limit >> 20} MiB (build_fetch_max_size)")
            hasher.update(chunk)
            await out.write(chunk)
    return "sha256:" + hasher.hexdigest()


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL:
    try:
        return current.join(location)
    except httpx.InvalidURL as exc:
        raise FetchFailed(f"the server redirected to an invalid URL: {exc}") from exc


async def fetch_to_file(url: str, target: Path, limits: BuildLimits) -> str:
    """Download `url` into `target`; returns its sha256 digest. Raises FetchFailed (its message
    without credentials or query strings)."""
    try:
        current = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FetchFailed(f"not a valid URL: {exc}") from exc
    with trio.move_on_after(limits.fetch_timeout_s) as deadline:
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT, follow_redirects=False, trust_env=False) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    response = await _checked_get(client, current, limits)
                    try:
                        if response.is_redirect and "location" in response.headers:
                            current = _redirect_target(current, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise FetchFailed(f"the server answered HTTP {response.status_code}")
                        return await _save_body(response, target, limits.fetch_bytes)
                    finally:
                        await response.aclose()
        except httpx.HTTPError as exc:
            raise FetchFailed(f"download failed: {redact_urls(str(exc))}") from exc
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")
    assert deadline.cancelled_caught
    target.unlink(missing_ok=True)
    raise FetchFailed(f"the download took longer than {limits.fetch_timeout_s:.0f}s (build_fetch_timeout_s)")
