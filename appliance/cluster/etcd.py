"""A small typed client for etcd's v3 JSON gateway (etcd 3.4), over httpx, so it runs on Trio.

No maintained Python etcd client runs on Trio (they are asyncio-only or synchronous); the
gateway speaks JSON over HTTP/1.1: `/v3/kv/range|put|txn|deleterange`, `/v3/lease/grant|
keepalive|revoke`, and a streaming `/v3/watch` (newline-separated JSON results). Keys and
values are base64 on the wire and bytes here; 64-bit integers arrive as JSON strings.
etcd started with flags serves the gateway on its client URLs; started from a config file it
needs `enable-grpc-gateway: true`.

A secured etcd (`EtcdSecurity`): https endpoints verified by a CA file, a client certificate for
etcd's `--client-cert-auth`, and a user: the client authenticates at each endpoint
(`/v3/auth/authenticate`), sends the token it gets on every call, and authenticates again when
etcd says the token is no longer valid.

Every call goes to the first endpoint that answers; an endpoint that cannot be reached (or
that answers 5xx, e.g. a member without quorum) makes the call try the next one, and when none
answers the call raises `EtcdUnavailable`, which the API turns into a 503.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0


class EtcdError(Exception):
    """etcd answered, refusing the call (a missing lease, a bad request)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered (or none has quorum)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(raw.get("key")),
            value=_unb64(raw.get("value")),
            create_revision=int(raw.get("create_revision", 0)),
            mod_revision=int(raw.get("mod_revision", 0)),
            lease=int(raw.get("lease", 0)),
        )


@dataclass(frozen=True)
class WatchEvent:
    deleted: bool  # a DELETE (a lease that expired deletes its keys too); else a PUT
    kv: KeyValue


