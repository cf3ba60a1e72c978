"""One report layer: the results.json schema, seed summaries and text tables.

Every application writes ``OUT/results.json`` as ``{"config", "runs",
"summary"}``: the experiment's options (:func:`shared.options.to_json`); one entry
per (method, seed, setting) with ``optimizer`` (display name: ``sgd``, ``adam``,
``sam``, ``imbsam``), ``method`` (``base``, ``sam``, ``imbsam``), ``seed``, the
swept values (``None`` where the method does not use one), the metrics and the
run's own ``config``; and :func:`summarize` of the runs.

Example:
  >>> runs = [{"optimizer": "sgd", "seed": s, "rho": None, "acc": a}
  ...         for s, a in [(0, 0.5), (1, 0.75)]]
  >>> summarize(runs, ["acc"], ["rho"])["sgd"]["acc"]
  {'mean': 0.625, 'std': 0.125, 'n': 2}
  >>> print(text_table([["", "acc"], ["sgd", cell({"mean": 0.625, "std": 0.125})]]))
             acc
  sgd  0.6 ± 0.1
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


def finite(content: Any) -> Any:
  """``content`` with NaN and infinite floats (e.g. of a diverged run) as ``None``.

  >>> finite({"loss": [1.5, float("nan")], "auroc": float("inf"), "n": 3})
  {'loss': [1.5, None], 'auroc': None, 'n': 3}
  """
  if isinstance(content, float):
    return content if math.isfinite(content) else None
  if isinstance(content, Mapping):
    return {k: finite(v) for k, v in content.items()}
  if isinstance(content, list | tuple):
    return [finite(v) for v in content]
  return content


def as_json(content: Any) -> Any:
  """``content`` as it reads back from :func:`write_json` (tuples as lists, NaN as
  ``None``): what the applications' ``main`` returns."""
  return json.loads(json.dumps(finite(content)))


def write_json(path: str | Path, content: Any) -> Path:
  """Writes strict JSON atomically (a temporary file renamed into place); NaN and
  infinities become ``null`` (:func:`finite`)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(finite(content), indent=1, allow_nan=False) + "\n")
  tmp.replace(path)
  return path


def write_output(out: str | Path | None, name: str, content: Any) -> Path | None:
  """Writes ``content`` to ``out`` if it names a ``.json`` file, else to
  ``out/name`` (the benchmarks' ``--out``); nothing for ``out=None``."""
  if out is None:
    return None
  path = Path(out)
  return write_json(path if path.suffix == ".json" else path / name, content)


def label(run: Mapping[str, Any], keys: Sequence[str]) -> str:
  """``"imbsam rho=0.05 eta=20"``: the optimizer and the run's values of keys."""
  values = [
    f"{k}={run[k]:g}" if isinstance(run[k], float) else f"{k}={run[k]}"
    for k in keys
    if run.get(k) is not None
  ]
  return " ".join([run["optimizer"], *values])


def varying(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
  """The keys that take more than one non-None value over the runs."""
  return [k for k in keys if len({r.get(k) for r in runs} - {None}) > 1]


def mean_std(values: Iterable[float | None]) -> dict[str, Any] | None:
  """``{"mean", "std", "n"}`` of the finite values (population std), or None."""
  kept = [v for v in values if v is not None and math.isfinite(v)]
  if not kept:
    return None
  return {"mean": float(np.mean(kept)), "std": float(np.std(kept)), "n": len(kept)}


def nanmean_columns(rows: Sequence[Sequence[float | None]]) -> list[float | None]:
  """Element-wise mean of equally long lists, ignoring ``None``."""
  array = np.array([[np.nan if v is None else v for v in r] for r in rows], float)
  with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
    means = np.nanmean(array, axis=0)  # all-None columns: NaN, no warning
  return [None if np.isnan(m) else float(m) for m in means]


def summarize(
  runs: Sequence[Mapping[str, Any]],
  metrics: Sequence[str],
  keys: Sequence[str] = (),
  *,
  vectors: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
  """Mean and spread over seeds, per group of runs that differ only in the seed.

  Returns:
    ``{label: {"optimizer", *keys, "seeds", metric: mean_std, "<vector>_mean"}}``
    (groups by :func:`label` over ``keys``, in order of appearance).
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault(label(run, keys), []).append(run)
  return {
    name: {
      "optimizer": members[0]["optimizer"],
      **{k: members[0].get(k) for k in keys},
      "seeds": [r["seed"] for r in members],
      **{m: mean_std(r[m] for r in members) for m in metrics},
      **{f"{v}_mean": nanmean_columns([r[v] for r in members]) for v in vectors},
    }
    for name, members in groups.items()
  }


def cell(stats: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
  """``"67.4 ± 1.5"`` from :func:`mean_std` output (``-`` for None)."""
  if stats is None:
    return "-"
  return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def text_table(rows: Sequence[Sequence[str]]) -> str:
  """Rows of cells, the first column left-aligned, the others right-aligned."""
  widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
  return "\n".join(
    "  ".join([r[0].ljust(widths[0]), *map(str.rjust, r[1:], widths[1:])]).rstrip()
    for r in rows
  )
