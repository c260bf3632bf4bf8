"""A call asked of another node for a caller, and its answer: how the lists of the cluster are
gathered (the API's merged lists in proxy/node_hop.py, the admin's `/cube/*` lists, the
dashboard's pages), and how the dashboard reaches the node that runs a sandbox. The caller was
authenticated by the asking node; the answering node believes its team only with the cluster
token (cluster/forwarding.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from appliance.cluster.forwarding import principal_headers
from appliance.tenancy import Principal

log = logging.getLogger(__name__)


@dataclass
class NodeAnswer:
    """A node's answer to a GET."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def next_token(self) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == b"x-next-token"), None)

    def _json(self) -> Any:
        try:
            return json.loads(self.body) if self.status == 200 else None
        except ValueError:
            return None

    def records(self, node_id: str) -> list[Any]:
        """A list's items; none if it answered otherwise (logged)."""
        records = self._json()
        if not isinstance(records, list):
            log.warning("cluster: node %s answered the list %d", node_id, self.status)
            return []
        return records

    def fields(self, node_id: str) -> dict[str, Any]:
        """An object's fields; none if it answered otherwise (logged)."""
        found = self._json()
        if not isinstance(found, dict):
            log.warning("cluster: node %s answered %d", node_id, self.status)
            return {}
        return found

    def metrics(self, node_id: str) -> dict[str, Any]:
        """Its sandboxes' metrics by id (`/sandboxes/metrics`); none if it answered otherwise (logged)."""
        answer = self._json()
        found = answer.get("sandboxes") if isinstance(answer, dict) else None
        if not isinstance(found, dict):
            log.warning("cluster: node %s answered the metrics %d", node_id, self.status)
            return {}
        return found


async def ask_node(
    client: httpx.AsyncClient,
    token: str,
    node_id: str,
    api_url: str,
    path: str,
    query: str,
    principal: Principal,
) -> NodeAnswer | None:
    """`GET path?query` as node `node_id` answers it for `principal`; None if it did not answer."""
    return await call_node(client, token, node_id, api_url, "GET", path, principal, query=query)


async def call_node(
    client: httpx.AsyncClient,
    token: str,
    node_id: str,
    api_url: str,
    method: str,
    path: str,
    principal: Principal,
    *,
    query: str = "",
    body: bytes = b"",
    content_type: str | None = None,
    timeout: httpx.Timeout | None = None,
) -> NodeAnswer | None:
    """`method path?query` (with `body`, if any) as node `node_id` answers it for `principal`;
    None if it did not answer. A call without a body is sent without one (no empty chunked
    stream: proxy/complete_close.py)."""
    headers = [(k.decode(), v.decode()) for k, v in principal_headers(token, principal)]
    if content_type is not None:
        headers.append(("content-type", content_type))
    try:
        response = await client.request(
            method,
            api_url + path,
            params=query or None,
            headers=headers,
            content=body or None,
            timeout=timeout or client.timeout,
        )
    except httpx.HTTPError as exc:
        log.warning("cluster: node %s did not answer %s %s: %r", node_id, method, path, exc)
        return None
    return NodeAnswer(response.status_code, list(response.headers.raw), response.content)


def latest_first(items: list[dict[str, Any]], field: str, limit: int | None) -> list[dict[str, Any]]:
    """Items of several nodes' lists in one list, newest first by their RFC 3339 `field` (UTC,
    fixed width: text order is time order), the first `limit` of them."""
    ordered = sorted(items, key=lambda item: str(item.get(field, "")), reverse=True)
    return ordered if limit is None else ordered[:limit]
