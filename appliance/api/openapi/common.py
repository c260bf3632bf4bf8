"""The pieces every part of the OpenAPI document is written with."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
UNIX_SECONDS: Schema = {"type": "integer", "minimum": 0, "maximum": 999999999999}
BOOLEAN: Schema = {"type": "boolean"}
STRINGS: Schema = {"type": "array", "items": STRING}
STRING_MAP: Schema = {"type": "object", "additionalProperties": STRING}
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(status: str, schema: Schema | None = None, *errors: str) -> Schema:
    ok: Schema = {"description": "success"}
    if schema is not None:
        ok.update(_json(schema))
    found: Schema = {status: ok}
    for error in ("400", "401", *errors):
        found[error] = {"description": "error", **_json(ERROR_REF)}
    return found


def operation(
    summary: str,
    status: str,
    response: Schema | None = None,
    *,
    body: Schema | None = None,
    query: dict[str, Schema] | None = None,
    errors: tuple[str, ...] = ("404",),
    public: bool = False,
) -> Schema:
    operation: Schema = {"summary": summary, "responses": _responses(status, response, *errors)}
    if body is not None:
        operation["requestBody"] = {"required": False, **_json(body)}
    if query:
        operation["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in query.items()
        ]
    if public:
        operation["security"] = []
    return operation


def path_parameter(name: str) -> list[Schema]:
    return [{"name": name, "in": "path", "required": True, "schema": STRING}]


SANDBOX = path_parameter("sandboxID")
