"""Flax NNX models for the example applications.

Images are NHWC ``float32``. Every model is a plain :class:`flax.nnx.Module` whose
``__call__(x)`` follows NNX's train/eval switch: ``model.train()`` makes BatchNorm use
and update batch statistics, ``model.eval()`` makes it use the running averages.

Models:

- :class:`CifarResNet` / :class:`ResNet32`: the CIFAR ResNet of He et al. (2016) used
  throughout the long-tailed literature (LDAM-DRW, ImbSAM's "wider literature" recipe).
- :class:`SmallCNN`: three small conv layers for tiny inputs (8x8 digits, 28x28, 32x32).
- :class:`DeepSADEncoder`, :class:`DeepSADDecoder`, :class:`DeepSADAutoencoder`: the
  bias-free LeNet-style networks of Deep SAD (Ruff et al., 2020).
- :func:`create_model`: select a model by name (for command-line flags).

``norm`` option (classifiers): ``"batch"`` (:class:`flax.nnx.BatchNorm`), ``"group"``
(:class:`flax.nnx.GroupNorm`) or ``"none"``. BatchNorm in train mode makes each
example's loss depend on the whole batch and its running statistics are state that a
train step must carry; the ``"group"`` and ``"none"`` variants have no
:class:`flax.nnx.BatchStat` variables, so a per-example loss is a function of that
example and the parameters only (what ImbSAM's fast path and benchmarks want).

Typical use inside a jitted, differentiated loss (``copy=True`` is required when
merging inside ``jax.grad`` under ``jax.jit``)::

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):  # per-example losses, (B,)
    m = nnx.merge(graphdef, params, rest, copy=True)
    logits = m(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  Cao et al. Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss
  (LDAM-DRW). NeurIPS 2019.
  De, Smith. Batch Normalization Biases Residual Blocks Towards the Identity Function
  in Deep Networks (SkipInit). NeurIPS 2020.
  Ruff et al. Deep Semi-Supervised Anomaly Detection (Deep SAD). ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
  "MODEL_NAMES",
  "CifarResNet",
  "DeepSADAutoencoder",
  "DeepSADDecoder",
  "DeepSADEncoder",
  "ResNet32",
  "SmallCNN",
  "create_model",
  "num_params",
]

Norm = Literal["batch", "group", "none"]
NORMS = ("batch", "group", "none")

# PyTorch's defaults (the reference implementations are PyTorch): BatchNorm2d momentum
# 0.1 (Flax counts the other way: 0.9) and epsilon 1e-5; Kaiming-normal weights
# (``nn.init.kaiming_normal_``: fan-in, gain sqrt(2), untruncated).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_GROUPS = 8
_kaiming_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _num_groups(channels: int) -> int:
  """The largest divisor of ``channels`` that is at most 8."""
  return max(d for d in range(1, _GROUPS + 1) if channels % d == 0)


def _make_norm(
  norm: str,
  channels: int,
  *,
  rngs: nnx.Rngs,
  affine: bool = True,
  epsilon: float = _BN_EPSILON,
) -> nnx.Module | None:
  """A normalisation layer over the channel axis, or ``None`` for ``"none"``."""
  _check_norm(norm)
  if norm == "batch":
    return nnx.BatchNorm(
      channels,
      momentum=_BN_MOMENTUM,
      epsilon=epsilon,
      use_bias=affine,
      use_scale=affine,
      rngs=rngs,
    )
  if norm == "group":
    return nnx.GroupNorm(
      channels,
      num_groups=_num_groups(channels),
      epsilon=epsilon,
      use_bias=affine,
      use_scale=affine,
      rngs=rngs,
    )
  return None


def _apply(layer: nnx.Module | None, x: jax.Array) -> jax.Array:
  return x if layer is None else layer(x)


def num_params(model: nnx.Module) -> int:
  """Number of scalar parameters (:class:`flax.nnx.Param` entries) in ``model``.

  Args:
    model: any NNX module.

  Returns:
    The total size of its ``nnx.Param`` leaves (BatchNorm statistics not counted).

  >>> num_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  8
  """
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------
# CIFAR ResNet.


class _BasicBlock(nnx.Module):
  """Two 3x3 convolutions with an option-A (parameter-free) shortcut.

  ``out = relu(g * norm(conv(relu(norm(conv(x))))) + shortcut(x))``, where the
  shortcut is the identity, or, when the shape changes, a stride-2 subsampling with the
  new channels zero-padded (He et al.'s option A, as in LDAM-DRW's ``LambdaLayer``).
  ``g`` is a learnable scalar initialised to 0 (SkipInit) when ``norm="none"``, so that
  a normalisation-free network starts near the identity instead of exploding; with a
  normalisation layer there is no ``g``.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    stride: int,
    *,
    norm: str,
    rngs: nnx.Rngs,
  ):
    use_bias = norm == "none"
    self.conv1 = nnx.Conv(
      in_channels,
      out_channels,
      (3, 3),
      strides=stride,
      padding=1,
      use_bias=use_bias,
      kernel_init=_kaiming_normal,
      rngs=rngs,
    )
    self.norm1 = _make_norm(norm, out_channels, rngs=rngs)
    self.conv2 = nnx.Conv(
      out_channels,
      out_channels,
      (3, 3),
      padding=1,
      use_bias=use_bias,
      kernel_init=_kaiming_normal,
      rngs=rngs,
    )
    self.norm2 = _make_norm(norm, out_channels, rngs=rngs)
    self.skip_gain = nnx.Param(jnp.zeros((), jnp.float32)) if use_bias else None
    self.stride = stride
    self.pad_channels = out_channels - in_channels

  def _shortcut(self, x: jax.Array) -> jax.Array:
    if self.stride != 1:
      x = x[:, :: self.stride, :: self.stride, :]
    if self.pad_channels:
      lo = self.pad_channels // 2
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.pad_channels - lo)))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(_apply(self.norm1, self.conv1(x)))
    y = _apply(self.norm2, self.conv2(y))
    if self.skip_gain is not None:
      y = self.skip_gain[...] * y
    return jax.nn.relu(y + self._shortcut(x))


