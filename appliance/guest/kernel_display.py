"""Runs INSIDE each Python kernel: the rich results E2B's template adds to IPython's (PROTOCOL.md §4.1).

The agent runs this file's source in every new kernel (kernels do not have the agent's packages
on their path). It registers display formatters and an import hook; none of them imports
matplotlib, pandas or PIL (user code does that), so a kernel starts no slower for them:

- `chart`: a matplotlib figure's chart JSON (kernel_charts.py), next to its PNG;
- `data`: a pandas DataFrame as {column: [values]}, next to its HTML;
- `json`: lists and dicts as JSON values (IPython itself only gives them text);
- images: PIL's `Image.show()` displays the image, and `Image.save(path)` displays it too.

Nothing here may break a user's cell: a formatter that cannot format returns nothing.
"""

from __future__ import annotations

import datetime
import importlib.abc
import json
import math
import os
import sys
from typing import Any

CHART_MIME = "application/vnd.cube.chart+json"
DATA_MIME = "application/vnd.cube.data+json"
KERNEL_MODULE_NAME = "__cube_display__"
CHARTS_MODULE_NAME = "__cube_charts__"  # kernel_charts.py, defined in the kernel before this file


def _json_value(value: Any) -> Any:
    """A value JSON can carry: NaN/inf as None, dates as ISO text, numpy scalars as Python's."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if hasattr(value, "isoformat"):  # pandas.Timestamp
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return _json_value(value.item())
    raise TypeError(f"not JSON: {type(value).__name__}")


def _dataframe_data(frame: Any) -> dict[str, Any] | None:
    try:
        return {str(column): _json_value(values) for column, values in frame.to_dict(orient="list").items()}
    except (TypeError, ValueError):
        return None


def _plain_json(value: Any) -> Any:
    try:
        converted = _json_value(value)
        json.dumps(converted)
    except (TypeError, ValueError, RecursionError):
        return None
    return converted


def register_formatters(shell: Any) -> None:
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Unicode

    class ChartFormatter(BaseFormatter):  # type: ignore[misc]
        """Figures only, recognised by class rather than registered with for_type: matplotlib's
        inline backend removes every formatter's Figure printer when it activates."""

        format_type = Unicode(CHART_MIME)
        print_method = ObjectName("_repr_cube_chart_")
        _return_type = dict

        def __call__(self, obj: Any) -> dict[str, Any] | None:
            figure_module = sys.modules.get("matplotlib.figure")
            if self.enabled and figure_module is not None and isinstance(obj, figure_module.Figure):
                return sys.modules[CHARTS_MODULE_NAME].figure_chart(obj)  # type: ignore[no-any-return]
            return None

    class DataFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode(DATA_MIME)
        print_method = ObjectName("_repr_cube_data_")
        _return_type = dict

        def __call__(self, obj: Any) -> dict[str, Any] | None:
            pandas = sys.modules.get("pandas")  # a DataFrame exists only if pandas was imported
            if self.enabled and pandas is not None and isinstance(obj, pandas.DataFrame):
                return _dataframe_data(obj)
            return None

    class ListAndDictJSONFormatter(JSONFormatter):  # type: ignore[misc]
        def __call__(self, obj: Any) -> Any:
            if self.enabled and isinstance(obj, list | dict):
                converted = _plain_json(obj)
                if converted is not None:
                    return converted
            return super().__call__(obj)

    display_formatter = shell.display_formatter
    formatters = display_formatter.formatters
    formatters[CHART_MIME] = ChartFormatter(parent=display_formatter)
    formatters[DATA_MIME] = DataFormatter(parent=display_formatter)
    formatters["application/json"] = ListAndDictJSONFormatter(parent=display_formatter)
    if display_formatter.active_types:
        display_formatter.active_types = [
            *display_formatter.active_types,
            *(mime for mime in (CHART_MIME, DATA_MIME) if mime not in display_formatter.active_types),
        ]


def patch_pil_image(module: Any) -> None:
    """Image.show() displays the image (no viewer program is started); Image.save(path) displays
    it too, as E2B's template does, so an agent sees what it saved."""
    from IPython.display import display

    original_save = module.Image.save

    def show(image: Any, title: str | None = None, **options: Any) -> None:
        display(image)

    def save(image: Any, fp: Any, format: str | None = None, **params: Any) -> Any:
        result = original_save(image, fp, format, **params)
        if isinstance(fp, str | os.PathLike):
            display(image)
        return result

    module.Image.show = show
    module.Image.save = save


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after a module is first imported, without importing it before."""

    def __init__(self, patches: dict[str, Any]) -> None:
        self.patches = patches

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                # The spec's own loader instance: no other module is loaded with it.
                spec.loader.exec_module = _patched_after(spec.loader.exec_module, patch)  # type: ignore[method-assign]
                return spec
        return None


def _patched_after(exec_module: Any, patch: Any) -> Any:
    def exec_and_patch(module: Any) -> None:
        exec_module(module)
        try:
            patch(module)
        except Exception:
            pass  # the module works unpatched

    return exec_and_patch


def register() -> None:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    register_formatters(shell)
    if "PIL.Image" in sys.modules:
        patch_pil_image(sys.modules["PIL.Image"])
    else:
        sys.meta_path.insert(0, PatchOnImport({"PIL.Image": patch_pil_image}))


# The agent runs this source in the kernel under this name; importing the module does nothing.
if __name__ == KERNEL_MODULE_NAME:
    register()
