"""Long-tailed classification with SGD, SAM and ImbSAM: train, evaluate, report.

``examples/train_long_tailed.py`` is a thin command line over :func:`main`. One
experiment trains the same model on the same long-tailed data with every method,
seed and (rho, eta) setting of its :class:`~long_tailed.config.Config`, evaluates
the *last* epoch on the balanced test set (no model selection on the test set)
and writes to ``--out``:

* ``results.json`` (:mod:`shared.report` schema): per run ``overall``, ``many``,
  ``medium``, ``few`` (fractions; ``null`` for an empty split), ``per_class``,
  ``train_counts``, ``history`` and the run's ``config``;
* ``per_class_accuracy.png`` (per-class test accuracy against training count)
  and, when rho or eta is swept, ``ablation.png`` (Many/Medium/Few/Overall
  against each swept value, mean and spread over seeds);
* ``metrics/<run>.csv``: loss, accuracy, ImbSAM's ``tail_fraction`` and
  ``tail_grad_norm`` and the learning rate after every epoch, as training goes;
* ``checkpoints/<run>/``: Orbax checkpoints (the last two kept) that
  ``--resume`` continues from; a checkpoint made with other options is refused.

SGD with momentum, coupled weight decay and a cosine or step schedule is the base
optimizer of every method: ``base`` (alone), ``sam`` (:func:`optax.contrib.sam`,
perturbation ``rho g/||g||`` of the full-batch gradient) and ``imbsam``
(:func:`imbsam_jax.imbsam`, the same ``rho`` aimed at the classes with fewer than
``eta`` training images). Data parallelism: each global batch is split over the
devices; the one jitted step runs unchanged on one CPU, one GPU or several.
Initialisation, data order and augmentation are functions of the seed only, so a
run is reproducible and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import imbsam_jax
from long_tailed.config import PRESETS, Config, implied_preset
from shared import data, metrics, models, options, plots, report, runner, training
from shared.checkpoints import Checkpointer

SPLITS = ("many", "medium", "few")
PLOT_FILE = "per_class_accuracy.png"
ABLATION_FILE = "ablation.png"
CHECKPOINT_DIR = "checkpoints"
METRICS_DIR = "metrics"
#: Which sweeps each method depends on.
USES = {"base": (), "sam": ("rho",), "imbsam": ("rho", "eta")}


def logit_adjusted_cross_entropy(
  logits: jax.Array, labels: jax.Array, log_prior: jax.Array, tau: float = 1.0
) -> jax.Array:
  """Per-example logit-adjusted softmax cross-entropy (Menon et al., 2021).

  .. math::
    \\ell(x, y) = -\\log \\frac{e^{f_y(x) + \\tau \\log \\pi_y}}
    {\\sum_c e^{f_c(x) + \\tau \\log \\pi_c}}

  with ``pi`` the training class prior; ``tau = 0`` is cross-entropy, ``tau = 1``
  the balanced softmax (Ren et al., 2020). Predict with the raw logits.

  Example:
    >>> logits, labels = jnp.zeros((1, 2)), jnp.array([1])
    >>> log_prior = jnp.log(jnp.array([0.8, 0.2]))
    >>> float(logit_adjusted_cross_entropy(logits, labels, log_prior)[0])  # -log .2
    1.609...
  """
  adjusted = logits + tau * jnp.asarray(log_prior, logits.dtype)
  return optax.softmax_cross_entropy_with_integer_labels(adjusted, labels)


def log_class_prior(train_counts: Any) -> np.ndarray:
  """``log(n_c / N)`` as float32, with an empty class counted as one image.

  Example:
    >>> np.exp(log_class_prior([3, 1, 0])).round(3).tolist()
    [0.75, 0.25, 0.25]
  """
  counts = np.asarray(train_counts, np.float64)
  return np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32)


def learning_rate_schedule(
  lr: float, schedule: str, total_steps: int, warmup_steps: int = 0
) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 or x0.1 at 80% and 90%.

  Example:
    >>> sched = learning_rate_schedule(0.1, "step", total_steps=100)
    >>> [round(float(sched(s)), 4) for s in (0, 79, 80, 90)]
    [0.1, 0.1, 0.01, 0.001]
  """
  warmup_steps = min(warmup_steps, total_steps)
  main_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, main_steps)
  elif schedule == "step":
    boundaries = {round(0.8 * main_steps): 0.1, round(0.9 * main_steps): 0.1}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise ValueError(f"schedule must be cosine or step, got {schedule!r}.")
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


