"""Evaluation metrics of the example applications, as small NumPy functions.

Long-tailed classification: :func:`accuracy`, :func:`per_class_accuracy` and
the Many/Medium/Few breakdown of :func:`split_accuracy` (classes grouped by
their number of *training* images). Anomaly detection: :func:`auroc` and
:func:`roc_curve`, with ties between scores counted as half (the Mann-Whitney
U statistic), exactly like ``sklearn.metrics.roc_auc_score``.

Inputs may be NumPy or JAX arrays; results are NumPy values or Python floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Default split thresholds on training-set class counts (the ImbSAM / OLTR
#: convention): Many > 100, Medium 20..100, Few < 20.
MANY_THRESHOLD = 100
FEW_THRESHOLD = 20


def _predicted_classes(predictions: Any) -> np.ndarray:
  """Class indices from indices ``(N,)`` or scores/logits ``(N, C)``."""
  predictions = np.asarray(predictions)
  if predictions.ndim == 2:
    return predictions.argmax(axis=-1)
  if predictions.ndim != 1:
    raise ValueError(
      "predictions must be class indices (N,) or logits (N, C), got shape"
      f" {predictions.shape}."
    )
  return predictions


def accuracy(predictions: Any, labels: Any) -> float:
  """Fraction of correct predictions over all examples (top-1).

  Args:
    predictions: predicted class indices ``(N,)`` or logits ``(N, C)``.
    labels: true class indices ``(N,)``.

  Returns:
    The accuracy in [0, 1] (NaN for no examples).

  Example:
    >>> accuracy([0, 1, 1, 2], [0, 1, 2, 2])
    0.75
  """
  predictions, labels = _predicted_classes(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(
      f"predictions {predictions.shape} and labels {labels.shape} differ."
    )
  if labels.size == 0:
    return float("nan")
  return float(np.mean(predictions == labels))


def per_class_accuracy(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
  """Accuracy on the test examples of each class (the recall of each class).

  .. math::
    a_c = |\\{i : y_i = c,\\ \\hat y_i = c\\}| \\ / \\ |\\{i : y_i = c\\}|

  Args:
    predictions: predicted class indices ``(N,)`` or logits ``(N, C)``.
    labels: true class indices ``(N,)`` in ``[0, num_classes)``.
    num_classes: number of classes ``C``.

  Returns:
    A float64 array of shape ``(C,)``; NaN for a class with no test example
    (use ``np.nanmean`` to average over the classes present).

  Example:
    >>> per_class_accuracy([0, 1, 1, 0], [0, 1, 0, 0], num_classes=3).tolist()
    [0.6666666666666666, 1.0, nan]
  """
  predictions, labels = _predicted_classes(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(
      f"predictions {predictions.shape} and labels {labels.shape} differ."
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}).")
  total = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels[predictions == labels], minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def class_splits(
  train_counts: Any,
  *,
  many_threshold: int = MANY_THRESHOLD,
  few_threshold: int = FEW_THRESHOLD,
) -> dict[str, np.ndarray]:
  """Boolean class masks of the Many / Medium / Few splits.

  Many: ``n_c > many_threshold``; Medium: ``few_threshold <= n_c <=
  many_threshold``; Few: ``n_c < few_threshold``, with ``n_c`` the number of
  *training* images of class ``c``.

  Args:
    train_counts: ``(C,)`` training-set class counts.
    many_threshold: a class with more images is Many.
    few_threshold: a class with fewer images is Few.

  Returns:
    ``{"many": mask, "medium": mask, "few": mask}``, bool arrays of shape
    ``(C,)`` that partition the classes.

  Example:
    >>> s = class_splits([500, 101, 100, 20, 19])
    >>> {k: v.tolist() for k, v in s.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'many': [True, True, False, False, False],
     'medium': [False, False, True, True, False],
     'few': [False, False, False, False, True]}
  """
  counts = np.asarray(train_counts)
  if counts.ndim != 1:
    raise ValueError(f"train_counts must be 1-D, got shape {counts.shape}.")
  if few_threshold > many_threshold:
    raise ValueError(
      f"few_threshold={few_threshold} exceeds many_threshold={many_threshold}."
    )
  many = counts > many_threshold
  few = counts < few_threshold
  return {"many": many, "medium": ~many & ~few, "few": few}


def split_accuracy(
  per_class_acc: Any,
  train_counts: Any,
  *,
  many_threshold: int = MANY_THRESHOLD,
  few_threshold: int = FEW_THRESHOLD,
) -> dict[str, float | None]:
  """Mean per-class accuracy of the Many / Medium / Few splits.

  Each split's value is the unweighted mean of :func:`per_class_accuracy` over
  its classes (splits as in :func:`class_splits`); classes without test
  examples (NaN) are left out. A split with no class, or none with test
  examples, is ``None`` (the reference code reported 0 there).

  Args:
    per_class_acc: ``(C,)`` per-class accuracies, NaN for absent classes.
    train_counts: ``(C,)`` training-set class counts.
    many_threshold: a class with more training images is Many.
    few_threshold: a class with fewer training images is Few.

  Returns:
    ``{"many": float | None, "medium": float | None, "few": float | None}``.

  Example:
    >>> split_accuracy([0.9, 0.7, 0.5, 0.1], [500, 100, 20, 5])
    {'many': 0.9, 'medium': 0.6, 'few': 0.1}
    >>> split_accuracy([0.75, 0.25], [500, 300])
    {'many': 0.5, 'medium': None, 'few': None}
  """
  acc = np.asarray(per_class_acc, np.float64)
  counts = np.asarray(train_counts)
  if acc.shape != counts.shape:
    raise ValueError(
      f"per_class_acc {acc.shape} and train_counts {counts.shape} differ."
    )
  masks = class_splits(
    counts, many_threshold=many_threshold, few_threshold=few_threshold
  )
  result = {}
  for split, mask in masks.items():
    values = acc[mask & ~np.isnan(acc)]
    result[split] = float(values.mean()) if values.size else None
  return result


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of ``values``; tied values share their average rank."""
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Start of each run of equal values, and its length.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  lengths = np.diff(np.r_[starts, len(values)])
  run_ranks = starts + (lengths + 1) / 2.0  # average of ranks start+1..start+len
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(run_ranks, lengths)
  return ranks


