"""The egress proxy: E2B's `network.rules` header transforms, secrets resolved on the way out.

A sandbox whose policy has rules gets, inside its netns, an nft `redirect` of the guest's TCP to
port 80 (plain HTTP) to a listener of this module on the netns's gateway address; nothing runs in
the guest. Per connection the proxy reads the request head and, when a rule covers the request,
sets the rule's headers with every `${e2b.secrets.NAME}` replaced by the team secret's value
(read at that moment through `SecretValues`; never logged), asks for `Connection: close`, and
forwards it to the connection's original destination. Then it pipes the bytes both ways.

Where a secret may go: a domain rule covers a request only if its Host names the ruled domain AND
the connection goes to an address the node resolver gave this sandbox for that name (a sandbox
cannot send `Host: api.example.com` to its own server and collect the key); an IP/CIDR rule
covers connections to those addresses. Anything else passes untouched, as without the proxy.

The egress policy still applies: the proxy's upstream socket belongs to the sandbox's netns, so
its packets leave through the sandbox's veth and meet the same eBPF program as the guest's own.
HTTPS (and any port but 80, and IPv6) is not redirected: it passes untouched, unreadable to the
proxy (docs/SECURITY.md, "Secrets and the egress proxy", says why). In a sandbox with rules, port
80 carries HTTP/1.x only: a head that is not one gets a 400.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio

from appliance.net import netns, nft
from appliance.net.addressing import TAP_NAME
from appliance.net.policy import SECRET_PLACEHOLDER, EgressRule, NetworkPolicy

log = logging.getLogger(__name__)

PROXY_PORT = 15080  # inside each ruled sandbox's netns, on its gateway address
HTTP_PORT = 80
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256  # per sandbox, open at once
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_CHUNK = 65536
_TABLE = "cube_egress"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (sandbox id, secret name) → the value of that secret of the sandbox's team, or None.
SecretValues = Callable[[str, str], "str | None"]


class BadRequest(ValueError):
    """A request head the proxy will not forward; the message goes back to the guest."""


@dataclass(frozen=True)
class SandboxEgress:
    """What the proxy of one sandbox reads per request: all current, never copied."""

    sandbox_id: str
    netns_path: str
    gateway_ip: str
    policy: Callable[[], NetworkPolicy]
    answered: Callable[[str], frozenset[IPAddress]]  # addresses the resolver gave it for a name
    secret_values: Callable[[], SecretValues | None]


def redirect_ruleset(gateway_ip: str) -> str:
    """In the sandbox netns: the guest's plain HTTP goes to the proxy (before cube's own NAT)."""
    return f"""add table ip {_TABLE}
delete table ip {_TABLE}
table ip {_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat - 10; policy accept;
        iifname "{TAP_NAME}" ip daddr != {gateway_ip} tcp dport {HTTP_PORT} redirect to :{PROXY_PORT}
    }}
}}
"""


def _listen_in(egress: SandboxEgress) -> socket.socket:
    with netns.entered(egress.netns_path):
        nft.run(redirect_ruleset(egress.gateway_ip))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((egress.gateway_ip, PROXY_PORT))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_in(path: str) -> socket.socket:
    with netns.entered(path):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


async def serve(
    egress: SandboxEgress, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Redirect the sandbox's HTTP here and proxy it until cancelled."""
    sock = await trio.to_thread.run_sync(_listen_in, egress)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    open_connections = trio.CapacityLimiter(MAX_CONNECTIONS)
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and the like: this sandbox waits, nothing else does
                log.warning("egress proxy: sandbox %s: accept failed: %s", egress.sandbox_id, exc)
                await trio.sleep(0.5)
                continue
            try:
                open_connections.acquire_on_behalf_of_nowait(stream)
            except trio.WouldBlock:
                await stream.aclose()  # the sandbox holds MAX_CONNECTIONS already
                continue
            nursery.start_soon(_handle_guarded, egress, stream, open_connections)


async def _handle_guarded(
    egress: SandboxEgress, stream: trio.SocketStream, limiter: trio.CapacityLimiter
) -> None:
    """One connection; whatever goes wrong ends it alone (never the proxy, never CubeVS). Only the
    error's type is logged: its message could quote the request."""
    try:
        await _handle(egress, stream)
    except Exception as exc:
        log.warning(
            "egress proxy: sandbox %s: a connection failed: %s", egress.sandbox_id, type(exc).__name__
        )
    finally:
        limiter.release_on_behalf_of(stream)


def original_destination(stream: trio.SocketStream) -> tuple[IPAddress, int]:
    raw = stream.socket.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!2xH4s", raw)
    return ipaddress.IPv4Address(address), int(port)


