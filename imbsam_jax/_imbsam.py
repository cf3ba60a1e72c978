"""ImbSAM: sharpness-aware minimization aimed at the tail classes.

The transform wraps any Optax optimizer. Given the caller's clean gradient of
the mean per-example loss, it re-evaluates the *tail* part of the loss at an
adversarially perturbed point and hands the base optimizer

.. math::
  g = \\nabla L_{head}(w) + s \\nabla L_{tail}(w + e), \\quad
  e = \\rho \\frac{\\nabla L_{tail}(w)}{\\|\\nabla L_{tail}(w)\\|_2 + \\epsilon}.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify
from jax.sharding import PartitionSpec

from imbsam_jax._priors import TailMaskFn, capacity_from_tail_fraction, concrete

LossFn = Callable[[optax.Params, Any], jax.Array]
Scalar = float | jax.Array
ScalarOrSchedule = Scalar | Callable[[jax.Array], jax.Array]


class ImbSAMState(NamedTuple):
  """State of the :func:`imbsam` transform.

  Attributes:
    count: number of updates so far (int32); drives a ``rho`` schedule.
    base_state: state of the wrapped base optimizer.
    tail_grad_norm: ``||grad L_tail(w)||_2`` of the last step (float32; the
      ``|w|``-scaled norm when ``adaptive=True``). Free to log.
    tail_fraction: ``sum_i t_i / B`` of the last batch (float32), the share
      of the batch that the perturbation was computed from.
    perturbed_tail_grad_norm: ``||grad L_tail(w + e)||_2`` of the last step
      (float32), the tail gradient the update used. Far above
      ``tail_grad_norm``, it says that ``rho`` reaches where the tail loss is
      much steeper than at ``w`` (e.g. a loss with a pole). Free to log.
  """

  count: jax.Array
  base_state: optax.OptState
  tail_grad_norm: jax.Array
  tail_fraction: jax.Array
  perturbed_tail_grad_norm: jax.Array


def _check_scalar(name: str, value: Any) -> None:
  """Checks a hyperparameter that must be a number >= 0.

  Python and NumPy numbers are checked by value. JAX arrays, which may be traced
  (``optax.inject_hyperparams`` hands them in under ``jit``), are checked by shape
  and dtype only.
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a number or a scalar array, got {value!r}.")
  if isinstance(value, jax.Array):
    if value.shape != () or not (
      jnp.issubdtype(value.dtype, jnp.floating)
      or jnp.issubdtype(value.dtype, jnp.integer)
    ):
      raise TypeError(
        f"{name} must be a real scalar, got an array of shape {value.shape} and"
        f" dtype {value.dtype}."
      )
    value = concrete(value)
    if value is None:  # traced: see debug_checks
      return
  if isinstance(value, (int, float, np.integer, np.floating)) or (
    isinstance(value, np.ndarray) and value.shape == ()
  ):
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
      raise ValueError(f"{name} must be finite and >= 0, got {value}.")
    return
  raise TypeError(f"{name} must be a number or a scalar array, got {value!r}.")


def _check_schedule(name: str, schedule: Callable[[Any], Any]) -> None:
  """Checks a schedule's first value (later ones: see debug_checks)."""
  first = concrete(schedule(0))
  if first is not None and not (np.all(np.isfinite(first)) and np.all(first >= 0)):
    raise ValueError(
      f"{name}'s schedule must give values >= 0, got {name}(0) = {first}."
    )


