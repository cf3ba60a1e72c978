"""Curvature of the loss restricted to a subset of examples.

ImbSAM's evidence is that, under SGD or SAM, the tail classes of a long-tailed
dataset sit in sharp minima, and that ImbSAM flattens them. This module
measures that sharpness for any subset of the data (one class, the head group,
the tail group) selected by per-example weights ``w_i`` (e.g. ``labels == c``):

.. math::
  L_S(\\theta) = \\frac{\\sum_i w_i\\, \\ell_i(\\theta)}{\\sum_i w_i}

It provides Hessian-vector products of ``L_S`` (forward-over-reverse), its
largest-magnitude Hessian eigenvalue (power iteration) and its Hessian trace
(Hutchinson), on any pytree of parameters, over datasets that do not fit in one
batch. It is pure JAX: a Flax (NNX or Linen) model in eval mode is just a
``loss_fn`` closing over the model.

Conventions shared by all functions:

- ``loss_fn(params, batch) -> (B,)`` per-example losses, where every leaf of
  ``batch`` has the batch as its leading axis (the same ``loss_fn`` the ImbSAM
  transform takes). The per-batch work is jitted with ``loss_fn`` as a static
  argument: pass the same function object each time to reuse the compilation.
- ``batches`` is either a zero-arg callable returning a fresh iterable of
  ``(batch, weights)`` pairs, or a re-iterable collection of them (a list, a
  tuple, a data loader whose ``__iter__`` starts a new pass). One-shot
  iterators and generators are rejected, because the eigenvalue and trace
  estimators make one pass over the data per Hessian-vector product.
- All batches should have the same shapes, so the jitted per-batch function
  compiles once: pad the last batch with (valid) examples of weight 0.
- Sums are accumulated in float32 whatever the parameter dtype; results
  (Hessian-vector products, eigenvectors) are float32 pytrees with the
  structure of ``params``.
- Data parallelism needs no special code: shard each batch (and its weights)
  along the leading axis with a :class:`jax.sharding.NamedSharding` and keep
  ``params`` replicated; the jitted per-batch function reduces across devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
Batches = (
  Iterable[tuple[PyTree, jax.Array]] | Callable[[], Iterable[tuple[PyTree, jax.Array]]]
)


class TopEigenvalue(NamedTuple):
  """Result of :func:`top_hessian_eigenvalue`.

  Attributes:
    eigenvalue: the Hessian eigenvalue of largest magnitude (a Python float;
      negative if the dominant direction has negative curvature).
    eigenvector: its unit-norm eigenvector, a float32 pytree shaped like
      ``params`` (defined up to sign).
    num_iters: number of power iterations run (Hessian-vector products).
    converged: whether the relative change of the eigenvalue fell below
      ``tol`` before ``max_iters`` iterations.
  """

  eigenvalue: float
  eigenvector: PyTree
  num_iters: int
  converged: bool


class HessianTrace(NamedTuple):
  """Result of :func:`hessian_trace`.

  Attributes:
    trace: Hutchinson estimate of the Hessian trace (a Python float).
    stderr: standard error of ``trace``, the sample standard deviation of the
      per-probe estimates over ``sqrt(num_probes)`` (``nan`` for one probe).
    num_probes: number of Rademacher probes used.
  """

  trace: float
  stderr: float
  num_probes: int


# ---------------------------------------------------------------------------
# Input validation.


def _check_params(params: PyTree) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params has no leaves.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
        "Every leaf of params must be a float array (split integer state"
        f" such as step counters out of params), got dtype {leaf.dtype}."
      )


def _check_vector(params: PyTree, vector: PyTree) -> None:
  params_def = jax.tree.structure(params)
  vector_def = jax.tree.structure(vector)
  if params_def != vector_def:
    raise ValueError(
      "vector must have the same tree structure as params, got"
      f" {vector_def} and {params_def}."
    )
  for p, v in zip(jax.tree.leaves(params), jax.tree.leaves(vector), strict=True):
    if jnp.shape(p) != jnp.shape(v):
      raise ValueError(
        "vector must have the same leaf shapes as params, got"
        f" {jnp.shape(v)} for a leaf of shape {jnp.shape(p)}."
      )


def _check_batch(batch: PyTree, weights: Any) -> None:
  weights_shape = jnp.shape(weights)
  if len(weights_shape) != 1:
    raise ValueError(
      f"weights must have shape (B,), one per example; got {weights_shape}."
    )
  dtype = jnp.result_type(weights)
  if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(
      f"weights must be bool or float, got dtype {dtype}; for a 0/1 mask"
      " use e.g. `labels == c`."
    )
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch has no leaves.")
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if not shape or shape[0] != weights_shape[0]:
      raise ValueError(
        f"weights has shape {weights_shape} but a batch leaf has shape"
        f" {shape}; every batch leaf needs the batch as leading axis."
      )


def _as_float32(weights: Any) -> Any:
  """Weights as float32, so bool and float weights share one compilation."""
  if isinstance(weights, jax.Array):
    return weights if weights.dtype == jnp.float32 else weights.astype(jnp.float32)
  return np.asarray(weights, np.float32)


def _check_total_weight(total_weight: jax.Array) -> None:
  if isinstance(total_weight, jax.core.Tracer):
    return  # Inside a user's jit: nothing to check on the host.
  value = float(total_weight)
  if not value > 0:
    raise ValueError(
      f"The subset has total weight {value}; it must be positive (is the"
      " subset empty? are there any batches?)."
    )


def _passes(batches: Batches) -> Callable[[], Iterator[tuple[PyTree, Any]]]:
  """Returns a function starting a fresh pass over ``batches``."""
  if callable(batches):
    return lambda: iter(batches())
  if isinstance(batches, Iterator):
    raise TypeError(
      "batches is a one-shot iterator, but it is iterated once per"
      " Hessian-vector product: pass a list of (batch, weights) pairs or a"
      " zero-arg callable returning a fresh iterator."
    )
  if not isinstance(batches, Iterable):
    raise TypeError(
      "batches must be an iterable of (batch, weights) pairs or a zero-arg"
      f" callable returning one, got {type(batches).__name__}."
    )
  return lambda: iter(batches)


# ---------------------------------------------------------------------------
# Jitted kernels.


@functools.partial(jax.jit, static_argnums=0)
def _accumulate_hvp(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  weights: jax.Array,
  vector: PyTree,
  hvp_sum: PyTree,
  weight_sum: jax.Array,
) -> tuple[PyTree, jax.Array]:
  """Adds ``sum_i w_i H_i v`` and ``sum_i w_i`` of one batch to the sums."""

  def weighted_loss(p):
    losses = loss_fn(p, batch)
    if jnp.shape(losses) != weights.shape:
      raise ValueError(
        "loss_fn must return one loss per example, shape"
        f" {weights.shape}; got {jnp.shape(losses)}."
      )
    return jnp.sum(weights * losses.astype(jnp.float32))

  tangent = jax.tree.map(lambda v, p: v.astype(p.dtype), vector, params)
  _, batch_hvp = jax.jvp(jax.grad(weighted_loss), (params,), (tangent,))
  hvp_sum = jax.tree.map(lambda s, h: s + h.astype(jnp.float32), hvp_sum, batch_hvp)
  return hvp_sum, weight_sum + jnp.sum(weights)


@jax.jit
def _divide(tree: PyTree, denominator: jax.Array) -> PyTree:
  return jax.tree.map(lambda x: x / denominator, tree)


@jax.jit
def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  products = jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b)
  return sum(jax.tree.leaves(products), jnp.zeros((), jnp.float32))


@jax.jit
def _zeros_f32(params: PyTree) -> PyTree:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


@functools.partial(jax.jit, static_argnums=0)
def _random_like(
  sample: Callable, key: jax.Array, index: int, params: PyTree
) -> PyTree:
  """The ``index``-th float32 random pytree shaped like ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  sizes = [math.prod(jnp.shape(p)) for p in leaves]
  # One draw for all leaves: a single random-bits kernel compiles much faster.
  flat = sample(jax.random.fold_in(key, index), (sum(sizes),))
  pieces = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
  return treedef.unflatten(
    [x.reshape(jnp.shape(p)) for x, p in zip(pieces, leaves, strict=True)]
  )


