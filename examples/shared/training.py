"""The jitted training step, epoch loop and evaluation the applications share.

One pure step, ``(state, batch, key) -> (state, metrics)``, for the three methods
compared (counting a forward on the batch as 1 pass and a backward as 2):
``base``, the base optimizer (3 passes); ``sam``, :func:`optax.contrib.sam` in
opaque mode, perturbation ``rho g / ||g||`` (6); ``imbsam``,
:func:`imbsam_jax.imbsam` (8 exact, ``3 + 6k/B`` with ``tail_capacity=k``). The
NNX model is split into ``params`` and ``model_state`` (BatchNorm statistics):
the clean pass updates ``model_state``, the adversarial passes discard theirs
(as google-research/sam does).

Data parallelism is jit + sharding (:func:`data_parallel_mesh`, :func:`shard_batch`,
:func:`replicate`); the step itself has no device-specific code.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import imbsam_jax
import imbsam_jax.flax
from shared import pipeline
from shared.runner import METHODS

#: ``per_example_loss(model, batch) -> (losses (B,), dict of scalar metrics)``.
PerExampleLoss = Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
  """What a training step carries: ``step``, ``params`` (``nnx.Param``),
  ``model_state`` (the other variables, e.g. BatchNorm statistics), ``opt_state``."""

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
  """``base_tx`` itself (``base``), inside SAM (``sam``) or ImbSAM (``imbsam``).

  Example:
    >>> import optax
    >>> tx = make_optimizer("sam", optax.sgd(0.1), rho=0.05)
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
  """``(graphdef, state)``; ``nnx.merge(graphdef, state.params, state.model_state)``
  rebuilds the model."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(
    jnp.zeros([], jnp.int32), params, model_state, tx.init(params)
  )


#: How ImbSAM's step gets its tail gradients (:func:`make_train_step`).
TAIL_PATHS = ("exact", "gathered", "anchored")


def tail_path(model: nnx.Module, tail_capacity: Any, tail_bn: str) -> str:
  """The ImbSAM path for a model: ``gathered`` (the fast path) where it is exact,
  i.e. without BatchNorm; with BatchNorm ``anchored`` if ``tail_bn`` asks for it
  (an approximation), else ``exact``; ``exact`` for ``tail_capacity=None``.

  Raises ``ValueError`` for an integer ``tail_capacity`` on BatchNorm without
  anchored statistics: its tail passes would normalize with tail-only statistics.
  """
  batch_norm = bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  if tail_capacity is None:
    return "exact"
  if batch_norm and tail_bn != "anchored":
    if tail_capacity != "auto":
      raise ValueError(
        "--tail-capacity: a BatchNorm network's tail passes on gathered examples"
        " need --tail-bn anchored (or --tail-capacity none, the exact path)"
      )
    return "exact"
  return "anchored" if batch_norm else "gathered"


def make_train_step(
  graphdef: nnx.GraphDef,
  per_example_loss: PerExampleLoss,
  method: str,
  tx: optax.GradientTransformation,
  *,
  labels_key: str = "label",
  tail_mask_fn: imbsam_jax.TailMaskFn | None = None,
  path: str = "exact",
  augment: Callable[[jax.Array, Any], Any] | None = None,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """The pure step ``(state, batch, key) -> (state, metrics)``; wrap it in jit.

  Args:
    graphdef: from :func:`init_train_state` (the model in train mode).
    per_example_loss: ``(model, batch) -> ((B,) losses, scalar metrics)``.
    method: ``base``, ``sam`` or ``imbsam``, matching ``tx``.
    tx: from :func:`make_optimizer`.
    labels_key: the batch entry ImbSAM's ``tail_mask_fn`` reads.
    tail_mask_fn: ImbSAM's tail weights (``imbsam`` only).
    path: ``imbsam``'s tail gradients (:func:`tail_path`): ``exact``, the clean
      pass gives the tail gradient at ``w`` too (8 passes); ``gathered``, ``tx``
      runs its own tail passes (on the gathered tail with ``tail_capacity``);
      ``anchored``, the same with their BatchNorm anchored to the clean pass
      (``imbsam_jax.flax``).
    augment: ``(key, batch) -> batch``, run inside the step.
  """
  if method not in METHODS or path not in TAIL_PATHS:
    raise ValueError(f"unknown method {method!r} or path {path!r}.")
  if method == "imbsam" and tail_mask_fn is None:
    raise ValueError("method 'imbsam' needs tail_mask_fn.")
  anchored = method == "imbsam" and path == "anchored"
  tail_mask = (lambda b: tail_mask_fn(b[labels_key])) if anchored else None

  def step(state: TrainState, batch: Any, key: jax.Array):
    if augment is not None:
      batch = augment(key, batch)
    make_forward = functools.partial(
      imbsam_jax.flax.nnx_loss_fn,
      graphdef,
      per_example_loss,
      state.model_state,
      has_aux=True,
      tail_mask=tail_mask,
    )
    # (params, batch) -> (losses, (metrics, model_state[, clean statistics])).
    forward = make_forward(with_state=True, with_clean_stats=anchored)
    extra: dict[str, Any] = {}
    if method == "imbsam" and path == "exact":
      weights = tail_mask_fn(batch[labels_key])
      (loss, (metrics, model_state)), grads, extra["tail_grads"] = (
        imbsam_jax.value_and_tail_grads(
          forward, state.params, batch, weights, has_aux=True
        )
      )
    else:

      def mean_loss(p):
        losses, aux = forward(p, batch)
        return jnp.mean(losses.astype(jnp.float32)), aux

      (loss, (metrics, model_state, *stats)), grads = jax.value_and_grad(
        mean_loss, has_aux=True
      )(state.params)
    if anchored:  # the tail passes normalize with the clean pass's statistics
      forward = make_forward(clean_stats=stats[0])
    pure_loss = lambda p, b: forward(p, b)[0]
    if method == "sam":
      extra["grad_fn"] = jax.grad(lambda p, _: jnp.mean(pure_loss(p, batch)))
    elif method == "imbsam":
      extra.update(loss_fn=pure_loss, batch=batch, labels=batch[labels_key])
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    metrics = {"loss": loss, **metrics}
    if method == "imbsam":
      metrics.update(
        tail_fraction=opt_state.tail_fraction,
        tail_grad_norm=opt_state.tail_grad_norm,
        perturbed_tail_grad_norm=opt_state.perturbed_tail_grad_norm,
      )
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, model_state, opt_state), metrics

  return step


class CapacitySteps:
  """ImbSAM's step compiled once per tail capacity, the capacity picked on the host.

  The fast path without control flow (``imbsam(..., overflow="nan")``) is exact
  for a batch whose tail fits its capacity. The host has the labels before the
  step: :meth:`select` counts the global batch's tail rows (summed over the
  processes) and returns the step of :func:`imbsam_jax.bucket_capacity` of that
  count, compiling it the first time. ``build(k)`` makes the jitted step of
  capacity ``k``; every step shares the state's structure.

  Example:
    >>> steps = CapacitySteps(lambda k: f"step of {k}", lambda b: b["y"] == 9, 8, 64)
    >>> steps.select({"y": np.array([9] * 11)}, 0), steps.capacities
    ('step of 16', [16])
  """

  def __init__(
    self,
    build: Callable[[int], Callable],
    tail_rows: Callable[[Any], np.ndarray],
    capacity: int,
    batch_size: int,
  ):
    self._build, self._tail_rows = build, tail_rows
    self._capacity, self._batch_size = capacity, batch_size
    self._steps: dict[int, Callable] = {}

  @property
  def capacities(self) -> list[int]:
    """The capacities compiled so far, in increasing order."""
    return sorted(self._steps)

  def select(self, local_batch: Any, position: int) -> Callable:
    """The step for this process's rows of a global batch (all processes call it;
    ``position``, the step's index, does not matter here)."""
    count = process_sum(int(np.sum(self._tail_rows(local_batch))))
    k = imbsam_jax.bucket_capacity(count, self._capacity, self._batch_size)
    if k not in self._steps:
      self._steps[k] = self._build(k)
    return self._steps[k]

  def compiles(self) -> int:
    """Compiled programs over all capacities."""
    return sum(step._cache_size() for step in self._steps.values())