def _batch_size(batch: Any) -> int:
  """The common leading dimension of the batch's leaves."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must be a pytree with at least one array leaf.")
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = [jnp.shape(leaf) for leaf in leaves]
    raise ValueError(
      "every leaf of batch must have the batch as its leading axis, got"
      f" leaf shapes {shapes}."
    )
  return sizes.pop()


def _tail_weights(tail_mask: Any, batch_size: int) -> jax.Array:
  """Validates a tail mask and returns it as float32 weights."""
  tail_mask = jnp.asarray(tail_mask)
  if tail_mask.shape != (batch_size,):
    raise ValueError(
      f"tail_mask_fn(labels) must return shape ({batch_size},) (one weight"
      f" per example of batch), got {tail_mask.shape}."
    )
  if tail_mask.dtype != jnp.bool_ and not jnp.issubdtype(tail_mask.dtype, jnp.floating):
    raise TypeError(
      "tail_mask_fn(labels) must return bool or floating weights in [0, 1],"
      f" got dtype {tail_mask.dtype}."
    )
  values = concrete(tail_mask)
  if values is not None and not np.all((values >= 0) & (values <= 1)):
    raise ValueError(
      "tail_mask_fn(labels) must return weights in [0, 1], got values from"
      f" {np.nanmin(values)} to {np.nanmax(values)}"
      f"{' and NaN' if np.isnan(values).any() else ''}."
    )
  return tail_mask.astype(jnp.float32)


def _check_losses(loss_fn: LossFn, params: Any, batch: Any, size: int) -> None:
  """Checks at trace time (no FLOPs) that loss_fn returns (B,) losses."""
  out = jax.eval_shape(loss_fn, params, batch)
  shape = getattr(out, "shape", None)
  if shape != (size,):
    raise ValueError(
      f"loss_fn(params, batch) must return per-example losses of shape"
      f" ({size},), got {shape if shape is not None else type(out)}. Return"
      " the unreduced losses, not their mean."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"loss_fn must return floating losses, got {out.dtype}.")


def _weighted_loss(
  loss_fn: LossFn,
  params: optax.Params,
  batch: Any,
  weights: jax.Array,
  batch_size: int,
) -> jax.Array:
  """``sum_i weights_i * loss_i(params) / batch_size`` in float32.

  Examples with zero weight contribute exactly zero (also to the gradient),
  even where their loss is not finite.
  """
  losses = loss_fn(params, batch).astype(jnp.float32)
  terms = jnp.where(weights > 0, weights * losses, 0.0)
  return jnp.sum(terms) / batch_size


def _to_varying(tree: Any, axis_name: str | None) -> Any:
  """Marks params as device-varying so that grad returns per-device values.

  Under ``shard_map`` (with its default replication checks) the gradient of a
  per-device loss with respect to replicated params is summed over devices
  automatically; differentiating with respect to a device-varying copy gives
  the per-device gradient instead, which is then averaged explicitly. Under
  ``pmap`` and without replication checks this is a no-op.
  """
  if axis_name is None:
    return tree
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is not None:

    def cast(x):
      try:
        return pcast(x, axis_name, to="varying")
      except ValueError:  # already device-varying (per-device perturbed params)
        return x

    return jax.tree.map(cast, tree)
  pvary = getattr(jax.lax, "pvary", None)
  if pvary is not None:  # older jax
    return jax.tree.map(lambda x: pvary(x, axis_name), tree)
  return tree


def _pmean(tree: Any, axis_name: str | None) -> Any:
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def _tail_grad_fn(
  loss_fn: LossFn, batch_size: int, axis_name: str | None
) -> Callable[[Any, Any, jax.Array], Any]:
  """``(params, batch, weights) -> grad`` of the weighted loss (per device)."""
  grad_fn = jax.grad(lambda p, b, w: _weighted_loss(loss_fn, p, b, w, batch_size))
  return lambda p, b, w: grad_fn(_to_varying(p, axis_name), b, w)


def _replicated_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """``P()`` on x's mesh when x's type carries a sharded axis (Explicit axes).

  Built from the (abstract) mesh in x's type, so that it works with and
  without ``jax.set_mesh``. None when x is not sharded in its type (Auto axes,
  one device, older jax without sharding in types).
  """
  try:
    sharding = jax.typeof(x).sharding
    spec = sharding.spec
  except (AttributeError, TypeError):  # older jax: no sharding in types
    return None
  if not any(axis is not None for axis in spec):
    return None
  return jax.sharding.NamedSharding(sharding.mesh, PartitionSpec())


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
  """``x[idx]`` along axis 0; the k gathered rows are replicated."""
  replicated = _replicated_sharding(x)
  if replicated is not None:
    return x.at[idx].get(out_sharding=replicated)
  return jnp.take(x, idx, axis=0)


def _tail_order(weights: jax.Array, capacity: int) -> jax.Array:
  """Indices of the tail examples first (stable), padded to a multiple of k."""
  size = weights.shape[0]
  replicated = _replicated_sharding(weights)
  if replicated is not None:  # sort needs the whole axis on each device
    weights = jax.sharding.reshard(weights, replicated)
  order = jnp.argsort(weights <= 0, stable=True)
  padded = capacity * math.ceil(size / capacity)
  return jnp.pad(order, (0, padded - size))


def _chunked_tail_grad(
  grad_fn: Callable[[Any, Any, jax.Array], Any],
  params: Any,
  batch: Any,
  weights: jax.Array,
  order: jax.Array,
  capacity: int,
  loop: bool,
) -> Any:
  """Tail gradient from the tail examples only, ``capacity`` at a time.

  The first chunk runs outside control flow (the common case: every tail
  example fits). With ``loop``, further chunks, needed only when a batch holds
  more than ``capacity`` tail examples, run in a ``while_loop`` whose trip
  count is zero otherwise, so the result is always exact; without, the step
  has no control flow and only the first chunk counts (the caller guards it).
  """
  num_tail = jnp.sum(weights > 0)
  positions = jnp.arange(capacity)

  def chunk_grad(start):
    idx = jax.lax.dynamic_slice(order, (start,), (capacity,))
    valid = positions + start < num_tail
    chunk_weights = jnp.where(valid, _take_rows(weights, idx), 0.0)
    chunk = jax.tree.map(lambda x: _take_rows(x, idx), batch)
    return grad_fn(params, chunk, chunk_weights)

  first = chunk_grad(0)
  if not loop:
    return first

  def body(carry):
    start, acc = carry
    acc = jax.tree.map(jnp.add, acc, chunk_grad(start))
    return start + capacity, acc

  _, total = jax.lax.while_loop(
    lambda carry: carry[0] < num_tail, body, (jnp.int32(capacity), first)
  )
  return total


def _after(batch: Any, grads: Any) -> Any:
  """``batch``, made to depend on ``grads`` so that XLA computes ``grads`` first.

  Adds a zero computed from one gradient entry to the floating-point leaves: a
  data dependency no compiler pass removes, so the tail passes on this batch
  reuse the clean pass's memory. Exact, except that a NaN gradient (a NaN step
  anyway) makes the batch NaN. Integer-only batches are returned as they are.
  """
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return batch
  zero = jnp.ravel(leaves[0])[0] * 0

  def depend(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x + zero.astype(x.dtype)

  return jax.tree.map(depend, batch)


def _global_norm_f32(tree: Any) -> jax.Array:
  """L2 norm over all leaves, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _has_masked_nodes(tree: Any) -> bool:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return any(isinstance(leaf, optax.MaskedNode) for leaf in leaves)


