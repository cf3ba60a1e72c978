"""One runner: seeds x methods x settings, progress, metrics logs, results.json.

An application hands :func:`run_grid` its grid of :class:`Cell` (from
:func:`grid`) and a function that trains and evaluates one cell; the runner
shows one progress bar, rewrites ``OUT/results.json`` after every run (finished
runs survive an interruption) with the :mod:`shared.report` schema, and only
process 0 writes. :class:`MetricsLog` is the per-run CSV of training metrics
(loss, accuracy, ImbSAM's ``tail_grad_norm`` and ``tail_fraction``), written as
training goes; a spreadsheet or ``pandas.read_csv`` opens it.

Methods: ``base`` is the base optimizer without perturbation (reported under
the base optimizer's name, e.g. ``sgd`` or ``adam``, which are accepted as
aliases), ``sam`` and ``imbsam``.

Example:
  >>> cells = grid(("base", "imbsam"), (0,), {"rho": (0.01, 0.1)},
  ...              uses={"base": (), "imbsam": ("rho",)})
  >>> [c.name for c in cells]
  ['base_seed0', 'imbsam_rho0.01_seed0', 'imbsam_rho0.1_seed0']
"""

from __future__ import annotations

import contextlib
import csv
import itertools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

from shared import report

METHODS = ("base", "sam", "imbsam")


def method_name(name: str, aliases: Collection[str] = ("sgd", "adam")) -> str:
  """``base``, ``sam`` or ``imbsam`` for a method name or an alias of base."""
  return "base" if name in aliases else name


class Cell(NamedTuple):
  """One run of the grid: a method, a seed and the swept values it uses."""

  method: str
  seed: int
  setting: Mapping[str, Any]

  @property
  def name(self) -> str:
    """``imbsam_rho0.05_eta20_seed0``: unique within a grid; a file name."""
    parts = [self.method, *(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                            for k, v in self.setting.items())]  # fmt: skip
    return "_".join([*parts, f"seed{self.seed}"])


def grid(
  methods: Sequence[str],
  seeds: Sequence[int],
  sweeps: Mapping[str, Sequence[Any]],
  *,
  uses: Mapping[str, Collection[str]],
) -> list[Cell]:
  """Every (setting, seed, method) cell; a method runs once per value it uses.

  The sweeps every method uses vary slowest, then the seed, then the method,
  then the method's own sweeps: runs that share data and initial weights are
  adjacent.
  """
  common = [k for k in sweeps if all(k in uses[m] for m in methods)]

  def product(keys: Sequence[str]) -> list[dict[str, Any]]:
    values = itertools.product(*(sweeps[k] for k in keys))
    return [dict(zip(keys, v, strict=True)) for v in values]

  cells = []
  for shared in product(common):
    for seed in seeds:
      for method in methods:
        own = [k for k in sweeps if k in uses[method] and k not in common]
        for setting in product(own):
          full = {k: {**shared, **setting}[k] for k in sweeps if k in uses[method]}
          cells.append(Cell(method, seed, full))
  return cells


def is_main_process() -> bool:
  return jax.process_index() == 0


class _NoBar:
  def update(self, n: int = 1) -> None:
    pass

  def set_postfix(self, *args: Any, **kwargs: Any) -> None:
    pass

  def set_description(self, text: str) -> None:
    pass


@contextlib.contextmanager
def progress_bar(total: int, unit: str, enabled: bool) -> Iterator[Any]:
  """A tqdm bar (process 0 only), or one that shows nothing."""
  if not (enabled and is_main_process()):
    yield _NoBar()
    return
  from tqdm.auto import tqdm

  bar = tqdm(total=total, unit=unit, dynamic_ncols=True)
  try:
    yield bar
  finally:
    bar.close()


class MetricsLog:
  """Appends rows of training metrics to a CSV file as they come.

  The columns are fixed by the first row; a later row may leave some empty.
  ``resume=True`` appends to an existing file, else it starts over. Only
  process 0 writes.
  """

  def __init__(self, path: str | Path, *, resume: bool = False):
    self.path = Path(path)
    self._columns: list[str] | None = None
    if not resume and is_main_process():
      self.path.unlink(missing_ok=True)
    elif self.path.is_file():
      with open(self.path, newline="") as f:
        self._columns = next(csv.reader(f), None)

  def write(self, row: Mapping[str, Any]) -> None:
    if not is_main_process():
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    new = self._columns is None
    if new:
      self._columns = list(row)
    with open(self.path, "a", newline="") as f:
      writer = csv.DictWriter(f, self._columns, extrasaction="ignore")
      if new:
        writer.writeheader()
      writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value: Any) -> Any:
  return f"{value:.6g}" if isinstance(value, float) else value


def run_grid(
  cells: Sequence[Cell],
  run_one: Callable[[Cell, Any], dict[str, Any]],
  *,
  out: str | Path,
  config: Mapping[str, Any],
  keys: Sequence[str],
  metrics: Sequence[str],
  vectors: Sequence[str] = (),
  units_per_cell: Callable[[Cell], int] = lambda cell: 1,
  unit: str = "run",
  progress: bool = True,
) -> dict[str, Any]:
  """Runs every cell; returns (and keeps writing) the results.json content.

  Args:
    cells: from :func:`grid`.
    run_one: ``(cell, bar) -> run entry`` (the metrics and the run's own
      ``config``); it advances ``bar`` by ``units_per_cell(cell)``.
    out: output directory; ``OUT/results.json`` is rewritten after each run.
    config: the experiment's options (the ``config`` block).
    keys: the swept options; every run entry has them (``None`` where unused).
    metrics: scalar metrics summarized over seeds.
    vectors: list-valued metrics averaged element-wise over seeds.
    units_per_cell: progress units of one cell (e.g. its training steps).
    unit: the progress bar's unit.
    progress: show the progress bar.
  """
  results: dict[str, Any] = {"config": dict(config), "runs": [], "summary": {}}
  total = sum(units_per_cell(c) for c in cells)
  with progress_bar(total, unit, progress) as bar:
    for cell in cells:
      bar.set_description(cell.name)
      run = run_one(cell, bar)
      entry = {"method": cell.method, "seed": cell.seed}
      entry.update({k: cell.setting.get(k) for k in keys})
      results["runs"].append({**entry, **run})
      results["summary"] = report.summarize(
        results["runs"], metrics, report.varying(results["runs"], keys), vectors=vectors
      )
      if is_main_process():
        report.write_json(Path(out) / report.RESULTS_FILE, results)
  return results
