"""Tests of the shared training step (examples/shared/training.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import imbsam_jax
from shared import training

COUNTS = np.array([200, 40, 6])
MASK_FN = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def per_example_loss(model, batch):
  logits = model(batch["image"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return losses, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def make_batch(seed, size=12):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 3, size=size)
  label[:2] = 2
  return {
    "image": jnp.asarray(rng.normal(size=(size, 6)), jnp.float32),
    "label": jnp.asarray(label, jnp.int32),
  }


BATCHES = [make_batch(s) for s in range(3)]


def run(method, tx, **step_kwargs):
  graphdef, state = training.init_train_state(Net(nnx.Rngs(0)), tx)
  step = jax.jit(
    training.make_train_step(graphdef, per_example_loss, method, tx, **step_kwargs)
  )
  for i, batch in enumerate(BATCHES):
    state, metrics = step(state, batch, jax.random.key(i))
  return graphdef, state, metrics


def manual(grad_transform):
  """Reference loop: pure functions, the clean pass's BatchNorm statistics."""
  graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)

  def loss(p, r, b):
    m = nnx.merge(graphdef, p, r, copy=True)
    return per_example_loss(m, b)[0], nnx.state(m, nnx.BatchStat)

  base = optax.sgd(0.1, momentum=0.9)
  opt_state = base.init(params)
  for batch in BATCHES:
    pure = lambda p, b, r=rest: loss(p, r, b)[0]
    g = grad_transform(pure, params, batch)
    _, rest = loss(params, rest, batch)
    updates, opt_state = base.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, rest


def sam_grads(pure, params, batch, rho=0.1):
  g = jax.grad(lambda p: pure(p, batch).mean())(params)
  e = jax.tree.map(lambda x: rho * x / optax.tree.norm(g), g)
  return jax.grad(lambda p: pure(p, batch).mean())(jax.tree.map(jnp.add, params, e))


def imbsam_grads(pure, params, batch, rho=0.1):
  t = MASK_FN(batch["label"]).astype(jnp.float32)
  n = t.shape[0]
  tail = lambda p: jnp.sum(t * pure(p, batch)) / n
  head = lambda p: jnp.sum((1 - t) * pure(p, batch)) / n
  g = jax.grad(tail)(params)
  e = jax.tree.map(lambda x: rho * x / optax.tree.norm(g), g)
  g_adv = jax.grad(tail)(jax.tree.map(jnp.add, params, e))
  return jax.tree.map(jnp.add, jax.grad(head)(params), g_adv)


def base_tx():
  return optax.sgd(0.1, momentum=0.9)


@pytest.mark.parametrize(
  "method, kwargs, reference",
  [
    ("base", {}, lambda pure, p, b: jax.grad(lambda q: pure(q, b).mean())(p)),
    ("sam", {}, sam_grads),
    ("imbsam", {"tail_mask_fn": MASK_FN, "path": "gathered"}, imbsam_grads),
    ("imbsam", {"tail_mask_fn": MASK_FN}, imbsam_grads),
  ],
  ids=["base", "sam", "imbsam-own-tail-passes", "imbsam-one-forward"],
)
def test_step_matches_reference(method, kwargs, reference):
  tx = training.make_optimizer(method, base_tx(), rho=0.1, tail_mask_fn=MASK_FN)
  _, state, metrics = run(method, tx, **kwargs)
  want_params, want_stats = manual(reference)
  chex.assert_trees_all_close(
    nnx.as_pure(state.params), nnx.as_pure(want_params), atol=1e-5, rtol=1e-5
  )
  chex.assert_trees_all_close(
    nnx.as_pure(state.model_state), nnx.as_pure(want_stats), atol=1e-6
  )
  assert int(state.step) == len(BATCHES)
  assert set(metrics) >= {"loss", "accuracy"}
  if method == "imbsam":
    want = float(jnp.mean(BATCHES[-1]["label"] == 2))
    assert float(metrics["tail_fraction"]) == pytest.approx(want)


def test_make_optimizer_errors():
  with pytest.raises(ValueError, match="method"):
    training.make_optimizer("adam", base_tx())
  with pytest.raises(ValueError, match="tail_mask_fn"):
    training.make_optimizer("imbsam", base_tx())


def test_random_crop_flip():
  images = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
  out = training.random_crop_flip(jax.random.key(3), images, padding=2)
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(2):  # each output is a crop of the padded image, maybe flipped
    found = any(
      np.array_equal(np.asarray(out[i]), c)
      for dy in range(5)
      for dx in range(5)
      for c in (
        padded[i, dy : dy + 6, dx : dx + 6],
        padded[i, dy : dy + 6, dx : dx + 6][:, ::-1],
      )
    )
    assert found
  same = training.random_crop_flip(jax.random.key(3), images, padding=2)
  chex.assert_trees_all_equal(out, same)


def test_sharded_step_on_local_devices():
  """Data-parallel over whatever devices there are (one CPU here)."""
  mesh = training.data_parallel_mesh()
  tx = training.make_optimizer("imbsam", base_tx(), rho=0.1, tail_mask_fn=MASK_FN)
  graphdef, state = training.init_train_state(Net(nnx.Rngs(0)), tx)
  state = training.replicate(state, mesh)
  step = training.make_train_step(
    graphdef, per_example_loss, "imbsam", tx, tail_mask_fn=MASK_FN
  )
  step = jax.jit(step)
  batch = training.shard_batch(jax.tree.map(np.asarray, BATCHES[0]), mesh)
  state, metrics = step(state, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))


class GroupNet(Net):
  """Net with GroupNorm: the fast path is exact."""

  def __init__(self, rngs):
    super().__init__(rngs)
    self.norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)


def test_capacity_steps_equal_the_exact_step_for_every_tail_count():
  """A step per capacity, picked on the host: exact whether the batch's tail
  fits k (8), needs 2k or the full batch; each capacity compiles once."""
  batch_size, capacity = 24, 8
  mesh = training.data_parallel_mesh(jax.devices()[:1])

  def build(k):
    fast = {} if k is None else {"tail_capacity": k, "overflow": "nan"}
    tx = training.make_optimizer(
      "imbsam", base_tx(), rho=0.1, tail_mask_fn=MASK_FN, **fast
    )
    graphdef, state = training.init_train_state(GroupNet(nnx.Rngs(0)), tx)
    path = "exact" if k is None else "gathered"
    step = training.make_train_step(
      graphdef, per_example_loss, "imbsam", tx, tail_mask_fn=MASK_FN, path=path
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, out_shardings=replicated), training.replicate(state, mesh)

  tail = imbsam_jax.tail_classes(COUNTS, eta=20)
  steps = training.CapacitySteps(
    lambda k: build(k)[0], lambda b: tail[b["label"]], capacity, batch_size
  )
  exact, state = build(None)
  rng = np.random.default_rng(0)
  batches = []
  for num_tail in (0, 8, 9, 16, 17, 24):
    label = rng.integers(0, 2, size=batch_size)
    label[rng.permutation(batch_size)[:num_tail]] = 2
    image = rng.normal(size=(batch_size, 6)).astype(np.float32)
    batches.append({"image": image, "label": label.astype(np.int32)})
  key = jax.random.key(0)
  want, _, _ = training.train_steps(exact, state, batches, mesh, key)
  got, sums, count = training.train_steps(steps, state, batches, mesh, key)
  assert count == 6 and steps.capacities == [8, 16, 24]
  assert steps.compiles() == 3
  chex.assert_trees_all_close(got.params, want.params, atol=2e-5, rtol=2e-5)
  assert np.isfinite(float(sums["loss"]))