def _trainable_mask(trainable: Any, params: Any) -> Any:
  """One Python bool per leaf of params (True: trained), from ``trainable``.

  ``trainable`` (or what it returns for ``params``) is a tree of bools keyed
  like ``params`` down to any depth (a prefix): each leaf of ``params`` takes
  the bool it reaches by its key path, whatever the container types (dicts,
  ``nnx.State``, ``FrozenDict``, dataclasses).
  """
  mask = trainable(params) if callable(trainable) else trainable

  def lookup(path: tuple[Any, ...], _: Any) -> bool:
    node = mask
    for entry in path:
      if isinstance(node, (bool, np.bool_, int, float, np.ndarray, jax.Array)):
        break
      try:
        if hasattr(entry, "name"):  # attribute of a dataclass or NamedTuple
          node = getattr(node, entry.name)
        else:
          node = node[getattr(entry, "key", getattr(entry, "idx", None))]
      except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(
          "trainable must be a pytree of bools keyed like params (or a prefix of"
          f" it); it has no entry for params{jax.tree_util.keystr(path)}."
        ) from None
    if not isinstance(node, (bool, np.bool_)):
      raise TypeError(
        "trainable must hold Python bools (which leaves train is static), got"
        f" {type(node).__name__} for params{jax.tree_util.keystr(path)}."
      )
    return bool(node)

  return jax.tree_util.tree_map_with_path(lookup, params)


def _frozen_to_zero(tree: Any, mask: Any) -> Any:
  """``tree`` with zeros at the frozen leaves (mask None: all trainable)."""
  if mask is None:
    return tree
  return jax.tree.map(lambda m, x: x if m else jnp.zeros_like(x), mask, tree)


def _perturbed(
  params: Any,
  direction: Any,
  rho_t: Any,
  eps: Any,
  adaptive: bool,
  mask: Any,
) -> tuple[Any, jax.Array]:
  """``(w + e, norm)``: ``e = rho d / (||d|| + eps)`` (ASAM: ``rho |w|^2 d /
  (|| |w| d || + eps)``); ``e = 0`` exactly where ``||d|| = 0``; frozen leaves
  (``mask``) stay where they are."""
  if adaptive:
    norm = _global_norm_f32(
      jax.tree.map(lambda g, w: g * jnp.abs(w), direction, params)
    )
  else:
    norm = _global_norm_f32(direction)
  # A zero direction (an all-head batch for the tail) has norm 0: e = 0 exactly,
  # even with eps = 0.
  scale = jnp.where(norm > 0, rho_t / jnp.where(norm > 0, norm + eps, 1.0), 0.0)
  if adaptive:
    step = lambda g, w: (scale * g * jnp.square(w)).astype(w.dtype)
  else:
    step = lambda g, w: (scale * g).astype(w.dtype)
  perturbed = jax.tree.map(lambda g, w: w + step(g, w), direction, params)
  if mask is not None:
    perturbed = jax.tree.map(lambda m, w, p: p if m else w, mask, params, perturbed)
  return perturbed, norm


def _debug_checks(
  radii: dict[str, Any], weights: jax.Array, labels: Any, tail_mask_fn: TailMaskFn
) -> None:
  """checkify checks of the values only known inside ``jit``; ``radii``: the
  perturbation radii of this step by name (``rho``, ``head_rho``)."""
  for name, value in radii.items():
    checkify.check(
      jnp.isfinite(value) & (value >= 0),
      f"imbsam: {name} must be finite and >= 0, got {{rho}}.",
      rho=jnp.asarray(value, jnp.float32),
    )
  checkify.check(
    jnp.all((weights >= 0) & (weights <= 1)),
    "imbsam: tail_mask_fn(labels) must return weights in [0, 1], got values"
    " from {low} to {high}.",
    low=jnp.min(weights),
    high=jnp.max(weights),
  )
  num_classes = getattr(tail_mask_fn, "num_classes", None)
  labels = jnp.asarray(labels)
  if num_classes is not None and jnp.issubdtype(labels.dtype, jnp.integer):
    checkify.check(
      jnp.all((labels >= 0) & (labels < num_classes)),
      f"imbsam: labels must be class indices in [0, {num_classes}) (the classes"
      " of tail_mask_fn), got values from {low} to {high}.",
      low=jnp.min(labels),
      high=jnp.max(labels),
    )


def _check_mean_grads(
  loss_fn: LossFn, params: Any, batch: Any, grads: Any, axis_name: str | None
) -> None:
  """checkify check that ``grads`` is the gradient of the mean loss.

  The slope of ``mean(loss_fn)`` along ``grads`` (one forward-mode pass) is
  ``<grad mean(loss), grads>``, which equals ``||grads||^2`` for the right
  gradient and ``||grads||^2 / B`` for the gradient of the summed loss. The
  ratio must be in [1/2, 2]: loose enough for a ``loss_fn`` that approximates
  the clean pass (anchored BatchNorm statistics), tight enough for a scale.
  """
  mean_loss = lambda p: jnp.mean(loss_fn(p, batch).astype(jnp.float32))
  _, slope = jax.jvp(mean_loss, (params,), (grads,))
  squared = _pmean(jnp.square(_global_norm_f32(grads)), axis_name)
  ratio = _pmean(slope, axis_name) / jnp.where(squared > 0, squared, 1.0)
  checkify.check(
    (squared == 0) | ((ratio >= 0.5) & (ratio <= 2.0)),
    "imbsam: grads must be the gradient of mean(loss_fn(params, batch)), but"
    " <grad mean(loss), grads> / ||grads||^2 = {ratio} (1 for the mean; 1/B for"
    " the gradient of the summed loss).",
    ratio=ratio,
  )


