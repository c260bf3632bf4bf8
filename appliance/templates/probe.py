"""The template's readiness probe (`appliance.runtime.readiness`): TCP connect, or HTTP GET of
probe_path, until it answers; a build whose probe never answers fails with ProbeFailed."""

from __future__ import annotations

import trio

from appliance.runtime.readiness import ReadinessProbe
from appliance.templates.jobs import BuildStepFailed


class ProbeFailed(BuildStepFailed):
    """The template's probe did not answer; the build that ran it fills in the guest's console."""

    def __init__(self, message: str) -> None:
        super().__init__(message, step="finalize")


async def wait_until_ready(
    endpoint: tuple[str, int], path: str | None, timeout_s: float, period_s: float
) -> float:
    """Probe every `period_s` until success or `timeout_s`; returns the seconds it took."""
    probe = ReadinessProbe(endpoint, path, attempt_timeout_s=max(1.0, period_s))
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        await probe.wait(period_s)
        return trio.current_time() - started
    raise ProbeFailed(
        f"probe ({probe.describe()} on guest port {endpoint[1]}) did not succeed within {timeout_s:g}s: "
        f"{probe.last_error}"
    )
