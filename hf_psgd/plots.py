"""Loss curves as a PNG: train and eval loss against optimizer steps and against training time.

Drawn with matplotlib's object API on the Agg canvas, so no display and no global backend change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_loss_curves"]


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    title: str = "",
    groups: Mapping[str, str] | None = None,
) -> Path:
    """Draw every run's ``loss`` (solid) and ``eval_loss`` (dashed, dots) against ``step`` (left) and
    ``seconds`` (right) into the PNG ``path``. ``runs`` maps a run's name to its records (dicts with
    ``step``, ``seconds`` and ``loss`` and/or ``eval_loss``, as :func:`~hf_psgd.recipes.runner.loss_records`
    records them). ``groups`` (run name -> group name, e.g. the optimizer of runs with several seeds)
    draws the runs of a group in one colour under one legend entry; by default every run is its own
    group."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    colors: dict[str, str] = {}
    for name, records in runs.items():
        group = groups[name] if groups else name
        labelled = group in colors
        color = colors.setdefault(group, f"C{len(colors)}")
        for key, style, label in (("loss", "-", "train"), ("eval_loss", "--o", "eval")):
            points = [record for record in records if key in record]
            if not points:
                continue
            losses = [record[key] for record in points]
            for axes, x in ((by_step, "step"), (by_time, "seconds")):
                axes.plot(
                    [record[x] for record in points],
                    losses,
                    style,
                    color=color,
                    markersize=3,
                    alpha=0.6 if groups else 1.0,
                    label="_" if labelled else f"{group} {label}",
                )
    by_step.set(xlabel="optimizer step", ylabel="loss")
    by_time.set(xlabel="training time (s, evaluation excluded)")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
    by_step.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
