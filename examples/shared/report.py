"""One report layer: the results.json schema, seed summaries and text tables.

Every application writes ``OUT/results.json`` as

``{"config": {...}, "runs": [...], "summary": {...}}``:

* ``config``: the experiment's options (:func:`shared.options.to_json`);
* ``runs``: one entry per (method, seed, setting) with at least ``optimizer``
  (the method's display name, e.g. ``sgd``, ``adam``, ``sam``, ``imbsam``),
  ``method`` (``base``, ``sam`` or ``imbsam``), ``seed``, the swept values the
  run used (``None`` for those it does not depend on), its metrics and its
  own ``config``;
* ``summary``: :func:`summarize` of the runs: per group of runs that differ
  only in the seed, the mean and standard deviation of each metric.

Example:
  >>> runs = [{"optimizer": "sgd", "seed": s, "rho": None, "acc": a}
  ...         for s, a in [(0, 0.5), (1, 0.75)]]
  >>> summarize(runs, ["acc"], ["rho"])["sgd"]["acc"]
  {'mean': 0.625, 'std': 0.125, 'n': 2}
  >>> print(text_table([["", "acc"], ["sgd", "0.6"]]))
       acc
  sgd  0.6
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_FILE = "results.json"


def write_json(path: str | Path, content: Any) -> Path:
  """Writes strict JSON atomically (a temporary file renamed into place)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(content, indent=1, allow_nan=False) + "\n")
  tmp.replace(path)
  return path


def label(run: Mapping[str, Any], keys: Sequence[str]) -> str:
  """``"imbsam rho=0.05 eta=20"``: the optimizer and the run's swept values.

  Keys whose value is ``None`` (not used by this method) are left out.
  """
  parts = [f"{k}={run[k]:g}" if isinstance(run[k], float) else f"{k}={run[k]}"
           for k in keys if run.get(k) is not None]  # fmt: skip
  return " ".join([run["optimizer"], *parts])


def mean_std(values: Iterable[float | None]) -> dict[str, Any] | None:
  """``{"mean", "std", "n"}`` of the non-None values (population std)."""
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return None
  return {
    "mean": float(np.mean(finite)),
    "std": float(np.std(finite)),
    "n": len(finite),
  }


def nanmean_columns(rows: Sequence[Sequence[float | None]]) -> list[float | None]:
  """Element-wise mean of equally long lists, ignoring ``None``."""
  array = np.array([[np.nan if v is None else v for v in r] for r in rows], float)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    means = np.nanmean(array, axis=0)
  return [None if np.isnan(m) else float(m) for m in means]


def summarize(
  runs: Sequence[Mapping[str, Any]],
  metrics: Sequence[str],
  keys: Sequence[str] = (),
  *,
  vectors: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
  """Mean and spread over seeds, per group of runs that differ only in the seed.

  Args:
    runs: run entries (``optimizer``, ``seed``, the ``keys`` and the metrics).
    metrics: scalar metrics to summarize (``None`` values are left out).
    keys: the swept settings that tell groups apart (besides the optimizer).
    vectors: list-valued metrics (e.g. ``per_class``), averaged element-wise
      into ``<name>_mean``.

  Returns:
    ``{label: {"optimizer", *keys, "seeds", metric: {"mean", "std", "n"} or
    None, "<vector>_mean": [...]}}``, in the order of first appearance.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(label(run, keys), []).append(run)
  summary = {}
  for name, members in groups.items():
    first = members[0]
    entry: dict[str, Any] = {"optimizer": first["optimizer"]}
    entry.update({k: first.get(k) for k in keys})
    entry["seeds"] = [r["seed"] for r in members]
    for metric in metrics:
      entry[metric] = mean_std(r[metric] for r in members)
    for vector in vectors:
      entry[f"{vector}_mean"] = nanmean_columns([r[vector] for r in members])
    summary[name] = entry
  return summary


def varying(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
  """The keys that take more than one non-None value over the runs."""
  return [k for k in keys if len({r.get(k) for r in runs} - {None}) > 1]


def cell(stats: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
  """``"67.4 ± 1.5"`` from :func:`mean_std` output (``-`` for None)."""
  if stats is None:
    return "-"
  mean, std = scale * stats["mean"], scale * stats["std"]
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def text_table(rows: Sequence[Sequence[str]]) -> str:
  """Left-aligned first column, right-aligned others, two spaces apart."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = []
  for row in rows:
    cells = [row[0].ljust(widths[0])]
    cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
    lines.append("  ".join(cells).rstrip())
  return "\n".join(lines)
