"""The one readiness probe: does a port in the guest answer yet?

A probe is a TCP connect (no path) or an HTTP GET of a path that answers below 400.
Runtimes use it to tell when a booting guest's agent is up (uml: envd's /health;
kvm: the template's probe port), template builds to tell when the template's own
service is (its probe), and `cube bench agent` to time an agent's start-up. Each
attempt has its own bound; how long to keep trying is the caller's cancel scope.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import trio


class ReadinessProbe:
    def __init__(self, endpoint: tuple[str, int], path: str | None, attempt_timeout_s: float) -> None:
        self.endpoint = endpoint
        self.path = path
        self.attempt_timeout_s = attempt_timeout_s
        self.last_error = "no attempt finished"  # why the last attempt got no answer

    def describe(self) -> str:
        return f"GET {self.path}" if self.path is not None else "TCP connect"

    async def attempt(self) -> bool:
        """One try: True if it answered; else False, with the reason in `last_error`."""
        host, port = self.endpoint
        with trio.move_on_after(self.attempt_timeout_s):
            try:
                if self.path is None:
                    stream = await trio.open_tcp_stream(host, port)
                    await stream.aclose()
                    return True
                # Plain HTTP: without verify=False the client would load the CA bundle (~0.1 s).
                async with httpx.AsyncClient(timeout=None, trust_env=False, verify=False) as client:
                    response = await client.get(f"http://{host}:{port}/{self.path.lstrip('/')}")
            except (OSError, httpx.HTTPError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                return False
            if response.status_code < 400:
                return True
            self.last_error = f"HTTP {response.status_code}"
            return False
        self.last_error = f"no answer within {self.attempt_timeout_s:g} s"
        return False

    async def wait(self, period_s: float, *, gave_up: Callable[[], bool] = lambda: False) -> bool:
        """Try every `period_s` until an attempt answers (True) or `gave_up()` says to stop (False)."""
        while not gave_up():
            if await self.attempt():
                return True
            await trio.sleep(period_s)
        return False
