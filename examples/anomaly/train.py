"""Deep SAD (semi-supervised anomaly detection) with Adam/SGD, SAM and ImbSAM.

Deep SAD (Ruff et al., ICLR 2020, github.com/lukasruff/Deep-SAD-PyTorch) trains a
bias-free encoder ``phi`` so that normal data lies close to a fixed centre ``c`` and
labeled anomalies far from it; the anomaly score is ``d = ||phi(x) - c||^2``.
ImbSAM's tail is the labeled anomalies (:func:`imbsam_jax.labeled_anomaly_mask`).
:func:`main` draws the training set and initial encoder once per normal class,
labeled-anomaly ratio, pollution and seed, trains each method from them on the same
batches (a paired comparison), scores the whole test split (the normal class
negative, every other class positive) and writes ``OUT/results.json`` (``auroc``
per run), ``OUT/roc.png`` and ``OUT/metrics/``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sklearn.metrics
from flax import nnx

import imbsam_jax
from anomaly.config import Config
from imbsam_jax import LABELED_ANOMALY
from shared import (
  data,
  models,
  options,
  pipeline,
  plots,
  report,
  runner,
  training,
)

LABELED_NORMAL, UNLABELED = 1, 0  # Deep SAD labels, with LABELED_ANOMALY = -1
LOSS_EPS = 1e-6  # eps of the labeled term eta * (d + eps)^y (Deep SAD's value)
CENTER_EPS = 0.1  # centre coordinates are kept at least this far from 0
#: The sweeps each method depends on (the data sweeps first).
DATA = ("normal_class", "labeled_anomaly_ratio", "pollution")
USES = {"base": DATA, "sam": (*DATA, "rho"), "imbsam": (*DATA, "rho")}


class SemiSupervisedCounts(NamedTuple):
  """Sizes of a Deep SAD training set: normals labeled +1 and 0, unlabeled
  anomalies (the pollution) and labeled anomalies (-1, ImbSAM's tail)."""

  labeled_normal: int
  unlabeled_normal: int
  unlabeled_anomaly: int
  labeled_anomaly: int

  @property
  def total(self) -> int:
    return sum(self)


def semi_supervised_counts(
  num_normal: int,
  labeled_anomaly_ratio: float,
  pollution: float,
  labeled_normal_ratio: float = 0.0,
) -> SemiSupervisedCounts:
  """How many examples of each kind a Deep SAD training set of N normals holds.

  As Deep SAD's ``create_semisupervised_setting`` (rounded, not truncated), with
  ratios ``gamma_l`` (labeled anomalies), ``gamma_n`` (labeled normals) of all
  examples and ``gamma_p`` (pollution) of the unlabeled ones:

  .. math::
    T = \\frac{N}{\\gamma_n + (1 - \\gamma_p)(1 - \\gamma_n - \\gamma_l)},\\
    n_{l,a} = \\gamma_l T,\\ n_{l,n} = \\gamma_n T,\\
    n_{u,a} = \\gamma_p (1 - \\gamma_n - \\gamma_l) T

  Example:
    >>> c = semi_supervised_counts(119, labeled_anomaly_ratio=0.05, pollution=0.1)
    >>> tuple(c), c.total
    ((0, 119, 13, 7), 139)
  """
  ratios = [labeled_anomaly_ratio, pollution, labeled_normal_ratio]
  names = ["labeled_anomaly_ratio", "pollution", "labeled_normal_ratio"]
  for name, value in zip(names, ratios, strict=True):
    if not 0 <= value < 1:
      raise ValueError(f"{name} must lie in [0, 1), got {value}.")
  unlabeled = 1.0 - labeled_normal_ratio - labeled_anomaly_ratio
  if unlabeled <= 0:
    raise ValueError("labeled_anomaly_ratio + labeled_normal_ratio must be below 1.")
  total = num_normal / (labeled_normal_ratio + (1 - pollution) * unlabeled)
  labeled_normal = min(round(labeled_normal_ratio * total), num_normal)
  return SemiSupervisedCounts(
    labeled_normal,
    num_normal - labeled_normal,
    round(pollution * unlabeled * total),
    round(labeled_anomaly_ratio * total),
  )


class SemiSupervisedData(NamedTuple):
  """A Deep SAD training set: images ``x``, Deep SAD ``labels`` (+1, 0, -1), the
  original ``classes``, the ``counts`` and the ``known_anomaly_classes``."""

  x: np.ndarray
  labels: np.ndarray
  classes: np.ndarray
  counts: SemiSupervisedCounts
  known_anomaly_classes: tuple[int, ...]


def make_semi_supervised(
  x: np.ndarray,
  y: np.ndarray,
  *,
  normal_class: int,
  known_anomaly_classes: Sequence[int],
  labeled_anomaly_ratio: float,
  pollution: float,
  labeled_normal_ratio: float = 0.0,
  seed: int | Sequence[int] = 0,
) -> SemiSupervisedData:
  """The Deep SAD training set: every normal image, few labeled anomalies.

  Labeled anomalies are drawn from ``known_anomaly_classes``, the pollution from
  the other anomalies (never a labeled one); sizes from
  :func:`semi_supervised_counts`, draws from ``seed``. Normal examples first.

  Example:
    >>> y = np.repeat(np.arange(3), 50)
    >>> d = make_semi_supervised(np.arange(150), y, normal_class=0,
    ...     known_anomaly_classes=[1], labeled_anomaly_ratio=0.1,
    ...     pollution=0.1, seed=0)
    >>> np.unique(d.labels, return_counts=True)[1].tolist()  # -1, 0
    [6, 56]
  """
  y = np.asarray(y)
  known = tuple(sorted({int(c) for c in known_anomaly_classes}))
  if normal_class in known:
    raise ValueError(f"known_anomaly_classes {known} contain the normal class.")
  normal = np.flatnonzero(y == normal_class)
  counts = semi_supervised_counts(
    len(normal), labeled_anomaly_ratio, pollution, labeled_normal_ratio
  )
  rng = np.random.default_rng(seed)
  candidates = np.flatnonzero(np.isin(y, known))
  if counts.labeled_anomaly > len(candidates):
    raise ValueError(
      f"{counts.labeled_anomaly} labeled anomalies needed but classes {known}"
      f" have {len(candidates)} training examples."
    )
  labeled = rng.permutation(candidates)[: counts.labeled_anomaly]
  pool = np.setdiff1d(np.flatnonzero(y != normal_class), labeled)
  if counts.unlabeled_anomaly > len(pool):
    raise ValueError(
      f"{counts.unlabeled_anomaly} polluting anomalies needed, {len(pool)} left."
    )
  unlabeled = rng.permutation(pool)[: counts.unlabeled_anomaly]
  index = np.concatenate([rng.permutation(normal), unlabeled, labeled])
  kinds = [LABELED_NORMAL, UNLABELED, UNLABELED, LABELED_ANOMALY]  # as in counts
  labels = np.repeat(kinds, counts).astype(np.int32)
  return SemiSupervisedData(
    np.asarray(x)[index], labels, y[index].astype(np.int32), counts, known
  )


def deep_sad_loss(
  sq_dist: jax.Array, labels: jax.Array, *, eta: float = 1.0, eps: float = LOSS_EPS
) -> jax.Array:
  """Per-example Deep SAD loss from the squared distances to the centre.

  .. math::
    \\ell_i = d_i \\ (y_i = 0), \\quad \\eta (d_i + \\epsilon) \\ (y_i = +1),
    \\quad \\eta / (d_i + \\epsilon) \\ (y_i = -1)

  Example:
    >>> deep_sad_loss(jnp.array([4.0, 4.0, 0.5]), jnp.array([0, 1, -1]),
    ...               eta=2.0, eps=0.0).tolist()
    [4.0, 8.0, 4.0]
  """
  shifted = jnp.asarray(sq_dist) + eps
  labeled = eta * jnp.where(labels == LABELED_ANOMALY, 1.0 / shifted, shifted)
  return jnp.where(labels == UNLABELED, sq_dist, labeled)


def center_from_features(features: Any, eps: float = CENTER_EPS) -> jax.Array:
  """The hypersphere centre: the mean feature, each coordinate at least ``eps``
  from 0 (a coordinate near 0 could be matched by zero weights; 0 becomes +eps).

  Example:
    >>> center_from_features(jnp.array([[1.0, 0.02, -0.1], [3.0, 0.0, 0.0]]),
    ...                      eps=0.1).tolist()
    [2.0, 0.10000000149011612, -0.10000000149011612]
  """
  mean = jnp.mean(jnp.asarray(features, jnp.float32), axis=0)
  return jnp.where(jnp.abs(mean) < eps, jnp.where(mean < 0, -eps, eps), mean)


class Center(nnx.Variable):
  """The Deep SAD centre: model state, not a trained parameter."""


class DeepSAD(nnx.Module):
  """An encoder and its centre; ``model(x) = ||phi(x) - c||^2`` per example.

  Example:
    >>> enc = models.DeepSADEncoder(4, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    >>> DeepSAD(enc, rep_dim=4)(jnp.zeros((3, 8, 8, 1))).shape
    (3,)
  """

  def __init__(self, encoder: nnx.Module, *, rep_dim: int):
    self.encoder = encoder
    self.center = Center(jnp.zeros((rep_dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(self.encoder(x) - self.center[...]), axis=-1)


def per_example_loss(
  model: DeepSAD,
  batch: Mapping[str, jax.Array],
  *,
  eta: float = 1.0,
  eps: float = LOSS_EPS,
):
  """Deep SAD losses of ``{"image", "label"}`` (for ``make_train_step``), and
  their split: ``tail_loss`` (the labeled anomalies', ImbSAM's tail) +
  ``head_loss`` (the rest) is the batch mean."""
  sq_dist = model(data.to_float(batch["image"]))
  losses = deep_sad_loss(sq_dist, batch["label"], eta=eta, eps=eps)
  tail = batch["label"] == LABELED_ANOMALY
  parts = {
    "tail_loss": jnp.sum(jnp.where(tail, losses, 0.0)) / losses.shape[0],
    "head_loss": jnp.sum(jnp.where(tail, 0.0, losses)) / losses.shape[0],
  }
  return losses, parts


def reconstruction_loss(model: nnx.Module, batch: Mapping[str, jax.Array]):
  """Per-example mean squared reconstruction error (autoencoder pretraining)."""
  x = data.to_float(batch["image"])
  return jnp.mean(jnp.square(model(x) - x), axis=tuple(range(1, x.ndim))), {}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef: nnx.GraphDef, encoder: bool, state: nnx.State, images: jax.Array):
  model = nnx.merge(graphdef, state)
  model.eval()
  return (model.encoder if encoder else model)(data.to_float(images))


def _eval_mode(model: DeepSAD, images: np.ndarray, batch_size: int, encoder: bool):
  """The eval-mode ``encoder`` features or scores of ``images``, as NumPy."""
  graphdef, state = nnx.split(model)
  fn = functools.partial(_apply, graphdef, encoder, state)  # one compile per graphdef
  return training.evaluate(fn, images, batch_size, training.data_parallel_mesh())


def compute_center(
  model: DeepSAD, images: np.ndarray, *, batch_size: int = 512, eps: float = CENTER_EPS
) -> jax.Array:
  """:func:`center_from_features` of the eval-mode encoder over ``images``."""
  return center_from_features(_eval_mode(model, images, batch_size, True), eps)


def anomaly_scores(
  model: DeepSAD, images: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
  """Anomaly scores ``||phi(x) - c||^2`` (eval mode), as a NumPy array."""
  return _eval_mode(model, images, batch_size, False)


def learning_rate(
  config: Config, steps_per_epoch: int, epochs: int
) -> Callable[[int], float]:
  """``step -> lr``: ``config.lr``, times 0.1 after each share ``config.lr_decay``
  of the ``epochs`` (Deep SAD's MultiStepLR milestones, rounded to whole epochs),
  in float32 as ``optax.piecewise_constant_schedule`` (on the host).

  >>> schedule = learning_rate(Config(lr=1.0, lr_decay=(0.7,)), 5, epochs=10)
  >>> schedule(34), schedule(35)  # the last step of epoch 7; the next
  (1.0, 0.10000000149011612)
  """
  shares = config.lr_decay or ()
  milestones = {round(share * epochs) * steps_per_epoch for share in shares}

  def schedule(step: int) -> float:
    lr = np.float32(config.lr)
    for _ in range(sum(step >= m for m in milestones)):
      lr = lr * np.float32(0.1)
    return float(lr)

  return schedule


def base_optimizer(config: Config) -> optax.GradientTransformation:
  """Adam (Deep SAD's) or SGD with momentum, coupled L2, its learning rate a
  hyperparameter in its state (``optax.inject_hyperparams``): :func:`fit` sets
  it from :func:`learning_rate` each epoch, so that one compiled step serves
  every data size and schedule."""

  def make(learning_rate: float) -> optax.GradientTransformation:
    if config.base_optimizer == "adam":
      base = optax.adam(learning_rate)
    else:
      base = optax.sgd(learning_rate, momentum=config.momentum or None)
    base = optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    if config.clip_norm is None:
      return base
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), base)

  return optax.inject_hyperparams(make)(learning_rate=config.lr)


def with_learning_rate(opt_state: optax.OptState, lr: float) -> optax.OptState:
  """``opt_state`` (holding one :func:`base_optimizer`'s) with its learning rate
  set to ``lr``, of the same dtype and placement (no recompile).

  >>> tx = base_optimizer(Config(lr=1.0))
  >>> state = with_learning_rate(tx.init(jnp.zeros(2)), 0.1)
  >>> float(optax.tree_utils.tree_get(state, "learning_rate"))
  0.10000000149011612
  """
  old = optax.tree_utils.tree_get(opt_state, "learning_rate")
  new = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
  return optax.tree_utils.tree_set(opt_state, learning_rate=new)


@functools.cache
def _train_step(
  graphdef: nnx.GraphDef,
  config: Config,
  loss: str,
  method: str,
  rho: float,
  path: str,
  tail_fraction: float,
):
  """``(tx, jitted step)``, cached so that a sweep compiles each method once.

  ImbSAM's tail is the labeled anomalies, a share ``tail_fraction`` of the
  training set; ``path`` is ``gathered`` (the fast path, exact without
  BatchNorm: a :class:`training.CapacitySteps`, one step per tail capacity from
  :func:`imbsam_jax.capacity_from_tail_fraction` up, no control flow) or
  ``exact``.
  """
  loss_fn = functools.partial(per_example_loss, eta=config.eta_sad, eps=config.loss_eps)
  if loss == "ae":
    loss_fn = reconstruction_loss
  mask_fn = imbsam_jax.labeled_anomaly_mask if method == "imbsam" else None

  def make(capacity: int | None) -> tuple[optax.GradientTransformation, Any]:
    fast = {} if capacity is None else {"tail_capacity": capacity, "overflow": "nan"}
    tx = training.make_optimizer(
      method, base_optimizer(config), rho=rho, tail_mask_fn=mask_fn, **fast
    )
    step = training.make_train_step(
      graphdef, loss_fn, method, tx, tail_mask_fn=mask_fn, path=path
    )
    return tx, jax.jit(step, donate_argnums=0)

  if method != "imbsam" or path != "gathered":
    return make(None)
  batch = config.batch_size
  capacity = imbsam_jax.capacity_from_tail_fraction(tail_fraction, batch)
  steps = training.CapacitySteps(
    lambda k: make(k)[1], lambda b: b["label"] == LABELED_ANOMALY, capacity, batch
  )
  return make(capacity)[0], steps


def fit(
  model: nnx.Module,
  x: np.ndarray,
  labels: np.ndarray,
  config: Config,
  *,
  epochs: int,
  seed: int,
  loss: str = "deep_sad",
  method: str = "base",
  rho: float = 0.0,
  tail_fraction: float = 0.0,
  log: Callable[[dict[str, Any]], None] | None = None,
  evaluate: Callable[[nnx.Module], dict[str, float]] | None = None,
  eval_every: int = 0,
  step_log: Callable[[int, dict[str, Any]], None] | None = None,
  log_every_steps: int = 0,
) -> tuple[nnx.Module, list[float]]:
  """Trains a copy of ``model`` (left untouched); returns it and each epoch's
  mean loss. ``loss`` is ``deep_sad`` (with ``method``, see :func:`_train_step`)
  or ``ae`` (reconstruction).

  ``log(row)`` gets each epoch's mean step metrics, with ``evaluate(model)``'s
  every ``eval_every`` epochs (0: never); ``step_log(step, row)`` the means of
  every ``log_every_steps`` steps (0: none), ``step`` counted from 1 over the
  epochs.
  """
  model = nnx.clone(model)
  model.train()
  mesh = training.data_parallel_mesh()
  path = training.tail_path(model, "auto", "exact")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, step = _train_step(graphdef, config, loss, method, rho, path, tail_fraction)
  state = training.TrainState(jnp.zeros([], jnp.int32), params, rest, tx.init(params))
  # Copies: the step donates its state, and the clone shares the arrays.
  state = training.replicate(jax.tree.map(jnp.array, state), mesh)
  history, source = [], pipeline.ArraySource(x, labels)
  every = log_every_steps if step_log is not None else 0
  epoch_sums, window, window_steps, position, lr = {}, {}, 0, 0, None

  def means_of(sums: dict[str, jax.Array], count: int) -> dict[str, float]:
    """The mean of each metric over ``count`` steps, and the last step's lr."""
    means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
    return {**means, "lr": float(lr)}

  with pipeline.train_loader(
    source, global_batch_size=config.batch_size, seed=seed, num_epochs=epochs
  ) as loader:
    steps = loader.steps_per_epoch
    schedule = learning_rate(config, steps, epochs)
    while position < epochs * steps:
      # Up to the next epoch end or step row; the lr changes at epoch ends only.
      if (rate := schedule(position)) != lr:
        lr = rate
        state = state._replace(opt_state=with_learning_rate(state.opt_state, lr))
      stop = min((position // s + 1) * s for s in (steps, every) if s)
      batches = itertools.islice(loader, stop - position)
      state, chunk, count = training.train_steps(
        step, state, batches, mesh, jax.random.key(0), first_step=position
      )
      position += count
      epoch_sums = training.add_sums(epoch_sums, chunk)
      if every:
        window, window_steps = training.add_sums(window, chunk), window_steps + count
        if position % every == 0 or position == epochs * steps:
          step_log(position, means_of(window, window_steps))
          window, window_steps = {}, 0
      if position % steps == 0:
        epoch = position // steps
        means, epoch_sums = means_of(epoch_sums, steps), {}
        history.append(means["loss"])
        if evaluate is not None and eval_every and epoch % eval_every == 0:
          means.update(evaluate(nnx.merge(graphdef, state.params, state.model_state)))
        if log is not None:
          log({"epoch": epoch, **means})
  return nnx.merge(graphdef, state.params, state.model_state), history


def known_classes(
  spec: str, normal_class: int, num_classes: int, seed: int
) -> tuple[int, ...]:
  """The labeled-anomaly classes of ``--known-anomaly-classes`` for one draw."""
  others = [c for c in range(num_classes) if c != normal_class]
  if spec == "all":
    return tuple(others)
  if spec == "random":
    return (int(np.random.default_rng((seed, normal_class, 1)).choice(others)),)
  known = tuple(int(c) for c in spec.split(",") if int(c) != normal_class)
  if not known:
    raise ValueError(f"--known-anomaly-classes: none left besides class {normal_class}")
  return known


def make_draw(
  config: Config, dataset: data.Dataset, key: tuple
) -> tuple[SemiSupervisedData, DeepSAD, dict[str, Any]]:
  """The training set, initial model (pretrained if asked) and data info shared
  by the methods of ``key = (normal_class, labeled_anomaly_ratio, pollution, seed)``."""
  normal_class, ratio, pollution, seed = key
  known = known_classes(
    config.known_anomaly_classes, normal_class, dataset.num_classes, seed
  )
  train = make_semi_supervised(
    dataset.x_train,
    dataset.y_train,
    normal_class=normal_class,
    known_anomaly_classes=known,
    labeled_anomaly_ratio=ratio,
    pollution=pollution,
    labeled_normal_ratio=config.labeled_normal_ratio,
    seed=(seed, normal_class),
  )
  start = time.perf_counter()
  kwargs = dict(
    input_shape=dataset.x_train.shape[1:], features=config.features, norm=config.norm
  )
  model = DeepSAD(
    models.DeepSADEncoder(config.rep_dim, **kwargs, rngs=nnx.Rngs(seed)),
    rep_dim=config.rep_dim,
  )
  if config.pretrain_epochs:
    # Pretrain an autoencoder (its reconstruction loss ignores the labels).
    ae = models.DeepSADAutoencoder(config.rep_dim, **kwargs, rngs=nnx.Rngs(seed))
    epochs = config.pretrain_epochs
    ae, _ = fit(ae, train.x, train.labels, config, epochs=epochs, seed=seed, loss="ae")
    nnx.update(model.encoder, nnx.state(ae.encoder))  # BatchNorm statistics too
  model.center[...] = compute_center(model, train.x, batch_size=config.eval_batch_size)
  info = {
    "known_anomaly_classes": list(known),
    "num_train": train.counts.total,
    **train.counts._asdict(),
    "num_test": len(dataset.y_test),
    "num_test_anomalies": int((dataset.y_test != normal_class).sum()),
    "init_seconds": round(time.perf_counter() - start, 3),
  }
  return train, model, info


def snapshot(
  model: DeepSAD,
  train: SemiSupervisedData,
  normal_class: int,
  test_x: np.ndarray,
  test_is_anomaly: np.ndarray,
  *,
  batch_size: int = 512,
) -> dict[str, float]:
  """Where a model stands (eval mode), for the per-epoch log (``--eval-every``):
  its test AUROC (NaN if a score is not finite), and the median distance to the
  centre (the anomaly score) of the training set's normal examples, polluting
  anomalies and labeled anomalies, with the labeled anomalies' smallest."""
  test = anomaly_scores(model, test_x, batch_size=batch_size)
  finite = bool(np.all(np.isfinite(test)))
  auroc = sklearn.metrics.roc_auc_score(test_is_anomaly, test) if finite else np.nan
  dist = anomaly_scores(model, train.x, batch_size=batch_size)
  labeled = train.labels == LABELED_ANOMALY
  normal = train.classes == normal_class
  median = lambda m: float(np.median(dist[m])) if m.any() else np.nan
  return {
    "test_auroc": float(auroc),
    "normal_dist": median(normal),
    "pollution_dist": median(~normal & ~labeled),
    "labeled_anomaly_dist": median(labeled),
    "labeled_anomaly_dist_min": float(dist[labeled].min()) if labeled.any() else np.nan,
  }


def train_and_evaluate(
  config: Config,
  dataset: data.Dataset,
  draw: Callable[[tuple], tuple],
  curves: list,
  cell: runner.Cell,
  bar: Any,
) -> dict[str, Any]:
  """Trains one cell from its :func:`make_draw` (``draw(key)``); returns its run
  entry and appends its ROC curve (None if a score is not finite) to ``curves``.
  Writes ``metrics/<run>.csv`` (per epoch) and, with ``--log-every-steps``,
  ``metrics/<run>.steps.csv`` and ``tensorboard/<run>/``."""
  s = cell.setting
  key = (s["normal_class"], s["labeled_anomaly_ratio"], s["pollution"], cell.seed)
  train, model, info = draw(key)
  is_anomaly = dataset.y_test != s["normal_class"]
  metrics_dir = Path(config.out) / "metrics"
  epoch_log = runner.MetricsLog(metrics_dir / f"{cell.name}.csv")
  step_log = tensorboard = None
  if config.log_every_steps:
    steps_csv = runner.MetricsLog(metrics_dir / f"{cell.name}.steps.csv")
    tensorboard = runner.TensorBoardLog(Path(config.out) / "tensorboard" / cell.name)

    def step_log(step: int, row: dict[str, Any]) -> None:
      steps_csv.write({"step": step, **row})
      tensorboard.write(step, row, "train")

  def log(row: dict[str, Any]) -> None:
    epoch_log.write(row)
    if tensorboard is not None:
      tensorboard.write(row["epoch"], row, "epoch")

  start = time.perf_counter()
  try:
    trained, history = fit(
      model,
      train.x,
      train.labels,
      config,
      epochs=config.epochs,
      seed=cell.seed,
      method=cell.method,
      rho=s.get("rho", 0.0),
      tail_fraction=s["labeled_anomaly_ratio"],
      log=log,
      evaluate=functools.partial(
        snapshot,
        train=train,
        normal_class=s["normal_class"],
        test_x=dataset.x_test,
        test_is_anomaly=is_anomaly,
        batch_size=config.eval_batch_size,
      ),
      eval_every=config.eval_every,
      step_log=step_log,
      log_every_steps=config.log_every_steps,
    )
  finally:
    if tensorboard is not None:
      tensorboard.close()
  train_seconds = time.perf_counter() - start
  scores = anomaly_scores(trained, dataset.x_test, batch_size=config.eval_batch_size)
  auc = curve = None
  if np.all(np.isfinite(scores)):
    auc = float(sklearn.metrics.roc_auc_score(is_anomaly, scores))
    curve = sklearn.metrics.roc_curve(is_anomaly, scores)[:2]
  curves.append(curve)
  bar.update(1)
  bar.set_postfix(auroc="not finite" if auc is None else f"{auc:.3f}")
  sweeps = {k: s.get(k) for k in options.sweep_values(config)}
  return {
    "optimizer": config.base_optimizer if cell.method == "base" else cell.method,
    "auroc": auc,
    "final_loss": history[-1],
    "train_seconds": round(train_seconds, 3),
    "tail_path": (
      training.tail_path(model, "auto", "exact") if cell.method == "imbsam" else None
    ),
    "data": info,
    "config": {**options.to_json(config), **sweeps, "method": cell.method},
  }


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Test AUROC, mean ± std over seeds, normal classes x methods; the ``mean``
  row: each seed's mean over the classes, then mean and spread over seeds."""
  keys = report.varying(runs, ["rho"])
  auroc = {
    (report.label(r, keys), r["normal_class"], r["seed"]): r["auroc"] for r in runs
  }
  # The methods, normal classes and seeds, each in order of appearance.
  methods, classes, seeds = (list(dict.fromkeys(k)) for k in zip(*auroc, strict=True))
  rows = [["normal class", *methods]]
  for c in classes:
    cells = []
    for m in methods:
      values = [auroc[m, c, s] for s in seeds]
      failed = f" ({values.count(None)} failed)" if None in values else ""
      cells.append(report.cell(report.mean_std(values), digits=3) + failed)
    rows.append([str(c), *cells])
  means = []
  for m in methods:
    per_seed = [[auroc[m, c, s] for c in classes] for s in seeds]
    seed_means = [None if None in v else float(np.mean(v)) for v in per_seed]
    means.append(report.cell(report.mean_std(seed_means), digits=3))
  return report.text_table([*rows, ["mean", *means]])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results."""
  config = options.parse(
    Config,
    argv,
    prog="train_anomaly.py",
    description="Deep SAD anomaly detection (one normal class, a few labeled anomalies)"
    " with the base optimizer, SAM and ImbSAM (tail = the labeled anomalies).",
  )
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir)
  classes = config.normal_class or tuple(range(dataset.num_classes))
  if max(classes) >= dataset.num_classes:
    raise ValueError(
      f"--normal-class: {max(classes)} is not below {dataset.num_classes}"
    )
  config = dataclasses.replace(config, normal_class=classes)
  sweeps, curves, start = options.sweep_values(config), [], time.perf_counter()
  # The grid puts the cells that share a draw together: keep the last one.
  draw = functools.lru_cache(maxsize=1)(functools.partial(make_draw, config, dataset))
  results = runner.run_grid(
    runner.grid(config.method, config.seed, sweeps, uses=USES),
    functools.partial(train_and_evaluate, config, dataset, draw, curves),
    out=config.out,
    config=options.to_json(config),
    keys=list(sweeps),
    metrics=["auroc"],
    progress=config.progress,
  )
  runs, keys = results["runs"], report.varying(results["runs"], ["rho"])
  paths = {run["tail_path"] for run in runs} - {None}
  for path in sorted(paths):  # the step ImbSAM's runs took
    print(
      "ImbSAM (tail: the labeled anomalies): "
      + {
        "gathered": "fast path, exact (a step per tail capacity k, 2k, ..., picked"
        " from each batch's labels; no control flow)",
        "exact": "exact path (full batch: the encoder's BatchNorm needs it)",
      }[path]
    )
  settings: dict[tuple, list] = {}  # (gamma_l, pollution) -> [(run, ROC curve)]
  for run, curve in zip(runs, curves, strict=True):
    setting = (run["labeled_anomaly_ratio"], run["pollution"])
    settings.setdefault(setting, []).append((run, curve))
  seeds = ",".join(map(str, config.seed))
  for (ratio, pollution), members in settings.items():
    print(
      f"\nDeep SAD on {config.dataset}, gamma_l {ratio:g}, pollution {pollution:g}:"
      f" test AUROC, mean ± std over seeds {seeds} (base {config.base_optimizer}"
      f" lr {config.lr:g}, {config.epochs} epochs)"
    )
    print(format_table([run for run, _ in members]))
    panels: dict[str, dict[str, list]] = {}
    for run, curve in sorted(members, key=lambda m: m[0]["normal_class"]):
      if curve is not None:
        panel = panels.setdefault(f"normal class {run['normal_class']}", {})
        panel.setdefault(report.label(run, keys), []).append(curve)
    suffix = "" if len(settings) == 1 else f"_gamma_l{ratio:g}_pollution{pollution:g}"
    if panels and runner.is_main_process():
      title = f"{config.dataset}: ROC, gamma_l {ratio:g}, pollution {pollution:g}"
      plots.plot_roc_grid(panels, Path(config.out) / f"roc{suffix}.png", title=title)
  print(
    f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; wrote {config.out}/"
  )
  return report.as_json(results)
