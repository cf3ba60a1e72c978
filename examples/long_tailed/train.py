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
* ``checkpoints/<run>/``: Orbax checkpoints, numbered by step, that ``--resume``
  continues from (a checkpoint made with other options is refused).

The base optimizer of every method is SGD with momentum, coupled weight decay and
the schedule: ``base`` alone, ``sam`` (:func:`optax.contrib.sam`) or ``imbsam``
(:func:`imbsam_jax.imbsam`, aimed at the classes with fewer than ``eta`` training
images).

Data are sources of :mod:`shared.pipeline` (:class:`Data`), in memory (digits,
CIFAR, npz, folder; batches sliced from the arrays) or streamed (ImageNet-LT,
Places-LT, iNaturalist 2018, split lists; read, decoded and augmented by grain):
one loader of training batches that knows its position, and the test set's
padded batches. Training,
checkpoints, evaluation and the report are one code path. A checkpoint holds the
state (parameters, optimizer state, BatchNorm statistics) and, as JSON, the
loader's position, the history and the running epoch's metric sums; step ``s``'s
random key is derived from the seed and ``s``. Initialisation, data order and
augmentation depend on the seed only, so a run resumed from any step equals an
uninterrupted one.

Each global batch is split over the devices, and over the processes of a
multi-host run (``--coordinator``, :func:`initialize_distributed`): each process
reads its rows of every batch, evaluation sums the per-class counts of all
processes, and the results equal those of one process with as many devices.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import math
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
from long_tailed.config import ETA_METHODS, PRESETS, Config, implied_preset
from shared import (
  data,
  metrics,
  models,
  options,
  pipeline,
  plots,
  report,
  runner,
  training,
)
from shared.checkpoints import Checkpointer

SPLITS = ("many", "medium", "few")
#: ImageNet's per-channel mean and std (of pixels / 255): streamed images are
#: normalized with them (their own would need a pass over the data).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Which sweeps each method depends on.
USES = {
  "base": (),
  "sam": ("rho",),
  "imbsam": ("rho", "eta"),
  "focal-sam": ("rho",),
  "sse-sam": ("rho", "eta"),
}
#: The methods that are an :func:`imbsam_jax.imbsam` (with its metrics).
IMBSAM_FAMILY = ("imbsam", "focal-sam", "sse-sam")


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


def ldam_margins(train_counts: Any, max_margin: float = 0.5) -> np.ndarray:
  """LDAM's per-class margins (Cao et al., 2019): ``m_c ∝ n_c^(-1/4)``, the largest
  ``max_margin``; an empty class counted as one image.

  Example:
    >>> [round(float(m), 3) for m in ldam_margins([625, 16, 1])]  # 1/5, 1/2, 1
    [0.1, 0.25, 0.5]
  """
  margins = np.maximum(np.asarray(train_counts, np.float64), 1.0) ** -0.25
  return (margins * (max_margin / margins.max())).astype(np.float32)


