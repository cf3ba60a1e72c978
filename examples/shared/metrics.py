"""Evaluation metrics of the long-tailed applications, as small NumPy functions.

Per-class accuracy from counts and its Many / Medium / Few breakdown (by *training*
class counts). Anomaly detection's AUROC and ROC curves are scikit-learn's
(``sklearn.metrics.roc_auc_score``, ``roc_curve``), as in Deep SAD's code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Split thresholds on training-set class counts (the ImbSAM / OLTR convention):
#: Many > 100, Medium 20..100, Few < 20.
MANY_THRESHOLD = 100
FEW_THRESHOLD = 20


def class_splits(
  train_counts: Any,
  *,
  many_threshold: int = MANY_THRESHOLD,
  few_threshold: int = FEW_THRESHOLD,
) -> dict[str, np.ndarray]:
  """Class masks: Many ``n_c > many``, Medium ``few <= n_c <= many``, Few ``n_c < few``.

  >>> [mask.tolist() for mask in class_splits([500, 100, 19]).values()]
  [[True, False, False], [False, True, False], [False, False, True]]
  """
  counts = np.asarray(train_counts)
  if counts.ndim != 1:
    raise ValueError(f"train_counts must be 1-D, got shape {counts.shape}.")
  if few_threshold > many_threshold:
    raise ValueError(f"{few_threshold=} exceeds {many_threshold=}.")
  many, few = counts > many_threshold, counts < few_threshold
  return {"many": many, "medium": ~many & ~few, "few": few}


def split_accuracy(
  per_class_acc: Any,
  train_counts: Any,
  *,
  many_threshold: int = MANY_THRESHOLD,
  few_threshold: int = FEW_THRESHOLD,
) -> dict[str, float | None]:
  """Unweighted mean per-class accuracy of each :func:`class_splits` split.

  Classes without test examples (NaN) are left out; a split with no class left is
  ``None`` (the reference code reported 0).

  >>> split_accuracy([0.9, 0.7, 0.5, 0.1], [500, 100, 20, 5])
  {'many': 0.9, 'medium': 0.6, 'few': 0.1}
  """
  acc, counts = np.asarray(per_class_acc, np.float64), np.asarray(train_counts)
  if acc.shape != counts.shape:
    raise ValueError(
      f"per_class_acc {acc.shape} and train_counts {counts.shape} differ."
    )
  thresholds = dict(many_threshold=many_threshold, few_threshold=few_threshold)
  result = {}
  for split, mask in class_splits(counts, **thresholds).items():
    values = acc[mask & ~np.isnan(acc)]
    result[split] = float(values.mean()) if values.size else None
  return result


def classification_report(
  correct: Any,
  total: Any,
  train_counts: Any,
  *,
  many_threshold: int = MANY_THRESHOLD,
  few_threshold: int = FEW_THRESHOLD,
) -> dict[str, Any]:
  """Overall, Many/Medium/Few and per-class test accuracy from per-class counts.

  ``correct[c]`` of the ``total[c]`` test images of class ``c`` are classified
  right (counts add up over batches, devices and processes). A class's accuracy is
  its recall,

  .. math::
    a_c = |\\{i : y_i = c,\\ \\hat y_i = c\\}| \\ / \\ |\\{i : y_i = c\\}|

  Keys: ``overall``, ``many``, ``medium``, ``few`` (:func:`split_accuracy`),
  ``per_class`` (``None`` for a class without test images), ``test_counts`` and
  ``split_classes`` (class indices), JSON-ready.

  >>> r = classification_report([2, 1, 1], [2, 1, 3], [200, 50, 5])
  >>> r["overall"], r["many"], r["medium"], r["few"], r["test_counts"]
  (0.666..., 1.0, 1.0, 0.333..., [2, 1, 3])
  """
  correct, total, counts = (np.asarray(a) for a in (correct, total, train_counts))
  if not correct.shape == total.shape == counts.shape or counts.ndim != 1:
    raise ValueError(
      f"correct {correct.shape}, total {total.shape} and train_counts"
      f" {counts.shape} must be per-class vectors of one length."
    )
  if np.any(correct > total):
    raise ValueError("correct exceeds total for some class.")
  thresholds = dict(many_threshold=many_threshold, few_threshold=few_threshold)
  per_class = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
  masks = class_splits(counts, **thresholds)
  return {
    "overall": float(correct.sum() / total.sum()) if total.sum() else float("nan"),
    **split_accuracy(per_class, counts, **thresholds),
    "per_class": [None if np.isnan(a) else float(a) for a in per_class],
    "test_counts": total.tolist(),
    "split_classes": {k: np.flatnonzero(m).tolist() for k, m in masks.items()},
  }
