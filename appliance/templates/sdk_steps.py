"""The E2B SDKs' template: a base (`fromImage` or `fromTemplate`) and a list of steps, validated and
planned onto the build engine's step cache.

The SDKs send (`TemplateBuildStartV2`) steps `{type, args, filesHash?, force}`: RUN [command,
user?], COPY [src, dest, owner?, mode?] with the filesHash of the uploaded files, ENV [k1, v1, k2,
v2...], WORKDIR [path], USER [name]. Every builder helper (`apt_install`, `pip_install`,
`git_clone`, `remove`, `make_dir`, `set_envs`...) is one of those. Anything else is refused
before a build starts (`parse_template`, a ValueError with the step's number).

Planning (`plan_steps`) is pure, as for Dockerfiles: each step's cache key chains the previous
one with the step and the image state it runs in (env, workdir, user); COPY keys on the
filesHash. A step the SDK marks `force` (after `skip_cache()`) gets this build's id in its key,
so it and every later step run again; `force` on the template (`skip_cache=True`) does that from
the base. ENV values are expanded as the SDKs' `printf "%s"` would expand variables
(`$VAR`, `${VAR}`, `${VAR:-default}`) from the env so far; command substitution is not run.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from appliance.templates.dockerfile import DockerfileError, expand
from appliance.templates.dockerfile_build import ImageState, chain_key
from appliance.templates.registry_auth import Credentials
from appliance.templates.sdk_files import check_files_hash

STEP_TYPES = ("RUN", "COPY", "ENV", "WORKDIR", "USER")
FILE_STEPS = frozenset({"RUN", "COPY"})
MAX_STEPS = 1000
MAX_ARG_CHARS = 256 * 1024
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER_RE = re.compile(r"^(?:[a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$")
_MODE_RE = re.compile(r"^0?[0-7]{3,4}$")
_GLOB_CHARS = "*?[{"


class StepRefused(ValueError):
    """A step the build cannot run; `step` is its number (1 is the first after the base)."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(f"step {step}: {message}")
        self.step = step


@dataclass(frozen=True)
class SdkStep:
    number: int  # 1 for the first step after the base: the SDKs' name for it in a build failure
    kind: str  # RUN COPY ENV WORKDIR USER
    args: tuple[str, ...]
    files_hash: str | None = None  # COPY
    force: bool = False

    def describe(self) -> str:
        if self.kind == "COPY":
            return f"COPY {self.args[0]} {self.args[1]}"
        if self.kind == "ENV":
            return "ENV " + " ".join(f"{k}={v}" for k, v in zip(self.args[::2], self.args[1::2], strict=True))
        if self.kind == "RUN" and len(self.args) > 1:
            return f"RUN (as {self.args[1]}) {self.args[0]}"
        return f"{self.kind} {self.args[0]}"


@dataclass(frozen=True)
class SdkTemplate:
    """What to build: the base, the steps, and what the template runs."""

    from_image: str | None
    from_template: str | None
    credentials: Credentials | None
    steps: tuple[SdkStep, ...]
    force: bool
    start_cmd: str | None
    ready_cmd: str | None

    @property
    def base(self) -> str:
        return self.from_template or self.from_image or ""


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_ARG_CHARS:
        raise ValueError(f"{key!r} must be a string of at most {MAX_ARG_CHARS} characters")
    return value


def parse_template(data: dict[str, Any]) -> SdkTemplate:
    """The build request body (`TemplateBuildStartV2`); raises ValueError (StepRefused for a step)."""
    from_image, from_template = _text(data, "fromImage"), _text(data, "fromTemplate")
    if (from_image is None) == (from_template is None):
        raise ValueError("exactly one of fromImage and fromTemplate must be given")
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise ValueError("'force' must be a boolean")
    raw_steps = data.get("steps") or []
    if not isinstance(raw_steps, list) or len(raw_steps) > MAX_STEPS:
        raise ValueError(f"'steps' must be a list of at most {MAX_STEPS} steps")
    return SdkTemplate(
        from_image,
        from_template,
        _registry_credentials(data.get("fromImageRegistry")),
        tuple(parse_step(number, raw) for number, raw in enumerate(raw_steps, start=1)),
        force,
        _text(data, "startCmd"),
        _text(data, "readyCmd"),
    )


def _registry_credentials(registry: object) -> Credentials | None:
    if registry is None:
        return None
    if not isinstance(registry, dict):
        raise ValueError("'fromImageRegistry' must be an object")
    kind = registry.get("type")
    if kind != "registry":
        raise ValueError(
            f"fromImageRegistry type {kind!r} is not supported here: only 'registry' (a username and "
            "password for the registry the image is in); AWS and GCP credentials are not"
        )
    username, password = registry.get("username"), registry.get("password")
    if not (isinstance(username, str) and username and isinstance(password, str) and password):
        raise ValueError("fromImageRegistry needs a username and a password")
    return Credentials(username, password)


