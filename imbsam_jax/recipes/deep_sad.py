"""Deep SAD (semi-supervised anomaly detection) with SGD/Adam, SAM and ImbSAM.

Deep SAD (Ruff et al., ICLR 2020) trains a bias-free encoder ``phi`` so that
normal data lies close to a fixed centre ``c`` and labeled anomalies far from
it. The per-example loss, with Deep SAD labels ``y`` (+1 labeled normal, -1
labeled anomaly, 0 unlabeled) and ``d = ||phi(x) - c||^2``, is

.. math::
  \\ell = d \\ \\text{if } y = 0, \\qquad
  \\ell = \\eta\\,(d + \\epsilon)^{y} \\ \\text{otherwise},

and the anomaly score is ``d``. ImbSAM treats the labeled anomalies as the tail
(:func:`imbsam_jax.labeled_anomaly_mask`): the perturbation comes from their
gradient alone.

This module holds the pieces of ``examples/train_anomaly.py``:

* :func:`semi_supervised_counts`, :func:`make_semi_supervised`: the Deep SAD
  training set (one normal class, labeled anomalies, pollution);
* :func:`deep_sad_loss`, :func:`center_from_features`, :class:`DeepSAD`,
  :func:`compute_center`, :func:`anomaly_scores`: the method;
* :func:`pretrain_autoencoder`, :func:`train`: the training loops (over
  :func:`imbsam_jax.recipes.training.make_train_step`);
* :class:`DeepSADConfig`, :func:`run_experiment`, :func:`format_table`,
  :func:`~imbsam_jax.recipes.plots.plot_roc_grid`: the sweep, its table and its figure.

References:
  Ruff et al. Deep Semi-Supervised Anomaly Detection. ICLR 2020
  (code: github.com/lukasruff/Deep-SAD-PyTorch).
  Zhou et al. ImbSAM: A Closer Look at Sharpness-Aware Minimization in
  Class-Imbalanced Recognition. ICCV 2023.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import imbsam_jax
from imbsam_jax._priors import LABELED_ANOMALY
from imbsam_jax.recipes import arguments, data, metrics, models, plots, training

#: Deep SAD label of a labeled normal example.
LABELED_NORMAL = 1
#: Deep SAD label of an unlabeled example (normal or pollution).
UNLABELED = 0

#: ``eps`` of the labeled term ``eta * (d + eps)^y`` (Deep SAD's value).
LOSS_EPS = 1e-6
#: Centre coordinates with ``|c_j| < CENTER_EPS`` are set to ``+-CENTER_EPS``.
CENTER_EPS = 0.1

BASE_OPTIMIZERS = ("adam", "sgd")
#: Names of the plain method (no perturbation) accepted by ``optimizers``;
#: results call it by the base optimizer's name.
PLAIN_NAMES = ("sgd", "adam", "base")


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
    encoder: ``phi``, e.g. :class:`imbsam_jax.recipes.models.DeepSADEncoder`.
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

  The ``per_example_loss`` of :func:`imbsam_jax.recipes.training.make_train_step`.
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


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The base optimizer: Adam (Deep SAD's) or SGD with momentum.

  Weight decay is coupled (added to the gradient), like PyTorch's
  ``weight_decay`` in the original code.

  Attributes:
    name: ``"adam"`` or ``"sgd"``.
    learning_rate: constant learning rate. The default, 1e-2, suits the
      digits setting (~140 training images, batches of 32, 50 epochs = 200
      steps); Deep SAD used 1e-4 for MNIST and CIFAR-10 (batch 128, 150
      epochs, a x0.1 drop at epoch 50, and autoencoder pretraining).
    weight_decay: L2 coefficient added to the gradient.
    momentum: SGD momentum (ignored by Adam).
  """

  name: str = "adam"
  learning_rate: float = 1e-2
  weight_decay: float = 0.5e-6
  momentum: float = 0.9

  def build(self) -> optax.GradientTransformation:
    """The Optax transformation.

    Example:
      >>> import optax
      >>> tx = OptimizerConfig("sgd", 0.1).build()
      >>> isinstance(tx, optax.GradientTransformation)
      True
    """
    if self.name == "adam":
      base = optax.adam(self.learning_rate)
    elif self.name == "sgd":
      base = optax.sgd(self.learning_rate, momentum=self.momentum or None)
    else:
      raise ValueError(
        f"base optimizer must be one of {BASE_OPTIMIZERS}, got {self.name!r}."
      )
    if self.weight_decay:
      return optax.chain(optax.add_decayed_weights(self.weight_decay), base)
    return base


