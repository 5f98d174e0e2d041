"""Output of the benchmark tables: CSV files, a console table, PNG plots of speed-up vs M."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Speedup:
    """One point of a speed-up plot: ``panel`` (a shape), ``line`` (what is compared), M, ratio."""

    panel: str
    line: str
    m: int
    ratio: float


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    """Write ``rows`` (dicts with exactly ``fields``) to ``path``, creating its folder."""
    with CsvRows(path, fields) as out:
        out.append(rows)


class CsvRows:
    """A CSV file that grows as rows are measured: the header on opening, each ``append`` written
    and flushed at once, so a run stopped part-way keeps every row it measured.

    ``with CsvRows(path, fields) as out: out.append(rows)`` (``rows``: dicts with exactly ``fields``);
    the folder of ``path`` is created.
    """

    def __init__(self, path: str, fields: list[str]):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields)
        self._writer.writeheader()
        self._file.flush()

    def append(self, rows: list[dict]) -> None:
        self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "CsvRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def print_table(rows: list[dict], point_fields: list[str], column_field: str, value_field: str,
                title: str) -> None:
    """One line per distinct ``point_fields`` tuple, one column per value of ``column_field``."""
    if not rows:
        print(f"{title}: no rows")
        return
    first = rows[0]
    print(f"\n{title}\n{first['device']} | torch {first['torch']} | triton {first['triton'] or '-'} | "
          f"bitsandbytes {first['bitsandbytes'] or '-'} | peft {first['peft'] or '-'} | {first['timestamp']}")
    columns = list(dict.fromkeys(row[column_field] for row in rows))
    width = max(12, *(len(c) + 1 for c in columns))
    print(" ".join(f"{f:>8}" for f in point_fields) + " " + " ".join(f"{c:>{width}}" for c in columns)
          + f"   ({value_field})")
    cells: dict[tuple, dict] = defaultdict(dict)
    for row in rows:
        cells[tuple(row[f] for f in point_fields)][row[column_field]] = row[value_field]
    for point, values in cells.items():
        print(" ".join(f"{str(v):>8}" for v in point) + " "
              + " ".join(f"{values.get(c, '-'):>{width}}" for c in columns))


def plot_speedups(points: list[Speedup], path: str, title: str, xlabel: str = "M (tokens)") -> str | None:
    """Plot speed-up vs M (log x), one titled panel per shape, one line per comparison (the same
    colour for the same comparison in every panel); a dashed line marks 1x, one legend sits
    outside the panels. Returns the PNG's path, or None when matplotlib is missing or there is
    nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {path} not written (pip install 'lora-triton[bench]')")
        return None
    panels = list(dict.fromkeys(p.panel for p in points))
    if not panels:
        return None
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(p.line for p in points))}
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        lines: dict[str, list[Speedup]] = defaultdict(list)
        for p in points:
            if p.panel == panel:
                lines[p.line].append(p)
        for label, pts in lines.items():
            pts.sort(key=lambda p: p.m)
            ax.plot([p.m for p in pts], [p.ratio for p in pts], marker="o", label=label, color=colours[label])
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up (baseline ms / ours ms)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colour, marker="o", label=label) for label, colour in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
