"""The template's readiness probe: TCP connect, or HTTP GET of probe_path, until it answers."""

from __future__ import annotations

import httpx
import trio


class ProbeFailed(Exception):
    console_tail = ""  # the guest's console, filled in by the build that ran the probe


async def _probe_once(host: str, port: int, path: str | None, attempt_timeout_s: float) -> None:
    if path is None:
        with trio.fail_after(attempt_timeout_s):
            stream = await trio.open_tcp_stream(host, port)
        await stream.aclose()
        return
    async with httpx.AsyncClient(timeout=attempt_timeout_s) as client:
        response = await client.get(f"http://{host}:{port}/{path.lstrip('/')}")
    if response.status_code >= 400:
        raise ProbeFailed(f"HTTP {response.status_code}")


async def wait_until_ready(
    endpoint: tuple[str, int], path: str | None, timeout_s: float, period_s: float
) -> float:
    """Probe every `period_s` until success or `timeout_s`; returns the seconds it took."""
    host, port = endpoint
    what = f"GET {path}" if path is not None else "TCP connect"
    started = trio.current_time()
    last_error = "no attempt finished"
    with trio.move_on_after(timeout_s):
        while True:
            try:
                await _probe_once(host, port, path, max(1.0, period_s))
                return trio.current_time() - started
            except (OSError, httpx.HTTPError, trio.TooSlowError, ProbeFailed) as exc:
                last_error = str(exc) or type(exc).__name__
            await trio.sleep(period_s)
    raise ProbeFailed(
        f"probe ({what} on guest port {port}) did not succeed within {timeout_s:g}s: {last_error}"
    )
