"""`cube bench create` through the API, against the service with the fake runtime.

The numbers are not asserted (speed lives in benchmarks); what is asserted is that
the bench measures what it says: every create it counts was a 201, the sustained
loop reports a rate, and it leaves no sandbox behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import trio

from appliance.api.client import ApiClient
from appliance.bench.create import run_api_create_bench

if TYPE_CHECKING:
    from conftest import ServiceHarness


def test_create_rounds_and_sustained_loop_leave_nothing(service: ServiceHarness, api_key: str) -> None:
    api = ApiClient(service.url, api_key)
    report = trio.run(run_api_create_bench, api, "code-interpreter", (1, 3), 4, 1.0, 2.0, 2)

    rounds = [row for row in report.rows if row["path"] == "api"]
    assert [row["concurrency"] for row in rounds] == [1, 3]
    assert all(row["errors"] == 0 and row["n"] == 4 for row in rounds)
    (sustained,) = [row for row in report.rows if str(row["path"]).startswith("api sustained")]
    assert sustained["errors"] == 0
    assert sustained["n"] >= 1
    assert isinstance(sustained["per_s"], float) and sustained["per_s"] > 0
    assert len(report.samples["sustained c=2"]) == sustained["n"]

    listed = httpx.get(f"{service.url}/v2/sandboxes", headers={"X-API-KEY": api_key})
    assert listed.status_code == 200
    assert listed.json() == []
