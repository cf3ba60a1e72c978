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
would add the same constant to every class). Every subset is cut into batches
of one shape (the last padded with weight-0 copies), so the Hessian-vector
product compiles once per run; start vectors and probes depend on
``--probe-seed`` and the subset only, so every run is measured with the same
random numbers.

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
    None, "measure at most this many examples of each class (none: all)",
    check=POSITIVE,
  )  # fmt: skip
  progress: bool = option(True, "show a progress bar")

  def validate(self) -> None:
    if self.runs is None:
      raise ValueError("--runs: required (the output directory of a long-tailed run)")


# ------------------------------------------------------------- measurement


def class_subsets(
  labels: Any,
  train_counts: Any,
  *,
  eta: float,
  max_examples_per_class: int | None = None,
) -> dict[int | str, np.ndarray]:
  """Example indices of each class and of the head and tail groups.

  Args:
    labels: ``(N,)`` training labels.
    train_counts: ``(C,)`` training images per class (the full counts, which
      define the groups even when examples are capped).
    eta: the tail is the classes with fewer than ``eta`` training images.
    max_examples_per_class: keep the first this many examples of each class.

  Returns:
    ``{0: idx, ..., C - 1: idx, "head": idx, "tail": idx}``, int arrays in
    dataset order (empty for an empty class or group).

  Example:
    >>> s = class_subsets([0, 1, 0, 2, 0], [3, 1, 1], eta=2,
    ...                   max_examples_per_class=2)
    >>> {k: v.tolist() for k, v in s.items()}
    {0: [0, 2], 1: [1], 2: [3], 'head': [0, 2], 'tail': [1, 3]}
  """
  labels = np.asarray(labels)
  counts = np.asarray(train_counts)
  subsets: dict[int | str, np.ndarray] = {}
  for c in range(len(counts)):
    subsets[c] = np.flatnonzero(labels == c)[:max_examples_per_class]
  tail = imbsam_jax.tail_classes(counts, eta)
  for name, members in (("head", ~tail), ("tail", tail)):
    chosen = [subsets[c] for c in np.flatnonzero(members)]
    subsets[name] = np.sort(np.concatenate([np.zeros(0, np.int64), *chosen]))
  return subsets


