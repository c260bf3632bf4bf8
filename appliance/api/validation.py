"""Request parsing for the control plane: strict types, size limits, clear 400 messages."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from typing import Any
from urllib.parse import parse_qsl

from quart import request

from appliance.api.errors import ApiError

MAX_TIMEOUT_S = 24 * 3600
MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 4096  # JSON-encoded size of the whole metadata object
MAX_ENV_VARS_BYTES = 64 * 1024
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_json_object(raw: bytes, *, required: bool = False) -> dict[str, Any]:
    if not raw.strip():
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


async def request_object(*, required: bool = False) -> dict[str, Any]:
    """The current request's JSON object body ({} when empty, unless `required`)."""
    raw = await request.get_data(as_text=False)
    return parse_json_object(raw if isinstance(raw, bytes) else raw.encode(), required=required)


def optional_bool(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be a boolean")
    return value


def timeout_seconds(data: dict[str, Any], key: str, default: int, *, minimum: int = 1) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ApiError(400, f"'{key}' must be a whole number of seconds")
    seconds = int(value)
    if seconds < minimum:
        allowed = "positive" if minimum > 0 else "0 (now) or positive"
        raise ApiError(400, f"'{key}' must be {allowed}, got {seconds}")
    if seconds > MAX_TIMEOUT_S:
        raise ApiError(400, f"'{key}' must be at most {MAX_TIMEOUT_S} seconds, got {seconds}")
    return seconds


def string_map(
    data: dict[str, Any], key: str, *, max_bytes: int, max_entries: int | None = None
) -> dict[str, str]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{key}' must be an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ApiError(400, f"'{key}.{k}' must be a string")
        if not k:
            raise ApiError(400, f"'{key}' keys must not be empty")
    if max_entries is not None and len(value) > max_entries:
        raise ApiError(400, f"'{key}' has {len(value)} entries; at most {max_entries} are allowed")
    size = len(json.dumps(value).encode())
    if size > max_bytes:
        raise ApiError(400, f"'{key}' is {size} bytes; at most {max_bytes} are allowed")
    return dict(value)


def metadata(data: dict[str, Any]) -> dict[str, str]:
    return string_map(data, "metadata", max_bytes=MAX_METADATA_BYTES, max_entries=MAX_METADATA_ENTRIES)


def env_vars(data: dict[str, Any]) -> dict[str, str]:
    envs = string_map(data, "envVars", max_bytes=MAX_ENV_VARS_BYTES)
    for name, value in envs.items():
        if not ENV_NAME.match(name):
            raise ApiError(400, f"'envVars' name {name!r} is not a valid environment variable name")
        if "\0" in value:
            raise ApiError(400, f"'envVars.{name}' contains a NUL byte")
    return envs


def string_list(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{key!r} must be a list of strings")
    return list(value)


def optional_object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{key}' must be an object")
    return value


def parse_metadata_query(text: str | None) -> dict[str, str]:
    """The list filter `metadata=k%3Dv%26k2%3Dv2` (the SDK URL-encodes the pairs twice)."""
    if not text:
        return {}
    return dict(parse_qsl(text, keep_blank_values=True))


def parse_states(text: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not text:
        return allowed
    states = tuple(s.strip() for s in text.split(",") if s.strip())
    for state in states:
        if state not in allowed:
            raise ApiError(400, f"unknown state {state!r}; expected one of {', '.join(allowed)}")
    return states


def parse_limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIST_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST_LIMIT:
        raise ApiError(400, f"'limit' must be an integer between 1 and {MAX_LIST_LIMIT}")
    return int(text)


def parse_rfc3339(text: str | None, key: str) -> float | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise ApiError(400, f"'{key}' must be an RFC3339 timestamp") from exc


def unix_seconds(text: str | None, key: str) -> int | None:
    """A query's unix time in whole seconds (E2B's metrics range), or None if absent."""
    if text is None or text == "":
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise ApiError(400, f"'{key}' must be a unix time in seconds")
    return int(text)


def encode_page_token(started_at: float, sandbox_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([started_at, sandbox_id]).encode()).decode().rstrip("=")


def decode_page_token(token: str | None) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        started_at, sandbox_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return float(started_at), str(sandbox_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ApiError(400, "'nextToken' is not a token this server issued") from exc