@functools.cache
def _train_step(
  graphdef: nnx.GraphDef,
  loss: str,
  method: str,
  optimizer: OptimizerConfig,
  rho: float,
  eta: float,
) -> tuple[optax.GradientTransformation, Callable]:
  """``(tx, jitted step)``, cached so a sweep compiles each method once."""
  if loss == "deep_sad":
    loss_fn = functools.partial(per_example_loss, eta=eta)
  else:
    loss_fn = reconstruction_loss
  tail_mask_fn = imbsam_jax.labeled_anomaly_mask if method == "imbsam" else None
  tx = training.make_optimizer(
    method, optimizer.build(), rho=rho, tail_mask_fn=tail_mask_fn
  )
  step = training.make_train_step(
    graphdef, loss_fn, method, tx, labels_key="label", tail_mask_fn=tail_mask_fn
  )
  return tx, jax.jit(step, donate_argnums=0)


def _fit(
  model: nnx.Module,
  x: np.ndarray,
  labels: np.ndarray,
  *,
  loss: str,
  method: str,
  optimizer: OptimizerConfig,
  epochs: int,
  batch_size: int,
  seed: int,
  rho: float = 0.0,
  eta: float = 1.0,
  on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[nnx.Module, list[float]]:
  """Trains a copy of ``model``; returns it and the mean loss of each epoch."""
  model = nnx.clone(model)
  model.train()
  mesh = training.data_parallel_mesh()
  if batch_size % mesh.size:
    raise ValueError(
      f"batch_size={batch_size} must be a multiple of the {mesh.size} devices."
    )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, step = _train_step(graphdef, loss, method, optimizer, float(rho), float(eta))
  state = training.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    model_state=rest,
    opt_state=tx.init(params),
  )
  # Copies: the step donates its state, and the clone shares the arrays.
  state = training.replicate(jax.tree.map(jnp.array, state), mesh)
  key = jax.random.key(seed)
  history = []
  for epoch in range(epochs):
    epoch_losses = []
    for xb, yb in data.iterate_batches(x, labels, batch_size, seed=seed, epoch=epoch):
      batch = training.shard_batch({"image": xb, "label": yb}, mesh)
      state, step_metrics = step(state, batch, key)
      epoch_losses.append(step_metrics["loss"])
    history.append(float(np.mean(jax.device_get(epoch_losses))))
    if on_epoch is not None:
      on_epoch(epoch, history[-1])
  return nnx.merge(graphdef, state.params, state.model_state), history