# ------------------------------------------------------------- experiment


@dataclasses.dataclass
class Experiment:
  """What the runs of one experiment share: options, data, devices.

  Attributes:
    config: the options.
    dataset: the loaded (long-tailed) data.
    train_counts: ``(C,)`` training images per class.
    mesh: the data-parallel device mesh.
    mean: per-channel mean of the training images (after ``to_float``).
    std: per-channel standard deviation.
    augment: whether crop-flip augmentation is used.
    steps_per_epoch: training steps per epoch.
    eval_batch_size: the global evaluation batch (a multiple of the devices).
  """

  config: Config
  dataset: data.Dataset
  train_counts: np.ndarray
  mesh: Mesh
  mean: np.ndarray
  std: np.ndarray
  augment: bool
  steps_per_epoch: int
  eval_batch_size: int

  def tail_capacity(self, eta: float) -> int | None:
    """ImbSAM's ``tail_capacity`` at this eta (``None``: the exact path)."""
    capacity = self.config.tail_capacity
    if capacity == "auto":
      return imbsam_jax.suggest_tail_capacity(
        self.train_counts, eta, self.config.batch_size
      )
    return capacity

  def describe(self) -> dict[str, Any]:
    """Facts derived from the options and the data, for ``results.json``."""
    ds = self.dataset
    return {
      "dataset_name": ds.name,
      "imbalance_ratio_used": ds.imbalance_ratio,
      "num_classes": ds.num_classes,
      "class_names": list(ds.class_names),
      "num_train": len(ds.y_train),
      "num_test": len(ds.y_test),
      "image_shape": list(ds.x_train.shape[1:]),
      "tau_used": self.config.effective_tau,
      "augment_used": "crop-flip" if self.augment else "none",
      "steps_per_epoch": self.steps_per_epoch,
      "eval_batch_size_used": self.eval_batch_size,
      "num_devices": self.mesh.devices.size,
      "platform": self.mesh.devices.flat[0].platform,
    }


