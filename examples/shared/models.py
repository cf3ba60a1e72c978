"""Flax NNX models for the example applications (NHWC ``float32`` images).

Classifiers (:class:`ResNet`, :class:`CifarResNet`, :class:`SmallCNN`) and Deep SAD's
bias-free networks, built by name with :func:`create_model`. ``model.train()`` /
``model.eval()`` switch BatchNorm between batch and running statistics;
``norm="group"`` or ``"none"`` leaves no :class:`flax.nnx.BatchStat`, so an example's
loss depends only on that example and the parameters. The classifiers' ``dtype`` is
their activations' (e.g. ``jnp.bfloat16``); parameters and statistics stay float32.

References: He et al., Deep Residual Learning, CVPR 2016; Xie et al., ResNeXt, CVPR
2017; Cao et al., LDAM-DRW, NeurIPS 2019; De & Smith, SkipInit, NeurIPS 2020; Ruff et
al., Deep Semi-Supervised Anomaly Detection, ICLR 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

Norm = Literal["batch", "group", "none"]
NORMS = ("batch", "group", "none")
#: An activation dtype (``None``: that of the inputs and parameters, float32).
Dtype = Any
#: The ``--dtype`` choices of the examples: the classifiers' activation dtype.
DTYPES: dict[str, Dtype] = {"float32": None, "bfloat16": jnp.bfloat16}

# PyTorch's defaults (the reference code is PyTorch): BatchNorm2d momentum 0.1 (0.9
# in Flax) and epsilon 1e-5; Kaiming-normal weights (fan-in, gain sqrt(2)).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_kaiming_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def _make_norm(
  norm: str,
  channels: int,
  *,
  rngs: nnx.Rngs,
  affine=True,
  epsilon=_BN_EPSILON,
  dtype: Dtype = None,
) -> nnx.Module | None:
  """A norm layer over channels (GroupNorm: up to 8 groups); ``None`` for "none"."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  kw = dict(epsilon=epsilon, use_bias=affine, use_scale=affine, dtype=dtype, rngs=rngs)
  if norm == "batch":
    return nnx.BatchNorm(channels, momentum=_BN_MOMENTUM, **kw)
  if norm == "group":
    groups = max(d for d in range(1, 9) if channels % d == 0)
    return nnx.GroupNorm(channels, num_groups=groups, **kw)
  return None


def _apply(layer: nnx.Module | None, x: jax.Array) -> jax.Array:
  return x if layer is None else layer(x)


def _conv(
  cin, cout, size, stride=1, groups=1, *, rngs, bias=False, dtype: Dtype = None
) -> nnx.Conv:
  """A Kaiming-normal ``size x size`` convolution with 'same' padding."""
  return nnx.Conv(
    cin,
    cout,
    (size, size),
    strides=stride,
    padding=size // 2,
    feature_group_count=groups,
    use_bias=bias,
    kernel_init=_kaiming_normal,
    dtype=dtype,
    rngs=rngs,
  )


def num_params(model: nnx.Module) -> int:
  """Number of scalar :class:`flax.nnx.Param` entries (no BatchNorm statistics).

  >>> num_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  8
  """
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


class _Block(nnx.Module):
  """Basic (two 3x3) or bottleneck (1x1, grouped 3x3, 1x1 x4) residual block.

  On a shape change the shortcut is a 1x1 conv + norm (``"project"``, option B) or a
  stride-2 subsampling with zero-padded channels (``"pad"``, option A). With
  ``skip_init`` the convs have biases and the branch a zero-initialised gain.
  """

  def __init__(
    self,
    cin: int,
    width: int,
    stride: int,
    *,
    bottleneck: bool,
    groups: int,
    base_width: int,
    shortcut: str,
    skip_init: bool,
    norm: str,
    dtype: Dtype,
    rngs: nnx.Rngs,
  ):
    conv = functools.partial(_conv, rngs=rngs, dtype=dtype)
    make_norm = functools.partial(_make_norm, norm, rngs=rngs, dtype=dtype)
    if bottleneck:
      inner, cout = int(width * base_width / 64) * groups, 4 * width
      shapes = [(cin, inner, 1, 1, 1), (inner, inner, 3, stride, groups)]
      shapes.append((inner, cout, 1, 1, 1))
    else:
      cout = width
      shapes = [(cin, width, 3, stride, 1), (width, width, 3, 1, 1)]
    self.convs = nnx.List([conv(*sh, bias=skip_init) for sh in shapes])
    self.norms = nnx.List([make_norm(s[1]) for s in shapes])
    self.skip_gain = nnx.Param(jnp.zeros((), jnp.float32)) if skip_init else None
    project = shortcut == "project" and (stride != 1 or cin != cout)
    self.shortcut = conv(cin, cout, 1, stride) if project else None
    self.shortcut_norm = make_norm(cout) if project else None
    self.stride, self.pad_channels = stride, cout - cin

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      y = _apply(norm, conv(y))
      if i < len(self.convs) - 1:
        y = jax.nn.relu(y)
    if self.skip_gain is not None:
      y = self.skip_gain[...].astype(y.dtype) * y
    if self.shortcut is not None:
      x = _apply(self.shortcut_norm, self.shortcut(x))
    elif self.stride != 1 or self.pad_channels:  # option A
      lo = self.pad_channels // 2
      pad = ((0, 0), (0, 0), (0, 0), (lo, self.pad_channels - lo))
      x = jnp.pad(x[:, :: self.stride, :: self.stride, :], pad)
    return jax.nn.relu(y + x)


