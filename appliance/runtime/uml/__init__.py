"""The `uml` runtime: one sandbox = one confined user-mode Linux kernel process.

Modules: `runtime` (UmlRuntime.run, the sandbox's lifetime), `command` (the
confinement chain and the guest kernel's command line), `process` (spawning it
from the Trio thread), `seccomp` (the allow-list), `cgroups` (memory, CPU,
pids, IO), `uids` (the sandbox uid range is nobody else's), `console` (console
log, ready line), `mconsole` (pause/resume/halt/sysrq), `instance` (what the
cubelet holds), `kernel` (building the sandbox UML kernel from linux-source,
refusing kernels with hostfs).
"""