def prepare(config: Config, dataset: data.Dataset | None = None) -> Experiment:
  """Loads the data and sets up the devices of a checked ``config``.

  Raises:
    ValueError: the data does not fit the options (batch larger than the
      training set; ImbSAM asked for but no class below an eta).
  """
  if dataset is None:
    dataset = data.load_dataset(
      config.dataset, data_dir=config.data_dir, imbalance_ratio=config.imbalance_ratio
    )
  devices = jax.devices()[: config.devices]
  num_train = len(dataset.y_train)
  if config.batch_size > num_train:
    raise ValueError(
      f"--batch-size: {config.batch_size} exceeds the {num_train} training images"
    )
  counts = data.class_counts(dataset.y_train, dataset.num_classes)
  if "imbsam" in config.method:
    for eta in config.eta:
      if not imbsam_jax.tail_classes(counts, eta).any():
        raise ValueError(
          f"--eta: no class has fewer than {eta:g} training images (counts"
          f" {counts.tolist()}), so ImbSAM would be plain SGD; raise --eta or"
          " --imbalance-ratio"
        )
  x = data.to_float(dataset.x_train)
  eval_batch = min(config.eval_batch_size, len(dataset.y_test))
  return Experiment(
    config=config,
    dataset=dataset,
    train_counts=counts,
    mesh=training.data_parallel_mesh(devices),
    mean=x.mean(axis=(0, 1, 2)).astype(np.float32),
    std=np.maximum(x.std(axis=(0, 1, 2)), 1e-6).astype(np.float32),
    augment=config.augment == "crop-flip"
    or (config.augment == "auto" and dataset.x_train.shape[1:3] == (32, 32)),
    steps_per_epoch=data.steps_per_epoch(num_train, config.batch_size),
    eval_batch_size=len(devices) * -(-eval_batch // len(devices)),
  )


@functools.cache
def _experiment(config: Config) -> Experiment:
  return prepare(config)


# ---------------------------------------------------------------- one run


class RunSteps(NamedTuple):
  """The initial state and the jitted functions of one run.

  Attributes:
    state: the replicated :class:`shared.training.TrainState`.
    train_step: ``(state, batch, key) -> (state, metrics)``; ``batch`` is
      ``{"image", "label"}`` sharded over the batch axis; preprocessing and
      augmentation run inside.
    eval_step: ``(params, model_state, images) -> predicted classes``.
    eval_graphdef: the model's graph in eval mode (BatchNorm running
      statistics), for ``nnx.merge(eval_graphdef, params, model_state)``.
    schedule: the learning-rate schedule (for the metrics log).
  """

  state: training.TrainState
  train_step: Any
  eval_step: Any
  eval_graphdef: nnx.GraphDef
  schedule: optax.Schedule


def per_example_loss_fn(exp: Experiment):
  """``(model, batch) -> (losses, {"accuracy"})`` on normalized images."""
  log_prior = jnp.asarray(log_class_prior(exp.train_counts))
  tau = exp.config.effective_tau

  def per_example_loss(model: nnx.Module, batch: dict[str, jax.Array]):
    logits = model(batch["image"])
    losses = logit_adjusted_cross_entropy(logits, batch["label"], log_prior, tau)
    correct = jnp.argmax(logits, -1) == batch["label"]
    return losses, {"accuracy": jnp.mean(correct.astype(jnp.float32))}

  return per_example_loss


def build_run(exp: Experiment, cell: runner.Cell) -> RunSteps:
  """Model, optimizer and jitted steps of one cell (every method of a seed
  starts from the same weights)."""
  config, ds = exp.config, exp.dataset
  mean, std = jnp.asarray(exp.mean), jnp.asarray(exp.std)
  model = models.create_model(
    config.model,
    num_classes=ds.num_classes,
    input_shape=ds.x_train.shape[1:],
    rngs=nnx.Rngs(cell.seed),
    norm=config.norm,
  )
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  model.train()

  steps = exp.steps_per_epoch
  schedule = learning_rate_schedule(
    config.lr, config.schedule, config.epochs * steps, config.warmup_epochs * steps
  )
  base_tx = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  )
  eta = cell.setting.get("eta")
  tail_mask_fn = capacity = None
  extra: dict[str, Any] = {}
  if cell.method == "imbsam":
    tail_mask_fn = imbsam_jax.tail_mask_from_counts(exp.train_counts, eta)
    capacity = exp.tail_capacity(eta)
    extra = {"tail_loss_scale": config.tail_loss_scale, "tail_capacity": capacity}
  tx = training.make_optimizer(
    cell.method, base_tx, rho=cell.setting.get("rho", 0.0), tail_mask_fn=tail_mask_fn,
    **extra,
  )  # fmt: skip
  graphdef, state = training.init_train_state(model, tx)

  def normalize(images: jax.Array) -> jax.Array:
    return (images - mean) / std

  def preprocess(key: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    images = data.to_float(batch["image"])
    if exp.augment:  # zero padding before normalisation, as torchvision's
      images = training.random_crop_flip(key, images)
    return {**batch, "image": normalize(images)}

  step_fn = training.make_train_step(
    graphdef,
    per_example_loss_fn(exp),
    cell.method,
    tx,
    # The one-forward exact path; the fast path gathers the tail itself.
    tail_mask_fn=tail_mask_fn if capacity is None else None,
    augment=preprocess,
  )

  def eval_fn(params, model_state, images):
    model = nnx.merge(eval_graphdef, params, model_state)
    logits = model(normalize(data.to_float(images)))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  # Fixed output shardings: the state stays replicated, so no step recompiles.
  replicated = NamedSharding(exp.mesh, PartitionSpec())
  return RunSteps(
    state=training.replicate(state, exp.mesh),
    train_step=jax.jit(step_fn, out_shardings=replicated),
    eval_step=jax.jit(
      eval_fn, out_shardings=NamedSharding(exp.mesh, PartitionSpec("data"))
    ),
    eval_graphdef=eval_graphdef,
    schedule=schedule,
  )


def train_epoch(
  exp: Experiment, train_step: Any, state: training.TrainState, *, seed: int,
  epoch: int, bar: Any,
) -> tuple[training.TrainState, dict[str, float]]:  # fmt: skip
  """One epoch; returns the state and the epoch's mean metrics.

  The data order is ``(seed, epoch)``'s permutation and the augmentation key of
  step ``s`` is ``fold_in(fold_in(key(seed), 1), s)``: nothing else is random.
  """
  ds, steps = exp.dataset, exp.steps_per_epoch
  aug_key = jax.random.fold_in(jax.random.key(seed), 1)
  batches = data.iterate_batches(
    ds.x_train,
    ds.y_train,
    exp.config.batch_size,
    seed=seed,
    epoch=epoch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  sums: dict[str, jax.Array] = {}
  for i, (x, y) in enumerate(batches):
    batch = training.shard_batch({"image": x, "label": y}, exp.mesh)
    state, step_metrics = train_step(
      state, batch, jax.random.fold_in(aug_key, epoch * steps + i)
    )
    for k, v in step_metrics.items():
      sums[k] = sums[k] + v if k in sums else v
    bar.update(1)
  means = {k: float(v) / steps for k, v in sums.items()}
  bar.set_postfix(epoch=epoch + 1, loss=f"{means['loss']:.3f}")
  return state, means


def _to_host(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-process) array as one NumPy array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict(exp: Experiment, eval_step: Any, state: training.TrainState) -> np.ndarray:
  """Predicted classes of the whole test set, in order (fixed-shape batches)."""
  ds = exp.dataset
  predictions = []
  for x, _, _ in data.iterate_eval_batches(
    ds.x_test,
    ds.y_test,
    exp.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    images = training.shard_batch(x, exp.mesh)
    predictions.append(_to_host(eval_step(state.params, state.model_state, images)))
  # The padding sits at the end of the last batch: the first len(y_test)
  # predictions are the test set in order.
  return np.concatenate(predictions)[: len(ds.y_test)]


def fingerprint(exp: Experiment, cell: runner.Cell) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed."""
  skip = {"preset", "method", "seed", "rho", "eta", "out", "resume", "progress"}
  skip |= {"devices", "checkpoint_every", "eval_batch_size"}
  config = {k: v for k, v in options.to_json(exp.config).items() if k not in skip}
  return {
    **config,
    "method": cell.method,
    "seed": cell.seed,
    **cell.setting,
    "train_counts": exp.train_counts.tolist(),
  }


def run_config(exp: Experiment, cell: runner.Cell) -> dict[str, Any]:
  """The ``config`` of a run: the options with the run's own rho and eta."""
  return {
    **options.to_json(exp.config),
    **{k: cell.setting.get(k) for k in USES["imbsam"]},
    **exp.describe(),
  }


def checkpoint_dir(runs_dir: str | Path, cell: runner.Cell) -> Path:
  return Path(runs_dir) / CHECKPOINT_DIR / cell.name


def train_and_evaluate(exp: Experiment, cell: runner.Cell, bar: Any) -> dict[str, Any]:
  """Trains one cell (resuming from its checkpoint) and evaluates its last epoch.

  Returns:
    The run's entry of ``results.json``.
  """
  config = exp.config
  run = build_run(exp, cell)
  state, history, start_epoch = run.state, {}, 0
  made_with = fingerprint(exp, cell)
  checkpointer = None
  if config.checkpoint_every:
    directory = checkpoint_dir(config.out, cell)
    checkpointer = Checkpointer(directory, fresh=not config.resume)
    if config.resume and checkpointer.latest_epoch() is not None:
      state, meta = checkpointer.restore(state)
      _check_fingerprint(meta["fingerprint"], made_with, directory)
      start_epoch, history = int(meta["epoch"]), meta["history"]
  log = runner.MetricsLog(
    Path(config.out) / METRICS_DIR / f"{cell.name}.csv", resume=start_epoch > 0
  )
  steps = exp.steps_per_epoch
  bar.update(start_epoch * steps)
  started = time.perf_counter()
  try:
    for epoch in range(start_epoch, config.epochs):
      state, means = train_epoch(
        exp, run.train_step, state, seed=cell.seed, epoch=epoch, bar=bar
      )
      for k, v in means.items():
        history.setdefault(f"train_{k}", []).append(v)
      done = epoch + 1
      lr = float(run.schedule(done * steps - 1))
      log.write({"epoch": done, "step": done * steps, **means, "lr": lr})
      if checkpointer is not None and (
        done % config.checkpoint_every == 0 or done == config.epochs
      ):
        checkpointer.save(done, state, {"fingerprint": made_with, "history": history})
  finally:
    if checkpointer is not None:
      checkpointer.close()
  jax.block_until_ready(state)
  train_time = time.perf_counter() - started
  counts = exp.train_counts
  result = metrics.classification_report(
    predict(exp, run.eval_step, state),
    exp.dataset.y_test,
    counts,
    many_threshold=config.many_threshold,
    few_threshold=config.few_threshold,
  )
  eta = cell.setting.get("eta")
  return {
    "optimizer": "sgd" if cell.method == "base" else cell.method,
    **result,
    "train_counts": counts.tolist(),
    "tail_classes": None
    if eta is None
    else np.flatnonzero(imbsam_jax.tail_classes(counts, eta)).tolist(),
    "tail_capacity": exp.tail_capacity(eta) if cell.method == "imbsam" else None,
    "history": history,
    "epochs_trained_now": config.epochs - start_epoch,
    "resumed_from_epoch": start_epoch,
    "train_time_s": round(train_time, 3),
    "compiles": {
      "train_step": run.train_step._cache_size(),
      "eval_step": run.eval_step._cache_size(),
    },
    "config": run_config(exp, cell),
  }


def _check_fingerprint(saved: dict, current: dict, where: Path) -> None:
  """Refuses to resume a checkpoint made with other options."""
  differ = sorted(
    k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)
  )
  if differ:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
    raise ValueError(
      f"Cannot resume from {where}: it was made with other options ({details})."
      " Use the original options, another --out, or drop --resume."
    )


# --------------------------------------------------------------- reports


def format_table(results: dict[str, Any]) -> str:
  """Many/Medium/Few/Overall test accuracy (%) per run, then mean ± std."""
  runs = results["runs"]
  if not runs:
    return "(no runs)"
  config, first = runs[0]["config"], runs[0]
  keys = report.varying(runs, USES["imbsam"])
  sizes = {k: len(first["split_classes"][k]) for k in SPLITS}
  columns = [*SPLITS, "overall"]
  rows = [
    [
      "run",
      *(f"{k.capitalize()} ({sizes[k]})" for k in SPLITS),
      "Overall",
    ]
  ]
  for r in runs:
    cells = ["-" if r[k] is None else f"{100 * r[k]:.1f}" for k in columns]
    rows.append([f"{report.label(r, keys)} seed {r['seed']}", *cells])
  summary = report.summarize(runs, columns, keys)
  if any(len(s["seeds"]) > 1 for s in summary.values()):
    for name, s in summary.items():
      rows.append(
        [f"{name} ({len(s['seeds'])} seeds)"]
        + [report.cell(s[k], 100) for k in columns]
      )
  return "\n".join(
    [
      f"Test top-1 accuracy (%), last epoch: {config['dataset_name']}"
      f" ({config['num_train']} train / {config['num_test']} test images,"
      f" {config['num_classes']} classes); (n) = classes per split (Many >"
      f" {config['many_threshold']}, Few < {config['few_threshold']} training"
      " images)",
      report.text_table(rows),
    ]
  )


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
  """The per-class accuracy figure, and the ablation figure of a sweep."""
  runs = results["runs"]
  config = runs[0]["config"]
  keys = report.varying(runs, USES["imbsam"])
  per_class: dict[str, list] = {}
  for r in runs:
    per_class.setdefault(report.label(r, keys), []).append(
      [np.nan if a is None else a for a in r["per_class"]]
    )
  seeds = sorted({r["seed"] for r in runs})
  title = (
    f"{config['dataset_name']}, {config['model']}, {config['epochs']} epochs,"
    f" loss {config['loss']}; seed{'s' if len(seeds) > 1 else ''}"
    f" {','.join(map(str, seeds))}"
  )
  many, few = config["many_threshold"], config["few_threshold"]
  paths = [
    plots.plot_per_class_accuracy(
      runs[0]["train_counts"],
      per_class,
      out / PLOT_FILE,
      thresholds={f"Few < {few}": few, f"Many > {many}": many},
      title=title,
    )
  ]
  if keys:
    columns = {"many": "Many", "medium": "Medium", "few": "Few", "overall": "Overall"}
    paths.append(
      plots.plot_ablation(runs, keys, columns, out / ABLATION_FILE, title=title)
    )
  return paths


def run(
  config: Config,
  *,
  dataset: data.Dataset | None = None,
  log: Any = print,
) -> dict[str, Any]:
  """Runs every cell of ``config``; writes results, metrics logs and figures.

  Args:
    config: a checked config (from :func:`main` or :func:`shared.options.parse`).
    dataset: already loaded data to use instead of ``config.dataset``.
    log: where the summary lines and the table go (process 0 only).

  Returns:
    The ``results.json`` content.
  """
  log = log if runner.is_main_process() else (lambda *_: None)
  exp = prepare(config, dataset)
  ds, counts = exp.dataset, exp.train_counts
  log(
    f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images,"
    f" {ds.num_classes} classes, imbalance ratio {ds.imbalance_ratio:g};"
    f" train counts {counts.tolist()}"
  )
  for eta in config.eta if "imbsam" in config.method else ():
    tail = imbsam_jax.tail_classes(counts, eta)
    capacity = exp.tail_capacity(eta)
    path = "exact" if capacity is None else f"fast, tail_capacity={capacity}"
    log(
      f"ImbSAM tail at eta={eta:g}: {int(tail.sum())} classes,"
      f" {counts[tail].sum() / counts.sum():.1%} of the training images; {path}"
    )
  log(
    f"{config.model} (norm: {config.norm or 'model default'}), {config.epochs}"
    f" epochs x {exp.steps_per_epoch} steps of {config.batch_size} on"
    f" {exp.mesh.devices.size} {exp.mesh.devices.flat[0].platform} device(s)"
  )
  cells = runner.grid(
    config.method, config.seed, options.sweep_values(config), uses=USES
  )
  out = Path(config.out)
  results = runner.run_grid(
    cells,
    functools.partial(train_and_evaluate, exp),
    out=out,
    config=options.to_json(config),
    keys=list(options.sweep_values(config)),
    metrics=[*SPLITS, "overall"],
    vectors=["per_class"],
    units_per_cell=lambda cell: config.epochs * exp.steps_per_epoch,
    unit="step",
    progress=config.progress,
  )
  log("")
  log(format_table(results))
  if runner.is_main_process():
    paths = plot_results(results, out)
    log(f"\nWrote {out / report.RESULTS_FILE}, {', '.join(map(str, paths))}")
  return json.loads(json.dumps(results))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results."""
  config = options.parse(
    Config,
    argv,
    presets=PRESETS,
    implied_preset=implied_preset,
    prog="train_long_tailed.py",
    description="Train a classifier on long-tailed data with SGD, SAM and ImbSAM"
    " and compare their Many/Medium/Few test accuracy.",
  )
  return run(config)


# ------------------------------------------- finished runs, for other tools


class Restored(NamedTuple):
  """The last state of a finished run, ready for analysis.

  Attributes:
    experiment: its :class:`Experiment` (data, devices, options).
    state: the restored :class:`shared.training.TrainState`.
    loss_fn: ``(params, batch) -> (B,)`` per-example training losses with the
      model in eval mode, ``batch = {"image": normalized, "label"}``.
    inputs: the normalized training images (no augmentation).
    eta: the run's eta (``None`` for methods that do not use it).
  """

  experiment: Experiment
  state: training.TrainState
  loss_fn: Any
  inputs: np.ndarray
  eta: float | None


def restore(run_entry: dict[str, Any], runs_dir: str | Path) -> Restored:
  """Restores the final checkpoint of a run of ``runs_dir/results.json``.

  Raises:
    FileNotFoundError: the run has no checkpoint.
    ValueError: the checkpoint is not the last epoch's, or was made with other
      options than the run's.
  """
  config = options.from_json(Config, run_entry["config"])
  # What the runs of an experiment share (their methods and sweeps aside).
  config = dataclasses.replace(
    config, method=("base",), seed=(0,), rho=Config.rho, eta=Config.eta,
    out=str(runs_dir), progress=False, resume=False,
  )  # fmt: skip
  exp = _experiment(config)
  setting = {k: run_entry.get(k) for k in USES[run_entry["method"]]}
  cell = runner.Cell(run_entry["method"], int(run_entry["seed"]), setting)
  directory = checkpoint_dir(runs_dir, cell)
  again = f"run examples/train_long_tailed.py --out {runs_dir} (with checkpoints)"
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoints in {directory}: {again} first.")
  steps = build_run(exp, cell)
  with Checkpointer(directory) as checkpointer:
    if checkpointer.latest_epoch() is None:
      raise FileNotFoundError(f"No checkpoint in {directory}: {again} first.")
    state, meta = checkpointer.restore(steps.state)
  if meta["epoch"] != config.epochs:
    raise ValueError(
      f"The newest checkpoint in {directory} is epoch {meta['epoch']} of"
      f" {config.epochs}: finish the run with --resume first."
    )
  if meta["fingerprint"] != fingerprint(exp, cell):
    raise ValueError(
      f"The checkpoint in {directory} was made with other options than"
      f" {Path(runs_dir) / report.RESULTS_FILE} says: {again} again."
    )
  per_example = per_example_loss_fn(exp)

  def loss_fn(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(steps.eval_graphdef, params, state.model_state, copy=True)
    return per_example(model, batch)[0]

  inputs = data.to_float(exp.dataset.x_train, exp.mean, exp.std)
  return Restored(exp, state, loss_fn, inputs, setting.get("eta"))