class ResNet(nnx.Module):
  """ResNet / ResNeXt: stem, residual stages, global average pool, linear classifier.

  Stage ``s`` has ``stage_sizes[s]`` blocks of ``width * 2**s`` base channels, stride
  2 at its start for ``s > 0``.

  Args:
    num_classes: number of logits.
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34/50.
    width: channels of the stem and first stage.
    bottleneck: bottleneck blocks (ResNet-50 and deeper) instead of basic ones.
    groups: grouped-convolution cardinality (32 for ResNeXt-50 32x4d).
    width_per_group: channels per group (4 for ResNeXt-50 32x4d).
    stem: ``"imagenet"`` (7x7 stride-2 conv, 3x3 stride-2 max-pool) or ``"cifar"``
      (a 3x3 conv).
    shortcut: ``"project"`` (torchvision's layout) or ``"pad"`` (LDAM-DRW's CIFAR
      ResNet: option A, Kaiming-normal classifier, and with ``norm="none"`` conv
      biases and SkipInit gains).
    in_channels: input channels.
    norm: ``"batch"``, ``"group"`` or ``"none"``.
    dtype: the activations' dtype (``None``: float32); parameters stay float32.
    rngs: random number generators for initialisation.

  >>> make = lambda: ResNet(10, stage_sizes=(3, 4, 6, 3), stem="cifar",
  ...                       rngs=nnx.Rngs(0))
  >>> num_params(nnx.eval_shape(make))  # as kuangliu/pytorch-cifar's ResNet34
  21282122
  """

  def __init__(
    self,
    num_classes: int,
    *,
    stage_sizes: Sequence[int],
    width: int = 64,
    bottleneck: bool = False,
    groups: int = 1,
    width_per_group: int = 64,
    stem: str = "imagenet",
    shortcut: str = "project",
    in_channels: int = 3,
    norm: Norm = "batch",
    dtype: Dtype = None,
    rngs: nnx.Rngs,
  ):
    if stem not in ("imagenet", "cifar") or shortcut not in ("project", "pad"):
      raise ValueError(f"unknown stem {stem!r} or shortcut {shortcut!r}")
    self.norm = norm
    self.imagenet_stem = stem == "imagenet"
    skip_init = shortcut == "pad" and norm == "none"
    k, s = (7, 2) if self.imagenet_stem else (3, 1)
    self.stem_norm = _make_norm(norm, width, rngs=rngs, dtype=dtype)
    self.stem = _conv(in_channels, width, k, s, bias=skip_init, rngs=rngs, dtype=dtype)
    block = functools.partial(
      _Block,
      bottleneck=bottleneck,
      groups=groups,
      base_width=width_per_group,
      shortcut=shortcut,
      skip_init=skip_init,
      norm=norm,
      dtype=dtype,
      rngs=rngs,
    )
    blocks, channels = [], width
    for stage, size in enumerate(stage_sizes):
      for i in range(size):
        blocks.append(block(channels, width * 2**stage, 2 if stage and not i else 1))
        channels = width * 2**stage * (4 if bottleneck else 1)
    self.blocks = nnx.List(blocks)
    init = _kaiming_normal if shortcut == "pad" else nnx.initializers.lecun_normal()
    self.head = nnx.Linear(
      channels, num_classes, kernel_init=init, dtype=dtype, rngs=rngs
    )

  def features(self, x: jax.Array) -> jax.Array:
    """Globally average-pooled features before the classifier."""
    x = jax.nn.relu(_apply(self.stem_norm, self.stem(x)))
    if self.imagenet_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``x`` of shape ``(B, H, W, C)``."""
    return self.head(self.features(x))


class CifarResNet(ResNet):
  """CIFAR ResNet of depth ``6n + 2`` (He et al., 2016, Sec. 4.2), as in LDAM-DRW.

  A 3x3 stem, three stages of ``n`` basic blocks with ``width``, ``2 * width`` and
  ``4 * width`` channels and option-A shortcuts (see :class:`ResNet`). ResNet-32 with
  10 classes has 464,154 parameters (463,033 with ``norm="none"``, which wants a
  gentler learning rate: SGD 0.05 trained where 0.1 diverged).

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
    dtype: Dtype = None,
    rngs: nnx.Rngs,
  ):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
    self.depth = depth
    super().__init__(
      num_classes,
      stage_sizes=((depth - 2) // 6,) * 3,
      width=width,
      stem="cifar",
      shortcut="pad",
      in_channels=in_channels,
      norm=norm,
      dtype=dtype,
      rngs=rngs,
    )


class CosineLinear(nnx.Module):
  """A normalised classifier: the cosines between features and class weights.

  .. math::
    z_c = \\frac{x^\\top w_c}{\\|x\\|_2 \\|w_c\\|_2}

  LDAM-DRW's ``NormedLinear`` (kernel uniform in [-1, 1]); the LDAM loss scales the
  cosines by ``s``. The cosines are its logits for prediction too.

  >>> head = CosineLinear(4, 3, rngs=nnx.Rngs(0))
  >>> z = head(jnp.ones((2, 4)))
  >>> z.shape, bool(jnp.all(jnp.abs(z) <= 1))
  ((2, 3), True)
  """

  def __init__(
    self, in_features: int, out_features: int, *, dtype: Dtype = None, rngs: nnx.Rngs
  ):
    init = nnx.initializers.uniform(2.0)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)) - 1.0)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.float32
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    kernel = self.kernel[...]
    kernel = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    return (x.astype(dtype) @ kernel.astype(dtype)).astype(dtype)


