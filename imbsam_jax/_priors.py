"""Class priors: which examples are *tail*, and the long-tail profile.

ImbSAM splits a batch by class prior. These helpers turn training-set class
counts (or the Deep SAD labelling convention) into ``tail_mask_fn`` callables
for :func:`imbsam_jax.imbsam`, and build the exponential long-tail profile used
by the CIFAR-LT benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TailMaskFn = Callable[[Any], jax.Array]
"""``labels -> (B,)`` tail weights, bool or float in [0, 1].

The functions of :func:`tail_mask_from_counts` and :func:`soft_tail_mask_from_counts`
also carry ``tail_fraction`` (a float attribute): the share of training examples
whose tail weight is above zero, from which ``imbsam(..., tail_capacity="auto")``
sizes its tail passes, and ``num_classes``, the range of labels they take, which
``imbsam(..., debug_checks=True)`` checks. A function of your own may set them too.
"""

#: Deep SAD label of a labeled anomaly (+1 labeled normal, 0 unlabeled).
LABELED_ANOMALY = -1


def _as_counts(class_counts: Any) -> np.ndarray:
  """Validates training-set class counts: 1-D, finite, non-negative."""
  counts = np.asarray(class_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(
      "class_counts must be a non-empty 1-D array of per-class training"
      f" sample counts, got shape {counts.shape}."
    )
  if not (
    np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)
  ):
    raise TypeError(f"class_counts must be numeric, got dtype {counts.dtype}.")
  if not np.all(np.isfinite(counts)) or np.any(counts < 0):
    raise ValueError("class_counts must be finite and non-negative.")
  return counts


def concrete(x: Any) -> np.ndarray | None:
  """``x`` as a NumPy array if its value is known now, None if it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _lookup(per_class: np.ndarray, counts: np.ndarray) -> TailMaskFn:
  """Returns ``labels -> per_class[labels]`` with a shape/dtype check.

  The lookup is a one-hot comparison rather than a gather, so that it keeps the
  sharding of ``labels`` under any mesh (a gather from a replicated table with
  sharded indices needs an explicit output sharding under Explicit mesh axes).
  Labels outside ``[0, num_classes)`` are an error when their values are known
  (outside ``jit``); traced ones get weight 0 (head), and
  ``imbsam(..., debug_checks=True)`` checks them. The function carries
  ``num_classes`` and ``tail_fraction``, the share of the ``counts`` training
  examples whose weight is above zero (absent when the counts sum to zero).
  """
  num_classes = per_class.shape[0]
  classes = np.arange(num_classes)

  def tail_mask_fn(labels: Any) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise TypeError(
        f"labels must be integer class indices, got dtype {labels.dtype}."
      )
    values = concrete(labels)
    if (
      values is not None
      and values.size
      and not (values.min() >= 0 and values.max() < num_classes)
    ):
      raise ValueError(
        f"labels must be class indices in [0, {num_classes}) (the classes of"
        f" class_counts), got values from {values.min()} to {values.max()}."
      )
    one_hot = labels[..., None] == classes
    if per_class.dtype == np.bool_:
      return jnp.any(one_hot & per_class, axis=-1)
    return jnp.sum(jnp.where(one_hot, per_class, 0), axis=-1).astype(per_class.dtype)

  tail_mask_fn.num_classes = num_classes
  total = float(np.sum(counts, dtype=np.float64))
  if total > 0:
    tail = float(np.sum(counts[per_class > 0], dtype=np.float64))
    tail_mask_fn.tail_fraction = tail / total
  return tail_mask_fn


def tail_classes(class_counts: Any, eta: float) -> np.ndarray:
  """Boolean per-class tail indicator: ``class_counts[c] < eta``.

  .. math::
    \\text{tail}_c = [n_c < \\eta]

  Args:
    class_counts: 1-D array of training-sample counts per class.
    eta: threshold; strict comparison, as in the reference implementation.

  Returns:
    A NumPy bool array of shape ``(num_classes,)``.

  Example:
    >>> import imbsam_jax
    >>> imbsam_jax.tail_classes([500, 100, 20, 19, 5], eta=20).tolist()
    [False, False, False, True, True]
  """
  counts = _as_counts(class_counts)
  return counts < eta


def tail_mask_from_counts(class_counts: Any, eta: float = 20) -> TailMaskFn:
  """A ``tail_mask_fn`` marking examples of classes with fewer than eta samples.

  .. math::
    t_i = [n_{y_i} < \\eta]

  Args:
    class_counts: 1-D array of training-sample counts per class.
    eta: tail threshold (default 20, the reference value on CIFAR-100-LT).

  Returns:
    ``tail_mask_fn(labels) -> bool[labels.shape]``, jit-friendly. Its attribute
    ``tail_fraction`` is the share of training examples in the tail classes
    (what ``imbsam(..., tail_capacity="auto")`` reads).

  Example:
    >>> import jax.numpy as jnp
    >>> import imbsam_jax
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> mask_fn(jnp.array([0, 2, 1, 2])).tolist()
    [False, True, False, True]
    >>> round(mask_fn.tail_fraction, 4)  # 5 / 555
    0.009
  """
  counts = _as_counts(class_counts)
  return _lookup(counts < eta, counts)


