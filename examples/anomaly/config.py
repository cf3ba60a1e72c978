"""Options of the anomaly-detection application (Deep SAD), each defined once.

The data default to the embedded digits (offline, 10 normal classes x 3 seeds in
about a minute on 2 CPU cores). The recipe (Adam at lr 1e-3, a tenth of it for the
last 30% of the epochs, rho 0.05, the gradient clipped at norm 10) was chosen on
MNIST (README, "Anomaly detection"): at lr 1e-2 every method's AUROC swings
between epochs, and a single ImbSAM or SAM step whose perturbation lands a labeled
anomaly near the centre (Deep SAD's loss ``eta / d`` has a pole there) becomes a
jump of the whole encoder; the clip bounds what one such step does to Adam's
moments. Deep SAD's own protocol (Ruff et al., 2020) trains
longer and slower: ``--lr 1e-4 --epochs 150 --lr-decay 0.33 --batch-size 128
--pretrain-epochs 150 --clip-norm none``.
"""

from __future__ import annotations

import dataclasses

from shared import data, models, runner
from shared.options import FRACTION, NON_NEGATIVE, POSITIVE, option


def dataset_spec(text: str) -> str:
  data.check_spec(text)
  return text


def class_list(text: str) -> str:
  """``--known-anomaly-classes``: random, all, or comma-separated classes."""
  if text not in ("random", "all"):
    try:
      [int(c) for c in text.split(",")]
    except ValueError:
      raise ValueError(f"expected random, all or class indices, got {text!r}") from None
  return text


@dataclasses.dataclass(frozen=True)
class Config:
  """A Deep SAD experiment: normal classes x settings x seeds x methods."""

  dataset: str = option(
    "digits",
    "data: digits (embedded, offline), mnist, fashion_mnist, cifar10"
    " (TFDS), folder:PATH, npz:FILE",
    parse=dataset_spec,
  )
  data_dir: str | None = option(None, "TFDS data directory")
  normal_class: tuple[int, ...] | None = option(
    None,
    "normal classes, one experiment each (all: every class)",
    check=NON_NEGATIVE,
    sweep=True,
    none_word="all",
  )
  known_anomaly_classes: str = option(
    "random",
    "classes of the labeled anomalies: random (one per normal class and seed,"
    " Deep SAD's k_l = 1), all, or a comma-separated list",
    parse=class_list,
  )
  labeled_anomaly_ratio: tuple[float, ...] = option(
    (0.05,),
    "gamma_l: labeled anomalies among all training examples",
    check=FRACTION,
    sweep=True,
  )
  pollution: tuple[float, ...] = option(
    (0.1,),
    "gamma_p: anomalies among the unlabeled training examples",
    check=FRACTION,
    sweep=True,
  )
  labeled_normal_ratio: float = option(
    0.0, "gamma_n: labeled normals among all training examples", check=FRACTION
  )
  seed: tuple[int, ...] = option(
    (0, 1, 2),
    "seeds (data draw, initialisation, batch order)",
    flags=("--seeds",),
    unique=True,
  )
  method: tuple[str, ...] = option(
    runner.METHODS,
    "methods; base = the base optimizer without perturbation (sgd, adam accepted)",
    flags=("--optimizer",),
    choices=runner.METHODS,
    parse=runner.method_name,
  )
  base_optimizer: str = option("adam", "the base optimizer", choices=("adam", "sgd"))
  rho: tuple[float, ...] = option(
    (0.05,), "SAM / ImbSAM perturbation radius", check=NON_NEGATIVE, sweep=True
  )
  lr: float = option(1e-3, "learning rate", check=POSITIVE)
  lr_decay: tuple[float, ...] | None = option(
    (0.7,),
    "shares of the epochs after which the learning rate is multiplied by 0.1"
    " (Deep SAD's milestones; 0.7 of 10 epochs: after epoch 7; none: constant)",
    check=FRACTION,
  )
  clip_norm: float | None = option(
    10.0,
    "clip the gradient the base optimizer gets to this global norm, for every"
    " method (SAM's and ImbSAM's: the one with the perturbed part), so that one"
    " perturbed gradient near the loss's pole cannot throw the encoder; none: no"
    " clipping",
    check=POSITIVE,
  )
  weight_decay: float = option(0.5e-6, "coupled L2", check=NON_NEGATIVE)
  momentum: float = option(0.9, "SGD momentum", check=FRACTION)
  loss_eps: float = option(
    1e-6,
    "epsilon of the labeled examples' loss eta (d + eps)^(+-1) (Deep SAD's 1e-6)",
    check=POSITIVE,
  )
  eta_sad: float = option(
    1.0, "Deep SAD's weight eta of the labeled examples' loss", check=POSITIVE
  )
  epochs: int = option(50, "training epochs", check=POSITIVE)
  batch_size: int = option(32, "batch size", check=POSITIVE)
  pretrain_epochs: int = option(
    0, "autoencoder pretraining epochs (0: none)", check=NON_NEGATIVE
  )
  rep_dim: int = option(32, "encoder output dimension", check=POSITIVE)
  features: tuple[int, ...] | None = option(
    None,
    "encoder conv channels (none: 8,4 for grey images, 32,64,128 for colour)",
    check=POSITIVE,
  )
  norm: str = option("batch", "encoder normalisation", choices=models.NORMS)
  eval_batch_size: int = option(512, "batch size of the score passes", check=POSITIVE)
  eval_every: int = option(
    0,
    "also score every N epochs (test AUROC, the median distance to the centre of"
    " the training normals, pollution and labeled anomalies, the labeled"
    " anomalies' smallest) into metrics/<run>.csv; for diagnosis, not for"
    " choosing an epoch; 0: at the end only",
    check=NON_NEGATIVE,
  )
  log_every_steps: int = option(
    0,
    "also log the means of every N training steps (loss, head_loss, tail_loss,"
    " ImbSAM's tail_fraction, tail_grad_norm and perturbed_tail_grad_norm) to"
    " metrics/<run>.steps.csv and TensorBoard (tensorboard/<run>/); 0: per epoch"
    " only",
    check=NON_NEGATIVE,
  )
  out: str = option("runs/anomaly", "output directory")
  progress: bool = option(True, "show a progress bar")

  def validate(self) -> None:
    """Rules across options (raises ``ValueError("--flag: ...")``)."""
    for ratio in self.labeled_anomaly_ratio:
      if ratio + self.labeled_normal_ratio >= 1:
        raise ValueError(
          f"--labeled-anomaly-ratio: {ratio} + --labeled-normal-ratio"
          f" {self.labeled_normal_ratio} must stay below 1"
        )
