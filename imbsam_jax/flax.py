"""ImbSAM in Flax training steps: NNX and Linen helpers.

Optional: ``import imbsam_jax.flax`` needs Flax; ``import imbsam_jax`` does not.

- NNX: :func:`nnx_loss_fn` builds the pure ``loss_fn(params, batch)`` that
  ImbSAM's update evaluates at perturbed parameters, from a model and a
  per-example loss, for ``nnx.Optimizer.update(model, grads, loss_fn=..., ...)``.
- Linen: :class:`TrainState`, whose ``apply_gradients`` passes ImbSAM's keyword
  arguments on to ``tx.update``.
- BatchNorm networks on the fast path (``tail_capacity``), below: NNX
  :func:`nnx_value_and_grad_with_clean_stats` (or ``nnx_loss_fn(...,
  with_clean_stats=True)``) for the clean pass and ``nnx_loss_fn(...,
  clean_stats=...)`` for the tail passes; Linen
  :func:`linen_apply_recording_clean_stats` and
  :func:`linen_apply_with_clean_stats`.

BatchNorm on the fast path: anchored tail statistics
----------------------------------------------------

The reference step evaluates the tail loss at ``w + e`` on the full batch in
training mode: every BatchNorm layer normalizes with the full batch's
statistics, recomputed at ``w + e``, and the gradient flows through them. A
pass over the gathered tail examples alone cannot recompute them. In the tail
passes built here, each BatchNorm layer normalizes its input ``x`` with
statistics of the *tail rows* it is given (rows of nonzero tail weight),
computed live, then maps them affinely onto the clean pass's full-batch
statistics, with the map fixed (stop-gradient) at the clean point ``w``:

.. math::
  \\hat x = \\frac{x - \\mu_T(x)}{\\sigma_T(x)} \\frac{\\sigma_T^w}{\\sigma_B^w}
  + \\frac{\\mu_T^w - \\mu_B^w}{\\sigma_B^w}, \\qquad
  \\sigma = \\sqrt{\\mathrm{var} + \\epsilon},

``mu_B^w, sigma_B^w`` the batch statistics and ``mu_T^w, sigma_T^w`` the tail
rows' statistics, both recorded by the clean pass (the "clean statistics").
Hence:

- at ``w`` the tail passes compute what the clean pass computed for the tail
  examples (the map is the identity there, up to rounding), and at ``rho = 0``
  the two tail gradients cancel exactly: the step is the base optimizer's;
- the normalization stays invariant to shifting and scaling a channel, as in
  training mode (statistics that follow the perturbation): a perturbation that
  rescales a channel is normalized away, as the reference does. It assumes
  that the batch's statistics move with the tail rows' ones;
- the losses depend on the tail rows passed together, not on the head
  examples: the tail passes may run on the gathered tail examples
  (``tail_capacity``), where they equal the full-batch result unless the tail
  overflows one chunk of ``k`` (each chunk then normalizes with its own tail
  rows); on a full batch with every row in the tail (a soft mask, or SAM) they
  are the exact training-mode passes.

Measured error: cosine similarity of the approximate and the exact ``imbsam``
gradient (and, after the slash, of their ImbSAM corrections ``g - grad L(w)``),
BatchNorm CIFAR ResNet-8 (width 16), batch 128, ``rho = 0.05``, synthetic
10-class 32x32 images, mean over 5 batches, at initialisation / after 150 /
after 600 SGD steps: 3% tail 1.0000 / 0.52, 0.9925 / 0.79, 0.977 / 0.79; 20%
tail 1.0000 / 0.81, 0.9973 / 0.93, 0.9972 / 0.91 (the clean gradient alone:
0.982 and 0.934 with a 3% tail after 150 and 600 steps). The statistics of the
clean pass held fixed instead (BatchNorm in evaluation mode on them) lose the
invariance: 0.41 and 0.14 (3%), 0.18 and 0.09 (20%) after 150 and 600 steps.
On a much smaller network (``tests/test_batchnorm.py``) the approximation
error can exceed ImbSAM's correction itself: measure on your model.

Requirements: the tail rows of a batch are given by ``tail_mask``, the weights
of ImbSAM's ``tail_mask_fn``; the batch is the leading axis of every
BatchNorm input; each BatchNorm layer runs once per forward pass, not inside
an NNX transform (``nnx.remat``, ``nnx.scan``) of the loss; its mode comes
from its ``use_running_average`` attribute (NNX: ``model.train()``; Linen: the
constructor or call argument, both handled). A BatchNorm over the batch axis
alone (dense features) normalizes a single tail example to a constant; the
scheme is meant for convolutional BatchNorm (statistics over space too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from flax.nnx import filterlib
from flax.training import train_state

__all__ = [
  "CleanStats",
  "TrainState",
  "linen_apply_recording_clean_stats",
  "linen_apply_with_clean_stats",
  "nnx_loss_fn",
  "nnx_value_and_grad_with_clean_stats",
]

#: Statistics of a clean pass, per BatchNorm layer (keyed by its path, parts
#: joined with ``/``): the batch ``mean`` and ``var`` it normalized with and
#: the ``tail_mean`` and ``tail_var`` of its tail rows (float32, no gradient).
#: A layer that ran in evaluation mode has only ``mean`` and ``var``.
CleanStats = dict[str, dict[str, jax.Array]]


# --- BatchNorm statistics (NNX and Linen) -----------------------------------


def _path_key(path: Any) -> str:
  return "/".join(str(part) for part in path)


def _feature_axes(axis: Any, ndim: int) -> tuple[int, ...]:
  axes = axis if isinstance(axis, (tuple, list)) else (axis,)
  return tuple(sorted(a % ndim for a in axes))


def _tail_rows(tail_mask: Any, size: int) -> jax.Array:
  """Checks tail weights of the rows and returns them as a bool mask."""
  rows = jnp.asarray(tail_mask)
  if rows.shape != (size,):
    raise ValueError(
      f"tail_mask must hold one tail weight per row of the batch, shape ({size},),"
      f" got {rows.shape}."
    )
  return rows > 0


def _tail_stats(x: jax.Array, rows: jax.Array, axis: Any) -> tuple[jax.Array, ...]:
  """Mean and variance of ``x`` over its tail rows, per feature, in float32.

  Rows are axis 0; the statistics reduce every axis but the features, over the
  rows where ``rows`` is true (two-pass variance). No tail row: mean and
  variance 0 (finite, and weighted by zero tail weights anyway).
  """
  x = jnp.asarray(x)
  if rows.shape != (x.shape[0],):
    raise ValueError(
      f"tail_mask has {rows.shape[0]} rows, the BatchNorm input {x.shape[0]}:"
      " the batch must be the leading axis."
    )
  features = _feature_axes(axis, x.ndim)
  if 0 in features:
    raise ValueError("BatchNorm's feature axis must not be the batch axis 0.")
  reduce = tuple(i for i in range(x.ndim) if i not in features)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  member = rows.reshape((-1,) + (1,) * (x.ndim - 1))
  per_row = math.prod(x.shape[i] for i in reduce if i != 0)
  count = jnp.maximum(jnp.sum(rows).astype(x.dtype) * per_row, 1.0)
  mean = jnp.sum(jnp.where(member, x, 0.0), reduce) / count
  centered = jnp.where(member, x - jnp.expand_dims(mean, reduce), 0.0)
  var = jnp.sum(jnp.square(centered), reduce) / count
  return mean, var


def _anchored_stats(
  x: jax.Array, rows: jax.Array, axis: Any, clean: Mapping[str, jax.Array], eps: float
) -> tuple[jax.Array, jax.Array]:
  """The statistics a tail pass normalizes ``x`` with (see the module doc).

  ``(x - mean) / sqrt(var + eps)`` is the tail rows' standardized ``x`` mapped
  onto the clean pass's batch statistics; at the clean point, ``(mean, var)``
  are the clean batch statistics (up to rounding). Layers that ran in
  evaluation mode in the clean pass keep its statistics.
  """
  if "tail_mean" not in clean:
    return clean["mean"], clean["var"]
  tail_mean, tail_var = _tail_stats(x, rows, axis)
  ratio = jnp.sqrt(tail_var + eps) / jnp.sqrt(clean["tail_var"] + eps)
  mean = tail_mean - (clean["tail_mean"] - clean["mean"]) * ratio
  var = jnp.square(jnp.sqrt(clean["var"] + eps) * ratio) - eps
  return mean, var


def _clean_entry(
  clean_stats: Mapping[str, Any], key: str, kind: str
) -> Mapping[str, jax.Array]:
  entry = clean_stats.get(key) if isinstance(clean_stats, Mapping) else None
  if entry is None:
    raise ValueError(
      f"clean_stats has no statistics for the BatchNorm layer at {key!r}: pass"
      f" the clean_stats of this model's clean pass ({kind})."
    )
  return entry


# --- NNX ---------------------------------------------------------------------


def _value(variable: nnx.Variable) -> Any:
  """The array a Variable holds (``get_value`` from Flax 0.12.x on)."""
  get = getattr(variable, "get_value", None)
  return get() if get is not None else variable.value


def _batch_norms(model: Any) -> list[tuple[tuple[Any, ...], nnx.BatchNorm]]:
  """``(path, layer)`` of every :class:`nnx.BatchNorm` in ``model``, once each."""
  return [
    (tuple(path), node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.BatchNorm)
  ]


class _Slot:
  """Per-layer, per-pass data of the two BatchNorm variants below (static)."""

  def __init__(self, key: str, rows: jax.Array, clean: Any = None):
    self.key, self.rows, self.clean = key, rows, clean
    self.tail: tuple[jax.Array, jax.Array] | None = None


def _training(layer: nnx.BatchNorm, use_running_average: bool | None) -> bool:
  flag = (
    layer.use_running_average if use_running_average is None else use_running_average
  )
  return not flag


@functools.cache
def _recording_class(cls: type) -> type:
  """``cls`` (nnx.BatchNorm or a subclass) that also records its tail rows'
  statistics: the clean pass.

  Only ever the class of a BatchNorm in a throwaway copy of the model, whose
  momentum is 0 there, so that it stores its batch statistics exactly.
  """

  def __call__(self, x, use_running_average=None, *, mask=None):
    slot = self._imbsam_slot
    if _training(self, use_running_average):
      stats = _tail_stats(x, slot.rows, self.axis)
      slot.tail = jax.tree.map(jax.lax.stop_gradient, stats)
    return cls.__call__(self, x, use_running_average, mask=mask)

  return type(f"_Recording{cls.__name__}", (cls,), {"__call__": __call__})


@functools.cache
def _anchored_class(cls: type) -> type:
  """``cls`` (nnx.BatchNorm or a subclass) on anchored tail statistics: the
  tail passes (a throwaway copy of the model too)."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    slot = self._imbsam_slot
    if use_running_average is False:
      raise RuntimeError(
        f"BatchNorm at {slot.key!r} got use_running_average=False at call time in"
        " a tail pass of nnx_loss_fn(..., clean_stats=...), which sets its"
        " normalization itself. Let the layer take its mode from its"
        " use_running_average attribute (model.train() / model.eval())."
      )
    mean, var = _anchored_stats(x, slot.rows, self.axis, slot.clean, self.epsilon)
    self.mean[...] = mean
    self.var[...] = var
    return cls.__call__(self, x, True, mask=mask)

  return type(f"_Anchored{cls.__name__}", (cls,), {"__call__": __call__})