def _auto_tail_fraction(tail_mask_fn: TailMaskFn) -> float:
  """The ``tail_fraction`` that ``tail_capacity="auto"`` reads, checked."""
  fraction = getattr(tail_mask_fn, "tail_fraction", None)
  if fraction is None:
    raise ValueError(
      "tail_capacity='auto' sizes the tail passes from tail_mask_fn.tail_fraction"
      " (the share of training examples in the tail), which the functions of"
      " tail_mask_from_counts and soft_tail_mask_from_counts carry; this"
      f" tail_mask_fn ({tail_mask_fn!r}) has none. Pass an integer"
      " tail_capacity instead (e.g. from suggest_tail_capacity or"
      " capacity_from_tail_fraction), or set tail_mask_fn.tail_fraction."
    )
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)):
    raise TypeError(
      f"tail_mask_fn.tail_fraction must be a number in [0, 1], got {fraction!r}."
    )
  if not 0.0 <= float(fraction) <= 1.0:
    raise ValueError(f"tail_mask_fn.tail_fraction must be in [0, 1], got {fraction!r}.")
  return float(fraction)


def imbsam(
  base_tx: optax.GradientTransformation,
  rho: ScalarOrSchedule,
  tail_mask_fn: TailMaskFn,
  *,
  eps: Scalar = 1e-12,
  tail_loss_scale: Scalar = 1.0,
  head_rho: ScalarOrSchedule | None = None,
  adaptive: bool = False,
  axis_name: str | None = None,
  per_device_perturbation: bool = False,
  tail_capacity: int | Literal["auto"] | None = None,
  overflow: Literal["chunks", "nan"] = "chunks",
  trainable: Any = None,
  debug_checks: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Class-imbalanced sharpness-aware minimization (ImbSAM).

  Sharpness-aware minimization restricted to the tail classes: with per-example
  losses :math:`l_i`, tail weights :math:`t_i = ` ``tail_mask_fn(labels)_i`` in
  [0, 1] and batch size :math:`B`,

  .. math::
    L_{tail}(w) = \\tfrac{1}{B}\\sum_i t_i l_i(w), \\quad
    L_{head}(w) = \\tfrac{1}{B}\\sum_i (1 - t_i) l_i(w),

    e = \\rho \\frac{\\nabla L_{tail}(w)}{\\|\\nabla L_{tail}(w)\\|_2 + \\epsilon},
    \\quad g = \\nabla L_{head}(w) + s \\, \\nabla L_{tail}(w + e),

  and ``g`` is handed to ``base_tx``. The norm is one global L2 norm over all
  leaves, accumulated in float32. ``grads`` passed to ``update`` must be the
  gradient of ``mean(loss_fn(params, batch))`` at ``params`` (what a training
  step computes anyway); the head gradient is taken as ``grads`` minus the
  tail gradient, so the head examples are never evaluated again.

  Cost per step, counting a forward on the full batch as 1 and a backward as 2
  (plain SGD = 3): the caller's clean gradient (3) plus the tail gradient at
  ``w`` (3) plus the tail gradient at ``w + e`` (3). Hand in ``tail_grads``
  (see :func:`value_and_tail_grads`, one forward for both clean and tail
  gradients) to drop this to 8, the reference implementation's count; with
  ``tail_capacity=k`` both tail passes run on at most ``k`` gathered tail
  examples: ``3 + 6 k / B``. ``tail_capacity="auto"`` picks ``k`` when the
  step is traced, from the batch size ``B`` and ``tail_mask_fn.tail_fraction``
  (:func:`capacity_from_tail_fraction`: the binomial mean of the tail count
  plus 2 standard deviations, a multiple of 8); ``k >= B`` means the
  full-batch passes.

  Special cases: a batch without tail examples gives ``e = 0`` and exactly the
  base optimizer's step (never NaN); ``rho = 0`` is ``base_tx`` on ``grads``
  (up to rounding); a mask of all ones is SAM.

  Composition: every transform that should act on the gradient the parameters
  move along (clipping, weight decay, noise, gradient accumulation with
  ``optax.MultiSteps``) belongs *inside*, in ``base_tx``:
  ``imbsam(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr)), ...)``
  clips the ImbSAM gradient. A transform in front (``optax.chain(clip,
  imbsam(...))``) changes only ``grads``, from which ImbSAM subtracts the
  unchanged tail gradient and adds the perturbed one, so the update it builds,
  ``clip(grads) - g_T(w) + g_T(w + e)``, is not bounded. Wrappers of the whole
  step (``optax.apply_if_finite``) go outside. To train a subset of the
  parameters, use ``trainable`` (``optax.masked`` and ``optax.multi_transform``
  around ``imbsam`` hide the other parameters, at which ``loss_fn`` must run:
  an error); ``base_tx`` may still be an ``optax.multi_transform``.

  ``head_rho`` adds a perturbation of the head loss with its own radius,
  SSE-SAM's step (AAAI 2025):
  :math:`g = \\nabla L_{head}(w + e_h) + s \\nabla L_{tail}(w + e)`, with
  :math:`e_h = \\rho_h \\nabla L_{head}(w) / (\\|\\nabla L_{head}(w)\\|_2 +
  \\epsilon)` and :math:`\\nabla L_{head}(w)` = ``grads`` minus the tail
  gradient; one more full-batch pass (3), 11 with ``tail_grads``. ``head_rho=0``
  gives ImbSAM's step (up to rounding, at that pass's cost); SSE-SAM sets it to
  0 after a share of training: switch then to a transform without ``head_rho``
  (its state has the same structure), rather than a schedule that keeps
  paying for the pass. Soft tail weights make :math:`L_{head}` and
  :math:`L_{tail}` share examples (weights ``1 - t_i`` and ``t_i``); with
  :func:`focal_tail_mask_from_counts` (:math:`t_i = \\lambda (1 - \\pi_{y_i})
  ^\\gamma`) and no ``head_rho``, the step is Focal-SAM's (ICML 2025).

  ``tail_loss_scale`` is ``s`` above. The paper's objective has ``s = 1``
  (default); the authors' PyTorch code multiplies the tail loss at ``w + e`` by
  2 since a change made after publication (``tail_loss_scale=2.0`` reproduces
  it).

  ``rho``, ``eps`` and ``tail_loss_scale`` may be scalar arrays, also traced
  ones, so ``optax.inject_hyperparams(imbsam, static_args=("tail_mask_fn",))``
  keeps them in the optimizer state, where ``optax.tree_utils.tree_set`` changes
  them between steps without recompiling (name ``tail_capacity`` in
  ``static_args`` too when you set it). Python and NumPy numbers are checked
  when the transform is built; arrays by shape and dtype only.

  ``adaptive=True`` uses the ASAM form (Kwon et al., 2021):
  :math:`e = \\rho\\, |w|^2 \\odot g_T / (\\| |w| \\odot g_T \\|_2 + \\epsilon)`.

  Multi-device: under ``jax.jit`` with sharded inputs nothing is needed, the
  computation is global (with ``tail_capacity``, the tail examples are gathered
  from the global batch, so ``k`` is a global capacity). Inside ``shard_map`` or
  ``pmap``, set ``axis_name`` to the batch axis: the tail gradient is averaged
  over it before the norm (one global perturbation), and the gradient handed to
  ``base_tx`` is averaged, so the result equals the single-device one for the
  same global batch (``tail_capacity`` is then per device). ``grads`` may be
  per-device (as ``pmap`` gives) or already averaged; under ``shard_map`` take
  it with respect to device-varying params (``value_and_tail_grads(...,
  axis_name=...)`` does) or of ``lax.pmean(loss)``: a per-device loss
  differentiated w.r.t. replicated params gives the *sum* over devices.
  ``per_device_perturbation=True`` (with ``axis_name``) makes each device
  perturb along its own tail gradient ("m-sharpness", the default of
  google-research/sam) while the final gradient is still averaged; a
  deliberate choice, not the paper's global perturbation. ``axis_name=None``
  inside ``pmap`` issues no collectives at all: each device perturbs with its
  own tail gradient and ``base_tx`` sees per-device gradients (average them
  there to keep replicas in sync).

  BatchNorm: ``loss_fn`` is pure, so whatever statistics the adversarial passes
  compute are discarded; keep the running statistics of the caller's clean
  pass. With BatchNorm in training mode the per-example losses depend on the
  whole batch, and plain tail-only passes of ``tail_capacity`` would normalize
  with statistics of the tail examples alone. Either use the exact path (the
  default: full-batch statistics recomputed at ``w + e``, as the reference), or
  hand in a ``loss_fn`` whose BatchNorm layers normalize with tail statistics
  anchored to the clean pass (``imbsam_jax.flax``: ``nnx_loss_fn(...,
  clean_stats=...)``, ``linen_apply_with_clean_stats``), an approximation of
  the reference that needs the tail examples only. Let both tail passes use it
  (do not hand in ``tail_grads`` from the training-mode clean pass): then
  ``rho = 0`` is still exactly ``base_tx``.

  Args:
    base_tx: any Optax transformation; receives the ImbSAM gradient and all
      extra keyword arguments that ImbSAM does not consume.
    rho: perturbation radius (>= 0): a number, a scalar array, or an Optax
      schedule of the step count. Numbers, concrete arrays and a schedule's
      first value are checked here; a traced value (``inject_hyperparams``)
      or a schedule's later values only with ``debug_checks``.
    tail_mask_fn: ``labels -> (B,)`` tail weights, bool or float in [0, 1];
      see :func:`tail_mask_from_counts`. Weights known when ``update`` runs
      (outside ``jit``) are checked then; traced ones with ``debug_checks``.
    eps: added to the norm (>= 0).
    tail_loss_scale: ``s`` (>= 0), the weight of the perturbed tail loss.
    head_rho: SSE-SAM's head radius (>= 0; a number, scalar array or
      schedule, checked as ``rho``); ``None`` (default): the head loss is not
      perturbed and costs no pass.
    adaptive: use the scale-invariant ASAM perturbation.
    axis_name: batch axis to average over inside ``shard_map``/``pmap``.
    per_device_perturbation: with ``axis_name``, perturb each device along its
      own (unaveraged) tail gradient: m-sharpness.
    tail_capacity: if set, run the two tail passes on at most this many tail
      examples gathered from the batch (static shapes). A batch with more tail
      examples is processed in several chunks: exact, only slower. Requires
      per-example losses that do not depend on other examples of the batch.
      ``"auto"``: ``k`` from the batch size and ``tail_mask_fn.tail_fraction``
      (a ``tail_mask_fn`` without it is an error); under ``shard_map``/``pmap``
      the batch size is the per-device one. A ``loss_fn`` with
      ``per_example = False`` (``imbsam_jax.flax.nnx_loss_fn`` of a BatchNorm
      model in training mode) is refused here.
    overflow: what the fast path does with a batch that holds more than
      ``tail_capacity`` tail examples. ``"chunks"`` (default): further chunks
      of ``k`` in a ``while_loop``, exact for every batch; its trip count is
      data-dependent, which on GPUs makes the host wait for it every step.
      ``"nan"``: no control flow in the step (one chunk); such a batch gets
      a NaN update instead of a silently wrong one (``debug_checks`` says why,
      ``optax.apply_if_finite`` skips it). Meant for batches whose tail count
      is bounded by ``k`` by construction (stratified sampling, or ``k``
      chosen per batch on the host).
    trainable: which parameters ImbSAM trains: a pytree of bools with the
      structure of ``params`` (or a prefix of it), or a function of
      ``params`` returning one (name it in ``inject_hyperparams``'s
      ``static_args``). The others are frozen: neither perturbed nor updated
      (zero updates), left out of the norm, and ``base_tx`` sees and keeps
      state for the trainable ones only (through ``optax.masked``).
    debug_checks: add ``jax.experimental.checkify`` checks of what is known
      only inside ``jit``: ``rho`` finite and >= 0, the tail weights in
      [0, 1], labels in ``[0, tail_mask_fn.num_classes)`` (the masks of
      :func:`tail_mask_from_counts` carry it), and ``grads`` the gradient of
      the *mean* loss (a forward-mode pass: the slope of ``mean(loss_fn)``
      along ``grads`` must be ``||grads||^2`` within a factor 2; the summed
      loss gives ``1/B`` of it). Run the jitted step under
      ``checkify.checkify(step)`` and call ``err.throw()``; outside ``jit``
      the checks raise at once. Off by default (the check of ``grads`` costs
      a forward pass).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Its ``update`` takes
    ``(grads, state, params, *, loss_fn, batch, labels, tail_grads=None,
    **extra_args)``: ``loss_fn(params, batch) -> (B,)`` per-example losses,
    ``batch`` a pytree with the batch as leading axis of every leaf,
    ``labels`` what ``tail_mask_fn`` consumes, and optionally ``tail_grads``,
    the gradient of :math:`L_{tail}` at ``params`` if the caller has it.
    ``grads`` must be the gradient of the *mean* of ``loss_fn``'s losses (the
    gradient of their sum is ``B`` times larger and goes unnoticed unless
    ``debug_checks``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, imbsam_jax
    >>> def loss_fn(params, batch):
    ...   logits = batch["x"] @ params["w"]
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> tx = imbsam_jax.imbsam(optax.sgd(0.1), rho=0.05, tail_mask_fn=mask_fn)
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.array([0, 0, 1, 2, 0, 1, 0, 2])}
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    >>> updates, state = tx.update(
    ...     grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"])
    >>> params = optax.apply_updates(params, updates)
    >>> float(state.tail_fraction)
    0.25

  References:
    Zhou et al., `ImbSAM: A Closer Look at Sharpness-Aware Minimization in
    Class-Imbalanced Recognition <https://arxiv.org/abs/2308.07815>`_, ICCV 2023.
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  if isinstance(base_tx, optax.MultiSteps):
    base_tx = base_tx.gradient_transformation()
  if not isinstance(base_tx, optax.GradientTransformation):
    raise TypeError(
      f"base_tx must be an optax.GradientTransformation, got {type(base_tx)}."
    )
  if callable(rho):
    _check_schedule("rho", rho)
  else:
    _check_scalar("rho", rho)
  if not callable(tail_mask_fn):
    hint = (
      " With optax.inject_hyperparams, name it in static_args (it calls the"
      " callables it is given as schedules of the step count):"
      " optax.inject_hyperparams(imbsam, static_args=('tail_mask_fn',))."
      if isinstance(tail_mask_fn, (jax.Array, np.ndarray))
      else ""
    )
    raise TypeError(
      f"tail_mask_fn must be callable: labels -> (B,) tail weights, got"
      f" {type(tail_mask_fn).__name__}.{hint}"
    )
  _check_scalar("eps", eps)
  _check_scalar("tail_loss_scale", tail_loss_scale)
  if callable(head_rho):
    _check_schedule("head_rho", head_rho)
  elif head_rho is not None:
    _check_scalar("head_rho", head_rho)
  auto_fraction = None
  if isinstance(tail_capacity, str) and tail_capacity == "auto":
    auto_fraction = _auto_tail_fraction(tail_mask_fn)
  elif tail_capacity is not None and (
    isinstance(tail_capacity, bool)
    or not isinstance(tail_capacity, int)
    or tail_capacity < 1
  ):
    hint = (
      " (with optax.inject_hyperparams, name it in static_args)"
      if isinstance(tail_capacity, jax.Array)
      else ""
    )
    raise ValueError(
      "tail_capacity must be a positive int, 'auto' or None, got"
      f" {tail_capacity!r}{hint}."
    )
  if overflow not in ("chunks", "nan"):
    raise ValueError(f"overflow must be 'chunks' or 'nan', got {overflow!r}.")
  if per_device_perturbation and axis_name is None:
    raise ValueError("per_device_perturbation=True needs axis_name.")
  base_tx = optax.with_extra_args_support(base_tx)

  def base_for(params: Any) -> tuple[Any, optax.GradientTransformationExtraArgs]:
    """The trainable mask (None: all) and base_tx on the trainable leaves."""
    if trainable is None:
      return None, base_tx
    mask = _trainable_mask(trainable, params)
    return mask, optax.masked(base_tx, mask)

  def init_fn(params: optax.Params) -> ImbSAMState:
    return ImbSAMState(
      count=jnp.zeros([], jnp.int32),
      base_state=base_for(params)[1].init(params),
      tail_grad_norm=jnp.zeros([], jnp.float32),
      tail_fraction=jnp.zeros([], jnp.float32),
      perturbed_tail_grad_norm=jnp.zeros([], jnp.float32),
    )

  def update_fn(
    updates: optax.Updates,
    state: ImbSAMState,
    params: optax.Params | None = None,
    *,
    loss_fn: LossFn | None = None,
    batch: Any = None,
    labels: Any = None,
    tail_grads: optax.Updates | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, ImbSAMState]:
    missing = [
      name
      for name, value in (
        ("params", params),
        ("loss_fn", loss_fn),
        ("batch", batch),
        ("labels", labels),
      )
      if value is None
    ]
    if missing:
      raise ValueError(
        f"imbsam's update needs {', '.join(missing)}: call"
        " tx.update(grads, state, params, loss_fn=..., batch=..., labels=...)."
      )
    if not callable(loss_fn):
      raise TypeError("loss_fn must be callable: (params, batch) -> (B,) losses.")
    if _has_masked_nodes(params):
      raise TypeError(
        "imbsam cannot run inside optax.masked or optax.multi_transform: they"
        " hide the other parameters (MaskedNode), at which loss_fn must be"
        " evaluated. Train a subset with imbsam(base_tx, rho, tail_mask_fn,"
        " trainable=mask) instead (base_tx may be an optax.multi_transform)."
      )
    size = _batch_size(batch)
    _check_losses(loss_fn, params, batch, size)
    weights = _tail_weights(tail_mask_fn(labels), size)
    mask, base = base_for(params)
    rho_t = rho(state.count) if callable(rho) else rho
    head_rho_t = head_rho(state.count) if callable(head_rho) else head_rho
    if debug_checks:
      radii = {"rho": rho_t, "head_rho": head_rho_t}
      radii = {name: value for name, value in radii.items() if value is not None}
      _debug_checks(radii, weights, labels, tail_mask_fn)
      _check_mean_grads(loss_fn, params, batch, updates, axis_name)

    # Memory: the tail passes need not wait for the caller's clean gradient, and
    # XLA would overlap them with it (both passes' activations live at once).
    # The barrier orders the full-batch passes; XLA:CPU ignores it for the
    # gathered ones, which _after serialises (measured in examples/benchmark.py).
    params, updates = jax.lax.optimization_barrier((params, updates))
    grad_fn = _tail_grad_fn(loss_fn, size, axis_name)
    if auto_fraction is not None:  # static: the batch size is known when traced
      capacity = capacity_from_tail_fraction(auto_fraction, size)
    else:
      capacity = tail_capacity
    fast = capacity is not None and capacity < size
    if fast and getattr(loss_fn, "per_example", True) is False:
      raise ValueError(
        f"tail_capacity runs the tail passes on the {capacity} gathered tail"
        " examples, but this loss_fn (per_example = False: BatchNorm in"
        " training mode) normalizes each pass with its own batch's statistics:"
        " give it the clean pass's statistics (imbsam_jax.flax.nnx_loss_fn(...,"
        " clean_stats=...)), or use tail_capacity=None (exact)."
      )
    num_tail = jnp.sum(weights > 0)
    if debug_checks and fast and overflow == "nan":
      checkify.check(
        num_tail <= capacity,
        "imbsam: the batch holds {count} tail examples, more than"
        f" tail_capacity={capacity} (overflow='nan' makes this update NaN).",
        count=num_tail,
      )
    if fast:
      batch = _after(batch, updates)
      order = _tail_order(weights, capacity)
      tail_grad_at = lambda p: _chunked_tail_grad(
        grad_fn, p, batch, weights, order, capacity, overflow == "chunks"
      )
    else:
      tail_grad_at = lambda p: grad_fn(p, batch, weights)

    if tail_grads is None:
      tail_grads = tail_grad_at(params)
    tail_grads = _frozen_to_zero(tail_grads, mask)
    local_tail_grads = tail_grads
    tail_grads = _pmean(tail_grads, axis_name)
    # m-sharpness: each device perturbs along its own tail gradient.
    direction = local_tail_grads if per_device_perturbation else tail_grads

    perturbed, norm = _perturbed(params, direction, rho_t, eps, adaptive, mask)
    adv_grads = _frozen_to_zero(_pmean(tail_grad_at(perturbed), axis_name), mask)
    adv_norm = _global_norm_f32(adv_grads)

    grads = _pmean(updates, axis_name)
    if head_rho is None:
      # grads + (s * g_adv - g_tail): head gradient plus perturbed tail gradient,
      # written so that an all-head batch adds exactly zero to grads.
      imbsam_grads = jax.tree.map(
        lambda g, ga, gt: (g + (tail_loss_scale * ga - gt)).astype(g.dtype),
        grads,
        adv_grads,
        tail_grads,
      )
    else:  # SSE-SAM: the head loss at its own perturbed point, one full-batch pass
      # grad L_head(w), per device with m-sharpness (as the tail's direction).
      if per_device_perturbation:
        head_grads = jax.tree.map(jnp.subtract, updates, local_tail_grads)
      else:
        head_grads = jax.tree.map(jnp.subtract, grads, tail_grads)
      head_perturbed, _ = _perturbed(
        params, _frozen_to_zero(head_grads, mask), head_rho_t, eps, adaptive, mask
      )
      # After the tail pass at w + e (a data dependency): else XLA overlaps the
      # two independent passes and holds both passes' activations at once.
      head_batch = _after(batch, adv_grads)
      head_adv = _frozen_to_zero(
        _pmean(grad_fn(head_perturbed, head_batch, 1.0 - weights), axis_name), mask
      )
      imbsam_grads = jax.tree.map(
        lambda g, gh, ga: (gh + tail_loss_scale * ga).astype(g.dtype),
        grads,
        head_adv,
        adv_grads,
      )
    new_updates, base_state = base.update(
      imbsam_grads, state.base_state, params, **extra_args
    )
    new_updates = _frozen_to_zero(new_updates, mask)
    if fast and overflow == "nan":  # never a silently wrong step
      overflowed = _pmean(num_tail > capacity, axis_name) > 0
      new_updates = jax.tree.map(
        lambda u: jnp.where(overflowed, jnp.nan, u).astype(u.dtype), new_updates
      )
    tail_fraction = _pmean(jnp.sum(weights) / size, axis_name)
    return new_updates, ImbSAMState(
      count=optax.safe_increment(state.count),
      base_state=base_state,
      tail_grad_norm=_pmean(norm, axis_name) if per_device_perturbation else norm,
      tail_fraction=tail_fraction,
      perturbed_tail_grad_norm=adv_norm,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def value_and_tail_grads(
  loss_fn: Callable[..., Any],
  params: optax.Params,
  batch: Any,
  tail_weights: jax.Array,
  *,
  has_aux: bool = False,
  axis_name: str | None = None,
) -> tuple[Any, optax.Updates, optax.Updates]:
  """Mean loss, its gradient and the tail gradient from a single forward pass.

  .. math::
    \\bar l = \\tfrac{1}{B}\\sum_i l_i, \\quad
    \\nabla \\bar l, \\quad \\nabla L_{tail} = \\tfrac{1}{B}\\sum_i t_i \\nabla l_i

  One forward and two backwards through the same ``jax.vjp``, instead of two
  forwards and two backwards. Pass the results to
  ``imbsam``'s update as ``grads`` and ``tail_grads=...``; the exact ImbSAM step
  then costs 2 forwards and 3 backwards, like the reference implementation.

  Args:
    loss_fn: ``(params, batch) -> (B,)`` per-example losses, or
      ``-> ((B,), aux)`` with ``has_aux=True`` (e.g. updated BatchNorm
      statistics of this clean pass).
    params: parameters.
    batch: pytree with the batch as leading axis of every leaf.
    tail_weights: ``(B,)`` tail weights, e.g. ``tail_mask_fn(labels)``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    axis_name: inside ``shard_map``/``pmap``, the batch axis: the gradients
      are then per-device (imbsam averages them); the loss is per-device too.

  Returns:
    ``(mean_loss, grads, tail_grads)``, or ``((mean_loss, aux), grads,
    tail_grads)`` with ``has_aux=True``.

  Example:
    >>> import jax, jax.numpy as jnp, imbsam_jax
    >>> loss_fn = lambda p, b: (b * p["w"]) ** 2
    >>> batch = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> t = jnp.array([0.0, 0.0, 1.0, 0.0])
    >>> loss, grads, tail = imbsam_jax.value_and_tail_grads(
    ...     loss_fn, {"w": 1.0}, batch, t)
    >>> float(loss), float(grads["w"]), float(tail["w"])
    (7.5, 15.0, 4.5)
  """
  size = _batch_size(batch)
  weights = _tail_weights(tail_weights, size)
  losses_only = (lambda p, b: loss_fn(p, b)[0]) if has_aux else loss_fn
  _check_losses(losses_only, params, batch, size)
  out = jax.vjp(
    lambda p: loss_fn(p, batch), _to_varying(params, axis_name), has_aux=has_aux
  )
  losses, vjp_fn = out[0], out[1]
  # Two backward calls, not one vmapped over both cotangents: a vmap holds both
  # backwards' temporaries at once (+20% peak memory on a CIFAR ResNet).
  (grads,) = vjp_fn(jnp.full_like(losses, 1 / size))
  (tail_grads,) = vjp_fn((weights / size).astype(losses.dtype))
  mean_loss = jnp.mean(losses.astype(jnp.float32))
  return ((mean_loss, out[2]) if has_aux else mean_loss), grads, tail_grads
