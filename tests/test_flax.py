"""ImbSAM inside Flax training steps: NNX (nnx.Optimizer) and Linen (TrainState)."""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import imbsam_jax

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
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):  # adversarial passes: pure, BatchNorm updates dropped
    return nnx_per_example_loss(nnx.merge(graphdef, params, rest, copy=True), batch)

  def mean_loss(model):  # the clean pass updates the BatchNorm statistics
    return nnx_per_example_loss(model, batch).mean()

  loss, grads = nnx.value_and_grad(mean_loss)(model)
  optimizer.update(model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
  return loss


def test_nnx_optimizer_matches_reference_and_keeps_clean_batch_stats():
  model = NNXNet(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Copies: the split state shares its arrays' Variables with the model.
  params, rest = jax.tree.map(jnp.copy, (nnx.as_pure(params), nnx.as_pure(rest)))
  tx = imbsam_jax.imbsam(optax.sgd(0.1, momentum=0.9), 0.1, MASK_FN)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # Reference: pure functions on the split state.
  def pure_loss(params, rest, batch):
    m = nnx.merge(graphdef, params, rest, copy=True)
    losses = nnx_per_example_loss(m, batch)
    return losses, nnx.as_pure(nnx.state(m, nnx.BatchStat))

  base = optax.sgd(0.1, momentum=0.9)
  base_state = base.init(params)
  for batch in BATCHES:
    nnx_train_step(model, optimizer, batch)
    g = reference_grads(lambda p, b, r=rest: pure_loss(p, r, b)[0], params, batch, 0.1)
    _, rest = pure_loss(params, rest, batch)  # the clean pass's statistics
    updates, base_state = base.update(g, base_state, params)
    params = optax.apply_updates(params, updates)

  chex.assert_trees_all_close(
    nnx.as_pure(nnx.state(model, nnx.Param)), params, atol=1e-5, rtol=1e-5
  )
  chex.assert_trees_all_close(
    nnx.as_pure(nnx.state(model, nnx.BatchStat)), rest, atol=1e-6
  )
  assert int(optimizer.step[...]) == len(BATCHES)


# --- Linen ------------------------------------------------------------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(nn.relu(x))


class TrainState(train_state.TrainState):
  batch_stats: Any


@jax.jit
def linen_train_step(state, batch):
  """TrainState.apply_gradients does not forward kwargs: call tx.update."""

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
  updates, opt_state = state.tx.update(
    grads,
    state.opt_state,
    state.params,
    loss_fn=loss_fn,
    batch=batch,
    labels=batch["y"],
  )
  state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    batch_stats=stats,
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
