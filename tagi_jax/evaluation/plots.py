"""The main job's report figure (``results.png``): held-out ROUGE-L per category next to the
training curves of each stage, so a run's outcome can be judged at a glance without
TensorBoard.

matplotlib is imported only inside ``write_figure``: only the report needs it, so training and
evaluation code that imports this package neither pays for nor depends on it. The figure is
drawn on a private ``Figure`` with the Agg canvas rather than through ``pyplot``, so no GUI
backend is selected, no global figure registry is touched and concurrent callers (threads, or
a host that already uses pyplot) do not interfere. The PNG carries no software/version
metadata, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import io
import math
import os

from tagi_jax import paths

_WIDTH_IN, _HEIGHT_IN, _DPI = 14.0, 6.0, 100
# Per-bar value labels stop being readable (and start overlapping) beyond this many bars.
_MAX_LABELLED_BARS = 48


def _finite(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} is not finite: {number!r}")
    return number


def _check_categories(
    categories: dict[str, dict[str, float]],
) -> tuple[list[str], list[str], dict[str, dict[str, float]]]:
    if not categories:
        raise ValueError("categories is empty: need at least one row of ROUGE-L scores")
    rows = list(categories)
    first = rows[0]
    names = set(categories[first])
    if not names:
        raise ValueError(f"categories row {first!r} has no categories")
    checked: dict[str, dict[str, float]] = {}
    for row in rows:
        scores = categories[row]
        missing, extra = sorted(names - set(scores)), sorted(set(scores) - names)
        if missing or extra:
            raise ValueError(
                f"categories row {row!r} does not have the categories of row {first!r}: "
                f"missing {missing}, extra {extra}"
            )
        checked[row] = {
            name: _finite(value, f"ROUGE-L of row {row!r}, category {name!r}")
            for name, value in scores.items()
        }
    return rows, sorted(names), checked


def _check_curves(curves: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    checked: dict[str, list[tuple[int, float]]] = {}
    for stage, points in curves.items():
        if len(points) == 0:
            raise ValueError(f"training curve {stage!r} has no points")
        checked[stage] = []
        for i, point in enumerate(points):
            try:
                step, loss = point
            except (TypeError, ValueError):
                raise ValueError(
                    f"training curve {stage!r}, point {i}: expected (step, loss), got {point!r}"
                ) from None
            checked[stage].append(
                (
                    _finite(step, f"step of training curve {stage!r}, point {i}"),
                    # A diverged run (NaN loss) must be noticed, not drawn as a silent gap.
                    _finite(loss, f"loss of training curve {stage!r} at step {step}"),
                )
            )
    return checked


def write_figure(
    path: str,
    categories: dict[str, dict[str, float]],
    curves: dict[str, list[tuple[int, float]]],
    *,
    title: str = "",
    curves_label: str = "training loss",
    scores_label: str = "held-out ROUGE-L",
) -> str:
    """Write the report figure as one PNG at ``path`` (1400x600 px) and return ``path``.

    Args:
      path: where to write the PNG; the parent directory is created. The file is written to
        ``path + ".tmp"`` and then renamed, so a reader never sees a half-written figure.
      categories: row label (e.g. ``"base"``, ``"metatrain"``, ``"TAGI"``) -> {category name
        -> held-out ROUGE-L}. Every row must have exactly the first row's categories. Drawn
        on the left as grouped horizontal bars, categories sorted by name.
      curves: stage label -> [(optimizer step, training loss)], drawn on the right, one line
        per stage, log-scale y when every loss is positive. May be empty (the panel then says
        "no training curves"), but no stage may have zero points.
      title: figure title; none when empty.
      curves_label: what the curves measure (the right panel's title and y label).
      scores_label: what the bars measure (the left panel's x label; its title adds "per
        category").

    Raises:
      ValueError: empty ``categories``; a row whose categories differ from the first row's;
        a non-finite score, step or loss; a stage without points. The message names the row,
        category or stage.
    """
    rows, names, scores = _check_categories(categories)
    stages = _check_curves(curves)
    path = os.fspath(path)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # One colour per label across both panels, so "TAGI" is the same colour in the bars and
    # in the curves.
    labels = rows + [stage for stage in stages if stage not in scores]
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}

    fig = Figure(figsize=(_WIDTH_IN, _HEIGHT_IN), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    bars_ax, curves_ax = fig.subplots(1, 2, width_ratios=[1.25, 1.0])
    if title:
        fig.suptitle(title)

    # Horizontal bars, because SNI category names ("Cause Effect Classification", ...) are too
    # long for x tick labels.
    height = 0.8 / len(rows)
    label_bars = len(rows) * len(names) <= _MAX_LABELLED_BARS
    for i, row in enumerate(rows):
        ys = [j - 0.4 + (i + 0.5) * height for j in range(len(names))]
        container = bars_ax.barh(
            ys, [scores[row][name] for name in names], height=height, color=colours[row], label=row
        )
        if label_bars:
            bars_ax.bar_label(container, fmt="%.1f", padding=2, fontsize=7)
    bars_ax.set_yticks(range(len(names)), names, fontsize=8)
    bars_ax.invert_yaxis()  # alphabetical from the top, rows in the given order
    bars_ax.margins(x=0.08)
    bars_ax.set_xlabel(scores_label)
    bars_ax.set_title(f"{scores_label} per category")
    bars_ax.grid(axis="x", alpha=0.3)
    # Below the axes: inside, with a dozen categories, it always covers some bars.
    bars_ax.legend(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.09),
        ncols=min(len(rows), 6),
        frameon=False,
    )

    curves_ax.set_title(curves_label)
    if stages:
        for stage, points in stages.items():
            curves_ax.plot(
                [step for step, _ in points],
                [loss for _, loss in points],
                color=colours[stage],
                label=stage,
                linewidth=1.2,
                # a one-point curve would otherwise be invisible
                marker="o" if len(points) == 1 else None,
                markersize=4,
            )
        if all(loss > 0 for points in stages.values() for _, loss in points):
            curves_ax.set_yscale("log")
        curves_ax.set_xlabel("optimizer step")
        curves_ax.set_ylabel(curves_label)
        curves_ax.grid(alpha=0.3, which="both")
        curves_ax.legend(fontsize=8, loc="best")
    else:
        curves_ax.text(
            0.5, 0.5, "no training curves", ha="center", va="center", transform=curves_ax.transAxes
        )
        curves_ax.set_xticks([])
        curves_ax.set_yticks([])

    paths.makedirs(paths.dirname(paths.absolute(path)))
    png = io.BytesIO()
    # "Software": None drops the matplotlib version, the only varying PNG metadata.
    fig.savefig(png, format="png", dpi=_DPI, metadata={"Software": None})
    paths.write_bytes(path, png.getvalue())  # atomic: aside and renamed, or one object
    return path
