"""Running Python in a real guest's default kernel from the host, as the E2B SDKs do, over raw HTTP:
the code interpreter's `POST /execute` (NDJSON lines). Commands go through envd with
`appliance.cubelet.envd_client.run_command`.
"""

from __future__ import annotations

import json

import httpx

from appliance.runtime.base import CODE_INTERPRETER_PORT


async def execute_code(host: str, code: str, timeout: float = 60.0) -> list[dict[str, object]]:
    """Run Python in the guest's default kernel; the NDJSON events it streams back."""
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        response = await client.post(f"http://{host}:{CODE_INTERPRETER_PORT}/execute", json={"code": code})
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]
