"""The benchmark plots say what they show: a title on the figure and on every panel, legends
outside the data, the same colour for the same thing in every panel, near-zero bars labelled."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from lora_triton.bench.report import Speedup, plot_speedups  # noqa: E402
from lora_triton.demos import forgetting as fb  # noqa: E402


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection (and still written)."""
    figures = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        fig.canvas.draw()
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *args: None)
    return figures


def _legend_outside_data(ax, legend) -> bool:
    renderer = ax.figure.canvas.get_renderer()
    box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    return box.x0 >= area.x1 - 1 or box.y1 <= area.y0 + 1 or box.x1 <= area.x0 + 1 or box.y0 >= area.y1 - 1


def _inside_figure(fig, text) -> bool:
    renderer = fig.canvas.get_renderer()
    box, page = text.get_window_extent(renderer), fig.bbox
    return box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1


def test_forgetting_plot(tmp_path, saved_figures):
    drift = {"naive": 300.0, "stacked": 350.0, "ours": 0.12, "routed": 0.0, "routed_fresh": 0.0,
             "oracle": 0.0}  # ours' bar is invisible at this scale
    results = {(m, order, s): {"own": dict.fromkeys(fb.DOMAINS, 2.0), "final": dict.fromkeys(fb.DOMAINS, 2.5),
                               "mean_drift": drift[m]}
               for m in fb.METHODS for order in fb.ORDERS[:2] for s in (100, 101)}
    assert fb.plot(results, tmp_path / "f.png", quick=True)
    fig, = saved_figures
    panels = fig.axes
    assert len(panels) == 3 and all(ax.get_title() for ax in panels)
    assert fig._suptitle is not None and "smoke test" in fig._suptitle.get_text()
    assert _inside_figure(fig, fig._suptitle)
    legend, = fig.legends
    assert all(_legend_outside_data(ax, legend) for ax in panels)
    labels = [t.get_text() for t in panels[2].texts]
    assert "+0.12%" in labels and len(labels) == len(fb.METHODS) - 1  # the oracle has no drift bar
    # Colour means the method in every panel.
    legend_colours = {t.get_text(): h.get_facecolor() for t, h in zip(legend.texts, legend.legend_handles)}
    for ax in panels[:2]:
        for container in ax.containers:
            assert container.patches[0].get_facecolor() == legend_colours[container.get_label()]
    for patch, method in zip(panels[2].patches, [m for m in fb.METHODS if m != "oracle"]):
        assert patch.get_facecolor() == legend_colours[method]


def test_speedup_plot(tmp_path, saved_figures):
    points = [Speedup("K=64 N=64", "fwd vs a", 1, 1.2), Speedup("K=64 N=64", "fwd vs b", 1, 0.8),
              Speedup("K=64 N=64", "fwd vs a", 16, 1.3), Speedup("K=128 N=64", "fwd vs b", 1, 0.9),
              Speedup("K=128 N=64", "fwd vs b", 16, 1.1)]
    assert plot_speedups(points, str(tmp_path / "s.png"), "lora-triton forward: speed-up vs M (a CPU name)\n"
                         "--quick: a smoke test at tiny sizes; its numbers are not measurements")
    fig, = saved_figures
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert all(ax.get_title() for ax in panels) and _inside_figure(fig, fig._suptitle)
    legend, = fig.legends
    assert all(_legend_outside_data(ax, legend) for ax in panels)
    colours = {}
    for ax in panels:
        for line in ax.get_lines():
            if line.get_label().startswith("fwd"):
                assert colours.setdefault(line.get_label(), line.get_color()) == line.get_color()