@contextlib.contextmanager
def _recording(model: Any, rows: jax.Array) -> Iterator[list[CleanStats]]:
  """Records the clean statistics of every BatchNorm of ``model`` in one pass.

  During the pass each layer has momentum 0, so that it stores exactly the
  batch mean and variance it normalizes with (``0 * old + 1 * batch``), and
  records its tail rows' statistics. Afterwards its running averages are what
  the layer itself would have stored, ``momentum * old + (1 - momentum) *
  batch`` (Flax's formula), and the yielded list holds the clean statistics.
  A layer that ran in evaluation mode keeps its running averages, which are
  then also the statistics it normalized with.
  """
  saved = []
  for path, layer in _batch_norms(model):
    key = _path_key(path)
    cls = type(layer)
    saved.append(
      (layer, cls, key, layer.momentum, _value(layer.mean), _value(layer.var))
    )
    layer.momentum = 0.0
    layer._imbsam_slot = _Slot(key, rows)
    layer.__class__ = _recording_class(cls)
  result: list[CleanStats] = []
  try:
    yield result
  finally:
    for layer, cls, _, momentum, *_ in saved:
      layer.__class__ = cls
      layer.momentum = momentum
  stats: CleanStats = {}
  for layer, _, key, momentum, old_mean, old_var in saved:
    slot = layer._imbsam_slot
    if slot.tail is None:  # evaluation mode: normalized with the running averages
      stats[key] = {"mean": old_mean, "var": old_var}
      continue
    mean, var = _value(layer.mean), _value(layer.var)
    stats[key] = jax.tree.map(
      jax.lax.stop_gradient,
      {"mean": mean, "var": var, "tail_mean": slot.tail[0], "tail_var": slot.tail[1]},
    )
    layer.mean[...] = momentum * old_mean + (1 - momentum) * mean
    layer.var[...] = momentum * old_var + (1 - momentum) * var
  result.append(stats)


