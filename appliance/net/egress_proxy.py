"""The egress proxy: E2B's `network.rules` header transforms, secrets resolved on the way out.

A sandbox whose policy has rules gets, inside its netns, an nft `redirect` of the guest's TCP to
ports 80 (HTTP) and 443 (HTTPS), over IPv4 and IPv6, to listeners of this module on the netns's
gateway addresses; nothing runs in the guest. Per HTTP connection the proxy reads the request head
and, when a rule covers the request, sets the rule's headers with every `${e2b.secrets.NAME}`
replaced by the team secret's value (read at that moment through `SecretValues`; never logged),
asks for `Connection: close`, and forwards it to the connection's original destination. Then it
pipes the bytes both ways.

Per HTTPS connection it reads the ClientHello. Only when its SNI names a ruled host and the
destination is an address resolved for that name (below) does it terminate the TLS, with a leaf
for that name from the appliance's egress CA (egress_tls.py; every guest trusts it), open TLS to
the destination verifying the server's certificate for that name, and handle the first request as
above, a rule applying only if its Host is the SNI's name. Any other TLS is spliced untouched.

Where a secret may go: a domain rule covers a request only if its Host names the ruled domain AND
the connection goes to an address the node resolver gave this sandbox for that name (a sandbox
cannot send `Host: api.example.com` to its own server and collect the key); an IP/CIDR rule
covers connections to those addresses. Anything else passes untouched, as without the proxy.

The egress policy still applies: the proxy's upstream socket belongs to the sandbox's netns, so
its packets leave through the sandbox's veth and meet the same eBPF program as the guest's own.
Other ports are not redirected. In a sandbox with rules, port 80 carries HTTP/1.x only (a head
that is not one gets a 400), and so does TLS to a ruled host on 443 (ALPN offers http/1.1 alone).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from appliance.net import netns, nft
from appliance.net.addressing import TAP_NAME
from appliance.net.egress_tls import EgressTls, NotClientHello, client_hello_length, server_name
from appliance.net.policy import SECRET_PLACEHOLDER, EgressRule, NetworkPolicy

log = logging.getLogger(__name__)

PROXY_PORT = 15080  # inside each ruled sandbox's netns, on its gateway addresses: HTTP
PROXY_TLS_PORT = 15443  # and HTTPS
HTTP_PORT = 80
HTTPS_PORT = 443
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256  # per sandbox, open at once
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (netfilter_ipv6) is 80 too
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
    gateway_ip6: str
    policy: Callable[[], NetworkPolicy]
    answered: Callable[[str], frozenset[IPAddress]]  # addresses the resolver gave it for a name
    secret_values: Callable[[], SecretValues | None]
    tls: EgressTls | None = None  # None: HTTPS is not redirected (passes untouched)


def redirect_ruleset(gateway_ip: str, gateway_ip6: str, tls: bool) -> str:
    """In the sandbox netns: the guest's HTTP (and HTTPS) over IPv4 and IPv6 goes to the proxy
    (before cube's own NAT)."""
    ports = [(HTTP_PORT, PROXY_PORT)] + ([(HTTPS_PORT, PROXY_TLS_PORT)] if tls else [])
    rules = "".join(
        f'        iifname "{TAP_NAME}" {family} daddr != {gateway} tcp dport {port} redirect to :{proxy}\n'
        for family, gateway in (("ip", gateway_ip), ("ip6", gateway_ip6))
        for port, proxy in ports
    )
    # (An `ip` table of that name is what a service before IPv6 redirection left: gone too.)
    return f"""add table ip {_TABLE}
delete table ip {_TABLE}
add table inet {_TABLE}
delete table inet {_TABLE}
table inet {_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat - 10; policy accept;
{rules}    }}
}}
"""


def _listen_in(egress: SandboxEgress) -> list[tuple[socket.socket, int]]:
    """The listeners (socket, proxy port): HTTP and HTTPS, on each gateway address."""
    ports = [PROXY_PORT] + ([PROXY_TLS_PORT] if egress.tls is not None else [])
    made: list[tuple[socket.socket, int]] = []
    try:
        with netns.entered(egress.netns_path):
            nft.run(redirect_ruleset(egress.gateway_ip, egress.gateway_ip6, egress.tls is not None))
            for family, address in (
                (socket.AF_INET, egress.gateway_ip),
                (socket.AF_INET6, egress.gateway_ip6),
            ):
                for port in ports:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    made.append((sock, port))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((address, port))
                    sock.listen(64)
    except BaseException:
        for sock, _port in made:
            sock.close()
        raise
    return made


def _socket_in(path: str, family: socket.AddressFamily) -> socket.socket:
    with netns.entered(path):
        return socket.socket(family, socket.SOCK_STREAM)


async def serve(
    egress: SandboxEgress, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Redirect the sandbox's HTTP and HTTPS here and proxy them until cancelled."""
    sockets = await trio.to_thread.run_sync(_listen_in, egress)
    open_connections = trio.CapacityLimiter(MAX_CONNECTIONS)  # per sandbox, all listeners together
    try:
        async with trio.open_nursery() as nursery:
            for sock, port in sockets:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                handler = _handle_tls if port == PROXY_TLS_PORT else _handle
                nursery.start_soon(_accept, egress, listener, handler, open_connections)
            task_status.started()
    finally:
        for sock, _port in sockets:
            sock.close()


Handler = Callable[["SandboxEgress", trio.SocketStream], Awaitable[None]]


async def _accept(
    egress: SandboxEgress, listener: trio.SocketListener, handler: Handler, limiter: trio.CapacityLimiter
) -> None:
    async with listener, trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and the like: this sandbox waits, nothing else does
                log.warning("egress proxy: sandbox %s: accept failed: %s", egress.sandbox_id, exc)
                await trio.sleep(0.5)
                continue
            try:
                limiter.acquire_on_behalf_of_nowait(stream)
            except trio.WouldBlock:
                await stream.aclose()  # the sandbox holds MAX_CONNECTIONS already
                continue
            nursery.start_soon(_handle_guarded, egress, stream, handler, limiter)


async def _handle_guarded(
    egress: SandboxEgress, stream: trio.SocketStream, handler: Handler, limiter: trio.CapacityLimiter
) -> None:
    """One connection; whatever goes wrong ends it alone (never the proxy, never CubeVS). Only the
    error's type is logged: its message could quote the request."""
    try:
        await handler(egress, stream)
    except Exception as exc:
        log.warning(
            "egress proxy: sandbox %s: a connection failed: %s", egress.sandbox_id, type(exc).__name__
        )
    finally:
        limiter.release_on_behalf_of(stream)


def original_destination(stream: trio.SocketStream) -> tuple[IPAddress, int]:
    if stream.socket.family == socket.AF_INET6:
        raw = stream.socket.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # sockaddr_in6
        port, address6 = struct.unpack_from("!2xH4x16s", raw)
        return ipaddress.IPv6Address(address6), int(port)
    raw = stream.socket.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!2xH4s", raw)
    return ipaddress.IPv4Address(address), int(port)


async def _handle(egress: SandboxEgress, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            address, port = original_destination(stream)
            first = await _first_request(egress, stream, address)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return
        if first is not None:
            await _forward(egress, stream, address, port, first, answer_errors=True)


async def _first_request(
    egress: SandboxEgress, guest: trio.abc.Stream, address: IPAddress, tls_name: str | None = None
) -> bytes | None:
    """The guest's first request head as it is to be forwarded (what followed it too); None when
    the proxy answered it itself (a 400, or a 502 for a secret gone)."""
    try:
        head, rest = await _read_head(guest)
        forwarded = transform(egress, parse_head(head), address, tls_name)
    except BadRequest as exc:
        await _answer(guest, 400, str(exc))
        return None
    if forwarded is None:
        await _answer(guest, 502, "a secret this request's rule names no longer exists")
        return None
    return forwarded + rest


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
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


# --- HTTPS ---------------------------------------------------------------------


async def _handle_tls(egress: SandboxEgress, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            address, port = original_destination(stream)
            hello, name = await _read_client_hello(stream)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return
        if egress.tls is None or name is None or not rules_for(egress, name, address):
            await _forward(egress, stream, address, port, hello, answer_errors=False)  # spliced untouched
            return
        await _intercept(egress, egress.tls, stream, (address, port), hello, name)


async def _read_client_hello(stream: trio.SocketStream) -> tuple[bytes, str | None]:
    """The bytes of the guest's ClientHello and the host name it names (None: none, or not TLS)."""
    buffer = b""
    with trio.fail_after(HEAD_TIMEOUT_S):
        while True:
            try:
                length = client_hello_length(buffer) if buffer else None
                if length is not None:
                    return buffer, server_name(buffer[:length])
            except NotClientHello:
                return buffer, None
            chunk = await stream.receive_some(_CHUNK)
            if not chunk:
                raise trio.BrokenResourceError("closed before the ClientHello ended")
            buffer += chunk


class _Replayed(trio.abc.Stream):
    """The guest's stream with the bytes already read from it (its ClientHello) put back in front."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self._stream, self._first = stream, first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            size = max_bytes or len(self._first)
            data, self._first = self._first[:size], self._first[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _intercept(
    egress: SandboxEgress,
    tls: EgressTls,
    stream: trio.SocketStream,
    destination: tuple[IPAddress, int],
    hello: bytes,
    name: str,
) -> None:
    """TLS to a ruled host: verified TLS upstream first, then the guest's TLS terminated with a leaf
    for `name`, then its first request transformed as plain HTTP's is."""
    upstream, failure = await _verified_upstream(egress, tls, destination, name)
    guest = trio.SSLStream(
        _Replayed(stream, hello), tls.server_context(name), server_side=True, https_compatible=True
    )
    try:
        with trio.fail_after(HEAD_TIMEOUT_S):
            await guest.do_handshake()
        if upstream is None:
            await _answer(guest, 502, failure)
            return
        first = await _first_request(egress, guest, destination[0], name)
        if first is None:
            return
        await upstream.send_all(first)
        await _relay(guest, upstream)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return
    finally:
        if upstream is not None:
            await upstream.aclose()


async def _verified_upstream(
    egress: SandboxEgress, tls: EgressTls, destination: tuple[IPAddress, int], name: str
) -> tuple[trio.SSLStream[trio.SocketStream] | None, str]:
    """TLS to the destination whose certificate verifies for `name`; else None and why (for the guest)."""
    tcp = await _connect(egress, *destination)
    if tcp is None:
        return None, f"{destination[0]}:{destination[1]} is not reachable from this sandbox (egress policy?)"
    upstream = trio.SSLStream(tcp, tls.upstream, server_hostname=name, https_compatible=True)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await upstream.do_handshake()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        await tcp.aclose()
        log.warning(
            "egress proxy: sandbox %s: %s at %s failed TLS verification: no request sent",
            egress.sandbox_id,
            name,
            destination[0],
        )
        return None, f"the server at {destination[0]} did not prove it is {name} (TLS verification failed)"
    return upstream, ""


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
    """The rules of the most specific host covering the request (rule sets are not merged)."""
    return rules_for(egress, request.host, address)


def rules_for(egress: SandboxEgress, host: str, address: IPAddress) -> list[EgressRule]:
    """The rules of the most specific host covering a connection to `address` for the name `host`:
    a domain's only if `host` is it (or under its wildcard) and `address` is one the resolver gave
    this sandbox for `host`; a network's if `address` is in it."""
    covering = []
    for rule in egress.policy().rules:
        if not rule.matches(host, address):
            continue
        if _specificity(rule)[0] > 1 and address not in egress.answered(host):
            continue
        covering.append(rule)
    if not covering:
        return []
    best = max(covering, key=_specificity).host
    return [rule for rule in covering if rule.host == best]


def transform(
    egress: SandboxEgress, request: RequestHead, address: IPAddress, tls_name: str | None = None
) -> bytes | None:
    """The head to forward (ending in its blank line); None if a named secret is gone. Inside TLS
    terminated for `tls_name`, only a request for that very name is transformed: the upstream proved
    it is `tls_name`, not whatever the Host header says."""
    if tls_name is not None and request.host != tls_name:
        return _serialize(request.request_line, request.headers)
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


async def _answer(stream: trio.abc.Stream, status: int, message: str) -> None:
    body = (message + "\n").encode()
    reason = {400: "Bad Request", 502: "Bad Gateway"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    try:
        await stream.send_all(head.encode() + b"Connection: close\r\n\r\n" + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _refused_destination(address: IPAddress, port: int) -> bool:
    """The netns's own addresses (the proxy itself, the guest's gateway) are no destination."""
    return address.is_loopback or address.is_link_local or port in (PROXY_PORT, PROXY_TLS_PORT)


async def _connect(egress: SandboxEgress, address: IPAddress, port: int) -> trio.SocketStream | None:
    """A TCP connection from the sandbox's netns (its egress policy applies); None if refused."""
    if _refused_destination(address, port):
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    upstream_sock = trio.socket.from_stdlib_socket(
        await trio.to_thread.run_sync(_socket_in, egress.netns_path, family)
    )
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await upstream_sock.connect((str(address), port))
    except (OSError, trio.TooSlowError):
        upstream_sock.close()
        return None
    return trio.SocketStream(upstream_sock)


async def _forward(
    egress: SandboxEgress,
    stream: trio.SocketStream,
    address: IPAddress,
    port: int,
    first: bytes,
    *,
    answer_errors: bool,
) -> None:
    """`first`, then the rest of the guest's bytes, to the destination; its bytes back. A destination
    it cannot reach gets the guest an HTTP answer saying so (`answer_errors`), else a closed stream."""
    upstream = await _connect(egress, address, port)
    if upstream is None:
        if answer_errors:
            await _answer(
                stream, 502, f"{address}:{port} is not reachable from this sandbox (egress policy?)"
            )
        return
    async with upstream:
        await upstream.send_all(first)
        await _relay(stream, upstream)


async def _relay(guest: trio.abc.Stream, upstream: trio.abc.Stream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pipe, guest, upstream, nursery.cancel_scope, False)
        nursery.start_soon(_pipe, upstream, guest, nursery.cancel_scope, True)


async def _pipe(
    source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope, ends_all: bool
) -> None:
    """Copy until EOF; the guest's EOF half-closes upstream (where the stream can: TCP, not TLS),
    upstream's ends the exchange."""
    try:
        while chunk := await source.receive_some(_CHUNK):
            await sink.send_all(chunk)
        if not ends_all:
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
            return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    scope.cancel()
