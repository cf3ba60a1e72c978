"""Figures of the example applications, saved as PNG files.

Each function takes plain arrays or dicts of arrays (one entry per method, e.g.
``{"sgd": ..., "sam": ..., "imbsam": ...}``), draws one figure, writes it and
returns the path written. Figures are built with :class:`matplotlib.figure.Figure`
and rendered by the Agg canvas: no pyplot, no global backend or figure state, so
the functions work headless, in threads and in tests.

Where a method has several runs (seeds), pass a 2-D array ``(runs, points)``: the
line is the mean over runs and a shaded band spans the runs' minimum to maximum.

* :func:`plot_per_class_accuracy`: test accuracy of each class against its number
  of training images (log x), the long-tailed picture.
* :func:`draw_per_class`: the same drawing on a given axes, for multi-panel
  figures (e.g. per-class curvature).
* :func:`plot_ablation`: metrics against each swept setting (``rho``, ``eta``),
  mean and spread over seeds: the paper's ablation figure.
* :func:`plot_roc_grid`: ROC curves with their areas, one panel per setting
  (normal class) and several runs per method, for anomaly detection.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Resolution of the saved PNGs.
DPI = 120
_FIGSIZE = (6.4, 4.2)


def _runs(values: Any, name: str, length: int | None = None) -> np.ndarray:
  """``values`` as a float ``(runs, points)`` array (1-D input is one run)."""
  array = np.asarray(values, np.float64)
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or array.shape[0] == 0:
    raise ValueError(
      f"{name}: expected shape (points,) or (runs, points), got {array.shape}."
    )
  if length is not None and array.shape[1] != length:
    raise ValueError(f"{name}: expected {length} points, got {array.shape[1]}.")
  return array


def figure(width: float = _FIGSIZE[0], height: float = _FIGSIZE[1]) -> Figure:
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


def _mean_and_band(ax: Any, x: np.ndarray, runs: np.ndarray, label: str, **kw):
  """Draws the mean over runs as a line and their min..max as a band."""
  with _ignore_all_nan():
    mean = np.nanmean(runs, axis=0)
    low, high = np.nanmin(runs, axis=0), np.nanmax(runs, axis=0)
  (line,) = ax.plot(x, mean, label=label, **kw)
  if runs.shape[0] > 1:
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
  return line


@contextlib.contextmanager
def _ignore_all_nan() -> Iterator[None]:
  """Silences NumPy's "all-NaN slice" warnings (such points are not drawn)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    yield


