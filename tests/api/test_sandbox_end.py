"""A sandbox that ends ends its in-flight traffic: the router stops waiting for a guest that is gone.

A killed UML guest does not close its TCP connections (its network namespace just goes
away), so a forward that waits for the guest's next byte would wait forever. These
tests stand a "silent guest" port in for such a guest: it answers (or not) and then
holds the connection open without a word, whatever happens to the sandbox. E2B's SDKs
expect what E2B's proxy does: the stream is cut off, and the SDK's follow-up /health
gets 502 "was not found", so `run_code` / `commands.run` raise promptly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness

SILENT_PORT = 49999  # the code interpreter's port: run_code streams from it
# Bounds for "promptly": far above the few milliseconds it takes, far below "forever".
CLIENT_READ_TIMEOUT_S = 60.0
PROMPT_S = 20.0
KILL_AFTER_S = 1.0


class SilentGuest:
    """A TCP port that reads a request, optionally answers a streaming head and one chunk, then
    says nothing more and never closes. Records when its peer (the router) lets go."""

    def __init__(self, answer_head: bool) -> None:
        self.answer_head = answer_head
        self.requests = 0
        self.released = threading.Event()  # the router closed its side of a connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            request = b""
            while b"\r\n\r\n" not in request and not self._stop.is_set():
                try:
                    request += conn.recv(65536)
                except TimeoutError:
                    continue
            self.requests += 1
            if self.answer_head:
                line = b'{"type": "stdout", "text": "started\\n"}\n'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + f"{len(line):x}\r\n".encode() + line + b"\r\n"
                )
            while not self._stop.is_set():  # silent from here on, whatever the sandbox does
                try:
                    if conn.recv(65536) == b"":
                        self.released.set()
                        return
                except TimeoutError:
                    continue
                except OSError:
                    self.released.set()
                    return


def create_sandbox(service: ServiceHarness, api_key: str) -> dict[str, str]:
    response = httpx.post(f"{service.url}/v2/sandboxes", json={}, headers={"X-API-KEY": api_key})
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture
def silent_guest(request: pytest.FixtureRequest) -> Iterator[SilentGuest]:
    guest = SilentGuest(answer_head=bool(request.param))
    yield guest
    guest.close()


def route_port_to(fake_runtime: FakeRuntime, sandbox_id: str, port: int, target: SilentGuest) -> None:
    """The sandbox's `port` is the silent guest (its other ports stay the guest double's)."""
    instance = fake_runtime.instances[sandbox_id]
    own = instance.endpoint
    instance.endpoint = lambda p: ("127.0.0.1", target.port) if p == port else own(p)  # type: ignore[method-assign]


def kill_soon(service: ServiceHarness, api_key: str, sandbox_id: str, after_s: float) -> threading.Thread:
    def kill() -> None:
        time.sleep(after_s)
        httpx.delete(f"{service.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": api_key})

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


@pytest.mark.parametrize("silent_guest", [True], indirect=True)
def test_a_stream_in_flight_is_cut_off_when_its_sandbox_is_killed(
    service: ServiceHarness, fake_runtime: FakeRuntime, api_key: str, silent_guest: SilentGuest
) -> None:
    created = create_sandbox(service, api_key)
    sandbox_id = created["sandboxID"]
    route_port_to(fake_runtime, sandbox_id, SILENT_PORT, silent_guest)
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(SILENT_PORT)}
    timeout = httpx.Timeout(CLIENT_READ_TIMEOUT_S)
    with httpx.stream(
        "POST", f"{service.url}/execute", json={}, headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert "started" in next(lines)
        killed_at = time.monotonic()
        kill_soon(service, api_key, sandbox_id, 0).join()
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in lines:
                pass
    assert time.monotonic() - killed_at < PROMPT_S
    # The router let go of the guest's connection too, and the SDK's follow-up learns why.
    assert silent_guest.released.wait(PROMPT_S)
    health = httpx.get(f"{service.url}/health", headers={"E2b-Sandbox-Id": sandbox_id})
    assert health.status_code == 502 and "was not found" in health.json()["message"]


@pytest.mark.parametrize("silent_guest", [False], indirect=True)
def test_a_request_still_waiting_for_its_answer_gets_502_was_not_found(
    service: ServiceHarness, fake_runtime: FakeRuntime, api_key: str, silent_guest: SilentGuest
) -> None:
    sandbox_id = create_sandbox(service, api_key)["sandboxID"]
    route_port_to(fake_runtime, sandbox_id, SILENT_PORT, silent_guest)
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(SILENT_PORT)}
    killer = kill_soon(service, api_key, sandbox_id, KILL_AFTER_S)
    started = time.monotonic()
    response = httpx.post(
        f"{service.url}/contexts", json={}, headers=headers, timeout=httpx.Timeout(CLIENT_READ_TIMEOUT_S)
    )
    killer.join()
    assert time.monotonic() - started < PROMPT_S
    assert silent_guest.requests == 1  # it did reach the guest before the kill
    assert response.status_code == 502
    assert response.json() == {"code": 502, "message": f"The sandbox {sandbox_id} was not found"}


@pytest.mark.parametrize("silent_guest", [True], indirect=True)
def test_run_code_raises_promptly_when_its_sandbox_is_killed(
    sdk_env: ServiceHarness, fake_runtime: FakeRuntime, api_key: str, silent_guest: SilentGuest
) -> None:
    """The unmodified SDK: a kill during run_code is the SDK's "sandbox was killed" error, not a hang."""
    sandbox = Sandbox.create(timeout=300)
    route_port_to(fake_runtime, sandbox.sandbox_id, SILENT_PORT, silent_guest)
    killer = kill_soon(sdk_env, api_key, sandbox.sandbox_id, KILL_AFTER_S)
    started = time.monotonic()
    with pytest.raises(TimeoutException, match="sandbox was killed while the request was in progress"):
        sandbox.run_code("import time; time.sleep(300)", timeout=300)
    killer.join()
    assert time.monotonic() - started < PROMPT_S