def _anchor(model: Any, rows: jax.Array, clean_stats: CleanStats) -> None:
  """Makes every BatchNorm of ``model`` normalize with anchored tail statistics."""
  for path, layer in _batch_norms(model):
    key = _path_key(path)
    entry = _clean_entry(clean_stats, key, "nnx_loss_fn(..., with_clean_stats=True)")
    clean = jax.tree.map(jax.lax.stop_gradient, dict(entry))
    layer._imbsam_slot = _Slot(key, rows, clean)
    layer.__class__ = _anchored_class(type(layer))


def _normalizes_with_batch(model: Any) -> bool:
  """Whether a BatchNorm of ``model`` is in training mode (batch statistics)."""
  return any(_training(layer, None) for _, layer in _batch_norms(model))


def _rng_counts(model: Any) -> list[tuple[tuple[Any, ...], nnx.RngCount]]:
  """``(path, variable)`` of every RNG stream's counter in ``model``, once each."""
  return [
    (tuple(path), node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.RngCount)
  ]


def _rewind(
  model: Any, per_example_loss: Callable[[Any, Any], Any], probe: Any, batch: Any
) -> None:
  """Sets each RNG stream of ``model`` back by the keys one pass draws.

  The draws are counted on ``probe``, a second copy, in the same trace: its
  forward pass feeds nothing but the counters (XLA removes it), and it
  counts streams used inside JAX transforms too (``nnx.scan`` over layers).
  """
  before = {path: _value(counter) for path, counter in _rng_counts(probe)}
  per_example_loss(probe, batch)
  after = dict(_rng_counts(probe))
  for path, counter in _rng_counts(model):
    drawn = _value(after[path]) - before[path]
    counter[...] = _value(counter) - drawn


