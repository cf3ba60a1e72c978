"""Per-class sharpness of long-tailed runs: the curvature ImbSAM aims to flatten.

ImbSAM's motivation is that under SGD or SAM the tail classes end in sharp minima
of their own loss, and that aiming SAM's perturbation at the tail flattens them.
``examples/sharpness.py`` measures that on the runs of
``examples/train_long_tailed.py``: for each run of ``RUNS/results.json`` it
restores the final checkpoint (:func:`long_tailed.train.restore`, the model in
eval mode, so an example's loss depends on the parameters and that example
only) and, for each class ``c`` and the head and tail groups (at least / fewer
than the run's ``eta`` training images), measures the curvature of the training
loss restricted to those examples,

.. math::
  L_S(\\theta) = \\frac{1}{|S|} \\sum_{i \\in S} \\ell(f_\\theta(x_i), y_i),

with :mod:`imbsam_jax.sharpness`: the top Hessian eigenvalue (power iteration)
and the Hessian trace (Hutchinson, with its standard error). ``ell`` is the data
loss the run trained with, on the un-augmented training images (weight decay
would add the same constant to every class). Start vectors and probes depend on
``--probe-seed`` and the subset only: every run is measured with the same random
numbers.

Outputs in ``--out`` (default: the runs directory): ``sharpness.json``
(``{"config", "runs"}``, one run per trained run with ``per_class`` and
``groups`` measurements) and ``sharpness.png`` (per-class top eigenvalue and
trace against the class's training count, one line per run label).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import imbsam_jax
from imbsam_jax import sharpness
from long_tailed import train as long_tailed
from shared import metrics as metrics_lib
from shared import options, plots, report, runner, training
from shared.options import NON_NEGATIVE, POSITIVE, option

RESULTS_FILE = "sharpness.json"
PLOT_FILE = "sharpness.png"
GROUPS = ("head", "tail")
_MEASURES = ("top_eigenvalue", "trace")
#: What :func:`measure_subset` returns for a subset.
_VALUES = (
  "loss",
  "top_eigenvalue",
  "eigen_converged",
  "eigen_iterations",
  "trace",
  "trace_stderr",
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Options of the sharpness study."""

  runs: str | None = option(
    None, "output directory of train_long_tailed.py (results.json, checkpoints/)"
  )
  out: str | None = option(None, "output directory (none: --runs)")
  optimizer: tuple[str, ...] | None = option(
    None, "measure only these optimizers' runs (none: all)"
  )
  max_iterations: int = option(
    100, "maximum power iterations per subset", check=POSITIVE
  )
  tolerance: float = option(
    1e-3, "relative tolerance of the power iteration", check=NON_NEGATIVE
  )
  num_probes: int = option(100, "Hutchinson probes per subset", check=POSITIVE)
  batch_size: int = option(
    32,
    "examples per Hessian-vector-product batch (all subsets share its shape; a"
    " GPU likes more)",
    check=POSITIVE,
  )
  probe_seed: int = option(
    0, "seeds the power iteration's start vectors and the probes"
  )
  max_examples_per_class: int | None = option(
    None,
    "measure at most this many examples of each class (none: all)",
    check=POSITIVE,
  )
  progress: bool = option(True, "show a progress bar")

  def validate(self) -> None:
    if self.runs is None:
      raise ValueError("--runs: required (the output directory of a long-tailed run)")


def class_subsets(
  labels: Any,
  train_counts: Any,
  *,
  eta: float,
  max_examples_per_class: int | None = None,
) -> dict[int | str, np.ndarray]:
  """Example indices (dataset order) of each class and of the head and tail groups;
  ``train_counts`` define the groups even when examples are capped.

  Example:
    >>> s = class_subsets([0, 1, 0, 2, 0], [3, 1, 1], eta=2,
    ...                   max_examples_per_class=2)
    >>> {k: v.tolist() for k, v in s.items()}
    {0: [0, 2], 1: [1], 2: [3], 'head': [0, 2], 'tail': [1, 3]}
  """
  labels, tail = np.asarray(labels), imbsam_jax.tail_classes(train_counts, eta)
  subsets: dict[int | str, np.ndarray] = {
    c: np.flatnonzero(labels == c)[:max_examples_per_class] for c in range(len(tail))
  }
  for name, members in (("head", ~tail), ("tail", tail)):
    chosen = [subsets[c] for c in np.flatnonzero(members)]
    subsets[name] = np.sort(np.concatenate([np.zeros(0, np.int64), *chosen]))
  return subsets