@dataclass(frozen=True)
class Lease:
    lease_id: int
    ttl_s: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # The kvs of the range requests of the branch that ran, in order.
    ranges: list[list[KeyValue]]


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def encode(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@dataclass(frozen=True)
class Get:
    key: bytes

    def encode(self) -> dict[str, Any]:
        return {"request_range": {"key": _b64(self.key)}}


@dataclass(frozen=True)
class Delete:
    key: bytes

    def encode(self) -> dict[str, Any]:
        return {"request_delete_range": {"key": _b64(self.key)}}


Operation = Put | Get | Delete


@dataclass(frozen=True)
class Absent:
    """Compare: the key does not exist (its create revision is 0): a create-only transaction."""

    key: bytes

    def encode(self) -> dict[str, Any]:
        return {"target": "CREATE", "result": "EQUAL", "key": _b64(self.key), "create_revision": "0"}


@dataclass(frozen=True)
class ModRevision:
    """Compare: the key was last written at `revision` (no one changed it since it was read)."""

    key: bytes
    revision: int

    def encode(self) -> dict[str, Any]:
        return {"target": "MOD", "result": "EQUAL", "key": _b64(self.key), "mod_revision": str(self.revision)}


@dataclass(frozen=True)
class ValueIs:
    """Compare: the key holds `value` (e.g. the leader key still names this node)."""

    key: bytes
    value: bytes

    def encode(self) -> dict[str, Any]:
        return {"target": "VALUE", "result": "EQUAL", "key": _b64(self.key), "value": _b64(self.value)}


Compare = Absent | ModRevision | ValueIs


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a secured etcd: a CA its https endpoints are verified by (else the system's),
    a client certificate and key, a user and password (empty: no authentication)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str = ""
    password: str = ""

    def __repr__(self) -> str:  # never the password
        return f"EtcdSecurity(ca_file={self.ca_file}, cert_file={self.cert_file}, user={self.user!r})"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


class EtcdClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        client: httpx.AsyncClient | None = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.security = security or EtcdSecurity()
        self._client = client or httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S, trust_env=False, verify=self.security.ssl_context()
        )
        self._tokens: dict[str, str] = {}  # endpoint -> auth token (a simple token is per member)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        failures = []
        for endpoint in self.endpoints:
            try:
                response = await self._post(endpoint, path, body)
            except httpx.HTTPError as exc:
                failures.append(f"{endpoint}: {exc!r}")
                continue
            if response.status_code >= 500 and response.status_code != 501:
                failures.append(f"{endpoint}: {response.status_code} {response.text[:200]}")
                continue
            answer = response.json()
            if response.status_code != 200 or "error" in answer:
                raise EtcdError(f"etcd {path}: {answer.get('message') or answer.get('error') or answer}")
            assert isinstance(answer, dict)
            return answer
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: " + "; ".join(failures))

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """One call, authenticated if a user is set: again with a new token if etcd refused this
        one (expired, or issued before a restart)."""
        response = await self._client.post(endpoint + path, json=body, headers=await self._auth(endpoint))
        if self.security.user and _token_refused(response):
            self._tokens.pop(endpoint, None)
            response = await self._client.post(endpoint + path, json=body, headers=await self._auth(endpoint))
        return response

    async def _auth(self, endpoint: str) -> dict[str, str]:
        if not self.security.user:
            return {}
        if endpoint not in self._tokens:
            response = await self._client.post(
                endpoint + "/v3/auth/authenticate",
                json={"name": self.security.user, "password": self.security.password},
            )
            answer = response.json()
            if response.status_code != 200 or "token" not in answer:
                refusal = answer.get("message", answer)
                raise EtcdError(f"etcd refused the user {self.security.user!r}: {refusal}")
            self._tokens[endpoint] = str(answer["token"])
        return {"Authorization": self._tokens[endpoint]}

    # KV.

    async def get(self, key: bytes) -> KeyValue | None:
        found = await self.range(key)
        return found[0] if found else None

    async def range(self, key: bytes, range_end: bytes | None = None) -> list[KeyValue]:
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        answer = await self._call("/v3/kv/range", body)
        return [KeyValue.decode(kv) for kv in answer.get("kvs", [])]

    async def prefix(self, prefix: bytes) -> list[KeyValue]:
        return await self.range(prefix, prefix_end(prefix))

    async def snapshot(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` and the revision they are read at (a watch goes on from there)."""
        answer = await self._call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        return [KeyValue.decode(kv) for kv in answer.get("kvs", [])], int(answer["header"]["revision"])

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """The revision of the write."""
        body = Put(key, value, lease).encode()["request_put"]
        answer = await self._call("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        """How many keys were deleted."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        answer = await self._call("/v3/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Operation], failure: Sequence[Operation] = ()
    ) -> TxnResult:
        body = {
            "compare": [c.encode() for c in compare],
            "success": [op.encode() for op in success],
            "failure": [op.encode() for op in failure],
        }
        answer = await self._call("/v3/kv/txn", body)
        ranges = [
            [KeyValue.decode(kv) for kv in r["response_range"].get("kvs", [])]
            for r in answer.get("responses", [])
            if "response_range" in r
        ]
        return TxnResult(bool(answer.get("succeeded")), int(answer["header"]["revision"]), ranges)

    async def create(self, key: bytes, value: bytes, lease: int = 0) -> KeyValue | None:
        """Write `key` only if it does not exist: None if written, else what is there."""
        result = await self.txn([Absent(key)], [Put(key, value, lease)], [Get(key)])
        if result.succeeded:
            return None
        return result.ranges[0][0] if result.ranges and result.ranges[0] else None

    # Leases.

    async def grant(self, ttl_s: int) -> Lease:
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return Lease(int(answer["ID"]), int(answer["TTL"]))

    async def keepalive(self, lease_id: int) -> int:
        """Renew the lease once; its remaining TTL (0: it has expired, its keys are gone)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease_id: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease_id)})

    # Watch.

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Every change under `prefix` from `start_revision` on, batch by batch, until cancelled
        (or the stream breaks: EtcdUnavailable; the caller reads again and watches from there)."""
        request = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        failures = []
        for endpoint in self.endpoints:
            try:
                async with self._client.stream(
                    "POST",
                    endpoint + "/v3/watch",
                    json=request,
                    headers=await self._auth(endpoint),
                    timeout=httpx.Timeout(5.0, read=None),
                ) as response:
                    if response.status_code == 401:
                        self._tokens.pop(endpoint, None)
                    if response.status_code != 200:
                        failures.append(f"{endpoint}: {response.status_code}")
                        continue
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        try:
                            batch = _watch_batch(json.loads(line))
                        except EtcdError:
                            self._tokens.pop(endpoint, None)  # a refused token: a new one next time
                            raise
                        if batch:
                            yield batch
            except httpx.HTTPError as exc:
                failures.append(f"{endpoint}: {exc!r}")
                continue
            raise EtcdUnavailable(f"the watch on {endpoint} ended")
        raise EtcdUnavailable("no etcd endpoint answered /v3/watch: " + "; ".join(failures))


def _token_refused(response: httpx.Response) -> bool:
    if response.status_code == 401:
        return True
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        return False
    return "invalid auth token" in message or ("auth token" in message and "expired" in message)


def _watch_batch(message: dict[str, Any]) -> list[WatchEvent]:
    result = message.get("result")
    if result is None:
        raise EtcdError(f"etcd watch: {message.get('error', message)}")
    if result.get("canceled"):
        raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
    return [
        WatchEvent(deleted=e.get("type") == "DELETE", kv=KeyValue.decode(e["kv"]))
        for e in result.get("events", [])
    ]
