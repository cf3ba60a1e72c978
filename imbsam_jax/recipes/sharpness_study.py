"""Per-class sharpness of long-tailed runs: the curvature ImbSAM aims to flatten.

ImbSAM's motivation is that under SGD or SAM the tail classes of a long-tailed
training set end in sharp minima of their own loss, and that aiming SAM's
perturbation at the tail flattens them. This study measures that claim on the
runs of :mod:`imbsam_jax.recipes.long_tailed`. ``examples/sharpness.py`` is a
thin command line over :func:`main`; given the output directory of a long-tailed
experiment (its ``results.json`` and ``checkpoints/``), for each (optimizer,
seed) run it

1. rebuilds the experiment from the run's saved configuration with
   :func:`~imbsam_jax.recipes.long_tailed.prepare` and
   :func:`~imbsam_jax.recipes.long_tailed.build_run`, and restores the final
   checkpoint's parameters and model state;
2. puts the model in eval mode (BatchNorm running statistics, so an example's
   loss depends on the parameters and that example only);
3. for each class ``c``, then for the head and the tail group (the classes with
   at least / fewer than the run's ``eta`` training images), measures the
   curvature of the training loss restricted to those examples,

   .. math::
     L_S(\\theta) = \\frac{1}{|S|} \\sum_{i \\in S} \\ell(f_\\theta(x_i), y_i),

   with :mod:`imbsam_jax.sharpness`: the top Hessian eigenvalue (power
   iteration) and the Hessian trace (Hutchinson, with its standard error).

``ell`` is the per-example loss the run trained with: cross-entropy, or the
logit-adjusted one of ``loss="logit-adjust"`` / ``"balanced-softmax"``
(:func:`~imbsam_jax.recipes.long_tailed.logit_adjusted_cross_entropy`). It is
the data loss only, on the un-augmented training images: the coupled weight
decay ``wd/2 ||theta||^2`` of training would add ``wd`` to every eigenvalue and
``wd`` times the number of parameters to every trace, the same for all classes
and runs.

Every subset is cut into batches of one shape (the last padded with weight-0
copies of the subset's own examples), so the Hessian-vector product compiles
once per run. The random start vector of the power iteration and the
Hutchinson probes are functions of ``seed`` and the subset only: every run is
measured with the same probes (common random numbers), and the study is
deterministic.

Outputs in ``--out`` (default: the runs directory):

* ``sharpness.json``: ``{"settings": {...}, "runs": [...]}``, one run per
  (optimizer, seed) with ``per_class`` (``class``, ``train_count``,
  ``num_examples``, ``loss``, ``top_eigenvalue``, ``eigen_converged``,
  ``eigen_iterations``, ``trace``, ``trace_stderr``; ``None`` for a class
  without training images), ``groups`` (``head`` and ``tail``, the same
  measurements plus their ``classes``; ``None`` for an empty group),
  ``train_counts`` and the run's ``config``;
* ``sharpness.png``: per-class top eigenvalue and trace against the class's
  training-image count, one line per optimizer (mean over seeds, min..max
  band).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import imbsam_jax
from imbsam_jax import sharpness
from imbsam_jax.recipes import arguments, long_tailed, plots, training
from imbsam_jax.recipes import data as data_lib
from imbsam_jax.recipes import metrics as metrics_lib
from imbsam_jax.recipes.checkpoints import Checkpointer

#: Files written into the output directory.
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
_TRAIN_FIRST = "run examples/train_long_tailed.py --out {runs} first"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Options of the sharpness study.

  Attributes:
    runs: output directory of a long-tailed experiment (``results.json`` and
      ``checkpoints/``).
    out: where to write ``sharpness.json`` and the plot (``None``: ``runs``).
    optimizers: measure only these optimizers' runs (``None``: all).
    max_iterations: maximum power iterations per subset.
    tolerance: relative tolerance of the power iteration.
    num_probes: Hutchinson probes per subset.
    batch_size: examples per Hessian-vector-product batch (rounded up to a
      multiple of the device count, capped at the largest subset).
    seed: seeds the power iteration's start vectors and the probes.
    max_examples_per_class: measure at most this many (the first) training
      examples of each class (``None``: all).
    progress: show a progress bar.
  """

  runs: str
  out: str | None = None
  optimizers: tuple[str, ...] | None = None
  max_iterations: int = 100
  tolerance: float = 1e-3
  num_probes: int = 100
  batch_size: int = 32
  seed: int = 0
  max_examples_per_class: int | None = None
  progress: bool = True

  def check(self) -> None:
    """Raises a ValueError for an invalid option."""
    if self.max_iterations < 1 or self.num_probes < 1 or self.batch_size < 1:
      raise ValueError(
        "--max-iterations, --num-probes and --batch-size must be positive."
      )
    if not self.tolerance >= 0:
      raise ValueError(f"--tolerance must be non-negative, got {self.tolerance}.")
    if self.max_examples_per_class is not None and self.max_examples_per_class < 1:
      raise ValueError("--max-examples-per-class must be positive.")