def soft_tail_weights(
  class_counts: Any, eta: float = 20, *, temperature: float = 0.5
) -> np.ndarray:
  """Soft per-class tail weights in (0, 1) from the class prior.

  A smooth version of ``n_c < eta`` on the log-count scale, so that classes
  near the threshold are split between the head and the tail objective:

  .. math::
    t_c = \\sigma\\big((\\log \\eta - \\log n_c) / \\tau\\big)

  ``temperature -> 0`` approaches the hard mask (a class with exactly ``eta``
  samples gets 0.5); a class with no samples gets weight 1.

  Args:
    class_counts: 1-D array of training-sample counts per class.
    eta: count at which a class is half head, half tail.
    temperature: width of the transition, in natural-log units of count.

  Returns:
    A float32 NumPy array of shape ``(num_classes,)``.

  Example:
    >>> import imbsam_jax
    >>> w = imbsam_jax.soft_tail_weights([500, 20, 5], eta=20, temperature=0.5)
    >>> [round(float(v), 3) for v in w]
    [0.002, 0.5, 0.941]
  """
  counts = _as_counts(class_counts).astype(np.float64)
  if eta <= 0:
    raise ValueError(f"eta must be positive, got {eta}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  with np.errstate(divide="ignore"):
    logits = (math.log(eta) - np.log(counts)) / temperature
  return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # stable sigmoid


def soft_tail_mask_from_counts(
  class_counts: Any, eta: float = 20, *, temperature: float = 0.5
) -> TailMaskFn:
  """A ``tail_mask_fn`` giving each example its class's soft tail weight.

  .. math::
    t_i = \\sigma\\big((\\log \\eta - \\log n_{y_i}) / \\tau\\big)

  See :func:`soft_tail_weights` for the weights. Every class with a float32
  weight above zero takes part in the tail passes, usually all of them, so
  its ``tail_fraction`` is about 1 and ``tail_capacity="auto"`` keeps the
  full-batch passes (gathering would save nothing).

  Example:
    >>> import jax.numpy as jnp
    >>> import imbsam_jax
    >>> mask_fn = imbsam_jax.soft_tail_mask_from_counts([500, 20, 5])
    >>> [round(float(v), 2) for v in mask_fn(jnp.array([2, 1]))]
    [0.94, 0.5]
    >>> mask_fn.tail_fraction
    1.0
  """
  counts = _as_counts(class_counts)
  return _lookup(soft_tail_weights(counts, eta, temperature=temperature), counts)


def focal_tail_weights(
  class_counts: Any, gamma: float, *, lam: float = 1.0
) -> np.ndarray:
  """Focal-SAM's per-class weights of the perturbed loss, from the class prior.

  .. math::
    t_c = \\lambda (1 - \\pi_c)^\\gamma, \\quad \\pi_c = n_c / \\textstyle\\sum_j n_j

  Rare classes get weights near ``lam``, frequent ones less (the more, the larger
  ``gamma``); ``gamma = 0`` gives every class ``lam``, and with ``lam = 1`` the
  tail is the whole batch: SAM.

  Args:
    class_counts: 1-D array of training-sample counts per class (not all zero).
    gamma: the focusing exponent (>= 0; Focal-SAM's CIFAR-100-LT recipe: 3.2).
    lam: the share of each example's loss that is perturbed, in [0, 1]
      (Focal-SAM's ``lambda``; its CIFAR-100-LT recipe: 0.8).

  Returns:
    A float32 NumPy array of shape ``(num_classes,)``.

  Example:
    >>> import imbsam_jax
    >>> w = imbsam_jax.focal_tail_weights([90, 9, 1], gamma=2.0, lam=0.8)
    >>> [round(float(v), 4) for v in w]  # 0.8 * (1 - [.9, .09, .01]) ** 2
    [0.008, 0.6625, 0.7841]
  """
  counts = _as_counts(class_counts).astype(np.float64)
  if not (math.isfinite(gamma) and gamma >= 0):
    raise ValueError(f"gamma must be finite and >= 0, got {gamma}.")
  if not 0 <= lam <= 1:
    raise ValueError(f"lam must be in [0, 1], got {lam}.")
  total = counts.sum()
  if total <= 0:
    raise ValueError("class_counts must not all be zero (the prior is n_c / sum n).")
  return (lam * (1.0 - counts / total) ** gamma).astype(np.float32)


def focal_tail_mask_from_counts(
  class_counts: Any, gamma: float, *, lam: float = 1.0
) -> TailMaskFn:
  """A ``tail_mask_fn`` giving each example Focal-SAM's weight of its class.

  .. math::
    t_i = \\lambda (1 - \\pi_{y_i})^\\gamma

  With it, :func:`imbsam` is Focal-SAM: its step, ``grad(L - lam L_g)(w) +
  lam grad L_g(w + e)`` with ``L_g = mean_i (1 - pi_i)^gamma l_i`` and ``e``
  along ``grad L_g``, is ImbSAM's with these soft weights (``lam`` cancels in
  the perturbation's direction). See :func:`focal_tail_weights`; every class
  takes part in the tail passes, so ``tail_fraction`` is 1 (with ``lam > 0``)
  and ``tail_capacity="auto"`` keeps the full-batch passes.

  Example:
    >>> import jax.numpy as jnp, optax, imbsam_jax
    >>> mask_fn = imbsam_jax.focal_tail_mask_from_counts([90, 9, 1], gamma=2.0, lam=0.8)
    >>> [round(float(v), 4) for v in mask_fn(jnp.array([2, 0]))]
    [0.7841, 0.008]
    >>> tx = imbsam_jax.imbsam(optax.sgd(0.1), rho=0.3, tail_mask_fn=mask_fn)
  """
  counts = _as_counts(class_counts)
  return _lookup(focal_tail_weights(counts, gamma, lam=lam), counts)


def labeled_anomaly_mask(labels: Any) -> jax.Array:
  """Tail mask for semi-supervised anomaly detection (Deep SAD labels).

  Labels follow the Deep SAD convention: ``+1`` labeled normal, ``-1`` labeled
  anomaly, ``0`` unlabeled. The labeled anomalies are the extreme tail:

  .. math::
    t_i = [y_i = -1]

  Use it directly as ``tail_mask_fn``.

  Example:
    >>> import jax.numpy as jnp
    >>> import imbsam_jax
    >>> imbsam_jax.labeled_anomaly_mask(jnp.array([0, 1, -1, 0])).tolist()
    [False, False, True, False]
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
      f"labels must be integer Deep SAD labels (+1, -1, 0), got dtype {labels.dtype}."
    )
  return labels == LABELED_ANOMALY


def long_tail_counts(
  max_count: int, num_classes: int, imbalance_ratio: float
) -> np.ndarray:
  """The exponential long-tail profile of the CIFAR-LT benchmarks.

  .. math::
    n_c = \\lfloor n_{max} \\cdot (1 / \\mathrm{IR})^{c / (C - 1)} \\rfloor

  as in LDAM-DRW and the ImbSAM reference code (class 0 is the head).

  Args:
    max_count: ``n_max``, images of the most frequent class.
    num_classes: ``C``.
    imbalance_ratio: ``IR = n_max / n_min`` (>= 1; 1 keeps classes balanced).

  Returns:
    An int64 NumPy array of shape ``(num_classes,)``.

  Example:
    >>> import imbsam_jax
    >>> counts = imbsam_jax.long_tail_counts(500, 100, 100)
    >>> int(counts[0]), int(counts[-1]), int(counts.sum())
    (500, 5, 10847)
  """
  if max_count < 1 or num_classes < 1:
    raise ValueError("max_count and num_classes must be positive.")
  if not imbalance_ratio >= 1:
    raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}.")
  if num_classes == 1:
    return np.array([max_count], dtype=np.int64)
  exponents = np.arange(num_classes) / (num_classes - 1.0)
  counts = [int(max_count * (1.0 / imbalance_ratio) ** e) for e in exponents]
  return np.array(counts, dtype=np.int64)


def capacity_from_tail_fraction(
  tail_fraction: float,
  batch_size: int,
  *,
  num_std: float = 2.0,
  multiple: int = 8,
) -> int:
  """Tail capacity for a batch whose examples are tail with probability p.

  With uniform sampling the number of tail examples in a batch of size ``B`` is
  Binomial(B, p); the capacity is that count's mean plus ``num_std`` standard
  deviations,

  .. math::
    k = \\lceil B p + s \\sqrt{B p (1 - p)} \\rceil,

  rounded up to a multiple of ``multiple`` and clipped to ``[1, B]``. The one
  rule behind :func:`suggest_tail_capacity` and ``imbsam(...,
  tail_capacity="auto")``.

  Args:
    tail_fraction: ``p`` in [0, 1], the share of training examples with tail
      weight above zero (``tail_mask_fn.tail_fraction``).
    batch_size: ``B`` (per device inside ``shard_map``/``pmap``).
    num_std: ``s`` (>= 0).
    multiple: round ``k`` up to a multiple of this (>= 1).

  Returns:
    ``k``, an int in ``[1, B]``.

  Example:
    >>> import imbsam_jax
    >>> [imbsam_jax.capacity_from_tail_fraction(p, 128) for p in (0.03, 0.2)]
    [8, 40]
  """
  p = float(tail_fraction)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"tail_fraction must be in [0, 1], got {tail_fraction}.")
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
  if not (math.isfinite(num_std) and num_std >= 0):
    raise ValueError(f"num_std must be finite and >= 0, got {num_std}.")
  if isinstance(multiple, bool) or int(multiple) != multiple or multiple < 1:
    raise ValueError(f"multiple must be a positive int, got {multiple}.")
  batch_size, multiple = int(batch_size), int(multiple)
  mean = batch_size * p
  std = math.sqrt(batch_size * p * (1.0 - p))
  k = math.ceil(mean + num_std * std)
  k = multiple * math.ceil(max(k, 1) / multiple)
  return int(min(max(k, 1), batch_size))


def bucket_capacity(num_tail: int, capacity: int, batch_size: int) -> int:
  """The smallest of ``k, 2k, 4k, ..., B`` that holds a batch's tail examples.

  .. math::
    c = \\min(B, \\; k \\, 2^{\\max(0, \\lceil \\log_2 (n / k) \\rceil)})

  For a fast path without control flow that is exact for every batch: the
  host, which has the labels before the step, picks the capacity of each
  batch and runs a step compiled for it (``imbsam(..., tail_capacity=c,
  overflow="nan")``, which that batch never overflows; ``c = B`` is the
  full-batch path). Each capacity used compiles once: with ``k`` from
  :func:`capacity_from_tail_fraction` (``num_std = 2``) and uniform
  sampling, about 2% of the batches hold more than ``k`` tail examples and
  almost none more than ``2k``, so a run compiles two steps, rarely three.

  Args:
    num_tail: ``n``, the batch's examples with tail weight above zero (the
      global batch's, when it is sharded).
    capacity: ``k``, the smallest capacity (e.g. from
      :func:`capacity_from_tail_fraction`).
    batch_size: ``B``.

  Returns:
    ``c``, an int in ``[k, B]`` (``B`` if ``k > B``), at least ``num_tail``.

  Example:
    >>> import imbsam_jax
    >>> [imbsam_jax.bucket_capacity(n, 8, 128) for n in (0, 8, 9, 17, 100)]
    [8, 8, 16, 32, 128]
  """
  if isinstance(num_tail, bool) or int(num_tail) != num_tail or num_tail < 0:
    raise ValueError(f"num_tail must be an int >= 0, got {num_tail}.")
  if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
    raise ValueError(f"capacity must be a positive int, got {capacity}.")
  if num_tail > batch_size:
    raise ValueError(f"num_tail={num_tail} exceeds batch_size={batch_size}.")
  while capacity < num_tail:
    capacity *= 2
  return int(min(capacity, batch_size))


def suggest_tail_capacity(
  class_counts: Any,
  eta: float,
  batch_size: int,
  *,
  num_std: float = 2.0,
  multiple: int = 8,
) -> int:
  """Suggests ``tail_capacity`` for :func:`imbsam_jax.imbsam`'s fast path.

  With uniform sampling, the number of tail examples in a batch of size ``B`` is
  Binomial(B, p), p the share of training examples in classes with fewer than
  ``eta`` samples. The suggestion is (:func:`capacity_from_tail_fraction`)

  .. math::
    k = \\lceil B p + s \\sqrt{B p (1 - p)} \\rceil

  rounded up to a multiple of ``multiple`` and clipped to ``[1, B]``: what
  ``imbsam(..., tail_capacity="auto")`` picks for ``tail_mask_from_counts(
  class_counts, eta)``. Batches with more tail examples are still exact (the
  transform processes the tail in extra chunks), only slower. With the
  default ``s = 2`` about 2% of batches need a second chunk; each pass on
  ``k`` examples costs ``k / B`` of a full-batch pass, so a small ``k`` wins.

  Args:
    class_counts: 1-D array of training-sample counts per class.
    eta: tail threshold (strict, as in :func:`tail_classes`).
    batch_size: ``B``.
    num_std: ``s`` (>= 0).
    multiple: round ``k`` up to a multiple of this.

  Returns:
    ``k``, an int in ``[1, B]``.

  Example:
    >>> import imbsam_jax
    >>> counts = imbsam_jax.long_tail_counts(500, 100, 100)
    >>> imbsam_jax.suggest_tail_capacity(counts, eta=20, batch_size=128)
    8
  """
  counts = _as_counts(class_counts).astype(np.float64)
  total = counts.sum()
  if total <= 0:
    raise ValueError("class_counts must not all be zero.")
  p = counts[counts < eta].sum() / total
  return capacity_from_tail_fraction(p, batch_size, num_std=num_std, multiple=multiple)
