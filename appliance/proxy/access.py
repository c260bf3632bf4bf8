"""What a request needs to reach a sandbox port through the router (proxy/router.py).

Sandbox traffic carries no API key: the sandbox's tokens are its credentials.
- A port outside 1-65535, or a request target that is not a path (`http://host/…`,
  `*`): 400. The upstream URL is built from its parts (guest host, port, the raw
  path), never by pasting the target after the host.
- envd's port: `X-Access-Token` must be the sandbox's envd token, or the request a
  `/files` URL signed with it (PROTOCOL.md §3.7). Otherwise the answer is the same
  502 "was not found" as for a sandbox that does not exist, so a sandbox's existence
  does not leak to whoever lacks its token. A URL signed with it whose expiry has
  passed is 401 "signature is already expired", as envd answers it.
- A signed `/files` URL needs no sandbox id: in single-port mode the SDKs build
  `download_url()` / `upload_url()` from E2B_SANDBOX_URL, without one, so the router
  routes it to the sandbox whose envd token signed it (router.py).
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

from appliance.cluster.forwarding import CLUSTER_HEADERS
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
# The caller's control-plane credentials, and the cluster's (a node forwarding sandbox traffic
# adds its token): a guest never sees them.
CONTROL_PLANE_CREDENTIALS = frozenset({b"x-api-key", *(h.encode() for h in CLUSTER_HEADERS)})


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


@dataclass(frozen=True)
class FileSignature:
    """What a signed `/files` download or upload URL carries (PROTOCOL.md §3.7)."""

    signature: str
    path: str
    operation: str
    user: str
    expiration: str | None

    def signed_with(self, token: str) -> bool:
        expected = file_signature(self.path, self.operation, self.user, token, self.expiration)
        return _same(self.signature, expected)

    def expired(self) -> bool:
        return self.expiration is not None and int(self.expiration) < time.time()


def file_url_signature(scope: Scope) -> FileSignature | None:
    """The signature on a `/files` URL; None if the request is not one or carries no valid-looking one."""
    if scope.get("path") != "/files" or scope.get("method") not in ("GET", "POST"):
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)

    def value(name: str) -> str | None:
        return query[name][0] if name in query else None

    signature, expiration = value("signature"), value("signature_expiration")
    if not signature or (expiration is not None and not (expiration.isascii() and expiration.isdigit())):
        return None
    operation = "read" if scope["method"] == "GET" else "write"
    return FileSignature(signature, value("path") or "", operation, value("username") or "", expiration)


def check_credentials(scope: Scope, record: SandboxRecord, port: int) -> None:
    """Raises Refused unless the request carries what this sandbox port needs (module docstring)."""
    if port == ENVD_PORT:
        token = record.envd_access_token
        if not token or _same(header(scope, ACCESS_TOKEN_HEADER), token):
            return
        signed = file_url_signature(scope)
        if signed is None or not signed.signed_with(token):
            raise Refused(502, not_found_message(record.sandbox_id))
        if signed.expired():  # signed with the token: its holder may learn that much (envd's words)
            raise Refused(401, "signature is already expired")
        return
    expected = record.traffic_access_token
    if record.allow_public_traffic or expected is None:
        return
    presented = header(scope, TRAFFIC_TOKEN_HEADER)
    if presented is None:
        raise Refused(403, f"sandbox {record.sandbox_id} accepts only requests with its traffic access token")
    if not _same(presented, expected):
        raise Refused(403, f"invalid traffic access token for sandbox {record.sandbox_id}")
