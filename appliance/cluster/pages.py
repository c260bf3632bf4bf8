"""The SDKs' paginated list (`GET /v2/sandboxes?limit=&nextToken=`) across the cluster's nodes.

Each node pages its own sandboxes by a keyset cursor (its `x-next-token`: the last record's start
time and id). A page of the cluster is the first `limit` of every node's next page merged in the
list's order; its `nextToken` carries each node's own cursor after the records of it that page
showed (`""`: that node has no more), so the next page asks each node from where it stopped and no
sandbox is shown twice or skipped. A node that joined since the first page is read from its start.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

PREFIX = "cube-cluster."
EXHAUSTED = ""


def decode_cursors(token: str | None) -> dict[str, str | None]:
    """Each node's own cursor (None: from its start; EXHAUSTED: nothing more); ValueError if the
    token is not one this cluster issued."""
    if not token:
        return {}
    if not token.startswith(PREFIX):
        raise ValueError("not a cluster page token")
    raw = token[len(PREFIX) :]
    try:
        cursors = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not a cluster page token") from exc
    if not isinstance(cursors, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in cursors.items()
    ):
        raise ValueError("not a cluster page token")
    return cursors


def encode_cursors(cursors: dict[str, str | None]) -> str | None:
    """The next page's token; None when every node is exhausted (the last page)."""
    if all(cursor == EXHAUSTED for cursor in cursors.values()):
        return None
    return PREFIX + base64.urlsafe_b64encode(json.dumps(cursors, sort_keys=True).encode()).decode().rstrip(
        "="
    )


def merge_pages(
    pages: dict[str, list[dict[str, Any]]], newest_first: bool, limit: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The first `limit` of every node's page in the list's order (start time, then id), and how
    many of each node's page that is (always a prefix of it: each page is in that order)."""
    tagged = [
        (s.get("startedAt", ""), s.get("sandboxID", ""), node, s) for node, p in pages.items() for s in p
    ]
    tagged.sort(key=lambda t: (t[0], t[1]), reverse=newest_first)
    shown = tagged[:limit]
    taken = {node: 0 for node in pages}
    for _, _, node, _ in shown:
        taken[node] += 1
    return [s for *_, s in shown], taken
