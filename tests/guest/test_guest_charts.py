"""`result.chart` for matplotlib figures, as the E2B SDK parses it (e2b_code_interpreter.charts)."""

from __future__ import annotations

import base64
import datetime
import json

from e2b_code_interpreter.charts import (
    BarChart,
    BoxAndWhiskerChart,
    Chart,
    ChartType,
    LineChart,
    PieChart,
    ScaleType,
    ScatterChart,
    SuperChart,
)


def _figure_result(sandbox, code: str):
    execution = sandbox.run_code("import matplotlib.pyplot as plt\n" + code + "\nplt.show()")
    assert execution.error is None, execution.error
    figures = [result for result in execution.results if result.png]
    assert len(figures) == 1, execution.results
    assert base64.b64decode(figures[0].png).startswith(b"\x89PNG")  # the chart comes alongside the PNG
    return figures[0]


def test_line_chart(sandbox) -> None:
    result = _figure_result(
        sandbox,
        "plt.plot([1, 2, 3], [2, 4, 3], label='speed')\nplt.plot([1, 2, 3], [1, 1, 2], label='cost')\n"
        "plt.title('Over time')\nplt.xlabel('Time (s)')\nplt.ylabel('Value')\nplt.legend()",
    )
    chart = result.chart
    assert isinstance(chart, LineChart) and chart.type is ChartType.LINE
    assert chart.title == "Over time"
    assert (chart.x_label, chart.x_unit, chart.y_label, chart.y_unit) == ("Time (s)", "s", "Value", None)
    assert (
        chart.x_scale is ScaleType.LINEAR and chart.x_ticks and len(chart.x_tick_labels) == len(chart.x_ticks)
    )
    assert [(e.label, e.points) for e in chart.elements] == [
        ("speed", [(1.0, 2.0), (2.0, 4.0), (3.0, 3.0)]),
        ("cost", [(1.0, 1.0), (2.0, 1.0), (3.0, 2.0)]),
    ]
    assert "chart" in result.formats()


def test_scatter_chart(sandbox) -> None:
    chart = _figure_result(
        sandbox, "plt.scatter([1, 2], [3, 4], label='a')\nplt.scatter([5], [6], label='b')\nplt.title('Dots')"
    ).chart
    assert isinstance(chart, ScatterChart) and chart.title == "Dots"
    assert [(e.label, e.points) for e in chart.elements] == [
        ("a", [(1.0, 3.0), (2.0, 4.0)]),
        ("b", [(5.0, 6.0)]),
    ]


def test_bar_chart(sandbox) -> None:
    chart = _figure_result(
        sandbox,
        "plt.bar(['apples', 'pears'], [3, 5], label='2024')\nplt.title('Fruit')\nplt.ylabel('Count')",
    ).chart
    assert isinstance(chart, BarChart) and chart.type is ChartType.BAR and chart.title == "Fruit"
    assert [(e.label, e.group, e.value) for e in chart.elements] == [
        ("apples", "2024", 3.0),
        ("pears", "2024", 5.0),
    ]
    assert chart.y_label == "Count"


def test_pie_chart(sandbox) -> None:
    chart = _figure_result(sandbox, "plt.pie([1, 3], labels=['small', 'big'])\nplt.title('Share')").chart
    assert isinstance(chart, PieChart) and chart.title == "Share"
    assert [e.label for e in chart.elements] == ["small", "big"]
    assert [round(e.angle) for e in chart.elements] == [90, 270] and chart.elements[0].radius == 1.0


def test_box_and_whisker_chart(sandbox) -> None:
    for patch_artist in (False, True):
        chart = _figure_result(
            sandbox,
            "fig, ax = plt.subplots()\n"
            f"ax.boxplot([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 40]], patch_artist={patch_artist})\n"
            "ax.set_xticks([1, 2], ['A', 'B'])\nax.set_title('Spread')",
        ).chart
        assert isinstance(chart, BoxAndWhiskerChart) and chart.title == "Spread"
        first, second = chart.elements
        five_numbers = (first.min, first.first_quartile, first.median, first.third_quartile, first.max)
        assert first.label == "A" and five_numbers == (1.0, 2.0, 3.0, 4.0, 5.0)
        assert first.outliers == []
        assert (second.label, second.median, second.max, second.outliers) == ("B", 4.5, 6.0, [40.0])


def test_superchart_of_several_axes(sandbox) -> None:
    chart = _figure_result(
        sandbox,
        "fig, (left, right) = plt.subplots(1, 2)\nfig.suptitle('Both')\n"
        "left.plot([1, 2], [3, 4])\nleft.set_title('L')\nright.bar(['x'], [7])\nright.set_title('R')",
    ).chart
    assert isinstance(chart, SuperChart) and chart.type is ChartType.SUPERCHART and chart.title == "Both"
    assert [(type(c), c.title) for c in chart.elements] == [(LineChart, "L"), (BarChart, "R")]


def test_figures_of_other_kinds_are_unknown_charts_and_blank_ones_none(sandbox) -> None:
    image = _figure_result(sandbox, "plt.imshow([[1, 2], [3, 4]])\nplt.title('Pixels')").chart
    assert type(image) is Chart and image.type is ChartType.UNKNOWN and image.title == "Pixels"
    circles = _figure_result(
        sandbox,
        "fig, ax = plt.subplots()\nax.add_artist(plt.Circle((0, 0), 1, fill=False))\n"
        "ax.grid(True)\nplt.title('Circle')",
    ).chart
    assert circles.type is ChartType.UNKNOWN and circles.elements == []
    blank = _figure_result(sandbox, "fig, ax = plt.subplots()")
    assert blank.chart is None  # no data: no chart, still the PNG


