"""The Jupyter messaging protocol (v5.3) over pyzmq, driven from Trio.

jupyter_client's managers and clients are built on asyncio, which cannot run inside
this Trio process, so the agent speaks the wire protocol itself: HMAC-signed
multipart messages on DEALER/SUB sockets whose readiness is awaited on zmq's FD (no polling:
an idle kernel costs the agent no wake-ups, which matters with many idle sandboxes).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime

import trio
import zmq

DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"


class Session:
    """Signs, builds and parses messages for one kernel connection."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.session_id = uuid.uuid4().hex

    def _sign(self, parts: list[bytes]) -> bytes:
        digest = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            digest.update(part)
        return digest.hexdigest().encode()

    def build(self, msg_type: str, content: dict[str, object]) -> tuple[str, list[bytes]]:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "session": self.session_id,
            "username": "cube",
            "date": datetime.now(UTC).isoformat(),
            "msg_type": msg_type,
            "version": PROTOCOL_VERSION,
        }
        parts = [json.dumps(part).encode() for part in (header, {}, {}, content)]
        return msg_id, [DELIMITER, self._sign(parts), *parts]

    def parse(self, frames: list[bytes]) -> dict[str, object] | None:
        """A received message, or None if it is malformed or its signature is wrong."""
        try:
            start = frames.index(DELIMITER) + 1
        except ValueError:
            return None
        signature, parts = frames[start], frames[start + 1 : start + 5]
        if len(parts) != 4 or not hmac.compare_digest(signature, self._sign(parts)):
            return None
        header, parent, metadata, content = (json.loads(part) for part in parts)
        return {"header": header, "parent_header": parent, "metadata": metadata, "content": content}


class TrioSocket:
    """A zmq socket used from one Trio task for receiving (any task may send)."""

    def __init__(self, socket: zmq.Socket) -> None:
        self._socket = socket
        fd = socket.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._waiting: trio.CancelScope | None = None

    def send(self, frames: list[bytes]) -> None:
        self._socket.send_multipart(frames, zmq.NOBLOCK)
        # zmq's FD is edge-triggered, and a send may process the pending commands that would
        # have raised the edge the receiver waits for: let it look again.
        if self._waiting is not None and self._readable():
            self._waiting.cancel()

    async def receive(self) -> list[bytes]:
        while True:
            try:
                return self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            # Reading EVENTS processes zmq's pending commands and re-arms the FD's edge.
            if self._readable():
                continue
            with trio.CancelScope() as self._waiting:
                await trio.lowlevel.wait_readable(self._fd)
            self._waiting = None

    def _readable(self) -> bool:
        events = self._socket.getsockopt(zmq.EVENTS)
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._fd)
        self._socket.close(linger=0)