def subset_batches(
  inputs: np.ndarray,
  labels: np.ndarray,
  indices: np.ndarray,
  *,
  batch_size: int,
  mesh: Mesh | None = None,
) -> list[tuple[dict[str, jax.Array], jax.Array]]:
  """The ``(batch, weights)`` pairs of a subset, all of one shape, on device.

  The last batch is padded with weight-0 copies of the subset's own examples.

  Args:
    inputs: ``(N, ...)`` model inputs.
    labels: ``(N,)`` labels.
    indices: the subset's (non-empty) example indices.
    batch_size: rows per batch (a multiple of the mesh's device count).
    mesh: shard each batch over this data-parallel mesh
      (:func:`~imbsam_jax.recipes.training.shard_batch`); ``None``: the
      default device.

  Returns:
    A list of ``({"image", "label"}, weights)`` pairs; ``weights`` is float32.
  """
  indices = np.asarray(indices)
  if indices.size == 0:
    raise ValueError("The subset is empty.")
  num_batches = -(-indices.size // batch_size)
  padded = np.resize(indices, num_batches * batch_size)  # cycles through indices
  weights = (np.arange(padded.size) < indices.size).astype(np.float32)
  batches = []
  for start in range(0, padded.size, batch_size):
    rows = padded[start : start + batch_size]
    pair = (
      {"image": inputs[rows], "label": labels[rows]},
      weights[start : start + batch_size],
    )
    batches.append(
      jax.device_put(pair) if mesh is None else training.shard_batch(pair, mesh)
    )
  return batches


@functools.partial(jax.jit, static_argnums=0)
def _weighted_loss_sum(loss_fn, params, batch, weights):
  """``sum_i w_i l_i`` of one batch, in float32."""
  return jnp.sum(weights * loss_fn(params, batch).astype(jnp.float32))


def measure_subset(
  loss_fn: sharpness.LossFn,
  params: Any,
  batches: Sequence[tuple[Any, jax.Array]],
  *,
  key: jax.Array,
  max_iterations: int,
  tolerance: float,
  num_probes: int,
) -> dict[str, Any]:
  """Loss, top Hessian eigenvalue and Hessian trace of one subset's loss.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
    params: the parameters.
    batches: the subset's ``(batch, weights)`` pairs (:func:`subset_batches`).
    key: PRNG key; split into the power iteration's start and the probes.
    max_iterations: maximum power iterations.
    tolerance: relative tolerance of the power iteration.
    num_probes: Hutchinson probes.

  Returns:
    ``{"loss", "top_eigenvalue", "eigen_converged", "eigen_iterations",
    "trace", "trace_stderr"}`` (``trace_stderr`` is ``None`` for one probe).
  """
  total = sum(float(jnp.sum(w)) for _, w in batches)
  loss = sum(float(_weighted_loss_sum(loss_fn, params, b, w)) for b, w in batches)
  eigen_key, trace_key = jax.random.split(key)
  top = sharpness.top_hessian_eigenvalue(
    loss_fn, params, batches, key=eigen_key, max_iters=max_iterations, tol=tolerance
  )
  trace = sharpness.hessian_trace(
    loss_fn, params, batches, key=trace_key, num_probes=num_probes
  )
  return {
    "loss": loss / total,
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
  *,
  eta: float,
  key: jax.Array,
  max_iterations: int = 100,
  tolerance: float = 1e-3,
  num_probes: int = 100,
  batch_size: int = 32,
  max_examples_per_class: int | None = None,
  mesh: Mesh | None = None,
  on_subset: Callable[[int | str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any] | None]]:
  """Measures :func:`measure_subset` for every class and the head/tail groups.

  Subset ``s`` (class ``c``, or ``"head"`` / ``"tail"`` as ``C`` / ``C + 1``)
  uses ``fold_in(key, s)``, so two models measured with the same key see the
  same start vectors and probes. All subsets share one batch shape:
  ``batch_size`` rounded up to the mesh's device count, capped at the largest
  subset.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` (e.g. :func:`make_loss_fn`).
    params: the parameters.
    inputs: ``(N, ...)`` model inputs of the training set.
    labels: ``(N,)`` training labels.
    train_counts: ``(C,)`` training images per class.
    eta: the tail is the classes with fewer than ``eta`` training images.
    key: PRNG key.
    max_iterations: maximum power iterations per subset.
    tolerance: relative tolerance of the power iteration.
    num_probes: Hutchinson probes per subset.
    batch_size: examples per batch.
    max_examples_per_class: measure the first this many examples of a class.
    mesh: data-parallel mesh for the batches (``params`` must be replicated on
      it); ``None``: the default device.
    on_subset: called with each subset's name once it is measured.

  Returns:
    ``(per_class, groups)``: one dict per class (``class``, ``train_count``,
    ``num_examples`` and the :func:`measure_subset` values, ``None`` for a
    class without examples) and ``{"head": ..., "tail": ...}`` (the same with
    ``classes``; ``None`` for an empty group).
  """
  counts = np.asarray(train_counts)
  num_classes = len(counts)
  subsets = class_subsets(
    labels, counts, eta=eta, max_examples_per_class=max_examples_per_class
  )
  devices = 1 if mesh is None else mesh.devices.size
  largest = max(s.size for s in subsets.values())
  rows = devices * -(-min(batch_size, max(largest, 1)) // devices)
  tail = imbsam_jax.tail_classes(counts, eta)
  members = {"head": np.flatnonzero(~tail), "tail": np.flatnonzero(tail)}

  results: dict[int | str, dict[str, Any] | None] = {}
  for index, (name, indices) in enumerate(subsets.items()):
    if indices.size == 0:
      results[name] = None
      continue
    batches = subset_batches(inputs, labels, indices, batch_size=rows, mesh=mesh)
    results[name] = {
      "num_examples": int(indices.size),
      **measure_subset(
        loss_fn,
        params,
        batches,
        key=jax.random.fold_in(key, index),
        max_iterations=max_iterations,
        tolerance=tolerance,
        num_probes=num_probes,
      ),
    }
    if on_subset is not None:
      on_subset(name)

  empty = {"num_examples": 0, **dict.fromkeys(_VALUES)}
  per_class = [
    {"class": c, "train_count": int(counts[c]), **(results[c] or empty)}
    for c in range(num_classes)
  ]
  groups = {
    g: None if results[g] is None else {"classes": members[g].tolist(), **results[g]}
    for g in GROUPS
  }
  return per_class, groups


# ------------------------------------------------------------------- runs


def study_run(
  restored: long_tailed.Restored,
  run: Mapping[str, Any],
  config: Config,
  *,
  eta: float,
  on_subset: Callable[[int | str], None] | None = None,
) -> dict[str, Any]:
  """Measures the per-class sharpness of one restored run; its sharpness.json entry.

  ``eta`` splits the head and tail groups: the run's own, or for methods without
  one (SGD, SAM), the experiment's first.
  """
  started = time.perf_counter()
  exp = restored.experiment
  per_class, groups = measure_classes(
    restored.loss_fn,
    restored.state.params,
    restored.inputs,
    exp.dataset.y_train,
    exp.train_counts,
    eta=eta,
    key=jax.random.key(config.probe_seed),
    max_iterations=config.max_iterations,
    tolerance=config.tolerance,
    num_probes=config.num_probes,
    batch_size=config.batch_size,
    max_examples_per_class=config.max_examples_per_class,
    mesh=exp.mesh,
    on_subset=on_subset,
  )
  keys = ("optimizer", "method", "seed", *long_tailed.USES["imbsam"])
  return {
    **{k: run.get(k) for k in keys},
    "tail_eta": eta,
    "train_counts": exp.train_counts.tolist(),
    "per_class": per_class,
    "groups": groups,
    "time_s": round(time.perf_counter() - started, 3),
    "config": run["config"],
  }


def load_runs(
  runs_dir: str, optimizers: Sequence[str] | None
) -> tuple[list[dict[str, Any]], float]:
  """The runs of ``runs_dir/results.json`` (of some optimizers only) and the
  experiment's first eta.

  Raises:
    FileNotFoundError: there is no ``results.json``.
    ValueError: it has no runs, or none of an asked-for optimizer.
  """
  path = Path(runs_dir) / report.RESULTS_FILE
  first = f"run examples/train_long_tailed.py --out {runs_dir} first"
  if not path.is_file():
    raise FileNotFoundError(f"No {report.RESULTS_FILE} in {runs_dir}: {first}.")
  results = json.loads(path.read_text())
  runs = results["runs"]
  if not runs:
    raise ValueError(f"--runs: {path} has no runs: {first}")
  present = list(dict.fromkeys(r["optimizer"] for r in runs))
  missing = [o for o in optimizers or () if o not in present]
  if missing:
    raise ValueError(
      f"--optimizer: no run of {', '.join(missing)} in {path}; it has"
      f" {', '.join(present)}"
    )
  chosen = [r for r in runs if optimizers is None or r["optimizer"] in optimizers]
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
  etas = [first_eta if r.get("eta") is None else r["eta"] for r in saved]
  out = Path(config.out or config.runs)
  restored = [long_tailed.restore(run, config.runs) for run in saved]
  total = sum(
    sum(s.size > 0 for s in class_subsets(
      r.experiment.dataset.y_train, r.experiment.train_counts,
      eta=eta, max_examples_per_class=config.max_examples_per_class,
    ).values())
    for r, eta in zip(restored, etas, strict=True)
  )  # fmt: skip
  started = time.perf_counter()
  runs = []
  with runner.progress_bar(total, "subset", config.progress) as bar:
    for run, restore, eta in zip(saved, restored, etas, strict=True):
      bar.set_description(f"{run['optimizer']} seed {run['seed']}")

      def advance(subset: int | str) -> None:
        bar.set_postfix(subset=subset)
        bar.update(1)

      runs.append(study_run(restore, run, config, eta=eta, on_subset=advance))
  elapsed = time.perf_counter() - started
  results = {
    "config": options.to_json(config),
    "time_s": round(elapsed, 3),
    "runs": runs,
  }
  if runner.is_main_process():
    report.write_json(out / RESULTS_FILE, results)
    plot = plot_results(runs, out / PLOT_FILE)
    print(f"\n{format_table(runs)}")
    print(
      f"\n{len(runs)} runs in {elapsed:.1f} s; wrote {out / RESULTS_FILE} and {plot}"
    )
  return json.loads(json.dumps(results))


# -------------------------------------------------------------- reporting


def _grouped(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  """Runs by label (optimizer and the swept values that vary), seeds together."""
  keys = report.varying(runs, long_tailed.USES["imbsam"])
  grouped: dict[str, list[Mapping[str, Any]]] = {}
  for r in runs:
    grouped.setdefault(report.label(r, keys), []).append(r)
  return grouped


def _per_class(runs: Sequence[Mapping[str, Any]], measure: str) -> np.ndarray:
  """``(runs, C)`` values of ``measure`` (NaN where missing)."""
  return np.array(
    [
      [np.nan if e[measure] is None else e[measure] for e in r["per_class"]]
      for r in runs
    ],
    np.float64,
  )


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Per-class top eigenvalue and trace per run label (mean over seeds).

  Rows: each class, the Many / Medium / Few splits (mean of their classes), and
  the head and tail groups (the Hessian of the group's own loss). ``*`` marks
  an eigenvalue whose power iteration did not converge in some seed.
  """
  config, counts = runs[0]["config"], np.asarray(runs[0]["train_counts"])
  grouped = _grouped(runs)
  names = list(grouped)

  def text(value: Any, ok: bool = True) -> str:
    if value is None or np.isnan(value):
      return "-"
    return f"{value:.4g}" + ("" if ok else "*")

  def class_cells(mask: np.ndarray) -> list[str]:
    cells = []
    for measure in _MEASURES:
      for members in grouped.values():
        means = report.nanmean_columns(_per_class(members, measure))
        chosen = [
          m for m, keep in zip(means, mask, strict=True) if keep and m is not None
        ]
        converged = all(
          e["eigen_converged"] is not False
          for r in members
          for e, keep in zip(r["per_class"], mask, strict=True)
          if keep
        )
        value = float(np.mean(chosen)) if chosen else None
        cells.append(text(value, converged or measure == "trace"))
    return cells

  def group_cells(group: str) -> list[str]:
    cells = []
    for measure in _MEASURES:
      for members in grouped.values():
        entries = [r["groups"][group] for r in members]
        if any(e is None for e in entries):
          cells.append("-")
          continue
        ok = all(e["eigen_converged"] for e in entries) or measure == "trace"
        cells.append(text(float(np.mean([e[measure] for e in entries])), ok))
    return cells

  many, few, eta = (
    config["many_threshold"],
    config["few_threshold"],
    runs[0]["tail_eta"],
  )
  rows = [["", "", *(f"eig {n}" for n in names), *(f"trace {n}" for n in names)]]
  rows[0][:2] = ["class", "images"]
  classes = np.arange(len(counts))
  for c, name in enumerate(config["class_names"]):
    rows.append([str(name), str(counts[c]), *class_cells(classes == c)])
  splits = metrics_lib.class_splits(counts, many_threshold=many, few_threshold=few)
  bounds = {"many": f">{many}", "medium": f"{few}-{many}", "few": f"<{few}"}
  for split, mask in splits.items():
    rows.append(
      [f"{split.capitalize()} ({int(mask.sum())})", bounds[split], *class_cells(mask)]
    )
  rows.append(["head group", f">={eta:g}", *group_cells("head")])
  rows.append(["tail group", f"<{eta:g}", *group_cells("tail")])
  seeds = sorted({r["seed"] for r in runs})
  relative = [
    e["trace_stderr"] / abs(e["trace"])
    for r in runs
    for e in [*r["per_class"], *(g for g in r["groups"].values() if g)]
    if e["trace_stderr"] is not None and e["trace"]
  ]
  lines = [
    "Hessian of each class's training loss at the last epoch (eig: top"
    f" eigenvalue): {config['dataset_name']}, {config['model']}, loss"
    f" {config['loss']}; mean over seeds {','.join(map(str, seeds))}",
    report.text_table(rows),
    "Many/Medium/Few: mean of their classes; head/tail group: the group's own"
    f" loss (tail: fewer than eta = {eta:g} images).",
  ]
  if relative:
    lines.append(
      f"Trace standard errors: median {np.median(relative):.1%}, max"
      f" {np.max(relative):.1%} of |trace|."
    )
  return "\n".join(lines)


def plot_results(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
  """Per-class top eigenvalue and trace against training count (two panels)."""
  config = runs[0]["config"]
  grouped = _grouped(runs)
  figure = plots.figure(11.0, 4.2)
  for ax, measure, what in zip(
    figure.subplots(1, 2),
    _MEASURES,
    ("top Hessian eigenvalue of the class loss", "Hessian trace of the class loss"),
    strict=True,
  ):
    values = {n: _per_class(members, measure) for n, members in grouped.items()}
    positive = plots.draw_per_class(
      ax,
      runs[0]["train_counts"],
      values,
      thresholds={f"tail < eta = {runs[0]['tail_eta']:g}": runs[0]["tail_eta"]},
      what=measure,
    )
    if positive:
      ax.set_yscale("log")
    ax.set_ylabel(what)
    ax.legend()
  seeds = sorted({r["seed"] for r in runs})
  figure.suptitle(
    f"Per-class sharpness of the training loss: {config['dataset_name']},"
    f" {config['model']}, {config['epochs']} epochs, loss {config['loss']};"
    f" seeds {','.join(map(str, seeds))}",
    fontsize=10,
  )
  return plots.save(figure, path)