def ldam_cross_entropy(
  cosines: jax.Array, labels: jax.Array, margins: jax.Array, scale: float = 30.0
) -> jax.Array:
  """Per-example label-distribution-aware margin loss (LDAM, Cao et al., 2019).

  .. math::
    \\ell(x, y) = -\\log \\operatorname{softmax}\\big(s (z - m_y e_y)\\big)_y

  on the cosines ``z`` of a normalised classifier (``CosineLinear``), the true
  class's less its margin :func:`ldam_margins`; as kaidic/LDAM-DRW's ``LDAMLoss``.
  Predict with the cosines.

  Example:
    >>> z, margins = jnp.zeros((1, 2)), jnp.array([0.1, 0.5])
    >>> round(float(ldam_cross_entropy(z, jnp.array([1]), margins)[0]), 4)
    15.0
  """
  one_hot = jax.nn.one_hot(labels, cosines.shape[-1], dtype=cosines.dtype)
  logits = scale * (
    cosines - one_hot * jnp.asarray(margins, cosines.dtype)[labels, None]
  )
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def drw_class_weights(train_counts: Any, beta: float = 0.9999) -> np.ndarray:
  """Deferred re-weighting's class weights (Cao et al., 2019): the inverse
  effective number of samples, ``(1 - beta) / (1 - beta^n_c)``, normalised to sum
  to the number of classes (an empty class counted as one image).

  Example:
    >>> [round(float(w), 3) for w in drw_class_weights([1000, 10], beta=0.99)]
    [0.175, 1.825]
  """
  counts = np.maximum(np.asarray(train_counts, np.float64), 1.0)
  weights = (1.0 - beta) / (1.0 - beta**counts)
  return (weights / weights.sum() * len(counts)).astype(np.float32)


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
  """Linear warm-up from 0, then cosine to 0, x0.1 at 80% and 90% of the steps
  after warm-up (``step``), or x0.01 at 80% and x1e-4 at 90% of all steps
  (``drw-step``: LDAM-DRW's epochs 160 and 180 of 200).

  Example:
    >>> sched = learning_rate_schedule(0.1, "step", total_steps=100)
    >>> [round(float(sched(s)), 4) for s in (0, 79, 80, 90)]
    [0.1, 0.1, 0.01, 0.001]
    >>> sched = learning_rate_schedule(1.0, "drw-step", 200, warmup_steps=5)
    >>> [round(float(sched(s)), 6) for s in (159, 160, 180)]
    [1.0, 0.01, 0.0001]
  """
  warmup_steps = min(warmup_steps, total_steps)
  steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, steps)
  elif schedule == "step":
    main = optax.piecewise_constant_schedule(
      lr, {round(0.8 * steps): 0.1, round(0.9 * steps): 0.1}
    )
  elif schedule == "drw-step":
    first, second = round(0.8 * total_steps), round(0.9 * total_steps)
    main = optax.piecewise_constant_schedule(
      lr, {first - warmup_steps: 0.01, second - warmup_steps: 0.01}
    )
  else:
    raise ValueError(f"schedule must be cosine, step or drw-step, got {schedule!r}.")
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


class Data(NamedTuple):
  """The ``train`` and ``test`` sources of :mod:`shared.pipeline`: the arrays of
  an in-memory ``dataset``, or streamed, decoded and augmented (at
  ``image_size``) by ``workers`` grain processes of ``threads`` threads; the
  training images per class, ``train_counts``, counted once."""

  name: str
  train: pipeline.Source
  test: pipeline.Source
  train_counts: np.ndarray
  image_shape: tuple[int, ...]
  imbalance_ratio: float
  class_names: tuple[str, ...]
  dataset: data.Dataset | None
  loader_options: dict[str, int]

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  def train_loader(
    self, global_batch_size: int, *, seed: int, num_epochs: int
  ) -> pipeline.Batches:
    """The run's training batches (RandomResizedCrop and flip if streamed)."""
    return pipeline.train_loader(
      self.train,
      global_batch_size=global_batch_size,
      seed=seed,
      num_epochs=num_epochs,
      **self.loader_options,
    )

  def eval_loader(self, global_batch_size: int) -> pipeline.Batches:
    """This process's rows of the test set's batches, padded (``valid``)."""
    return pipeline.eval_loader(
      self.test, global_batch_size=global_batch_size, **self.loader_options
    )

  def describe(self) -> dict[str, Any]:
    return {
      "dataset_name": self.name,
      "imbalance_ratio_used": self.imbalance_ratio,
      "num_classes": self.num_classes,
      "class_names": list(self.class_names),
      "num_train": len(self.train),
      "num_test": len(self.test),
      "image_shape": list(self.image_shape),
    }