def nnx_loss_fn(
  model: nnx.Module | nnx.GraphDef,
  per_example_loss: Callable[[Any, Any], Any],
  rest: Any = None,
  *,
  wrt: filterlib.Filter = nnx.Param,
  has_aux: bool = False,
  with_state: bool = False,
  tail_mask: Callable[[Any], jax.Array] | None = None,
  with_clean_stats: bool = False,
  clean_stats: CleanStats | None = None,
) -> Callable[[Any, Any], Any]:
  """The pure ``loss_fn(params, batch)`` of an NNX model, for ImbSAM's update.

  .. math::
    \\text{loss\\_fn}(w, b) = \\text{per\\_example\\_loss}(
    \\text{merge}(\\text{graphdef}, w, \\text{rest}), b)

  Each call merges a fresh copy of the model (``nnx.merge(..., copy=True)``;
  without the copy, Flax raises a ``TraceContextError`` under ``jit`` and
  ``grad``), so the variables the passes update, e.g. BatchNorm statistics,
  are discarded: ImbSAM's passes at ``w`` and ``w + e`` leave the model as the
  caller's clean pass left it. Build the function inside the training step, from
  the step's model, with the ``wrt`` filter of the ``nnx.Optimizer``.

  Randomness (dropout): built from a model, the function reads the model's
  variables when it is called (ImbSAM calls it after the step's clean pass)
  and sets its RNG streams back by the keys one pass draws, so both tail
  passes draw the random numbers of the model's last forward pass: the clean
  pass's dropout masks, whether the function is built before or after that
  pass, and ``g_head + g_T(w)`` is the clean gradient of one network. (Make the
  clean pass the model's last forward pass before the update.) Built from a
  ``graphdef`` and ``rest``, it uses ``rest`` as given: pass the ``rest`` the
  clean pass started from. The clean-pass functions (``with_state``,
  ``with_clean_stats``) draw as a plain pass does. On the fast path
  (``tail_capacity``) the tail passes see ``k`` gathered rows, whose masks
  (drawn with the same keys for a smaller batch) are not the clean pass's;
  both tail passes still share them, so ``rho = 0`` stays the base step.

  Batch statistics: a model with a BatchNorm in training mode makes each loss
  depend on the whole batch; the returned function then has
  ``per_example = False`` and ``imbsam(..., tail_capacity=...)`` refuses it
  (pass ``clean_stats=`` for the anchored statistics below, or use the exact
  path).

  BatchNorm on the fast path (``tail_capacity``): the clean pass built with
  ``with_clean_stats=True`` also returns the clean statistics of every
  :class:`nnx.BatchNorm` (its running averages are updated exactly as in a
  plain training pass); the tail passes built with ``clean_stats=`` those
  statistics normalize with anchored tail statistics, so that they need the
  tail examples only (an approximation of the reference; see this module's
  documentation). Both need ``tail_mask``. Without BatchNorm layers they change
  nothing.

  Args:
    model: the model, split here into ``graphdef``, parameters (``wrt``) and
      ``rest`` (all other variables); or a ``graphdef`` from
      ``nnx.split(model, wrt, ...)``, with ``rest`` given.
    per_example_loss: ``(model, batch) -> (B,)`` per-example losses, or
      ``-> ((B,), aux)`` with ``has_aux=True``.
    rest: with a ``graphdef``, the last part of ``nnx.split(model, wrt, ...)``.
    wrt: the filter of the parameters ``loss_fn`` takes.
    has_aux: whether ``per_example_loss`` returns ``(losses, aux)``.
    with_state: also return the copy's variables other than ``wrt`` after the
      pass (e.g. updated BatchNorm statistics), for a pure clean pass.
    tail_mask: ``batch -> (B,)`` tail weights of the batch's rows, the ones
      ImbSAM's ``tail_mask_fn`` gives (e.g. ``lambda b: mask_fn(b["y"])``).
    with_clean_stats: also return the clean statistics (:data:`CleanStats`)
      of the pass (for the clean pass).
    clean_stats: clean statistics of this step's clean pass (for the tail
      passes).

  Returns:
    ``loss_fn(params, batch)`` returning the ``(B,)`` losses, or ``(losses,
    extra)``: ``extra`` is ``aux`` (``has_aux``), the state (``with_state``)
    or the clean statistics (``with_clean_stats``) when one is asked for, and
    the tuple of those asked for, in that order, otherwise.

  Example:
    >>> import jax.numpy as jnp, optax, imbsam_jax
    >>> from flax import nnx
    >>> import imbsam_jax.flax
    >>> model = nnx.Sequential(
    ...     nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...     nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
    ...     nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> tx = imbsam_jax.imbsam(optax.sgd(0.1), rho=0.05, tail_mask_fn=mask_fn)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def per_example_loss(model, batch):
    ...   logits = model(batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> @nnx.jit
    ... def train_step(model, optimizer, batch):
    ...   loss_fn = imbsam_jax.flax.nnx_loss_fn(model, per_example_loss)
    ...   grads = nnx.grad(lambda m: per_example_loss(m, batch).mean())(model)
    ...   optimizer.update(
    ...       model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
    >>> batch = {"x": jnp.ones((6, 4)), "y": jnp.array([0, 0, 1, 2, 0, 1])}
    >>> train_step(model, optimizer, batch)
    >>> int(optimizer.step[...])
    1
  """
  live = not isinstance(model, nnx.GraphDef)
  if not live:
    if rest is None:
      raise ValueError(
        "nnx_loss_fn(graphdef, per_example_loss, rest) needs rest, the last part"
        " of nnx.split(model, wrt, ...)."
      )
  elif rest is not None:
    raise TypeError("rest is taken from the model: pass it only with a graphdef.")
  if with_clean_stats and clean_stats is not None:
    raise ValueError(
      "with_clean_stats records the statistics of the clean pass, clean_stats="
      " normalizes the tail passes with them: pass one of them."
    )
  if (with_clean_stats or clean_stats is not None) and not callable(tail_mask):
    raise ValueError(
      "with_clean_stats and clean_stats need tail_mask, batch -> (B,) tail"
      " weights of the rows (e.g. lambda batch: tail_mask_fn(batch['y']))."
    )
  # A tail pass of a model replays the random numbers of its last forward pass.
  replay = live and not (with_state or with_clean_stats)

  def loss_fn(params: Any, batch: Any) -> Any:
    if live:  # the model as it is now: after the step's clean pass
      graph, _, state = nnx.split(model, wrt, ...)
    else:
      graph, state = model, rest
    copy = nnx.merge(graph, params, state, copy=True)
    if clean_stats is None:
      loss_fn.per_example = not _normalizes_with_batch(copy)
    if replay and _rng_counts(copy):
      probe = nnx.merge(graph, jax.lax.stop_gradient(params), state, copy=True)
      _rewind(copy, per_example_loss, probe, batch)
    recording = contextlib.nullcontext()
    if with_clean_stats or clean_stats is not None:
      size = jax.tree.leaves(batch)[0].shape[0]
      rows = _tail_rows(tail_mask(batch), size)
      if clean_stats is not None:
        _anchor(copy, rows, clean_stats)
      else:
        recording = _recording(copy, rows)
    with recording as stats:
      out = per_example_loss(copy, batch)
    extra = []
    if has_aux:
      out, aux = out
      extra.append(aux)
    if with_state:
      extra.append(nnx.state(copy, nnx.Not(wrt)))
    if with_clean_stats:
      extra.append(stats[0])
    if not extra:
      return out
    return out, extra[0] if len(extra) == 1 else tuple(extra)

  loss_fn.per_example = True
  if clean_stats is None and live:
    loss_fn.per_example = not _normalizes_with_batch(model)
  return loss_fn


