"""Figures of the example applications, saved as PNG files.

Each ``plot_*`` function draws one figure on its own Agg canvas (no pyplot state),
writes it and returns the path. Several runs (seeds) of a method, a ``(runs, points)``
array, are drawn as their mean and a min..max band.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared import report

#: Resolution of the saved PNGs.
DPI = 120


def figure(width: float = 6.4, height: float = 4.2) -> Figure:
  """A new figure with its own Agg canvas (no pyplot state)."""
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str | os.PathLike[str]) -> Path:
  """Writes ``fig`` as a PNG (parent directories created); returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


def draw_per_class(
  ax: Any,
  train_counts: Any,
  per_class: Mapping[str, Any],
  *,
  thresholds: Mapping[str, float] | None = None,
) -> bool:
  """Draws per-class values against training-sample count (log x) on ``ax``.

  Per method (``(C,)`` or ``(runs, C)`` values): a line through the mean of classes
  sharing a count and a faint dot per class; counts of 0 and NaN are left out.
  ``thresholds`` (label -> count) are dashed vertical lines. Returns whether every
  finite value is positive (so a log y axis shows them all).
  """
  counts = np.asarray(train_counts, np.float64)
  if counts.ndim != 1:
    raise ValueError(f"train_counts must be 1-D, got shape {counts.shape}.")
  drawn = counts > 0
  distinct = np.unique(counts[drawn])
  positive = True
  for name, values in per_class.items():
    runs = np.asarray(values, np.float64)
    runs = runs[None] if runs.ndim == 1 else runs  # 1-D: one run
    if runs.ndim != 2 or runs.shape[0] == 0:
      raise ValueError(
        f"per_class[{name!r}]: shape {runs.shape} is not (points,) or (runs, points)."
      )
    if runs.shape[1] != len(counts):
      raise ValueError(
        f"per_class[{name!r}]: expected {len(counts)} points, got {runs.shape[1]}."
      )
    # One point per distinct count (the mean over its classes); all-NaN: not drawn.
    with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
      grouped = np.stack([np.nanmean(runs[:, counts == c], 1) for c in distinct], 1)
      mean, low, high = (f(grouped, 0) for f in (np.nanmean, np.nanmin, np.nanmax))
      class_means = np.nanmean(runs, axis=0)
    color = ax.plot(distinct, mean, label=name, marker="o", ms=4)[0].get_color()
    if len(runs) > 1:
      ax.fill_between(distinct, low, high, color=color, alpha=0.15, lw=0)
    ax.scatter(counts[drawn], class_means[drawn], s=10, color=color, alpha=0.35)
    finite = runs[np.isfinite(runs)]
    positive &= bool(finite.size) and bool((finite > 0).all())
  style = dict(va="top", fontsize=8, color="0.35", rotation=90)
  for label, count in (thresholds or {}).items():
    ax.axvline(count, color="0.5", ls="--", lw=0.8)
    ax.annotate(
      label,
      (count, 1.0),
      xycoords=("data", "axes fraction"),
      xytext=(3, -3),
      textcoords="offset points",
      **style,
    )
  ax.set_xscale("log")
  ax.set_xlabel("training images of the class (log scale)")
  ax.grid(True, which="major", alpha=0.3)
  return positive


def plot_per_class_accuracy(
  train_counts: Any,
  per_class: Mapping[str, Any],
  path: str | os.PathLike[str],
  *,
  thresholds: Mapping[str, float] | None = None,
  title: str | None = None,
) -> Path:
  """Per-class test accuracy against training-sample count (see :func:`draw_per_class`).

  >>> import tempfile, pathlib
  >>> out = pathlib.Path(tempfile.mkdtemp()) / "acc.png"
  >>> plot_per_class_accuracy([100, 30, 5], {"sgd": [0.9, 0.6, 0.1]}, out).name
  'acc.png'
  """
  if not per_class:
    raise ValueError("per_class is empty.")
  fig = figure()
  ax = fig.add_subplot()
  draw_per_class(ax, train_counts, per_class, thresholds=thresholds)
  ax.set_ylim(-0.03, 1.03)
  ax.set_ylabel("test accuracy of the class")
  ax.legend(loc="lower right")
  if title:
    ax.set_title(title, fontsize=10)
  return save(fig, path)