HEADS = ("linear", "cosine")


class SmallCNN(nnx.Module):
  """A small CNN for tiny images: 3x3 convs (strides 1, 2, 2), global pool, linear.

  Each conv is followed by the optional norm and a ReLU. The default ``norm="none"``
  (convs with bias) keeps per-example losses independent of the rest of the batch.

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
    dtype: Dtype = None,
    rngs: nnx.Rngs,
  ):
    self.norm = norm
    make_norm = functools.partial(_make_norm, norm, rngs=rngs, dtype=dtype)
    conv = functools.partial(_conv, bias=norm == "none", rngs=rngs, dtype=dtype)
    self.norms = nnx.List([make_norm(c) for c in features])
    pairs = enumerate(zip((in_channels, *features), features, strict=False))
    self.convs = nnx.List([conv(a, b, 3, 2 if i else 1) for i, (a, b) in pairs])
    self.head = nnx.Linear(features[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``x`` of shape ``(B, H, W, C)``."""
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.relu(_apply(norm, conv(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


def _sad_features(input_shape: Sequence[int], features: Sequence[int] | None):
  """The conv widths (default: Deep SAD's) and the spatial size before each pool."""
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
  if features is None:  # MNIST_LeNet (grey) or CIFAR10_LeNet (colour).
    features = (8, 4) if input_shape[-1] == 1 else (32, 64, 128)
  sizes = [tuple(int(s) for s in input_shape[:2])]
  for _ in features:
    if min(sizes[-1]) < 2:
      raise ValueError(
        f"input_shape {tuple(input_shape)} is too small for {len(features)} "
        "2x2 max-pools"
      )
    sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
  return tuple(int(f) for f in features), tuple(sizes)


# Deep SAD's BatchNorm2d(eps=1e-04, affine=False) and bias-free Kaiming-normal Linear.
_sad_norm = functools.partial(_make_norm, affine=False, epsilon=1e-4)
_sad_linear = functools.partial(nnx.Linear, use_bias=False, kernel_init=_kaiming_normal)


class DeepSADEncoder(nnx.Module):
  """Deep SAD's bias-free LeNet-style encoder, images to ``rep_dim`` vectors.

  Per entry of ``features``: ``conv5x5 -> norm (no affine, eps 1e-4) ->
  LeakyReLU(0.01) -> 2x2 max-pool``, then flatten and a linear layer, all without bias
  (so no constant map to the hypersphere centre). Default ``features``: ``(8, 4)``
  for one channel (MNIST_LeNet), ``(32, 64, 128)`` otherwise (CIFAR10_LeNet).

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
    features, sizes = _sad_features(input_shape, features)
    self.norm = norm
    self.input_shape = tuple(int(s) for s in input_shape)
    pairs = zip((self.input_shape[-1], *features), features, strict=False)
    self.convs = nnx.List([_conv(a, b, 5, rngs=rngs) for a, b in pairs])
    self.norms = nnx.List([_sad_norm(norm, c, rngs=rngs) for c in features])
    h, w = sizes[-1]
    self.fc = _sad_linear(h * w * features[-1], rep_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Representations ``(B, rep_dim)`` for images ``x`` of shape ``(B, H, W, C)``."""
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.leaky_relu(_apply(norm, conv(x)), 0.01)
      x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return self.fc(x.reshape(x.shape[0], -1))


class DeepSADDecoder(nnx.Module):
  """Bias-free decoder mirroring :class:`DeepSADEncoder` (same arguments).

  A linear layer to the encoder's last feature map, then per block in reverse: ``norm
  -> LeakyReLU -> nearest upsampling to the block's input size -> conv5x5``. The
  output is linear (no sigmoid: the data may be standardised).

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
    self.features, self.sizes = _sad_features(input_shape, features)
    self.norm = norm
    self.input_shape = tuple(int(s) for s in input_shape)
    h, w = self.sizes[-1]
    self.fc = _sad_linear(rep_dim, h * w * self.features[-1], rngs=rngs)
    outs = (self.input_shape[-1], *self.features[:-1])
    pairs = list(zip(self.features, outs, strict=True))[::-1]
    self.norms = nnx.List([_sad_norm(norm, c, rngs=rngs) for c, _ in pairs])
    self.convs = nnx.List([_conv(c, out, 5, rngs=rngs) for c, out in pairs])

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
  """:class:`DeepSADEncoder` then :class:`DeepSADDecoder`, both built from ``kwargs``.

  Pretrain on reconstruction, then copy the encoder into a fresh one of the same
  configuration: ``nnx.update(encoder, nnx.state(ae.encoder))``.

  >>> make = lambda: DeepSADAutoencoder(128, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  >>> num_params(nnx.eval_shape(make).encoder)  # as CIFAR10_LeNet
  520544
  """

  def __init__(self, rep_dim: int, **kwargs: Any):
    self.encoder = DeepSADEncoder(rep_dim, **kwargs)
    self.decoder = DeepSADDecoder(rep_dim, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction of ``x``, same shape ``(B, H, W, C)``."""
    return self.decoder(self.encoder(x))


_BOTTLENECK = dict(stage_sizes=(3, 4, 6, 3), bottleneck=True)
_CLASSIFIERS = {
  **{f"resnet{d}": functools.partial(CifarResNet, depth=d) for d in (20, 32, 44, 56)},
  "resnet34_cifar": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), stem="cifar"),
  "resnet50": functools.partial(ResNet, **_BOTTLENECK),
  "resnext50_32x4d": functools.partial(
    ResNet, **_BOTTLENECK, groups=32, width_per_group=4
  ),
  "small_cnn": SmallCNN,
}
MODEL_NAMES: tuple[str, ...] = (*_CLASSIFIERS, "deep_sad")
"""Names accepted by :func:`create_model`."""


def create_model(
  name: str,
  *,
  num_classes: int,
  input_shape: Sequence[int],
  rngs: nnx.Rngs,
  norm: Norm | None = None,
  dtype: Dtype = None,
  head: str = "linear",
) -> nnx.Module:
  """Builds a model by name (case-insensitive), one of :data:`MODEL_NAMES`.

  ``"deep_sad"`` is a :class:`DeepSADEncoder` with ``rep_dim = num_classes``. The
  input channels are ``input_shape[-1]``; ``norm=None`` keeps the model's default.
  ``dtype``: the classifiers' activations (float32 parameters); not for deep_sad.
  ``head``: the classifiers' last layer, ``linear`` or ``cosine``
  (:class:`CosineLinear`, for the LDAM loss).

  >>> model = create_model("small_cnn", num_classes=10, input_shape=(8, 8, 1),
  ...                      rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  >>> type(model).__name__, model(jnp.zeros((1, 8, 8, 1))).dtype
  ('SmallCNN', dtype(bfloat16))
  """
  key = name.lower()
  if key not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
  kwargs = {"rngs": rngs} if norm is None else {"rngs": rngs, "norm": norm}
  if key == "deep_sad":
    if dtype is not None:
      raise ValueError("deep_sad computes in float32; dtype is for the classifiers")
    return DeepSADEncoder(num_classes, input_shape=input_shape, **kwargs)
  if head not in HEADS or (head != "linear" and key == "deep_sad"):
    raise ValueError(f"head must be one of {HEADS} (a classifier's), got {head!r}")
  model = _CLASSIFIERS[key](
    num_classes, in_channels=int(input_shape[-1]), dtype=dtype, **kwargs
  )
  if head == "cosine":
    model.head = CosineLinear(
      model.head.in_features, num_classes, dtype=dtype, rngs=rngs
    )
  return model