def nnx_value_and_grad_with_clean_stats(
  per_example_loss: Callable[[Any, Any], Any],
  model: nnx.Module,
  batch: Any,
  *,
  tail_mask: Callable[[Any], jax.Array],
  wrt: filterlib.Filter = nnx.Param,
  has_aux: bool = False,
) -> tuple[Any, nnx.State, CleanStats]:
  """The clean pass of an NNX model: mean loss, its gradient, clean statistics.

  .. math::
    \\bar l = \\tfrac{1}{B}\\sum_i l_i(w), \\quad \\nabla \\bar l, \\quad
    (\\mu_B, \\sigma^2_B, \\mu_T, \\sigma^2_T) \\text{ of every BatchNorm}

  What ``nnx.value_and_grad`` of the mean loss gives (and, like it, updates the
  model's BatchNorm running averages and other non-parameter variables in
  place), plus the clean statistics for ``nnx_loss_fn(model,
  per_example_loss, tail_mask=..., clean_stats=...)``, the ``loss_fn`` of
  ImbSAM's tail passes on a BatchNorm network with ``tail_capacity`` (see
  this module's documentation).

  Args:
    per_example_loss: ``(model, batch) -> (B,)`` per-example losses, or
      ``-> ((B,), aux)`` with ``has_aux=True``.
    model: the model, in training mode.
    batch: the batch ``per_example_loss`` reads.
    tail_mask: ``batch -> (B,)`` tail weights of the rows (ImbSAM's).
    wrt: the parameters to differentiate (the ``nnx.Optimizer``'s filter).
    has_aux: whether ``per_example_loss`` returns ``(losses, aux)``.

  Returns:
    ``(mean_loss, grads, clean_stats)``, or ``((mean_loss, aux), grads,
    clean_stats)`` with ``has_aux=True``; the mean is taken in float32.

  Example:
    >>> import jax.numpy as jnp, optax, imbsam_jax
    >>> from flax import nnx
    >>> import imbsam_jax.flax
    >>> model = nnx.Sequential(
    ...     nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)),
    ...     nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
    ...     lambda x: x.mean((1, 2)),
    ...     nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> tx = imbsam_jax.imbsam(
    ...     optax.sgd(0.1), rho=0.05, tail_mask_fn=mask_fn, tail_capacity="auto")
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def per_example_loss(model, batch):
    ...   logits = model(batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> tail_mask = lambda batch: mask_fn(batch["y"])
    >>> @nnx.jit
    ... def train_step(model, optimizer, batch):
    ...   loss, grads, stats = imbsam_jax.flax.nnx_value_and_grad_with_clean_stats(
    ...       per_example_loss, model, batch, tail_mask=tail_mask)
    ...   loss_fn = imbsam_jax.flax.nnx_loss_fn(
    ...       model, per_example_loss, tail_mask=tail_mask, clean_stats=stats)
    ...   optimizer.update(
    ...       model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
    ...   return loss
    >>> x = jnp.ones((16, 6, 6, 3)).at[:, 0].set(0.0)
    >>> loss = train_step(model, optimizer, {"x": x, "y": jnp.arange(16) % 3})
    >>> int(optimizer.step[...])
    1
  """
  clean = nnx_loss_fn(
    model,
    per_example_loss,
    wrt=wrt,
    has_aux=has_aux,
    with_state=True,
    tail_mask=tail_mask,
    with_clean_stats=True,
  )

  def mean_loss(params: Any) -> tuple[jax.Array, Any]:
    losses, extra = clean(params, batch)
    return jnp.mean(losses.astype(jnp.float32)), extra

  (loss, extra), grads = jax.value_and_grad(mean_loss, has_aux=True)(
    nnx.state(model, wrt)
  )
  if has_aux:
    aux, state, stats = extra
    loss = (loss, aux)
  else:
    state, stats = extra
  nnx.update(model, state)
  return loss, grads, stats


