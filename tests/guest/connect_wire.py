"""Connect streaming envelopes of JSON messages, as the tests send and check them (framing:
`appliance.guest.connect_framing`, the decoder the agent and the host use too)."""

from __future__ import annotations

import json

from appliance.guest.connect_framing import EnvelopeDecoder
from appliance.guest.connect_framing import envelope as frame


def envelope(message: dict[str, object], flags: int = 0) -> bytes:
    return frame(json.dumps(message).encode(), flags)


def parse_envelopes(body: bytes) -> list[tuple[int, dict[str, object]]]:
    decoder = EnvelopeDecoder()
    messages = [(e.flags, json.loads(e.payload)) for e in decoder.feed(body)]
    decoder.close()
    return messages