async def _handle(egress: SandboxEgress, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            address, port = original_destination(stream)
            head, rest = await _read_head(stream)
            request = parse_head(head)
            forwarded = transform(egress, request, address)
        except BadRequest as exc:
            await _answer(stream, 400, str(exc))
            return
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return
        if forwarded is None:
            await _answer(stream, 502, "a secret this request's rule names no longer exists")
            return
        await _forward(egress, stream, address, port, forwarded + rest)


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    buffer = b""
    with trio.fail_after(HEAD_TIMEOUT_S):
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD_BYTES:
                raise BadRequest(f"request head larger than {MAX_HEAD_BYTES} bytes")
            chunk = await stream.receive_some(_CHUNK)
            if not chunk:
                raise trio.BrokenResourceError("closed before the request head ended")
            buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


@dataclass(frozen=True)
class RequestHead:
    request_line: str
    headers: tuple[tuple[str, str], ...]
    host: str  # the name the request is for: absolute-form target's, else Host's; lower case, no port


def _host_name(authority: str) -> str:
    if authority.startswith("["):
        return authority[1 : authority.find("]")].lower()
    return (
        authority.rsplit(":", 1)[0].lower().rstrip(".") if ":" in authority else authority.lower().rstrip(".")
    )


def parse_head(head: bytes) -> RequestHead:
    """The request line and header fields, strictly (no obsolete folding, one Host)."""
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable request head") from exc
    request_line = lines[0]
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("not an HTTP/1.x request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or any(c in line for c in "\0\n\r"):
            raise BadRequest("malformed header line")
        headers.append((name, value.strip(" \t")))
    hosts = [value for name, value in headers if name.lower() == "host"]
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    target = parts[1]
    if target.lower().startswith("http://"):
        authority = target[7:].split("/", 1)[0].split("?", 1)[0]
    else:
        authority = hosts[0] if hosts else ""
    return RequestHead(request_line, tuple(headers), _host_name(authority.rsplit("@", 1)[-1]))


def _specificity(rule: EgressRule) -> tuple[int, int]:
    """E2B's precedence: an exact name, then the longest wildcard suffix, then the narrowest network."""
    try:
        return 1, ipaddress.ip_network(rule.host).prefixlen
    except ValueError:
        return (2, len(rule.host)) if rule.host.startswith("*.") else (3, len(rule.host))


def covering_rules(egress: SandboxEgress, request: RequestHead, address: IPAddress) -> list[EgressRule]:
    """The rules of the most specific host covering the request (rule sets are not merged): a
    domain's only if the request names it and its destination is an address the resolver gave
    this sandbox for that name."""
    covering = []
    for rule in egress.policy().rules:
        if not rule.matches(request.host, address):
            continue
        if _specificity(rule)[0] > 1 and address not in egress.answered(request.host):
            continue
        covering.append(rule)
    if not covering:
        return []
    best = max(covering, key=_specificity).host
    return [rule for rule in covering if rule.host == best]


def transform(egress: SandboxEgress, request: RequestHead, address: IPAddress) -> bytes | None:
    """The head to forward (ending in its blank line); None if a named secret is gone."""
    rules = covering_rules(egress, request, address)
    if not rules:
        return _serialize(request.request_line, request.headers)
    values = egress.secret_values()
    headers = list(request.headers)
    for rule in rules:
        for name, template in rule.headers:
            value = _resolve(template, egress.sandbox_id, values)
            if value is None:
                log.warning(
                    "egress proxy: sandbox %s: a secret named in rule %s (header %s) does not exist",
                    egress.sandbox_id,
                    rule.host,
                    name,
                )
                return None
            headers = [(n, v) for n, v in headers if n.lower() != name.lower()] + [(name, value)]
    headers = [(n, v) for n, v in headers if n.lower() not in ("connection", "keep-alive")]
    headers.append(("Connection", "close"))  # one request: the next head on this stream is not read
    log.info(
        "egress proxy: sandbox %s: rules of %s applied to a request for %s",
        egress.sandbox_id,
        ", ".join(sorted({r.host for r in rules})),
        request.host,
    )
    return _serialize(request.request_line, tuple(headers))


def _resolve(template: str, sandbox_id: str, values: SecretValues | None) -> str | None:
    missing = False

    def value_of(match: re.Match[str]) -> str:
        nonlocal missing
        value = values(sandbox_id, match.group(1).lower()) if values is not None else None
        if value is None:
            missing = True
            return ""
        return value

    resolved = SECRET_PLACEHOLDER.sub(value_of, template)
    return None if missing else resolved


def _serialize(request_line: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    lines = [request_line, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")


async def _answer(stream: trio.SocketStream, status: int, message: str) -> None:
    body = (message + "\n").encode()
    reason = {400: "Bad Request", 502: "Bad Gateway"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    try:
        await stream.send_all(head.encode() + b"Connection: close\r\n\r\n" + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _refused_destination(address: IPAddress, port: int) -> bool:
    """The netns's own addresses (the proxy itself, the guest's gateway) are no destination."""
    return address.is_loopback or address.is_link_local or port == PROXY_PORT


async def _forward(
    egress: SandboxEgress, stream: trio.SocketStream, address: IPAddress, port: int, first: bytes
) -> None:
    if _refused_destination(address, port):
        await _answer(stream, 400, "the proxy does not forward to the sandbox's own network")
        return
    upstream_sock = trio.socket.from_stdlib_socket(
        await trio.to_thread.run_sync(_socket_in, egress.netns_path)
    )
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await upstream_sock.connect((str(address), port))
    except (OSError, trio.TooSlowError):
        upstream_sock.close()
        await _answer(stream, 502, f"{address}:{port} is not reachable from this sandbox (egress policy?)")
        return
    async with trio.SocketStream(upstream_sock) as upstream:
        await upstream.send_all(first)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, stream, upstream, nursery.cancel_scope, False)
            nursery.start_soon(_pipe, upstream, stream, nursery.cancel_scope, True)


async def _pipe(
    source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope, ends_all: bool
) -> None:
    """Copy until EOF; the guest's EOF half-closes upstream, upstream's ends the exchange."""
    try:
        while chunk := await source.receive_some(_CHUNK):
            await sink.send_all(chunk)
        if not ends_all:
            await sink.send_eof()
            return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    scope.cancel()
