"""Long-tailed classification with SGD, SAM and ImbSAM: the application logic.

``examples/train_long_tailed.py`` is a thin command line over :func:`main`. One
experiment trains the same model on the same long-tailed data with each listed
optimizer and seed, evaluates the *last* epoch on the balanced test set (no model
selection on the test set), and writes to ``--out``:

* ``results.json``: ``{"runs": [...], "summary": {...}}``, one run per (optimizer,
  seed) with ``overall``, ``many``, ``medium``, ``few`` (fractions in [0, 1];
  a split without classes is ``null``), ``per_class``, ``train_counts`` and the
  resolved ``config``;
* ``per_class_accuracy.png``: per-class test accuracy against training-sample
  count, one line per optimizer (mean over seeds);
* ``checkpoints/<optimizer>_seed<S>/``: Orbax checkpoints of every epoch (the
  last two kept), which ``resume=True`` continues from. A checkpoint records
  the options it was made with and is only resumed with the same ones (the
  number of epochs included: it shapes the learning-rate schedule); without
  ``resume`` a run deletes its old checkpoints and starts over.

The three optimizers share everything but the update rule: SGD with momentum,
coupled weight decay and a cosine or step schedule (``"sgd"``); the same inside
:func:`optax.contrib.sam` in opaque mode (``"sam"``, perturbation ``rho g/||g||``
of the full-batch gradient); the same inside :func:`imbsam_jax.imbsam`
(``"imbsam"``, the same ``rho`` aimed at the classes with fewer than ``eta``
training images). Each combines with a long-tail loss (``loss="logit-adjust"`` or
``"balanced-softmax"``, :func:`logit_adjusted_cross_entropy`).

Data parallelism: every global batch is split over all devices (or the first
``devices``) with :func:`~imbsam_jax.recipes.training.shard_batch`, the train state
is replicated, and the one jitted step runs unchanged on one CPU, one GPU or
several devices. ``batch_size`` is the global batch size and must be divisible by
the device count.

Determinism: the model initialisation, data order and augmentation are functions
of the seed (and epoch and step) only, so a run gives the same numbers every time
on the same hardware, and a resumed run gives those of an uninterrupted one.

Evaluation uses the model in eval mode (BatchNorm running statistics) on padded,
fixed-shape batches and no test-time augmentation. (The ImbSAM reference code
averages the predictions of each test image and its horizontal flip; the numbers
here are single-view, so they are not directly comparable with its tables.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import imbsam_jax
from imbsam_jax.recipes import arguments, plots, training
from imbsam_jax.recipes import data as data_lib
from imbsam_jax.recipes import metrics as metrics_lib
from imbsam_jax.recipes import models as models_lib
from imbsam_jax.recipes.checkpoints import Checkpointer

LOSSES = ("ce", "logit-adjust", "balanced-softmax")
SCHEDULES = ("cosine", "step")
AUGMENTATIONS = ("auto", "crop-flip", "none")
SPLITS = ("many", "medium", "few")
#: The :func:`~imbsam_jax.recipes.models.create_model` names that are classifiers.
CLASSIFIERS = tuple(n for n in models_lib.MODEL_NAMES if n != "deep_sad")

#: Files written into the output directory.
RESULTS_FILE = "results.json"
PLOT_FILE = "per_class_accuracy.png"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Per-dataset defaults of the options left unset (``None``) in :class:`Config`.

  Attributes:
    model: :func:`~imbsam_jax.recipes.models.create_model` name.
    epochs: training epochs.
    batch_size: global batch size.
    lr: peak learning rate.
    weight_decay: coupled (L2) weight decay.
    schedule: ``"cosine"`` or ``"step"``.
    warmup_epochs: linear learning-rate warm-up from 0.
    many_threshold: a class with more training images is in the Many split.
    few_threshold: a class with fewer training images is in the Few split.
  """

  model: str
  epochs: int
  batch_size: int
  lr: float
  weight_decay: float
  schedule: str
  warmup_epochs: int
  many_threshold: int
  few_threshold: int


#: The long-tailed CIFAR recipe of the wider literature (LDAM-DRW and after):
#: ResNet-32, batch 128, lr 0.1, weight decay 2e-4, 200 epochs, 5 warm-up
#: epochs, here with a cosine schedule; Many > 100 / Few < 20 training images.
#: Also the default for ``folder:``, ``npz:`` and the other TFDS datasets.
CIFAR_RECIPE = Recipe(
  model="resnet32",
  epochs=200,
  batch_size=128,
  lr=0.1,
  weight_decay=2e-4,
  schedule="cosine",
  warmup_epochs=5,
  many_threshold=metrics_lib.MANY_THRESHOLD,
  few_threshold=metrics_lib.FEW_THRESHOLD,
)

#: The embedded default, ``digits-lt`` (291 training images, counts 119, 71, 42,
#: 25, 15, 9, 5, 3, 1, 1 at imbalance 100): the small CNN, 30 epochs of batch 32
#: (9 steps each), lr 0.05 cosine, weight decay 5e-4. No class has more than 100
#: images, so the splits are Many > 50 (2 classes), Medium 20..50 (2 classes) and
#: Few < 20 (6 classes: the ImbSAM tail at the default eta = 20).
DIGITS_RECIPE = Recipe(
  model="small_cnn",
  epochs=30,
  batch_size=32,
  lr=0.05,
  weight_decay=5e-4,
  schedule="cosine",
  warmup_epochs=0,
  many_threshold=50,
  few_threshold=20,
)


