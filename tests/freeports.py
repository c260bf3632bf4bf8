"""Free loopback ports for the servers tests start (one copy: services, etcd, registries, qemu)."""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence


def free_ports(count: int, candidates: Sequence[int] | None = None) -> list[int]:
    """`count` distinct loopback ports nothing listens on now.

    Without `candidates`, the kernel's picks (all held open while picked: a port freed at once
    may be handed out again by the next bind). With `candidates` (a range below the ephemeral
    one), random free ones of those: a server restarted on the same port does not find it
    taken by an outgoing connection meanwhile."""
    if candidates is None:
        probes = [socket.socket() for _ in range(count)]
        try:
            for probe in probes:
                probe.bind(("127.0.0.1", 0))
            return [int(probe.getsockname()[1]) for probe in probes]
        finally:
            for probe in probes:
                probe.close()
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.choice(candidates)
        if port in chosen:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def free_port() -> int:
    return free_ports(1)[0]