# ------------------------------------------------------------- measurement


def make_loss_fn(
  graphdef: nnx.GraphDef,
  model_state: nnx.State,
  train_counts: Any,
  tau: float,
) -> sharpness.LossFn:
  """The per-example training loss of a model, as ``loss_fn(params, batch)``.

  .. math::
    \\ell_i = -\\log \\operatorname{softmax}(f_\\theta(x_i) +
      \\tau \\log \\pi)_{y_i}

  the loss of :func:`~imbsam_jax.recipes.long_tailed.build_run` (``tau = 0``
  is cross-entropy), for the functions of :mod:`imbsam_jax.sharpness`.

  Args:
    graphdef: the model's graph definition; make it in eval mode
      (``model.eval()`` before ``nnx.graphdef``) so that BatchNorm uses its
      running statistics.
    model_state: the model's non-parameter variables (BatchNorm statistics).
    train_counts: ``(C,)`` training images per class, for the prior ``pi``.
    tau: logit-adjustment strength (``Config.effective_tau``).

  Returns:
    ``loss_fn(params, batch) -> (B,)`` losses, with ``batch["image"]`` the
    model's (normalised) inputs and ``batch["label"]`` the int labels.
  """
  log_prior = jnp.asarray(long_tailed.log_class_prior(train_counts))

  def loss_fn(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, params, model_state, copy=True)
    logits = model(batch["image"])
    return long_tailed.logit_adjusted_cross_entropy(
      logits, batch["label"], log_prior, tau
    )

  return loss_fn


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


# ---------------------------------------------------------------- one run


def config_from_saved(saved: Mapping[str, Any]) -> long_tailed.Config:
  """The :class:`~imbsam_jax.recipes.long_tailed.Config` a run was made with.

  Args:
    saved: the run's ``config`` entry of ``results.json`` (the resolved
      configuration plus derived facts, which are ignored).

  Returns:
    The resolved configuration, without progress bars or resuming.
  """
  fields = {}
  for field in dataclasses.fields(long_tailed.Config):
    if field.name in saved:
      value = saved[field.name]
      fields[field.name] = tuple(value) if isinstance(value, list) else value
  config = long_tailed.Config(**fields)
  return dataclasses.replace(config, progress=False, resume=False).resolved()


