"""Runs INSIDE each Python kernel: a matplotlib figure → the `chart` field of a result (PROTOCOL.md §4.1).

The agent defines this module in every new kernel from its source (kernels do not have the
agent's packages on their path); kernel_display.py calls `figure_chart` when IPython displays
a figure, after its PNG was drawn. The JSON is what `e2b_code_interpreter.charts` parses, with
E2B's template's rules (its extractor, PyPI `e2b-charts`, needs matplotlib 3.10, numpy 2 and
pydantic 2, which Debian's stack the guest runs does not have):

- an axes whose artists are all lines is a `line` chart; lines and path patches a
  `box_and_whisker`; (grid lines aside) all point collections `scatter`, all wedges `pie`,
  all rectangles `bar`; anything else `unknown` (type and title only);
- a figure of several axes is a `superchart` of one chart per axes; a figure without data is none;
- line / scatter: labels, units (`Time (s)` → `s`), ticks, tick labels, scales (linear, log...,
  `datetime` for date axes, `categorical` for string axes); elements `{label, points}`
- bar: `{label, group, value}`; pie: `{label, angle, radius}`;
  box_and_whisker: `{label, min, first_quartile, median, third_quartile, max, outliers}`.

Anything it cannot read becomes no chart (the PNG still comes back): it must never break a
user's figure.
"""

from __future__ import annotations

import datetime
import math
import re
from decimal import Decimal, localcontext
from typing import Any

UNIT = re.compile(r"\s\((.*?)\)|\[(.*?)\]")
SIGNIFICANT_DIGITS = 8  # box and pie numbers: drawing arithmetic leaves noise beyond these


def _rounded(value: Any) -> float:
    number = Decimal(str(float(value)))
    with localcontext() as context:
        context.prec = max(1, SIGNIFICANT_DIGITS - number.adjusted())
        return float(+number)


def _scalar(value: Any) -> Any:
    """JSON-safe: numbers as float (NaN/inf as None), dates as ISO text, strings as they are."""
    if isinstance(value, datetime.date):
        return value.isoformat()
    if type(value).__name__ == "datetime64":
        return str(value.astype("datetime64[s]"))
    if isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _text_or_none(text: str) -> str | None:
    return text or None


def _unit(label: str | None) -> str | None:
    match = UNIT.search(label or "")
    return (match.group(1) or match.group(2)) if match else None


def _converter(axis: Any) -> Any:
    getter = getattr(axis, "get_converter", None)
    return getter() if getter is not None else getattr(axis, "converter", None)


def _is_date_axis(axis: Any) -> bool:
    import matplotlib.dates as mdates

    converters = tuple(
        getattr(mdates, name)
        for name in ("DateConverter", "ConciseDateConverter", "_SwitchableDateConverter")
        if hasattr(mdates, name)
    )
    return isinstance(_converter(axis), converters)


def _is_category_axis(axis: Any) -> bool:
    from matplotlib.category import StrCategoryConverter

    return isinstance(_converter(axis), StrCategoryConverter)


def _ticks(axis: Any) -> list[Any]:
    if _is_date_axis(axis):
        import matplotlib.dates as mdates

        return [mdates.num2date(float(tick)).isoformat() for tick in axis.get_ticklocs()]
    return [_scalar(tick) for tick in axis.get_ticklocs()]


def _scale(axis: Any) -> str:
    if _is_date_axis(axis):
        return "datetime"
    if _is_category_axis(axis):
        return "categorical"
    return str(axis.get_scale())


def _tick_labels(axis: Any) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


def _chart_2d(ax: Any, chart_type: str) -> dict[str, Any]:
    x_label, y_label = _text_or_none(ax.get_xlabel()), _text_or_none(ax.get_ylabel())
    return {
        "type": chart_type,
        "title": _text_or_none(ax.get_title()),
        "x_label": x_label,
        "y_label": y_label,
        "x_unit": _unit(x_label),
        "y_unit": _unit(y_label),
        "elements": [],
    }


def _point_chart(ax: Any, chart_type: str) -> dict[str, Any]:
    chart = _chart_2d(ax, chart_type)
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        chart[f"{name}_ticks"] = _ticks(axis)
        chart[f"{name}_tick_labels"] = _tick_labels(axis)
        chart[f"{name}_scale"] = _scale(axis)
    return chart


def _points(xs: Any, ys: Any) -> list[list[Any]]:
    return [[_scalar(x), _scalar(y)] for x, y in zip(xs, ys, strict=False)]


def _is_grid_line(line: Any) -> bool:
    xs, ys = line.get_xdata(), line.get_ydata()
    return len(xs) == 2 and len(ys) == 2 and (xs[0] == xs[1] or ys[0] == ys[1])


def _line_chart(ax: Any) -> dict[str, Any]:
    chart = _point_chart(ax, "line")
    for line in ax.get_lines():
        if _is_grid_line(line):
            continue
        label = line.get_label()
        if label.startswith("_child"):  # matplotlib's name for an unlabelled line
            label = "Line " + label.removeprefix("_child")
        chart["elements"].append({"label": label, "points": _points(line.get_xdata(), line.get_ydata())})
    return chart