@functools.partial(jax.jit, static_argnums=0)
def _weighted_loss_sum(loss_fn, params, batch, weights):
  return jnp.sum(weights * loss_fn(params, batch).astype(jnp.float32))


def _batches(inputs, labels, indices, batch_size, mesh):
  """``(batch, weights)`` of the examples ``indices`` in batches of one shape, the
  last padded with weight-0 copies, so the Hessian-vector product compiles once."""
  padded = np.resize(indices, (-(-indices.size // batch_size), batch_size))
  weights = np.arange(padded.size).reshape(padded.shape) < indices.size
  return [
    training.shard_batch(({"image": inputs[rows], "label": labels[rows]}, w), mesh)
    for rows, w in zip(padded, weights.astype(np.float32), strict=True)
  ]


def measure_subset(
  loss_fn: sharpness.LossFn,
  params: Any,
  batches: sharpness.Batches,
  num_examples: int,
  config: Config,
  key: jax.Array,
) -> dict[str, Any]:
  """Loss, top Hessian eigenvalue and Hessian trace of the mean loss of the
  ``num_examples`` examples of :func:`_batches`."""
  loss = sum(float(_weighted_loss_sum(loss_fn, params, b, w)) for b, w in batches)
  eigen_key, trace_key = jax.random.split(key)
  top = sharpness.top_hessian_eigenvalue(
    loss_fn,
    params,
    batches,
    key=eigen_key,
    max_iters=config.max_iterations,
    tol=config.tolerance,
  )
  trace = sharpness.hessian_trace(
    loss_fn, params, batches, key=trace_key, num_probes=config.num_probes
  )
  return {
    "num_examples": int(num_examples),
    "loss": loss / num_examples,
    "top_eigenvalue": top.eigenvalue,
    "eigen_converged": top.converged,
    "eigen_iterations": top.num_iters,
    "trace": trace.trace,
    "trace_stderr": None if math.isnan(trace.stderr) else trace.stderr,
  }


def measure_classes(
  loss_fn: sharpness.LossFn,
  params: Any,
  inputs: np.ndarray,
  labels: np.ndarray,
  train_counts: Any,
  config: Config,
  *,
  eta: float,
  mesh: Mesh,
  on_subset: Callable[[int | str], None] = lambda name: None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any] | None]]:
  """:func:`measure_subset` of every class and of the head and tail groups.

  Subset ``s`` (class ``c``, or head / tail as ``C`` / ``C + 1``) uses
  ``fold_in(key(config.probe_seed), s)``. All subsets share one batch shape:
  ``batch_size`` capped at the largest subset, rounded up to a multiple of the
  devices (:func:`shared.training.padded_batch_size`).

  Returns:
    ``(per_class, groups)``: per class ``class``, ``train_count`` and the
    measurements (``None`` without examples); ``{"head", "tail"}`` the same with
    ``classes`` (``None`` for an empty group).
  """
  counts = np.asarray(train_counts)
  subsets = class_subsets(
    labels, counts, eta=eta, max_examples_per_class=config.max_examples_per_class
  )
  largest = max(max(s.size for s in subsets.values()), 1)
  rows = training.padded_batch_size(config.batch_size, largest, mesh)
  key, results = jax.random.key(config.probe_seed), {}
  for index, (name, indices) in enumerate(subsets.items()):
    results[name] = None
    on_subset(name)
    if indices.size:
      batches = _batches(inputs, labels, indices, rows, mesh)
      results[name] = measure_subset(
        loss_fn, params, batches, indices.size, config, jax.random.fold_in(key, index)
      )
  empty = {"num_examples": 0, **dict.fromkeys(_VALUES)}
  per_class = [
    {"class": c, "train_count": int(n), **(results[c] or empty)}
    for c, n in enumerate(counts)
  ]
  tail = imbsam_jax.tail_classes(counts, eta)
  groups = {
    g: results[g] and {"classes": np.flatnonzero(m).tolist(), **results[g]}
    for g, m in zip(GROUPS, (~tail, tail), strict=True)
  }
  return per_class, groups


def load_runs(
  runs_dir: str, optimizers: Sequence[str] | None
) -> tuple[list[dict[str, Any]], float]:
  """The runs of ``runs_dir/results.json`` (of some optimizers only) and the
  experiment's first eta; raises ``FileNotFoundError`` / ``ValueError``."""
  path = Path(runs_dir) / report.RESULTS_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"No {report.RESULTS_FILE} in {runs_dir}: run examples/train_long_tailed.py"
      f" --out {runs_dir} first."
    )
  results = json.loads(path.read_text())
  present = list(dict.fromkeys(r["optimizer"] for r in results["runs"]))
  missing = [o for o in optimizers or () if o not in present]
  if not present or missing:
    wanted = ", ".join(missing) or "any"
    raise ValueError(f"--optimizer: no run of {wanted} in {path}; it has {present}")
  chosen = [
    r for r in results["runs"] if optimizers is None or r["optimizer"] in optimizers
  ]
  return chosen, results["config"]["eta"][0]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv``, measures every selected run, writes JSON and the plot."""
  config = options.parse(
    Config,
    argv,
    prog="sharpness.py",
    description="Per-class sharpness (top Hessian eigenvalue, Hessian trace) of"
    " the training loss of the runs of examples/train_long_tailed.py.",
  )
  saved, first_eta = load_runs(config.runs, config.optimizer)
  restored = [long_tailed.restore(run, config.runs) for run in saved]
  if any(r.inputs is None for r in restored):
    dataset = saved[0]["config"]["dataset"]
    raise ValueError(
      f"--runs: {dataset} is streamed; the study measures in-memory datasets only"
    )
  total = sum(len(r.experiment.train_counts) + len(GROUPS) for r in restored)
  keys = ("optimizer", "method", "seed", *long_tailed.USES["imbsam"])
  started, runs = time.perf_counter(), []
  with runner.progress_bar(total, "subset", config.progress) as bar:
    for run, done in zip(saved, restored, strict=True):
      bar.set_description(f"{run['optimizer']} seed {run['seed']}")
      # The run's eta splits head and tail; the experiment's first for SGD and SAM.
      eta = first_eta if run.get("eta") is None else run["eta"]
      exp, start = done.experiment, time.perf_counter()
      per_class, groups = measure_classes(
        done.loss_fn,
        done.state.params,
        done.inputs,
        exp.dataset.y_train,
        exp.train_counts,
        config,
        eta=eta,
        mesh=exp.mesh,
        on_subset=lambda name: bar.update(1),
      )
      runs.append(
        {
          **{k: run.get(k) for k in keys},
          "tail_eta": eta,
          "train_counts": exp.train_counts.tolist(),
          "per_class": per_class,
          "groups": groups,
          "time_s": round(time.perf_counter() - start, 3),
          "config": run["config"],
        }
      )
  elapsed = time.perf_counter() - started
  results = {
    "config": options.to_json(config),
    "time_s": round(elapsed, 3),
    "runs": runs,
  }
  if runner.is_main_process():
    out = Path(config.out or config.runs)
    report.write_json(out / RESULTS_FILE, results)
    plot = plot_results(runs, out / PLOT_FILE)
    print(f"\n{format_table(runs)}\n\n{len(runs)} runs in {elapsed:.1f} s;")
    print(f"wrote {out / RESULTS_FILE} and {plot}")
  return report.as_json(results)


# -------------------------------------------------------------- reporting


def _grouped(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  """Runs by label (optimizer and the swept values that vary), seeds together."""
  keys = report.varying(runs, long_tailed.USES["imbsam"])
  grouped: dict[str, list[Mapping[str, Any]]] = {}
  for r in runs:
    grouped.setdefault(report.label(r, keys), []).append(r)
  return grouped


def _values(runs: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
  """``(runs, C + 2)`` values of ``key``: per class, then of the head and tail
  groups; NaN where missing."""
  entries = [[*r["per_class"], *map(r["groups"].get, GROUPS)] for r in runs]
  return np.array([[e and e[key] for e in row] for row in entries], dtype=float)


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Top eigenvalue and trace per run label (mean over seeds), per class, per
  Many / Medium / Few split (mean of its classes) and for the head and tail
  groups (their own loss). ``*``: the power iteration did not converge somewhere.
  """
  config, counts, eta = runs[0]["config"], runs[0]["train_counts"], runs[0]["tail_eta"]
  many, few = config["many_threshold"], config["few_threshold"]
  splits = metrics_lib.class_splits(counts, many_threshold=many, few_threshold=few)
  bounds = {"many": f">{many}", "medium": f"{few}-{many}", "few": f"<{few}"}
  # Each row: its two labels and the columns of _values it averages.
  rows = [
    (str(name), str(counts[c]), [c]) for c, name in enumerate(config["class_names"])
  ]
  rows += [
    (f"{split.capitalize()} ({mask.sum()})", bounds[split], np.flatnonzero(mask))
    for split, mask in splits.items()
  ]
  rows += [
    ("head group", f">={eta:g}", [len(counts)]),
    ("tail group", f"<{eta:g}", [len(counts) + 1]),
  ]
  grouped = _grouped(runs)
  columns = [
    (measure, _values(members, measure), _values(members, "eigen_converged") == 0)
    for measure in _MEASURES
    for members in grouped.values()
  ]
  table = [
    ["class", "images", *(f"{m} {n}" for m in ("eig", "trace") for n in grouped)]
  ]
  for name, images, selected in rows:
    cells = []
    for measure, values, failed in columns:
      with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no class with a value
        value = np.nanmean(np.nanmean(values[:, selected], axis=0))
      star = "*" if measure != "trace" and failed[:, selected].any() else ""
      cells.append("-" if np.isnan(value) else f"{value:.4g}{star}")
    table.append([name, images, *cells])
  stderr, trace = _values(runs, "trace_stderr"), _values(runs, "trace")
  known = ~np.isnan(stderr) & (trace != 0)
  errors = stderr[known] / np.abs(trace[known])
  seeds = ",".join(map(str, sorted({r["seed"] for r in runs})))
  lines = [
    "Hessian of each class's training loss at the last epoch (eig: top eigenvalue):"
    f" {config['dataset_name']}, {config['model']}, loss {config['loss']}; mean over"
    f" seeds {seeds}",
    report.text_table(table),
    "Many/Medium/Few: mean of their classes; head/tail group: the group's own loss"
    f" (tail: fewer than eta = {eta:g} images).",
  ]
  if errors.size:
    median, largest = np.median(errors), np.max(errors)
    lines.append(f"Trace standard errors: median {median:.1%}, max {largest:.1%}.")
  return "\n".join(lines)


def plot_results(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
  """Per-class top eigenvalue and trace against training count (two panels)."""
  config, eta, grouped = runs[0]["config"], runs[0]["tail_eta"], _grouped(runs)
  thresholds = {f"tail < eta = {eta:g}": eta}
  figure = plots.figure(11.0, 4.2)
  for ax, measure in zip(figure.subplots(1, 2), _MEASURES, strict=True):
    values = {n: _values(m, measure)[:, : -len(GROUPS)] for n, m in grouped.items()}
    if plots.draw_per_class(ax, runs[0]["train_counts"], values, thresholds=thresholds):
      ax.set_yscale("log")
    ax.set_ylabel(f"{measure.replace('_', ' ')} of the class loss's Hessian")
    ax.legend()
  seeds = ",".join(map(str, sorted({r["seed"] for r in runs})))
  figure.suptitle(
    f"Per-class sharpness of the training loss: {config['dataset_name']},"
    f" {config['model']}, {config['epochs']} epochs, loss {config['loss']};"
    f" seeds {seeds}",
    fontsize=10,
  )
  return plots.save(figure, path)
