"""Long-tailed classification with SGD, SAM and ImbSAM: train, evaluate, report.

``examples/train_long_tailed.py`` is a thin command line over :func:`main`. Every
method, seed and (rho, eta) setting of a :class:`~long_tailed.config.Config`
trains the same model on the same data; the *last* epoch is evaluated on the
balanced test set (no model selection on the test set). Written to ``--out``:

* ``results.json`` (:mod:`shared.report`): per run ``overall``, ``many``,
  ``medium``, ``few`` (``null`` for an empty split), ``per_class``,
  ``train_counts``, ``history`` and the run's ``config``;
* ``per_class_accuracy.png`` and, for a sweep, ``ablation.png`` (the splits'
  accuracy against rho and eta, mean and spread over seeds);
* ``metrics/<run>.csv``: loss, accuracy, ``tail_fraction``, ``tail_grad_norm``
  and learning rate after every epoch, as training goes;
* ``checkpoints/<run>/``: Orbax checkpoints that ``--resume`` continues from (a
  checkpoint made with other options is refused).

The base optimizer of every method is SGD with momentum, coupled weight decay and
the schedule: ``base`` alone, ``sam`` (:func:`optax.contrib.sam`) or ``imbsam``
(:func:`imbsam_jax.imbsam`, aimed at the classes with fewer than ``eta`` training
images). Each global batch is split over the devices; initialisation, data order
and augmentation depend on the seed only, so a resumed run equals an
uninterrupted one.
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
#: Which sweeps each method depends on.
USES = {"base": (), "sam": ("rho",), "imbsam": ("rho", "eta")}


def logit_adjusted_cross_entropy(
  logits: jax.Array, labels: jax.Array, log_prior: jax.Array, tau: float = 1.0
) -> jax.Array:
  """Per-example logit-adjusted cross-entropy (Menon et al., 2021).

  .. math::
    \\ell(x, y) = -\\log \\operatorname{softmax}(f(x) + \\tau \\log \\pi)_y

  with ``pi`` the training class prior: ``tau = 0`` is cross-entropy, ``tau = 1``
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
  """``log(n_c / N)`` as float32, an empty class counted as one image.

  Example:
    >>> np.exp(log_class_prior([3, 1, 0])).round(3).tolist()
    [0.75, 0.25, 0.25]
  """
  counts = np.asarray(train_counts, np.float64)
  return np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32)


def learning_rate_schedule(
  lr: float, schedule: str, total_steps: int, warmup_steps: int = 0
) -> optax.Schedule:
  """Linear warm-up from 0, then cosine to 0 or x0.1 at 80% and 90% (``step``).

  Example:
    >>> sched = learning_rate_schedule(0.1, "step", total_steps=100)
    >>> [round(float(sched(s)), 4) for s in (0, 79, 80, 90)]
    [0.1, 0.1, 0.01, 0.001]
  """
  warmup_steps = min(warmup_steps, total_steps)
  steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, steps)
  elif schedule == "step":
    main = optax.piecewise_constant_schedule(
      lr, {round(0.8 * steps): 0.1, round(0.9 * steps): 0.1}
    )
  else:
    raise ValueError(f"schedule must be cosine or step, got {schedule!r}.")
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


class Experiment(NamedTuple):
  """What the runs share: ``config``, the loaded ``dataset``, ``train_counts``,
  the device ``mesh``, the training images' per-channel ``mean`` and ``std``,
  whether to ``augment`` (crop-flip) and ``steps_per_epoch``."""

  config: Config
  dataset: data.Dataset
  train_counts: np.ndarray
  mesh: Mesh
  mean: np.ndarray
  std: np.ndarray
  augment: bool
  steps_per_epoch: int

  def tail_capacity(self, eta: float) -> int | None:
    """ImbSAM's ``tail_capacity`` at ``eta`` (``None``: the exact path)."""
    capacity = self.config.tail_capacity
    if self.config.tail_path() == "exact":
      return None
    if capacity == "auto":  # what imbsam's "auto" picks from the mask function
      return imbsam_jax.suggest_tail_capacity(
        self.train_counts, eta, self.config.batch_size
      )
    return capacity

  def describe(self) -> dict[str, Any]:
    """Facts derived from the options and the data, for ``results.json``."""
    ds, devices = self.dataset, self.mesh.devices
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
      "num_devices": devices.size,
      "platform": devices.flat[0].platform,
    }