def _scatter_chart(ax: Any) -> dict[str, Any]:
    chart = _point_chart(ax, "scatter")
    for collection in ax.collections:
        offsets = collection.get_offsets()
        points = _points(offsets[:, 0], offsets[:, 1]) if len(offsets) else []
        chart["elements"].append({"label": collection.get_label(), "points": points})
    return chart


def _label_at(axis: Any, position: float) -> str:
    """The tick label at a bar's or box's position (its category), else the position itself."""
    for tick, label in zip(axis.get_ticklocs(), _tick_labels(axis), strict=False):
        if math.isclose(float(tick), position, abs_tol=1e-6) and label:
            return str(label)
    return str(_scalar(position))


def _bar_chart(ax: Any) -> dict[str, Any]:
    chart = _chart_2d(ax, "bar")
    for container in ax.containers:
        group = container.get_label()
        if group.startswith("_container"):  # matplotlib's name for an unlabelled group
            group = "Group " + group.removeprefix("_container")
        horizontal = getattr(container, "orientation", "vertical") == "horizontal"
        for bar in container:
            if horizontal:
                label = _label_at(ax.yaxis, bar.get_y() + bar.get_height() / 2)
                value = bar.get_width()
            else:
                label = _label_at(ax.xaxis, bar.get_x() + bar.get_width() / 2)
                value = bar.get_height()
            chart["elements"].append({"label": label, "group": group, "value": _scalar(value)})
        if horizontal:  # the categories are on y: name the axes as E2B does, category first
            for key in ("label", "unit"):
                chart[f"x_{key}"], chart[f"y_{key}"] = chart[f"y_{key}"], chart[f"x_{key}"]
    return chart


def _pie_chart(ax: Any) -> dict[str, Any]:
    from matplotlib.patches import Wedge

    elements = [
        {"label": wedge.get_label(), "angle": abs(_rounded(wedge.theta2 - wedge.theta1)), "radius": wedge.r}
        for wedge in ax.patches
        if isinstance(wedge, Wedge)
    ]
    return {"type": "pie", "title": _text_or_none(ax.get_title()), "elements": elements}


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
    chart = _chart_2d(ax, "box_and_whisker")
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
                median = ys[0]  # drawn after the caps, so the last such line
        chart["elements"].append(
            {
                "label": _label_at(ax.xaxis, center),
                "min": _rounded(low),
                "first_quartile": _rounded(q1),
                "median": _rounded(median if median is not None else (q1 + q3) / 2),
                "third_quartile": _rounded(q3),
                "max": _rounded(high),
                "outliers": [_rounded(v) for v in outliers],
            }
        )
    return chart


def _chart_type(ax: Any) -> str:
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge
    from matplotlib.text import Text

    artists = [artist for artist in ax.get_children() if _is_data_artist(ax, artist, Text)]
    if all(isinstance(artist, Line2D) for artist in artists):
        return "box_and_whisker" if _box_extents(ax) else "line"
    if all(isinstance(artist, PathPatch | Line2D) for artist in artists):
        return "box_and_whisker"
    artists = [a for a in artists if not (isinstance(a, Line2D) and _is_grid_line(a))]
    for chart_type, kind in (("scatter", PathCollection), ("pie", Wedge), ("bar", Rectangle)):
        if all(isinstance(artist, kind) for artist in artists):
            return chart_type
    return "unknown"


def _is_data_artist(ax: Any, artist: Any, text_type: type) -> bool:
    """What the user drew: not text, nor the axes' own frame, spines, axis, title or legend."""
    own = (ax.patch, ax.xaxis, ax.yaxis, ax.legend_, *ax.spines.values())
    return not isinstance(artist, text_type) and all(artist is not part for part in own)


CHARTS = {
    "line": _line_chart,
    "scatter": _scatter_chart,
    "bar": _bar_chart,
    "pie": _pie_chart,
    "box_and_whisker": _box_chart,
}


def axes_chart(ax: Any) -> dict[str, Any]:
    chart_type = _chart_type(ax)
    extract = CHARTS.get(chart_type)
    if extract is None:
        return {"type": chart_type, "title": _text_or_none(ax.get_title()), "elements": []}
    return extract(ax)


def figure_chart(figure: Any) -> dict[str, Any] | None:
    """The chart JSON of a figure, or None for one without data or that cannot be read."""
    try:
        axes = figure.get_axes()
        if not axes or not any(ax.has_data() for ax in axes):
            return None
        if len(axes) == 1:
            return axes_chart(axes[0])
        suptitle = getattr(figure, "_suptitle", None)
        return {
            "type": "superchart",
            "title": suptitle.get_text() if suptitle is not None else "",
            "elements": [axes_chart(ax) for ax in axes],
        }
    except Exception:
        return None