class StagedSteps:
  """Jitted steps (or :class:`CapacitySteps`) that take turns by step index:
  ``steps[0]`` before ``boundaries[0]``, ``steps[1]`` from there to
  ``boundaries[1]``, and so on.

  For a method whose step changes at fixed points of training (SSE-SAM drops its
  head perturbation after a share of it): each stage's step is compiled once, the
  state is shared, and a resumed run picks the stage of its position.

  Example:
    >>> steps = StagedSteps(["with head", "without"], [140])
    >>> steps.select(None, 139), steps.select(None, 140)
    ('with head', 'without')
  """

  def __init__(self, steps: list[Callable], boundaries: list[int]):
    if len(steps) != len(boundaries) + 1:
      raise ValueError("StagedSteps needs one boundary fewer than steps.")
    self._steps, self._boundaries = steps, boundaries

  def select(self, local_batch: Any, position: int) -> Callable:
    """The step of the stage that step ``position`` is in (a stage's
    :class:`CapacitySteps` picks its own)."""
    step = self._steps[int(np.searchsorted(self._boundaries, position, "right"))]
    if isinstance(step, CapacitySteps):
      return step.select(local_batch, position)
    return step

  def compiles(self) -> int:
    """Compiled programs over all stages."""
    return sum(
      step.compiles() if isinstance(step, CapacitySteps) else step._cache_size()
      for step in self._steps
    )


