"""Tests of the class-prior helpers (tail masks, long-tail profile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imbsam_jax


def test_tail_mask_is_strict_and_jittable():
  counts = [500, 100, 20, 19, 5, 0]
  mask_fn = imbsam_jax.tail_mask_from_counts(counts, eta=20)
  labels = jnp.array([0, 1, 2, 3, 4, 5, 3])
  want = [False, False, False, True, True, True, True]
  assert mask_fn(labels).tolist() == want
  assert jax.jit(mask_fn)(labels).tolist() == want
  assert mask_fn(labels).dtype == jnp.bool_


def test_cifar100_lt_tail_is_the_few_split():
  counts = imbsam_jax.long_tail_counts(500, 100, 100)
  tail = imbsam_jax.tail_classes(counts, eta=20)
  assert tail.sum() == 30  # the reference's 30 tail classes, 5..19 images each
  assert counts[tail].min() == 5 and counts[tail].max() == 19
  assert counts[tail].sum() / counts.sum() == pytest.approx(0.028, abs=1e-3)


@pytest.mark.parametrize(
  "max_count, classes, ratio, total",
  [
    (5000, 10, 100, 12406),
    (5000, 10, 50, 13996),
    (500, 100, 100, 10847),
    (500, 100, 1, 50000),
  ],
)
def test_long_tail_counts_match_the_benchmarks(max_count, classes, ratio, total):
  counts = imbsam_jax.long_tail_counts(max_count, classes, ratio)
  assert counts.sum() == total
  assert counts[0] == max_count
  assert np.all(np.diff(counts) <= 0)


def test_soft_weights():
  counts = np.array([5000, 200, 40, 20, 10, 1, 0])
  w = imbsam_jax.soft_tail_weights(counts, eta=20, temperature=0.5)
  assert np.all(np.diff(w) > 0)  # rarer classes are more tail
  assert w[3] == pytest.approx(0.5)
  assert w[-1] == 1.0 and 0 < w[0] < 1e-3
  sharp = imbsam_jax.soft_tail_weights(counts, eta=20, temperature=1e-3)
  np.testing.assert_array_equal(
    sharp[[0, 1, 2, 4, 5, 6]] > 0.5, counts[[0, 1, 2, 4, 5, 6]] < 20
  )
  mask_fn = imbsam_jax.soft_tail_mask_from_counts(counts, eta=20)
  np.testing.assert_allclose(mask_fn(jnp.arange(7)), w, rtol=1e-6)
  assert mask_fn(jnp.arange(7)).dtype == jnp.float32


def test_labeled_anomaly_mask():
  labels = jnp.array([1, 0, -1, 0, -1])
  assert imbsam_jax.labeled_anomaly_mask(labels).tolist() == [
    False,
    False,
    True,
    False,
    True,
  ]
  with pytest.raises(TypeError, match="integer"):
    imbsam_jax.labeled_anomaly_mask(jnp.array([1.0, -1.0]))


@pytest.mark.parametrize(
  "make", [imbsam_jax.tail_mask_from_counts, imbsam_jax.soft_tail_mask_from_counts]
)
def test_out_of_range_labels(make):
  """Known labels outside the classes are an error; traced ones are head
  (imbsam's debug_checks catch them, tests/test_imbsam.py)."""
  mask_fn = make([100, 5], eta=20)
  assert mask_fn.num_classes == 2
  with pytest.raises(ValueError, match=r"class indices in \[0, 2\).* -1 to 2"):
    mask_fn(jnp.array([1, 2, -1]))
  with pytest.raises(ValueError, match="class indices"):
    mask_fn(np.array([5]))
  weights = jax.jit(mask_fn)(jnp.array([1, 2, -1]))
  assert weights[0] > 0.5 and weights[1:].tolist() == [0, 0]


def test_suggest_tail_capacity():
  counts = imbsam_jax.long_tail_counts(500, 100, 100)
  k = imbsam_jax.suggest_tail_capacity(counts, eta=20, batch_size=128)
  p = 0.0281
  assert k >= 128 * p + 2 * np.sqrt(128 * p * (1 - p)) and k % 8 == 0
  assert k == 8
  k4 = imbsam_jax.suggest_tail_capacity(counts, eta=20, batch_size=128, num_std=4)
  assert k4 >= 128 * p + 4 * np.sqrt(128 * p * (1 - p)) and k4 == 16
  assert imbsam_jax.suggest_tail_capacity(counts, eta=1, batch_size=128) == 8
  assert imbsam_jax.suggest_tail_capacity([1, 1], eta=5, batch_size=12) == 12
  assert imbsam_jax.suggest_tail_capacity(counts, 20, 128, multiple=1, num_std=0) == 4


def test_masks_carry_tail_fraction():
  """tail_fraction: share of training examples with weight > 0, for "auto"."""
  counts = imbsam_jax.long_tail_counts(500, 100, 100)
  mask_fn = imbsam_jax.tail_mask_from_counts(counts, eta=20)
  want = counts[counts < 20].sum() / counts.sum()
  assert mask_fn.tail_fraction == pytest.approx(want, rel=1e-12)
  # One rule: suggest_tail_capacity is the capacity of that fraction.
  for batch_size in (1, 7, 32, 128, 1000):
    assert imbsam_jax.suggest_tail_capacity(
      counts, 20, batch_size
    ) == imbsam_jax.capacity_from_tail_fraction(mask_fn.tail_fraction, batch_size)
  # Soft weights are above zero for every class: all examples take part.
  soft = imbsam_jax.soft_tail_mask_from_counts(counts, eta=20)
  assert soft.tail_fraction == 1.0
  assert imbsam_jax.capacity_from_tail_fraction(soft.tail_fraction, 128) == 128
  assert imbsam_jax.tail_mask_from_counts([10, 30], eta=5).tail_fraction == 0.0
  assert not hasattr(imbsam_jax.tail_mask_from_counts([0, 0], eta=5), "tail_fraction")


@pytest.mark.parametrize(
  "p, batch_size, want",
  [(0.0, 128, 8), (1.0, 128, 128), (0.03, 128, 8), (0.2, 128, 40), (0.5, 4, 4)],
)
def test_capacity_from_tail_fraction(p, batch_size, want):
  k = imbsam_jax.capacity_from_tail_fraction(p, batch_size)
  assert k == want
  mean, std = batch_size * p, np.sqrt(batch_size * p * (1 - p))
  assert k >= min(mean + 2 * std, batch_size) and 1 <= k <= batch_size


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"tail_fraction": 1.5}, "tail_fraction"),
    ({"tail_fraction": -0.1}, "tail_fraction"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"num_std": -1.0}, "num_std"),
    ({"multiple": 0}, "multiple"),
  ],
)
def test_capacity_from_tail_fraction_bad_arguments(kwargs, match):
  args = {"tail_fraction": 0.1, "batch_size": 64, **kwargs}
  with pytest.raises(ValueError, match=match):
    imbsam_jax.capacity_from_tail_fraction(**args)


