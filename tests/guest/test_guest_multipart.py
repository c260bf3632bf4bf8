"""The streaming multipart parser behind POST /files, fed in awkward chunk sizes."""

from __future__ import annotations

import random

import pytest

from appliance.guest.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart

BOUNDARY = "b0undary"
BODY = (
    b"preamble\r\n--b0undary\r\n"
    b'Content-Disposition: form-data; name="file"; filename="/home/user/a; \\"q\\".txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
    b"first\r\n--b0und not yet\r\n"
    b"\r\n--b0undary\r\n"
    b'Content-Disposition: form-data; name="file"; filename="/home/user/b.bin"\r\n\r\n'
    b"\x00\xff\r\n"
    b"\r\n--b0undary--\r\n"
)


def parse(chunks: list[bytes]) -> list[tuple[str | None, bytes]]:
    parser = MultipartParser(BOUNDARY)
    files: list[tuple[str | None, bytes]] = []
    for chunk in chunks:
        for event in parser.feed(chunk):
            if isinstance(event, PartStart):
                files.append((event.filename, b""))
            elif isinstance(event, PartData):
                files[-1] = (files[-1][0], files[-1][1] + event.data)
            else:
                assert isinstance(event, PartEnd)
    parser.finish()
    return files


EXPECTED = [('/home/user/a; "q".txt', b"first\r\n--b0und not yet\r\n"), ("/home/user/b.bin", b"\x00\xff\r\n")]


def test_whole_body() -> None:
    assert parse([BODY]) == EXPECTED


def test_byte_by_byte() -> None:
    assert parse([BODY[i : i + 1] for i in range(len(BODY))]) == EXPECTED


def test_random_chunking() -> None:
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(BODY)), 6))
        chunks = [BODY[a:b] for a, b in zip([0, *cuts], [*cuts, len(BODY)], strict=True)]
        assert parse(chunks) == EXPECTED


def test_truncated_body_is_an_error() -> None:
    with pytest.raises(MultipartError):
        parse([BODY[:-20]])