def train(
  model: DeepSAD,
  train_data: SemiSupervisedData,
  *,
  method: str = "sgd",
  optimizer: OptimizerConfig = OptimizerConfig(),
  rho: float = 0.01,
  eta: float = 1.0,
  epochs: int = 50,
  batch_size: int = 32,
  seed: int = 0,
  on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[DeepSAD, list[float]]:
  """Trains Deep SAD with ``method`` (``"sgd"``: the base optimizer alone).

  ``model`` is left untouched; the trained copy is returned. The batches are
  shuffled by ``(seed, epoch)`` and the last incomplete batch of each epoch is
  dropped; for ``"imbsam"`` the tail is the labeled anomalies.

  Args:
    model: a :class:`DeepSAD` with its centre set.
    train_data: from :func:`make_semi_supervised`.
    method: ``"sgd"`` (plain base optimizer), ``"sam"`` or ``"imbsam"``.
    optimizer: the base optimizer.
    rho: perturbation radius of SAM / ImbSAM.
    eta: ``eta_sad`` of :func:`deep_sad_loss`.
    epochs: passes over the training set.
    batch_size: examples per step.
    seed: seed of the batch order.
    on_epoch: called with ``(epoch, mean training loss)`` after each epoch.

  Returns:
    ``(trained model, mean training loss per epoch)``.
  """
  return _fit(
    model,
    train_data.x,
    train_data.labels,
    loss="deep_sad",
    method=method,
    optimizer=optimizer,
    epochs=epochs,
    batch_size=batch_size,
    seed=seed,
    rho=rho,
    eta=eta,
    on_epoch=on_epoch,
  )


def pretrain_autoencoder(
  autoencoder: models.DeepSADAutoencoder,
  images: np.ndarray,
  *,
  optimizer: OptimizerConfig = OptimizerConfig(),
  epochs: int = 10,
  batch_size: int = 32,
  seed: int = 0,
) -> tuple[models.DeepSADAutoencoder, list[float]]:
  """Trains an autoencoder on the mean squared reconstruction error.

  As in Deep SAD, on all training images whatever their label. Copy its
  encoder into the Deep SAD model with
  ``nnx.update(model.encoder, nnx.state(ae.encoder))`` (BatchNorm statistics
  included, as the original copies the whole state dict).

  Returns:
    ``(trained autoencoder, mean loss per epoch)``.
  """
  dummy = np.zeros(len(images), np.int32)
  return _fit(
    autoencoder,
    images,
    dummy,
    loss="reconstruction",
    method="sgd",
    optimizer=optimizer,
    epochs=epochs,
    batch_size=batch_size,
    seed=seed,
  )


# ------------------------------------------------------------- experiment


@dataclasses.dataclass(frozen=True)
class DeepSADConfig:
  """One sweep of :func:`run_experiment`: every method x normal class x seed.

  Attributes:
    dataset: a :func:`imbsam_jax.recipes.data.load_dataset` spec.
    data_dir: TFDS data directory.
    normal_classes: the normal class of each experiment.
    known_anomaly_classes: where labeled anomalies come from: ``"random"``
      (one anomaly class per normal class and seed, drawn with the data; Deep
      SAD's ``k_l = 1`` setting), ``"all"`` (every anomaly class) or a tuple of
      classes (the normal class is dropped from it).
    labeled_anomaly_ratio: ``gamma_l``.
    pollution: ``gamma_p``.
    labeled_normal_ratio: ``gamma_n``.
    seeds: one run per seed (data draw, initialisation, batch order).
    optimizers: ``"sgd"`` (or ``"adam"``/``"base"``: the base optimizer
      without perturbation), ``"sam"``, ``"imbsam"``.
    rhos: perturbation radii; SAM and ImbSAM run once per value.
    optimizer: the base optimizer (its name is the plain method's name).
    eta: ``eta_sad``.
    epochs: Deep SAD training epochs (constant learning rate).
    batch_size: training batch size.
    pretrain_epochs: autoencoder pretraining epochs (0: none, the default.
      On digits with the other defaults, 20 pretraining epochs lowered
      Adam's mean AUROC from 0.927 to 0.892 over 10 classes x 3 seeds; Deep
      SAD pretrains 100+ epochs on MNIST/CIFAR-10 with lr 1e-4).
    rep_dim: encoder output dimension.
    features: encoder channels (``None``: the model's default for the
      input's channel count).
    norm: encoder normalisation (``"batch"``, as in Deep SAD).
    eval_batch_size: batch size of the centre and score passes.
  """

  dataset: str = "digits"
  data_dir: str | None = None
  normal_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
  known_anomaly_classes: str | tuple[int, ...] = "random"
  labeled_anomaly_ratio: float = 0.05
  pollution: float = 0.1
  labeled_normal_ratio: float = 0.0
  seeds: tuple[int, ...] = (0, 1, 2)
  optimizers: tuple[str, ...] = ("sgd", "sam", "imbsam")
  rhos: tuple[float, ...] = (0.01,)
  optimizer: OptimizerConfig = OptimizerConfig()
  eta: float = 1.0
  epochs: int = 50
  batch_size: int = 32
  pretrain_epochs: int = 0
  rep_dim: int = 32
  features: tuple[int, ...] | None = None
  norm: str = "batch"
  eval_batch_size: int = 512

  def methods(self) -> list[tuple[str, str, float | None]]:
    """``(display name, training method, rho)`` of every run per setting."""
    out = []
    for name in self.optimizers:
      if name in PLAIN_NAMES:
        if name not in ("sgd", "base", self.optimizer.name):
          raise ValueError(
            f"optimizer {name!r} names a base optimizer other than"
            f" {self.optimizer.name!r}; set the base optimizer instead."
          )
        out.append((self.optimizer.name, "sgd", None))
      elif name in ("sam", "imbsam"):
        out.extend((name, name, float(rho)) for rho in self.rhos)
      else:
        raise ValueError(
          f"unknown optimizer {name!r}; use {', '.join(PLAIN_NAMES)}, sam, imbsam."
        )
    return list(dict.fromkeys(out))  # "sgd" and "adam" may both be given


class RocCurve(NamedTuple):
  """The ROC curve of one run (see :func:`roc_panels`)."""

  optimizer: str
  rho: float | None
  normal_class: int
  seed: int
  fpr: np.ndarray
  tpr: np.ndarray


def _known_classes(
  spec: str | Sequence[int], normal_class: int, num_classes: int, seed: int
) -> tuple[int, ...]:
  anomaly_classes = [c for c in range(num_classes) if c != normal_class]
  if spec == "all":
    return tuple(anomaly_classes)
  if spec == "random":
    rng = np.random.default_rng((seed, normal_class, 1))
    return (int(rng.choice(anomaly_classes)),)
  if isinstance(spec, str):
    raise ValueError(
      f"known_anomaly_classes must be 'random', 'all' or classes, got {spec!r}."
    )
  known = tuple(int(c) for c in spec if int(c) != normal_class)
  if not known:
    raise ValueError(f"no known anomaly class left for normal class {normal_class}.")
  return known


def _run_config(config: DeepSADConfig) -> dict[str, Any]:
  """The JSON-friendly settings shared by all runs of a sweep."""
  return {
    "dataset": config.dataset,
    "labeled_anomaly_ratio": config.labeled_anomaly_ratio,
    "pollution": config.pollution,
    "labeled_normal_ratio": config.labeled_normal_ratio,
    "base_optimizer": config.optimizer.name,
    "learning_rate": config.optimizer.learning_rate,
    "weight_decay": config.optimizer.weight_decay,
    "momentum": config.optimizer.momentum if config.optimizer.name == "sgd" else None,
    "eta": config.eta,
    "epochs": config.epochs,
    "batch_size": config.batch_size,
    "pretrain_epochs": config.pretrain_epochs,
    "rep_dim": config.rep_dim,
    "features": None if config.features is None else list(config.features),
    "norm": config.norm,
    "center_eps": CENTER_EPS,
    "loss_eps": LOSS_EPS,
  }


def run_experiment(
  config: DeepSADConfig,
  *,
  dataset: data.Dataset | None = None,
  progress: bool = True,
  log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[RocCurve]]:
  """Runs every method on every normal class and seed; returns the results.

  For each ``(normal class, seed)`` the data draw, the initial encoder (after
  the optional autoencoder pretraining) and the centre are computed once and
  shared by all methods, which also see the same batches: the comparison is
  paired. Test set: the whole test split, the normal class negative and every
  other class positive (anomalous).

  Args:
    config: the sweep.
    dataset: the loaded ``config.dataset`` (default: load it).
    progress: show a tqdm bar over the runs.
    log: called with one line per finished run (e.g. ``print``), if given.

  Returns:
    ``(results, curves)``: ``results = {"runs": [{"optimizer", "seed",
    "normal_class", "auroc", "config", "data", "train_seconds",
    "final_loss"}, ...]}`` (JSON-ready; ``auroc`` is ``None`` when the scores
    are not finite) and one :class:`RocCurve` per finite run.
  """
  methods = config.methods()
  if dataset is None:
    dataset = data.load_dataset(config.dataset, data_dir=config.data_dir)
  num_classes = dataset.num_classes
  bad = [c for c in config.normal_classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"normal classes {bad} outside [0, {num_classes}).")
  input_shape = dataset.x_train.shape[1:]
  shared = _run_config(config)
  runs, curves = [], []
  total = len(config.normal_classes) * len(config.seeds) * len(methods)
  bar = _progress_bar(total, progress)
  try:
    for normal_class in config.normal_classes:
      is_anomaly = dataset.y_test != normal_class
      for seed in config.seeds:
        known = _known_classes(
          config.known_anomaly_classes, normal_class, num_classes, seed
        )
        train_data = make_semi_supervised(
          dataset.x_train,
          dataset.y_train,
          normal_class=normal_class,
          known_anomaly_classes=known,
          labeled_anomaly_ratio=config.labeled_anomaly_ratio,
          pollution=config.pollution,
          labeled_normal_ratio=config.labeled_normal_ratio,
          seed=(seed, normal_class),
        )
        start = time.perf_counter()
        model = _initial_model(config, input_shape, train_data, seed)
        init_seconds = time.perf_counter() - start
        data_info = {
          "known_anomaly_classes": list(known),
          "num_train": train_data.counts.total,
          **train_data.counts._asdict(),
          "num_test": len(is_anomaly),
          "num_test_anomalies": int(is_anomaly.sum()),
        }
        for name, method, rho in methods:
          start = time.perf_counter()
          trained, history = train(
            model,
            train_data,
            method=method,
            optimizer=config.optimizer,
            rho=0.0 if rho is None else rho,
            eta=config.eta,
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=seed,
          )
          scores = anomaly_scores(
            trained, dataset.x_test, batch_size=config.eval_batch_size
          )
          seconds = time.perf_counter() - start
          finite = bool(np.all(np.isfinite(scores)))
          auc = metrics.auroc(scores, is_anomaly) if finite else None
          if finite:
            fpr, tpr = metrics.roc_curve(scores, is_anomaly)
            curves.append(RocCurve(name, rho, normal_class, seed, fpr, tpr))
          runs.append(
            {
              "optimizer": name,
              "seed": seed,
              "normal_class": normal_class,
              "auroc": auc,
              "config": {
                **shared,
                "method": method,
                "rho": rho,
                "normal_class": normal_class,
                "seed": seed,
              },
              "data": data_info,
              "final_loss": history[-1] if history else None,
              "train_seconds": seconds,
              "init_seconds": init_seconds,
            }
          )
          label = _column_label(name, rho)
          auc_text = "not finite" if auc is None else f"{auc:.4f}"
          if bar is not None:
            bar.set_postfix_str(f"class {normal_class} seed {seed} {label} {auc_text}")
            bar.update()
          if log is not None:
            log(
              f"normal class {normal_class} seed {seed} {label}: AUROC"
              f" {auc_text} ({seconds:.1f} s)"
            )
  finally:
    if bar is not None:
      bar.close()
  return {"runs": runs}, curves


def _progress_bar(total: int, enabled: bool) -> Any:
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc="Deep SAD runs", unit="run")