def plot_ablation(
  runs: Sequence[Mapping[str, Any]],
  keys: Sequence[str],
  metrics: Mapping[str, str],
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
) -> Path:
  """Metrics (columns; run key -> title) against each swept setting in ``keys`` (rows).

  Runs (dicts with ``optimizer``, ``seed``, the keys and metrics) that share the
  optimizer and the other swept values form one line over the row's setting: mean
  over seeds, error bars of one standard deviation. Runs without the setting (value
  ``None``, e.g. SGD for ``rho``) are a dashed line with a one-std band.

  >>> import tempfile, pathlib
  >>> runs = [{"optimizer": o, "seed": 0, "rho": r, "acc": a} for o, r, a in
  ...         [("sgd", None, 0.5), ("sam", 0.01, 0.6), ("sam", 0.1, 0.55)]]
  >>> out = pathlib.Path(tempfile.mkdtemp()) / "ablation.png"
  >>> plot_ablation(runs, ["rho"], {"acc": "accuracy"}, out).name
  'ablation.png'
  """
  if not runs or not keys or not metrics:
    raise ValueError("plot_ablation needs runs, keys and metrics.")
  fig = figure(3.2 * len(metrics), 2.8 * len(keys) + 0.5)
  axes = fig.subplots(len(keys), len(metrics), squeeze=False)
  optimizers = list(dict.fromkeys(r["optimizer"] for r in runs))
  for row, key in enumerate(keys):
    values = sorted({r[key] for r in runs if r.get(key) is not None})
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
      groups.setdefault(report.label(r, [k for k in keys if k != key]), []).append(r)
    for ax, (metric, name) in zip(axes[row], metrics.items(), strict=True):
      seen: dict[str, int] = {}
      for tag, members in groups.items():
        optimizer = members[0]["optimizer"]
        color = f"C{optimizers.index(optimizer) % 10}"
        k = seen[optimizer] = seen.get(optimizer, -1) + 1  # k-th line of this color
        if members[0].get(key) is None:
          if stats := report.mean_std(m[metric] for m in members):
            mean, std = stats["mean"], stats["std"]
            ax.axhline(mean, color=color, ls=("--", ":", "-.")[k % 3], lw=1, label=tag)
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.1, lw=0)
          continue
        at = [
          (x, report.mean_std(m[metric] for m in members if m[key] == x))
          for x in values
        ]
        points = [(x, s["mean"], s["std"]) for x, s in at if s]
        xs, means, stds = zip(*points, strict=True) if points else ((), (), ())
        marker = "osD^v"[k % 5]
        ax.errorbar(
          xs, means, yerr=stds, color=color, marker=marker, ms=4, capsize=3, label=tag
        )
      if len(values) > 1 and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
      ax.set_xlabel(key)
      ax.set_title(name, fontsize=9)
      ax.grid(True, alpha=0.3)
    axes[row, 0].legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=10)
  return save(fig, path)


def plot_roc_grid(
  panels: Mapping[str, Mapping[str, Sequence[tuple[Any, Any]]]],
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
  columns: int = 5,
) -> Path:
  """ROC curves with the chance line, one panel per entry (up to ``columns`` a row).

  ``panels``: title -> method -> ``(fpr, tpr)`` curves, one per run (a colour per
  method); the legend gives each method's mean area (its mean AUROC).

  >>> import tempfile, pathlib
  >>> out = pathlib.Path(tempfile.mkdtemp()) / "roc.png"
  >>> plot_roc_grid({"class 0": {"adam": [([0, 0.5, 1], [0, 0.8, 1])]}}, out).name
  'roc.png'
  """
  if not panels:
    raise ValueError("panels is empty.")
  cols = max(1, min(columns, len(panels)))
  rows = -(-len(panels) // cols)
  fig = figure(3.0 * cols, 3.0 * rows + 0.4)
  axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
  methods = list(dict.fromkeys(m for panel in panels.values() for m in panel))
  for ax, (panel_title, by_method) in zip(axes.flat, panels.items(), strict=False):
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    for method, curves in by_method.items():
      curves = [[np.asarray(a, np.float64) for a in curve] for curve in curves]
      if any(fpr.shape != tpr.shape or fpr.ndim != 1 for fpr, tpr in curves):
        raise ValueError(
          f"panels[{panel_title!r}][{method!r}]: fpr and tpr must be 1-D of one length."
        )
      area = np.mean([np.trapezoid(tpr, fpr) for fpr, tpr in curves])
      color = f"C{methods.index(method) % 10}"
      for i, (fpr, tpr) in enumerate(curves):
        label = None if i else f"{method} ({area:.3f})"
        ax.plot(fpr, tpr, color=color, lw=1, alpha=0.7, label=label)
    ax.set_title(panel_title, fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=6)
  for ax in axes.flat[len(panels) :]:
    ax.set_axis_off()
  for ax in axes[-1]:
    ax.set_xlabel("false positive rate", fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel("true positive rate", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return save(fig, path)