def draw_per_class(
  ax: Any,
  train_counts: Any,
  per_class: Mapping[str, Any],
  *,
  thresholds: Mapping[str, float] | None = None,
  what: str = "per_class",
) -> bool:
  """Draws per-class values against training-sample count (log x) on ``ax``.

  One line per method: classes sharing a count are averaged into one point,
  each class is also a faint dot; with several runs the line is the mean over
  runs and the band their minimum to maximum. Classes without training images
  and NaN values are left out. ``thresholds`` (label -> count) are labelled
  vertical dashed lines.

  Args:
    ax: a matplotlib axes.
    train_counts: ``(C,)`` training images per class.
    per_class: method name -> ``(C,)`` or ``(runs, C)`` values.
    thresholds: label -> count.
    what: the argument's name in error messages.

  Returns:
    Whether every finite value is positive (a log y axis can show them all).
  """
  counts = np.asarray(train_counts, np.float64)
  if counts.ndim != 1:
    raise ValueError(f"train_counts must be 1-D, got shape {counts.shape}.")
  drawn = counts > 0
  distinct = np.unique(counts[drawn])  # ascending
  positive = True
  for name, values in per_class.items():
    runs = _runs(values, f"{what}[{name!r}]", len(counts))
    # One point per distinct count: the mean over the classes with that count.
    grouped = np.stack(
      [_nanmean_columns(runs[:, counts == c]) for c in distinct], axis=1
    )
    line = _mean_and_band(ax, distinct, grouped, name, marker="o", ms=4)
    with _ignore_all_nan():
      class_means = np.nanmean(runs, axis=0)
    ax.scatter(
      counts[drawn], class_means[drawn], s=10, color=line.get_color(), alpha=0.35
    )
    finite = runs[np.isfinite(runs)]
    positive &= bool(finite.size) and bool((finite > 0).all())
  for label, count in (thresholds or {}).items():
    ax.axvline(count, color="0.5", ls="--", lw=0.8)
    ax.annotate(
      label,
      (count, 1.0),
      xycoords=("data", "axes fraction"),
      xytext=(3, -3),
      textcoords="offset points",
      ha="left",
      va="top",
      fontsize=8,
      color="0.35",
      rotation=90,
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
  """Per-class test accuracy against training-sample count, one line per method.

  The x axis is the number of training images of a class (log scale). Classes
  sharing a count are averaged into one point of the line; each class is also
  drawn as a faint dot. With several runs per method, the line is the mean over
  runs and the band spans the runs' minimum to maximum. Classes without training
  images (not drawable on a log axis) and NaN accuracies (classes without test
  images) are left out.

  Args:
    train_counts: ``(C,)`` training images per class.
    per_class: method name -> accuracies in [0, 1], ``(C,)`` or ``(runs, C)``.
    path: the PNG file to write (parent directories are created).
    thresholds: label -> count, drawn as labelled vertical dashed lines (e.g.
      the Few / Many split thresholds).
    title: figure title.

  Returns:
    ``path`` as a :class:`pathlib.Path`.

  Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "acc.png"
    >>> plot_per_class_accuracy([100, 30, 5], {"sgd": [0.9, 0.6, 0.1]}, out).name
    'acc.png'
  """
  if not per_class:
    raise ValueError("per_class is empty.")
  fig = figure()
  ax = fig.add_subplot()
  draw_per_class(ax, train_counts, per_class, thresholds=thresholds, what="per_class")
  ax.set_ylim(-0.03, 1.03)
  ax.set_ylabel("test accuracy of the class")
  ax.legend(loc="lower right")
  if title:
    ax.set_title(title, fontsize=10)
  return save(fig, path)


def _nanmean_columns(block: np.ndarray) -> np.ndarray:
  """Row-wise mean over the columns of ``block`` that are not NaN."""
  with _ignore_all_nan():
    return np.nanmean(block, axis=1)


def plot_ablation(
  runs: Sequence[Mapping[str, Any]],
  keys: Sequence[str],
  metrics: Mapping[str, str],
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
) -> Path:
  """Metrics against each swept setting: the paper's ablation figure.

  One row of panels per swept key (e.g. ``rho``, ``eta``), one column per metric
  (e.g. Many / Medium / Few / Overall accuracy). In the panels of key ``k``, each
  group of runs that share the optimizer and the other swept values is a line
  over the values of ``k``: the mean over seeds with error bars of one standard
  deviation. A group that does not use ``k`` (its value is ``None``, e.g. SGD for
  ``rho``) is a dashed horizontal line with a band of one standard deviation.

  Args:
    runs: run entries with ``optimizer``, ``seed``, the ``keys`` and the metrics
      (``None`` metric values are left out).
    keys: the swept settings, one row each.
    metrics: run entry key -> panel title.
    path: the PNG file to write.
    title: figure title.

  Returns:
    ``path`` as a :class:`pathlib.Path`.

  Example:
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
    others = [k for k in keys if k != key]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
      tag = " ".join(
        [r["optimizer"], *(f"{k}={r[k]:g}" for k in others if r.get(k) is not None)]
      )
      groups.setdefault(tag, []).append(r)
    for col, (metric, name) in enumerate(metrics.items()):
      ax = axes[row, col]
      seen: dict[str, int] = {}
      for tag, members in groups.items():
        optimizer = members[0]["optimizer"]
        color = f"C{optimizers.index(optimizer) % 10}"
        k = seen[optimizer] = seen.get(optimizer, -1) + 1  # k-th line of this color
        if members[0].get(key) is None:
          finite = [m[metric] for m in members if m[metric] is not None]
          if finite:
            mean, std = np.mean(finite), np.std(finite)
            ls = ("--", ":", "-.")[k % 3]
            ax.axhline(mean, color=color, ls=ls, lw=1, label=tag)
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.1, lw=0)
          continue
        xs, means, stds = [], [], []
        for x in values:
          finite = [m[metric] for m in members if m[key] == x and m[metric] is not None]
          if finite:
            xs.append(x)
            means.append(np.mean(finite))
            stds.append(np.std(finite))
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
  """ROC curves in a grid of panels, several runs per method, with the chance line.

  One panel per entry of ``panels`` (e.g. one per normal class); in a panel each
  method has one colour and each of its runs (seeds) one line; the legend gives
  the method's mean trapezoidal area (its mean AUROC for curves from
  :func:`shared.metrics.roc_curve`).

  Args:
    panels: panel title -> method -> list of ``(fpr, tpr)`` curves.
    path: the PNG file to write.
    title: figure title.
    columns: panels per row (at most).

  Returns:
    ``path`` as a :class:`pathlib.Path`.

  Example:
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
      runs = []
      for fpr, tpr in curves:
        fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
          raise ValueError(
            f"panels[{panel_title!r}][{method!r}]: fpr and tpr must be 1-D of one"
            " length."
          )
        runs.append((fpr, tpr))
      area = np.mean([np.trapezoid(tpr, fpr) for fpr, tpr in runs])
      color = f"C{methods.index(method) % 10}"
      for i, (fpr, tpr) in enumerate(runs):
        label = f"{method} ({area:.3f})" if i == 0 else None
        ax.plot(fpr, tpr, color=color, lw=1, alpha=0.7, label=label)
    ax.set_title(panel_title, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
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