class Preempted(SystemExit):
  """The run stopped on SIGTERM after writing a checkpoint (exit status 143)."""

  def __init__(self, message: str):
    print(message, file=sys.stderr, flush=True)
    super().__init__(128 + signal.SIGTERM)


class Preemption:
  """SIGTERM (SLURM, Kubernetes, TPU maintenance) asks the loop to stop after a step.

  Inside ``with Preemption() as p:`` a SIGTERM sets a flag instead of ending the
  process, and :meth:`requested` (the ``stop`` of :func:`train_steps`) says
  whether any process has one (then :attr:`stopped` stays true). With several
  processes every ``check_every``-th call compares the flags (a collective,
  which waits for the step), so that all stop after the same step; one process
  looks at every call.

  Example:
    >>> import os
    >>> with Preemption() as preemption:
    ...   before = preemption.requested()
    ...   os.kill(os.getpid(), signal.SIGTERM)
    ...   after = preemption.requested()
    >>> before, after
    (False, True)
  """

  def __init__(self, check_every: int = 10):
    self._every = 1 if jax.process_count() == 1 else check_every
    self._calls, self._flag, self._previous = 0, False, None
    self.stopped = False  # requested() has said so

  def __enter__(self) -> Preemption:
    def handler(signum: int, frame: Any) -> None:
      self._flag = True

    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    signal.signal(signal.SIGTERM, self._previous)

  def requested(self) -> bool:
    """Whether to stop now (the same answer on every process)."""
    self._calls += 1
    if self._every == 1:
      self.stopped = self._flag
    elif self._calls % self._every == 0:
      flags = multihost_utils.process_allgather(np.int32(self._flag))
      self.stopped = bool(np.any(flags))
    return self.stopped


