"""`result.chart` for matplotlib figures, as the E2B SDK parses it (e2b_code_interpreter.charts)."""

from __future__ import annotations

import base64

from e2b_code_interpreter.charts import (
    BarChart,
    BoxAndWhiskerChart,
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


def test_a_figure_without_a_chart_still_is_a_png(sandbox) -> None:
    result = _figure_result(sandbox, "plt.imshow([[1, 2], [3, 4]])")
    assert result.chart is None
