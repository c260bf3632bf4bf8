"""Runs INSIDE each Python kernel: matplotlib figures → the `chart` field of a result (PROTOCOL.md §4.1).

The agent sends this file's source to a new kernel (kernels do not have the agent's
packages on their path). It registers an IPython display formatter that recognises
`matplotlib.figure.Figure` without importing matplotlib (user code does that), so
every displayed figure carries, next to its PNG, a JSON description in the
shape `e2b_code_interpreter.charts` parses:

- line / scatter: x/y labels, units, ticks, tick labels, scales; elements `{label, points}`
- bar: elements `{label, group, value}`; pie: `{label, angle, radius}`
- box_and_whisker: `{label, min, first_quartile, median, third_quartile, max, outliers}`
- superchart: a figure of several axes, elements are the charts of each.

Anything it cannot read becomes no chart at all (the PNG still comes back): it must never
break a user's figure.
"""

from __future__ import annotations

import math
import re
from typing import Any

CHART_MIME = "application/vnd.cube.chart+json"
UNIT = re.compile(r"[(\[]\s*([^()\[\]]+?)\s*[)\]]\s*$")


def _number(value: Any) -> Any:
    """JSON-safe scalar: numbers as float (NaN/inf as None), dates as ISO text, others as text."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _unit(label: str) -> str | None:
    match = UNIT.search(label or "")
    return match.group(1) if match else None


def _is_datetime_axis(axis: Any) -> bool:
    import matplotlib.dates as mdates

    return isinstance(
        axis.get_major_formatter(),
        (mdates.DateFormatter, mdates.AutoDateFormatter, mdates.ConciseDateFormatter),
    )


def _axis_values(axis: Any, values: Any) -> list[Any]:
    if _is_datetime_axis(axis):
        import matplotlib.dates as mdates

        return [mdates.num2date(float(v)).isoformat() if _number(v) is not None else None for v in values]
    return [_number(v) for v in values]


def _scale(axis: Any, name: str) -> str:
    return "datetime" if _is_datetime_axis(axis) else name


def _tick_labels(axis: Any) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


def _two_d(ax: Any, chart_type: str) -> dict[str, Any]:
    x_label, y_label = ax.get_xlabel(), ax.get_ylabel()
    return {
        "type": chart_type,
        "title": ax.get_title(),
        "x_label": x_label or None,
        "y_label": y_label or None,
        "x_unit": _unit(x_label),
        "y_unit": _unit(y_label),
    }


def _point_chart(ax: Any, chart_type: str, elements: list[dict[str, Any]]) -> dict[str, Any]:
    chart = _two_d(ax, chart_type)
    chart.update(
        x_ticks=_axis_values(ax.xaxis, ax.get_xticks()),
        x_tick_labels=_tick_labels(ax.xaxis),
        x_scale=_scale(ax.xaxis, ax.get_xscale()),
        y_ticks=_axis_values(ax.yaxis, ax.get_yticks()),
        y_tick_labels=_tick_labels(ax.yaxis),
        y_scale=_scale(ax.yaxis, ax.get_yscale()),
        elements=elements,
    )
    return chart


def _points(ax: Any, xs: Any, ys: Any) -> list[list[Any]]:
    return [list(pair) for pair in zip(_axis_values(ax.xaxis, xs), _axis_values(ax.yaxis, ys), strict=False)]


def _line_chart(ax: Any) -> dict[str, Any]:
    elements = [
        {"label": line.get_label(), "points": _points(ax, line.get_xdata(), line.get_ydata())}
        for line in ax.get_lines()
    ]
    return _point_chart(ax, "line", elements)


def _scatter_chart(ax: Any) -> dict[str, Any]:
    elements = []
    for collection in ax.collections:
        offsets = collection.get_offsets()
        elements.append(
            {"label": collection.get_label(), "points": _points(ax, offsets[:, 0], offsets[:, 1])}
        )
    return _point_chart(ax, "scatter", elements)


def _label_at(ax: Any, position: float) -> str:
    """The x tick label at a bar's or box's position (categories), else the position itself."""
    for tick, label in zip(ax.get_xticks(), _tick_labels(ax.xaxis), strict=False):
        if math.isclose(float(tick), position, abs_tol=1e-6) and label:
            return label
    return str(_number(position))


def _bar_chart(ax: Any) -> dict[str, Any]:
    from matplotlib.container import BarContainer

    elements = []
    for container in ax.containers:
        if not isinstance(container, BarContainer):
            continue
        group = container.get_label()
        for bar in container:
            center = bar.get_x() + bar.get_width() / 2
            elements.append(
                {"label": _label_at(ax, center), "group": group, "value": _number(bar.get_height())}
            )
    chart = _two_d(ax, "bar")
    chart["elements"] = elements
    return chart


def _pie_chart(ax: Any) -> dict[str, Any]:
    from matplotlib.patches import Wedge

    elements = [
        {
            "label": wedge.get_label(),
            "angle": _number(abs(wedge.theta2 - wedge.theta1)),
            "radius": _number(wedge.r),
        }
        for wedge in ax.patches
        if isinstance(wedge, Wedge)
    ]
    return {"type": "pie", "title": ax.get_title(), "elements": elements}


def _box_extents(ax: Any) -> list[tuple[float, float, float, float]]:
    """(x0, x1, q1, q3) of each box: PathPatches (patch_artist=True) or closed 5-point lines."""
    from matplotlib.patches import PathPatch

    boxes = []
    for patch in ax.patches:
        if isinstance(patch, PathPatch):
            vertices: Any = patch.get_path().vertices
            boxes.append(
                (vertices[:, 0].min(), vertices[:, 0].max(), vertices[:, 1].min(), vertices[:, 1].max())
            )
    if boxes:
        return boxes
    for line in ax.get_lines():
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        if len(xs) == 5 and len(set(xs)) == 2 and len(set(ys)) == 2 and xs[0] == xs[-1] and ys[0] == ys[-1]:
            boxes.append((min(xs), max(xs), min(ys), max(ys)))
    return boxes


def _box_chart(ax: Any) -> dict[str, Any]:
    elements = []
    for x0, x1, q1, q3 in sorted(_box_extents(ax)):
        center = (x0 + x1) / 2
        low, high, median, outliers = q1, q3, None, []
        for line in ax.get_lines():
            xs, ys = [float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]
            if not xs or not all(x0 - 1e-9 <= x <= x1 + 1e-9 for x in xs):
                continue
            if line.get_linestyle() in ("None", "none", "", " "):
                outliers += ys  # fliers: markers only
            elif len(xs) == 2 and xs[0] == xs[1] == center:
                low, high = min(low, *ys), max(high, *ys)  # whiskers
            elif len(xs) == 2 and ys[0] == ys[1] and q1 <= ys[0] <= q3 and xs[0] >= x0 and xs[1] <= x1:
                median = ys[0]
        elements.append(
            {
                "label": _label_at(ax, center),
                "min": _number(low),
                "first_quartile": _number(q1),
                "median": _number(median if median is not None else (q1 + q3) / 2),
                "third_quartile": _number(q3),
                "max": _number(high),
                "outliers": [_number(v) for v in outliers],
            }
        )
    chart = _two_d(ax, "box_and_whisker")
    chart["elements"] = elements
    return chart


def _axes_chart(ax: Any) -> dict[str, Any] | None:
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    if any(isinstance(patch, Wedge) for patch in ax.patches):
        return _pie_chart(ax)
    if any(isinstance(container, BarContainer) for container in ax.containers):
        return _bar_chart(ax)
    if _box_extents(ax):
        return _box_chart(ax)
    if any(isinstance(collection, PathCollection) for collection in ax.collections):
        return _scatter_chart(ax)
    if ax.get_lines():
        return _line_chart(ax)
    return None


def figure_chart(figure: Any) -> dict[str, Any] | None:
    """The chart JSON of a figure, or None for one without a chart we can read."""
    try:
        charts = [chart for chart in (_axes_chart(ax) for ax in figure.get_axes()) if chart is not None]
        if not charts:
            return None
        if len(charts) == 1:
            return charts[0]
        suptitle = getattr(figure, "_suptitle", None)
        return {"type": "superchart", "title": suptitle.get_text() if suptitle else "", "elements": charts}
    except Exception:
        return None


def register() -> None:
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
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
                return figure_chart(obj)
            return None

    shell = get_ipython()
    if shell is None:
        return
    display_formatter = shell.display_formatter
    display_formatter.formatters[CHART_MIME] = ChartFormatter(parent=display_formatter)
    if display_formatter.active_types and CHART_MIME not in display_formatter.active_types:
        display_formatter.active_types = [*display_formatter.active_types, CHART_MIME]


# The agent runs this source in the kernel under this name; importing the module does nothing.
KERNEL_MODULE_NAME = "__cube_charts__"
if __name__ == KERNEL_MODULE_NAME:
    register()
