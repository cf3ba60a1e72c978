"""Options and presets of the long-tailed application, each defined once.

The defaults are the ``digits-lt`` setting (the README's main command, about a
minute on 2 CPU cores). The CIFAR presets are the recipes the published tables
were made with:

* ``cifar10-lt``, ``cifar100-lt`` (imbalance 100) and their ``-ir50`` / ``-ir10``
  variants: the recipe of the wider long-tailed literature (LDAM-DRW, Cao et al.
  2019, and the SAM-for-long-tail papers after it): ResNet-32, batch 128, lr 0.1,
  weight decay 2e-4, 5 warm-up epochs, 200 epochs; here with a cosine schedule
  (LDAM-DRW steps down at epochs 160 and 180). Compare with tables that name
  "ResNet-32" (e.g. SSE-SAM's re-implementation: CE 44.6, ImbSAM 47.9 overall on
  CIFAR-100-LT at imbalance 100).
* ``cifar100-lt-reference``: the ImbSAM authors' recipe (their repository's
  CIFAR-100-LT table: SGD 47.6, SAM 48.9, ImbSAM 51.1 overall): their ResNet-34
  variant with a 3x3 stride-1 stem and no max-pool (``resnet34_cifar``, 21.3M
  parameters; what they call "ResNet-32"), batch 64, lr 0.01, momentum 0.9,
  weight decay 1e-3, cosine, 200 epochs, eta 20, rho 0.05, and the tail loss at
  ``w + e`` weighted 2 (a change made after publication). Their test accuracy
  averages each image with its horizontal flip; ours is single-view.

The large-scale presets stream their images (:mod:`shared.pipeline`; RandomResizedCrop
224 and flip, single-crop test), train from scratch with bfloat16 activations and
evaluate on the split lists' test set with Many > 100, Few < 20 training images:

* ``imagenet-lt``: ImageNet-LT, the split of Liu et al., "Large-Scale Long-Tailed
  Recognition in an Open World" (OLTR), CVPR 2019 (1000 classes, 1280 to 5 images
  each, 50 test images per class). Recipe of the decoupling paper (Kang et al.,
  "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020)
  that later long-tailed work reuses: ResNeXt-50 32x4d, 90 epochs, SGD momentum 0.9,
  cosine schedule, weight decay 5e-4, here at batch 256 with lr 0.1; ImbSAM's eta 20
  (its tail is the Few split).
* ``inat2018``: iNaturalist 2018 (Van Horn et al., CVPR 2018; TFDS
  ``i_naturalist2018``, 8142 classes, tested on its validation set as is usual), with
  that literature's ResNet-50 recipe: batch 512, lr 0.2, weight decay 1e-4, 90 epochs.
* ``places-lt``: Places-LT (Liu et al. 2019's split of Places-365). The published
  recipe fine-tunes an ImageNet-pretrained ResNet-152, which this project does not
  ship; this preset trains a ResNet-50 *from scratch* with the ImageNet-LT recipe,
  so its numbers are not comparable with those tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from shared import data, models, pipeline, runner, training
from shared.options import FRACTION, NON_NEGATIVE, POSITIVE, UNIT, Preset, option

LOSSES = ("ce", "logit-adjust", "balanced-softmax", "ldam")
#: The methods compared: base, sam, imbsam and ImbSAM's successors, each an
#: :func:`imbsam_jax.imbsam` (Focal-SAM: focal tail weights; SSE-SAM: a head
#: perturbation for the first ``--head-share`` of the epochs).
METHODS = (*runner.METHODS, "focal-sam", "sse-sam")
#: The methods that split the classes at ``eta``.
ETA_METHODS = ("imbsam", "sse-sam")
SCHEDULES = ("cosine", "step", "drw-step")
AUGMENTATIONS = ("auto", "crop-flip", "none")
CLASSIFIERS = tuple(n for n in models.MODEL_NAMES if n != "deep_sad")


def tail_capacity(text: str) -> int | str:
  """``--tail-capacity``: a positive int or ``auto``."""
  if text == "auto":
    return text
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"expected an int or auto, got {text!r}") from None


def dataset_spec(text: str) -> str:
  """``--dataset``: a spec of :mod:`shared.data` (in memory) or :mod:`shared.pipeline`
  (streamed)."""
  if pipeline.is_spec(text):
    return text
  try:
    data.check_spec(text)
  except ValueError as e:
    if not str(e).startswith("unknown dataset"):
      raise
    streamed = ", ".join(pipeline.valid_specs())
    raise ValueError(f"{e}; streamed: {streamed}") from None
  return text


def coordinator_address(text: str) -> str:
  """``--coordinator``: ``auto`` or ``HOST:PORT``."""
  host, _, port = text.rpartition(":")
  if text != "auto" and not (host and port.isdigit()):
    raise ValueError(f"expected HOST:PORT or auto, got {text!r}")
  return text


@dataclasses.dataclass(frozen=True)
class Config:
  """A long-tailed experiment: every method x seed x (rho, eta) setting."""

  preset: str | None = option(
    None,
    "named preset (below); --dataset implies the preset of the same name",
    fingerprint=False,
  )
  dataset: str = option(
    "digits-lt",
    "data in memory: digits-lt (embedded, offline), cifar10-lt, cifar100-lt (TFDS),"
    " cifar10, cifar100, mnist, fashion_mnist, digits, folder:PATH, npz:FILE;"
    " streamed: imagenet-lt:ROOT, places-lt:ROOT (split lists and images in ROOT),"
    " list:ROOT,TRAIN_TXT,TEST_TXT, i_naturalist2018 (TFDS), imagenet2012-lt:DIR"
    " (ImageNet-LT lists in DIR over TFDS imagenet2012)",
    parse=dataset_spec,
  )
  data_dir: str | None = option(None, "TFDS data directory")
  imbalance_ratio: float | None = option(
    None,
    "n_max/n_min of the training set's exponential profile (none: 100 for -lt"
    " specs, else 1 = as is; streamed data: as their lists are)",
    check=(lambda v: v >= 1, "must be >= 1"),
  )
  method: tuple[str, ...] = option(
    runner.METHODS,
    "methods to compare; base = the SGD optimizer without perturbation",
    flags=("--optimizer",),
    choices=METHODS,
    parse=lambda m: runner.method_name(m, aliases=("sgd",)),
    fingerprint=False,
  )
  seed: tuple[int, ...] = option(
    (0,),
    "seeds (initialisation, data order, augmentation)",
    flags=("--seeds",),
    unique=True,
    fingerprint=False,
  )
  model: str = option("small_cnn", "network", choices=CLASSIFIERS)
  norm: str | None = option(
    None, "normalisation layers (none: the model's own)", choices=models.NORMS
  )
  dtype: str = option(
    "float32",
    "activations' dtype; parameters, optimizer state, losses and metrics stay float32",
    choices=tuple(models.DTYPES),
  )
  epochs: int = option(30, "training epochs", check=POSITIVE)
  batch_size: int = option(
    32, "global batch size, divisible by the device count", check=POSITIVE
  )
  eval_batch_size: int = option(
    500, "global test batch size", check=POSITIVE, fingerprint=False
  )
  lr: float = option(0.05, "peak learning rate", check=POSITIVE)
  momentum: float = option(0.9, "SGD momentum", check=FRACTION)
  weight_decay: float = option(5e-4, "coupled weight decay", check=NON_NEGATIVE)
  schedule: str = option(
    "cosine",
    "learning rate: cosine to 0, step (x0.1 at 80% and 90%) or drw-step (x0.01 at"
    " 80%, x1e-4 at 90%: LDAM-DRW's epochs 160 and 180 of 200)",
    choices=SCHEDULES,
  )
  warmup_epochs: int = option(0, "linear warm-up epochs", check=NON_NEGATIVE)
  rho: tuple[float, ...] = option(
    (0.05,),
    "SAM / ImbSAM perturbation radius",
    check=NON_NEGATIVE,
    sweep=True,
    fingerprint=False,
  )
  eta: tuple[float, ...] = option(
    (20.0,),
    "ImbSAM tail: classes with fewer training images than eta",
    check=POSITIVE,
    sweep=True,
    fingerprint=False,
  )
  tail_loss_scale: float = option(
    1.0,
    "weight of ImbSAM's perturbed tail loss (authors' code: 2)",
    check=NON_NEGATIVE,
  )
  focal_gamma: float = option(
    3.2,
    "Focal-SAM: gamma of its weights lam (1 - pi_y)^gamma of the perturbed loss"
    " (pi: the class prior)",
    check=NON_NEGATIVE,
  )
  focal_lam: float = option(
    0.8, "Focal-SAM: lam, the perturbed share of each loss", check=UNIT
  )
  head_rho: float = option(
    0.05,
    "SSE-SAM: the head classes' perturbation radius (--rho is the tail's)",
    check=NON_NEGATIVE,
  )
  head_share: float = option(
    0.7,
    "SSE-SAM: share of the epochs with the head perturbation (then ImbSAM)",
    check=UNIT,
  )
  tail_capacity: int | str | None = option(
    "auto",
    "ImbSAM's fast path: tail examples per pass, an int or auto (from the class"
    " counts); none: the exact full-batch path. Auto takes the fast path where it"
    " is exact (no BatchNorm) or with --tail-bn anchored",
    parse=tail_capacity,
    check=(lambda v: v == "auto" or v > 0, "must be a positive int or auto"),
  )
  tail_bn: str = option(
    "exact",
    "BatchNorm in ImbSAM's tail passes: exact (full-batch passes, as the"
    " reference) or anchored (tail statistics anchored to the clean pass: the"
    " fast path, an approximation)",
    choices=("exact", "anchored"),
  )
  loss: str = option(
    "ce",
    "training loss; balanced-softmax = logit-adjust with tau 1; ldam: LDAM's margins"
    " n_c^(-1/4) on a cosine classifier",
    choices=LOSSES,
  )
  tau: float = option(1.0, "logit-adjust strength", check=NON_NEGATIVE)
  ldam_max_margin: float = option(
    0.5, "LDAM: the largest class margin (the rarest class's)", check=POSITIVE
  )
  ldam_scale: float = option(30.0, "LDAM: the cosines' scale s", check=POSITIVE)
  drw_epoch: int | None = option(
    None,
    "deferred re-weighting (DRW) from this epoch: the loss weighted by class,"
    " (1 - beta) / (1 - beta^n_y) normalised to mean 1 over the classes, a weighted"
    " mean over each batch (as PyTorch's); none: no re-weighting",
    check=NON_NEGATIVE,
  )
  drw_beta: float = option(0.9999, "DRW: beta of the effective number", check=FRACTION)
  augment: str = option(
    "auto",
    "augmentation; auto: crop-flip for 32x32 images, RandomResizedCrop and flip"
    " for streamed data",
    choices=AUGMENTATIONS,
  )
  image_size: int = option(
    224, "streamed data: training crop and test centre crop size", check=POSITIVE
  )
  workers: int = option(
    0,
    "streamed data: grain processes decoding images (0: in this process)",
    check=NON_NEGATIVE,
    fingerprint=False,
  )
  threads: int = option(
    0,
    "streamed data: reading threads per grain process",
    check=NON_NEGATIVE,
    fingerprint=False,
  )
  skip_unreadable: bool = option(
    False,
    "streamed data: skip images that do not decode (logged; a training example"
    " takes the next record, a test image leaves the metrics) and count them in"
    " results.json; default: fail naming the file",
    fingerprint=False,
  )
  many_threshold: int = option(
    50, "Many split: more training images than this", check=NON_NEGATIVE
  )
  few_threshold: int = option(
    20, "Few split: fewer training images than this", check=NON_NEGATIVE
  )
  devices: int | None = option(
    None, "use the first N devices (none: all)", check=POSITIVE, fingerprint=False
  )
  out: str = option("runs/long_tailed", "output directory", fingerprint=False)
  resume: bool = option(
    False, "continue each run from its newest checkpoint", fingerprint=False
  )
  checkpoint_every: int = option(
    1,
    "epochs between checkpoints (the last is always kept); 0: none but those of"
    " --checkpoint-every-steps",
    check=NON_NEGATIVE,
    fingerprint=False,
  )
  checkpoint_every_steps: int = option(
    0,
    "also checkpoint every N training steps, mid-epoch too (exact resume); 0: no",
    check=NON_NEGATIVE,
    fingerprint=False,
  )
  log_every_steps: int = option(
    0,
    "also log the metrics of every N training steps (mean loss, accuracy, ImbSAM's"
    " tail_fraction and tail_grad_norm, lr, rho, images/s) to"
    " metrics/<run>.steps.csv and TensorBoard (tensorboard/<run>/); 0: per epoch"
    " only",
    check=NON_NEGATIVE,
    fingerprint=False,
  )
  keep_checkpoints: int = option(
    2, "checkpoints kept per run (the newest)", check=POSITIVE, fingerprint=False
  )
  progress: bool = option(True, "show a progress bar", fingerprint=False)
  coordinator: str | None = option(
    None,
    "several processes (hosts): HOST:PORT of process 0, with --num-processes and"
    " --process-id; or auto: jax.distributed.initialize() detects the cluster"
    " (TPU pod slice, SLURM, Open MPI); none: one process",
    parse=coordinator_address,
    fingerprint=False,
  )
  num_processes: int | None = option(
    None, "with --coordinator: how many processes", check=POSITIVE, fingerprint=False
  )
  process_id: int | None = option(
    None,
    "with --coordinator: this process's index, 0 .. N - 1",
    check=NON_NEGATIVE,
    fingerprint=False,
  )

  @property
  def streamed(self) -> bool:
    """Whether ``--dataset`` is streamed (:mod:`shared.pipeline`)."""
    return pipeline.is_spec(self.dataset)

  def validate(self) -> None:
    """Rules across options (raises ``ValueError("--flag: ...")``); the devices
    only in one process (a distributed run checks them once initialized)."""
    self.tail_path()
    if self.drw_epoch is not None and self.drw_epoch >= self.epochs:
      raise ValueError(
        f"--drw-epoch: {self.drw_epoch} is not below --epochs {self.epochs}"
      )
    if self.few_threshold > self.many_threshold:
      raise ValueError(
        f"--few-threshold: {self.few_threshold} exceeds --many-threshold"
        f" {self.many_threshold}"
      )
    if self.streamed and self.imbalance_ratio is not None:
      raise ValueError("--imbalance-ratio: streamed data are used as their lists are")
    if self.streamed and self.augment != "auto":
      raise ValueError(
        "--augment: streamed data get RandomResizedCrop and flip; leave it auto"
      )
    self._check_processes()
    if self.coordinator is None:
      self.check_devices()

  def _check_processes(self) -> None:
    given = (self.num_processes, self.process_id)
    if self.coordinator is None and given != (None, None):
      raise ValueError("--num-processes/--process-id: only with --coordinator")
    if self.coordinator not in (None, "auto") and None in given:
      raise ValueError(
        "--coordinator: HOST:PORT needs --num-processes and --process-id"
      )
    if None not in given and self.process_id >= self.num_processes:
      raise ValueError(
        f"--process-id: {self.process_id} is not below --num-processes"
        f" {self.num_processes}"
      )
    if self.coordinator is not None and self.devices is not None:
      raise ValueError("--devices: only in one process (several use every device)")

  def check_devices(self) -> None:
    """``--devices`` and ``--batch-size`` against the devices there are."""
    num_devices = self.devices or jax.device_count()
    if self.devices is not None and self.devices > jax.device_count():
      raise ValueError(f"--devices: there are only {jax.device_count()} devices")
    if self.batch_size % num_devices:
      raise ValueError(
        f"--batch-size: {self.batch_size} is not divisible by the {num_devices}"
        " devices (use a multiple, or --devices)"
      )

  def tail_path(self) -> str:
    """ImbSAM's path for this model (:func:`shared.training.tail_path`)."""
    shape = nnx.eval_shape(
      lambda: models.create_model(
        self.model,
        num_classes=2,
        input_shape=(8, 8, 3),
        norm=self.norm,
        rngs=nnx.Rngs(0),
      )
    )  # no device is touched: jax.distributed may still be initialized
    return training.tail_path(shape, self.tail_capacity, self.tail_bn)

  @property
  def activation_dtype(self) -> Any:
    """``jnp.bfloat16`` for ``--dtype bfloat16``; ``None`` (float32) otherwise."""
    return models.DTYPES[self.dtype]

  @property
  def effective_tau(self) -> float:
    """The logit-adjustment strength of the loss (0 for plain cross-entropy)."""
    return {"logit-adjust": self.tau, "balanced-softmax": 1.0}.get(self.loss, 0.0)