@pytest.mark.parametrize("silent_guest", [False], indirect=True)
def test_a_request_waiting_on_a_sandbox_that_is_paused_gets_502_was_paused(
    service: ServiceHarness, fake_runtime: FakeRuntime, api_key: str, silent_guest: SilentGuest
) -> None:
    # A paused guest answers nothing (UML's mconsole `stop` freezes it): E2B's proxy answers 502,
    # which the SDKs' is_running() reads as "not running" (python-sdk test_create.py's
    # test_keep_memory_none_defaults_to_full_memory polls it through the pause).
    sandbox_id = create_sandbox(service, api_key)["sandboxID"]
    route_port_to(fake_runtime, sandbox_id, SILENT_PORT, silent_guest)
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(SILENT_PORT)}

    def pause() -> None:
        time.sleep(KILL_AFTER_S)
        paused = httpx.post(f"{service.url}/sandboxes/{sandbox_id}/pause", headers={"X-API-KEY": api_key})
        assert paused.status_code == 204, paused.text

    pauser = threading.Thread(target=pause)
    pauser.start()
    started = time.monotonic()
    response = httpx.post(
        f"{service.url}/contexts", json={}, headers=headers, timeout=httpx.Timeout(CLIENT_READ_TIMEOUT_S)
    )
    pauser.join()
    assert time.monotonic() - started < PROMPT_S
    assert silent_guest.requests == 1
    assert response.json() == {"code": 502, "message": f"The sandbox {sandbox_id} was paused"}
    assert silent_guest.released.wait(PROMPT_S)  # the router let go of the frozen guest

    resumed = httpx.post(
        f"{service.url}/sandboxes/{sandbox_id}/resume", json={"timeout": 60}, headers={"X-API-KEY": api_key}
    )
    assert resumed.status_code == 201, resumed.text
    # The resumed run's requests reach the guest again: this one waits on it (until the kill).
    answers: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{service.url}/contexts",
                json={},
                headers=headers,
                timeout=httpx.Timeout(CLIENT_READ_TIMEOUT_S),
            )
        )
    )
    waiting.start()
    deadline = time.monotonic() + PROMPT_S
    while silent_guest.requests < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert silent_guest.requests == 2 and answers == [], "reached the guest, still waiting on it"
    killed = httpx.delete(f"{service.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": api_key})
    assert killed.status_code == 204, killed.text
    waiting.join(PROMPT_S)
    assert [a.json() for a in answers] == [
        {"code": 502, "message": f"The sandbox {sandbox_id} was not found"}
    ]