def prepare(config: Config, dataset: data.Dataset | None = None) -> Experiment:
  """Loads the data and sets up the devices; raises ``ValueError("--flag: ...")``
  for options that do not fit the data."""
  if dataset is None:
    dataset = data.load_dataset(
      config.dataset, data_dir=config.data_dir, imbalance_ratio=config.imbalance_ratio
    )
  num_train = len(dataset.y_train)
  if config.batch_size > num_train:
    raise ValueError(
      f"--batch-size: {config.batch_size} exceeds the {num_train} training images"
    )
  counts = data.class_counts(dataset.y_train, dataset.num_classes)
  for eta in config.eta if "imbsam" in config.method else ():
    if not imbsam_jax.tail_classes(counts, eta).any():
      raise ValueError(
        f"--eta: no class has fewer than {eta:g} training images (counts"
        f" {counts.tolist()}): ImbSAM would be plain SGD; raise --eta or"
        " --imbalance-ratio"
      )
  x = data.to_float(dataset.x_train)
  return Experiment(
    config=config,
    dataset=dataset,
    train_counts=counts,
    mesh=training.data_parallel_mesh(jax.devices()[: config.devices]),
    mean=x.mean(axis=(0, 1, 2)).astype(np.float32),
    std=np.maximum(x.std(axis=(0, 1, 2)), 1e-6).astype(np.float32),
    augment=config.augment == "crop-flip"
    or (config.augment == "auto" and dataset.x_train.shape[1:3] == (32, 32)),
    steps_per_epoch=data.steps_per_epoch(num_train, config.batch_size),
  )


class RunSteps(NamedTuple):
  """One run's replicated ``state``, jitted ``train_step(state, batch, key)`` and
  ``predict(state, images) -> classes``, ``eval_graphdef`` (eval mode) and
  learning-rate ``schedule``."""

  state: training.TrainState
  train_step: Any
  predict: Any
  eval_graphdef: nnx.GraphDef
  schedule: optax.Schedule


def per_example_loss_fn(exp: Experiment):
  """``(model, batch) -> (losses, {"accuracy"})`` on normalized images."""
  log_prior, tau = (
    jnp.asarray(log_class_prior(exp.train_counts)),
    exp.config.effective_tau,
  )

  def per_example_loss(model: nnx.Module, batch: dict[str, jax.Array]):
    logits = model(batch["image"])
    losses = logit_adjusted_cross_entropy(logits, batch["label"], log_prior, tau)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return losses, {"accuracy": accuracy}

  return per_example_loss