def restore_final_state(
  exp: long_tailed.Experiment, optimizer: str, seed: int, runs_dir: str | Path
) -> tuple[training.TrainState, nnx.GraphDef]:
  """The train state of a run's last epoch, from its Orbax checkpoint.

  Returns:
    ``(state, eval_graphdef)``: the restored state and the model's graph in
    eval mode, for ``nnx.merge(eval_graphdef, state.params, state.model_state)``.

  Raises:
    FileNotFoundError: the run has no checkpoint.
    ValueError: the newest checkpoint is not the last epoch, or was made with
      another configuration than ``exp``'s.
  """
  directory = Path(runs_dir) / long_tailed.CHECKPOINT_DIR / f"{optimizer}_seed{seed}"
  if not directory.is_dir():
    raise FileNotFoundError(
      f"No checkpoints of {optimizer} seed {seed} in {directory}: "
      + _TRAIN_FIRST.format(runs=runs_dir)
      + " (with checkpoints, i.e. --checkpoint-every > 0)."
    )
  run = long_tailed.build_run(exp, optimizer, seed)
  with Checkpointer(directory) as checkpointer:
    if checkpointer.latest_epoch() is None:
      raise FileNotFoundError(
        f"No checkpoint in {directory}: " + _TRAIN_FIRST.format(runs=runs_dir) + "."
      )
    state, meta = checkpointer.restore(run.state)
  epochs = exp.config.epochs
  if meta["epoch"] != epochs:
    raise ValueError(
      f"The newest checkpoint in {directory} is epoch {meta['epoch']} of"
      f" {epochs}: finish the run (train_long_tailed.py ... --resume) first."
    )
  made_with = dict(meta["fingerprint"])
  if made_with.get("imbalance_ratio") is None:  # resolved by the dataset spec
    made_with["imbalance_ratio"] = exp.dataset.imbalance_ratio
  if made_with != long_tailed._fingerprint(exp, optimizer, seed):
    raise ValueError(
      f"The checkpoint in {directory} was made with another configuration than"
      f" the one in {Path(runs_dir) / long_tailed.RESULTS_FILE}: "
      + _TRAIN_FIRST.format(runs=runs_dir)
      + " again."
    )
  return state, run.eval_graphdef


def study_run(
  exp: long_tailed.Experiment,
  saved_run: Mapping[str, Any],
  study: StudyConfig,
  *,
  on_subset: Callable[[int | str], None] | None = None,
) -> dict[str, Any]:
  """Measures the per-class sharpness of one (optimizer, seed) run.

  Args:
    exp: the run's experiment, from :func:`~imbsam_jax.recipes.long_tailed.prepare`.
    saved_run: the run's entry of ``results.json``.
    study: the study's options.
    on_subset: called with each subset's name once it is measured.

  Returns:
    The run's entry of ``sharpness.json``.
  """
  optimizer, seed = saved_run["optimizer"], int(saved_run["seed"])
  started = time.perf_counter()
  state, eval_graphdef = restore_final_state(exp, optimizer, seed, study.runs)
  loss_fn = make_loss_fn(
    eval_graphdef,
    state.model_state,
    exp.train_counts,
    exp.config.effective_tau,
  )
  ds = exp.dataset
  per_class, groups = measure_classes(
    loss_fn,
    state.params,
    data_lib.to_float(ds.x_train, exp.mean, exp.std),
    ds.y_train,
    exp.train_counts,
    eta=exp.config.eta,
    key=jax.random.key(study.seed),
    max_iterations=study.max_iterations,
    tolerance=study.tolerance,
    num_probes=study.num_probes,
    batch_size=study.batch_size,
    max_examples_per_class=study.max_examples_per_class,
    mesh=exp.mesh,
    on_subset=on_subset,
  )
  return {
    "optimizer": optimizer,
    "seed": seed,
    "train_counts": exp.train_counts.tolist(),
    "per_class": per_class,
    "groups": groups,
    "time_s": round(time.perf_counter() - started, 3),
    "config": saved_run["config"],
  }


# ------------------------------------------------------------- reporting


def _per_class(runs: Sequence[Mapping[str, Any]], measure: str) -> np.ndarray:
  """``(runs, C)`` values of ``measure`` (NaN where missing)."""
  return np.array(
    [
      [np.nan if e[measure] is None else e[measure] for e in r["per_class"]]
      for r in runs
    ],
    np.float64,
  )