def _initial_model(
  config: DeepSADConfig,
  input_shape: Sequence[int],
  train_data: SemiSupervisedData,
  seed: int,
) -> DeepSAD:
  """The encoder (pretrained if asked) with its centre computed."""
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
    ae, _ = pretrain_autoencoder(
      ae,
      train_data.x,
      optimizer=config.optimizer,
      epochs=config.pretrain_epochs,
      batch_size=config.batch_size,
      seed=seed,
    )
    nnx.update(model.encoder, nnx.state(ae.encoder))
  model.center[...] = compute_center(
    model, train_data.x, batch_size=config.eval_batch_size
  )
  return model


# ------------------------------------------------------------ reporting


def _column_label(name: str, rho: float | None) -> str:
  return name if rho is None else f"{name} rho={rho:g}"


def summarize(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """AUROC statistics per method: per normal class and over all classes.

  For each method (``optimizer``, and ``rho`` when set) and normal class:
  mean and standard deviation (``ddof=0``) over seeds. ``"all"``: for each
  seed the mean over the normal classes, then mean and standard deviation of
  those over seeds. Runs whose AUROC is ``None`` (not finite) are counted in
  ``"failed"`` and left out.

  Returns:
    ``{method label: {normal class or "all": {"mean", "std", "n", "failed"}}}``.

  Example:
    >>> runs = [{"optimizer": "adam", "normal_class": c, "seed": s,
    ...          "auroc": a, "config": {"rho": None}}
    ...         for c, s, a in [(0, 0, 0.8), (0, 1, 0.9), (1, 0, 0.6), (1, 1, 0.7)]]
    >>> s = summarize({"runs": runs})["adam"]
    >>> round(s[0]["mean"], 3), round(s[0]["std"], 3), round(s["all"]["mean"], 3)
    (0.85, 0.05, 0.75)
  """
  table: dict[str, dict[Any, dict[str, Any]]] = {}
  grouped: dict[str, dict[int, dict[int, float | None]]] = {}
  for run in results["runs"]:
    label = _column_label(run["optimizer"], run["config"].get("rho"))
    grouped.setdefault(label, {}).setdefault(run["normal_class"], {})[run["seed"]] = (
      run["auroc"]
    )
  for label, by_class in grouped.items():
    rows: dict[Any, dict[str, Any]] = {}
    per_seed: dict[int, list[float | None]] = {}
    for normal_class, by_seed in sorted(by_class.items()):
      rows[normal_class] = _stats(by_seed.values())
      for seed, value in by_seed.items():
        per_seed.setdefault(seed, []).append(value)
    seed_means = [
      None if any(v is None for v in values) else float(np.mean(values))
      for values in per_seed.values()
    ]
    rows["all"] = _stats(seed_means)
    table[label] = rows
  return table


def _stats(values: Iterable[float | None]) -> dict[str, Any]:
  values = list(values)
  finite = [v for v in values if v is not None]
  return {
    "mean": float(np.mean(finite)) if finite else None,
    "std": float(np.std(finite)) if finite else None,
    "n": len(finite),
    "failed": len(values) - len(finite),
  }


def format_table(results: Mapping[str, Any]) -> str:
  """A text table of :func:`summarize`: normal classes x methods, mean +- std.

  Example:
    >>> runs = [{"optimizer": o, "normal_class": 0, "seed": s, "auroc": a,
    ...          "config": {"rho": r}}
    ...         for o, r, s, a in [("adam", None, 0, 0.8), ("adam", None, 1, 0.9),
    ...                            ("imbsam", 0.01, 0, 0.9), ("imbsam", 0.01, 1, 0.9)]]
    >>> print(format_table({"runs": runs}))
    normal class  adam             imbsam rho=0.01
    0             0.850 ± 0.050    0.900 ± 0.000
    mean          0.850 ± 0.050    0.900 ± 0.000
  """
  table = summarize(results)
  labels = list(table)
  rows = [k for k in next(iter(table.values())) if k != "all"] if table else []
  width = max([14, *(len(label) + 2 for label in labels)])

  def cell(stats: Mapping[str, Any] | None) -> str:
    if stats is None or stats["mean"] is None:
      return "n/a"
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    if stats["failed"]:
      text += f" ({stats['failed']} failed)"
    return text

  lines = ["normal class  " + "".join(label.ljust(width) for label in labels)]
  for key in [*rows, "all"]:
    name = "mean" if key == "all" else str(key)
    cells = [cell(table[label].get(key)) for label in labels]
    lines.append(name.ljust(14) + "".join(c.ljust(width) for c in cells))
  return "\n".join(line.rstrip() for line in lines)


def roc_panels(
  curves: Sequence[RocCurve],
) -> dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
  """Groups run curves by normal class, then method, for ROC plots.

  Example:
    >>> c = RocCurve("adam", None, 3, 0, np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    >>> {k: list(v) for k, v in roc_panels([c]).items()}
    {'normal class 3': ['adam']}
  """
  panels: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {}
  for c in sorted(curves, key=lambda c: c.normal_class):
    panel = panels.setdefault(f"normal class {c.normal_class}", {})
    panel.setdefault(_column_label(c.optimizer, c.rho), []).append((c.fpr, c.tpr))
  return panels


# ------------------------------------------------------------ command line

#: Name of the results file written by :func:`main`.
RESULTS_FILE = "results.json"


def _classes(text: str) -> str | tuple[int, ...]:
  return text if text in ("all", "random") else arguments.int_list(text)


def build_parser() -> argparse.ArgumentParser:
  """The command line of ``examples/train_anomaly.py``."""
  d = DeepSADConfig()
  o = d.optimizer
  p = argparse.ArgumentParser(
    description=(
      "Deep SAD semi-supervised anomaly detection (one normal class, a few"
      " labeled anomalies) trained with the base optimizer alone, SAM and"
      " ImbSAM (tail = labeled anomalies). Prints test AUROC per normal class"
      " (mean ± std over seeds), writes OUT/results.json and OUT/roc.png."
    ),
    formatter_class=arguments.HelpFormatter,
  )
  a = p.add_argument
  a(
    "--dataset",
    default=d.dataset,
    help=f"digits (embedded, offline) or any of {', '.join(data.valid_specs())}",
  )
  a("--data-dir", default=None, help="TFDS data directory")
  a(
    "--normal-class",
    type=_classes,
    default="all",
    help="comma-separated normal classes, one experiment each, or 'all'",
  )
  a(
    "--known-anomaly-classes",
    type=_classes,
    default=d.known_anomaly_classes,
    help=(
      "classes of the labeled anomalies: 'random' (one anomaly class per"
      " normal class and seed, Deep SAD's k_l=1), 'all', or a comma-separated"
      " list (the normal class is dropped from it)"
    ),
  )
  a(
    "--labeled-anomaly-ratio",
    type=arguments.float_list,
    default=str(d.labeled_anomaly_ratio),
    help=(
      "gamma_l: labeled anomalies among all training examples; several"
      " values (e.g. 0.01,0.05,0.1,0.2) run one sweep each"
    ),
  )
  a(
    "--pollution",
    type=float,
    default=d.pollution,
    help="gamma_p: anomalies among the unlabeled training examples",
  )
  a(
    "--labeled-normal-ratio",
    type=float,
    default=d.labeled_normal_ratio,
    help="gamma_n: labeled normal examples among all training examples",
  )
  a("--seeds", type=arguments.int_list, default="0,1,2", help="comma-separated seeds")
  a(
    "--optimizer",
    type=arguments.str_list,
    default=",".join(d.optimizers),
    help=(
      "comma-separated methods: sgd (= the base optimizer without"
      " perturbation; reported under the base optimizer's name), sam, imbsam"
    ),
  )
  a("--base-optimizer", choices=BASE_OPTIMIZERS, default=o.name)
  a(
    "--rho",
    type=arguments.float_list,
    default=",".join(map(str, d.rhos)),
    help="SAM/ImbSAM radius; several values (e.g. 0.005,0.01,0.05) run each",
  )
  a("--lr", type=float, default=o.learning_rate, help="constant learning rate")
  a("--weight-decay", type=float, default=o.weight_decay, help="coupled L2")
  a("--momentum", type=float, default=o.momentum, help="SGD momentum")
  a(
    "--eta-sad",
    type=float,
    default=d.eta,
    help="Deep SAD's weight eta of the labeled examples' loss",
  )
  a("--epochs", type=int, default=d.epochs)
  a("--batch-size", type=int, default=d.batch_size)
  a(
    "--pretrain-epochs",
    type=int,
    default=d.pretrain_epochs,
    help="autoencoder pretraining epochs (0: none)",
  )
  a("--rep-dim", type=int, default=d.rep_dim, help="encoder output dimension")
  a(
    "--features",
    type=arguments.int_list,
    default=None,
    help="encoder conv channels (default: 8,4 for grey images, 32,64,128 for colour)",
  )
  a("--norm", choices=("batch", "group", "none"), default=d.norm)
  a("--eval-batch-size", type=int, default=d.eval_batch_size)
  a("--out", default="runs/anomaly", help="output directory")
  a("--no-progress", action="store_true", help="no progress bar")
  return p


def config_from_args(
  args: argparse.Namespace, num_classes: int | None = None
) -> DeepSADConfig:
  """A :class:`DeepSADConfig` (the first labeled-anomaly ratio) from ``args``.

  ``num_classes`` resolves ``--normal-class all``.
  """
  normal = args.normal_class
  if normal == "random":
    raise ValueError("--normal-class takes class indices or 'all'.")
  if normal == "all":
    if num_classes is None:
      raise ValueError("--normal-class all needs the number of classes.")
    normal = tuple(range(num_classes))
  optimizer = OptimizerConfig(
    name=args.base_optimizer,
    learning_rate=args.lr,
    weight_decay=args.weight_decay,
    momentum=args.momentum,
  )
  config = DeepSADConfig(
    dataset=args.dataset,
    data_dir=args.data_dir,
    normal_classes=tuple(normal),
    known_anomaly_classes=args.known_anomaly_classes,
    labeled_anomaly_ratio=args.labeled_anomaly_ratio[0],
    pollution=args.pollution,
    labeled_normal_ratio=args.labeled_normal_ratio,
    seeds=tuple(args.seeds),
    optimizers=tuple(args.optimizer),
    rhos=tuple(args.rho),
    optimizer=optimizer,
    eta=args.eta_sad,
    epochs=args.epochs,
    batch_size=args.batch_size,
    pretrain_epochs=args.pretrain_epochs,
    rep_dim=args.rep_dim,
    features=None if args.features is None else tuple(args.features),
    norm=args.norm,
    eval_batch_size=args.eval_batch_size,
  )
  config.methods()  # validates the optimizer names
  return config


def describe(config: DeepSADConfig) -> str:
  """One line naming the setting of a table."""
  o = config.optimizer
  known = config.known_anomaly_classes
  known = known if isinstance(known, str) else ",".join(map(str, known))
  return (
    f"Deep SAD on {config.dataset}: test AUROC, mean ± std over seeds"
    f" {','.join(map(str, config.seeds))} (mean row: per-seed mean over normal"
    f" classes). Base {o.name} lr {o.learning_rate:g}, {config.epochs} epochs,"
    f" batch {config.batch_size}, pretrain {config.pretrain_epochs} epochs;"
    f" gamma_l {config.labeled_anomaly_ratio:g}, pollution {config.pollution:g},"
    f" gamma_n {config.labeled_normal_ratio:g}, labeled anomalies from {known}."
  )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs, returns the results dict.

  Writes ``OUT/results.json`` (``{"runs": [...]}``) and one ROC figure per
  labeled-anomaly ratio (``OUT/roc.png``, or ``OUT/roc_gamma_l{r}.png`` for
  several ratios), and prints a table per ratio.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  dataset = data.load_dataset(args.dataset, data_dir=args.data_dir)
  try:
    base = config_from_args(args, dataset.num_classes)
  except ValueError as e:
    parser.error(str(e))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  ratios = args.labeled_anomaly_ratio
  runs: list[dict[str, Any]] = []
  start = time.perf_counter()
  for ratio in ratios:
    config = dataclasses.replace(base, labeled_anomaly_ratio=ratio)
    results, curves = run_experiment(
      config, dataset=dataset, progress=not args.no_progress
    )
    runs += results["runs"]
    name = "roc.png" if len(ratios) == 1 else f"roc_gamma_l{ratio:g}.png"
    print(f"\n{describe(config)}\n{format_table(results)}")
    if curves:
      plots.plot_roc_grid(
        roc_panels(curves),
        out / name,
        title=f"{config.dataset}: ROC, gamma_l {ratio:g}, pollution"
        f" {config.pollution:g}",
      )
  results = {"runs": runs}
  (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
  print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; wrote {out}/")
  return results


def cli() -> None:
  """``main`` for a console: data and configuration errors end in a message."""
  try:
    main(sys.argv[1:])
  except (RuntimeError, ValueError) as e:
    sys.exit(f"error: {e}")