def build_run(exp: Experiment, cell: runner.Cell) -> RunSteps:
  """Model, optimizer and jitted steps of a cell (the seed alone fixes the
  initial weights: every method of a seed starts from the same ones)."""
  config, ds, steps = exp.config, exp.dataset, exp.steps_per_epoch
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
  schedule = learning_rate_schedule(
    config.lr, config.schedule, config.epochs * steps, config.warmup_epochs * steps
  )
  base_tx = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  )
  tail_mask_fn = None
  extra: dict[str, Any] = {}
  if cell.method == "imbsam":
    tail_mask_fn = imbsam_jax.tail_mask_from_counts(
      exp.train_counts, cell.setting["eta"]
    )
    exact = config.tail_path() == "exact"
    capacity = None if exact else config.tail_capacity  # "auto": k from mask_fn
    extra = {"tail_loss_scale": config.tail_loss_scale, "tail_capacity": capacity}
  rho = cell.setting.get("rho", 0.0)
  tx = training.make_optimizer(
    cell.method, base_tx, rho=rho, tail_mask_fn=tail_mask_fn, **extra
  )
  graphdef, state = training.init_train_state(model, tx)
  mean, std = jnp.asarray(exp.mean), jnp.asarray(exp.std)

  def preprocess(key: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    images = data.to_float(batch["image"])
    if exp.augment:  # zero padding before normalisation, as torchvision's
      images = training.random_crop_flip(key, images)
    return {**batch, "image": (images - mean) / std}

  step = training.make_train_step(
    graphdef,
    per_example_loss_fn(exp),
    cell.method,
    tx,
    tail_mask_fn=tail_mask_fn,
    path=config.tail_path(),
    augment=preprocess,
  )

  def predict(state: training.TrainState, images: jax.Array) -> jax.Array:
    model = nnx.merge(eval_graphdef, state.params, state.model_state)
    return jnp.argmax(model((data.to_float(images) - mean) / std), axis=-1).astype(
      jnp.int32
    )

  # Fixed output shardings: the state stays replicated, so no step recompiles.
  sharding = functools.partial(NamedSharding, exp.mesh)
  return RunSteps(
    state=training.replicate(state, exp.mesh),
    train_step=jax.jit(step, out_shardings=sharding(PartitionSpec())),
    predict=jax.jit(predict, out_shardings=sharding(PartitionSpec("data"))),
    eval_graphdef=eval_graphdef,
    schedule=schedule,
  )


#: Options a checkpoint may be resumed across (the cell's own come with it).
_NOT_FINGERPRINTED = set(
  [
    "preset",
    "method",
    "seed",
    "rho",
    "eta",
    "out",
    "resume",
    "progress",
    "devices",
    "checkpoint_every",
    "eval_batch_size",
  ]
)


def fingerprint(exp: Experiment, cell: runner.Cell) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed."""
  config = options.to_json(exp.config)
  made = {k: v for k, v in config.items() if k not in _NOT_FINGERPRINTED}
  made.update(
    method=cell.method, seed=cell.seed, train_counts=exp.train_counts.tolist()
  )
  return {**made, **cell.setting}


def checkpoint_dir(runs_dir: str | Path, cell: runner.Cell) -> Path:
  return Path(runs_dir) / "checkpoints" / cell.name


def train_and_evaluate(exp: Experiment, cell: runner.Cell, bar: Any) -> dict[str, Any]:
  """Trains a cell (resuming from its checkpoint) and evaluates its last epoch;
  returns its entry of ``results.json``."""
  config, ds, steps = exp.config, exp.dataset, exp.steps_per_epoch
  run = build_run(exp, cell)
  state, history, start = run.state, {}, 0
  made_with = fingerprint(exp, cell)
  checkpointer = None
  if config.checkpoint_every:
    checkpointer = Checkpointer(
      checkpoint_dir(config.out, cell), fresh=not config.resume
    )
    if config.resume and checkpointer.latest_epoch() is not None:
      state, meta = checkpointer.restore(state)
      if meta["fingerprint"] != made_with:
        differ = [k for k, v in made_with.items() if meta["fingerprint"].get(k) != v]
        raise ValueError(
          f"Cannot resume from {checkpointer.directory}: it was made with other"
          f" {', '.join(differ)}; use the original options, another --out, or no"
          " --resume."
        )
      start, history = int(meta["epoch"]), meta["history"]
  log = runner.MetricsLog(
    Path(config.out) / "metrics" / f"{cell.name}.csv", resume=start > 0
  )
  aug_key = jax.random.fold_in(jax.random.key(cell.seed), 1)
  bar.update(start * steps)
  started = time.perf_counter()
  try:
    for epoch in range(start, config.epochs):
      batches = data.iterate_batches(
        ds.x_train,
        ds.y_train,
        config.batch_size,
        seed=cell.seed,
        epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      state, means = training.train_epoch(
        run.train_step,
        state,
        ({"image": x, "label": y} for x, y in batches),
        exp.mesh,
        aug_key,
        first_step=epoch * steps,
        bar=bar,
      )
      bar.set_postfix(epoch=epoch + 1, loss=f"{means['loss']:.3f}")
      for k, v in means.items():
        history.setdefault(f"train_{k}", []).append(v)
      done = epoch + 1
      log.write(
        {
          "epoch": done,
          "step": done * steps,
          **means,
          "lr": float(run.schedule(done * steps - 1)),
        }
      )
      if checkpointer and (
        done % config.checkpoint_every == 0 or done == config.epochs
      ):
        checkpointer.save(done, state, {"fingerprint": made_with, "history": history})
  finally:
    if checkpointer:
      checkpointer.close()
  train_time = time.perf_counter() - started
  predictions = training.evaluate(
    functools.partial(run.predict, state), ds.x_test, config.eval_batch_size, exp.mesh
  )
  eta = cell.setting.get("eta")
  return {
    "optimizer": "sgd" if cell.method == "base" else cell.method,
    **metrics.classification_report(
      predictions,
      ds.y_test,
      exp.train_counts,
      many_threshold=config.many_threshold,
      few_threshold=config.few_threshold,
    ),
    "train_counts": exp.train_counts.tolist(),
    "tail_classes": None
    if eta is None
    else np.flatnonzero(imbsam_jax.tail_classes(exp.train_counts, eta)).tolist(),
    "tail_capacity": exp.tail_capacity(eta) if cell.method == "imbsam" else None,
    "tail_path": config.tail_path() if cell.method == "imbsam" else None,
    "history": history,
    "epochs_trained_now": config.epochs - start,
    "resumed_from_epoch": start,
    "train_time_s": round(train_time, 3),
    "compiles": {
      "train_step": run.train_step._cache_size(),
      "predict": run.predict._cache_size(),
    },
    "config": {
      **options.to_json(config),
      **{k: cell.setting.get(k) for k in USES["imbsam"]},
      **exp.describe(),
    },
  }


def format_table(results: dict[str, Any]) -> str:
  """Many/Medium/Few/Overall test accuracy (%) per run, then mean ± std."""
  runs = results["runs"]
  config, keys, columns = (
    runs[0]["config"],
    report.varying(runs, USES["imbsam"]),
    [*SPLITS, "overall"],
  )
  sizes = {k: len(runs[0]["split_classes"][k]) for k in SPLITS}
  rows = [["run", *(f"{k.capitalize()} ({sizes[k]})" for k in SPLITS), "Overall"]]
  for r in runs:
    rows.append(
      [
        f"{report.label(r, keys)} seed {r['seed']}",
        *("-" if r[k] is None else f"{100 * r[k]:.1f}" for k in columns),
      ]
    )
  summary = report.summarize(runs, columns, keys)
  if any(len(s["seeds"]) > 1 for s in summary.values()):
    for name, s in summary.items():
      rows.append(
        [
          f"{name} ({len(s['seeds'])} seeds)",
          *(report.cell(s[k], 100) for k in columns),
        ]
      )
  return (
    f"Test top-1 accuracy (%), last epoch: {config['dataset_name']}"
    f" ({config['num_train']} train / {config['num_test']} test images,"
    f" {config['num_classes']} classes); (n) = classes per split (Many >"
    f" {config['many_threshold']}, Few < {config['few_threshold']}"
    f" training images)\n{report.text_table(rows)}"
  )


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
  """The per-class accuracy figure, and the ablation figure of a sweep."""
  runs = results["runs"]
  config, keys = runs[0]["config"], report.varying(runs, USES["imbsam"])
  per_class: dict[str, list] = {}
  for r in runs:
    per_class.setdefault(report.label(r, keys), []).append(
      [np.nan if a is None else a for a in r["per_class"]]
    )
  seeds = ",".join(map(str, sorted({r["seed"] for r in runs})))
  title = (
    f"{config['dataset_name']}, {config['model']}, {config['epochs']} epochs,"
    f" loss {config['loss']}; seeds {seeds}"
  )
  many, few = config["many_threshold"], config["few_threshold"]
  thresholds = {f"Few < {few}": few, f"Many > {many}": many}
  paths = [
    plots.plot_per_class_accuracy(
      runs[0]["train_counts"],
      per_class,
      out / "per_class_accuracy.png",
      thresholds=thresholds,
      title=title,
    )
  ]
  if keys:
    columns = {"many": "Many", "medium": "Medium", "few": "Few", "overall": "Overall"}
    paths.append(
      plots.plot_ablation(runs, keys, columns, out / "ablation.png", title=title)
    )
  return paths


def run(config: Config, *, dataset: data.Dataset | None = None) -> dict[str, Any]:
  """Runs every cell of a checked ``config``; writes results, logs and figures."""
  log = print if runner.is_main_process() else (lambda *_: None)
  exp = prepare(config, dataset)
  ds, counts = exp.dataset, exp.train_counts
  log(
    f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images, imbalance"
    f" ratio {ds.imbalance_ratio:g}; train counts per class {counts.tolist()}"
  )
  for eta in config.eta if "imbsam" in config.method else ():
    tail, capacity = imbsam_jax.tail_classes(counts, eta), exp.tail_capacity(eta)
    path = {
      "exact": "exact path (full batch)",
      "gathered": f"fast path, exact (tail_capacity={capacity})",
      "anchored": f"fast path, anchored BatchNorm (tail_capacity={capacity})",
    }[config.tail_path()]
    share = counts[tail].sum() / counts.sum()
    log(f"ImbSAM tail at eta={eta:g}: {tail.sum()} classes, {share:.1%}; {path}")
  log(
    f"{config.model} (norm: {config.norm or 'model default'}), {config.epochs} epochs x"
    f" {exp.steps_per_epoch} steps of {config.batch_size} on {exp.mesh.size}"
    f" {exp.mesh.devices.flat[0].platform} device(s)"
  )
  sweeps = options.sweep_values(config)
  results = runner.run_grid(
    runner.grid(config.method, config.seed, sweeps, uses=USES),
    functools.partial(train_and_evaluate, exp),
    out=config.out,
    config=options.to_json(config),
    keys=list(sweeps),
    metrics=[*SPLITS, "overall"],
    vectors=["per_class"],
    units_per_cell=config.epochs * exp.steps_per_epoch,
    unit="step",
    progress=config.progress,
  )
  log(f"\n{format_table(results)}")
  if runner.is_main_process():
    paths = plot_results(results, Path(config.out))
    names = ", ".join(p.name for p in paths)
    log(f"\nWrote {config.out}/: {report.RESULTS_FILE}, {names}")
  return json.loads(json.dumps(results))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results."""
  config = options.parse(
    Config,
    argv,
    presets=PRESETS,
    implied_preset=implied_preset,
    prog="train_long_tailed.py",
    description="Train a classifier on long-tailed data with SGD, SAM and ImbSAM and"
    " compare their Many/Medium/Few test accuracy.",
  )
  return run(config)


class Restored(NamedTuple):
  """A finished run's ``experiment``, last ``state``, per-example training
  ``loss_fn(params, {"image", "label"})`` (model in eval mode, normalized images)
  and normalized training ``inputs``."""

  experiment: Experiment
  state: training.TrainState
  loss_fn: Any
  inputs: np.ndarray


@functools.cache
def _experiment(config: Config) -> Experiment:
  return prepare(config)


def restore(run_entry: dict[str, Any], runs_dir: str | Path) -> Restored:
  """Restores the final checkpoint of a run of ``runs_dir/results.json``.

  Raises:
    FileNotFoundError: the run has no checkpoint.
    ValueError: the checkpoint is not the last epoch's, or not the run's.
  """
  config = options.from_json(Config, {**run_entry["config"], "method": ["base"]})
  exp = _experiment(dataclasses.replace(config, out=str(runs_dir), progress=False))
  setting = {k: run_entry[k] for k in USES[run_entry["method"]]}
  cell = runner.Cell(run_entry["method"], int(run_entry["seed"]), setting)
  directory = checkpoint_dir(runs_dir, cell)
  again = f"run examples/train_long_tailed.py --out {runs_dir}"
  steps = build_run(exp, cell)
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoints in {directory}: {again} first.")
  with Checkpointer(directory) as checkpointer:
    state, meta = checkpointer.restore(steps.state)
  if meta["epoch"] != config.epochs:
    raise ValueError(
      f"{directory} ends at epoch {meta['epoch']} of {config.epochs}: finish the"
      " run with --resume."
    )
  if meta["fingerprint"] != fingerprint(exp, cell):
    raise ValueError(
      f"{directory} was made with other options than its results.json says:"
      f" {again} again."
    )
  per_example = per_example_loss_fn(exp)

  def loss_fn(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    return per_example(
      nnx.merge(steps.eval_graphdef, params, state.model_state, copy=True), batch
    )[0]

  inputs = data.to_float(exp.dataset.x_train, exp.mean, exp.std)
  return Restored(exp, state, loss_fn, inputs)
