"""What a request needs to reach a sandbox port through the router (proxy/router.py).

Sandbox traffic carries no API key: the sandbox's tokens are its credentials.
- A port outside 1-65535, or a request target that is not a path (`http://host/…`,
  `*`): 400. The upstream URL is built from its parts (guest host, port, the raw
  path), never by pasting the target after the host.
- envd's port: `X-Access-Token` must be the sandbox's envd token, or the request a
  `/files` URL signed with it (PROTOCOL.md §3.7). Otherwise the answer is the same
  502 "was not found" as for a sandbox that does not exist, so a sandbox's existence
  does not leak to whoever lacks its token.
- Every other port of a sandbox created with `allowPublicTraffic: false`:
  `e2b-traffic-access-token` must be its traffic token (403 otherwise, as E2B's edge).
  Public sandboxes have one too (the code interpreter in the guest takes it, as the SDKs
  send no access token on `/contexts`), but their ports are open to anyone here.
- The caller's control-plane credentials (`X-API-Key`, `Authorization: Bearer`) are
  not forwarded into the guest; `Authorization: Basic` is (envd reads the user from it).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from appliance.guest.envd import file_signature
from appliance.records import SandboxRecord
from appliance.runtime.base import ENVD_PORT

Scope = MutableMapping[str, Any]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
SANDBOX_ID_HEADER = b"e2b-sandbox-id"
SANDBOX_PORT_HEADER = b"e2b-sandbox-port"
ACCESS_TOKEN_HEADER = b"x-access-token"
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
# The caller's control-plane credentials: a guest never sees them.
CONTROL_PLANE_CREDENTIALS = frozenset({b"x-api-key"})


class Refused(Exception):
    """The request goes nowhere: answered with `status` and an E2B error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Target:
    sandbox_id: str
    port: int


def not_found_message(sandbox_id: str) -> str:
    return f"The sandbox {sandbox_id} was not found"


def parse_port(text: str) -> int:
    """A guest port from a header or a Host name: digits only, 1-65535 (else a 400 Refused)."""
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise Refused(400, f"invalid sandbox port {text[:16]!r}: expected 1-65535")
    return int(text)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def forwarded_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers as the guest gets them: no hop-by-hop ones, no control-plane
    credentials (`X-API-Key`, `Authorization: Bearer`); envd's `Authorization: Basic <user>:` stays."""
    kept = []
    for key, value in scope["headers"]:
        if key in HOP_BY_HOP or key in CONTROL_PLANE_CREDENTIALS:
            continue
        if key == b"authorization" and not value.lstrip()[:6].lower() == b"basic ":
            continue
        kept.append((key, value))
    return kept


def _same(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def signed_file_url(scope: Scope, token: str) -> bool:
    """A `/files` download or upload URL signed with the sandbox's envd token, not expired."""
    if scope.get("path") != "/files" or scope.get("method") not in ("GET", "POST"):
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)

    def value(name: str) -> str | None:
        return query[name][0] if name in query else None

    signature, expiration = value("signature"), value("signature_expiration")
    if not signature:
        return False
    if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
        return False
    operation = "read" if scope["method"] == "GET" else "write"
    expected = file_signature(value("path") or "", operation, value("username") or "", token, expiration)
    return _same(signature, expected)


def check_credentials(scope: Scope, record: SandboxRecord, port: int) -> None:
    """Raises Refused unless the request carries what this sandbox port needs (module docstring)."""
    if port == ENVD_PORT:
        token = record.envd_access_token
        if token and not (_same(header(scope, ACCESS_TOKEN_HEADER), token) or signed_file_url(scope, token)):
            raise Refused(502, not_found_message(record.sandbox_id))
        return
    expected = record.traffic_access_token
    if record.allow_public_traffic or expected is None:
        return
    presented = header(scope, TRAFFIC_TOKEN_HEADER)
    if presented is None:
        raise Refused(403, f"sandbox {record.sandbox_id} accepts only requests with its traffic access token")
    if not _same(presented, expected):
        raise Refused(403, f"invalid traffic access token for sandbox {record.sandbox_id}")
