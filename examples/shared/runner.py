"""One runner: seeds x methods x settings, progress, metrics logs, results.json.

:func:`run_grid` runs an application's :func:`grid` of cells with one progress
bar and rewrites ``OUT/results.json`` (:mod:`shared.report`'s schema) after every
run, so finished runs survive an interruption; :class:`MetricsLog` writes a run's
training metrics as they come. Only process 0 writes.

Methods: ``base`` (the base optimizer without perturbation; reported under its
name, ``sgd`` or ``adam``, which are accepted as aliases), ``sam``, ``imbsam``.

Example:
  >>> cells = grid(("base", "imbsam"), (0,), {"rho": (0.01, 0.1)},
  ...              uses={"base": (), "imbsam": ("rho",)})
  >>> [c.name for c in cells]
  ['base_seed0', 'imbsam_rho0.01_seed0', 'imbsam_rho0.1_seed0']
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
from tqdm.auto import tqdm

from shared import report

METHODS = ("base", "sam", "imbsam")


def method_name(name: str, aliases: Collection[str] = ("sgd", "adam")) -> str:
  """``base`` for an alias of the base optimizer, else ``name``."""
  return "base" if name in aliases else name


class Cell(NamedTuple):
  """One run of the grid: a method, a seed and the swept values it uses."""

  method: str
  seed: int
  setting: Mapping[str, Any]

  @property
  def name(self) -> str:
    """``imbsam_rho0.05_eta20_seed0``: unique in its grid; a file name."""
    values = [
      f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
      for k, v in self.setting.items()
    ]
    return "_".join([self.method, *values, f"seed{self.seed}"])


def grid(
  methods: Sequence[str],
  seeds: Sequence[int],
  sweeps: Mapping[str, Sequence[Any]],
  *,
  uses: Mapping[str, Collection[str]],
) -> list[Cell]:
  """Every cell; a method runs once per combination of the sweeps it ``uses``.

  The sweeps all methods use vary slowest, then the seed, the method and its own
  sweeps: runs that share data and initial weights are adjacent.
  """
  common = [k for k in sweeps if all(k in uses[m] for m in methods)]

  def product(keys: Sequence[str]) -> list[dict[str, Any]]:
    return [
      dict(zip(keys, v, strict=True))
      for v in itertools.product(*(sweeps[k] for k in keys))
    ]

  return [
    Cell(method, seed, {k: {**shared, **own}[k] for k in sweeps if k in uses[method]})
    for shared in product(common)
    for seed in seeds
    for method in methods
    for own in product([k for k in sweeps if k in uses[method] and k not in common])
  ]


def is_main_process() -> bool:
  return jax.process_index() == 0


def progress_bar(total: int, unit: str, enabled: bool) -> tqdm:
  """A tqdm bar (a context manager), disabled (every call a no-op) unless
  ``enabled`` and on process 0."""
  disable = not (enabled and is_main_process())
  return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=disable)


class MetricsLog:
  """Appends rows of training metrics (loss, accuracy, ImbSAM's ``tail_grad_norm``
  and ``tail_fraction``) to a CSV file (process 0), for a spreadsheet or pandas.

  The first row fixes the columns. ``resume=True`` appends to an existing file,
  else it starts over.
  """

  def __init__(self, path: str | Path, *, resume: bool = False):
    self.path, self.columns = Path(path), None
    if not resume and is_main_process():
      self.path.unlink(missing_ok=True)
    elif self.path.is_file():
      with open(self.path, newline="") as f:
        self.columns = next(csv.reader(f), None)

  def write(self, row: Mapping[str, Any]) -> None:
    if not is_main_process():
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    new, self.columns = self.columns is None, self.columns or list(row)
    with open(self.path, "a", newline="") as f:
      writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
      if new:
        writer.writeheader()
      writer.writerow(
        {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
      )


class TensorBoardLog:
  """Scalars as TensorBoard event files (``tensorboard --logdir`` opens them),
  written by process 0 through tensorboardX (no TensorFlow).

  ``resume_step`` > 0 marks the events after it, written before an
  interruption, as discarded (TensorBoard's purge step), so a resumed run
  neither duplicates nor loses points.
  """

  def __init__(self, logdir: str | Path, *, resume_step: int = 0):
    self._writer = None
    if is_main_process():
      from tensorboardX import SummaryWriter  # imported by process 0 only

      # A resumed run writes a file of its own, named to sort after the first
      # (file names hold the second they were made in; TensorBoard reads them
      # in name order).
      suffix = f".resumed-{resume_step:010d}" if resume_step else ""
      self._writer = SummaryWriter(
        str(logdir),
        purge_step=resume_step + 1 if resume_step else None,
        flush_secs=30,
        filename_suffix=suffix,
      )

  def write(self, step: int, row: Mapping[str, Any], prefix: str) -> None:
    """Each number of ``row`` as the scalar ``prefix/name`` at ``step``."""
    if self._writer is None:
      return
    for name, value in row.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(f"{prefix}/{name}", value, step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def run_grid(
  cells: Sequence[Cell],
  run_one: Callable[[Cell, Any], dict[str, Any]],
  *,
  out: str | Path,
  config: Mapping[str, Any],
  keys: Sequence[str],
  metrics: Sequence[str],
  vectors: Sequence[str] = (),
  units_per_cell: int = 1,
  unit: str = "run",
  progress: bool = True,
) -> dict[str, Any]:
  """Runs every cell; returns (and keeps writing) the results.json content.

  Args:
    cells: from :func:`grid`.
    run_one: ``(cell, bar) -> run entry`` (metrics, the run's own ``config``);
      it advances the progress ``bar`` by ``units_per_cell``.
    out: output directory.
    config: the experiment's options (the ``config`` block).
    keys: the swept options; every run entry has them (``None`` where unused).
    metrics: scalar metrics summarized over seeds.
    vectors: list-valued metrics averaged element-wise over seeds.
    units_per_cell: progress units of one cell (e.g. its training steps).
    unit: the progress unit's name.
    progress: show the progress bar.
  """
  runs: list[dict[str, Any]] = []
  results = {"config": dict(config), "runs": runs, "summary": {}}
  with progress_bar(len(cells) * units_per_cell, unit, progress) as bar:
    for cell in cells:
      bar.set_description(cell.name)
      setting = {k: cell.setting.get(k) for k in keys}
      runs.append(
        {"method": cell.method, "seed": cell.seed, **setting, **run_one(cell, bar)}
      )
      varying = report.varying(runs, keys)
      results["summary"] = report.summarize(runs, metrics, varying, vectors=vectors)
      if is_main_process():
        report.write_json(Path(out) / report.RESULTS_FILE, results)
  return results