@pytest.mark.parametrize(
  "counts, error",
  [
    ([[1, 2], [3, 4]], ValueError),
    ([], ValueError),
    ([10, -1], ValueError),
    ([10, float("nan")], ValueError),
    (["a", "b"], TypeError),
  ],
)
def test_bad_counts(counts, error):
  with pytest.raises(error, match="class_counts"):
    imbsam_jax.tail_mask_from_counts(counts, eta=20)


def test_bad_arguments():
  with pytest.raises(TypeError, match="integer"):
    imbsam_jax.tail_mask_from_counts([10, 1], eta=5)(jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="imbalance_ratio"):
    imbsam_jax.long_tail_counts(500, 10, 0.5)
  with pytest.raises(ValueError, match="temperature"):
    imbsam_jax.soft_tail_weights([10, 1], temperature=0)
  with pytest.raises(ValueError, match="batch_size"):
    imbsam_jax.suggest_tail_capacity([10, 1], eta=5, batch_size=0)


def test_bucket_capacity():
  """The smallest of k, 2k, ..., B holding the count, for every count."""
  for batch_size, k in [(128, 8), (64, 24), (10, 16)]:
    allowed = {min(k * 2**j, batch_size) for j in range(8)}
    for n in range(batch_size + 1):
      c = imbsam_jax.bucket_capacity(n, k, batch_size)
      assert c == min(a for a in allowed if a >= n)
  for args in [(-1, 8, 16), (3, 0, 16), (17, 8, 16), (True, 8, 16)]:
    with pytest.raises(ValueError):
      imbsam_jax.bucket_capacity(*args)
