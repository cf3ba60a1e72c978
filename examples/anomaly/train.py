"""Deep SAD (semi-supervised anomaly detection) with Adam/SGD, SAM and ImbSAM.

Deep SAD (Ruff et al., ICLR 2020) trains a bias-free encoder ``phi`` so that
normal data lies close to a fixed centre ``c`` and labeled anomalies far from
it. The per-example loss, with Deep SAD labels ``y`` (+1 labeled normal, -1
labeled anomaly, 0 unlabeled) and ``d = ||phi(x) - c||^2``, is

.. math::
  \\ell = d \\ \\text{if } y = 0, \\qquad
  \\ell = \\eta\\,(d + \\epsilon)^{y} \\ \\text{otherwise},

and the anomaly score is ``d``. ImbSAM treats the labeled anomalies as the tail
(:func:`imbsam_jax.labeled_anomaly_mask`): the perturbation comes from their
gradient alone. ``examples/train_anomaly.py`` is a thin command line over
:func:`main`: for every normal class, labeled-anomaly ratio, pollution and seed
it draws the training set and the initial encoder once, trains each method from
them on the same batches (a paired comparison), scores the whole test split
(the normal class negative, every other class positive) and writes
``OUT/results.json`` (``auroc`` per run), ``OUT/roc.png`` and
``OUT/metrics/*.csv``.

References:
  Ruff et al. Deep Semi-Supervised Anomaly Detection. ICLR 2020
  (code: github.com/lukasruff/Deep-SAD-PyTorch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import imbsam_jax
from anomaly.config import Config
from imbsam_jax import LABELED_ANOMALY
from shared import data, metrics, models, options, plots, report, runner, training

#: Deep SAD label of a labeled normal example.
LABELED_NORMAL = 1
#: Deep SAD label of an unlabeled example (normal or pollution).
UNLABELED = 0
#: ``eps`` of the labeled term ``eta * (d + eps)^y`` (Deep SAD's value).
LOSS_EPS = 1e-6
#: Centre coordinates with ``|c_j| < CENTER_EPS`` are set to ``+-CENTER_EPS``.
CENTER_EPS = 0.1
#: The data sweeps every method uses, then the method's own.
USES = {
  "base": ("normal_class", "labeled_anomaly_ratio", "pollution"),
  "sam": ("normal_class", "labeled_anomaly_ratio", "pollution", "rho"),
  "imbsam": ("normal_class", "labeled_anomaly_ratio", "pollution", "rho"),
}


# ------------------------------------------------------------ data setting


class SemiSupervisedCounts(NamedTuple):
  """Sizes of a Deep SAD training set.

  Attributes:
    labeled_normal: normal examples labeled +1.
    unlabeled_normal: normal examples labeled 0.
    unlabeled_anomaly: anomalies labeled 0 (the pollution).
    labeled_anomaly: anomalies labeled -1 (ImbSAM's tail).
  """

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
  """How many examples of each kind a Deep SAD training set holds.

  Every normal training example is used. With ``T`` the training-set size,
  ``gamma_l`` the labeled-anomaly ratio, ``gamma_n`` the labeled-normal ratio
  and ``gamma_p`` the pollution (share of anomalies among the *unlabeled*
  examples), as in Deep SAD's ``create_semisupervised_setting``:

  .. math::
    T = \\frac{N}{\\gamma_n + (1 - \\gamma_p)(1 - \\gamma_n - \\gamma_l)},\\
    n_{l,a} = \\gamma_l T,\\ n_{l,n} = \\gamma_n T,\\
    n_{u,a} = \\gamma_p (1 - \\gamma_n - \\gamma_l) T,

  each rounded to the nearest integer (the original truncates), and
  ``n_{u,n} = N - n_{l,n}``.

  Args:
    num_normal: ``N``, the normal-class training examples.
    labeled_anomaly_ratio: ``gamma_l`` in [0, 1): labeled anomalies among all
      training examples.
    pollution: ``gamma_p`` in [0, 1): anomalies among the unlabeled examples.
    labeled_normal_ratio: ``gamma_n``: labeled normals among all examples.

  Returns:
    A :class:`SemiSupervisedCounts`.

  Example:
    >>> c = semi_supervised_counts(119, labeled_anomaly_ratio=0.05, pollution=0.1)
    >>> c, c.total
    (SemiSupervisedCounts(labeled_normal=0, unlabeled_normal=119, \
unlabeled_anomaly=13, labeled_anomaly=7), 139)
  """
  ratios = {
    "labeled_anomaly_ratio": labeled_anomaly_ratio,
    "pollution": pollution,
    "labeled_normal_ratio": labeled_normal_ratio,
  }
  for name, value in ratios.items():
    if not 0 <= value < 1:
      raise ValueError(f"{name} must lie in [0, 1), got {value}.")
  unlabeled_share = 1.0 - labeled_normal_ratio - labeled_anomaly_ratio
  if unlabeled_share <= 0:
    raise ValueError(
      "labeled_anomaly_ratio + labeled_normal_ratio must be below 1, got"
      f" {labeled_anomaly_ratio} + {labeled_normal_ratio}."
    )
  if num_normal < 1:
    raise ValueError(f"num_normal must be positive, got {num_normal}.")
  total = num_normal / (labeled_normal_ratio + (1 - pollution) * unlabeled_share)
  labeled_normal = min(round(labeled_normal_ratio * total), num_normal)
  return SemiSupervisedCounts(
    labeled_normal=labeled_normal,
    unlabeled_normal=num_normal - labeled_normal,
    unlabeled_anomaly=round(pollution * unlabeled_share * total),
    labeled_anomaly=round(labeled_anomaly_ratio * total),
  )


class SemiSupervisedData(NamedTuple):
  """A Deep SAD training set.

  Attributes:
    x: ``(T, H, W, C)`` training images.
    labels: ``(T,)`` int32 Deep SAD labels: +1 labeled normal, -1 labeled
      anomaly, 0 unlabeled.
    classes: ``(T,)`` int32 original class of each example.
    counts: the :class:`SemiSupervisedCounts`.
    known_anomaly_classes: the classes the labeled anomalies were drawn from.
  """

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
  """The Deep SAD training set: one normal class, few labeled anomalies.

  All training examples of ``normal_class`` are used (a random
  ``labeled_normal_ratio`` share of the set labeled +1, the rest 0).
  Labeled anomalies (-1) are drawn from ``known_anomaly_classes``; the
  pollution (unlabeled anomalies, 0) from all other classes, never reusing a
  labeled anomaly. Sizes from :func:`semi_supervised_counts`.

  Args:
    x: ``(N, ...)`` training images of all classes.
    y: ``(N,)`` class labels.
    normal_class: the normal class; every other class is anomalous.
    known_anomaly_classes: classes the labeled anomalies come from (Deep SAD's
      main experiments use one).
    labeled_anomaly_ratio: ``gamma_l``: labeled anomalies among all examples.
    pollution: ``gamma_p``: anomalies among the unlabeled examples.
    labeled_normal_ratio: ``gamma_n``: labeled normals among all examples.
    seed: seed (or seed sequence) of the draws.

  Returns:
    A :class:`SemiSupervisedData`, normal examples first.

  Raises:
    ValueError: invalid classes, or too few anomalies to draw from.

  Example:
    >>> import numpy as np
    >>> y = np.repeat(np.arange(3), 50)
    >>> d = make_semi_supervised(np.arange(150), y, normal_class=0,
    ...     known_anomaly_classes=[1], labeled_anomaly_ratio=0.1,
    ...     pollution=0.1, seed=0)
    >>> np.unique(d.labels, return_counts=True)[1].tolist()  # -1, 0
    [6, 56]
    >>> sorted(set(d.classes[d.labels == -1].tolist()))
    [1]
  """
  y = np.asarray(y)
  classes_present = set(np.unique(y).tolist())
  known = tuple(sorted({int(c) for c in known_anomaly_classes}))
  if normal_class not in classes_present:
    raise ValueError(f"normal_class {normal_class} has no training examples.")
  if labeled_anomaly_ratio > 0 and not known:
    raise ValueError("known_anomaly_classes is empty but labeled_anomaly_ratio > 0.")
  if normal_class in known:
    raise ValueError(f"known_anomaly_classes {known} contain the normal class.")
  missing = [c for c in known if c not in classes_present]
  if missing:
    raise ValueError(f"known_anomaly_classes {missing} have no training examples.")
  normal = np.flatnonzero(y == normal_class)
  counts = semi_supervised_counts(
    len(normal), labeled_anomaly_ratio, pollution, labeled_normal_ratio
  )
  rng = np.random.default_rng(seed)
  candidates = np.flatnonzero(np.isin(y, known))
  if counts.labeled_anomaly > len(candidates):
    raise ValueError(
      f"{counts.labeled_anomaly} labeled anomalies needed but classes {known}"
      f" have only {len(candidates)} training examples."
    )
  labeled_anomaly = rng.permutation(candidates)[: counts.labeled_anomaly]
  pool = np.setdiff1d(np.flatnonzero(y != normal_class), labeled_anomaly)
  if counts.unlabeled_anomaly > len(pool):
    raise ValueError(
      f"{counts.unlabeled_anomaly} unlabeled anomalies (pollution) needed but"
      f" only {len(pool)} anomalies remain."
    )
  unlabeled_anomaly = rng.permutation(pool)[: counts.unlabeled_anomaly]
  normal = rng.permutation(normal)
  index = np.concatenate([normal, unlabeled_anomaly, labeled_anomaly])
  labels = np.concatenate(
    [
      np.full(counts.labeled_normal, LABELED_NORMAL),
      np.full(counts.unlabeled_normal + counts.unlabeled_anomaly, UNLABELED),
      np.full(counts.labeled_anomaly, LABELED_ANOMALY),
    ]
  ).astype(np.int32)
  return SemiSupervisedData(
    x=np.asarray(x)[index],
    labels=labels,
    classes=y[index].astype(np.int32),
    counts=counts,
    known_anomaly_classes=known,
  )


# ------------------------------------------------------------------ method


def deep_sad_loss(
  sq_dist: jax.Array,
  labels: jax.Array,
  *,
  eta: float = 1.0,
  eps: float = LOSS_EPS,
) -> jax.Array:
  """Per-example Deep SAD loss from squared distances to the centre.

  .. math::
    \\ell_i = d_i \\ (y_i = 0), \\quad \\eta (d_i + \\epsilon) \\ (y_i = +1),
    \\quad \\eta / (d_i + \\epsilon) \\ (y_i = -1)

  As in Ruff et al.'s objective and code, labeled normals are weighted by
  ``eta`` too (with the default ``eta = 1`` this is ``d`` plus a constant).

  Args:
    sq_dist: ``(B,)`` squared distances ``||phi(x) - c||^2``.
    labels: ``(B,)`` Deep SAD labels (+1, -1, 0).
    eta: weight of the labeled terms (``eta_sad``).
    eps: keeps the inverse distance finite.

  Returns:
    ``(B,)`` losses.

  Example:
    >>> import jax.numpy as jnp
    >>> deep_sad_loss(jnp.array([4.0, 4.0, 0.5]), jnp.array([0, 1, -1]),
    ...               eta=2.0, eps=0.0).tolist()
    [4.0, 8.0, 4.0]
  """
  sq_dist = jnp.asarray(sq_dist)
  labels = jnp.asarray(labels)
  shifted = sq_dist + eps
  labeled = eta * jnp.where(labels == LABELED_ANOMALY, 1.0 / shifted, shifted)
  return jnp.where(labels == UNLABELED, sq_dist, labeled)


def center_from_features(features: Any, eps: float = CENTER_EPS) -> jax.Array:
  """The hypersphere centre: the mean feature, kept away from 0.

  .. math::
    c = \\tfrac{1}{N} \\sum_i \\phi(x_i), \\quad
    c_j \\leftarrow \\operatorname{sign}(c_j)\\,\\epsilon \\ \\text{ if }
    |c_j| < \\epsilon

  A coordinate near 0 could be matched trivially by zero weights (Ruff et
  al.); an exact 0 becomes ``+eps`` (the original leaves it at 0).

  Args:
    features: ``(N, D)`` encoder outputs.
    eps: the smallest allowed ``|c_j|``.

  Returns:
    ``(D,)`` float32 centre.

  Example:
    >>> import jax.numpy as jnp
    >>> center_from_features(jnp.array([[1.0, 0.02, -0.1], [3.0, 0.0, 0.0]]),
    ...                      eps=0.1).tolist()
    [2.0, 0.10000000149011612, -0.10000000149011612]
  """
  mean = jnp.mean(jnp.asarray(features, jnp.float32), axis=0)
  return jnp.where(jnp.abs(mean) < eps, jnp.where(mean < 0, -eps, eps), mean)


class Center(nnx.Variable):
  """The Deep SAD centre ``c``: model state, fixed during training."""


class DeepSAD(nnx.Module):
  """An encoder and its centre; ``__call__`` returns the anomaly scores.

  ``model(x) = ||phi(x) - c||^2`` per example. The centre is a
  :class:`Center` variable, so ``nnx.split(model, nnx.Param, ...)`` leaves it
  out of the trained parameters.

  Args:
    encoder: ``phi``, e.g. :class:`shared.models.DeepSADEncoder`.
    rep_dim: output dimension of ``encoder``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> enc = models.DeepSADEncoder(4, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    >>> DeepSAD(enc, rep_dim=4)(jnp.zeros((3, 8, 8, 1))).shape
    (3,)
  """

  def __init__(self, encoder: nnx.Module, *, rep_dim: int):
    self.encoder = encoder
    self.center = Center(jnp.zeros((rep_dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Squared distances ``(B,)`` of images ``(B, H, W, C)`` to the centre."""
    return jnp.sum(jnp.square(self.encoder(x) - self.center[...]), axis=-1)


def per_example_loss(
  model: DeepSAD, batch: Mapping[str, jax.Array], *, eta: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Deep SAD losses of a batch ``{"image": uint8/float, "label": (B,)}``.

  The ``per_example_loss`` of :func:`shared.training.make_train_step`.
  """
  sq_dist = model(data.to_float(batch["image"]))
  losses = deep_sad_loss(sq_dist, batch["label"], eta=eta)
  return losses, {}


def reconstruction_loss(
  model: nnx.Module, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example mean squared reconstruction error (autoencoder pretraining)."""
  x = data.to_float(batch["image"])
  losses = jnp.mean(jnp.square(model(x) - x), axis=tuple(range(1, x.ndim)))
  return losses, {}


@functools.cache
def _eval_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
  """Jitted eval-mode ``(params, rest, images) -> features, scores``."""

  def merged(params, rest):
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model

  def features(params, rest, images):
    return merged(params, rest).encoder(data.to_float(images))

  def scores(params, rest, images):
    return merged(params, rest)(data.to_float(images))

  return jax.jit(features), jax.jit(scores)


def _batched(
  which: int, model: DeepSAD, images: np.ndarray, batch_size: int
) -> np.ndarray:
  """Eval function ``which`` (0: features, 1: scores) in fixed-shape batches."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = _eval_fns(graphdef)[which]
  outs = []
  dummy = np.zeros(len(images), np.int32)
  for xb, _, valid in data.iterate_eval_batches(images, dummy, batch_size):
    outs.append(np.asarray(fn(params, rest, xb))[valid])
  return np.concatenate(outs)


def compute_center(
  model: DeepSAD,
  images: np.ndarray,
  *,
  batch_size: int = 512,
  eps: float = CENTER_EPS,
) -> jax.Array:
  """The centre of :func:`center_from_features` over ``images``.

  The encoder runs in eval mode (BatchNorm with running averages), as in
  Deep SAD's ``init_center_c``. Store the result with ``model.center[...] = c``.

  Args:
    model: a :class:`DeepSAD` (its centre is not read).
    images: ``(N, H, W, C)`` training images, all of them.
    batch_size: evaluation batch size.
    eps: see :func:`center_from_features`.

  Returns:
    ``(rep_dim,)`` float32 centre.
  """
  return center_from_features(_batched(0, model, images, batch_size), eps)


def anomaly_scores(
  model: DeepSAD, images: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
  """Anomaly scores ``||phi(x) - c||^2`` (eval mode), as a NumPy array."""
  return _batched(1, model, images, batch_size)


# ---------------------------------------------------------------- training


def base_optimizer(config: Config) -> optax.GradientTransformation:
  """Adam (Deep SAD's) or SGD with momentum, constant learning rate, coupled L2."""
  if config.base_optimizer == "adam":
    base = optax.adam(config.lr)
  else:
    base = optax.sgd(config.lr, momentum=config.momentum or None)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), base)


@functools.cache
def _train_step(
  graphdef: nnx.GraphDef, config: Config, loss: str, method: str, rho: float
) -> tuple[optax.GradientTransformation, Callable]:
  """``(tx, jitted step)``, cached so that a sweep compiles each method once."""
  if loss == "deep_sad":
    loss_fn = functools.partial(per_example_loss, eta=config.eta_sad)
  else:
    loss_fn = reconstruction_loss
  tail_mask_fn = imbsam_jax.labeled_anomaly_mask if method == "imbsam" else None
  tx = training.make_optimizer(
    method, base_optimizer(config), rho=rho, tail_mask_fn=tail_mask_fn
  )
  step = training.make_train_step(
    graphdef, loss_fn, method, tx, tail_mask_fn=tail_mask_fn
  )
  return tx, jax.jit(step, donate_argnums=0)


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
  log: runner.MetricsLog | None = None,
) -> tuple[nnx.Module, list[float]]:
  """Trains a copy of ``model``; returns it and the mean loss of each epoch.

  The batches are shuffled by ``(seed, epoch)``, the last incomplete one
  dropped; ``model`` is left untouched. ``loss="deep_sad"`` trains Deep SAD
  with ``method`` (for ``imbsam`` the tail is the labeled anomalies);
  ``"reconstruction"`` an autoencoder.
  """
  model = nnx.clone(model)
  model.train()
  mesh = training.data_parallel_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(
      f"--batch-size: {config.batch_size} is not a multiple of the {mesh.size} devices"
    )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, step = _train_step(graphdef, config, loss, method, float(rho))
  state = training.TrainState(jnp.zeros([], jnp.int32), params, rest, tx.init(params))
  # Copies: the step donates its state, and the clone shares the arrays.
  state = training.replicate(jax.tree.map(jnp.array, state), mesh)
  key = jax.random.key(seed)
  history = []
  for epoch in range(epochs):
    sums: dict[str, Any] = {}
    batches = data.iterate_batches(x, labels, config.batch_size, seed=seed, epoch=epoch)
    for xb, yb in batches:
      batch = training.shard_batch({"image": xb, "label": yb}, mesh)
      state, step_metrics = step(state, batch, key)
      for k, v in step_metrics.items():
        sums[k] = sums[k] + v if k in sums else v
    steps = data.steps_per_epoch(len(x), config.batch_size)
    means = {k: float(v) / steps for k, v in sums.items()}
    history.append(means["loss"])
    if log is not None:
      log.write({"epoch": epoch + 1, **means})
  return nnx.merge(graphdef, state.params, state.model_state), history


def initial_model(
  config: Config, input_shape: Sequence[int], train_x: np.ndarray, seed: int
) -> DeepSAD:
  """The encoder (autoencoder-pretrained if asked) with its centre set."""
  kwargs = {
    "input_shape": tuple(input_shape),
    "features": config.features,
    "norm": config.norm,
    "rngs": nnx.Rngs(seed),
  }
  model = DeepSAD(
    models.DeepSADEncoder(config.rep_dim, **kwargs), rep_dim=config.rep_dim
  )
  if config.pretrain_epochs > 0:
    ae = models.DeepSADAutoencoder(config.rep_dim, **kwargs)
    dummy = np.zeros(len(train_x), np.int32)
    ae, _ = fit(
      ae, train_x, dummy, config, epochs=config.pretrain_epochs, seed=seed,
      loss="reconstruction",
    )  # fmt: skip
    nnx.update(model.encoder, nnx.state(ae.encoder))
  model.center[...] = compute_center(model, train_x, batch_size=config.eval_batch_size)
  return model


# ------------------------------------------------------------- experiment


def known_classes(
  spec: str, normal_class: int, num_classes: int, seed: int
) -> tuple[int, ...]:
  """The labeled-anomaly classes of ``--known-anomaly-classes`` for one draw."""
  anomaly_classes = [c for c in range(num_classes) if c != normal_class]
  if spec == "all":
    return tuple(anomaly_classes)
  if spec == "random":
    rng = np.random.default_rng((seed, normal_class, 1))
    return (int(rng.choice(anomaly_classes)),)
  known = tuple(int(c) for c in spec.split(",") if int(c) != normal_class)
  if not known:
    raise ValueError(
      f"--known-anomaly-classes: none left besides normal class {normal_class}"
    )
  return known


class Draw(NamedTuple):
  """What the methods of one (normal class, ratios, seed) share."""

  train_data: SemiSupervisedData
  model: DeepSAD
  info: dict[str, Any]


def make_draw(
  config: Config, dataset: data.Dataset, normal_class: int, ratio: float,
  pollution: float, seed: int,
) -> Draw:  # fmt: skip
  """The training set and the initial model of one draw."""
  known = known_classes(
    config.known_anomaly_classes, normal_class, dataset.num_classes, seed
  )
  train_data = make_semi_supervised(
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
  model = initial_model(config, dataset.x_train.shape[1:], train_data.x, seed)
  is_anomaly = dataset.y_test != normal_class
  info = {
    "known_anomaly_classes": list(known),
    "num_train": train_data.counts.total,
    **train_data.counts._asdict(),
    "num_test": len(is_anomaly),
    "num_test_anomalies": int(is_anomaly.sum()),
    "init_seconds": round(time.perf_counter() - start, 3),
  }
  return Draw(train_data, model, info)


def train_and_evaluate(
  config: Config, dataset: data.Dataset, curves: list, draws: dict,
  cell: runner.Cell, bar: Any,
) -> dict[str, Any]:  # fmt: skip
  """Trains one cell from its draw's initial model; returns its run entry.

  ``draws`` keeps the last draw: the grid puts the cells that share it together.
  """
  s = cell.setting
  key = (s["normal_class"], s["labeled_anomaly_ratio"], s["pollution"], cell.seed)
  if key not in draws:
    draws.clear()
    draws[key] = make_draw(config, dataset, *key)
  draw = draws[key]
  start = time.perf_counter()
  trained, history = fit(
    draw.model,
    draw.train_data.x,
    draw.train_data.labels,
    config,
    epochs=config.epochs,
    seed=cell.seed,
    method=cell.method,
    rho=s.get("rho", 0.0),
    log=runner.MetricsLog(Path(config.out) / "metrics" / f"{cell.name}.csv"),
  )
  scores = anomaly_scores(trained, dataset.x_test, batch_size=config.eval_batch_size)
  is_anomaly = dataset.y_test != s["normal_class"]
  auc = None
  if np.all(np.isfinite(scores)):
    auc = metrics.auroc(scores, is_anomaly)
    curves.append((cell, metrics.roc_curve(scores, is_anomaly)))
  bar.update(1)
  bar.set_postfix(auroc="not finite" if auc is None else f"{auc:.3f}")
  optimizer = config.base_optimizer if cell.method == "base" else cell.method
  return {
    "optimizer": optimizer,
    "auroc": auc,
    "final_loss": history[-1],
    "train_seconds": round(time.perf_counter() - start, 3),
    "data": draw.info,
    "config": {
      **options.to_json(config),
      **{k: s.get(k) for k in options.sweep_values(config)},
      "method": cell.method,
    },
  }


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Test AUROC, mean ± std over seeds: normal classes x methods.

  The ``mean`` row takes each seed's mean over the normal classes, then the
  mean and spread of those over seeds.
  """
  keys = report.varying(runs, ["rho"])
  methods = list(dict.fromkeys(report.label(r, keys) for r in runs))
  classes = list(dict.fromkeys(r["normal_class"] for r in runs))
  rows = [["normal class", *methods]]
  for c in classes:
    cells = []
    for m in methods:
      values = [
        r["auroc"]
        for r in runs
        if r["normal_class"] == c and report.label(r, keys) == m
      ]
      failed = sum(v is None for v in values)
      cells.append(
        report.cell(report.mean_std(values), digits=3)
        + (f" ({failed} failed)" if failed else "")
      )
    rows.append([str(c), *cells])
  means = []
  for m in methods:
    by_seed: dict[int, list] = {}
    for r in runs:
      if report.label(r, keys) == m:
        by_seed.setdefault(r["seed"], []).append(r["auroc"])
    seed_means = [None if None in v else float(np.mean(v)) for v in by_seed.values()]
    means.append(report.cell(report.mean_std(seed_means), digits=3))
  rows.append(["mean", *means])
  return report.text_table(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results."""
  config = options.parse(
    Config,
    argv,
    prog="train_anomaly.py",
    description="Deep SAD anomaly detection (one normal class, a few labeled"
    " anomalies) with the base optimizer, SAM and ImbSAM (tail = the labeled"
    " anomalies): test AUROC per normal class, mean ± std over seeds.",
  )
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir)
  classes = config.normal_class or tuple(range(dataset.num_classes))
  bad = [c for c in classes if c >= dataset.num_classes]
  if bad:
    raise ValueError(f"--normal-class: {bad} outside [0, {dataset.num_classes})")
  config = dataclasses.replace(config, normal_class=classes)
  out = Path(config.out)
  cells = runner.grid(
    config.method, config.seed, options.sweep_values(config), uses=USES
  )
  curves: list[tuple[runner.Cell, tuple[np.ndarray, np.ndarray]]] = []
  start = time.perf_counter()
  results = runner.run_grid(
    cells,
    functools.partial(train_and_evaluate, config, dataset, curves, {}),
    out=out,
    config=options.to_json(config),
    keys=list(options.sweep_values(config)),
    metrics=["auroc"],
    progress=config.progress,
  )
  runs = results["runs"]
  settings = list(
    dict.fromkeys((r["labeled_anomaly_ratio"], r["pollution"]) for r in runs)
  )
  for ratio, pollution in settings:
    mine = [
      r
      for r in runs
      if (r["labeled_anomaly_ratio"], r["pollution"]) == (ratio, pollution)
    ]
    print(
      f"\nDeep SAD on {config.dataset}, gamma_l {ratio:g}, pollution {pollution:g}:"
      f" test AUROC, mean ± std over seeds {','.join(map(str, config.seed))}"
      f" (base {config.base_optimizer} lr {config.lr:g}, {config.epochs} epochs)"
    )
    print(format_table(mine))
    keys = report.varying(runs, ["rho"])
    panels: dict[str, dict[str, list]] = {}
    for cell, curve in curves:
      s = cell.setting
      if (s["labeled_anomaly_ratio"], s["pollution"]) == (ratio, pollution):
        run = {
          "optimizer": config.base_optimizer if cell.method == "base" else cell.method,
          **s,
        }
        panel = panels.setdefault(f"normal class {s['normal_class']}", {})
        panel.setdefault(report.label(run, keys), []).append(curve)
    name = (
      "roc.png"
      if len(settings) == 1
      else f"roc_gamma_l{ratio:g}_pollution{pollution:g}.png"
    )
    if panels and runner.is_main_process():
      plots.plot_roc_grid(
        dict(sorted(panels.items())), out / name,
        title=f"{config.dataset}: ROC, gamma_l {ratio:g}, pollution {pollution:g}",
      )  # fmt: skip
  print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; wrote {out}/")
  return json.loads(json.dumps(results))
