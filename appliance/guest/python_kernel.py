"""Python contexts: a real IPython kernel (ipykernel), driven by jupyter_kernel.py.

Images and rich reprs come back as Jupyter display data: matplotlib's inline backend is
selected through MPLBACKEND, so figures arrive as PNG; pandas frames bring text/html.
kernel_display.py, run in every kernel at start, adds what E2B's template adds: the `chart`
of matplotlib figures, the `data` of DataFrames, JSON for lists and dicts, and images for
PIL's show() and save().
"""

from __future__ import annotations

import functools
import os
import sys

from appliance.guest import kernel_charts, kernel_display
from appliance.guest.jupyter_kernel import MIME_FIELDS, JupyterKernel
from appliance.guest.kernel import KernelSpec
from appliance.guest.kernel_display import CHART_MIME, CHARTS_MODULE_NAME, DATA_MIME, KERNEL_MODULE_NAME

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# `python3 -m ipykernel_launcher`, minus what no E2B client uses: ipykernel's debugger (importing
# debugpy (pydevd) is about a quarter of a kernel's start-up under UML) and IPython's jedi
# completer (jedi and parso: ~5 MiB of every idle sandbox; IPython's own completer stands in).
# `import X` fails while sys.modules holds None for it; RESTORE_SKIPPED_MODULES undoes that once
# the kernel answers, so user code can still import them.
SKIPPED_MODULES = ("debugpy", "jedi")
KERNEL_BOOTSTRAP = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    f"sys.modules.update(dict.fromkeys({SKIPPED_MODULES!r}))\n"
    "from ipykernel import kernelapp\n"
    "kernelapp.launch_new_instance()\n"
)
RESTORE_SKIPPED_MODULES = (
    "import sys as _cube_sys\n"
    f"for _cube_name in {SKIPPED_MODULES!r}:\n"
    "    if _cube_name in _cube_sys.modules and _cube_sys.modules[_cube_name] is None:\n"
    "        del _cube_sys.modules[_cube_name]\n"
    "del _cube_sys, _cube_name\n"
)
KERNEL_OPTIONS = (
    # No history database (sqlite) and no thread saving to it: nothing reads it back.
    "--HistoryManager.enabled=False",
    # Plain tracebacks (no ANSI colour codes) and untruncated reprs, as E2B's template has them.
    "--InteractiveShell.colors=NoColor",
    "--PlainTextFormatter.max_seq_length=0",
)
PYTHON_MIME_FIELDS = {**MIME_FIELDS, CHART_MIME: "chart", DATA_MIME: "data"}


@functools.cache
def display_setup_code() -> str:
    """Runs kernel_charts.py and kernel_display.py in a kernel, from their source: kernels do not
    have the agent's packages on their path. The chart module is defined first, as a module
    kernel_display imports lazily, by name, when a figure is displayed."""
    sources = []
    for module in (kernel_charts, kernel_display):
        with open(module.__file__ or "") as f:
            sources.append(f.read())
    charts, display = sources
    return (
        "import sys as _cube_sys, types as _cube_types\n"
        f"_cube_charts = _cube_types.ModuleType({CHARTS_MODULE_NAME!r})\n"
        f"exec(compile({charts!r}, 'cube-charts', 'exec'), _cube_charts.__dict__)\n"
        "_cube_sys.modules[_cube_charts.__name__] = _cube_charts\n"
        f"exec(compile({display!r}, 'cube-display', 'exec'), {{'__name__': {KERNEL_MODULE_NAME!r}}})\n"
        "del _cube_sys, _cube_types, _cube_charts\n"
    )


# `random` (and numpy's global generator, once imported) seed themselves from the OS when
# imported: in a kernel that was running when a template was snapshotted, every clone would
# draw the same numbers. The kernel's OS entropy is the clone's own once /init reseeded it.
RESEED_CODE = (
    "import random as _cube_random, sys as _cube_sys\n"
    "_cube_random.seed()\n"
    "if 'numpy' in _cube_sys.modules:\n"
    "    _cube_sys.modules['numpy'].random.seed()\n"
    "del _cube_random, _cube_sys\n"
)


def python_kernel_env(spec: KernelSpec, env: dict[str, str], directory: str) -> dict[str, str]:
    """A Python context's process environment; `directory` is its private one, removed with it."""
    if not spec.user.can_write(env.get("HOME", spec.user.home)):
        # IPython and matplotlib would each make a fresh directory in /tmp (and never remove
        # it) for want of ~/.ipython and ~/.config/matplotlib: theirs go with the kernel's.
        env.setdefault("IPYTHONDIR", os.path.join(directory, "ipython"))
        env.setdefault("MPLCONFIGDIR", os.path.join(directory, "matplotlib"))
    env.setdefault("MPLBACKEND", INLINE_BACKEND)
    return env


class PythonKernel(JupyterKernel):
    language = "python"
    mime_fields = PYTHON_MIME_FIELDS

    def kernel_argv(self, connection_file: str) -> list[str]:
        return [sys.executable, "-c", KERNEL_BOOTSTRAP, "-f", connection_file, *KERNEL_OPTIONS]

    def kernel_env(self, env: dict[str, str], directory: str) -> dict[str, str]:
        env = python_kernel_env(self.spec, env, directory)
        # ipykernel imports debugpy, which otherwise warns about frozen modules on every start.
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        return env

    def reseed_code(self) -> str:
        return RESEED_CODE

    def startup_code(self) -> str:
        return RESTORE_SKIPPED_MODULES + display_setup_code()

    def set_env_code(self, env_vars: dict[str, str]) -> str:
        return f"import os as _cube_os\n_cube_os.environ.update({env_vars!r})\ndel _cube_os\n"

    def scoped_env_code(self, env_vars: dict[str, str]) -> tuple[str, str]:
        setup = (
            "import os as _cube_os\n"
            f"_cube_saved_env = {{k: _cube_os.environ.get(k) for k in {sorted(env_vars)!r}}}\n"
            f"_cube_os.environ.update({env_vars!r})\n"
        )
        restore = (
            "for _cube_k, _cube_v in _cube_saved_env.items():\n"
            "    if _cube_v is None:\n"
            "        _cube_os.environ.pop(_cube_k, None)\n"
            "    else:\n"
            "        _cube_os.environ[_cube_k] = _cube_v\n"
            "del _cube_saved_env, _cube_os, _cube_k, _cube_v\n"
        )
        return setup, restore