def parse_step(number: int, raw: object) -> SdkStep:
    if not isinstance(raw, dict):
        raise StepRefused(number, "a step must be an object with a type and args")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind.upper() not in STEP_TYPES:
        raise StepRefused(
            number, f"unknown step type {str(kind)[:40]!r}: this appliance runs {', '.join(STEP_TYPES)}"
        )
    kind = kind.upper()
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) and len(a) <= MAX_ARG_CHARS for a in args):
        raise StepRefused(number, f"{kind} args must be a list of strings")
    force = raw.get("force") or False
    if not isinstance(force, bool):
        raise StepRefused(number, "'force' must be a boolean")
    files_hash = raw.get("filesHash")
    try:
        _check_args(kind, args)
        if kind == "COPY":
            if not isinstance(files_hash, str):
                raise ValueError("COPY needs the filesHash of its uploaded files")
            check_files_hash(files_hash)
        else:
            files_hash = None
    except ValueError as exc:
        raise StepRefused(number, str(exc)) from exc
    return SdkStep(number, kind, tuple(args), files_hash, force)


def _check_run(args: list[str]) -> None:
    if not 1 <= len(args) <= 2 or not args[0].strip():
        raise ValueError("RUN takes a command and optionally a user")
    if len(args) == 2 and args[1] and not _USER_RE.match(args[1]):
        raise ValueError(f"RUN: invalid user {args[1][:40]!r}")


def _check_copy(args: list[str]) -> None:
    if not 2 <= len(args) <= 4 or not args[0] or not args[1]:
        raise ValueError("COPY takes a source, a destination, and optionally an owner and a mode")
    copy_source_base(args[0])
    owner = args[2] if len(args) > 2 else ""
    if owner and not all(_USER_RE.match(part) for part in owner.split(":", 1)):
        raise ValueError(f"COPY: invalid owner {owner[:40]!r}")
    if len(args) > 3 and args[3] and not _MODE_RE.match(args[3]):
        raise ValueError(f"COPY: invalid mode {args[3][:10]!r} (octal, e.g. 0755)")


def _check_env(args: list[str]) -> None:
    if not args or len(args) % 2:
        raise ValueError("ENV takes names and values in pairs")
    bad = [name for name in args[::2] if not _ENV_NAME_RE.match(name)]
    if bad:
        raise ValueError(f"ENV: invalid variable name {bad[0][:40]!r}")


def _check_workdir(args: list[str]) -> None:
    if len(args) != 1 or not args[0] or "\0" in args[0]:
        raise ValueError("WORKDIR takes one path")


def _check_user(args: list[str]) -> None:  # [name, sudo?]: E2B's second argument is not used here
    if not args or not _USER_RE.match(args[0]):
        raise ValueError(f"USER: invalid user {(args or [''])[0][:40]!r}")


_CHECKS = {
    "RUN": _check_run,
    "COPY": _check_copy,
    "ENV": _check_env,
    "WORKDIR": _check_workdir,
    "USER": _check_user,
}


def _check_args(kind: str, args: list[str]) -> None:
    _CHECKS[kind](args)


def copy_source_base(src: str) -> str:
    """What a COPY source names in its upload: the source up to its last `/` before any glob
    character (the SDKs upload just the matching files under it), relative, inside the upload."""
    pattern = src if src.endswith("/") else src + "/"
    meta = min((pattern.index(c) for c in _GLOB_CHARS if c in pattern), default=len(pattern))
    slash = pattern.rfind("/", 0, meta)
    base = posixpath.normpath(pattern[:slash]) if slash > 0 else "."
    if base.startswith("/") or base == ".." or base.startswith("../"):
        raise ValueError(f"COPY source {src[:80]!r} must be relative and stay inside the uploaded files")
    return base


@dataclass(frozen=True)
class PlannedSdkStep:
    step: SdkStep
    state: ImageState  # in effect when it runs (RUN, COPY); after it (ENV, WORKDIR, USER)
    key: str  # the cache key of the image after it

    @property
    def changes_files(self) -> bool:
        return self.step.kind in FILE_STEPS

    @property
    def label(self) -> str:
        return self.step.describe()

    @property
    def warning(self) -> str:
        return ""

    @property
    def run_user(self) -> str:
        """Who a RUN step runs as: its own user, else the USER in effect."""
        own = self.step.args[1] if self.step.kind == "RUN" and len(self.step.args) > 1 else ""
        return own or self.state.user or "root"


def plan_steps(
    steps: Sequence[SdkStep], base: ImageState, base_key: str, build_id: str, force_all: bool
) -> list[PlannedSdkStep]:
    """Each step with the image state it sees and its cache key (see the module doc)."""
    state, key = base, chain_key(base_key, "force", build_id) if force_all else base_key
    planned = []
    for step in steps:
        try:
            state = _evaluate(step, state)
        except DockerfileError as exc:
            raise StepRefused(step.number, str(exc).split(": ", 1)[-1]) from exc
        key = chain_key(key, "sdk", step.kind, step.args, step.files_hash, state)
        if step.force:
            key = chain_key(key, "force", build_id)
        planned.append(PlannedSdkStep(step, state, key))
    return planned


def _evaluate(step: SdkStep, state: ImageState) -> ImageState:
    """The image state after a step (RUN and COPY change only files)."""
    if step.kind == "ENV":
        env = dict(state.env)
        for name, value in zip(step.args[::2], step.args[1::2], strict=True):
            env[name] = expand(value, {**state.run_env(), **env}, step.number)
        return replace(state, env=env)
    if step.kind == "WORKDIR":
        path = expand(step.args[0], state.run_env(), step.number)
        return replace(state, workdir=posixpath.normpath(posixpath.join(state.workdir, path)))
    if step.kind == "USER":
        return replace(state, user=step.args[0])
    return state
