"""R and Bash contexts: Jupyter kernels the template installs, driven by jupyter_kernel.py.

- R: IRkernel (Debian's r-cran-irkernel), on the guest's R.
- Bash: bash_kernel (PyPI), an ipykernel-based kernel running one bash under pexpect.

Env vars are set with each language's own statements; names that are no identifier in the
language are skipped (they could not be read there anyway), values are quoted as literals.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys

from appliance.guest.jupyter_kernel import JupyterKernel
from appliance.guest.kernel import KernelStartError
from appliance.guest.python_kernel import KERNEL_BOOTSTRAP, RESTORE_SKIPPED_MODULES

SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def r_string(text: str) -> str:
    """An R string literal: JSON's escapes (\\" \\\\ \\n \\uXXXX...) are R's too."""
    return json.dumps(text, ensure_ascii=False)


class RKernel(JupyterKernel):
    language = "r"

    def kernel_argv(self, connection_file: str) -> list[str]:
        r = shutil.which("R")
        if r is None:
            raise KernelStartError("R is not installed")
        return [
            r,
            "--no-save",
            "--no-restore",
            "--slave",
            "-e",
            "IRkernel::main()",
            "--args",
            connection_file,
        ]

    def set_env_code(self, env_vars: dict[str, str]) -> str:
        pairs = ", ".join(f"{r_string(key)} = {r_string(value)}" for key, value in env_vars.items())
        return f"invisible(Sys.setenv({pairs}))\n"

    def scoped_env_code(self, env_vars: dict[str, str]) -> tuple[str, str]:
        names = ", ".join(r_string(key) for key in env_vars)
        saved = f".cube_saved_env <- Sys.getenv(c({names}), unset = NA, names = TRUE)\n"
        restore = (
            "for (.cube_k in names(.cube_saved_env)) {\n"
            "  if (is.na(.cube_saved_env[[.cube_k]])) Sys.unsetenv(.cube_k)\n"
            "  else do.call(Sys.setenv, stats::setNames(list(.cube_saved_env[[.cube_k]]), .cube_k))\n"
            "}\n"
            "rm(.cube_saved_env, .cube_k)\n"
        )
        return saved + self.set_env_code(env_vars), restore


# ipykernel's launcher with bash_kernel's kernel class, minus debugpy and jedi (see python_kernel.py).
BASH_BOOTSTRAP = KERNEL_BOOTSTRAP.replace(
    "from ipykernel import kernelapp\nkernelapp.launch_new_instance()\n",
    "from ipykernel.kernelapp import IPKernelApp\n"
    "from bash_kernel.kernel import BashKernel\n"
    f"exec({RESTORE_SKIPPED_MODULES!r})\n"
    "IPKernelApp.launch_instance(kernel_class=BashKernel)\n",
)


class BashKernel(JupyterKernel):
    language = "bash"

    def kernel_argv(self, connection_file: str) -> list[str]:
        return [sys.executable, "-c", BASH_BOOTSTRAP, "-f", connection_file]

    def set_env_code(self, env_vars: dict[str, str]) -> str:
        return "".join(
            f"export {key}={shlex.quote(value)}\n"
            for key, value in env_vars.items()
            if SHELL_NAME.fullmatch(key)
        )

    def scoped_env_code(self, env_vars: dict[str, str]) -> tuple[str, str]:
        names = [key for key in env_vars if SHELL_NAME.fullmatch(key)]
        setup = "".join(
            f'if [ -n "${{{key}+set}}" ]; then __cube_had_{key}=1 __cube_old_{key}="${key}"; '
            f"else __cube_had_{key}=; fi\n"
            for key in names
        )
        restore = "".join(
            f'if [ -n "$__cube_had_{key}" ]; then export {key}="$__cube_old_{key}"; else unset {key}; fi; '
            f"unset __cube_had_{key} __cube_old_{key}\n"
            for key in names
        )
        return setup + self.set_env_code(env_vars), restore
