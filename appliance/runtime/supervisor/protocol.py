"""What the service and a supervisor say to each other, as plain data (no I/O here).

- `LaunchSpec`: everything a supervisor needs to start its guest, handed over once on
  its stdin (it holds no secret of the guest's: the boot token is in the launcher's
  argv, which the chain passes on).
- `SupervisorRecord` (`supervisor.json` in its control directory): who the supervisor
  is (pid and start time) and the runtime's description of its guest, for the service
  that re-adopts it after a restart.
- `GuestExit` (`exit.json`): how the guest ended, for a service that was not connected
  when it did.
- The control protocol: JSON lines over the Unix socket `control.sock`. A client
  sends one `Request` line; the supervisor answers one `Reply` line and closes, except
  for `watch`, which answers the guest's state at once and again after every change,
  until the guest has ended (the last state carries its `exit`). Lines are bounded
  (`MAX_REQUEST_BYTES`, `MAX_REPLY_BYTES`); anything that is not a well-formed request
  is answered `ok: false` with the reason and the connection is closed.

Every load checks types field by field (`ProtocolError`): the supervisor reads what a
client wrote, the service reads what a supervisor (perhaps of an older release) wrote.
Fields are only ever added, with defaults; `PROTOCOL_VERSION` changes when a change
would not be understood by the other side.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from appliance.process_identity import ProcessIdentity

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1024
MAX_REPLY_BYTES = 64 << 10
MAX_SPEC_BYTES = 1 << 20
# The supervisor zygote (zygote.py): its argument, and the one request it takes (with three fds).
ZYGOTE_ARGUMENT = "zygote"
FORK_REQUEST = b"fork"
MAX_FORK_REQUEST_BYTES = 64
CONSOLE_TAIL_MAX_BYTES = 8192  # what `console` answers at most (the console pump keeps as much)

# In a supervisor's control directory (root's, 0700).
CONTROL_SOCKET = "control.sock"
RECORD_FILE = "supervisor.json"
EXIT_FILE = "exit.json"
LOG_FILE = "supervisor.log"


class ProtocolError(ValueError):
    """A message that is not what the protocol allows; the text says why."""


class Op(enum.StrEnum):
    STATE = "state"  # the guest's state now
    WATCH = "watch"  # the state now, then after every change, until the guest has ended
    PAUSE = "pause"  # freeze the guest (uml: mconsole `stop`; kvm: the vCPUs); answers the new state
    RESUME = "resume"  # uml: mconsole `go`; kvm: the vCPUs run again
    KILL = "kill"  # kill the guest; answered once all of it is reaped (the state with its exit)
    CONSOLE = "console"  # the console's last `max_bytes` (at most CONSOLE_TAIL_MAX_BYTES)
    METRICS = "metrics"  # memory charged, balloon, console bytes, uptime
    # Write the whole machine into the guest's own snapshot directory (kvm only; the owner
    # chooses where, never the request): answered once written, the guest running again.
    SNAPSHOT = "snapshot"
    # Plug the volume image the owner made in the guest's own directory into volume slot `slot`
    # (kvm only: runtime/kvm/volumes.py; the request names a slot, never a path).
    ATTACH_DISK = "attach_disk"


@dataclass(frozen=True)
class Request:
    op: Op
    max_bytes: int = CONSOLE_TAIL_MAX_BYTES
    slot: int = 0  # attach_disk's; sent only with it (an older supervisor knows no such field)

    def encode(self) -> bytes:
        data: dict[str, Any] = {"op": self.op.value, "max_bytes": self.max_bytes}
        if self.op is Op.ATTACH_DISK:
            data["slot"] = self.slot
        return _line(data, MAX_REQUEST_BYTES)

    @classmethod
    def decode(cls, line: bytes) -> Request:
        data = _parse(line, MAX_REQUEST_BYTES)
        op = data.get("op")
        if op not in set(Op):
            raise ProtocolError(f"unknown op {op!r}")
        max_bytes = data.get("max_bytes", CONSOLE_TAIL_MAX_BYTES)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ProtocolError(f"max_bytes must be a non-negative integer, not {max_bytes!r}")
        slot = data.get("slot", 0)
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
            raise ProtocolError(f"slot must be a non-negative integer, not {slot!r}")
        unknown = set(data) - {"op", "max_bytes", "slot"}
        if unknown:
            raise ProtocolError(f"unknown request fields {sorted(unknown)}")
        return cls(Op(op), min(max_bytes, CONSOLE_TAIL_MAX_BYTES), slot)


@dataclass(frozen=True)
class GuestExit:
    """How the guest ended: its launcher's exit status (negative: killed by that signal; None
    when the supervisor could not tell), why, and the console's last words."""

    status: int | None
    reason: str
    console_tail: str = ""


@dataclass(frozen=True)
class GuestState:
    sandbox_id: str
    first_output: bool = False  # the guest kernel wrote anything (it runs)
    agent_ready: bool = False  # CUBE-AGENT-READY: envd answers
    interpreter_ready: bool = False  # CUBE-INTERPRETER-READY: the default Python kernel answers
    paused: bool = False
    exit: GuestExit | None = None