def train_steps(
  step: Callable,
  state: TrainState,
  batches: Iterable[dict[str, np.ndarray]],
  mesh: Mesh,
  key: jax.Array,
  *,
  first_step: int = 0,
  sums: dict[str, jax.Array] | None = None,
  bar: Any = None,
  stop: Callable[[], bool] | None = None,
) -> tuple[TrainState, dict[str, jax.Array], int]:
  """Runs ``step`` over this process's rows of each global batch.

  Step ``i`` gets the key ``fold_in(key, first_step + i)``; a :class:`CapacitySteps`
  or :class:`StagedSteps` picks each batch's step. After each step, ``stop()`` true
  ends the loop early (no further batch is read). Returns the state, each metric
  summed over the steps (on device, added to ``sums``) and the step count.
  """
  sums, count = dict(sums or {}), 0
  for i, batch in enumerate(batches):
    selects = isinstance(step, (CapacitySteps, StagedSteps))
    run = step.select(batch, first_step + i) if selects else step
    state, metrics = run(state, shard_batch(batch, mesh), _fold_in(key, first_step + i))
    same = sums.keys() == metrics.keys()
    sums = _add_arrays(sums, metrics) if same else add_sums(sums, metrics)
    count += 1
    if bar is not None:
      bar.update(1)
    if stop is not None and stop():
      break
  return state, sums, count


# One dispatch each instead of several eager ones: per step, they were a third of
# a small model's step time on CPU (the digits' Deep SAD). The same values.
_fold_in = jax.jit(jax.random.fold_in)
_add_arrays = jax.jit(functools.partial(jax.tree.map, jnp.add))


def add_sums(sums: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
  """``sums`` with each metric of ``more`` added (a new one starts at its value).

  >>> add_sums({"loss": 1.0}, {"loss": 2.0, "tail_fraction": 0.5})
  {'loss': 3.0, 'tail_fraction': 0.5}
  """
  return {**sums, **{k: sums[k] + v if k in sums else v for k, v in more.items()}}


def process_sum(value: int) -> int:
  """``value`` summed over the JAX processes (all must call it).

  >>> process_sum(3)
  3
  """
  if jax.process_count() == 1:
    return value
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def sum_over_batches(
  fn: Callable[[Any], jax.Array], batches: Iterable[Any], mesh: Mesh
) -> np.ndarray:
  """``fn(global batch)`` summed over the batches, as NumPy on every process.

  ``fn`` (jitted, replicated output) gets the global arrays of this process's rows;
  e.g. per-class counts of correct predictions, summed over the processes' shards.
  """
  total = None
  for batch in batches:
    out = fn(shard_batch(batch, mesh))
    total = out if total is None else total + out
  return np.asarray(total)


def padded_batch_size(batch_size: int, num_examples: int, mesh: Mesh) -> int:
  """A global batch for a pass over ``num_examples`` with a padded last batch:
  ``batch_size``, at most ``num_examples``, rounded up to a multiple of the devices.

  >>> padded_batch_size(500, 10, data_parallel_mesh(jax.devices()[:1]))
  10
  """
  return mesh.size * -(-min(batch_size, num_examples) // mesh.size)


def evaluate(
  fn: Callable[[jax.Array], jax.Array], x: np.ndarray, batch_size: int, mesh: Mesh
) -> np.ndarray:
  """``fn`` over all of ``x`` in fixed-shape global batches, in order (any process
  count; the batch is :func:`padded_batch_size`)."""
  batch_size = padded_batch_size(batch_size, len(x), mesh)
  source, outs = pipeline.ArraySource(x, np.zeros(len(x), np.int32)), []
  for batch in pipeline.eval_loader(source, global_batch_size=batch_size):
    out = fn(shard_batch(batch["image"], mesh))
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    outs.append(np.asarray(out))
  return np.concatenate(outs)[: len(x)]  # the padding ends the last batch


def random_crop_flip(
  key: jax.Array, images: jax.Array, *, padding: int = 4
) -> jax.Array:
  """CIFAR augmentation on device: zero-pad, random crop back, random h-flip.

  Example:
    >>> random_crop_flip(jax.random.key(0), jnp.ones((2, 32, 32, 3))).shape
    (2, 32, 32, 3)
  """
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels)
    )
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)


def data_parallel_mesh(devices: Any = None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: all)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts ``tree`` on every device of ``mesh`` (params, optimizer state)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Global arrays sharded along the batch axis from this process's rows."""
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  if jax.process_count() == 1:  # the same, in one call
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    local_batch,
  )
