"""Connect framing edge cases over raw HTTP/1.1 (a Trio socket), below what the SDKs exercise."""

from __future__ import annotations

import base64
import json
import struct

import h11
import trio
from connect_wire import envelope, parse_envelopes

HOST, ENVD_PORT, INTERPRETER_PORT = "127.0.0.1", 49983, 49999


async def exchange(
    path: str,
    headers: list[tuple[str, str]],
    chunks: list[bytes],
    port: int = ENVD_PORT,
    read_delay_s: float = 0.0,
) -> tuple[h11.Response, bytes]:
    """One request whose body goes out chunked (as connectrpc sends streams); the whole response back."""
    stream = await trio.open_tcp_stream(HOST, port)
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=path,
        headers=[("Host", f"localhost:{port}"), ("Transfer-Encoding", "chunked"), *headers],
    )
    async with stream:
        await stream.send_all(connection.send(request))
        for chunk in chunks:
            await stream.send_all(connection.send(h11.Data(data=chunk)))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        await trio.sleep(read_delay_s)  # a slow client: the agent's writes back up meanwhile
        response: h11.Response | None = None
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, body


STREAM = [("Content-Type", "application/connect+json"), ("Connect-Protocol-Version", "1")]
UNARY = [("Content-Type", "application/json"), ("Connect-Protocol-Version", "1")]


async def test_start_stream_with_split_chunks_ends_with_end_stream(agent) -> None:
    request = envelope({"process": {"cmd": "/bin/echo", "args": ["framed"]}, "stdin": False})
    response, body = await exchange("/process.Process/Start", STREAM, [request[:3], request[3:]])
    assert response.status_code == 200
    messages = parse_envelopes(body)
    assert "start" in messages[0][1]["event"]
    assert messages[-2][1]["event"]["end"]["exitCode"] == 0
    assert messages[-1] == (2, {})


async def test_slow_client_gets_all_output_of_a_finished_command(agent) -> None:
    script = "import sys; sys.stdout.write('x' * 8_000_000)"
    request = envelope({"process": {"cmd": "python3", "args": ["-c", script]}, "stdin": False})
    _response, body = await exchange("/process.Process/Start", STREAM, [request], read_delay_s=1.0)
    events = [message["event"] for flags, message in parse_envelopes(body) if flags == 0]
    received = sum(len(base64.b64decode(e["data"]["stdout"])) for e in events if "data" in e)
    assert received == 8_000_000 and events[-1]["end"]["exitCode"] == 0


async def test_deadline_exceeded_ends_the_stream_and_kills(agent) -> None:
    headers = [*STREAM, ("Connect-Timeout-Ms", "300")]
    request = envelope({"process": {"cmd": "/bin/sleep", "args": ["30"]}})
    with trio.fail_after(10):
        response, body = await exchange("/process.Process/Start", headers, [request])
    flags, end = parse_envelopes(body)[-1]
    assert response.status_code == 200 and flags == 2
    assert end["error"]["code"] == "deadline_exceeded"


async def test_keepalive_messages_on_a_quiet_stream(agent) -> None:
    headers = [*STREAM, ("Keepalive-Ping-Interval", "1")]
    request = envelope({"process": {"cmd": "/bin/sleep", "args": ["2.5"]}})
    _response, body = await exchange("/process.Process/Start", headers, [request])
    events = [message["event"] for flags, message in parse_envelopes(body) if flags == 0]
    assert sum("keepalive" in event for event in events) >= 2


async def test_bad_json_unary_is_invalid_argument(agent) -> None:
    response, body = await exchange("/filesystem.Filesystem/Stat", UNARY, [b"{not json"])
    assert response.status_code == 400 and json.loads(body)["code"] == "invalid_argument"


async def test_bad_json_in_a_stream_is_an_end_stream_error(agent) -> None:
    response, body = await exchange("/process.Process/Start", STREAM, [struct.pack(">BI", 0, 3) + b"{x}"])
    assert response.status_code == 200
    assert parse_envelopes(body)[-1][1]["error"]["code"] == "invalid_argument"


async def test_unknown_method_is_unimplemented(agent) -> None:
    response, body = await exchange("/process.Process/Nope", UNARY, [b"{}"])
    assert response.status_code == 404 and json.loads(body)["code"] == "unimplemented"


async def test_unreadable_and_bad_paths_are_connect_codes_not_500(agent) -> None:
    cases = {
        "/no/such/path": ("not_found", 404),
        str(agent.home / "scratch"): (None, 200),
    }
    for path, (code, status) in cases.items():
        response, body = await exchange(
            "/filesystem.Filesystem/Stat", UNARY, [json.dumps({"path": path}).encode()]
        )
        assert response.status_code == status
        if code:
            assert json.loads(body)["code"] == code
    (agent.scratch / "a-file").write_text("f")
    response, body = await exchange(
        "/filesystem.Filesystem/ListDir",
        UNARY,
        [json.dumps({"path": str(agent.scratch / "a-file")}).encode()],
    )
    assert json.loads(body)["code"] == "invalid_argument"
    response, body = await exchange(
        "/filesystem.Filesystem/MakeDir",
        UNARY,
        [json.dumps({"path": str(agent.scratch / "a-file/x")}).encode()],
    )
    assert response.status_code < 500 and json.loads(body)["code"] == "invalid_argument"


async def test_unary_with_wrong_content_type(agent) -> None:
    response, _body = await exchange("/filesystem.Filesystem/Stat", [("Content-Type", "text/plain")], [b"{}"])
    assert response.status_code == 415


async def test_execute_accepts_a_chunked_body(agent) -> None:
    body = json.dumps({"code": "print('chunked')"}).encode()
    response, stream = await exchange(
        "/execute", [("Content-Type", "application/json")], [body[:5], body[5:]], port=INTERPRETER_PORT
    )
    events = [json.loads(line) for line in stream.decode().splitlines()]
    stdout = "".join(event["text"] for event in events if event["type"] == "stdout")
    assert response.status_code == 200 and stdout == "chunked\n", events
