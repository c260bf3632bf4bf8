"""Connect-RPC stream envelopes, sans I/O: bytes in as they arrive, whole envelopes out.

An envelope is 1 flag byte, a 4-byte big-endian length and that many bytes of
payload (PROTOCOL.md §3.2). The agent reads request streams with it
(`guest/connect.py`), the host reads the agent's answers with it
(`cubelet/envd_client.py`), and the tests read both with it: one decoder, no I/O,
so each side brings its own byte source.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
ENVELOPE_HEADER = struct.Struct(">BI")
MAX_MESSAGE = 64 * 1024 * 1024


class FramingError(ValueError):
    pass


class MessageTooLarge(FramingError):
    pass


class TruncatedEnvelope(FramingError):
    pass


@dataclass(frozen=True)
class Envelope:
    flags: int
    payload: bytes

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & FLAG_END_STREAM)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return ENVELOPE_HEADER.pack(flags, len(payload)) + payload


class EnvelopeDecoder:
    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._max_message = max_message
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Envelope]:
        """The envelopes `data` completes (none while one is still partial). Raises
        MessageTooLarge as soon as a header announces more than `max_message` bytes."""
        self._buffer += data
        complete: list[Envelope] = []
        while len(self._buffer) >= ENVELOPE_HEADER.size:
            flags, length = ENVELOPE_HEADER.unpack_from(self._buffer)
            if length > self._max_message:
                raise MessageTooLarge(f"message of {length} bytes; the limit is {self._max_message}")
            end = ENVELOPE_HEADER.size + length
            if len(self._buffer) < end:
                break
            complete.append(Envelope(flags, bytes(self._buffer[ENVELOPE_HEADER.size : end])))
            del self._buffer[:end]
        return complete

    def close(self) -> None:
        """The stream ended: raises TruncatedEnvelope if it stopped inside an envelope."""
        if self._buffer:
            raise TruncatedEnvelope(f"the stream ended inside an envelope ({len(self._buffer)} bytes left)")
