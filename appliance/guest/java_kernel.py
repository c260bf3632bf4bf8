"""Java contexts: a small kernel of our own (JavaKernel.java) around JShell, on the guest's JDK.

The template compiles JavaKernel.java at build (into `java_kernel_classes/` beside it); without
that (a test host, an image the agent was copied into) the JDK's source launcher compiles it
in memory at each start, which costs about a second more.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from appliance.guest.kernel import KernelStartError
from appliance.guest.pipe_kernel import PipeKernel

SOURCE = Path(__file__).with_name("JavaKernel.java")
CLASSES = Path(__file__).with_name("java_kernel_classes")
JVM_OPTIONS = (
    # One small heap and no perf-data file: a guest has one vCPU and little memory.
    "-XX:+UseSerialGC",
    "-XX:-UsePerfData",
    "-XX:TieredStopAtLevel=1",  # the JIT's first tier only: a kernel starts and answers sooner
    "-Xshare:auto",
)


def _field(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _pairs(env_vars: dict[str, str]) -> str:
    return "".join(f"\t{_field(key)}:{_field(value)}" for key, value in env_vars.items())


class JavaKernel(PipeKernel):
    """Env vars reach Java code as system properties (Java cannot change its environment), as in
    E2B's template: the sandbox's from the start, an execution's for that execution."""

    language = "java"

    def argv(self) -> list[str]:
        java = shutil.which("java")
        if java is None or shutil.which("jshell") is None:
            raise KernelStartError("Java (a JDK with jshell) is not installed")
        if (CLASSES / "JavaKernel.class").is_file():
            return [java, *JVM_OPTIONS, "-cp", str(CLASSES), "JavaKernel"]
        return [java, *JVM_OPTIONS, str(SOURCE)]

    def startup_env(self) -> dict[str, str]:
        return self.spec.sandbox_env

    def execute_request(self, request_id: str, code: str, env_vars: dict[str, str]) -> bytes:
        return f"execute\t{request_id}\t{_field(code)}{_pairs(env_vars)}\n".encode()

    def env_request(self, env_vars: dict[str, str]) -> bytes:
        return f"env{_pairs(env_vars)}\n".encode()

    def interrupt_request(self) -> bytes | None:
        return b"interrupt\n"