class Experiment(NamedTuple):
  """What the runs share: ``config``, the ``data``, the device ``mesh``, the
  per-channel ``mean`` and ``std`` that normalize images, the ``augment``-ation
  (``crop-flip`` on device, ``random-resized-crop-flip`` in the loader,
  ``none``) and ``steps_per_epoch``."""

  config: Config
  data: Data
  mesh: Mesh
  mean: np.ndarray
  std: np.ndarray
  augment: str
  steps_per_epoch: int

  @property
  def dataset(self) -> data.Dataset | None:
    """The in-memory dataset (``None`` if streamed)."""
    return self.data.dataset

  @property
  def train_counts(self) -> np.ndarray:
    """Training images per class."""
    return self.data.train_counts

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
    devices = self.mesh.devices
    return {
      **self.data.describe(),
      "tau_used": self.config.effective_tau,
      "augment_used": self.augment,
      "steps_per_epoch": self.steps_per_epoch,
      "num_devices": devices.size,
      "process_count": jax.process_count(),
      "platform": devices.flat[0].platform,
    }


def open_data(config: Config, dataset: data.Dataset | None = None) -> Data:
  """The ``--dataset`` (or ``dataset``): in memory, or its streamed sources."""
  options = dict(
    image_size=config.image_size,
    workers=config.workers,
    threads=config.threads,
    skip_unreadable=config.skip_unreadable,
  )
  if dataset is None and config.streamed:
    train, test = (
      pipeline.open_source(config.dataset, split=split, data_dir=config.data_dir)
      for split in ("train", "test")
    )
    for source in (train, test):  # a missing file fails now, not hours into training
      if isinstance(source, pipeline.ListSource):
        source.check_files()
    counts = pipeline.class_counts(train)
    ratio = float(counts.max() / counts[counts > 0].min())
    names = tuple(str(c) for c in range(len(counts)))
    shape = (config.image_size, config.image_size, 3)
    return Data(config.dataset, train, test, counts, shape, ratio, names, None, options)
  ds = dataset or data.load_dataset(
    config.dataset, data_dir=config.data_dir, imbalance_ratio=config.imbalance_ratio
  )
  train, test = (
    pipeline.ArraySource(x, y, ds.num_classes, name=f"{ds.name} {split}")
    for split, x, y in (
      ("train", ds.x_train, ds.y_train),
      ("test", ds.x_test, ds.y_test),
    )
  )
  counts, shape = pipeline.class_counts(train), ds.x_train.shape[1:]
  return Data(
    ds.name, train, test, counts, shape, ds.imbalance_ratio, ds.class_names, ds, options
  )


def prepare(config: Config, dataset: data.Dataset | None = None) -> Experiment:
  """Opens the data (``dataset``, if given, in place of ``--dataset``) and sets up
  the devices; raises ``ValueError("--flag: ...")`` for options that do not fit."""
  config.check_devices()
  source = open_data(config, dataset)
  counts = source.train_counts
  if config.batch_size > counts.sum():
    raise ValueError(
      f"--batch-size: {config.batch_size} exceeds the {counts.sum()} training images"
    )
  for eta in config.eta if set(ETA_METHODS) & set(config.method) else ():
    if not imbsam_jax.tail_classes(counts, eta).any():
      raise ValueError(
        f"--eta: no class has fewer than {eta:g} training images (counts"
        f" {_show_counts(counts)}): ImbSAM would be plain SGD; raise --eta"
        + ("" if source.dataset is None else " or --imbalance-ratio")
      )
  if source.dataset is None:
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    augment = "random-resized-crop-flip"
  else:
    x = data.to_float(source.dataset.x_train)
    mean, std = x.mean(axis=(0, 1, 2)), np.maximum(x.std(axis=(0, 1, 2)), 1e-6)
    on_device = config.augment == "crop-flip" or (
      config.augment == "auto" and source.image_shape[:2] == (32, 32)
    )
    augment = "crop-flip" if on_device else "none"
  return Experiment(
    config=config,
    data=source,
    mesh=training.data_parallel_mesh(jax.devices()[: config.devices]),
    mean=mean.astype(np.float32),
    std=std.astype(np.float32),
    augment=augment,
    steps_per_epoch=int(counts.sum()) // config.batch_size,
  )


def _show_counts(counts: np.ndarray, most: int = 40) -> str:
  """The class counts, or their range and median for more than ``most`` classes.

  >>> _show_counts(np.array([5, 3])), _show_counts(np.arange(100), most=10)
  ('[5, 3]', '0 to 99, median 49.5, over 100 classes')
  """
  if len(counts) <= most:
    return str(counts.tolist())
  return (
    f"{counts.min()} to {counts.max()}, median {np.median(counts):g}, over"
    f" {len(counts)} classes"
  )