# --- Linen -------------------------------------------------------------------


class TrainState(train_state.TrainState):
  """A Linen ``TrainState`` whose ``apply_gradients`` forwards ImbSAM's arguments.

  .. math::
    u, s' = \\text{tx.update}(g, s, w, **kw), \\quad w' = w + u

  Keywords of :meth:`apply_gradients` that name a field of the state replace it
  (as in Flax); all others (``loss_fn``, ``batch``, ``labels``, ``tail_grads``,
  ``value``...) go to ``tx.update``. Subclass it to add fields such as
  ``batch_stats``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, imbsam_jax
    >>> import flax.linen as nn
    >>> import imbsam_jax.flax
    >>> net = nn.Dense(3)
    >>> x, y = jnp.ones((6, 4)), jnp.array([0, 0, 1, 2, 0, 1])
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> state = imbsam_jax.flax.TrainState.create(
    ...     apply_fn=net.apply,
    ...     params=net.init(jax.random.key(0), x)["params"],
    ...     tx=imbsam_jax.imbsam(optax.sgd(0.1), rho=0.05, tail_mask_fn=mask_fn))
    >>> def loss_fn(params, batch):  # per-example losses
    ...   logits = state.apply_fn({"params": params}, batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> batch = {"x": x, "y": y}
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(state.params)
    >>> state = state.apply_gradients(
    ...     grads=grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
    """One optimizer step: ``step + 1``, new ``params`` and ``opt_state``.

    Args:
      grads: gradients with the structure of ``params``.
      **kwargs: fields of the state to replace; all other keywords are passed
        to ``tx.update``.

    Returns:
      The updated state.
    """
    fields = {field.name for field in dataclasses.fields(self)}
    extra_args = {k: v for k, v in kwargs.items() if k not in fields}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    if not extra_args:
      return super().apply_gradients(grads=grads, **replace)
    tx = self.tx
    with_args = optax.GradientTransformation(
      tx.init, functools.partial(tx.update, **extra_args)
    )
    replace.setdefault("tx", tx)  # back to tx after the step
    new = self.replace(tx=with_args)
    return super(TrainState, new).apply_gradients(grads=grads, **replace)


@contextlib.contextmanager
def _overridden(module: nn.Module, **attributes: Any) -> Iterator[None]:
  """Temporarily sets dataclass fields of a bound Linen module.

  Linen modules are frozen once set up; their fields are plain attributes read
  by ``__call__``, and a submodule lives for one ``apply``, so setting them for
  the duration of one call and restoring them touches nothing else.
  """
  saved = {name: getattr(module, name) for name in attributes}
  for name, value in attributes.items():
    object.__setattr__(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      object.__setattr__(module, name, value)


def _linen_flag(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
  """The ``use_running_average`` argument of a ``BatchNorm.__call__`` (or None)."""
  if len(args) > 1:
    return args[1]
  return kwargs.get("use_running_average")


def _is_batch_norm_call(context: Any) -> bool:
  return isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__"


def _with_batch_stats(mutable: Any) -> Any:
  """``mutable`` of ``apply`` with the ``batch_stats`` collection added."""
  if mutable is True:
    return True
  if mutable is False or mutable is None:
    return ["batch_stats"]
  if isinstance(mutable, str):
    return list(dict.fromkeys([mutable, "batch_stats"]))
  if isinstance(mutable, (list, tuple)):
    return list(dict.fromkeys([*mutable, "batch_stats"]))
  raise TypeError(
    f"mutable must be a bool, a collection name or a list of them, got {mutable!r}."
  )


def linen_apply_recording_clean_stats(
  apply_fn: Callable[..., Any],
  variables: Mapping[str, Any],
  *args: Any,
  tail_mask: jax.Array,
  **kwargs: Any,
) -> tuple[Any, dict[str, Any], CleanStats]:
  """The clean pass of a Linen model, also returning its clean statistics.

  .. math::
    y, \\; \\{m \\mu + (1 - m) \\mu_B\\}, \\; (\\mu_B, \\sigma^2_B, \\mu_T,
    \\sigma^2_T) = \\text{apply}(\\text{variables}, x)

  ``apply_fn(variables, *args, mutable=[..., "batch_stats"], **kwargs)`` with
  each :class:`flax.linen.BatchNorm`'s momentum set to 0 for the call, so that
  it stores exactly the batch statistics it normalized with, and with the
  statistics of its tail rows recorded; the running averages are then updated
  with the layer's own momentum, as Linen does. Hand the statistics to
  :func:`linen_apply_with_clean_stats` in ImbSAM's tail passes.

  Args:
    apply_fn: the model's ``apply`` (e.g. ``state.apply_fn``).
    variables: ``{"params": ..., "batch_stats": ..., ...}``.
    *args: inputs of the model (e.g. ``x``).
    tail_mask: ``(B,)`` tail weights of the rows (ImbSAM's).
    **kwargs: keyword arguments of ``apply_fn`` (e.g. ``train=True``);
      ``mutable`` gains ``"batch_stats"``.

  Returns:
    ``(out, mutated, clean_stats)``: the model's output, the mutated
    collections (``mutated["batch_stats"]``: the running averages, as a plain
    training pass leaves them) and the :data:`CleanStats`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import imbsam_jax.flax
    >>> net = nn.Sequential([nn.Conv(4, (3, 3)), nn.BatchNorm(False)])
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3))
    >>> variables = net.init(jax.random.key(1), x)
    >>> tail = jnp.arange(8) < 2  # the first two rows are tail
    >>> y, mutated, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
    ...     net.apply, variables, x, tail_mask=tail)
    >>> h = nn.Conv(4, (3, 3)).apply({"params": variables["params"]["layers_0"]}, x)
    >>> bool(jnp.allclose(stats["layers_1"]["mean"], h.mean((0, 1, 2))))
    True
    >>> bool(jnp.allclose(stats["layers_1"]["tail_mean"], h[:2].mean((0, 1, 2))))
    True
  """
  size = jax.tree.leaves(args)[0].shape[0] if jax.tree.leaves(args) else None
  rows = _tail_rows(tail_mask, size if size is not None else jnp.shape(tail_mask)[0])
  records: dict[tuple[str, ...], Any] = {}

  def record(next_fun, args, kwargs, context):
    if not _is_batch_norm_call(context):
      return next_fun(*args, **kwargs)
    module = context.module
    flag = _linen_flag(args, kwargs)
    running = module.use_running_average if flag is None else flag
    path = tuple(module.path)
    if running or module.is_initializing():
      records[path] = None
      return next_fun(*args, **kwargs)
    stats = _tail_stats(args[0], rows, module.axis)
    records[path] = (module.momentum, jax.tree.map(jax.lax.stop_gradient, stats))
    with _overridden(module, momentum=0.0):
      return next_fun(*args, **kwargs)

  mutable = _with_batch_stats(kwargs.pop("mutable", False))
  with nn.intercept_methods(record):
    out, mutated = apply_fn(variables, *args, mutable=mutable, **kwargs)
  mutated = dict(mutated)
  old = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
  running = traverse_util.flatten_dict(dict(mutated["batch_stats"]))
  clean: CleanStats = {}
  for path, record_ in records.items():
    mean, var = running[(*path, "mean")], running[(*path, "var")]
    if record_ is None:  # evaluation mode: the running averages, unchanged
      clean[_path_key(path)] = {"mean": mean, "var": var}
      continue
    momentum, (tail_mean, tail_var) = record_
    clean[_path_key(path)] = jax.tree.map(
      jax.lax.stop_gradient,
      {"mean": mean, "var": var, "tail_mean": tail_mean, "tail_var": tail_var},
    )
    for name, batch in (("mean", mean), ("var", var)):
      key = (*path, name)
      running[key] = momentum * old[key] + (1 - momentum) * batch
  mutated["batch_stats"] = traverse_util.unflatten_dict(running)
  return out, mutated, clean


def linen_apply_with_clean_stats(
  apply_fn: Callable[..., Any],
  variables: Mapping[str, Any],
  clean_stats: CleanStats,
  *args: Any,
  tail_mask: jax.Array,
  **kwargs: Any,
) -> Any:
  """Applies a Linen model with every BatchNorm on anchored tail statistics.

  .. math::
    \\hat x = \\frac{x - \\mu_T(x)}{\\sigma_T(x)} \\frac{\\sigma_T^w}{\\sigma_B^w}
    + \\frac{\\mu_T^w - \\mu_B^w}{\\sigma_B^w}

  ``apply_fn(variables, *args, **kwargs)`` with each
  :class:`flax.linen.BatchNorm` normalizing with statistics of the tail rows
  (``tail_mask``) of its input, mapped onto the clean pass's batch statistics
  (see this module's documentation); the rest of the model (dropout, ...) runs
  as ``kwargs`` say, and the BatchNorm running averages are left alone. The
  ``loss_fn`` of ImbSAM's tail passes on a BatchNorm network with
  ``tail_capacity``: its losses depend on the tail rows passed, not on the head
  examples, and at the clean parameters they are the clean pass's.

  Args:
    apply_fn: the model's ``apply``.
    variables: ``{"params": ..., "batch_stats": ..., ...}``.
    clean_stats: from :func:`linen_apply_recording_clean_stats` in this step.
    *args: inputs of the model (rows of the batch, e.g. gathered tail rows).
    tail_mask: ``(B,)`` tail weights of these rows (ImbSAM's).
    **kwargs: keyword arguments of ``apply_fn`` (e.g. ``train=True``).

  Returns:
    What ``apply_fn`` returns (the mutated ``batch_stats``, if asked for,
    are the running averages, unchanged).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import imbsam_jax.flax
    >>> net = nn.Sequential([nn.Conv(4, (3, 3)), nn.BatchNorm(False)])
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3))
    >>> variables = net.init(jax.random.key(1), x)
    >>> tail = jnp.arange(8) < 2
    >>> y, _, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
    ...     net.apply, variables, x, tail_mask=tail)
    >>> y_tail = imbsam_jax.flax.linen_apply_with_clean_stats(
    ...     net.apply, variables, stats, x[:2], tail_mask=tail[:2])
    >>> bool(jnp.allclose(y_tail, y[:2], atol=1e-5))  # the tail rows alone
    True
  """
  size = jax.tree.leaves(args)[0].shape[0] if jax.tree.leaves(args) else None
  rows = _tail_rows(tail_mask, size if size is not None else jnp.shape(tail_mask)[0])

  def anchor(next_fun, args, kwargs, context):
    if not _is_batch_norm_call(context):
      return next_fun(*args, **kwargs)
    module = context.module
    key = _path_key(module.path)
    entry = _clean_entry(clean_stats, key, "linen_apply_recording_clean_stats")
    entry = jax.tree.map(jax.lax.stop_gradient, dict(entry))
    mean, var = _anchored_stats(args[0], rows, module.axis, entry, module.epsilon)
    module.put_variable("batch_stats", "mean", mean)
    module.put_variable("batch_stats", "var", var)
    if len(args) > 1:
      return next_fun(args[0], True, *args[2:], **kwargs)
    if kwargs.get("use_running_average") is not None:
      return next_fun(*args, **{**kwargs, "use_running_average": True})
    with _overridden(module, use_running_average=True):
      return next_fun(*args, **kwargs)

  asked = kwargs.pop("mutable", False)
  with nn.intercept_methods(anchor):
    out, mutated = apply_fn(
      variables, *args, mutable=_with_batch_stats(asked), **kwargs
    )
  if asked is False or asked is None:
    return out
  mutated = dict(mutated)
  if "batch_stats" in variables:
    mutated["batch_stats"] = variables["batch_stats"]
  else:
    mutated.pop("batch_stats", None)
  return out, mutated