def default_recipe(dataset: str) -> Recipe:
  """The :class:`Recipe` used for the unset options of ``dataset`` (a spec)."""
  return DIGITS_RECIPE if dataset in ("digits", "digits-lt") else CIFAR_RECIPE


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything an experiment needs; ``None`` means the dataset's default.

  Attributes:
    dataset: a :func:`~imbsam_jax.recipes.data.load_dataset` spec.
    optimizers: methods to compare, from ``("sgd", "sam", "imbsam")``.
    seeds: one run per optimizer and seed.
    data_dir: TFDS data directory.
    imbalance_ratio: long-tail profile of the training set (1 keeps it as is;
      ``None``: 100 for ``-lt`` specs, else 1).
    model: model name (default from :func:`default_recipe`).
    norm: ``"batch"``, ``"group"`` or ``"none"`` (default: the model's own).
    epochs: training epochs.
    batch_size: global batch size, divisible by the number of devices.
    eval_batch_size: global evaluation batch size (rounded up to a multiple of
      the device count, capped at the test set size).
    lr: peak learning rate.
    momentum: SGD momentum.
    weight_decay: coupled weight decay (added to the gradient, as in PyTorch).
    schedule: ``"cosine"`` (to 0) or ``"step"`` (x0.1 at 80% and 90% of the steps).
    warmup_epochs: linear warm-up epochs.
    rho: perturbation radius of SAM and ImbSAM.
    eta: ImbSAM's tail: classes with fewer than ``eta`` training images.
    tail_loss_scale: weight of ImbSAM's perturbed tail loss (the reference code
      uses 2 since a change made after publication; the paper 1).
    tail_capacity: ImbSAM's fast path (``int`` or ``"auto"`` for
      :func:`imbsam_jax.suggest_tail_capacity`); ``None``: the exact one-forward
      path. Meant for models without BatchNorm (``norm="group"`` or ``"none"``).
    loss: ``"ce"``, ``"logit-adjust"`` (logits + ``tau`` log prior at train
      time) or ``"balanced-softmax"`` (the same with ``tau = 1``).
    tau: logit-adjustment strength (only for ``"logit-adjust"``).
    augment: ``"crop-flip"`` (pad 4, random crop, horizontal flip), ``"none"``,
      or ``"auto"``: crop-flip for 32x32 images, none otherwise.
    many_threshold: Many split: more training images than this.
    few_threshold: Few split: fewer training images than this.
    devices: use the first ``devices`` devices (default: all).
    out: output directory.
    resume: continue each run from its newest checkpoint.
    checkpoint_every: save a checkpoint every this many epochs (and after the
      last); 0 disables checkpoints.
    progress: show progress bars.
  """

  dataset: str = "digits-lt"
  optimizers: tuple[str, ...] = training.METHODS
  seeds: tuple[int, ...] = (0,)
  data_dir: str | None = None
  imbalance_ratio: float | None = None
  model: str | None = None
  norm: str | None = None
  epochs: int | None = None
  batch_size: int | None = None
  eval_batch_size: int = 500
  lr: float | None = None
  momentum: float = 0.9
  weight_decay: float | None = None
  schedule: str | None = None
  warmup_epochs: int | None = None
  rho: float = 0.05
  eta: float = 20
  tail_loss_scale: float = 1.0
  tail_capacity: int | str | None = None
  loss: str = "ce"
  tau: float = 1.0
  augment: str = "auto"
  many_threshold: int | None = None
  few_threshold: int | None = None
  devices: int | None = None
  out: str = "runs/long_tailed"
  resume: bool = False
  checkpoint_every: int = 1
  progress: bool = True

  def resolved(self) -> Config:
    """A copy with the recipe's unset options filled in and checked."""
    recipe = default_recipe(self.dataset)
    filled = {
      f.name: getattr(recipe, f.name)
      for f in dataclasses.fields(Recipe)
      if getattr(self, f.name) is None
    }
    config = dataclasses.replace(self, **filled)
    config._check()
    return config

  def _check(self) -> None:
    for method in self.optimizers:
      if method not in training.METHODS:
        raise ValueError(
          f"Unknown optimizer {method!r}; choose from {', '.join(training.METHODS)}."
        )
    if not self.optimizers or not self.seeds:
      raise ValueError("Need at least one optimizer and one seed.")
    if len(set(self.optimizers)) != len(self.optimizers):
      raise ValueError(f"Repeated optimizer in {self.optimizers}.")
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"Repeated seed in {self.seeds}.")
    choices = {"loss": LOSSES, "schedule": SCHEDULES, "augment": AUGMENTATIONS}
    for name, valid in choices.items():
      if getattr(self, name) not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}.")
    if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
      raise ValueError("epochs, batch_size and eval_batch_size must be positive.")
    if self.rho < 0:
      raise ValueError(f"rho must be non-negative, got {self.rho}.")
    if isinstance(self.tail_capacity, str) and self.tail_capacity != "auto":
      raise ValueError(
        f"tail_capacity must be an int or 'auto', got {self.tail_capacity!r}."
      )
    if self.checkpoint_every < 0:
      raise ValueError("checkpoint_every must be >= 0.")

  @property
  def effective_tau(self) -> float:
    """The logit-adjustment strength the loss uses (0 for plain cross-entropy)."""
    return {"ce": 0.0, "logit-adjust": self.tau, "balanced-softmax": 1.0}[self.loss]


