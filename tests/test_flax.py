"""ImbSAM inside Flax training steps: NNX (nnx.Optimizer) and Linen (TrainState)."""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import imbsam_jax
import imbsam_jax.flax

# nnx.as_pure is Flax 0.12.7+; nnx.pure before (deprecated since).
as_pure = getattr(nnx, "as_pure", None) or nnx.pure

COUNTS = np.array([300, 60, 8])
MASK_FN = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)


def make_batch(seed, size=12):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, size=size)
  y[:2] = 2
  return {
    "x": jnp.asarray(rng.normal(size=(size, 5)), jnp.float32),
    "y": jnp.asarray(y, jnp.int32),
  }


BATCHES = [make_batch(s) for s in range(3)]


def reference_grads(loss_fn, params, batch, rho):
  """ImbSAM gradient written out from the paper's objective."""
  t = MASK_FN(batch["y"]).astype(jnp.float32)
  size = t.shape[0]
  tail = lambda p: jnp.sum(t * loss_fn(p, batch)) / size
  head = lambda p: jnp.sum((1 - t) * loss_fn(p, batch)) / size
  g_tail = jax.grad(tail)(params)
  e = jax.tree.map(lambda g: rho * g / optax.tree.norm(g_tail), g_tail)
  g_adv = jax.grad(tail)(jax.tree.map(jnp.add, params, e))
  return jax.tree.map(jnp.add, jax.grad(head)(params), g_adv)