class RunSteps(NamedTuple):
  """One run's replicated ``state``, jitted ``train_step(state, batch, key)`` (on
  the fast path a :class:`training.CapacitySteps`, a step per tail capacity) and
  ``predict(state, batch) -> (2, C)`` (per class: correct predictions, valid
  test images), ``eval_graphdef`` (eval mode) and learning-rate ``schedule``."""

  state: training.TrainState
  train_step: Any
  predict: Any
  eval_graphdef: nnx.GraphDef
  schedule: optax.Schedule


def per_example_loss_fn(exp: Experiment):
  """``(model, batch) -> (losses, {"accuracy"})`` on normalized images, float32;
  each loss times ``batch["weight"]`` where the batch has one (DRW)."""
  config, counts = exp.config, exp.train_counts
  log_prior, tau = jnp.asarray(log_class_prior(counts)), config.effective_tau
  margins = jnp.asarray(ldam_margins(counts, config.ldam_max_margin))

  def per_example_loss(model: nnx.Module, batch: dict[str, jax.Array]):
    logits, labels = model(batch["image"]).astype(jnp.float32), batch["label"]
    if config.loss == "ldam":
      losses = ldam_cross_entropy(logits, labels, margins, config.ldam_scale)
    else:
      losses = logit_adjusted_cross_entropy(logits, labels, log_prior, tau)
    if "weight" in batch:
      losses = losses * batch["weight"]
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return losses, {"accuracy": accuracy}

  return per_example_loss


def head_epochs(config: Config) -> int:
  """SSE-SAM's epochs with the head perturbation: ``ceil(head_share * epochs)``."""
  return math.ceil(config.head_share * config.epochs)


def stage_boundaries(config: Config, method: str, steps_per_epoch: int) -> list[int]:
  """The steps at which a run's step changes: SSE-SAM's end of the head
  perturbation (after ``ceil(head_share * epochs)`` epochs, as its authors' epoch
  counter) and the start of DRW; within the run, in order.

  Example:
    >>> config = Config(epochs=200, head_share=0.7, drw_epoch=160)
    >>> stage_boundaries(config, "sse-sam", 10), stage_boundaries(config, "sam", 10)
    ([1400, 1600], [1600])
  """
  total, epochs = config.epochs * steps_per_epoch, []
  if method == "sse-sam":
    epochs.append(head_epochs(config))
  if config.drw_epoch is not None:
    epochs.append(config.drw_epoch)
  return sorted({e * steps_per_epoch for e in epochs} & set(range(1, total)))


