"""A streaming multipart/form-data parser: parts are written out as they arrive, never buffered whole."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PartStart:
    name: str | None
    filename: str | None


@dataclass
class PartData:
    data: bytes


class PartEnd:
    pass


Event = PartStart | PartData | PartEnd
MAX_HEADER_BYTES = 64 * 1024


class MultipartError(ValueError):
    pass


def boundary_of(content_type: str) -> str | None:
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip().strip('"')
    return None


def _disposition_parameters(value: str) -> dict[str, str]:
    """Parameters of a Content-Disposition value; quoted strings may contain `;` and `\\"`."""
    parameters: dict[str, str] = {}
    index = value.find(";")
    while 0 <= index < len(value):
        index += 1
        equals = value.find("=", index)
        if equals < 0:
            break
        key = value[index:equals].strip().lower()
        index = equals + 1
        if index < len(value) and value[index] == '"':
            chars = []
            index += 1
            while index < len(value) and value[index] != '"':
                if value[index] == "\\" and index + 1 < len(value):
                    index += 1
                chars.append(value[index])
                index += 1
            parameters[key] = "".join(chars)
            index = value.find(";", index)
        else:
            end = value.find(";", index)
            parameters[key] = value[index : end if end >= 0 else len(value)].strip()
            index = end
    return parameters


class MultipartParser:
    """Feed body chunks, get PartStart / PartData / PartEnd events back."""

    def __init__(self, boundary: str) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # The body starts with the delimiter minus its CRLF; pretend the CRLF was there.
        self._buffer = bytearray(b"\r\n")
        self._state = "preamble"

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        steps = {
            "preamble": self._skip_preamble,
            "after_delimiter": self._after_delimiter,
            "headers": self._read_headers,
            "body": self._read_body,
        }
        # Each step consumes what it can; False: it needs more data (or the body is done).
        while (step := steps.get(self._state)) is not None and step(events):
            pass
        return events

    def _skip_preamble(self, events: list[Event]) -> bool:
        index = self._buffer.find(self._delimiter)
        if index < 0:
            del self._buffer[: max(0, len(self._buffer) - len(self._delimiter))]
            return False
        del self._buffer[: index + len(self._delimiter)]
        self._state = "after_delimiter"
        return True

    def _after_delimiter(self, events: list[Event]) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] == b"--":
            self._state = "done"
            return False
        line_end = self._buffer.find(b"\r\n")
        if line_end < 0:
            return False
        del self._buffer[: line_end + 2]  # transport padding after the delimiter
        self._state = "headers"
        return True

    def _read_headers(self, events: list[Event]) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise MultipartError("part headers too large")
            return False
        events.append(self._part_start(bytes(self._buffer[:end])))
        del self._buffer[: end + 4]
        self._state = "body"
        return True

    def _read_body(self, events: list[Event]) -> bool:
        index = self._buffer.find(self._delimiter)
        if index < 0:
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                events.append(PartData(bytes(self._buffer[:-keep])))
                del self._buffer[:-keep]
            return False
        if index:
            events.append(PartData(bytes(self._buffer[:index])))
        events.append(PartEnd())
        del self._buffer[: index + len(self._delimiter)]
        self._state = "after_delimiter"
        return True

    def finish(self) -> None:
        if self._state != "done":
            raise MultipartError("multipart body ended before its closing boundary")

    @staticmethod
    def _part_start(raw_headers: bytes) -> PartStart:
        name = filename = None
        for line in raw_headers.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                parameters = _disposition_parameters(value)
                name = parameters.get("name")
                filename = parameters.get("filename")
        return PartStart(name, filename)