def _check_scores(scores: Any, is_anomaly: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates ``(scores, is_anomaly)``: 1-D, same length, both classes."""
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(is_anomaly).astype(bool)
  if scores.ndim != 1 or scores.shape != positive.shape:
    raise ValueError(
      f"scores {scores.shape} and is_anomaly {positive.shape} must be 1-D"
      " of one length."
    )
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN.")
  if positive.all() or not positive.any():
    raise ValueError(
      "AUROC needs both anomalies and normal examples; is_anomaly is all"
      f" {bool(positive[0]) if positive.size else 'empty'}."
    )
  return scores, positive


def auroc(scores: Any, is_anomaly: Any) -> float:
  """Area under the ROC curve; a higher score means more anomalous.

  The probability that a random anomaly scores above a random normal example,
  ties counting one half (Mann-Whitney U with average ranks):

  .. math::
    \\mathrm{AUROC} = \\frac{R_+ - n_+ (n_+ + 1) / 2}{n_+ n_-}

  with ``R_+`` the sum of the anomalies' ranks among all scores.

  Args:
    scores: ``(N,)`` anomaly scores (no NaN; +-inf allowed).
    is_anomaly: ``(N,)`` bool (or 0/1) ground truth; both values must occur.

  Returns:
    The AUROC in [0, 1], equal to ``sklearn.metrics.roc_auc_score``.

  Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> auroc([1.0, 1.0, 0.0], [1, 0, 0])  # a tie counts 1/2
    0.75
  """
  scores, positive = _check_scores(scores, is_anomaly)
  n_pos = int(positive.sum())
  n_neg = len(scores) - n_pos
  rank_sum = _average_ranks(scores)[positive].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: Any, is_anomaly: Any) -> tuple[np.ndarray, np.ndarray]:
  """ROC curve: false and true positive rates over all score thresholds.

  One point per distinct score, thresholds decreasing, starting at (0, 0) and
  ending at (1, 1). Tied scores move the curve diagonally, so the trapezoidal
  area under ``(fpr, tpr)`` equals :func:`auroc`.

  Args:
    scores: ``(N,)`` anomaly scores, higher = more anomalous.
    is_anomaly: ``(N,)`` bool (or 0/1) ground truth; both values must occur.

  Returns:
    ``(fpr, tpr)``, float64 arrays of equal length (distinct scores + 1).

  Example:
    >>> fpr, tpr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
  """
  scores, positive = _check_scores(scores, is_anomaly)
  order = np.argsort(-scores, kind="stable")
  scores, positive = scores[order], positive[order]
  # Last index of each run of equal scores: a threshold between runs.
  ends = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]
  true_pos = np.cumsum(positive)[ends]
  false_pos = (ends + 1) - true_pos
  fpr = np.r_[0.0, false_pos / false_pos[-1]]
  tpr = np.r_[0.0, true_pos / true_pos[-1]]
  return fpr, tpr


def classification_report(
  predictions: Any,
  labels: Any,
  train_counts: Any,
  *,
  many_threshold: int = MANY_THRESHOLD,
  few_threshold: int = FEW_THRESHOLD,
) -> dict[str, Any]:
  """Overall, Many/Medium/Few and per-class test accuracy, JSON-ready.

  Args:
    predictions: ``(N,)`` predicted classes or ``(N, C)`` logits.
    labels: ``(N,)`` true classes.
    train_counts: ``(C,)`` training images per class (defines the splits).
    many_threshold: Many: more training images than this.
    few_threshold: Few: fewer training images than this.

  Returns:
    ``{"overall", "many", "medium", "few", "per_class", "test_counts",
    "split_classes"}``: accuracies in [0, 1]; a split without classes, or a
    class without test images, is ``None``; ``split_classes`` lists each
    split's class indices.

  Example:
    >>> r = classification_report([0, 0, 1, 1, 2, 0], [0, 0, 1, 2, 2, 2],
    ...                           [200, 50, 5])
    >>> r["overall"], r["many"], r["medium"], r["few"]
    (0.666..., 1.0, 1.0, 0.333...)
  """
  counts = np.asarray(train_counts)
  thresholds = {"many_threshold": many_threshold, "few_threshold": few_threshold}
  per_class = per_class_accuracy(predictions, labels, len(counts))
  masks = class_splits(counts, **thresholds)
  return {
    "overall": accuracy(predictions, labels),
    **split_accuracy(per_class, counts, **thresholds),
    "per_class": [None if np.isnan(a) else float(a) for a in per_class],
    "test_counts": np.bincount(np.asarray(labels), minlength=len(counts)).tolist(),
    "split_classes": {k: np.flatnonzero(m).tolist() for k, m in masks.items()},
  }
