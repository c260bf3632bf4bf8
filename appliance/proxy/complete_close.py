"""The outermost ASGI layer: a response's last send completes even when the app is being cancelled.

Hypercorn (0.18) recycles a keep-alive connection only when the request was read to its end.
When the app answers before that (a 401 to an upload, a 204 to a chunked DELETE whose final
`0\\r\\n\\r\\n` had not arrived yet), hypercorn closes the connection instead, and it does so
inside the app's last `send`. quart-trio cancels its own nursery as that send delivers
`http.disconnect`, so the close was cut at its first checkpoint: the socket stayed open, nothing
read it any more, and the client, which had a complete keep-alive response, sent its next request
on it and waited forever. (This was the cluster's intermittent "GET after DELETE hangs": the node
hop forwarded bodyless calls as empty chunked streams; docs/CLUSTER.md.) Shielding the last send
lets the close finish: the client sees the connection closed and opens another.
"""

from __future__ import annotations

import trio

from appliance.proxy.router import ASGIApp, Message, Receive, Scope, Send


class CompleteClose:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_last_shielded(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    return await send(message)
            await send(message)

        await self.app(scope, receive, send_last_shielded)