# ------------------------------------------------------------------- losses


def logit_adjusted_cross_entropy(
  logits: jax.Array, labels: jax.Array, log_prior: jax.Array, tau: float = 1.0
) -> jax.Array:
  """Per-example logit-adjusted softmax cross-entropy (Menon et al., 2021).

  .. math::
    \\ell(x, y) = -\\log \\frac{e^{f_y(x) + \\tau \\log \\pi_y}}
    {\\sum_c e^{f_c(x) + \\tau \\log \\pi_c}}

  with ``pi`` the training-set class prior. ``tau = 0`` is plain cross-entropy,
  ``tau = 1`` the balanced softmax (Ren et al., 2020). Predict with the raw
  logits ``argmax f(x)``: the adjustment is for training only.

  Args:
    logits: ``(B, C)`` raw model outputs.
    labels: ``(B,)`` integer labels.
    log_prior: ``(C,)`` log class prior ``log pi_c`` (finite).
    tau: adjustment strength.

  Returns:
    ``(B,)`` losses.

  Example:
    >>> import jax.numpy as jnp
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


# ------------------------------------------------------------ optimization


def learning_rate_schedule(
  lr: float, schedule: str, total_steps: int, warmup_steps: int = 0
) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 or steps of x0.1.

  The step schedule decays at 80% and 90% of ``total_steps`` (160 and 180 of
  200 epochs, as in LDAM-DRW).

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
    main = optax.piecewise_constant_schedule(
      lr, {round(0.8 * main_steps): 0.1, round(0.9 * main_steps): 0.1}
    )
  else:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def base_optimizer(config: Config, total_steps: int, steps_per_epoch: int):
  """SGD with momentum, coupled weight decay and the learning-rate schedule."""
  schedule = learning_rate_schedule(
    config.lr, config.schedule, total_steps, config.warmup_epochs * steps_per_epoch
  )
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(schedule, momentum=config.momentum),
  )


# ---------------------------------------------------------------- metrics


def classification_report(
  predictions: Any,
  labels: Any,
  train_counts: Any,
  *,
  many_threshold: int = metrics_lib.MANY_THRESHOLD,
  few_threshold: int = metrics_lib.FEW_THRESHOLD,
) -> dict[str, Any]:
  """Overall, Many/Medium/Few and per-class test accuracy, JSON-ready.

  Args:
    predictions: ``(N,)`` predicted classes or ``(N, C)`` logits.
    labels: ``(N,)`` true classes.
    train_counts: ``(C,)`` training images per class (defines the splits).
    many_threshold: Many: more training images than this.
    few_threshold: Few: fewer training images than this.

  Returns:
    ``{"overall", "many", "medium", "few", "per_class", "test_counts",
    "split_classes"}``: accuracies in [0, 1]; a split without classes, or a
    class without test images, is ``None``; ``split_classes`` lists each
    split's class indices.

  Example:
    >>> r = classification_report([0, 0, 1, 1, 2, 0], [0, 0, 1, 2, 2, 2],
    ...                           [200, 50, 5])
    >>> r["overall"], r["many"], r["medium"], r["few"]
    (0.666..., 1.0, 1.0, 0.333...)
  """
  counts = np.asarray(train_counts)
  per_class = metrics_lib.per_class_accuracy(predictions, labels, len(counts))
  splits = metrics_lib.split_accuracy(
    per_class, counts, many_threshold=many_threshold, few_threshold=few_threshold
  )
  masks = metrics_lib.class_splits(
    counts, many_threshold=many_threshold, few_threshold=few_threshold
  )
  return {
    "overall": metrics_lib.accuracy(predictions, labels),
    **splits,
    "per_class": [None if math.isnan(a) else float(a) for a in per_class],
    "test_counts": data_lib.class_counts(labels, len(counts)).tolist(),
    "split_classes": {k: np.flatnonzero(m).tolist() for k, m in masks.items()},
  }


# -------------------------------------------------------------- one run


@dataclasses.dataclass
class Experiment:
  """What the runs of one experiment share: data, devices, derived settings.

  Attributes:
    config: the resolved configuration.
    dataset: the loaded (long-tailed) data.
    train_counts: ``(C,)`` training images per class.
    mesh: the data-parallel device mesh.
    mean: per-channel mean of the training images (after ``to_float``).
    std: per-channel standard deviation.
    augment: whether crop-flip augmentation is used.
    tail_capacity: ImbSAM's resolved ``tail_capacity`` (``None``: exact path).
    steps_per_epoch: training steps per epoch.
    eval_batch_size: the resolved global evaluation batch size.
  """

  config: Config
  dataset: data_lib.Dataset
  train_counts: np.ndarray
  mesh: Mesh
  mean: np.ndarray
  std: np.ndarray
  augment: bool
  tail_capacity: int | None
  steps_per_epoch: int
  eval_batch_size: int

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def describe(self) -> dict[str, Any]:
    """The resolved configuration and derived facts, for ``results.json``."""
    ds = self.dataset
    return {
      **dataclasses.asdict(self.config),
      "dataset_name": ds.name,
      "imbalance_ratio": ds.imbalance_ratio,
      "num_classes": ds.num_classes,
      "class_names": list(ds.class_names),
      "num_train": len(ds.y_train),
      "num_test": len(ds.y_test),
      "image_shape": list(ds.x_train.shape[1:]),
      "tail_classes": np.flatnonzero(
        imbsam_jax.tail_classes(self.train_counts, self.config.eta)
      ).tolist(),
      "tau_used": self.config.effective_tau,
      "augment_used": "crop-flip" if self.augment else "none",
      "tail_capacity_used": self.tail_capacity,
      "steps_per_epoch": self.steps_per_epoch,
      "eval_batch_size_used": self.eval_batch_size,
      "num_devices": self.num_devices,
      "platform": self.mesh.devices.flat[0].platform,
    }


def check_batch_size(batch_size: int, num_devices: int, num_train: int) -> None:
  """Raises a ValueError unless ``batch_size`` splits over the devices and data."""
  if batch_size % num_devices:
    raise ValueError(
      f"--batch-size {batch_size} (the global batch) must be divisible by the"
      f" {num_devices} devices; use a multiple of {num_devices} or --devices."
    )
  if batch_size > num_train:
    raise ValueError(
      f"--batch-size {batch_size} exceeds the {num_train} training images."
    )


def prepare(config: Config, dataset: data_lib.Dataset | None = None) -> Experiment:
  """Loads the data and sets up the devices for a resolved ``config``."""
  if dataset is None:
    dataset = data_lib.load_dataset(
      config.dataset, data_dir=config.data_dir, imbalance_ratio=config.imbalance_ratio
    )
  devices = jax.devices()
  if config.devices is not None:
    if not 1 <= config.devices <= len(devices):
      raise ValueError(f"--devices {config.devices}: there are {len(devices)} devices.")
    devices = devices[: config.devices]
  mesh = training.data_parallel_mesh(devices)
  num_devices = len(devices)
  n_train = len(dataset.y_train)
  check_batch_size(config.batch_size, num_devices, n_train)
  train_counts = data_lib.class_counts(dataset.y_train, dataset.num_classes)
  x = data_lib.to_float(dataset.x_train)
  mean = x.mean(axis=(0, 1, 2))
  std = np.maximum(x.std(axis=(0, 1, 2)), 1e-6)
  height, width = dataset.x_train.shape[1:3]
  augment = config.augment == "crop-flip" or (
    config.augment == "auto" and (height, width) == (32, 32)
  )
  tail_capacity = config.tail_capacity
  if tail_capacity == "auto":
    tail_capacity = imbsam_jax.suggest_tail_capacity(
      train_counts, config.eta, config.batch_size
    )
  eval_batch = min(config.eval_batch_size, len(dataset.y_test))
  eval_batch = num_devices * -(-eval_batch // num_devices)
  return Experiment(
    config=config,
    dataset=dataset,
    train_counts=train_counts,
    mesh=mesh,
    mean=mean.astype(np.float32),
    std=std.astype(np.float32),
    augment=augment,
    tail_capacity=None if tail_capacity is None else int(tail_capacity),
    steps_per_epoch=data_lib.steps_per_epoch(n_train, config.batch_size),
    eval_batch_size=eval_batch,
  )


def _fingerprint(exp: Experiment, optimizer: str, seed: int) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed (not output or devices)."""
  skip = {"optimizers", "seeds", "out", "resume", "progress", "devices"}
  skip |= {"checkpoint_every", "eval_batch_size"}
  config = {k: v for k, v in dataclasses.asdict(exp.config).items() if k not in skip}
  config = json.loads(json.dumps(config))  # tuples -> lists, as restored
  return {
    **config,
    "optimizer": optimizer,
    "seed": seed,
    "train_counts": exp.train_counts.tolist(),
  }


