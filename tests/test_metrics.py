"""Tests of examples/shared/metrics.py."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from imbsam_jax._priors import long_tail_counts
from shared import metrics

# ---------------------------------------------------------------- accuracy


def counts_of(predictions, labels, num_classes):
  """Per-class (correct, total) counts, as the long-tailed evaluation sums them."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  total = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels[predictions == labels], minlength=num_classes)
  return correct, total


def test_classification_report_matches_sklearn_recall():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 7, 500)
  predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 7, 500))
  report = metrics.classification_report(
    *counts_of(predictions, labels, 7), [300, 200, 100, 50, 20, 10, 5]
  )
  expected = skm.recall_score(labels, predictions, average=None, labels=range(7))
  np.testing.assert_allclose(report["per_class"], expected, rtol=1e-12)
  assert report["overall"] == pytest.approx(skm.accuracy_score(labels, predictions))
  assert report["test_counts"] == np.bincount(labels, minlength=7).tolist()


def test_classification_report_errors():
  with pytest.raises(ValueError, match="one length"):
    metrics.classification_report([1, 1], [2, 2], [5, 5, 5])
  with pytest.raises(ValueError, match="exceeds"):
    metrics.classification_report([3, 1], [2, 2], [5, 5])
  report = metrics.classification_report([0, 0], [0, 0], [5, 5])
  assert np.isnan(report["overall"]) and report["per_class"] == [None, None]


# ---------------------------------------------------- Many / Medium / Few


def test_class_splits_boundaries():
  counts = [101, 100, 99, 21, 20, 19, 0]
  splits = metrics.class_splits(counts)
  np.testing.assert_array_equal(splits["many"], [1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(splits["medium"], [0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(splits["few"], [0, 0, 0, 0, 0, 1, 1])
  custom = metrics.class_splits(counts, many_threshold=20, few_threshold=20)
  np.testing.assert_array_equal(custom["medium"], [0, 0, 0, 0, 1, 0, 0])
  with pytest.raises(ValueError, match="exceeds"):
    metrics.class_splits(counts, many_threshold=10, few_threshold=20)


def test_split_accuracy_boundaries_exactly_20_and_100():
  acc = [0.9, 0.8, 0.6, 0.4, 0.2]
  result = metrics.split_accuracy(acc, [101, 100, 20, 19, 5])
  assert result["many"] == pytest.approx(0.9)
  assert result["medium"] == pytest.approx(0.7)  # 100 and 20 are Medium
  assert result["few"] == pytest.approx(0.3)
  assert list(result) == ["many", "medium", "few"]


def test_split_accuracy_empty_splits_and_absent_classes():
  assert metrics.split_accuracy([0.5, 0.7], [500, 300]) == {
    "many": pytest.approx(0.6),
    "medium": None,
    "few": None,
  }
  # A Few class with no test example is left out; none left -> None.
  result = metrics.split_accuracy([0.5, np.nan, 0.2, np.nan], [500, 50, 50, 5])
  assert result == {"many": 0.5, "medium": 0.2, "few": None}
  with pytest.raises(ValueError, match="differ"):
    metrics.split_accuracy([0.5], [1, 2])


def test_split_accuracy_end_to_end_on_cifar100_lt_profile():
  counts = long_tail_counts(500, 100, 100)
  splits = metrics.class_splits(counts)
  # PAPER.md: the 30 classes with 5..19 images are Few (= ImbSAM's tail).
  assert splits["few"].sum() == 30
  assert splits["many"].sum() + splits["medium"].sum() == 70
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(100), 100)  # balanced test set
  predictions = np.where(rng.random(labels.size) < 0.5, labels, 0)
  correct, total = counts_of(predictions, labels, 100)
  result = metrics.split_accuracy(correct / total, counts)
  for split, mask in splits.items():
    assert result[split] == pytest.approx(
      np.mean(predictions[mask[labels]] == labels[mask[labels]])
    )