def _ldam(dataset: str, imbalance: float) -> Preset:
  return Preset(
    f"{dataset.upper()}, imbalance {imbalance:g}, LDAM-DRW recipe (ResNet-32)",
    dataset=dataset,
    imbalance_ratio=imbalance,
    model="resnet32",
    epochs=200,
    batch_size=128,
    lr=0.1,
    weight_decay=2e-4,
    warmup_epochs=5,
    many_threshold=100,
  )


def _cifar100_lt(description: str, model: str, **values: Any) -> Preset:
  """A published CIFAR-100-LT recipe: imbalance 100, 200 epochs, Many > 100."""
  recipe = dict(dataset="cifar100-lt", imbalance_ratio=100.0, epochs=200)
  return Preset(
    f"CIFAR-100-LT, imbalance 100, {description}",
    model=model,
    many_threshold=100,
    **{**recipe, **values},
  )


def _large_scale(description: str, dataset: str, model: str, **values: Any) -> Preset:
  """A streamed benchmark: from scratch, bfloat16, 90 epochs, eta 20, Many > 100."""
  recipe = dict(epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4, eta=(20.0,))
  recipe.update(many_threshold=100, few_threshold=20, dtype="bfloat16", workers=8)
  return Preset(description, dataset=dataset, model=model, **{**recipe, **values})


