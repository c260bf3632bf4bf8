"""The sandboxes' DNS resolver: a forwarder that reports A/AAAA answers it hands out.

Listens on the node's resolver address (UDP and TCP port 53), forwards each
query unchanged to the host's resolvers and, before returning the answer,
tells CubeVS which addresses the asking sandbox was given for which name — how
domain entries in allow/deny lists become addresses in the eBPF maps. The
asking sandbox is known from the query's source address (its host_ip).

Before forwarding, CubeVS is asked whether this client may have this name
resolved (`may_ask`); if not, the client gets REFUSED and the upstream never
sees the name. That keeps DNS from being a tunnel out of a sandbox without
egress: data encoded in query names would otherwise reach whoever runs the
authoritative server of any domain.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)

_TYPE_A = 1
_TYPE_AAAA = 28
_HEADER = struct.Struct("!6H")  # id, flags, qdcount, ancount, nscount, arcount
_FLAG_RESPONSE = 0x8000
_FLAG_OPCODE = 0x7800
_FLAG_RECURSION_DESIRED = 0x0100
_FLAG_RECURSION_AVAILABLE = 0x0080
RCODE_REFUSED = 5
_UPSTREAM_TIMEOUT_S = 2.0
_MAX_IN_FLIGHT = 256
_MAX_TCP_CONNECTIONS = 128


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """ "1.1.1.1", "127.0.0.1:5353" or "[::1]:53"."""
        if text.startswith("["):
            host, _, port = text[1:].partition("]:")
            return cls(host, int(port or 53))
        if text.count(":") == 1:
            host, port = text.split(":")
            return cls(host, int(port))
        return cls(text)


def host_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[Upstream]:
    upstreams = []
    for line in resolv_conf.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            upstreams.append(Upstream(fields[1].split("%")[0]))
    return upstreams


@dataclass(frozen=True)
class Answer:
    qname: str  # lower case, no trailing dot
    addresses: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...]  # (address, ttl s)


def _read_name(msg: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bounded: compression pointers may loop
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), end if end >= 0 else offset
        labels.append(msg[offset : offset + length].decode("ascii", errors="replace"))
        offset += length
    raise ValueError("DNS name compression loop")


def parse_answer(msg: bytes) -> Answer | None:
    """The question name and the A/AAAA records of a response, or None if unparseable."""
    try:
        _id, _flags, qdcount, ancount, _ns, _ar = struct.unpack_from("!6H", msg)
        if qdcount != 1:
            return None
        qname, offset = _read_name(msg, 12)
        offset += 4
        addresses: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
        for _ in range(ancount):
            _name, offset = _read_name(msg, offset)
            rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", msg, offset)
            offset += 10
            rdata = msg[offset : offset + rdlength]
            offset += rdlength
            if rtype == _TYPE_A and rdlength == 4:
                addresses.append((ipaddress.IPv4Address(rdata), ttl))
            elif rtype == _TYPE_AAAA and rdlength == 16:
                addresses.append((ipaddress.IPv6Address(rdata), ttl))
        return Answer(qname, tuple(addresses))
    except (IndexError, struct.error, ValueError):
        return None


def _question(msg: bytes) -> tuple[str, int] | None:
    """(name, offset just past the question) of a message with exactly one question, else None."""
    try:
        if _HEADER.unpack_from(msg)[2] != 1:
            return None
        name, offset = _read_name(msg, _HEADER.size)
        if offset + 4 > len(msg):
            return None
        return name, offset + 4
    except (IndexError, struct.error, ValueError):
        return None


def question_name(msg: bytes) -> str | None:
    """The name a query asks about (lower case, no trailing dot), None unless it asks exactly one."""
    question = _question(msg)
    return question[0] if question else None


def refused(query: bytes) -> bytes | None:
    """A REFUSED response to `query`, with its question echoed when it has one (None: not DNS)."""
    if len(query) < _HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", query)
    question = _question(query)
    flags = (
        _FLAG_RESPONSE
        | flags & (_FLAG_OPCODE | _FLAG_RECURSION_DESIRED)
        | _FLAG_RECURSION_AVAILABLE
        | RCODE_REFUSED
    )
    if question is None:
        return _HEADER.pack(qid, flags, 0, 0, 0, 0)
    return _HEADER.pack(qid, flags, 1, 0, 0, 0) + query[_HEADER.size : question[1]]


# (client address, answer) → awaited before the answer is sent back.
OnAnswer = Callable[[str, Answer], Awaitable[None]]
# (client address, the one name the query asks about or None) → may it go upstream?
MayAsk = Callable[[str, str | None], bool]


class Resolver:
    def __init__(
        self, listen_ip: str, upstreams: Sequence[Upstream], on_answer: OnAnswer, may_ask: MayAsk
    ) -> None:
        self.listen_ip = listen_ip
        self.upstreams = list(upstreams)
        self.on_answer = on_answer
        self.may_ask = may_ask
        self._in_flight = trio.CapacityLimiter(_MAX_IN_FLIGHT)
        self._tcp_connections = trio.CapacityLimiter(_MAX_TCP_CONNECTIONS)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind((self.listen_ip, 53))
        listeners = await trio.open_tcp_listeners(53, host=self.listen_ip)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_udp, udp, nursery)
            nursery.start_soon(trio.serve_listeners, self._serve_tcp, listeners)
            task_status.started()

    async def _resolve(
        self, client_ip: str, query: bytes, forward: Callable[[bytes], Awaitable[bytes | None]]
    ) -> bytes | None:
        """The response for `client_ip`: forwarded if it may ask, learned from; else REFUSED."""
        if not self.may_ask(client_ip, question_name(query)):
            return refused(query)
        response = await forward(query)
        if response is not None:
            answer = parse_answer(response)
            if answer is not None and answer.addresses:
                await self.on_answer(client_ip, answer)
        return response

    # --- UDP --------------------------------------------------------------

    async def _serve_udp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        with sock:
            while True:
                query, client = await sock.recvfrom(4096)
                if self._in_flight.available_tokens == 0:
                    continue  # overloaded: drop, the client retries
                nursery.start_soon(self._answer_udp, sock, query, client)

    async def _answer_udp(self, sock: trio.socket.SocketType, query: bytes, client: tuple[str, int]) -> None:
        async with self._in_flight:
            response = await self._resolve(client[0], query, self._forward_udp)
            if response is not None:
                await sock.sendto(response, client)

    async def _forward_udp(self, query: bytes) -> bytes | None:
        for upstream in self.upstreams:
            family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
            with trio.socket.socket(family, socket.SOCK_DGRAM) as up, trio.move_on_after(_UPSTREAM_TIMEOUT_S):
                try:
                    await up.connect((upstream.host, upstream.port))
                    await up.send(query)
                    while True:
                        response = await up.recv(65535)
                        if response[:2] == query[:2]:  # same query id
                            return response
                except OSError as e:  # e.g. ICMP port unreachable: try the next one
                    log.debug("DNS upstream %s: %s", upstream, e)
        return None

    # --- TCP --------------------------------------------------------------

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        client_ip = stream.socket.getpeername()[0]
        async with self._tcp_connections, stream:
            with trio.move_on_after(30):
                while True:
                    query = await _read_framed(stream)
                    if query is None:
                        return
                    response = await self._resolve(client_ip, query, self._forward_tcp)
                    if response is None:
                        return
                    await stream.send_all(struct.pack("!H", len(response)) + response)

    async def _forward_tcp(self, query: bytes) -> bytes | None:
        for upstream in self.upstreams:
            with trio.move_on_after(_UPSTREAM_TIMEOUT_S):
                try:
                    up = await trio.open_tcp_stream(upstream.host, upstream.port)
                except OSError:
                    continue
                async with up:
                    await up.send_all(struct.pack("!H", len(query)) + query)
                    response = await _read_framed(up)
                    if response is not None:
                        return response
        return None


async def _read_framed(stream: trio.abc.ReceiveStream) -> bytes | None:
    header = await _read_exactly(stream, 2)
    if header is None:
        return None
    return await _read_exactly(stream, struct.unpack("!H", header)[0])


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
