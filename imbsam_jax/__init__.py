"""ImbSAM in JAX: class-imbalanced sharpness-aware minimization for Optax."""

from imbsam_jax._imbsam import ImbSAMState, imbsam, value_and_tail_grads
from imbsam_jax._priors import (
  LABELED_ANOMALY,
  TailMaskFn,
  bucket_capacity,
  capacity_from_tail_fraction,
  focal_tail_mask_from_counts,
  focal_tail_weights,
  labeled_anomaly_mask,
  long_tail_counts,
  soft_tail_mask_from_counts,
  soft_tail_weights,
  suggest_tail_capacity,
  tail_classes,
  tail_mask_from_counts,
)

__version__ = "0.1.0"

__all__ = [
  "LABELED_ANOMALY",
  "ImbSAMState",
  "TailMaskFn",
  "bucket_capacity",
  "capacity_from_tail_fraction",
  "focal_tail_mask_from_counts",
  "focal_tail_weights",
  "imbsam",
  "labeled_anomaly_mask",
  "long_tail_counts",
  "soft_tail_mask_from_counts",
  "soft_tail_weights",
  "suggest_tail_capacity",
  "tail_classes",
  "tail_mask_from_counts",
  "value_and_tail_grads",
]