def _by_optimizer(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
  grouped: dict[str, list[Any]] = {}
  for r in runs:
    grouped.setdefault(r["optimizer"], []).append(r)
  return grouped


def _mean(values: np.ndarray, axis: int | None = None) -> Any:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(values, axis=axis)


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Per-class top eigenvalue and trace per optimizer (mean over its seeds).

  Rows: each class, the Many / Medium / Few splits (mean of their classes'
  values; ``-`` for an empty split), and the head and tail groups (the Hessian
  of the group's own loss). ``*`` marks an eigenvalue whose power iteration
  did not converge in some seed.
  """
  if not runs:
    return "(no runs)"
  config = runs[0]["config"]
  counts = np.asarray(runs[0]["train_counts"])
  grouped = _by_optimizer(runs)
  names = list(grouped)
  seeds = sorted({r["seed"] for r in runs})
  width = max(10, *(len(n) + 2 for n in names), -(-16 // len(names)))
  # optimizer -> measure -> (runs, C) values; optimizer -> (C,) converged in all.
  values = {n: {m: _per_class(rs, m) for m in _MEASURES} for n, rs in grouped.items()}
  converged = {
    n: np.array(
      [[e["eigen_converged"] is not False for e in r["per_class"]] for r in rs]
    ).all(axis=0)
    for n, rs in grouped.items()
  }

  def row(label: str, count: str, select: Callable[[str, str], tuple[Any, bool]]):
    cells = []
    for m in _MEASURES:
      for n in names:
        value, ok = select(n, m)
        text = "-" if value is None or np.isnan(value) else f"{value:.4g}"
        cells.append(f"{text}{' ' if ok or m == 'trace' else '*'}".rjust(width))
    return f"{label:<12}{count:>7} " + "".join(cells)

  def classes(mask: np.ndarray) -> Callable[[str, str], tuple[Any, bool]]:
    return lambda n, m: (
      _mean(_mean(values[n][m], axis=0)[mask]),
      bool(converged[n][mask].all()),
    )

  def group(name: str) -> Callable[[str, str], tuple[Any, bool]]:
    def select(n: str, m: str) -> tuple[Any, bool]:
      entries = [r["groups"][name] for r in grouped[n]]
      if any(e is None for e in entries):
        return None, True
      return np.mean([e[m] for e in entries]), all(
        e["eigen_converged"] for e in entries
      )

    return select

  many, few, eta = config["many_threshold"], config["few_threshold"], config["eta"]
  lines = [
    "Hessian of the training loss of each class at the last epoch:"
    f" {config['dataset_name']}, {config['model']}, loss {config['loss']};"
    f" mean over seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}",
    " " * 20
    + "top eigenvalue".center(width * len(names))
    + "trace".center(width * len(names)),
    f"{'class':<12}{'images':>7} " + "".join(f"{n} ".rjust(width) for n in names) * 2,
  ]
  for c, name in enumerate(config["class_names"]):
    lines.append(row(str(name), str(counts[c]), classes(np.arange(len(counts)) == c)))
  splits = metrics_lib.class_splits(counts, many_threshold=many, few_threshold=few)
  bounds = {"many": f">{many}", "medium": f"{few}-{many}", "few": f"<{few}"}
  for split, mask in splits.items():
    label = f"{split.capitalize()} ({int(mask.sum())})"
    lines.append(row(label, bounds[split], classes(mask)))
  lines.append(row("head group", f">={eta:g}", group("head")))
  lines.append(row("tail group", f"<{eta:g}", group("tail")))
  relative = [
    e["trace_stderr"] / abs(e["trace"])
    for r in runs
    for e in [*r["per_class"], *(g for g in r["groups"].values() if g)]
    if e["trace_stderr"] is not None and e["trace"]
  ]
  lines.append(
    "Many/Medium/Few: mean of their classes; head/tail group: the group's own"
    f" loss (tail: fewer than eta = {eta:g} images)."
  )
  if relative:
    lines.append(
      f"Trace standard errors: median {np.median(relative):.1%}, max"
      f" {np.max(relative):.1%} of |trace|."
    )
  return "\n".join(lines)


def plot_curvature(
  train_counts: Any,
  top_eigenvalues: Mapping[str, Any],
  traces: Mapping[str, Any],
  path: str | Path,
  *,
  thresholds: Mapping[str, float] | None = None,
  title: str | None = None,
) -> Path:
  """Per-class top Hessian eigenvalue and trace against training-sample count.

  Two panels (top eigenvalue, trace), the x axis the number of training
  images of a class (log scale), one line per method; classes sharing a count
  are averaged into one point and each class is also drawn as a faint dot.
  With several runs per method, the line is the mean over runs and the band
  spans their minimum to maximum. A panel whose values are all positive has a
  log y axis.

  Args:
    train_counts: ``(C,)`` training images per class.
    top_eigenvalues: method name -> ``(C,)`` or ``(runs, C)`` values (NaN: not
      drawn).
    traces: method name -> ``(C,)`` or ``(runs, C)`` values.
    path: the PNG file to write.
    thresholds: label -> count, drawn as labelled vertical dashed lines.
    title: figure title.

  Returns:
    ``path`` as a :class:`pathlib.Path`.

  Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "sharpness.png"
    >>> plot_curvature([100, 10, 1], {"sgd": [1.0, 5.0, 9.0]},
    ...                {"sgd": [10.0, 40.0, 90.0]}, out).name
    'sharpness.png'
  """
  if not top_eigenvalues or set(top_eigenvalues) != set(traces):
    raise ValueError("top_eigenvalues and traces need the same, non-empty methods.")
  figure = Figure(figsize=(11.0, 4.2), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, 2)
  panels = (
    (axes[0], top_eigenvalues, "top Hessian eigenvalue of the class loss"),
    (axes[1], traces, "Hessian trace of the class loss"),
  )
  for ax, values_by_method, ylabel in panels:
    positive = plots.draw_per_class(
      ax, train_counts, values_by_method, thresholds=thresholds, what=ylabel
    )
    if positive:
      ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend()
  if title:
    figure.suptitle(title, fontsize=10)
  return plots._save(figure, path)


def plot_results(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
  """:func:`plot_curvature` of the study's runs (seed means per optimizer)."""
  config = runs[0]["config"]
  grouped = _by_optimizer(runs)
  seeds = sorted({r["seed"] for r in runs})
  return plot_curvature(
    runs[0]["train_counts"],
    {n: _per_class(rs, "top_eigenvalue") for n, rs in grouped.items()},
    {n: _per_class(rs, "trace") for n, rs in grouped.items()},
    path,
    thresholds={f"tail < eta = {config['eta']:g}": config["eta"]},
    title=(
      f"Per-class sharpness of the training loss: {config['dataset_name']},"
      f" {config['model']}, {config['epochs']} epochs, rho {config['rho']:g},"
      f" loss {config['loss']}; seed{'s' if len(seeds) > 1 else ''}"
      f" {','.join(map(str, seeds))}"
    ),
  )


# -------------------------------------------------------------- the study


def load_runs(
  runs_dir: str | Path, optimizers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
  """The runs of ``runs_dir/results.json``, optionally of some optimizers only.

  Raises:
    FileNotFoundError: there is no ``results.json``.
    ValueError: it has no runs, or none of an asked-for optimizer.
  """
  path = Path(runs_dir) / long_tailed.RESULTS_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"No {long_tailed.RESULTS_FILE} in {runs_dir}: "
      + _TRAIN_FIRST.format(runs=runs_dir)
      + "."
    )
  runs = json.loads(path.read_text())["runs"]
  present = list(dict.fromkeys(r["optimizer"] for r in runs))
  if not runs:
    raise ValueError(f"{path} has no runs: " + _TRAIN_FIRST.format(runs=runs_dir))
  if optimizers is not None:
    missing = [o for o in optimizers if o not in present]
    if missing:
      raise ValueError(
        f"No run of {', '.join(missing)} in {path}; it has {', '.join(present)}."
      )
    runs = [r for r in runs if r["optimizer"] in optimizers]
  return runs


def run_study(
  study: StudyConfig, *, log: Callable[[str], None] | None = print
) -> dict[str, Any]:
  """Measures every selected run; writes ``sharpness.json`` and the plot.

  Args:
    study: the study's options.
    log: where the table and summary lines go (``None``: nowhere).

  Returns:
    The ``sharpness.json`` content: ``{"settings": {...}, "runs": [...]}``.
  """
  study.check()
  log = log or (lambda _: None)
  saved_runs = load_runs(study.runs, study.optimizers)
  out = Path(study.out if study.out is not None else study.runs)
  experiments: dict[str, long_tailed.Experiment] = {}
  pending = []
  for saved in saved_runs:
    config = config_from_saved(saved["config"])
    name = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if name not in experiments:
      experiments[name] = long_tailed.prepare(config)
    pending.append((experiments[name], saved))
  total = sum(
    sum(
      s.size > 0
      for s in class_subsets(
        exp.dataset.y_train,
        exp.train_counts,
        eta=exp.config.eta,
        max_examples_per_class=study.max_examples_per_class,
      ).values()
    )
    for exp, _ in pending
  )

  bar = None
  if study.progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sharpness", unit="subset", dynamic_ncols=True)
  started = time.perf_counter()
  runs = []
  try:
    for exp, saved in pending:
      tag = f"{saved['optimizer']} seed {saved['seed']}"

      def advance(subset: int | str, tag: str = tag) -> None:
        if bar is not None:
          bar.set_postfix({"run": tag, "subset": subset})
          bar.update(1)

      runs.append(study_run(exp, saved, study, on_subset=advance))
      if not study.progress:
        log(f"{tag}: {runs[-1]['time_s']:.1f} s")
  finally:
    if bar is not None:
      bar.close()
  elapsed = time.perf_counter() - started

  results = {
    "settings": {
      **dataclasses.asdict(study),
      "out": str(out),
      "time_s": round(elapsed, 3),
    },
    "runs": runs,
  }
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / (RESULTS_FILE + ".tmp")
  tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
  tmp.replace(out / RESULTS_FILE)
  plot = plot_results(runs, out / PLOT_FILE)
  log("")
  log(format_table(runs))
  log(f"\n{len(runs)} runs in {elapsed:.1f} s; wrote {out / RESULTS_FILE} and {plot}")
  return json.loads(json.dumps(results))


# ------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
  """The command line of ``examples/sharpness.py``."""
  d = StudyConfig(runs="")
  p = argparse.ArgumentParser(
    description=(
      "Per-class sharpness (top Hessian eigenvalue, Hessian trace) of the"
      " training loss of the runs of examples/train_long_tailed.py. Writes"
      " OUT/sharpness.json and OUT/sharpness.png."
    ),
    formatter_class=arguments.HelpFormatter,
  )
  a = p.add_argument
  a(
    "--runs",
    required=True,
    help="output directory of train_long_tailed.py (results.json, checkpoints/)",
  )
  a("--out", default=None, help="output directory (default: --runs)")
  a(
    "--optimizer",
    type=arguments.str_list,
    default=None,
    help="comma-separated optimizers to measure (default: all in results.json)",
  )
  a(
    "--max-iterations",
    type=int,
    default=d.max_iterations,
    help="maximum power iterations per class",
  )
  a(
    "--tolerance",
    type=float,
    default=d.tolerance,
    help="relative tolerance of the power iteration",
  )
  a("--num-probes", type=int, default=d.num_probes, help="Hutchinson probes per class")
  a(
    "--batch-size",
    type=int,
    default=d.batch_size,
    help=(
      "examples per Hessian-vector-product batch (all subsets share its shape;"
      " small batches waste less on padding for tiny classes, a GPU likes more)"
    ),
  )
  a("--seed", type=int, default=d.seed, help="seeds the start vectors and probes")
  a(
    "--max-examples-per-class",
    type=int,
    default=None,
    help="measure at most this many examples of each class (default: all)",
  )
  a("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results dict."""
  parser = build_parser()
  args = parser.parse_args(argv)
  study = StudyConfig(
    runs=args.runs,
    out=args.out,
    optimizers=args.optimizer,
    max_iterations=args.max_iterations,
    tolerance=args.tolerance,
    num_probes=args.num_probes,
    batch_size=args.batch_size,
    seed=args.seed,
    max_examples_per_class=args.max_examples_per_class,
    progress=not args.no_progress,
  )
  try:
    study.check()
  except ValueError as e:
    parser.error(str(e))
  return run_study(study)


def cli() -> None:
  """``main`` for a console: missing runs and bad options end in a message."""
  try:
    main(sys.argv[1:])
  except (FileNotFoundError, RuntimeError, ValueError) as e:
    sys.exit(f"error: {e}")