class CifarResNet(nnx.Module):
  """CIFAR-style ResNet of depth ``6n + 2`` (He et al., 2016, Sec. 4.2).

  A 3x3 conv stem with ``width`` channels, three stages of ``n`` basic blocks with
  ``width``, ``2 * width`` and ``4 * width`` channels (stride 2 at the start of stages
  2 and 3), global average pooling and a linear classifier. Shortcuts are option A
  (identity; subsample + zero-pad channels when the shape changes), as in LDAM-DRW.
  Conv and linear weights are Kaiming-normal (fan-in). Convolutions have no bias
  unless ``norm="none"``; then each residual branch also has a zero-initialised
  scalar gain (SkipInit), which keeps the normalisation-free network trainable. (It
  still wants a gentler schedule than BatchNorm: on a quick check, SGD lr 0.1 with a
  short warmup diverged where lr 0.05 trained.) Works for any input size; 32x32 gives
  8x8 feature maps in the last stage.

  Args:
    num_classes: number of output logits.
    depth: total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
    in_channels: input channels (3 for colour images).
    norm: ``"batch"``, ``"group"`` (8 groups) or ``"none"``.
    width: channels of the stem and first stage (16 in the paper).
    rngs: random number generators for initialisation.

  Building it abstractly (``nnx.eval_shape``: shapes only, nothing computed) is a
  cheap way to inspect a configuration:

  >>> model = nnx.eval_shape(lambda: CifarResNet(100, depth=56, rngs=nnx.Rngs(0)))
  >>> len(model.blocks), num_params(model)
  (27, 858868)
  """

  def __init__(
    self,
    num_classes: int,
    *,
    depth: int = 32,
    in_channels: int = 3,
    norm: Norm = "batch",
    width: int = 16,
    rngs: nnx.Rngs,
  ):
    _check_norm(norm)
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    self.norm = norm
    self.depth = depth
    self.stem = nnx.Conv(
      in_channels,
      width,
      (3, 3),
      padding=1,
      use_bias=norm == "none",
      kernel_init=_kaiming_normal,
      rngs=rngs,
    )
    self.stem_norm = _make_norm(norm, width, rngs=rngs)
    blocks = []
    channels = width
    for stage in range(3):
      out_channels = width * 2**stage
      for i in range(blocks_per_stage):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(_BasicBlock(channels, out_channels, stride, norm=norm, rngs=rngs))
        channels = out_channels
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(
      channels, num_classes, kernel_init=_kaiming_normal, rngs=rngs
    )

  def features(self, x: jax.Array) -> jax.Array:
    """Globally average-pooled features before the classifier, ``(B, 4 * width)``."""
    x = jax.nn.relu(_apply(self.stem_norm, self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``x`` of shape ``(B, H, W, C)``."""
    return self.head(self.features(x))


class ResNet32(CifarResNet):
  """ResNet-32 for CIFAR-sized images: :class:`CifarResNet` with ``depth=32``.

  With 10 classes it has 464,154 parameters (0.46M; 470,004 for 100 classes) with
  ``norm="batch"`` or ``"group"``, and 463,033 with ``norm="none"`` (conv biases and
  SkipInit gains instead of norm layers): the model of the long-tailed CIFAR
  benchmarks (LDAM-DRW and after).

  Args:
    num_classes: number of output logits.
    in_channels: input channels.
    norm: ``"batch"`` (default), ``"group"`` or ``"none"``; see :class:`CifarResNet`.
    width: channels of the first stage (16).
    rngs: random number generators for initialisation.

  >>> num_params(nnx.eval_shape(lambda: ResNet32(10, rngs=nnx.Rngs(0))))
  464154
  """

  def __init__(
    self,
    num_classes: int,
    *,
    in_channels: int = 3,
    norm: Norm = "batch",
    width: int = 16,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      num_classes,
      depth=32,
      in_channels=in_channels,
      norm=norm,
      width=width,
      rngs=rngs,
    )


# ---------------------------------------------------------------------------------
# ImageNet-style ResNet (He et al.), with an optional CIFAR stem.


def _conv(cin: int, cout: int, size: int, stride: int, rngs: nnx.Rngs, groups: int = 1):
  return nnx.Conv(
    cin,
    cout,
    (size, size),
    strides=stride,
    padding=size // 2,
    feature_group_count=groups,
    use_bias=False,
    kernel_init=_kaiming_normal,
    rngs=rngs,
  )


class _ResidualBlock(nnx.Module):
  """A basic (two 3x3) or bottleneck (1x1, grouped 3x3, 1x1 x4) residual block.

  The shortcut is the identity, or a strided 1x1 convolution and norm when the
  shape changes (He et al.'s option B, as in torchvision).
  """

  def __init__(
    self, cin: int, width: int, stride: int, *, bottleneck: bool, groups: int,
    base_width: int, norm: str, rngs: nnx.Rngs,
  ):  # fmt: skip
    if bottleneck:
      inner = int(width * base_width / 64) * groups
      cout = 4 * width
      shapes = [(cin, inner, 1, 1, 1), (inner, inner, 3, stride, groups)]
      shapes.append((inner, cout, 1, 1, 1))
    else:
      cout = width
      shapes = [(cin, width, 3, stride, 1), (width, width, 3, 1, 1)]
    self.convs = nnx.List([_conv(a, b, k, s, rngs, g) for a, b, k, s, g in shapes])
    self.norms = nnx.List([_make_norm(norm, b, rngs=rngs) for _, b, *_ in shapes])
    project = stride != 1 or cin != cout
    self.shortcut = _conv(cin, cout, 1, stride, rngs) if project else None
    self.shortcut_norm = _make_norm(norm, cout, rngs=rngs) if project else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      y = _apply(norm, conv(y))
      if i < len(self.convs) - 1:
        y = jax.nn.relu(y)
    if self.shortcut is not None:
      x = _apply(self.shortcut_norm, self.shortcut(x))
    return jax.nn.relu(y + x)


class ResNet(nnx.Module):
  """ResNet / ResNeXt of He et al. (2016) and Xie et al. (2017), torchvision layout.

  Four stages of ``stage_sizes`` blocks with 64, 128, 256, 512 base channels
  (stride 2 at the start of stages 2-4), global average pooling, a linear
  classifier. ``stem="imagenet"``: 7x7 stride-2 convolution and 3x3 stride-2
  max-pool; ``stem="cifar"``: one 3x3 stride-1 convolution, no max-pool (the
  ResNet-34 variant of the ImbSAM authors' CIFAR experiments). Use
  :func:`create_model` names ``resnet34_cifar``, ``resnet50``,
  ``resnext50_32x4d``.

  Args:
    num_classes: number of logits.
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34/50.
    bottleneck: bottleneck blocks (ResNet-50 and deeper) instead of basic.
    groups: grouped-convolution cardinality (32 for ResNeXt-50 32x4d).
    width_per_group: channels per group (4 for ResNeXt-50 32x4d).
    stem: ``"imagenet"`` or ``"cifar"``.
    in_channels: input channels.
    norm: ``"batch"``, ``"group"`` or ``"none"``.
    rngs: random number generators for initialisation.

  >>> make = lambda: ResNet(10, stage_sizes=(3, 4, 6, 3), stem="cifar",
  ...                       rngs=nnx.Rngs(0))
  >>> num_params(nnx.eval_shape(make))  # as kuangliu/pytorch-cifar's ResNet34
  21282122
  """

  def __init__(
    self, num_classes: int, *, stage_sizes: Sequence[int], bottleneck: bool = False,
    groups: int = 1, width_per_group: int = 64, stem: str = "imagenet",
    in_channels: int = 3, norm: Norm = "batch", rngs: nnx.Rngs,
  ):  # fmt: skip
    _check_norm(norm)
    if stem not in ("imagenet", "cifar"):
      raise ValueError(f"stem must be imagenet or cifar, got {stem!r}")
    self.norm = norm
    self.imagenet_stem = stem == "imagenet"
    self.stem = _conv(in_channels, 64, 7 if self.imagenet_stem else 3,
                      2 if self.imagenet_stem else 1, rngs)  # fmt: skip
    self.stem_norm = _make_norm(norm, 64, rngs=rngs)
    blocks, channels = [], 64
    for stage, size in enumerate(stage_sizes):
      for i in range(size):
        block = _ResidualBlock(
          channels, 64 * 2**stage, 2 if stage > 0 and i == 0 else 1,
          bottleneck=bottleneck, groups=groups, base_width=width_per_group,
          norm=norm, rngs=rngs,
        )  # fmt: skip
        blocks.append(block)
        channels = 64 * 2**stage * (4 if bottleneck else 1)
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``x`` of shape ``(B, H, W, C)``."""
    x = jax.nn.relu(_apply(self.stem_norm, self.stem(x)))
    if self.imagenet_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


# ---------------------------------------------------------------------------------
# Small CNN.


class SmallCNN(nnx.Module):
  """A small, fast CNN for tiny images (8x8 digits; also 28x28 and 32x32).

  ``conv3x3(32) -> conv3x3(64, stride 2) -> conv3x3(64, stride 2)``, each followed by
  the optional normalisation and ReLU, then global average pooling and a linear
  classifier. The global pool makes it independent of the input size (8x8 ends at
  2x2, 32x32 at 8x8). The default ``norm="none"`` (convolutions with bias) keeps
  per-example losses independent of the rest of the batch, which is what ImbSAM's fast
  path and quick CPU experiments want; a network this shallow trains well without it
  (on scikit-learn digits, 10 epochs of SGD with momentum reach about 99% held-out
  accuracy with either ``"none"`` or ``"batch"``).

  Args:
    num_classes: number of output logits.
    in_channels: input channels (1 for digits / MNIST, 3 for colour images).
    norm: ``"none"`` (default), ``"batch"`` or ``"group"``.
    features: channels of the conv layers (the first has stride 1, the others 2).
    rngs: random number generators for initialisation.

  >>> model = SmallCNN(10, in_channels=1, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((4, 8, 8, 1))).shape
  (4, 10)
  """

  def __init__(
    self,
    num_classes: int,
    *,
    in_channels: int = 1,
    norm: Norm = "none",
    features: Sequence[int] = (32, 64, 64),
    rngs: nnx.Rngs,
  ):
    _check_norm(norm)
    self.norm = norm
    convs, norms = [], []
    channels = in_channels
    for i, out_channels in enumerate(features):
      convs.append(
        nnx.Conv(
          channels,
          out_channels,
          (3, 3),
          strides=1 if i == 0 else 2,
          padding=1,
          use_bias=norm == "none",
          kernel_init=_kaiming_normal,
          rngs=rngs,
        )
      )
      norms.append(_make_norm(norm, out_channels, rngs=rngs))
      channels = out_channels
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``x`` of shape ``(B, H, W, C)``."""
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.relu(_apply(norm, conv(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


# ---------------------------------------------------------------------------------
# Deep SAD networks.

_SAD_EPSILON = 1e-4  # Deep SAD's BatchNorm2d(eps=1e-04, affine=False).


def _sad_features(input_shape: Sequence[int], features: Sequence[int] | None):
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
  if features is None:
    # Deep SAD's MNIST_LeNet (grey) and CIFAR10_LeNet (colour) channel widths.
    features = (8, 4) if input_shape[-1] == 1 else (32, 64, 128)
  features = tuple(int(f) for f in features)
  sizes = [tuple(int(s) for s in input_shape[:2])]
  for _ in features:
    h, w = sizes[-1]
    if h < 2 or w < 2:
      raise ValueError(
        f"input_shape {tuple(input_shape)} is too small for {len(features)} "
        "2x2 max-pools"
      )
    sizes.append((h // 2, w // 2))
  return features, tuple(sizes)


def _sad_conv(in_channels: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Conv:
  """Deep SAD's bias-free 5x5 convolution ('same' padding)."""
  return nnx.Conv(
    in_channels,
    out_channels,
    (5, 5),
    padding=2,
    use_bias=False,
    kernel_init=_kaiming_normal,
    rngs=rngs,
  )


def _sad_norm(norm: str, channels: int, rngs: nnx.Rngs) -> nnx.Module | None:
  return _make_norm(norm, channels, rngs=rngs, affine=False, epsilon=_SAD_EPSILON)


class DeepSADEncoder(nnx.Module):
  """Bias-free LeNet-style encoder of Deep SAD, mapping images to ``rep_dim`` vectors.

  One block per entry of ``features``: ``conv5x5 (no bias) -> BatchNorm (no scale, no
  bias, eps 1e-4) -> LeakyReLU(0.01) -> 2x2 max-pool``, then flatten and a bias-free
  linear layer to ``rep_dim``. No layer has a bias or an affine shift, so the network
  cannot map every input to the hypersphere centre with a constant (Ruff et al.,
  2018/2020). The default ``features`` follow the original networks: ``(8, 4)`` for
  one-channel input (MNIST_LeNet, rep_dim 32 there), ``(32, 64, 128)`` otherwise
  (CIFAR10_LeNet, rep_dim 128 there). Each pool halves the spatial size (rounding
  down): 28x28 -> 7x7, 32x32 -> 4x4, 8x8 digits -> 2x2.

  Args:
    rep_dim: output dimension.
    input_shape: ``(H, W, C)`` of one input (fixes the flattened size).
    features: channels of the conv blocks (default: see above).
    norm: ``"batch"`` (default, as in Deep SAD), ``"group"`` (also without affine
      parameters) or ``"none"``.
    rngs: random number generators for initialisation.

  Abstractly (``nnx.eval_shape``: shapes only), the MNIST configuration:

  >>> make = lambda: DeepSADEncoder(32, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  >>> enc = nnx.eval_shape(make)
  >>> enc.fc.in_features, num_params(enc)  # 7x7x4 features; as MNIST_LeNet
  (196, 7272)
  """

  def __init__(
    self,
    rep_dim: int,
    *,
    input_shape: Sequence[int],
    features: Sequence[int] | None = None,
    norm: Norm = "batch",
    rngs: nnx.Rngs,
  ):
    _check_norm(norm)
    features, sizes = _sad_features(input_shape, features)
    self.norm = norm
    self.input_shape = tuple(int(s) for s in input_shape)
    convs, norms = [], []
    channels = self.input_shape[-1]
    for out_channels in features:
      convs.append(_sad_conv(channels, out_channels, rngs))
      norms.append(_sad_norm(norm, out_channels, rngs))
      channels = out_channels
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    h, w = sizes[-1]
    self.fc = nnx.Linear(
      h * w * channels, rep_dim, use_bias=False, kernel_init=_kaiming_normal, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Representations ``(B, rep_dim)`` for images ``x`` of shape ``(B, H, W, C)``."""
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.leaky_relu(_apply(norm, conv(x)), 0.01)
      x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return self.fc(x.reshape(x.shape[0], -1))


class DeepSADDecoder(nnx.Module):
  """Bias-free decoder mirroring :class:`DeepSADEncoder`, for autoencoder pretraining.

  A bias-free linear layer maps ``rep_dim`` to the encoder's last feature map, then
  for each encoder block in reverse: ``norm -> LeakyReLU -> nearest-neighbour upsample
  to that block's input size -> conv5x5 (no bias)``, the last conv producing the input
  channels. The upsampling targets are the encoder's exact stage sizes, so odd sizes
  (28 -> 14 -> 7 -> 14 -> 28) round-trip. The output is linear (the original ends with
  a sigmoid for [0, 1] data; here the data may be standardised, so none is applied).

  Args:
    rep_dim: input (representation) dimension.
    input_shape: ``(H, W, C)`` of the images to reconstruct.
    features: the encoder's ``features`` (same default).
    norm: as for the encoder.
    rngs: random number generators for initialisation.

  >>> make = lambda: DeepSADDecoder(32, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  >>> nnx.eval_shape(make).sizes  # upsampling targets, last one first
  ((28, 28), (14, 14), (7, 7))
  """

  def __init__(
    self,
    rep_dim: int,
    *,
    input_shape: Sequence[int],
    features: Sequence[int] | None = None,
    norm: Norm = "batch",
    rngs: nnx.Rngs,
  ):
    _check_norm(norm)
    features, sizes = _sad_features(input_shape, features)
    self.norm = norm
    self.input_shape = tuple(int(s) for s in input_shape)
    self.sizes = sizes
    self.features = features
    h, w = sizes[-1]
    self.fc = nnx.Linear(
      rep_dim,
      h * w * features[-1],
      use_bias=False,
      kernel_init=_kaiming_normal,
      rngs=rngs,
    )
    channels_out = (self.input_shape[-1], *features[:-1])
    norms, convs = [], []
    for i in reversed(range(len(features))):
      norms.append(_sad_norm(norm, features[i], rngs))
      convs.append(_sad_conv(features[i], channels_out[i], rngs))
    self.norms = nnx.List(norms)
    self.convs = nnx.List(convs)

  def __call__(self, z: jax.Array) -> jax.Array:
    """Reconstructions ``(B, H, W, C)`` from representations ``z`` ``(B, rep_dim)``."""
    h, w = self.sizes[-1]
    x = self.fc(z).reshape(z.shape[0], h, w, self.features[-1])
    targets = reversed(self.sizes[:-1])
    for norm, conv, (th, tw) in zip(self.norms, self.convs, targets, strict=True):
      x = jax.nn.leaky_relu(_apply(norm, x), 0.01)
      x = jax.image.resize(x, (x.shape[0], th, tw, x.shape[-1]), method="nearest")
      x = conv(x)
    return x


class DeepSADAutoencoder(nnx.Module):
  """:class:`DeepSADEncoder` followed by :class:`DeepSADDecoder` (same configuration).

  Pretrain it on a reconstruction loss, then start Deep SAD from ``ae.encoder``: use
  it directly, or copy its state into an encoder of the same configuration::

    ae = DeepSADAutoencoder(32, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
    ...  # train on mean((ae(x) - x) ** 2)
    encoder = DeepSADEncoder(32, input_shape=(28, 28, 1), rngs=nnx.Rngs(1))
    nnx.update(encoder, nnx.state(ae.encoder))

  Args:
    rep_dim: bottleneck dimension.
    input_shape: ``(H, W, C)`` of one input.
    features: channels of the encoder blocks (see :class:`DeepSADEncoder`).
    norm: ``"batch"`` (default), ``"group"`` or ``"none"``.
    rngs: random number generators for initialisation.

  >>> make = lambda: DeepSADAutoencoder(128, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  >>> ae = nnx.eval_shape(make)  # shapes only
  >>> num_params(ae.encoder)  # as CIFAR10_LeNet
  520544
  """

  def __init__(
    self,
    rep_dim: int,
    *,
    input_shape: Sequence[int],
    features: Sequence[int] | None = None,
    norm: Norm = "batch",
    rngs: nnx.Rngs,
  ):
    self.encoder = DeepSADEncoder(
      rep_dim, input_shape=input_shape, features=features, norm=norm, rngs=rngs
    )
    self.decoder = DeepSADDecoder(
      rep_dim, input_shape=input_shape, features=features, norm=norm, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction of ``x``, same shape ``(B, H, W, C)``."""
    return self.decoder(self.encoder(x))


# ---------------------------------------------------------------------------------
# Factory.

_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}
_IMAGENET_RESNETS = {
  "resnet34_cifar": dict(stage_sizes=(3, 4, 6, 3), stem="cifar"),
  "resnet50": dict(stage_sizes=(3, 4, 6, 3), bottleneck=True),
  "resnext50_32x4d": dict(
    stage_sizes=(3, 4, 6, 3), bottleneck=True, groups=32, width_per_group=4
  ),
}
MODEL_NAMES: tuple[str, ...] = (
  *_RESNET_DEPTHS,
  *_IMAGENET_RESNETS,
  "small_cnn",
  "deep_sad",
)
"""Names accepted by :func:`create_model`."""


def create_model(
  name: str,
  *,
  num_classes: int,
  input_shape: Sequence[int],
  rngs: nnx.Rngs,
  norm: Norm | None = None,
) -> nnx.Module:
  """Builds a model by name, for example scripts that select one with a flag.

  Names: ``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``
  (:class:`CifarResNet`), ``"small_cnn"`` (:class:`SmallCNN`) and ``"deep_sad"``
  (:class:`DeepSADEncoder`, whose output dimension ``rep_dim`` is ``num_classes``).

  Args:
    name: model name (case-insensitive), one of :data:`MODEL_NAMES`.
    num_classes: number of outputs (logits, or ``rep_dim`` for ``"deep_sad"``).
    input_shape: ``(H, W, C)`` of one input; ``C`` sets the input channels.
    rngs: random number generators for initialisation.
    norm: ``"batch"``, ``"group"`` or ``"none"``; ``None`` keeps the model's default
      (``"batch"`` for ResNets and Deep SAD, ``"none"`` for the small CNN).

  Returns:
    The initialised model.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones) or norm.

  >>> model = create_model("small_cnn", num_classes=10, input_shape=(8, 8, 1),
  ...                      rngs=nnx.Rngs(0))
  >>> type(model).__name__
  'SmallCNN'
  """
  key = name.lower()
  if key not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
  if norm is not None:
    _check_norm(norm)
  kwargs = {} if norm is None else {"norm": norm}
  in_channels = int(input_shape[-1])
  if key in _RESNET_DEPTHS:
    depth = _RESNET_DEPTHS[key]
    cls = ResNet32 if depth == 32 else CifarResNet
    extra = {} if depth == 32 else {"depth": depth}
    return cls(num_classes, in_channels=in_channels, rngs=rngs, **extra, **kwargs)
  if key in _IMAGENET_RESNETS:
    return ResNet(
      num_classes, in_channels=in_channels, rngs=rngs, **_IMAGENET_RESNETS[key],
      **kwargs,
    )  # fmt: skip
  if key == "small_cnn":
    return SmallCNN(num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
  return DeepSADEncoder(num_classes, input_shape=input_shape, rngs=rngs, **kwargs)