# --- NNX --------------------------------------------------------------------


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def nnx_per_example_loss(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


@nnx.jit
def nnx_train_step(model, optimizer, batch):
  """The pattern shown in the README."""
  # Adversarial passes: pure, their BatchNorm updates dropped.
  loss_fn = imbsam_jax.flax.nnx_loss_fn(model, nnx_per_example_loss)

  def mean_loss(model):  # the clean pass updates the BatchNorm statistics
    return nnx_per_example_loss(model, batch).mean()

  loss, grads = nnx.value_and_grad(mean_loss)(model)
  optimizer.update(model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
  return loss


def test_nnx_optimizer_matches_reference_and_keeps_clean_batch_stats():
  model = NNXNet(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Copies: the split state shares its arrays' Variables with the model.
  params, rest = jax.tree.map(jnp.copy, (as_pure(params), as_pure(rest)))
  tx = imbsam_jax.imbsam(optax.sgd(0.1, momentum=0.9), 0.1, MASK_FN)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # Reference: pure functions on the split state.
  def pure_loss(params, rest, batch):
    m = nnx.merge(graphdef, params, rest, copy=True)
    losses = nnx_per_example_loss(m, batch)
    return losses, as_pure(nnx.state(m, nnx.BatchStat))

  base = optax.sgd(0.1, momentum=0.9)
  base_state = base.init(params)
  for batch in BATCHES:
    nnx_train_step(model, optimizer, batch)
    g = reference_grads(lambda p, b, r=rest: pure_loss(p, r, b)[0], params, batch, 0.1)
    _, rest = pure_loss(params, rest, batch)  # the clean pass's statistics
    updates, base_state = base.update(g, base_state, params)
    params = optax.apply_updates(params, updates)

  chex.assert_trees_all_close(
    as_pure(nnx.state(model, nnx.Param)), params, atol=1e-5, rtol=1e-5
  )
  chex.assert_trees_all_close(as_pure(nnx.state(model, nnx.BatchStat)), rest, atol=1e-6)
  assert int(optimizer.step[...]) == len(BATCHES)


def nnx_loss_and_accuracy(model, batch):
  logits = model(batch["x"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return losses, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def test_nnx_loss_fn_pure_step_matches_optimizer():
  """graphdef + rest, has_aux and with_state: a pure step with tail_grads."""
  tx = imbsam_jax.imbsam(optax.sgd(0.1, momentum=0.9), 0.1, MASK_FN)
  model = NNXNet(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @jax.jit
  def step(params, rest, opt_state, batch):
    clean = imbsam_jax.flax.nnx_loss_fn(
      graphdef, nnx_loss_and_accuracy, rest, has_aux=True, with_state=True
    )
    (loss, (metrics, rest)), grads, tail_grads = imbsam_jax.value_and_tail_grads(
      clean, params, batch, MASK_FN(batch["y"]), has_aux=True
    )
    updates, opt_state = tx.update(
      grads,
      opt_state,
      params,
      loss_fn=lambda p, b: clean(p, b)[0],
      batch=batch,
      labels=batch["y"],
      tail_grads=tail_grads,
    )
    return optax.apply_updates(params, updates), rest, opt_state, loss, metrics

  opt_state = tx.init(params)
  for batch in BATCHES:
    want_loss = nnx_train_step(model, optimizer, batch)
    params, rest, opt_state, loss, metrics = step(params, rest, opt_state, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert 0 <= float(metrics["accuracy"]) <= 1
  assert step._cache_size() == 1
  chex.assert_trees_all_close(
    as_pure(params), as_pure(nnx.state(model, nnx.Param)), atol=1e-6, rtol=1e-6
  )
  chex.assert_trees_all_close(
    as_pure(rest), as_pure(nnx.state(model, nnx.Not(nnx.Param))), atol=1e-6
  )


def test_nnx_loss_fn_bad_arguments():
  model = NNXNet(nnx.Rngs(0))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="rest"):
    imbsam_jax.flax.nnx_loss_fn(graphdef, nnx_per_example_loss)
  with pytest.raises(TypeError, match="graphdef"):
    imbsam_jax.flax.nnx_loss_fn(model, nnx_per_example_loss, rest)


# --- Linen ------------------------------------------------------------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(nn.relu(x))


class TrainState(imbsam_jax.flax.TrainState):
  batch_stats: Any


@jax.jit
def linen_train_step(state, batch):
  """The pattern shown in the README."""

  def apply(params, batch):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, mutated = state.apply_fn(
      variables, batch["x"], train=True, mutable=["batch_stats"]
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return losses, mutated["batch_stats"]

  def loss_fn(params, batch):  # adversarial passes: statistics discarded
    return apply(params, batch)[0]

  def mean_loss(params):
    losses, stats = apply(params, batch)
    return losses.mean(), stats

  (loss, stats), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
  state = state.apply_gradients(
    grads=grads, batch_stats=stats, loss_fn=loss_fn, batch=batch, labels=batch["y"]
  )
  return state, loss


def test_linen_train_state_matches_reference():
  # (Not Adam: the bias before BatchNorm has a ~0 gradient that Adam would
  # rescale to pure rounding noise.)
  net = LinenNet()
  variables = net.init(jax.random.key(0), BATCHES[0]["x"], train=False)
  tx = imbsam_jax.imbsam(optax.sgd(0.1, nesterov=True, momentum=0.9), 0.1, MASK_FN)
  state = TrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables["batch_stats"],
  )
  params, stats = variables["params"], variables["batch_stats"]
  base = optax.sgd(0.1, nesterov=True, momentum=0.9)
  base_state = base.init(params)
  for batch in BATCHES:
    state, _ = linen_train_step(state, batch)

    def loss_fn(p, b, stats=stats):
      logits, _ = net.apply(
        {"params": p, "batch_stats": stats},
        b["x"],
        train=True,
        mutable=["batch_stats"],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

    _, mutated = net.apply(
      {"params": params, "batch_stats": stats},
      batch["x"],
      train=True,
      mutable=["batch_stats"],
    )
    g = reference_grads(loss_fn, params, batch, 0.1)
    updates, base_state = base.update(g, base_state, params)
    params = optax.apply_updates(params, updates)
    stats = mutated["batch_stats"]

  chex.assert_trees_all_close(state.params, params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.batch_stats, stats, atol=1e-6)
  assert int(state.step) == len(BATCHES)
  assert state.tx is tx


def test_linen_train_state_routes_keywords():
  """Fields are replaced; every other keyword reaches tx.update, and only there."""
  seen = []

  def update(updates, state, params=None, **extra_args):
    seen.append(extra_args)
    return updates, state

  tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
  state = TrainState.create(
    apply_fn=None, params={"w": jnp.ones(2)}, tx=tx, batch_stats={"m": jnp.zeros(2)}
  )
  new = state.apply_gradients(
    grads={"w": jnp.ones(2)}, batch_stats={"m": jnp.ones(2)}, value=3.0
  )
  assert seen == [{"value": 3.0}]
  assert new.tx is tx and int(new.step) == 1
  chex.assert_trees_all_close(new.params, {"w": jnp.full(2, 2.0)})
  chex.assert_trees_all_close(new.batch_stats, {"m": jnp.ones(2)})
  new.apply_gradients(grads={"w": jnp.ones(2)})  # no extra keywords: as in Flax
  assert seen[-1] == {}