PRESETS: dict[str, Preset] = {
  "digits-lt": Preset(
    "scikit-learn digits at imbalance 100, small CNN, 30 epochs (offline, ~1 min)",
    dataset="digits-lt",
  ),
  **{
    f"{name}-lt{'' if ratio == 100 else f'-ir{ratio}'}": _ldam(f"{name}-lt", ratio)
    for name in ("cifar10", "cifar100")
    for ratio in (100, 50, 10)
  },
  "cifar100-lt-reference": _cifar100_lt(
    "the ImbSAM authors' recipe (ResNet-34 variant)",
    "resnet34_cifar",
    batch_size=64,
    lr=0.01,
    weight_decay=1e-3,
    rho=(0.05,),
    eta=(20.0,),
    tail_loss_scale=2.0,
  ),
  "cifar100-lt-focal-sam": _cifar100_lt(
    "Focal-SAM's recipe (scongl/Focal-SAM cifar.sh:"
    " logit adjustment, rho 0.3, gamma 3.2, lam 0.8, ResNet-32)",
    "resnet32",
    method=("base", "sam", "imbsam", "focal-sam"),
    batch_size=64,
    lr=0.1,
    weight_decay=1e-3,
    loss="logit-adjust",
    rho=(0.3,),
    focal_gamma=3.2,
    focal_lam=0.8,
  ),
  "cifar100-lt-sse-sam": _cifar100_lt(
    "SSE-SAM's recipe (Zemdalk/SSE-SAM README: CE,"
    " eta 100, head rho 0.05, tail rho 0.1, head share 0.7, ResNet-34 variant)",
    "resnet34_cifar",
    method=("base", "sam", "imbsam", "sse-sam"),
    batch_size=64,
    lr=0.01,
    weight_decay=1e-3,
    rho=(0.1,),
    eta=(100.0,),
    head_rho=0.05,
    head_share=0.7,
  ),
  "cifar100-lt-ldam-drw-sam": _cifar100_lt(
    "SAM with large rho around LDAM + DRW (Rangwani"
    " et al. 2022, val-iisc/Saddle-LongTail: rho 0.8; the LDAM-DRW recipe, ResNet-32)",
    "resnet32",
    method=("base", "sam"),
    batch_size=128,
    lr=0.1,
    weight_decay=2e-4,
    warmup_epochs=5,
    schedule="drw-step",
    loss="ldam",
    drw_epoch=160,
    rho=(0.8,),
  ),
  "imagenet-lt": _large_scale(
    "ImageNet-LT (Liu et al. 2019 split), ResNeXt-50 32x4d, Kang et al. 2020"
    " recipe at batch 256; images in data/ImageNet_LT unless --dataset"
    " imagenet-lt:ROOT",
    "imagenet-lt:data/ImageNet_LT",
    "resnext50_32x4d",
  ),
  "inat2018": _large_scale(
    "iNaturalist 2018 (TFDS i_naturalist2018, --data-dir), ResNet-50, batch 512,"
    " lr 0.2, wd 1e-4 (the long-tailed literature's recipe)",
    "i_naturalist2018",
    "resnet50",
    batch_size=512,
    lr=0.2,
    weight_decay=1e-4,
  ),
  "places-lt": _large_scale(
    "Places-LT (Liu et al. 2019 split), ResNet-50 from scratch with the"
    " ImageNet-LT recipe (published: ImageNet-pretrained ResNet-152, not"
    " comparable); images in data/Places_LT unless --dataset places-lt:ROOT",
    "places-lt:data/Places_LT",
    "resnet50",
  ),
}


#: Streamed dataset kinds -> the preset they imply.
_STREAMED_PRESETS = {
  "imagenet-lt": "imagenet-lt",
  "imagenet2012-lt": "imagenet-lt",
  "places-lt": "places-lt",
  "i_naturalist2018": "inat2018",
}


def implied_preset(given: dict) -> str | None:
  """The preset named like ``--dataset`` (digits-lt when none is given), or that of
  a streamed benchmark's spec (``imagenet-lt:ROOT`` -> ``imagenet-lt``)."""
  dataset = given.get("dataset", "digits-lt")
  if dataset in PRESETS:
    return dataset
  return _STREAMED_PRESETS.get(dataset.partition(":")[0])