def build_run(exp: Experiment, cell: runner.Cell) -> RunSteps:
  """Model, optimizer and jitted steps of a cell (the seed alone fixes the
  initial weights: every method of a seed starts from the same ones)."""
  config, steps, num_classes = exp.config, exp.steps_per_epoch, exp.data.num_classes
  model = models.create_model(
    config.model,
    num_classes=num_classes,
    input_shape=exp.data.image_shape,
    rngs=nnx.Rngs(cell.seed),
    norm=config.norm,
    dtype=config.activation_dtype,
    head="cosine" if config.loss == "ldam" else "linear",
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
  kind = "imbsam" if cell.method in IMBSAM_FAMILY else cell.method
  tail_mask_fn, capacity, extra = None, None, {}
  if cell.method in ETA_METHODS:
    eta = cell.setting["eta"]
    tail_mask_fn = imbsam_jax.tail_mask_from_counts(exp.train_counts, eta)
    extra = {"tail_loss_scale": config.tail_loss_scale}
  if cell.method == "imbsam":
    capacity = exp.tail_capacity(eta)  # None: the exact path
  elif cell.method == "focal-sam":
    tail_mask_fn = imbsam_jax.focal_tail_mask_from_counts(
      exp.train_counts, config.focal_gamma, lam=config.focal_lam
    )
  rho = cell.setting.get("rho", 0.0)

  def make_tx(capacity: int | None, head: bool) -> optax.GradientTransformation:
    fast = {} if capacity is None else {"tail_capacity": capacity, "overflow": "nan"}
    if head:
      fast["head_rho"] = config.head_rho
    return training.make_optimizer(
      kind, base_tx, rho=rho, tail_mask_fn=tail_mask_fn, **extra, **fast
    )

  head = cell.method == "sse-sam"
  graphdef, state = training.init_train_state(model, make_tx(capacity, head))
  mean, std = jnp.asarray(exp.mean), jnp.asarray(exp.std)
  drw = jnp.asarray(drw_class_weights(exp.train_counts, config.drw_beta))

  def preprocess(
    key: jax.Array, batch: dict[str, jax.Array], reweight: bool
  ) -> dict[str, Any]:
    images = data.to_float(batch["image"])
    if exp.augment == "crop-flip":  # zero padding, then normalisation (torchvision)
      images = training.random_crop_flip(key, images)
    batch = {**batch, "image": (images - mean) / std}
    if reweight:  # a weighted mean over the (global) batch, as PyTorch's
      weights = drw[batch["label"]]
      batch["weight"] = weights / jnp.mean(weights)
    return batch

  # Fixed output shardings: the state stays replicated, so no step recompiles;
  # the counts are summed over the batch shards of every device and process.
  replicated = NamedSharding(exp.mesh, PartitionSpec())
  path = config.tail_path() if cell.method == "imbsam" else "exact"

  def stage_step(start: int) -> Any:
    """The step from step ``start`` on (per tail capacity on the fast path)."""
    head = cell.method == "sse-sam" and start < head_epochs(config) * steps
    reweight = config.drw_epoch is not None and start >= config.drw_epoch * steps

    def jitted_step(capacity: int | None) -> Any:
      step = training.make_train_step(
        graphdef,
        per_example_loss_fn(exp),
        kind,
        make_tx(capacity, head),
        tail_mask_fn=tail_mask_fn,
        path=path,
        augment=functools.partial(preprocess, reweight=reweight),
      )
      return jax.jit(step, out_shardings=replicated)

    if capacity is None:
      return jitted_step(None)
    # the fast path: a step per capacity, no control flow
    tail = imbsam_jax.tail_classes(exp.train_counts, cell.setting["eta"])
    return training.CapacitySteps(
      jitted_step, lambda batch: tail[batch["label"]], capacity, config.batch_size
    )

  boundaries = stage_boundaries(config, cell.method, steps)
  train_step = stage_step(0)
  if boundaries:
    stages = [train_step, *(stage_step(b) for b in boundaries)]
    train_step = training.StagedSteps(stages, boundaries)

  def predict(state: training.TrainState, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(eval_graphdef, state.params, state.model_state)
    logits = model((data.to_float(batch["image"]) - mean) / std)
    labels, valid = batch["label"], batch["valid"]
    hits = (jnp.argmax(logits, axis=-1) == labels) & valid
    tally = lambda w: jnp.zeros(num_classes, jnp.int32).at[labels].add(w)
    return jnp.stack([tally(hits.astype(jnp.int32)), tally(valid.astype(jnp.int32))])

  return RunSteps(
    state=training.replicate(state, exp.mesh),
    train_step=train_step,
    predict=jax.jit(predict, out_shardings=replicated),
    eval_graphdef=eval_graphdef,
    schedule=schedule,
  )


def fingerprint(exp: Experiment, cell: runner.Cell) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed."""
  made = options.fingerprint(exp.config)
  made.update(
    method=cell.method, seed=cell.seed, train_counts=exp.train_counts.tolist()
  )
  return {**made, **cell.setting}


def checkpoint_dir(runs_dir: str | Path, cell: runner.Cell) -> Path:
  return Path(runs_dir) / "checkpoints" / cell.name


def checkpoint_due(config: Config, step: int, steps_per_epoch: int) -> bool:
  """Whether to checkpoint after ``step``: the last step, every
  ``--checkpoint-every`` epochs' end, every ``--checkpoint-every-steps``.

  >>> config = Config(epochs=4, checkpoint_every=2, checkpoint_every_steps=3)
  >>> [s for s in range(1, 21) if checkpoint_due(config, s, steps_per_epoch=5)]
  [3, 6, 9, 10, 12, 15, 18, 20]
  """
  every_epochs, every_steps = config.checkpoint_every, config.checkpoint_every_steps
  epochs, rest = divmod(step, steps_per_epoch)
  return (
    step == config.epochs * steps_per_epoch
    or bool(every_steps and step % every_steps == 0)
    or bool(every_epochs and rest == 0 and epochs % every_epochs == 0)
  )


def metrics_log(path: Path, resume_step: int) -> runner.MetricsLog:
  """The run's CSV log; resuming at ``resume_step`` drops the rows of later steps
  (written before an interruption, they are written again)."""
  if resume_step and runner.is_main_process() and path.is_file():
    with open(path, newline="") as f:
      header, *rows = csv.reader(f)
    step = header.index("step")
    with open(path, "w", newline="") as f:
      csv.writer(f).writerows(
        [header, *(r for r in rows if int(r[step]) <= resume_step)]
      )
  return runner.MetricsLog(path, resume=resume_step > 0)


def train_and_evaluate(exp: Experiment, cell: runner.Cell, bar: Any) -> dict[str, Any]:
  """Trains a cell (resuming from its checkpoint) and evaluates its last step;
  returns its entry of ``results.json``."""
  config, steps = exp.config, exp.steps_per_epoch
  total = config.epochs * steps
  run = build_run(exp, cell)
  loader = exp.data.train_loader(
    config.batch_size, seed=cell.seed, num_epochs=config.epochs
  )
  state, start, history, sums = run.state, 0, {}, {}
  skipped_before = 0  # undecodable training records skipped before a resume
  made_with = fingerprint(exp, cell)
  checkpointer = None
  if config.checkpoint_every or config.checkpoint_every_steps:
    checkpointer = Checkpointer(
      checkpoint_dir(config.out, cell),
      max_to_keep=config.keep_checkpoints,
      fresh=not config.resume,
    )
    if config.resume and checkpointer.latest_step() is not None:
      state, meta = checkpointer.restore(state)
      if meta["fingerprint"] != made_with:
        differ = [k for k, v in made_with.items() if meta["fingerprint"].get(k) != v]
        raise ValueError(
          f"Cannot resume from {checkpointer.directory}: it was made with other"
          f" {', '.join(differ)}; use the original options, another --out, or no"
          " --resume."
        )
      loader.set_state(meta["data"])
      start, history = int(meta["step"]), meta["history"]
      skipped_before = meta.get("skipped_unreadable", 0)
      sums = {k: jnp.float32(v) for k, v in meta["epoch_sums"].items()}
      assert int(state.step) == start == loader.position, "inconsistent checkpoint"
  metrics_dir, every = Path(config.out) / "metrics", config.log_every_steps
  log = metrics_log(metrics_dir / f"{cell.name}.csv", start)
  step_log = tensorboard = None
  if every:
    step_log = metrics_log(metrics_dir / f"{cell.name}.steps.csv", start)
    tensorboard = runner.TensorBoardLog(
      Path(config.out) / "tensorboard" / cell.name, resume_step=start
    )
  aug_key = jax.random.fold_in(jax.random.key(cell.seed), 1)
  bar.update(start)
  started, position = time.perf_counter(), start
  window = {"sums": {}, "steps": 0, "start": started}  # since the last step row
  epoch_start = started

  def write_step_row(position: int) -> None:
    """The means of the steps since the last row, at ``position``."""
    now = time.perf_counter()  # float() waits for the steps
    row = {k: float(v) / window["steps"] for k, v in window["sums"].items()}
    row.update(
      lr=float(run.schedule(position - 1)),
      rho=cell.setting.get("rho", 0.0),
      images_per_s=window["steps"] * config.batch_size / (now - window["start"]),
    )
    step_log.write({"step": position, "epoch": position / steps, **row})
    tensorboard.write(position, row, "train")
    window.update(sums={}, steps=0, start=now)

  def save(position: int) -> None:
    assert loader.position == position
    meta = {"fingerprint": made_with, "history": history}
    meta.update(
      data=loader.get_state(),
      epoch_sums={k: float(v) for k, v in sums.items()},
      skipped_unreadable=skipped_before + training.process_sum(loader.skipped),
    )
    checkpointer.save(position, state, meta)

  try:
    with loader, training.Preemption() as preemption:
      while position < total:
        stop = next(  # the next epoch end, checkpoint or step row
          s
          for s in itertools.count(position + 1)
          if s % steps == 0
          or checkpoint_due(config, s, steps)
          or (every and s % every == 0)
        )
        state, chunk, count = training.train_steps(
          run.train_step,
          state,
          itertools.islice(loader, stop - position),
          exp.mesh,
          aug_key,
          first_step=position,
          bar=bar,
          stop=preemption.requested,
        )
        sums = training.add_sums(sums, chunk)
        window.update(
          sums=training.add_sums(window["sums"], chunk), steps=window["steps"] + count
        )
        position += count  # stop, unless a SIGTERM ended the stretch early
        stopped = preemption.stopped
        if every and (position % every == 0 or position == total or stopped):
          write_step_row(position)
        if position % steps == 0:
          means, sums = {k: float(v) / steps for k, v in sums.items()}, {}
          lr = float(run.schedule(position - 1))
          now = time.perf_counter()
          bar.set_postfix(
            epoch=position // steps,
            loss=f"{means['loss']:.3f}",
            img_s=f"{steps * config.batch_size / (now - epoch_start):.0f}",
          )
          epoch_start = now
          for k, v in means.items():
            history.setdefault(f"train_{k}", []).append(v)
          log.write({"epoch": position // steps, "step": position, **means, "lr": lr})
          if tensorboard:
            tensorboard.write(position, {**means, "lr": lr}, "epoch")
        if checkpointer and (stopped or checkpoint_due(config, position, steps)):
          save(position)
        if stopped:  # SIGTERM: this step is logged and checkpointed; exit
          raise training.Preempted(
            f"train_long_tailed.py: SIGTERM: stopped run {cell.name} after step"
            f" {position} of {total}; "
            + (
              f"checkpoint written to {checkpointer.directory}: rerun with --resume"
              if checkpointer
              else "no checkpoint (checkpointing is off): its steps are lost"
            )
          )
  finally:
    if checkpointer:
      checkpointer.close()
    if tensorboard:
      tensorboard.close()
  train_time = time.perf_counter() - started
  eval_batch = training.padded_batch_size(
    config.eval_batch_size, len(exp.data.test), exp.mesh
  )
  with exp.data.eval_loader(eval_batch) as test_loader:
    counts = training.sum_over_batches(
      functools.partial(run.predict, state), test_loader, exp.mesh
    )
  skipped = {
    "train": skipped_before + training.process_sum(loader.skipped),
    "test": training.process_sum(test_loader.skipped),
  }
  eta = cell.setting.get("eta")
  return {
    "optimizer": "sgd" if cell.method == "base" else cell.method,
    **metrics.classification_report(
      *counts,
      exp.train_counts,
      many_threshold=config.many_threshold,
      few_threshold=config.few_threshold,
    ),
    "train_counts": exp.train_counts.tolist(),
    "tail_classes": None
    if eta is None
    else np.flatnonzero(imbsam_jax.tail_classes(exp.train_counts, eta)).tolist(),
    "tail_capacity": exp.tail_capacity(eta) if cell.method == "imbsam" else None,
    "tail_path": (config.tail_path() if cell.method == "imbsam" else "exact")
    if cell.method in IMBSAM_FAMILY
    else None,
    "history": history,
    "epochs_trained_now": config.epochs - start // steps,
    "resumed_from_epoch": start // steps,
    "resumed_from_step": start,
    "train_time_s": round(train_time, 3),
    "compiles": {
      "train_step": (
        run.train_step.compiles()
        if isinstance(run.train_step, (training.CapacitySteps, training.StagedSteps))
        else run.train_step._cache_size()
      ),
      "predict": run.predict._cache_size(),
    },
    "tail_capacities": getattr(run.train_step, "capacities", None),
    "skipped_unreadable": skipped,
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
  facts, counts = exp.describe(), exp.train_counts
  log(
    f"{facts['dataset_name']}: {facts['num_train']} train / {facts['num_test']} test"
    f" images, imbalance ratio {facts['imbalance_ratio_used']:g}; train counts per"
    f" class {_show_counts(counts)}"
  )
  for eta in config.eta if set(ETA_METHODS) & set(config.method) else ():
    tail, capacity = imbsam_jax.tail_classes(counts, eta), exp.tail_capacity(eta)
    path = {
      "exact": "exact path (full batch)",
      "gathered": f"fast path, exact (tail_capacity {capacity}, 2x, ...: a step"
      " per capacity, no control flow)",
      "anchored": f"fast path, anchored BatchNorm (tail_capacity {capacity}, 2x,"
      " ...: a step per capacity, no control flow)",
    }[config.tail_path()]
    share = counts[tail].sum() / counts.sum()
    log(f"ImbSAM tail at eta={eta:g}: {tail.sum()} classes, {share:.1%}; {path}")
  log(
    f"{config.model} (norm: {config.norm or 'model default'}, {config.dtype}),"
    f" {config.epochs} epochs x {exp.steps_per_epoch} steps of {config.batch_size}"
    f" on {exp.mesh.size} {facts['platform']} device(s) in {jax.process_count()}"
    " process(es)"
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
  return report.as_json(results)


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
  initialize_distributed(config)
  return run(config)


def initialize_distributed(config: Config) -> None:
  """Joins this process to the others of ``--coordinator`` (before any device is
  used): ``jax.distributed.initialize``, with gloo for collectives between CPUs."""
  if config.coordinator is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    None if config.coordinator == "auto" else config.coordinator,
    num_processes=config.num_processes,
    process_id=config.process_id,
  )


class Restored(NamedTuple):
  """A finished run's ``experiment``, last ``state``, per-example training
  ``loss_fn(params, {"image", "label"})`` (model in eval mode, normalized images)
  and normalized training ``inputs`` (``None`` for streamed data)."""

  experiment: Experiment
  state: training.TrainState
  loss_fn: Any
  inputs: np.ndarray | None


@functools.cache
def _experiment(config: Config) -> Experiment:
  return prepare(config)


def restore(run_entry: dict[str, Any], runs_dir: str | Path) -> Restored:
  """Restores the final checkpoint of a run of ``runs_dir/results.json`` (in this
  process, on its devices, whatever made it).

  Raises:
    FileNotFoundError: the run has no checkpoint.
    ValueError: the checkpoint is not the last step's, or not the run's.
  """
  config = options.from_json(Config, {**run_entry["config"], "method": ["base"]})
  alone = dict(coordinator=None, num_processes=None, process_id=None)
  config = dataclasses.replace(config, out=str(runs_dir), progress=False, **alone)
  exp = _experiment(config)
  setting = {k: run_entry[k] for k in USES[run_entry["method"]]}
  cell = runner.Cell(run_entry["method"], int(run_entry["seed"]), setting)
  directory = checkpoint_dir(runs_dir, cell)
  again = f"run examples/train_long_tailed.py --out {runs_dir}"
  steps = build_run(exp, cell)
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoints in {directory}: {again} first.")
  with Checkpointer(directory) as checkpointer:
    state, meta = checkpointer.restore(steps.state)
  if meta["step"] != config.epochs * exp.steps_per_epoch:
    raise ValueError(
      f"{directory} ends at step {meta['step']} of"
      f" {config.epochs * exp.steps_per_epoch}: finish the run with --resume."
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

  inputs = None
  if exp.dataset is not None:
    inputs = data.to_float(exp.dataset.x_train, exp.mean, exp.std)
  return Restored(exp, state, loss_fn, inputs)