@dataclass(frozen=True)
class Reply:
    ok: bool
    error: str = ""
    state: GuestState | None = None
    console: str | None = None
    metrics: dict[str, float] | None = None

    def encode(self) -> bytes:
        return _line(dataclasses.asdict(self), MAX_REPLY_BYTES)

    @classmethod
    def decode(cls, line: bytes) -> Reply:
        return load(cls, _parse(line, MAX_REPLY_BYTES))

    @classmethod
    def failed(cls, error: str) -> Reply:
        return cls(ok=False, error=error)


@dataclass(frozen=True)
class LaunchSpec:
    sandbox_id: str
    control_dir: str
    argv: list[str]  # the launcher chain (runtime/uml/command.py)
    env: dict[str, str]
    seccomp_fd: int  # inherited at this number; the chain's `bwrap --seccomp` reads it
    console_log: str
    console_limit: int
    uid: int  # the sandbox's
    vm_dir: str  # the guest uid's directory: the mconsole socket and the balloon socket are in it
    mconsole_socket: str
    reply_dir: str
    balloon: bool  # serve a virtio-balloon at <vm_dir>/balloon (the kernel was told to connect)
    cgroup_version: int
    guest_cgroup: dict[str, str]  # the guest's leaves (runtime/uml/cgroups.SandboxCgroup)
    supervisor_cgroup: list[str]  # cgroup.procs files the supervisor moves itself into first
    guest: dict[str, Any] = field(default_factory=dict)  # the runtime's, handed back in the record
    protocol: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return _line(dataclasses.asdict(self), MAX_SPEC_BYTES)

    @classmethod
    def decode(cls, data: bytes) -> LaunchSpec:
        return load(cls, _parse(data, MAX_SPEC_BYTES))


@dataclass(frozen=True)
class SupervisorRecord:
    sandbox_id: str
    pid: int
    start_time: int
    venv: str  # the interpreter's prefix it runs from (`cube upgrade` keeps that venv while it runs)
    started_unix: float
    guest: dict[str, Any] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_time)

    def encode(self) -> bytes:
        return _line(dataclasses.asdict(self), MAX_SPEC_BYTES)

    @classmethod
    def decode(cls, data: bytes) -> SupervisorRecord:
        return load(cls, _parse(data, MAX_SPEC_BYTES))


def encode_message(message: Any, limit: int = MAX_SPEC_BYTES) -> bytes:
    """A dataclass as one JSON line (ProtocolError if over `limit`)."""
    return _line(dataclasses.asdict(message), limit)


def decode_message(cls: type[T], data: bytes, limit: int = MAX_SPEC_BYTES) -> T:
    """A dataclass from one JSON line, every field's type checked (ProtocolError otherwise)."""
    return load(cls, _parse(data, limit))


def encode_exit(exit: GuestExit) -> bytes:
    return _line(dataclasses.asdict(exit), MAX_REPLY_BYTES)


def decode_exit(data: bytes) -> GuestExit:
    return load(GuestExit, _parse(data, MAX_REPLY_BYTES))


# Loading checked dataclasses from JSON.

T = TypeVar("T")


def load(cls: type[T], data: object) -> T:
    """`cls(**data)` with every field's type checked; unknown keys are ignored (a newer writer's)
    and missing ones take their defaults. ProtocolError otherwise."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        if spec.name in data:
            values[spec.name] = _checked(hints[spec.name], data[spec.name], f"{cls.__name__}.{spec.name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{cls.__name__}: {spec.name} is missing")
    return cls(**values)


def _checked(hint: Any, value: object, where: str) -> object:
    """`value` as the type `hint` says (ProtocolError if it is not): the types specs use."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _checked_union(hint, value, where)
    if origin in (list, dict):
        return _checked_container(hint, value, where)
    if dataclasses.is_dataclass(hint):
        return load(typing.cast(type, hint), value)
    if hint is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected null")
        return None
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, bool, float) and type(value) is hint:
        return value
    raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r:.60}")


def _checked_union(hint: Any, value: object, where: str) -> object:
    for option in typing.get_args(hint):
        try:
            return _checked(option, value, where)
        except ProtocolError:
            continue
    raise ProtocolError(f"{where}: {value!r:.60} is none of {hint}")


def _checked_container(hint: Any, value: object, where: str) -> object:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        return [_checked(item, v, where) for v in value]
    key, item = typing.get_args(hint)
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object")
    return {_checked(key, k, where): _checked(item, v, where) for k, v in value.items()}


def _line(data: dict[str, Any], limit: int) -> bytes:
    line = json.dumps(data, separators=(",", ":")).encode() + b"\n"
    if len(line) > limit:
        raise ProtocolError(f"message of {len(line)} bytes is over the {limit}-byte limit")
    return line


def _parse(line: bytes, limit: int) -> dict[str, Any]:
    if len(line) > limit:
        raise ProtocolError(f"message over the {limit}-byte limit")
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("a message is a JSON object")
    return data