def test_scales_log_datetime_and_categorical(sandbox) -> None:
    log = _figure_result(
        sandbox,
        "import numpy as np\nx = np.linspace(0, 100, 100)\nplt.plot(x, np.exp(x), label='y = e^x')\n"
        "plt.yscale('log')\nplt.ylabel('Y-axis (log scale)')\nplt.grid(True)",
    ).chart
    assert isinstance(log, LineChart) and (log.x_scale, log.y_scale) == (ScaleType.LINEAR, ScaleType.LOG)
    assert log.y_unit == "log scale" and all(isinstance(tick, float) for tick in log.y_ticks)
    assert [e.label for e in log.elements] == ["y = e^x"] and len(log.elements[0].points) == 100

    dated = _figure_result(
        sandbox,
        "import datetime\n"
        "dates = [datetime.datetime(2023, 9, 1) + datetime.timedelta(hours=i) for i in range(5)]\n"
        "plt.plot(dates, [1, 3, 2, 5, 4], label='load')",
    ).chart
    assert dated.x_scale is ScaleType.DATETIME and dated.y_scale is ScaleType.LINEAR
    assert all(isinstance(tick, str) for tick in dated.x_ticks)
    datetime.datetime.fromisoformat(dated.x_ticks[0])
    assert dated.elements[0].points[1] == ("2023-09-01T01:00:00", 3.0)

    categories = _figure_result(sandbox, "plt.plot([1, 2, 3], ['A', 'B', 'C'])").chart
    assert (categories.x_scale, categories.y_scale) == (ScaleType.LINEAR, ScaleType.CATEGORICAL)
    assert categories.elements[0].label == "Line 0"  # an unlabelled line
    assert categories.elements[0].points == [(1.0, "A"), (2.0, "B"), (3.0, "C")]


def test_horizontal_and_grouped_bars(sandbox) -> None:
    chart = _figure_result(
        sandbox,
        "plt.barh(['x', 'y'], [4, 6])\nplt.xlabel('Amount [kg]')\nplt.ylabel('Item')",
    ).chart
    assert isinstance(chart, BarChart)
    assert [(e.label, e.group, e.value) for e in chart.elements] == [
        ("x", "Group 0", 4.0),
        ("y", "Group 0", 6.0),
    ]
    # The category axis is named first, as E2B's extractor does for horizontal bars.
    assert (chart.x_label, chart.y_label, chart.y_unit) == ("Item", "Amount [kg]", "kg")


def test_e2b_box_plot_with_labels_and_patches(sandbox) -> None:
    chart = _figure_result(
        sandbox,
        "data = {'Class A': [85, 90, 78, 92, 88], 'Class B': [95, 89, 76, 91, 84, 87], "
        "'Class C': [75, 82, 88, 79, 86]}\nfig, ax = plt.subplots()\nax.set_xlabel('Class')\n"
        "ax.boxplot(list(data.values()), patch_artist=True)\nax.set_xticks([1, 2, 3], list(data))",
    ).chart
    assert isinstance(chart, BoxAndWhiskerChart) and chart.x_label == "Class"
    assert [e.label for e in chart.elements] == ["Class A", "Class B", "Class C"]
    assert [e.outliers for e in chart.elements] == [[], [76], []]
    assert [e.min for e in chart.elements] == [78, 84, 75]
    assert [e.first_quartile for e in chart.elements] == [85, 84.75, 79]
    assert [e.median for e in chart.elements] == [88, 88, 82]
    assert [e.third_quartile for e in chart.elements] == [90, 90.5, 86]
    assert [e.max for e in chart.elements] == [92, 95, 88]


def test_pie_angles_are_rounded_and_labels_kept(sandbox) -> None:
    chart = _figure_result(
        sandbox, "plt.pie([90, 10], labels=['No', 'No, in blue'], autopct='%1.1f%%', startangle=90)"
    ).chart
    assert [(e.label, e.angle, e.radius) for e in chart.elements] == [("No", 324, 1), ("No, in blue", 36, 1)]


def test_superchart_of_a_line_with_grid_and_a_scatter(sandbox) -> None:
    chart = _figure_result(
        sandbox,
        "import numpy as np\nfig, axs = plt.subplots(1, 2)\nfig.suptitle('Multiple')\n"
        "axs[0].plot(np.linspace(0, 10, 100), np.sin(np.linspace(0, 10, 100)), 'r')\naxs[0].grid(True)\n"
        "axs[1].scatter(np.random.rand(5), np.random.rand(5), label='Dataset 1')\naxs[1].grid(True)",
    ).chart
    assert isinstance(chart, SuperChart) and chart.title == "Multiple"
    line, scatter = chart.elements
    assert isinstance(line, LineChart) and line.title is None and len(line.elements[0].points) == 100
    assert isinstance(scatter, ScatterChart) and len(scatter.elements[0].points) == 5


def test_chart_survives_json_serialisation(sandbox) -> None:
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\nplt.scatter([1, 2], [3, 4])\nplt.xlabel('A')\nplt.show()"
    )
    serialised = json.loads(execution.to_json())
    assert serialised["results"][0]["chart"]["type"] == "scatter"
