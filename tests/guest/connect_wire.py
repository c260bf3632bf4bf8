"""Connect streaming envelopes written independently of the agent's code: what tests send and check."""

from __future__ import annotations

import json
import struct


def envelope(message: dict[str, object], flags: int = 0) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def parse_envelopes(body: bytes) -> list[tuple[int, dict[str, object]]]:
    messages = []
    while body:
        flags, length = struct.unpack_from(">BI", body)
        messages.append((flags, json.loads(body[5 : 5 + length])))
        body = body[5 + length :]
    return messages
