"""Tests of examples/shared/models.py.

Compiling is the slow part on CPU (random initialisers cost about a second per new
parameter shape with the default threefry keys), so: structural checks (shapes,
parameter counts, which variables exist) build and run models abstractly with
``nnx.eval_shape`` / ``jax.eval_shape``; models that are really built get cheap-to-
compile RBG keys; forward passes are jitted whole rather than run op by op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shared import models


def _x(shape, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)


def _abstract(make):
  """The model ``make()`` builds, with shapes instead of arrays (nothing compiled)."""
  return nnx.eval_shape(make)


def _output(make, shape, batch=2):
  """Output ``ShapeDtypeStruct`` of ``make()(x)`` for a ``(batch, *shape)`` input."""
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  return jax.eval_shape(lambda x: make()(x), x)


def _paths(model, kind):
  """``"a/b/c"`` path strings of the ``kind`` variables of ``model``."""
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, kind))
  return ["/".join(str(k.key) for k in p if hasattr(k, "key")) for p, _ in leaves]


def _snapshot(model, kind):
  return jax.tree.map(np.array, nnx.state(model, kind))


@pytest.fixture(scope="module")
def resnet32_none():
  return models.CifarResNet(10, norm="none", rngs=_rngs())


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@nnx.jit
def _forward(model, x):
  return model(x)


# ---------------------------------------------------------------- shapes


def _case(name, make, shape, out_shape):
  shape_id = "x".join(map(str, shape))
  return pytest.param(make, shape, out_shape, id=f"{name}-{shape_id}")


_SHAPE_CASES = [
  # ResNets: any input size and channel count.
  *[
    _case(f"resnet32_{n}",
          lambda n=n, c=s[-1]: models.CifarResNet(
            7, in_channels=c, norm=n, rngs=_rngs()),
          s, (7,))
    for n, s in (("batch", (28, 28, 1)), ("group", (32, 32, 3)),
                 ("none", (32, 32, 3)))
  ],
  _case("resnet20", lambda: models.CifarResNet(4, depth=20, rngs=_rngs()),
        (32, 32, 3), (4,)),
  # Small CNN: digits, MNIST-like and CIFAR-like inputs.
  *[
    _case(f"small_cnn_{n}",
          lambda n=n, c=s[-1]: models.SmallCNN(10, in_channels=c, norm=n, rngs=_rngs()),
          s, (10,))
    for n in ("batch", "group", "none")
    for s in ((8, 8, 1), (28, 28, 1), (32, 32, 3))
  ],
  # Deep SAD encoder and autoencoder (also an odd size, which pools unevenly).
  *[
    _case("deep_sad_encoder",
          lambda s=s: models.DeepSADEncoder(16, input_shape=s, rngs=_rngs()), s, (16,))
    for s in ((8, 8, 1), (28, 28, 1), (32, 32, 3), (30, 30, 1))
  ],
  *[
    _case("deep_sad_autoencoder",
          lambda s=s: models.DeepSADAutoencoder(16, input_shape=s, rngs=_rngs()), s, s)
    for s in ((8, 8, 1), (28, 28, 1), (32, 32, 3), (30, 30, 1))
  ],
]  # fmt: skip


@pytest.mark.parametrize("make, shape, out_shape", _SHAPE_CASES)
def test_output_shapes(make, shape, out_shape):
  out = _output(make, shape, batch=3)
  assert out.shape == (3, *out_shape)
  assert out.dtype == jnp.float32


def test_resnet32_features_shape():
  features = _output(lambda: models.CifarResNet(10, rngs=_rngs()).features, (32, 32, 3))
  assert features.shape == (2, 64)


def test_small_cnn_and_autoencoder_forward():
  shape = (8, 8, 1)
  x = _x(shape, batch=3)
  out = _forward(models.SmallCNN(10, rngs=_rngs()), x)
  assert out.shape == (3, 10) and np.all(np.isfinite(out))
  ae = models.DeepSADAutoencoder(16, input_shape=shape, rngs=_rngs())
  recon = _forward(ae, x)
  assert recon.shape == x.shape and np.all(np.isfinite(recon))


@pytest.mark.parametrize(
  "shape, pooled",
  [((8, 8, 1), (2, 2, 4)), ((28, 28, 1), (7, 7, 4)), ((32, 32, 3), (4, 4, 128))],
)
def test_deep_sad_encoder_default_features(shape, pooled):
  enc = _abstract(lambda: models.DeepSADEncoder(32, input_shape=shape, rngs=_rngs()))
  assert enc.fc.in_features == int(np.prod(pooled))
  assert enc.convs[-1].out_features == pooled[-1]


def test_autoencoder_encoder_transfers_to_deep_sad_encoder():
  shape = (8, 8, 1)
  ae = models.DeepSADAutoencoder(16, input_shape=shape, rngs=_rngs())
  x = _x(shape, batch=4)
  _forward(ae, x)  # train mode: moves the encoder's running statistics
  ae.eval()
  enc = models.DeepSADEncoder(16, input_shape=shape, rngs=_rngs(1))
  enc.eval()
  assert not np.allclose(_forward(enc, x), _forward(ae.encoder, x))
  nnx.update(enc, nnx.state(ae.encoder))
  np.testing.assert_array_equal(_forward(enc, x), _forward(ae.encoder, x))


def test_deep_sad_rejects_bad_input_shape():
  with pytest.raises(ValueError, match="too small"):
    models.DeepSADEncoder(8, input_shape=(4, 4, 3), rngs=_rngs())
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    models.DeepSADDecoder(8, input_shape=(28, 28), rngs=_rngs())


# ---------------------------------------------------------------- parameters


def _resnet_param_count(num_classes, depth=32, width=16, in_channels=3, norm="batch"):
  """Parameter count of the option-A CIFAR ResNet, from its definition."""
  n = (depth - 2) // 6
  widths = [width, 2 * width, 4 * width]
  convs = [(in_channels, width)]  # stem
  for stage, c in enumerate(widths):
    c_in = width if stage == 0 else widths[stage - 1]
    convs += [(c_in, c), (c, c)] + [(c, c)] * (2 * (n - 1))
  count = sum(9 * a * b for a, b in convs)
  channels = sum(b for _, b in convs)  # one norm (or conv bias) per conv
  if norm == "none":
    count += channels + 3 * n  # conv biases + one SkipInit gain per block
  else:
    count += 2 * channels  # scale and bias of each norm layer
  return count + 4 * width * num_classes + num_classes


def test_resnet32_parameter_count(resnet32_none):
  resnet32 = _abstract(lambda: models.CifarResNet(10, rngs=_rngs()))
  assert models.num_params(resnet32) == _resnet_param_count(10) == 464_154
  assert len(resnet32.blocks) == 15
  assert models.num_params(resnet32_none) == _resnet_param_count(10, norm="none")
  assert models.num_params(resnet32_none) == 463_033
  net = _abstract(lambda: models.CifarResNet(100, norm="group", rngs=_rngs()))
  assert models.num_params(net) == _resnet_param_count(100) == 470_004


@pytest.mark.parametrize("depth, width, in_channels", [(20, 16, 3), (44, 8, 1)])
def test_cifar_resnet_depth(depth, width, in_channels):
  net = _abstract(
    lambda: models.CifarResNet(
      4, depth=depth, width=width, in_channels=in_channels, rngs=_rngs()
    )
  )
  assert len(net.blocks) == (depth - 2) // 2
  assert models.num_params(net) == _resnet_param_count(
    4, depth=depth, width=width, in_channels=in_channels
  )


@pytest.mark.parametrize(
  "name, num_classes, count",
  [  # torchvision's (and kuangliu/pytorch-cifar's ResNet34) parameter counts
    ("resnet34_cifar", 10, 21_282_122),
    ("resnet50", 1000, 25_557_032),
    ("resnext50_32x4d", 1000, 25_028_904),
  ],
)
def test_torchvision_resnet_parameter_counts(name, num_classes, count):
  make = lambda: models.create_model(
    name, num_classes=num_classes, input_shape=(224, 224, 3), rngs=_rngs()
  )
  assert models.num_params(_abstract(make)) == count


def test_cifar_resnet_rejects_bad_depth():
  for depth in (2, 7, 30):
    with pytest.raises(ValueError, match="6n"):
      models.CifarResNet(4, depth=depth, rngs=_rngs())


def test_option_a_shortcut_and_skip_init(resnet32_none):
  block = resnet32_none.blocks[5]  # first block of stage 2: 16 -> 32, stride 2
  x = jax.nn.relu(_x((8, 8, 16)))
  y = _forward(block, x)
  assert y.shape == (2, 4, 4, 32)
  # The SkipInit gain starts at 0: the block is its (parameter-free) shortcut.
  expected = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
  np.testing.assert_array_equal(y, expected)


_BN_FREE = [
  lambda: models.CifarResNet(10, norm="none", rngs=_rngs()),
  lambda: models.CifarResNet(10, norm="group", rngs=_rngs()),
  lambda: models.SmallCNN(10, rngs=_rngs()),
  lambda: models.SmallCNN(10, norm="group", rngs=_rngs()),
  lambda: models.DeepSADEncoder(8, input_shape=(8, 8, 1), norm="none", rngs=_rngs()),
  lambda: models.DeepSADAutoencoder(
    8, input_shape=(28, 28, 1), norm="group", rngs=_rngs()
  ),
]


@pytest.mark.parametrize("make", _BN_FREE)
def test_bn_free_variants_have_no_batch_stats(make):
  net = _abstract(make)
  assert _paths(net, nnx.BatchStat) == []
  assert _paths(net, nnx.Param)


def test_batch_norm_variants_have_batch_stats():
  resnet32 = _abstract(lambda: models.CifarResNet(10, rngs=_rngs()))
  assert len(_paths(resnet32, nnx.BatchStat)) == 2 * 31  # mean, var per conv
  net = _abstract(lambda: models.SmallCNN(10, norm="batch", rngs=_rngs()))
  assert len(_paths(net, nnx.BatchStat)) == 2 * 3


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_deep_sad_networks_are_bias_free(norm, shape):
  ae = _abstract(
    lambda: models.DeepSADAutoencoder(32, input_shape=shape, norm=norm, rngs=_rngs())
  )
  for net in (ae.encoder, ae.decoder):
    names = _paths(net, nnx.Param)
    assert names and all(name.endswith("kernel") for name in names), names
  stats = _paths(ae.encoder, nnx.BatchStat)
  if norm == "batch":  # affine-free BatchNorm: running mean and var only
    assert len(stats) == 2 * len(ae.encoder.convs)
    assert ae.encoder.norms[0].epsilon == 1e-4
  else:
    assert stats == []


def test_deep_sad_encoder_maps_zero_to_zero():
  # No bias anywhere: a zero image has the zero representation (eval mode).
  enc = models.DeepSADEncoder(16, input_shape=(8, 8, 1), rngs=_rngs())
  enc.eval()
  np.testing.assert_array_equal(_forward(enc, jnp.zeros((2, 8, 8, 1))), 0.0)


# ---------------------------------------------------------------- train / eval


def test_batch_norm_train_and_eval_modes():
  net = models.SmallCNN(10, norm="batch", rngs=_rngs())
  x = _x((8, 8, 1), batch=4)
  x_other = x.at[1:].set(_x((8, 8, 1), batch=3, seed=1))  # same first example
  before = _snapshot(net, nnx.BatchStat)

  net.eval()
  eval_out = _forward(net, x)
  jax.tree.map(np.testing.assert_array_equal, _snapshot(net, nnx.BatchStat), before)
  # Eval mode: each example's output is independent of the rest of the batch.
  np.testing.assert_allclose(_forward(net, x_other)[0], eval_out[0], rtol=1e-6)

  net.train()
  train_out = _forward(net, x)
  after = _snapshot(net, nnx.BatchStat)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), after, before)
  assert all(jax.tree.leaves(changed))
  # Train mode normalises with batch statistics, so outputs depend on the batch.
  assert not np.allclose(train_out, eval_out)
  assert not np.allclose(_forward(net, x_other)[0], train_out[0])

  net.eval()
  frozen = _snapshot(net, nnx.BatchStat)
  _forward(net, x)
  jax.tree.map(np.testing.assert_array_equal, _snapshot(net, nnx.BatchStat), frozen)


def test_resnet_train_eval_switch():
  net = _abstract(lambda: models.CifarResNet(10, rngs=_rngs()))
  assert not net.blocks[0].norms[0].use_running_average  # built in train mode
  net.eval()
  assert net.stem_norm.use_running_average
  assert all(b.norms[0].use_running_average for b in net.blocks)
  net.train()
  assert not any(b.norms[1].use_running_average for b in net.blocks)


# ---------------------------------------------------------------- jitted training


def test_split_merge_grad_under_jit(resnet32_none):
  graphdef, params, rest = nnx.split(resnet32_none, nnx.Param, ...)

  def loss_fn(params, batch):  # per-example losses, (B,)
    m = nnx.merge(graphdef, params, rest, copy=True)
    logits = m(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  def mean_loss(params, batch):
    losses = loss_fn(params, batch)
    return losses.mean(), losses

  batch = {"x": _x((32, 32, 3)), "y": jnp.array([3, 7])}
  grad_fn = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))
  (loss, losses), grads = grad_fn(params, batch)
  assert losses.shape == (2,) and np.isfinite(loss)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  # SkipInit gains get gradient at init; the model itself is left untouched.
  assert float(jnp.abs(grads["blocks"][0]["skip_gain"][...])) > 0
  np.testing.assert_array_equal(resnet32_none.blocks[0].skip_gain[...], 0.0)
  # Per-example losses of a BN-free model do not depend on the rest of the batch.
  other = {"x": batch["x"].at[1].set(0.0), "y": batch["y"]}
  (_, other_losses), _ = grad_fn(params, other)
  np.testing.assert_allclose(other_losses[0], losses[0], rtol=1e-6)
  assert grad_fn._cache_size() == 1


def test_split_merge_grad_returns_batch_stats():
  net = models.SmallCNN(10, norm="batch", rngs=_rngs())
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)

  @jax.jit
  def step(params, rest, x, y):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return loss, nnx.state(m, nnx.BatchStat)

    return jax.grad(loss_fn, has_aux=True)(params)

  grads, new_stats = step(params, rest, _x((8, 8, 1), batch=4), jnp.arange(4))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert not np.allclose(new_stats["norms"][0]["mean"][...], 0.0)
  np.testing.assert_array_equal(net.norms[0].mean[...], 0.0)  # model untouched


# ---------------------------------------------------------------- factory


@pytest.mark.parametrize(
  "name, shape, cls, norm",
  [
    ("small_cnn", (8, 8, 1), models.SmallCNN, "none"),
    ("SMALL_CNN", (32, 32, 3), models.SmallCNN, "none"),
    ("resnet32", (32, 32, 3), models.CifarResNet, "batch"),
    ("resnet20", (28, 28, 1), models.CifarResNet, "batch"),
    ("deep_sad", (28, 28, 1), models.DeepSADEncoder, "batch"),
  ],
)
def test_create_model(name, shape, cls, norm):
  make = lambda: models.create_model(
    name, num_classes=5, input_shape=shape, rngs=_rngs()
  )
  net = _abstract(make)
  assert type(net) is cls and net.norm == norm
  if name != "resnet32":  # (its output shape is tested above)
    assert _output(make, shape).shape == (2, 5)
  if name.startswith("resnet"):
    assert len(net.blocks) == (int(name[6:]) - 2) // 2


def test_create_model_norm():
  net = _abstract(
    lambda: models.create_model(
      "small_cnn", num_classes=3, input_shape=(8, 8, 1), norm="batch", rngs=_rngs()
    )
  )
  assert net.norm == "batch" and _paths(net, nnx.BatchStat)


def test_create_model_errors():
  with pytest.raises(ValueError, match=r"resnet32.*small_cnn"):
    models.create_model("vgg16", num_classes=10, input_shape=(32, 32, 3), rngs=_rngs())
  with pytest.raises(ValueError, match="norm"):
    models.create_model(
      "small_cnn", num_classes=10, input_shape=(8, 8, 1), norm="layer", rngs=_rngs()
    )
  with pytest.raises(ValueError, match="input_shape"):
    models.create_model("small_cnn", num_classes=10, input_shape=(8, 8), rngs=_rngs())
  with pytest.raises(ValueError, match="norm"):
    models.SmallCNN(10, norm="batchnorm", rngs=_rngs())
  assert set(models.MODEL_NAMES) >= {"resnet32", "small_cnn", "deep_sad"}