def _rademacher(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.rademacher(key, shape, dtype=jnp.float32)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(key, shape, dtype=jnp.float32)


# ---------------------------------------------------------------------------
# Public API.


def hvp(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  weights: jax.Array,
  vector: PyTree,
) -> PyTree:
  """Hessian-vector product of the weighted mean loss of one batch.

  .. math::
    H_S v = \\frac{\\sum_i w_i \\nabla^2 \\ell_i(\\theta)\\, v}{\\sum_i w_i}

  Computed forward-over-reverse (``jax.jvp`` of ``jax.grad``), without forming
  the Hessian. This is the normalized product for this batch alone; use
  :func:`subset_hvp` for a dataset of several batches. Can be called inside
  ``jax.jit`` (the zero-total-weight check is then skipped).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
    params: pytree of float parameters.
    batch: pytree whose leaves have the batch size ``B`` as leading axis.
    weights: ``(B,)`` bool or float, non-negative per-example weights
      selecting the subset, e.g. ``labels == c``.
    vector: pytree shaped like ``params``.

  Returns:
    ``H_S v``, a float32 pytree shaped like ``params``.

  Raises:
    ValueError: if shapes do not match or the total weight is not positive.

  Example:
    >>> import jax.numpy as jnp
    >>> from imbsam_jax import sharpness
    >>> loss_fn = lambda w, x: 0.5 * (x @ w) ** 2  # Hessian of l_i: x_i x_i^T
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> v = jnp.array([1.0, 1.0])
    >>> sharpness.hvp(loss_fn, jnp.zeros(2), x, jnp.array([True, True]), v)
    Array([0.5, 2. ], dtype=float32)
    >>> sharpness.hvp(loss_fn, jnp.zeros(2), x, jnp.array([False, True]), v)
    Array([0., 4.], dtype=float32)
  """
  _check_params(params)
  _check_vector(params, vector)
  _check_batch(batch, weights)
  hvp_sum, total_weight = _accumulate_hvp(
    loss_fn,
    params,
    batch,
    _as_float32(weights),
    vector,
    _zeros_f32(params),
    jnp.zeros((), jnp.float32),
  )
  _check_total_weight(total_weight)
  return _divide(hvp_sum, total_weight)


def _subset_hvp(loss_fn, params, start_pass, vector):
  """``subset_hvp`` without re-validating params and vector."""
  hvp_sum = _zeros_f32(params)
  total_weight = jnp.zeros((), jnp.float32)
  for item in start_pass():
    if not (isinstance(item, tuple | list) and len(item) == 2):
      raise ValueError(
        "Each element of batches must be a (batch, weights) pair, got"
        f" {type(item).__name__}."
      )
    batch, weights = item
    _check_batch(batch, weights)
    hvp_sum, total_weight = _accumulate_hvp(
      loss_fn, params, batch, _as_float32(weights), vector, hvp_sum, total_weight
    )
  _check_total_weight(total_weight)
  return _divide(hvp_sum, total_weight)


def subset_hvp(
  loss_fn: LossFn, params: PyTree, batches: Batches, vector: PyTree
) -> PyTree:
  """Hessian-vector product of the subset loss over a dataset of batches.

  .. math::
    H_S v = \\frac{\\sum_b \\sum_{i \\in b} w_i \\nabla^2 \\ell_i(\\theta)\\, v}
      {\\sum_b \\sum_{i \\in b} w_i}

  The weighted sums are accumulated in float32 over the batches by one jitted
  per-batch function, which compiles once when all batches have the same
  shapes, and divided by the total weight at the end.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
    params: pytree of float parameters.
    batches: ``(batch, weights)`` pairs: a re-iterable collection, or a
      zero-arg callable returning a fresh iterable (see the module docstring).
    vector: pytree shaped like ``params``.

  Returns:
    ``H_S v``, a float32 pytree shaped like ``params``.

  Raises:
    ValueError: on mismatched shapes, or if the total weight is not positive
      (an empty subset, or no batches).
    TypeError: if ``batches`` is a one-shot iterator.

  Example:
    >>> import jax.numpy as jnp
    >>> from imbsam_jax import sharpness
    >>> loss_fn = lambda w, x: 0.5 * (x @ w) ** 2
    >>> batches = [(jnp.array([[1.0, 0.0]]), jnp.array([1.0])),
    ...            (jnp.array([[0.0, 2.0]]), jnp.array([1.0]))]
    >>> sharpness.subset_hvp(loss_fn, jnp.zeros(2), batches, jnp.ones(2))
    Array([0.5, 2. ], dtype=float32)
  """
  _check_params(params)
  _check_vector(params, vector)
  return _subset_hvp(loss_fn, params, _passes(batches), vector)


def top_hessian_eigenvalue(
  loss_fn: LossFn,
  params: PyTree,
  batches: Batches,
  *,
  key: jax.Array,
  max_iters: int = 100,
  tol: float = 1e-4,
) -> TopEigenvalue:
  """Largest-magnitude eigenvalue of the subset-loss Hessian, by power iteration.

  .. math::
    v_{k+1} = H_S v_k / \\|H_S v_k\\|, \\qquad
    \\lambda_k = v_k^\\top H_S v_k

  Starts from a normal random vector drawn with ``key`` (so the result is
  deterministic given the key) and stops when
  ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|`` or after ``max_iters``
  Hessian-vector products, each one pass over ``batches``. As in PyHessian,
  power iteration finds the eigenvalue of largest *magnitude*: if negative
  curvature dominates, the result is negative. It converges at the rate
  ``|lambda_2 / lambda_1|`` and does not converge if ``lambda`` and
  ``-lambda`` are both dominant; check ``converged``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
    params: pytree of float parameters.
    batches: ``(batch, weights)`` pairs: a re-iterable collection, or a
      zero-arg callable returning a fresh iterable (see the module docstring).
    key: PRNG key for the starting vector.
    max_iters: maximum number of power iterations, at least 1.
    tol: relative tolerance on the change of the eigenvalue, non-negative.

  Returns:
    A :class:`TopEigenvalue` ``(eigenvalue, eigenvector, num_iters,
    converged)``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from imbsam_jax import sharpness
    >>> loss_fn = lambda w, x: 0.5 * (x @ w) ** 2
    >>> x = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # H_S = diag(0.5, 8)
    >>> batches = [(x, jnp.ones(2))]
    >>> result = sharpness.top_hessian_eigenvalue(
    ...     loss_fn, jnp.zeros(2), batches, key=jax.random.key(0))
    >>> round(result.eigenvalue, 4), result.converged
    (8.0, True)
  """
  if max_iters < 1:
    raise ValueError(f"max_iters must be at least 1, got {max_iters}.")
  if not tol >= 0:
    raise ValueError(f"tol must be non-negative, got {tol}.")
  _check_params(params)
  start_pass = _passes(batches)

  vector = _random_like(_normal, key, 0, params)
  vector = _divide(vector, jnp.sqrt(_vdot(vector, vector)))
  eigenvalue = None
  for num_iters in range(1, max_iters + 1):
    product = _subset_hvp(loss_fn, params, start_pass, vector)
    new_eigenvalue = float(_vdot(vector, product))
    norm = jnp.sqrt(_vdot(product, product))
    if float(norm) == 0.0:  # H_S v = 0: v is an eigenvector of eigenvalue 0.
      return TopEigenvalue(0.0, vector, num_iters, True)
    vector = _divide(product, norm)
    if eigenvalue is not None and abs(new_eigenvalue - eigenvalue) <= tol * abs(
      new_eigenvalue
    ):
      return TopEigenvalue(new_eigenvalue, vector, num_iters, True)
    eigenvalue = new_eigenvalue
  return TopEigenvalue(eigenvalue, vector, max_iters, False)


def hessian_trace(
  loss_fn: LossFn,
  params: PyTree,
  batches: Batches,
  *,
  key: jax.Array,
  num_probes: int = 100,
) -> HessianTrace:
  """Hutchinson estimate of the trace of the subset-loss Hessian.

  .. math::
    \\operatorname{tr} H_S \\approx \\frac{1}{m} \\sum_{k=1}^m z_k^\\top H_S z_k,
    \\qquad z_k \\sim \\text{Rademacher}

  Each probe is one pass over ``batches``. The estimate is unbiased; its
  variance is ``2 sum_{i != j} H_ij^2 / m`` (exact for a diagonal Hessian).

  Args:
    loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
    params: pytree of float parameters.
    batches: ``(batch, weights)`` pairs: a re-iterable collection, or a
      zero-arg callable returning a fresh iterable (see the module docstring).
    key: PRNG key for the probes; the result is deterministic given it.
    num_probes: number ``m`` of Rademacher probes, at least 1.

  Returns:
    A :class:`HessianTrace` ``(trace, stderr, num_probes)``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from imbsam_jax import sharpness
    >>> loss_fn = lambda w, x: 0.5 * (x @ w) ** 2
    >>> x = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # H_S = diag(0.5, 8)
    >>> result = sharpness.hessian_trace(
    ...     loss_fn, jnp.zeros(2), [(x, jnp.ones(2))], key=jax.random.key(0),
    ...     num_probes=3)
    >>> result.trace, result.stderr
    (8.5, 0.0)
  """
  if num_probes < 1:
    raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
  _check_params(params)
  start_pass = _passes(batches)

  estimates = []
  for index in range(num_probes):
    probe = _random_like(_rademacher, key, index, params)
    product = _subset_hvp(loss_fn, params, start_pass, probe)
    estimates.append(float(_vdot(probe, product)))
  estimates = np.asarray(estimates, dtype=np.float64)
  stderr = (
    float(np.std(estimates, ddof=1) / math.sqrt(num_probes))
    if num_probes > 1
    else math.nan
  )
  return HessianTrace(float(np.mean(estimates)), stderr, num_probes)