def _to_host(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-process) array as one NumPy array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class RunSteps(NamedTuple):
  """The initial state and the two jitted functions of one run.

  Attributes:
    state: the replicated :class:`~imbsam_jax.recipes.training.TrainState`.
    train_step: ``(state, batch, key) -> (state, metrics)``; ``batch`` is
      ``{"image": uint8 or float images, "label": int32}``, sharded over the
      batch axis; preprocessing and augmentation run inside.
    eval_step: ``(params, model_state, images) -> predicted classes``, the
      model in eval mode.
    eval_graphdef: the model's graph in eval mode (BatchNorm running
      statistics), for ``nnx.merge(eval_graphdef, params, model_state)``.
  """

  state: training.TrainState
  train_step: Any
  eval_step: Any
  eval_graphdef: nnx.GraphDef


def build_run(exp: Experiment, optimizer: str, seed: int) -> RunSteps:
  """Model, optimizer and jitted steps of one (optimizer, seed) run.

  The model initialisation depends on the seed only, so every optimizer of a
  seed starts from the same weights.
  """
  config, ds, mesh = exp.config, exp.dataset, exp.mesh
  mean, std = jnp.asarray(exp.mean), jnp.asarray(exp.std)
  log_prior = jnp.asarray(log_class_prior(exp.train_counts))
  tau = config.effective_tau
  tail_mask_fn = imbsam_jax.tail_mask_from_counts(exp.train_counts, config.eta)

  model = models_lib.create_model(
    config.model,
    num_classes=ds.num_classes,
    input_shape=ds.x_train.shape[1:],
    rngs=nnx.Rngs(seed),
    norm=config.norm,
  )
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  model.train()

  steps = exp.steps_per_epoch
  base_tx = base_optimizer(config, config.epochs * steps, steps)
  imbsam_kwargs: dict[str, Any] = {}
  if optimizer == "imbsam":
    imbsam_kwargs["tail_loss_scale"] = config.tail_loss_scale
    if exp.tail_capacity is not None:
      imbsam_kwargs["tail_capacity"] = exp.tail_capacity
      if jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
        warnings.warn(
          "tail_capacity with BatchNorm: ImbSAM's tail passes normalize with"
          " the statistics of the tail examples alone; use --norm group|none"
          " for the fast path, or leave --tail-capacity out.",
          stacklevel=2,
        )
  tx = training.make_optimizer(
    optimizer, base_tx, rho=config.rho, tail_mask_fn=tail_mask_fn, **imbsam_kwargs
  )
  graphdef, state = training.init_train_state(model, tx)

  def normalize(images: jax.Array) -> jax.Array:
    return (images - mean) / std

  def preprocess(key: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
    images = data_lib.to_float(batch["image"])
    if exp.augment:  # zero padding before normalisation, as torchvision's
      images = training.random_crop_flip(key, images)
    return {**batch, "image": normalize(images)}

  def per_example_loss(model: nnx.Module, batch: dict[str, jax.Array]):
    logits = model(batch["image"])
    losses = logit_adjusted_cross_entropy(logits, batch["label"], log_prior, tau)
    correct = jnp.argmax(logits, -1) == batch["label"]
    return losses, {"accuracy": jnp.mean(correct.astype(jnp.float32))}

  step_fn = training.make_train_step(
    graphdef,
    per_example_loss,
    optimizer,
    tx,
    # The one-forward exact path; the fast path gathers the tail itself.
    tail_mask_fn=tail_mask_fn if exp.tail_capacity is None else None,
    augment=preprocess,
  )

  def eval_fn(params, model_state, images):
    model = nnx.merge(eval_graphdef, params, model_state)
    logits = model(normalize(data_lib.to_float(images)))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  # Fixed output shardings: the state stays replicated, so no step recompiles.
  replicated = NamedSharding(mesh, PartitionSpec())
  return RunSteps(
    state=training.replicate(state, mesh),
    train_step=jax.jit(step_fn, out_shardings=replicated),
    eval_step=jax.jit(
      eval_fn, out_shardings=NamedSharding(mesh, PartitionSpec("data"))
    ),
    eval_graphdef=eval_graphdef,
  )


def train_epoch(
  exp: Experiment,
  train_step: Any,
  state: training.TrainState,
  *,
  seed: int,
  epoch: int,
  bar: Any = None,
) -> tuple[training.TrainState, dict[str, float]]:
  """One epoch of training; returns the state and the epoch's mean metrics.

  The data order is ``(seed, epoch)``'s permutation and the augmentation key of
  step ``s`` is ``fold_in(fold_in(key(seed), 1), s)``: nothing else is random.
  """
  ds, steps = exp.dataset, exp.steps_per_epoch
  aug_key = jax.random.fold_in(jax.random.key(seed), 1)
  batches = data_lib.iterate_batches(
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
    key = jax.random.fold_in(aug_key, epoch * steps + i)
    state, metrics = train_step(state, batch, key)
    for k, v in metrics.items():
      sums[k] = sums[k] + v if k in sums else v
    if bar is not None:
      bar.update(1)
      if (i + 1) % max(1, steps // 4) == 0 or i + 1 == steps:
        bar.set_postfix(
          {
            "epoch": epoch + 1,
            "loss": f"{float(sums['loss']) / (i + 1):.3f}",
            "acc": f"{float(sums['accuracy']) / (i + 1):.3f}",
          }
        )
  return state, {k: float(v) / steps for k, v in sums.items()}


def predict(exp: Experiment, eval_step: Any, state: training.TrainState) -> np.ndarray:
  """Predicted classes of the whole test set, in order (fixed-shape batches)."""
  ds = exp.dataset
  predictions = []
  for x, _, _ in data_lib.iterate_eval_batches(
    ds.x_test,
    ds.y_test,
    exp.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    images = training.shard_batch(x, exp.mesh)
    predictions.append(_to_host(eval_step(state.params, state.model_state, images)))
  # The padding sits at the end of the last global batch, so the first
  # len(y_test) global predictions are the test set in order.
  return np.concatenate(predictions)[: len(ds.y_test)]


def train_and_evaluate(
  exp: Experiment,
  optimizer: str,
  seed: int,
  *,
  on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  """Trains one (optimizer, seed) run and evaluates its last epoch.

  With ``exp.config.resume`` the run continues from its newest checkpoint (a
  finished run is only evaluated again); otherwise its old checkpoints are
  deleted first.

  Args:
    exp: from :func:`prepare`.
    optimizer: ``"sgd"``, ``"sam"`` or ``"imbsam"``.
    seed: seeds the initialisation, data order and augmentation.
    on_epoch_end: called as ``on_epoch_end(epoch, epoch_metrics)`` after each
      epoch's checkpoint (``epoch`` counts completed epochs).

  Returns:
    The run's entry of ``results.json`` (see :func:`run_experiment`).
  """
  config = exp.config
  run = build_run(exp, optimizer, seed)
  state, history, start_epoch = run.state, {}, 0
  name = f"{optimizer}_seed{seed}"
  fingerprint = _fingerprint(exp, optimizer, seed)
  checkpointer = None
  if config.checkpoint_every:
    checkpointer = Checkpointer(
      Path(config.out) / CHECKPOINT_DIR / name, fresh=not config.resume
    )
    if config.resume and checkpointer.latest_epoch() is not None:
      state, meta = checkpointer.restore(state)
      _check_fingerprint(meta["fingerprint"], fingerprint, checkpointer.directory)
      start_epoch, history = int(meta["epoch"]), meta["history"]

  bar = None
  if config.progress and start_epoch < config.epochs and jax.process_index() == 0:
    from tqdm.auto import tqdm

    steps = exp.steps_per_epoch
    bar = tqdm(
      total=config.epochs * steps,
      initial=start_epoch * steps,
      desc=f"{name:>14}",
      unit="step",
      dynamic_ncols=True,
    )
  started = time.perf_counter()
  try:
    for epoch in range(start_epoch, config.epochs):
      state, metrics = train_epoch(
        exp, run.train_step, state, seed=seed, epoch=epoch, bar=bar
      )
      for k, v in metrics.items():
        history.setdefault(f"train_{k}", []).append(v)
      done = epoch + 1
      if checkpointer is not None and (
        done % config.checkpoint_every == 0 or done == config.epochs
      ):
        meta = {"fingerprint": fingerprint, "history": history}
        checkpointer.save(done, state, meta)
      if on_epoch_end is not None:
        on_epoch_end(done, metrics)
  finally:
    if bar is not None:
      bar.close()
    if checkpointer is not None:
      checkpointer.close()
  jax.block_until_ready(state)
  train_time = time.perf_counter() - started

  report = classification_report(
    predict(exp, run.eval_step, state),
    exp.dataset.y_test,
    exp.train_counts,
    many_threshold=config.many_threshold,
    few_threshold=config.few_threshold,
  )
  return {
    "optimizer": optimizer,
    "seed": seed,
    **report,
    "train_counts": exp.train_counts.tolist(),
    "history": history,
    "epochs_trained_now": config.epochs - start_epoch,
    "resumed_from_epoch": start_epoch,
    "train_time_s": round(train_time, 3),
    "compiles": {
      "train_step": run.train_step._cache_size(),
      "eval_step": run.eval_step._cache_size(),
    },
    "config": exp.describe(),
  }


def _check_fingerprint(saved: dict, current: dict, where: Path) -> None:
  """Refuses to resume a checkpoint made with a different configuration."""
  differ = sorted(
    k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)
  )
  if differ:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
    raise ValueError(
      f"Cannot resume from {where}: it was made with a different configuration"
      f" ({details}). Use the original options, another --out, or drop --resume"
      " to start over."
    )


# ------------------------------------------------------------- experiment


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Mean and standard deviation over seeds of each optimizer's accuracies.

  Returns:
    ``{optimizer: {"seeds": [...], "overall": {"mean", "std"}, "many": ...,
    "per_class_mean": [...]}}``; a metric that is ``None`` in a run is left
    out of the mean (``None`` if it is ``None`` in all); ``std`` is the
    population standard deviation (0 for one seed).
  """
  summary: dict[str, Any] = {}
  for optimizer in dict.fromkeys(r["optimizer"] for r in runs):
    mine = [r for r in runs if r["optimizer"] == optimizer]
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
    for key in ("overall", *SPLITS):
      values = [r[key] for r in mine if r[key] is not None]
      entry[key] = (
        {"mean": float(np.mean(values)), "std": float(np.std(values))}
        if values
        else None
      )
    per_class = np.array(
      [[np.nan if a is None else a for a in r["per_class"]] for r in mine]
    )
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      means = np.nanmean(per_class, axis=0)
    entry["per_class_mean"] = [None if np.isnan(a) else float(a) for a in means]
    summary[optimizer] = entry
  return summary


def format_table(runs: Sequence[dict[str, Any]]) -> str:
  """The Many/Medium/Few/Overall table of all runs (top-1 %), plus means.

  One row per run; with several seeds, one more row per optimizer with the mean
  and standard deviation over its seeds. Column headers give each split's
  number of classes; ``-`` marks an empty split.
  """
  if not runs:
    return "(no runs)"
  first = runs[0]
  sizes = {k: len(first["split_classes"][k]) for k in SPLITS}
  config = first["config"]
  headers = [f"{k.capitalize()} ({sizes[k]})" for k in SPLITS] + ["Overall"]
  cell = lambda v: "-" if v is None else f"{100 * v:.1f}"
  lines = [
    f"Test top-1 accuracy (%), last epoch: {config['dataset_name']}"
    f" ({config['num_train']} train / {config['num_test']} test images,"
    f" {config['num_classes']} classes); (n) = classes per split"
    f" (Many > {config['many_threshold']}, Few < {config['few_threshold']}"
    " training images)",
    f"{'optimizer':<10} {'seed':>6} " + " ".join(f"{h:>12}" for h in headers),
  ]
  for r in runs:
    values = [r[k] for k in (*SPLITS, "overall")]
    lines.append(
      f"{r['optimizer']:<10} {r['seed']:>6} "
      + " ".join(f"{cell(v):>12}" for v in values)
    )
  summary = summarize(runs)
  if any(len(s["seeds"]) > 1 for s in summary.values()):
    lines.append("mean ± std over seeds:")
    for optimizer, s in summary.items():
      values = [s[k] for k in (*SPLITS, "overall")]
      fmt = lambda v: (
        "-" if v is None else f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
      )
      lines.append(
        f"{optimizer:<10} {len(s['seeds']):>5}x "
        + " ".join(f"{fmt(v):>12}" for v in values)
      )
  return "\n".join(lines)


def plot_results(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
  """Per-class accuracy vs training count, one line per optimizer (seed mean)."""
  config = runs[0]["config"]
  per_class = {}
  for optimizer in dict.fromkeys(r["optimizer"] for r in runs):
    per_class[optimizer] = np.array(
      [
        [np.nan if a is None else a for a in r["per_class"]]
        for r in runs
        if r["optimizer"] == optimizer
      ]
    )
  seeds = sorted({r["seed"] for r in runs})
  return plots.plot_per_class_accuracy(
    runs[0]["train_counts"],
    per_class,
    path,
    thresholds={
      f"Few < {config['few_threshold']}": config["few_threshold"],
      f"Many > {config['many_threshold']}": config["many_threshold"],
    },
    title=(
      f"{config['dataset_name']}, {config['model']}, {config['epochs']} epochs,"
      f" rho {config['rho']:g}, eta {config['eta']:g}, loss {config['loss']};"
      f" seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    ),
  )


def write_results(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
  """Writes ``{"runs": runs, "summary": summarize(runs)}`` as strict JSON."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  with open(tmp, "w") as f:
    json.dump(
      {"runs": list(runs), "summary": summarize(runs)}, f, indent=1, allow_nan=False
    )
  tmp.replace(path)
  return path


def run_experiment(
  config: Config,
  *,
  dataset: data_lib.Dataset | None = None,
  on_epoch_end: Callable[[str, int, int, dict[str, Any]], None] | None = None,
  log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Runs every (seed, optimizer) of ``config``; writes results and the plot.

  ``results.json`` is rewritten after each run, so finished runs survive an
  interruption; ``resume=True`` continues the others from their checkpoints.

  Args:
    config: the experiment (unset options are filled by :meth:`Config.resolved`).
    dataset: already loaded data to use instead of ``config.dataset``.
    on_epoch_end: called as ``(optimizer, seed, epoch, epoch_metrics)`` after
      each epoch (and its checkpoint).
    log: where the summary lines and the table go (``None``: nowhere).

  Returns:
    The ``results.json`` content: ``{"runs": [...], "summary": {...}}``.
  """
  config = config.resolved()
  is_main = jax.process_index() == 0  # one writer in multi-process runs
  log = (log if is_main else None) or (lambda _: None)
  exp = prepare(config, dataset)
  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)
  ds, counts = exp.dataset, exp.train_counts
  tail = imbsam_jax.tail_classes(counts, config.eta)
  log(
    f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images,"
    f" {ds.num_classes} classes, imbalance ratio {ds.imbalance_ratio:g};"
    f" train counts {counts.tolist()}"
  )
  log(
    f"ImbSAM tail (fewer than eta={config.eta:g} images): {int(tail.sum())} classes,"
    f" {counts[tail].sum() / counts.sum():.1%} of the training images;"
    f" {config.model} (norm: {config.norm or 'model default'}),"
    f" {config.epochs} epochs x {exp.steps_per_epoch} steps of"
    f" {config.batch_size} on {exp.num_devices}"
    f" {exp.mesh.devices.flat[0].platform} device(s)"
  )
  if "imbsam" in config.optimizers and not tail.any():
    warnings.warn(
      f"No class has fewer than eta={config.eta:g} training images: ImbSAM is"
      " plain SGD here. Lower --eta or raise --imbalance-ratio.",
      stacklevel=2,
    )
  runs: list[dict[str, Any]] = []
  for seed in config.seeds:
    for optimizer in config.optimizers:
      callback = None
      if on_epoch_end is not None:
        callback = lambda e, m, o=optimizer, s=seed: on_epoch_end(o, s, e, m)
      run = train_and_evaluate(exp, optimizer, seed, on_epoch_end=callback)
      runs.append(run)
      if is_main:
        write_results(runs, out / RESULTS_FILE)
      if not config.progress:
        log(
          f"{optimizer} seed {seed}: {run['epochs_trained_now']} epochs in"
          f" {run['train_time_s']:.1f} s, overall {run['overall']:.3f}"
        )
  log("")
  log(format_table(runs))
  if is_main:
    plot = plot_results(runs, out / PLOT_FILE)
    log(f"\nWrote {out / RESULTS_FILE} and {plot}")
  # As written to results.json (tuples become lists).
  return json.loads(json.dumps({"runs": runs, "summary": summarize(runs)}))


# ------------------------------------------------------------ command line


def _capacity(text: str) -> int | str:
  if text == "auto":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected an integer or 'auto': {text!r}"
    ) from None


def build_parser() -> argparse.ArgumentParser:
  """The command line of ``examples/train_long_tailed.py``."""
  d = Config()
  c, g = CIFAR_RECIPE, DIGITS_RECIPE

  def recipe(field: str) -> str:
    digits, cifar = getattr(g, field), getattr(c, field)
    if digits == cifar:
      return f"default: {digits}"
    return f"default: {digits} for digits(-lt), {cifar} otherwise"

  p = argparse.ArgumentParser(
    description=(
      "Train a classifier on long-tailed data with SGD, SAM and ImbSAM and"
      " compare their Many/Medium/Few test accuracy. Writes OUT/results.json,"
      " OUT/per_class_accuracy.png and OUT/checkpoints/."
    ),
    formatter_class=arguments.HelpFormatter,
  )
  a = p.add_argument
  a(
    "--dataset",
    default=d.dataset,
    help=(
      "digits-lt (embedded, offline), cifar10-lt, cifar100-lt (TFDS), any of"
      f" {', '.join(data_lib.valid_specs())}"
    ),
  )
  a("--data-dir", default=None, help="TFDS data directory")
  a(
    "--imbalance-ratio",
    type=float,
    default=None,
    help=(
      "n_max/n_min of the exponential profile of the training set (default 100"
      " for -lt specs, else 1 = as is)"
    ),
  )
  a(
    "--optimizer",
    type=arguments.str_list,
    default=",".join(d.optimizers),
    help="comma-separated: sgd,sam,imbsam",
  )
  a("--seed", type=int, default=None, help="one seed (default 0)")
  a(
    "--seeds",
    type=arguments.int_list,
    default=None,
    help="several seeds, e.g. 0,1,2 (with --seed: both)",
  )
  a("--epochs", type=int, default=None, help=recipe("epochs"))
  a(
    "--batch-size",
    type=int,
    default=None,
    help=f"global batch, divisible by the device count; {recipe('batch_size')}",
  )
  a(
    "--eval-batch-size",
    type=int,
    default=d.eval_batch_size,
    help="global test batch (padded, fixed shape)",
  )
  a("--lr", type=float, default=None, help=f"peak learning rate; {recipe('lr')}")
  a("--momentum", type=float, default=d.momentum, help="SGD momentum")
  a("--weight-decay", type=float, default=None, help=recipe("weight_decay"))
  a(
    "--schedule",
    choices=SCHEDULES,
    default=None,
    help=f"step: x0.1 at 80%% and 90%%; {recipe('schedule')}",
  )
  a("--warmup-epochs", type=int, default=None, help=recipe("warmup_epochs"))
  a("--model", choices=CLASSIFIERS, default=None, help=recipe("model"))
  a(
    "--norm",
    choices=("batch", "group", "none"),
    default=None,
    help="normalisation layers (default: the model's)",
  )
  a("--rho", type=float, default=d.rho, help="SAM / ImbSAM perturbation radius")
  a(
    "--eta",
    type=float,
    default=d.eta,
    help="ImbSAM tail: classes with fewer training images",
  )
  a(
    "--tail-loss-scale",
    type=float,
    default=d.tail_loss_scale,
    help="ImbSAM's weight of the perturbed tail loss (reference code: 2)",
  )
  a(
    "--tail-capacity",
    type=_capacity,
    default=None,
    help=(
      "ImbSAM fast path: tail examples per pass (int or auto); for models"
      " without BatchNorm (--norm group|none)"
    ),
  )
  a(
    "--loss",
    choices=LOSSES,
    default=d.loss,
    help="balanced-softmax = logit-adjust with tau 1",
  )
  a("--tau", type=float, default=d.tau, help="logit-adjust strength")
  a(
    "--augment",
    choices=AUGMENTATIONS,
    default=d.augment,
    help="auto: crop-flip for 32x32 images",
  )
  a(
    "--many-threshold",
    type=int,
    default=None,
    help=f"Many: more training images than this; {recipe('many_threshold')}",
  )
  a(
    "--few-threshold",
    type=int,
    default=None,
    help=f"Few: fewer training images than this; {recipe('few_threshold')}",
  )
  a("--devices", type=int, default=None, help="use the first N devices (default: all)")
  a("--out", default=d.out, help="output directory")
  a("--resume", action="store_true", help="continue each run from its last checkpoint")
  a(
    "--checkpoint-every",
    type=int,
    default=d.checkpoint_every,
    help="epochs between checkpoints; 0: none",
  )
  a("--no-progress", action="store_true", help="no progress bars")
  return p


def config_from_args(args: argparse.Namespace) -> Config:
  """A :class:`Config` from parsed command-line arguments."""
  seeds = list(args.seeds or ())
  if args.seed is not None and args.seed not in seeds:
    seeds.append(args.seed)
  return Config(
    dataset=args.dataset,
    optimizers=tuple(args.optimizer),
    seeds=tuple(seeds) or (0,),
    data_dir=args.data_dir,
    imbalance_ratio=args.imbalance_ratio,
    model=args.model,
    norm=args.norm,
    epochs=args.epochs,
    batch_size=args.batch_size,
    eval_batch_size=args.eval_batch_size,
    lr=args.lr,
    momentum=args.momentum,
    weight_decay=args.weight_decay,
    schedule=args.schedule,
    warmup_epochs=args.warmup_epochs,
    rho=args.rho,
    eta=args.eta,
    tail_loss_scale=args.tail_loss_scale,
    tail_capacity=args.tail_capacity,
    loss=args.loss,
    tau=args.tau,
    augment=args.augment,
    many_threshold=args.many_threshold,
    few_threshold=args.few_threshold,
    devices=args.devices,
    out=args.out,
    resume=args.resume,
    checkpoint_every=args.checkpoint_every,
    progress=not args.no_progress,
  )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results dict."""
  parser = build_parser()
  args = parser.parse_args(argv)
  config = config_from_args(args)
  try:
    config = config.resolved()
  except ValueError as e:
    parser.error(str(e))
  return run_experiment(config)


def cli() -> None:
  """``main`` for a console: data and configuration errors end in a message."""
  try:
    main(sys.argv[1:])
  except (RuntimeError, ValueError) as e:
    sys.exit(f"error: {e}")
