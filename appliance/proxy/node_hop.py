"""The "sandbox lives on node X" hop: the ASGI layer in front of the router in a cluster.

Any node answers for every sandbox of the cluster (docs/CLUSTER.md):
- sandbox traffic (envd, the interpreter, user ports) for a sandbox another node runs goes to
  that node's cluster listener as it came (its Host, its access token), plus the cluster token;
- `/sandboxes/<id>/...` calls for another node's sandbox go to it on the caller's behalf
  (authenticated here; the team travels with the cluster token, appliance/cluster/forwarding.py);
- a create is placed (`ClusterNode.placement`) and, placed elsewhere, forwarded there; a node
  that cannot be reached is skipped for the next; the node that runs it first pulls the template
  from another node if it lacks it (cluster/templates.py, whose two endpoints it serves here);
- a list merges every live node's own list; `/v2/sandboxes` page by page (cluster/pages.py);
  so do the admin's `/cube/sandboxes` and `/cube/events`, and `/cube/sandboxes/<id>` goes to the
  sandbox's node.
Every call to another node goes to its cluster listener over mutual TLS (cluster/tls.py), which
serves `peers`. A request carrying the cluster token came from another node: it is taken only
there (anywhere else: a 401, so the token never travels in clear), handled here and never
forwarded again (no loops, whatever the views say); a wrong token is a 401. A create with an
Idempotency-Key is claimed in etcd first (cluster/idempotency.py): retried through any node, it
goes to the first create's sandbox's node.
A sandbox whose node left the cluster (its lease expired) is reported ended, naming the node.
Streams are relayed chunk by chunk both ways, WebSockets message by message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import trio

from appliance.cluster.etcd import EtcdError
from appliance.cluster.fanout import NodeAnswer, ask_node, latest_first
from appliance.cluster.forwarding import CLUSTER_HEADERS, TOKEN_HEADER, forwarded_principal, principal_headers
from appliance.cluster.idempotency import IdempotencyBusy
from appliance.cluster.membership import NodeRecord, SandboxOwner, left_reason, sandbox_key
from appliance.cluster.node import ClusterNode
from appliance.cluster.pages import EXHAUSTED, decode_cursors, encode_cursors, merge_pages
from appliance.cluster.templates import BLOBS_PATH, CHUNK, RESOLVE_PATH, TemplatePullFailed, TemplateShare
from appliance.proxy.access import HOP_BY_HOP, Refused, Scope, Target, not_found_message
from appliance.proxy.router import Message, Receive, Send, deny_websocket, relay_websocket, send_json_error
from appliance.tenancy import Principal

log = logging.getLogger(__name__)

SANDBOX_CALL = re.compile(r"^/(?:v2/)?sandboxes/([^/]+)(?:/.*)?$")
COLLECTION = frozenset({"/sandboxes", "/v2/sandboxes"})
SHARE_PREFIX = "/cube/cluster/"  # templates for the other nodes (cluster/templates.py)
NOT_SANDBOX_IDS = frozenset({"metrics"})  # /sandboxes/metrics: every node's, merged (_metrics_many)
METRICS_MANY = "/sandboxes/metrics"
ADMIN_SANDBOX = re.compile(r"^/cube/sandboxes/([^/]+)$")
ADMIN_LISTS = {"/cube/sandboxes": "startedAt", "/cube/events": "at"}  # each merged by its time
MAX_CREATE_BODY = 1024 * 1024
FROM_NODE = "cube.from_node"  # scope key: the request came in on the cluster listener
CONNECT_TIMEOUT_S = 5.0
# A forwarded API call (a create boots a guest: minutes on an emulated host) answers within this;
# sandbox traffic has no limit (its streams live as long as the caller wants).
API_CALL_TIMEOUT_S = 600.0
ASGIApp = Callable[[Scope, Receive, Send], Any]
Authenticate = Callable[[dict[str, str]], Principal | None]
TargetOf = Callable[[Scope], Target | None]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class NodeHop:
    def __init__(
        self, app: ASGIApp, target_of: TargetOf, node: ClusterNode, authenticate: Authenticate
    ) -> None:
        self.app = app
        self.target_of = target_of
        self.node = node
        self.authenticate = authenticate
        self.client = node.node_client(httpx.Timeout(CONNECT_TIMEOUT_S, read=None))
        self.share = TemplateShare(node.cubelet.config, node.token, self.client, node.templates, node.resolve)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def peers(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The cluster listener's app (cluster/tls.py): its TLS handshake verified the caller's
        certificate against the cluster CA, so the caller is a node; marked so for `__call__`.
        An answer given before the request's body ended waits for that end (`_BodyFirst`)."""
        if scope["type"] != "http":
            return await self({**scope, FROM_NODE: True}, receive, send)
        body_first = _BodyFirst(receive, send)
        await self({**scope, FROM_NODE: True}, body_first.receive, body_first.send)

    def _token_refusal(self, scope: Scope, presented: str | None) -> str | None:
        """Why a request carrying the cluster token is refused: not on the cluster listener (a
        plaintext hop, or the public ports), or a wrong token; None if it is a node's."""
        if presented is None:
            return None
        if not scope.get(FROM_NODE):
            return "the cluster token is taken only on the cluster's TLS listener"
        return None if self.node.verify_token(presented) else "invalid cluster token"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        presented = headers.get(TOKEN_HEADER)
        if presented is not None:
            refusal = self._token_refusal(scope, presented)
            if refusal is not None:
                return await send_json_error(send, 401, refusal)
            if scope["path"].startswith(SHARE_PREFIX):
                return await self._share(scope, send, headers)
            return await self._here(scope, receive, send, headers)
        try:
            target = self.target_of(scope)
        except Refused:
            target = None
        if target is not None:
            return await self._to_owner(target.sandbox_id, None, scope, receive, send, headers)
        path = scope["path"]
        call = SANDBOX_CALL.match(path)
        admin_call = ADMIN_SANDBOX.match(path) or path in ADMIN_LISTS
        principal = self.authenticate(headers) if call or path in COLLECTION or admin_call else None
        if principal is None:
            return await self._here(scope, receive, send, headers)
        return await self._for_caller(principal, call, scope, receive, send, headers)

    async def _for_caller(
        self,
        principal: Principal,
        call: re.Match[str] | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
    ) -> None:
        """An API call with the caller's key: to its sandbox's node, across every node, or here."""
        path, method = scope["path"], scope["method"]
        if path == METRICS_MANY and method == "GET":
            return await self._metrics_many(principal, scope, receive, send)
        if principal.is_admin and method == "GET" and path in ADMIN_LISTS:
            return await self._admin_list(principal, scope, receive, send)
        admin_sandbox = ADMIN_SANDBOX.match(path)
        if principal.is_admin and method == "GET" and admin_sandbox:
            return await self._admin_sandbox(admin_sandbox.group(1), principal, scope, receive, send, headers)
        if call and call.group(1) not in NOT_SANDBOX_IDS:
            return await self._to_owner(call.group(1), principal, scope, receive, send, headers)
        if path in COLLECTION and method == "POST":
            return await self._create(principal, scope, receive, send, headers)
        if path in COLLECTION and method == "GET":
            return await self._list(principal, scope, receive, send, headers)
        return await self._here(scope, receive, send, headers)

    # Here.

    async def _here(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """This node handles it; a create made here is recorded in the sandbox→node map before it
        is answered (so the node that forwarded it, or the caller's next call anywhere, finds it)."""
        if not (scope["path"] in COLLECTION and scope["method"] == "POST"):
            return await self.app(scope, receive, send)
        principal = self.authenticate(headers)
        if principal is not None:  # a template another node has is brought here first
            body = await _read_body(receive)
            if body is None:
                return await send_json_error(send, 413, "request body too large")
            receive = _replaying(body, receive)
            template = self._template_of(body)
            sources = [n for n in self.node.view.nodes.values() if n.node_id != self.node.node_id]
            try:
                await self.share.ensure(template, principal, sources)
            except TemplatePullFailed as exc:
                return await send_json_error(send, 503, str(exc))
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        if held and held[0].get("status") == 201 and principal is not None:
            sandbox_id = json.loads(b"".join(m.get("body", b"") for m in held[1:]))["sandboxID"]
            try:
                await self.node.record_sandbox(sandbox_id, principal.team_id)
            except EtcdError as exc:  # unrecorded, no other node could find it: not kept
                await self.node.cubelet.kill(sandbox_id, reason=f"the cluster could not record it: {exc}")
                return await _etcd_unavailable(send, exc)
        for message in held:
            await send(message)

    # Elsewhere.

    def _owning_node(self, scope: Scope) -> tuple[str, NodeRecord] | None:
        """The live other node running the sandbox this sandbox traffic is for, if any."""
        try:
            target = self.target_of(scope)
        except Refused:
            return None
        if target is None or self.node.cubelet.live(target.sandbox_id) is not None:
            return None
        owner = self.node.owner(target.sandbox_id)
        if owner is None or owner.ended_at or owner.node_id == self.node.node_id:
            return None
        node = self.node.view.nodes.get(owner.node_id)
        return None if node is None else (target.sandbox_id, node)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket to another node's sandbox goes to that node as it came (its Host, its access
        token) plus the cluster token; one with the cluster token is this node's own."""
        presented = _headers(scope).get(TOKEN_HEADER)
        refusal = self._token_refusal(scope, presented)
        if refusal is not None:
            if (await receive())["type"] == "websocket.connect":
                await deny_websocket(send, 401, refusal)
            return
        owning = None if presented is not None else self._owning_node(scope)
        if owning is None:  # here, or nowhere: the router's own answer
            return await self.app(scope, receive, send)
        sandbox_id, node = owning
        if (await receive())["type"] != "websocket.connect":
            return
        url = httpx.URL(node.cluster_url)
        stream = await self._open_tls(url)
        if stream is None:
            unreachable = f"node {node.node_id}, which runs sandbox {sandbox_id}, is unreachable"
            return await deny_websocket(send, 502, unreachable)
        async with stream:
            headers = [(k, v) for k, v in self._headers(scope, None, with_body=False) if k.lower() != b"host"]
            host = _headers(scope).get("host", url.netloc.decode())
            refused = f"node {node.node_id} refused the WebSocket to sandbox {sandbox_id}"
            await relay_websocket(scope, receive, send, stream, host, headers, refused)

    async def _open_tls(self, url: httpx.URL) -> trio.SSLStream[trio.SocketStream] | None:
        """A TLS connection to another node's cluster listener, its certificate verified (the
        cluster CA's, for the address dialled); None if it cannot be reached or is no node."""
        if url.scheme != "https":  # a plain URL written into etcd: not dialled at all
            return None
        try:
            tcp = await trio.open_tcp_stream(url.host, url.port or 443)
        except OSError:
            return None
        stream = trio.SSLStream(tcp, self.node.client_ssl, server_hostname=url.host, https_compatible=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            log.warning("cluster: no TLS with the node at %s: %r", url, exc.__cause__ or exc)
            await trio.aclose_forcefully(stream)
            return None
        return stream

    async def _to_owner(
        self,
        sandbox_id: str,
        principal: Principal | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
    ) -> None:
        owner = None if self.node.cubelet.live(sandbox_id) is not None else self.node.owner(sandbox_id)
        if owner is None or owner.node_id == self.node.node_id:
            return await self._here(scope, receive, send, headers)
        if principal is not None and not principal.owns(owner.team_id):
            return await send_json_error(send, 404, f"sandbox {sandbox_id} not found")
        # Ended: written so by the leader, or its node left and the leader has not yet written it.
        node = None if owner.ended_at else self.node.view.nodes.get(owner.node_id)
        if node is None and principal is None:  # sandbox traffic: the router's own answer
            return await send_json_error(send, 502, not_found_message(sandbox_id))
        if node is None:
            gone = f"it ended: {owner.reason or left_reason(owner.node_id)}"
            return await send_json_error(send, 404, f"sandbox {sandbox_id} not found ({gone})")
        if principal is not None:  # an API call: small, answered whole
            body = await _read_body(receive)
            if body is None:
                return await send_json_error(send, 413, "request body too large")
            forwarded = await self._forward_whole(node, principal, scope, body, send)
        else:
            # A request without a body is sent without one, not as an empty chunked stream (which
            # the other node may answer before the stream's end: proxy/complete_close.py).
            has_body = "content-length" in headers or "transfer-encoding" in headers
            forwarded = await self._forward(node, None, scope, _body(receive) if has_body else None, send)
        if not forwarded:
            await send_json_error(
                send, 502, f"node {node.node_id}, which runs sandbox {sandbox_id}, is unreachable"
            )

    async def _create(
        self, principal: Principal, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        body = await _read_body(receive)
        if body is None:
            return await send_json_error(send, 413, "request body too large")
        key = headers.get("idempotency-key", "").strip()
        if not key:
            return await self._place(principal, scope, _replaying(body, receive), send, headers, body)
        try:
            first = await self.node.idempotency.claim(principal.team_id, key, self.node.lease_id)
        except IdempotencyBusy as exc:
            return await send_json_error(send, 409, str(exc))
        except EtcdError as exc:
            return await _etcd_unavailable(send, exc)
        if first is not None:
            return await self._create_again(
                first, principal, scope, _replaying(body, receive), send, headers, body
            )
        answer = _CreateAnswer(send)
        try:
            await self._place(principal, scope, _replaying(body, receive), answer.send, headers, body)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.node.idempotency.settle(principal.team_id, key, answer.sandbox_id)
                except EtcdError as exc:
                    log.warning("cluster: an Idempotency-Key's create was not recorded: %s", exc)

    async def _create_again(
        self,
        sandbox_id: str,
        principal: Principal,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        """A create retried with an Idempotency-Key another create used, through any node: to the
        node of the first one's sandbox, whose own store answers with that sandbox."""
        owner = self.node.owner(sandbox_id)
        if owner is None:  # recorded before the first was answered; this node's watch may lag
            try:
                found = await self.node.etcd.get(sandbox_key(sandbox_id))
            except EtcdError as exc:
                return await _etcd_unavailable(send, exc)
            owner = SandboxOwner.decode(found.value) if found is not None else None
        node = None if owner is None or owner.ended_at else self.node.view.nodes.get(owner.node_id)
        if node is None:
            ended = f"Idempotency-Key was used for sandbox {sandbox_id}, which has ended"
            return await send_json_error(send, 409, ended)
        if node.node_id == self.node.node_id:
            return await self._here(scope, receive, send, headers)
        if not await self._forward_whole(node, principal, scope, body, send):
            unreachable = f"node {node.node_id}, which runs sandbox {sandbox_id}, is unreachable"
            await send_json_error(send, 502, unreachable)

    async def _place(
        self,
        principal: Principal,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        """A create on the node placement picks (here if none other takes it)."""
        template = self._template_of(body)
        placement = self.node.placement_for(template, principal)
        if not placement and self.node.node_id in self.node.view.drained:
            message = f"no node of the cluster can take a sandbox of '{template}' now (this one is drained)"
            return await send_json_error(send, 503, message)
        for node in placement:
            if node.node_id == self.node.node_id:
                break
            if await self._forward_whole(node, principal, scope, body, send):
                return
            log.warning("cluster: node %s is unreachable; placing the create elsewhere", node.node_id)
        await self._here(scope, receive, send, headers)

    def _template_of(self, body: bytes) -> str:
        """The template a create's body names (the default if none; a bad body is the API's 400)."""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("templateID"), str):
            return str(data["templateID"])
        return self.node.cubelet.config.default_template

    # Templates, for the other nodes (cluster token checked).

    async def _share(self, scope: Scope, send: Send, headers: dict[str, str]) -> None:
        path = scope["path"]
        if scope["method"] == "GET" and path == RESOLVE_PATH:
            principal = forwarded_principal(headers, self.node.verify_token)
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            name = (query.get("name") or [""])[0]
            try:
                described = await self.share.describe(name, principal) if principal and name else None
            except OSError as exc:  # a symlink where the image should be: refused by O_NOFOLLOW
                unreadable = f"template {name!r}: its image cannot be read: {exc.strerror}"
                return await send_json_error(send, 500, unreadable)
            if described is None:
                return await send_json_error(send, 404, f"template {name!r} not found")
            payload = json.dumps(described).encode()
            return await send_whole(send, 200, [(b"content-type", b"application/json")], payload)
        if scope["method"] == "GET" and path.startswith(BLOBS_PATH):
            opened = await self.share.open_blob(path[len(BLOBS_PATH) :])
            if opened is None:
                return await send_json_error(send, 404, "no such blob")
            return await _send_file(send, *opened)
        await send_json_error(send, 404, f"no cluster endpoint {path}")

    async def _list(
        self, principal: Principal, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        """Every live node's own list, merged; `/v2/sandboxes` page by page (`_list_pages`)."""
        if scope["path"] == "/v2/sandboxes":
            return await self._list_pages(principal, scope, receive, send)
        refused, answers = await self._every_node(principal, scope, receive)
        if refused is not None:
            return await send_whole(send, refused.status, refused.headers, refused.body)
        merged = [record for node_id, listed in answers for record in listed.records(node_id)]
        await send_whole(send, 200, [(b"content-type", b"application/json")], json.dumps(merged).encode())

    async def _metrics_many(self, principal: Principal, scope: Scope, receive: Receive, send: Send) -> None:
        """`/sandboxes/metrics` for the caller's sandboxes on every live node: each node answers for
        the ones it holds (it leaves out ids it does not know), the answers merged."""
        refused, answers = await self._every_node(principal, scope, receive)
        if refused is not None:
            return await send_whole(send, refused.status, refused.headers, refused.body)
        merged: dict[str, Any] = {}
        for node_id, listed in answers:
            merged.update(listed.metrics(node_id))
        body = json.dumps({"sandboxes": merged}).encode()
        await send_whole(send, 200, [(b"content-type", b"application/json")], body)

    async def _admin_sandbox(
        self,
        sandbox_id: str,
        principal: Principal,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
    ) -> None:
        """The admin's `/cube/sandboxes/<id>`: the record of the node it ran on while that node is in
        the cluster (ended ones too: their end, console log and events are there)."""
        owner = None if self.node.cubelet.live(sandbox_id) is not None else self.node.owner(sandbox_id)
        node = (
            None
            if owner is None or owner.node_id == self.node.node_id
            else self.node.view.nodes.get(owner.node_id)
        )
        if node is None:
            return await self._to_owner(sandbox_id, principal, scope, receive, send, headers)
        if not await self._forward_whole(node, principal, scope, b"", send):
            await send_json_error(
                send, 502, f"node {node.node_id}, which ran sandbox {sandbox_id}, is unreachable"
            )

    async def _admin_list(self, principal: Principal, scope: Scope, receive: Receive, send: Send) -> None:
        """The admin's `/cube/sandboxes` and `/cube/events`: every live node's, each item naming its
        node, merged newest first; `?limit=` holds for the merged list."""
        refused, answers = await self._every_node(principal, scope, receive)
        if refused is not None:
            return await send_whole(send, refused.status, refused.headers, refused.body)
        merged = [
            {**item, "nodeID": node_id} for node_id, answer in answers for item in answer.records(node_id)
        ]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        limit_text = (query.get("limit") or [""])[0]
        shown = latest_first(
            merged, ADMIN_LISTS[scope["path"]], int(limit_text) if limit_text.isdigit() else None
        )
        await send_whole(send, 200, [(b"content-type", b"application/json")], json.dumps(shown).encode())

    async def _every_node(
        self, principal: Principal, scope: Scope, receive: Receive
    ) -> tuple[NodeAnswer | None, list[tuple[str, NodeAnswer]]]:
        """The caller's GET as every live node answers it (unreachable ones left out), or this
        node's own answer first when it refused it (the request's own error, sent back as it is)."""
        query = scope.get("query_string", b"").decode("latin-1")
        answers: list[tuple[str, NodeAnswer]] = []
        for node_id, cluster_url in self._listing_nodes():
            listed = await self._list_at(node_id, cluster_url, principal, scope, receive, query)
            if listed is None:
                continue
            if node_id == self.node.node_id and listed.status != 200:
                return listed, []
            answers.append((node_id, listed))
        return None, answers

    async def _list_pages(self, principal: Principal, scope: Scope, receive: Receive, send: Send) -> None:
        """The SDKs' paginated list across nodes: each node's next page from its own cursor, merged,
        the first `limit` shown, each node's cursor after what was shown in the next token."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        try:
            cursors = decode_cursors((query.pop("nextToken", None) or [""])[0])
        except ValueError:
            return await send_json_error(send, 400, "'nextToken' is not a token this server issued")
        limit_text = (query.get("limit") or [""])[0]
        newest_first = (query.get("order") or ["desc"])[0] != "asc"
        pages: dict[str, list[Any]] = {}
        listed_at: dict[str, tuple[str, NodeAnswer]] = {}
        next_cursors: dict[str, str | None] = {}
        for node_id, cluster_url in self._listing_nodes():
            cursor = next_cursors[node_id] = cursors.get(node_id)
            if cursor == EXHAUSTED:
                continue
            listed = await self._list_at(
                node_id, cluster_url, principal, scope, receive, _page_query(query, cursor)
            )
            if listed is None:
                continue
            if node_id == self.node.node_id and listed.status != 200:  # the request's own error
                return await send_whole(send, listed.status, listed.headers, listed.body)
            pages[node_id] = listed.records(node_id)
            listed_at[node_id] = (cluster_url, listed)
        limit = int(limit_text) if limit_text.isdigit() else sum(len(p) for p in pages.values())
        shown, taken = merge_pages(pages, newest_first, limit)
        for node_id, (cluster_url, listed) in listed_at.items():
            if taken[node_id] == len(pages[node_id]):
                next_cursors[node_id] = listed.next_token or EXHAUSTED
            elif taken[node_id]:  # part of its page shown: its own cursor after that part
                part = _page_query({**query, "limit": [str(taken[node_id])]}, cursors.get(node_id))
                again = await self._list_at(node_id, cluster_url, principal, scope, receive, part)
                if again is not None and again.next_token:
                    next_cursors[node_id] = again.next_token
        token = encode_cursors(next_cursors)
        headers = [(b"content-type", b"application/json")] + (
            [(b"x-next-token", token.encode())] if token else []
        )
        await send_whole(send, 200, headers, json.dumps(shown).encode())

    def _listing_nodes(self) -> list[tuple[str, str]]:
        """(node id, cluster URL) of this node, then every other live one."""
        others = sorted(
            (n.node_id, n.cluster_url)
            for n in self.node.view.nodes.values()
            if n.node_id != self.node.node_id
        )
        return [(self.node.node_id, ""), *others]

    async def _list_at(
        self, node_id: str, cluster_url: str, principal: Principal, scope: Scope, receive: Receive, query: str
    ) -> NodeAnswer | None:
        """A list as node `node_id` answers it for the caller with `query`; None if unreachable."""
        if node_id == self.node.node_id:
            listed = NodeAnswer(0, [], b"")

            async def collect(message: Message) -> None:
                if message["type"] == "http.response.start":
                    listed.status, listed.headers = message["status"], list(message.get("headers", []))
                elif message["type"] == "http.response.body":
                    listed.body += message.get("body", b"")

            await self.app({**scope, "query_string": query.encode()}, _replaying(b"", receive), collect)
            return listed
        return await ask_node(
            self.client, self.node.token, node_id, cluster_url, scope["path"], query, principal
        )

    async def _forward_whole(
        self, node: NodeRecord, principal: Principal, scope: Scope, body: bytes, send: Send
    ) -> bool:
        """An API call for the caller to `node`, answered whole (they are small); False if `node`
        could not be reached. A create's new sandbox goes into this node's view at once (its watch
        follows)."""
        url = node.cluster_url + scope["raw_path"].decode("latin-1")
        try:
            response = await self.client.request(
                timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=API_CALL_TIMEOUT_S),
                method=scope["method"],
                url=url,
                params=scope.get("query_string", b"").decode("latin-1") or None,
                content=body,
                headers=self._headers(scope, principal, with_body=bool(body)),
            )
        except httpx.TransportError:
            return False
        if response.status_code == 201 and scope["path"] in COLLECTION:
            sandbox_id = str(response.json()["sandboxID"])
            self.node.view.owners.setdefault(sandbox_id, SandboxOwner(node.node_id, principal.team_id))
        await send_whole(send, response.status_code, response.headers.raw, response.content)
        return True

    def _headers(
        self, scope: Scope, principal: Principal | None, with_body: bool
    ) -> list[tuple[bytes, bytes]]:
        """The request's headers for the other node: no hop-by-hop ones, no cluster ones but ours,
        and, when this node speaks for the caller, not the caller's key (the other has its own).
        A request with a body goes on a connection of its own: the other node may answer before
        the body ends and then closes the connection (proxy/complete_close.py); pooled, it could
        be picked for the next request in the moment before its close arrives."""
        dropped = HOP_BY_HOP | {h.encode() for h in CLUSTER_HEADERS}
        if principal is not None:
            dropped |= {b"x-api-key", b"authorization", b"content-length"}
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in dropped]
        if with_body:
            headers.append((b"connection", b"close"))
        return headers + principal_headers(self.node.token, principal)

    async def _forward(
        self,
        node: NodeRecord,
        principal: Principal | None,
        scope: Scope,
        body: AsyncIterator[bytes] | None,
        send: Send,
    ) -> bool:
        """Relay the request to `node` and its answer back; False if the node could not be reached
        (nothing was sent back yet)."""
        headers = self._headers(scope, principal, with_body=body is not None)
        url = httpx.URL(node.cluster_url + scope["raw_path"].decode("latin-1"))
        if scope.get("query_string"):
            url = url.copy_with(query=scope["query_string"])
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError:
            return False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()
        return True


class _CreateAnswer:
    """A create's answer passed on, and the new sandbox's id kept if it was made (201)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._status = 0
        self._body = bytearray()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
        elif message["type"] == "http.response.body" and self._status == 201:
            self._body += message.get("body", b"")
        await self._send(message)

    @property
    def sandbox_id(self) -> str | None:
        if self._status != 201:
            return None
        try:
            return str(json.loads(self._body)["sandboxID"])
        except (ValueError, KeyError, TypeError):
            return None


class _BodyFirst:
    """A request's body read to its end before its answer starts, on the cluster listener.

    A node relaying a caller's upload writes the whole body before it reads the answer (httpx).
    When the answer comes first (a refused upload) the server closes the connection with the
    body's rest unread; over TLS the relaying node's next write then breaks its TLS stream, the
    answer waiting in it is lost, and the caller would get "node unreachable" for the other
    node's refusal. So the rest is read (and dropped) first. Whoever reads the last part, the
    app's own reader (quart reads bodies in a task of its own) or this, ends the wait."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._ended = trio.Event()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            self._ended.set()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self._ended.is_set():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_rest, nursery.cancel_scope)
                await self._ended.wait()
                nursery.cancel_scope.cancel()
        await self._send(message)

    async def _read_rest(self, done: trio.CancelScope) -> None:
        while not self._ended.is_set():
            await self.receive()
        done.cancel()


def _page_query(query: dict[str, list[str]], cursor: str | None) -> str:
    """The list's query for one node: the caller's, with that node's own cursor."""
    return urlencode({**query, **({"nextToken": [cursor]} if cursor else {})}, doseq=True)


async def _etcd_unavailable(send: Send, exc: EtcdError) -> None:
    await send_json_error(send, 503, f"the cluster's etcd is unavailable, retry later: {exc}")


async def send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    kept = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != b"content-length"]
    kept.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


async def _send_file(send: Send, fd: int, size: int) -> None:
    """The `size` bytes of the open file `fd` (then closed), chunk by chunk."""
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]
    with os.fdopen(fd, "rb") as file:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if size == 0:
            await send({"type": "http.response.body", "body": b""})
        left = size
        while left > 0:
            chunk = await trio.to_thread.run_sync(file.read, min(CHUNK, left))
            if not chunk:
                raise OSError(f"the file ended {left} bytes early")  # the client sees a short body
            left -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body"):
            return


async def _read_body(receive: Receive) -> bytes | None:
    body = bytearray()
    async for chunk in _body(receive):
        body.extend(chunk)
        if len(body) > MAX_CREATE_BODY:
            return None
    return bytes(body)


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then what the client sends (its disconnect)."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())

    return replay
