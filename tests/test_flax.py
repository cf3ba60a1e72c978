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


# --- Dropout: every pass of a step draws the clean pass's masks -------------


class DropoutNet(nnx.Module):
  """Two dropout layers on one RNG stream: a pass draws two keys."""

  def __init__(self, rngs: nnx.Rngs):
    self.drop_in = nnx.Dropout(0.2, rngs=rngs)
    self.hidden = nnx.Linear(5, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.hidden(self.drop_in(x)))))


class ScannedDropoutNet(nnx.Module):
  """Three dropout blocks stacked by nnx.vmap and run by nnx.scan (a
  transformer's layout): the RNG stream is used inside a JAX transform."""

  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(5, 8, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return nnx.Sequential(
        nnx.Linear(8, 8, rngs=rngs), nnx.relu, nnx.Dropout(0.5, rngs=rngs)
      )

    self.blocks = blocks(rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.out(run(self.inp(x), self.blocks))


def tail_and_head_grads(loss_fn, params, batch):
  t = MASK_FN(batch["y"]).astype(jnp.float32)
  size = t.shape[0]
  tail = jax.grad(lambda p: jnp.sum(t * loss_fn(p, batch)) / size)(params)
  head = jax.grad(lambda p: jnp.sum((1 - t) * loss_fn(p, batch)) / size)(params)
  return tail, head


@pytest.mark.parametrize("net", [DropoutNet, ScannedDropoutNet])
@pytest.mark.parametrize("built", ["before", "after"])
def test_nnx_loss_fn_replays_the_clean_pass_dropout(built, net):
  """g_head + g_T(w) is the clean gradient, whenever the loss_fn is built."""
  model = net(nnx.Rngs(0))
  batch = BATCHES[0]

  @nnx.jit
  def check(model, batch):
    if built == "before":
      loss_fn = imbsam_jax.flax.nnx_loss_fn(model, nnx_per_example_loss)
    clean = lambda m: nnx_per_example_loss(m, batch).mean()
    _, grads = nnx.value_and_grad(clean)(model)
    if built == "after":
      loss_fn = imbsam_jax.flax.nnx_loss_fn(model, nnx_per_example_loss)
    params = nnx.state(model, nnx.Param)
    tail, head = tail_and_head_grads(loss_fn, params, batch)
    return grads, jax.tree.map(jnp.add, tail, head), tail

  grads, replayed, tail = check(model, batch)
  chex.assert_trees_all_close(replayed, grads, atol=1e-6, rtol=1e-6)
  assert optax.tree.norm(tail) > 0
  # ... and the next step's clean pass draws new masks.
  next_grads, _, _ = check(model, batch)
  assert optax.tree.norm(jax.tree.map(jnp.subtract, next_grads, grads)) > 1e-3


def dropout_reference(rho, batches):
  """ImbSAM on DropoutNet from pure functions: every pass of a step merges the
  state the step started from, so all draw the same dropout masks."""
  graphdef, params, rest = nnx.split(DropoutNet(nnx.Rngs(0)), nnx.Param, ...)

  def pure_loss(params, rest, batch):
    m = nnx.merge(graphdef, params, rest, copy=True)
    return nnx_per_example_loss(m, batch), nnx.state(m, nnx.Not(nnx.Param))

  base = optax.sgd(0.1, momentum=0.9)
  base_state = base.init(params)
  for batch in batches:
    loss_fn = lambda p, b, r=rest: pure_loss(p, r, b)[0]
    if rho:
      g = reference_grads(loss_fn, params, batch, rho)
    else:
      g = jax.grad(lambda p, b=batch, f=loss_fn: f(p, b).mean())(params)
    _, rest = pure_loss(params, rest, batch)  # the clean pass advances the RNG
    updates, base_state = base.update(g, base_state, params)
    params = optax.apply_updates(params, updates)
  return as_pure(params)


def split_state_step(graphdef, tx):
  """A pure split-state step: the clean pass on ``rest``, whose new state it
  returns; the tail passes on the ``rest`` the clean pass started from."""

  @jax.jit
  def step(params, rest, opt_state, batch):
    clean = imbsam_jax.flax.nnx_loss_fn(
      graphdef, nnx_per_example_loss, rest, with_state=True
    )
    mean_loss = lambda p: (lambda out: (out[0].mean(), out[1]))(clean(p, batch))
    (_, new_rest), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    loss_fn = imbsam_jax.flax.nnx_loss_fn(graphdef, nnx_per_example_loss, rest)
    updates, opt_state = tx.update(
      grads, opt_state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    return optax.apply_updates(params, updates), new_rest, opt_state

  return step


@pytest.mark.parametrize("rho", [0.1, 0.0])
def test_nnx_optimizer_with_dropout_matches_reference(rho):
  """nnx.Optimizer (README pattern) and a pure split-state step; rho = 0 is the
  base optimizer on the clean gradient."""
  tx = imbsam_jax.imbsam(optax.sgd(0.1, momentum=0.9), rho, MASK_FN)
  model = DropoutNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params, rest = nnx.split(DropoutNet(nnx.Rngs(0)), nnx.Param, ...)

  pure_step = split_state_step(graphdef, tx)
  opt_state = tx.init(params)
  for batch in BATCHES:
    nnx_train_step(model, optimizer, batch)
    params, rest, opt_state = pure_step(params, rest, opt_state, batch)
  want = dropout_reference(rho, BATCHES)
  got = as_pure(nnx.state(model, nnx.Param))
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(as_pure(params), want, atol=1e-5, rtol=1e-5)


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


class LinenDropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


def linen_dropout_loss(net, params, stats, batch, key):
  """Per-example losses in training mode; the dropout key passed explicitly."""
  logits, mutated = net.apply(
    {"params": params, "batch_stats": stats},
    batch["x"],
    train=True,
    rngs={"dropout": key},
    mutable=["batch_stats"],
  )
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return losses, mutated["batch_stats"]


@pytest.mark.parametrize("rho", [0.1, 0.0])
def test_linen_train_state_with_dropout_rngs(rho):
  """One key per step, passed to the clean pass and to loss_fn: every pass
  draws the same masks; rho = 0 is the base optimizer."""
  net = LinenDropoutNet()
  variables = net.init(jax.random.key(0), BATCHES[0]["x"], train=False)
  tx = imbsam_jax.imbsam(optax.sgd(0.1, momentum=0.9), rho, MASK_FN)
  state = TrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables["batch_stats"],
  )

  @jax.jit
  def step(state, batch, key):
    loss = lambda p, b: linen_dropout_loss(net, p, state.batch_stats, b, key)
    mean_loss = lambda p: (lambda out: (out[0].mean(), out[1]))(loss(p, batch))
    (_, stats), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    return state.apply_gradients(
      grads=grads,
      batch_stats=stats,
      loss_fn=lambda p, b: loss(p, b)[0],
      batch=batch,
      labels=batch["y"],
    )

  params, stats = variables["params"], variables["batch_stats"]
  base = optax.sgd(0.1, momentum=0.9)
  base_state = base.init(params)
  for i, batch in enumerate(BATCHES):
    key = jax.random.fold_in(jax.random.key(1), i)
    state = step(state, batch, key)
    loss_fn = lambda p, b, s=stats, k=key: linen_dropout_loss(net, p, s, b, k)[0]
    if rho:
      g = reference_grads(loss_fn, params, batch, rho)
    else:
      g = jax.grad(lambda p, b=batch, f=loss_fn: f(p, b).mean())(params)
    stats = linen_dropout_loss(net, params, stats, batch, key)[1]
    updates, base_state = base.update(g, base_state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(state.params, params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.batch_stats, stats, atol=1e-6)


def test_nnx_freezing_with_the_wrt_filter():
  """NNX freezes through wrt: frozen parameters sit in rest, so nnx_loss_fn
  neither perturbs them nor nnx.Optimizer updates them; equals imbsam's
  trainable= on the split state."""
  head = nnx.All(nnx.Param, nnx.PathContains("out"))
  model = NNXNet(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
  hidden = jax.tree.map(jnp.copy, as_pure(params)["hidden"])
  tx = imbsam_jax.imbsam(optax.adam(0.05), 0.1, MASK_FN)
  optimizer = nnx.Optimizer(model, tx, wrt=head)

  @nnx.jit
  def step(model, optimizer, batch):
    loss_fn = imbsam_jax.flax.nnx_loss_fn(model, nnx_per_example_loss, wrt=head)
    grads = nnx.grad(
      lambda m: nnx_per_example_loss(m, batch).mean(), argnums=nnx.DiffState(0, head)
    )(model)
    optimizer.update(model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])

  frozen_tx = imbsam_jax.imbsam(
    optax.adam(0.05),
    0.1,
    MASK_FN,
    trainable={"hidden": False, "norm": False, "out": True},
  )

  pure_step = split_state_step(graphdef, frozen_tx)
  opt_state = frozen_tx.init(params)
  for batch in BATCHES:
    step(model, optimizer, batch)
    params, rest, opt_state = pure_step(params, rest, opt_state, batch)
  got = as_pure(nnx.state(model, nnx.Param))
  chex.assert_trees_all_equal(got["hidden"], hidden)
  chex.assert_trees_all_close(got, as_pure(params), atol=1e-5, rtol=1e-5)
  assert optax.tree.norm(optax.tree.sub(got["out"], as_pure(params)["out"])) < 1e-5
