"""The jitted training step shared by the example applications.

One pure step function, ``(state, batch, key) -> (state, metrics)``, for the three
methods the examples compare:

- ``"base"``: the base optimizer on the clean gradient (3 passes, counting a forward
  on the batch as 1 and a backward as 2);
- ``"sam"``: :func:`optax.contrib.sam` in opaque mode, the perturbation
  ``rho * g / ||g||`` from the full-batch gradient (6 passes);
- ``"imbsam"``: :func:`imbsam_jax.imbsam`, the same ``rho`` aimed at the tail
  (8 passes exact, ``3 + 6k/B`` with ``tail_capacity=k``).

The model is a Flax NNX module split into ``graphdef`` (static), ``params`` and
``model_state`` (BatchNorm statistics and other non-parameter variables). The clean
pass updates ``model_state``; the adversarial passes of SAM and ImbSAM are pure and
their BatchNorm updates are discarded (as in google-research/sam).

Data parallelism is jit + sharding: :func:`data_parallel_mesh` builds a 1-D mesh over
all devices, :func:`shard_batch` puts each process's rows of a global batch on its
devices, and :func:`replicate` copies the train state to every device. The step
itself has no device-specific code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import imbsam_jax
import imbsam_jax.flax
from shared.runner import METHODS

#: ``per_example_loss(model, batch) -> (losses (B,), metrics dict of scalars)``.
PerExampleLoss = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
  """Everything a training step carries, as one pytree.

  Attributes:
    step: number of steps taken (int32).
    params: the model's :class:`flax.nnx.Param` variables.
    model_state: the model's other variables (e.g. BatchNorm statistics).
    opt_state: the optimizer's state.
  """

  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState


def make_optimizer(
  method: str,
  base_tx: optax.GradientTransformation,
  *,
  rho: float = 0.05,
  tail_mask_fn: imbsam_jax.TailMaskFn | None = None,
  **imbsam_kwargs: Any,
) -> optax.GradientTransformation:
  """The optimizer of ``method``, wrapping ``base_tx``.

  Args:
    method: ``"base"`` (``base_tx`` itself), ``"sam"`` or ``"imbsam"``.
    base_tx: the base optimizer, e.g. SGD with momentum and weight decay.
    rho: perturbation radius of SAM and ImbSAM (the same meaning for both).
    tail_mask_fn: ImbSAM's ``labels -> (B,)`` tail weights.
    **imbsam_kwargs: further arguments of :func:`imbsam_jax.imbsam`.

  Returns:
    An Optax transformation to use with :func:`make_train_step`.

  Example:
    >>> import optax
    >>> from shared import training
    >>> tx = training.make_optimizer("sam", optax.sgd(0.1), rho=0.05)
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if method == "base":
    return base_tx
  if method == "sam":
    adversarial = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return optax.contrib.sam(base_tx, adversarial, sync_period=2, opaque_mode=True)
  if tail_mask_fn is None:
    raise ValueError("method 'imbsam' needs tail_mask_fn.")
  return imbsam_jax.imbsam(base_tx, rho, tail_mask_fn, **imbsam_kwargs)


def init_train_state(
  model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and initialises the optimizer.

  Returns:
    ``(graphdef, state)``; ``nnx.merge(graphdef, state.params,
    state.model_state)`` rebuilds the model.
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=tx.init(params),
  )
  return graphdef, state


def make_train_step(
  graphdef: nnx.GraphDef,
  per_example_loss: PerExampleLoss,
  method: str,
  tx: optax.GradientTransformation,
  *,
  labels_key: str = "label",
  tail_mask_fn: imbsam_jax.TailMaskFn | None = None,
  augment: Callable[[jax.Array, Any], Any] | None = None,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure training step ``(state, batch, key) -> (state, metrics)``.

  Args:
    graphdef: from :func:`init_train_state` (the model in train mode).
    per_example_loss: ``(model, batch) -> (losses, metrics)``: per-example losses
      of shape ``(B,)`` and a dict of scalar metrics to report.
    method: ``"base"``, ``"sam"`` or ``"imbsam"``, matching ``tx``.
    tx: from :func:`make_optimizer`.
    labels_key: the batch entry ImbSAM's ``tail_mask_fn`` reads.
    tail_mask_fn: for ``"imbsam"``: when given, the clean pass also returns the
      tail gradient (:func:`imbsam_jax.value_and_tail_grads`, 2 forwards + 3
      backwards per step). Leave it out with ``tail_capacity`` (the gathered tail
      passes are cheaper than a second full backward).
    augment: ``(key, batch) -> batch``, run inside the step (on device).

  Returns:
    The step function; wrap it in ``jax.jit`` (``donate_argnums=0`` saves memory).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")

  def step(state: TrainState, batch: Any, key: jax.Array):
    if augment is not None:
      batch = augment(key, batch)
    # (params, batch) -> (losses, (metrics, model_state)) on a copy of the model.
    forward = imbsam_jax.flax.nnx_loss_fn(
      graphdef, per_example_loss, state.model_state, has_aux=True, with_state=True
    )
    pure_loss = lambda p, b: forward(p, b)[0]

    extra: dict[str, Any] = {}
    if method == "imbsam" and tail_mask_fn is not None:
      (loss, (metrics, model_state)), grads, tail_grads = (
        imbsam_jax.value_and_tail_grads(
          forward, state.params, batch, tail_mask_fn(batch[labels_key]), has_aux=True
        )
      )
      extra["tail_grads"] = tail_grads
    else:

      def mean_loss(p):
        losses, aux = forward(p, batch)
        return jnp.mean(losses.astype(jnp.float32)), aux

      (loss, (metrics, model_state)), grads = jax.value_and_grad(
        mean_loss, has_aux=True
      )(state.params)

    if method == "sam":
      grad_fn = jax.grad(lambda p, _: jnp.mean(pure_loss(p, batch)))
      extra["grad_fn"] = grad_fn
    elif method == "imbsam":
      extra.update(loss_fn=pure_loss, batch=batch, labels=batch[labels_key])
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **metrics}
    if method == "imbsam":
      metrics["tail_fraction"] = opt_state.tail_fraction
      metrics["tail_grad_norm"] = opt_state.tail_grad_norm
    new_state = TrainState(state.step + 1, params, model_state, opt_state)
    return new_state, metrics

  return step


def random_crop_flip(
  key: jax.Array, images: jax.Array, *, padding: int = 4
) -> jax.Array:
  """Standard CIFAR augmentation: zero-pad, random crop back, random h-flip.

  Per-example offsets and flips; runs on device inside a jitted step.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from shared.training import random_crop_flip
    >>> random_crop_flip(jax.random.key(0), jnp.ones((2, 32, 32, 3))).shape
    (2, 32, 32, 3)
  """
  batch, height, width, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
    )
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)


def data_parallel_mesh(devices: Any = None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts ``tree`` on every device of ``mesh`` (params, optimizer state)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Makes global arrays sharded along the batch axis from per-process rows.

  ``local_batch`` holds this process's rows of the global batch (all of it on a
  single host); each leaf's leading axis must divide evenly over the local devices.
  """
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    local_batch,
  )
