"""ImbSAM's fast path on BatchNorm networks: anchored tail statistics.

The tail passes of ``imbsam_jax.flax.nnx_loss_fn(..., clean_stats=...)`` and
``linen_apply_with_clean_stats`` normalize each BatchNorm input with the
statistics of its tail rows, mapped onto the clean pass's batch statistics
(see ``imbsam_jax/flax.py``). Checked here: at the clean point they are the
clean pass, they need the tail rows only, ``rho = 0`` is the base optimizer,
a network without BatchNorm gets the exact step, the helpers work in
``nnx.Optimizer`` under ``nnx.jit`` and in a Linen ``TrainState`` step, and
the approximate ImbSAM gradient stays close to the exact one.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import imbsam_jax
import imbsam_jax.flax

# nnx.as_pure is Flax 0.12.7+; nnx.pure before (deprecated since).
as_pure = getattr(nnx, "as_pure", None) or nnx.pure

NUM_CLASSES = 3
COUNTS = np.array([300, 60, 8])  # class 2 is the tail: 2% of the training set
MASK_FN = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)
BATCH = 16  # tail_capacity="auto": k = 8 (< 16, the gathered passes)


def tail_mask(batch):
  return MASK_FN(batch["y"])


def make_batch(seed, num_tail=3, size=BATCH, side=6):
  """Images whose class shifts their mean; the first ``num_tail`` rows are tail."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES - 1, size=size)
  y[:num_tail] = NUM_CLASSES - 1
  rng.shuffle(y)
  x = rng.normal(size=(size, side, side, 3)) + 0.5 * y[:, None, None, None]
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)}


BATCHES = [make_batch(s, n) for s, n in [(0, 3), (1, 1), (2, 4), (3, 0), (4, 2)]]


# --- NNX models ----------------------------------------------------------------


def make_norm(norm, channels, rngs):
  if norm == "batch":
    return nnx.BatchNorm(channels, momentum=0.8, rngs=rngs)
  return nnx.GroupNorm(channels, num_groups=2, rngs=rngs)


class Block(nnx.Module):
  """conv-norm-relu-conv-norm plus a (1x1 conv when the width changes) shortcut."""

  def __init__(self, cin, cout, stride, norm, rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
    self.norm1 = make_norm(norm, cout, rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = make_norm(norm, cout, rngs)
    self.skip = (
      nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
      if stride != 1 or cin != cout
      else None
    )

  def __call__(self, x):
    y = self.norm2(self.conv2(nnx.relu(self.norm1(self.conv1(x)))))
    return nnx.relu(y + (x if self.skip is None else self.skip(x)))


class TinyResNet(nnx.Module):
  """A small CIFAR-style ResNet: stem, two residual blocks, pooling, linear head."""

  def __init__(self, norm="batch", width=4, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_norm = make_norm(norm, width, rngs)
    self.block1 = Block(width, width, 1, norm, rngs)
    self.block2 = Block(width, 2 * width, 2, norm, rngs)
    self.head = nnx.Linear(2 * width, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_norm(self.stem(x)))
    x = self.block2(self.block1(x))
    return self.head(x.mean((1, 2)))


def per_example_loss(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def init_params(cls=TinyResNet, **kwargs):
  """``(graphdef, params, rest)`` with concrete copies of the arrays."""
  graphdef, params, rest = nnx.split(cls(**kwargs), nnx.Param, ...)
  return graphdef, *jax.tree.map(jnp.copy, (as_pure(params), as_pure(rest)))


def make_pure_step(graphdef, tx, *, anchored=True, jit=True):
  """The functional step: clean pass, then tx.update with ImbSAM's arguments.

  ``anchored=True``: clean statistics and anchored tail passes; ``False``: the
  plain training-mode ``loss_fn`` (the exact step with tail_capacity=None).
  """

  def step(params, rest, opt_state, batch):
    clean = clean_loss_fn(graphdef, rest)

    def mean_loss(p):
      losses, extra = clean(p, batch)
      return jnp.mean(losses), extra

    (loss, (new_rest, stats)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
      params
    )
    if anchored:
      loss_fn = imbsam_jax.flax.nnx_loss_fn(
        graphdef, per_example_loss, rest, tail_mask=tail_mask, clean_stats=stats
      )
    else:
      loss_fn = imbsam_jax.flax.nnx_loss_fn(graphdef, per_example_loss, rest)
    updates, opt_state = tx.update(
      grads, opt_state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    return optax.apply_updates(params, updates), as_pure(new_rest), opt_state, loss

  return jax.jit(step) if jit else step


def trajectory(graphdef, params, rest, tx, batches, **kwargs):
  """``(params, rest)`` after each batch (one compiled step for all), and the step."""
  step = make_pure_step(graphdef, tx, **kwargs)
  opt_state, out = tx.init(params), []
  for batch in batches:
    params, rest, opt_state, _ = step(params, rest, opt_state, batch)
    out.append((params, rest))
  return out, step


def run_pure(graphdef, params, rest, tx, batches, **kwargs):
  """``(params, rest, step)`` after the last batch."""
  out, step = trajectory(graphdef, params, rest, tx, batches, **kwargs)
  return (*out[-1], step)


def clean_loss_fn(graphdef, rest):
  """The clean pass's loss: ``(losses, (running-average state, clean statistics))``."""
  return imbsam_jax.flax.nnx_loss_fn(
    graphdef,
    per_example_loss,
    rest,
    with_state=True,
    tail_mask=tail_mask,
    with_clean_stats=True,
  )


def clean_pass(graphdef, params, rest, batch):
  """``(losses, running-average state, clean statistics)`` of a clean pass."""
  losses, (state, stats) = jax.jit(clean_loss_fn(graphdef, rest))(params, batch)
  return losses, state, stats


def take(tree, rows):
  return jax.tree.map(lambda x: x[rows], tree)


def distance(a, b):
  return float(jnp.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]))


def cosine(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.dot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b))


# --- the statistics -------------------------------------------------------------


def test_clean_pass_records_the_batch_statistics():
  """The clean pass is a plain training pass (losses, running averages) and
  records the batch's and the tail rows' statistics."""
  graphdef, params, rest = init_params()
  batch = BATCHES[0]
  losses, state, stats = clean_pass(graphdef, params, rest, batch)
  keys = {"stem_norm", "block1/norm1", "block1/norm2", "block2/norm1", "block2/norm2"}
  assert set(stats) == keys
  assert set(stats["stem_norm"]) == {"mean", "var", "tail_mean", "tail_var"}

  model = nnx.merge(graphdef, params, rest, copy=True)  # a plain training pass
  np.testing.assert_allclose(
    losses, per_example_loss(model, batch), rtol=1e-5, atol=1e-6
  )
  chex.assert_trees_all_close(
    as_pure(nnx.state(nnx.merge(graphdef, params, state), nnx.BatchStat)),
    as_pure(nnx.state(model, nnx.BatchStat)),
    atol=1e-6,
  )
  stem = nnx.merge(graphdef, params, rest).stem(batch["x"])
  rows = np.asarray(tail_mask(batch))
  axes = (0, 1, 2)
  layer = stats["stem_norm"]
  np.testing.assert_allclose(layer["mean"], stem.mean(axes), atol=1e-6)
  np.testing.assert_allclose(layer["var"], stem.var(axes), atol=1e-5)
  np.testing.assert_allclose(layer["tail_mean"], stem[rows].mean(axes), atol=1e-6)
  np.testing.assert_allclose(layer["tail_var"], stem[rows].var(axes), atol=1e-5)


def test_tail_pass_at_w_is_the_clean_pass_and_needs_the_tail_rows_only():
  """At w the map is the identity: the tail rows' losses are the clean pass's,
  on the full batch and on gathered rows. Away from w, too, changing the head
  rows leaves the tail rows' losses alone, and a channel's scale (the stem's
  kernel times 3) is normalized away, as in training mode."""
  graphdef, params, rest = init_params()
  batch = BATCHES[0]
  losses, _, stats = clean_pass(graphdef, params, rest, batch)
  tail_loss = jax.jit(
    imbsam_jax.flax.nnx_loss_fn(
      graphdef, per_example_loss, rest, tail_mask=tail_mask, clean_stats=stats
    )
  )
  rows = np.asarray(tail_mask(batch))
  num_tail = int(rows.sum())
  np.testing.assert_allclose(tail_loss(params, batch)[rows], losses[rows], rtol=1e-5)
  order = np.argsort(~rows, kind="stable")[:8]  # tail rows first, as imbsam does
  np.testing.assert_allclose(
    tail_loss(params, take(batch, order))[:num_tail],
    losses[order][:num_tail],
    rtol=1e-5,
  )

  flat, unravel = ravel_pytree(params)
  noise = jax.random.normal(jax.random.key(1), flat.shape)
  moved = unravel(flat + 0.05 * noise)
  other = dict(batch, x=jnp.where(rows[:, None, None, None], batch["x"], 7.0))
  np.testing.assert_allclose(
    tail_loss(moved, other)[rows], tail_loss(moved, batch)[rows], rtol=1e-5
  )
  scaled = dict(params, stem=dict(params["stem"], kernel=3 * params["stem"]["kernel"]))
  np.testing.assert_allclose(tail_loss(scaled, batch)[rows], losses[rows], rtol=1e-4)


def test_anchored_formula_linen():
  """The normalization written out: tail rows standardized by their own
  statistics, mapped onto the clean batch statistics."""
  layer = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  x = jax.random.normal(jax.random.key(0), (6, 4, 4, 2)) * 2.0 + 1.0
  tail = jnp.array([True, False, True, False, False, True])
  variables = layer.init(jax.random.key(1), x)
  variables = {
    "params": {"scale": jnp.array([1.5, 0.5]), "bias": jnp.array([0.1, -0.2])},
    "batch_stats": variables["batch_stats"],
  }
  y, mutated, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
    layer.apply, variables, x, tail_mask=tail
  )
  chex.assert_trees_all_close(
    mutated["batch_stats"],
    layer.apply(variables, x, mutable=["batch_stats"])[1]["batch_stats"],
    atol=1e-6,
  )
  x2 = jax.random.normal(jax.random.key(2), (4, 4, 4, 2)) * 0.7 - 0.3
  tail2 = jnp.array([True, True, True, False])  # 3 tail rows and a head row
  got = imbsam_jax.flax.linen_apply_with_clean_stats(
    layer.apply, variables, stats, x2, tail_mask=tail2
  )
  axes = (0, 1, 2)
  std = lambda v: jnp.sqrt(v + 1e-3)
  mu_b, var_b = x.mean(axes), x.var(axes)
  mu_t, var_t = x[tail].mean(axes), x[tail].var(axes)
  mu_2, var_2 = x2[:3].mean(axes), x2[:3].var(axes)
  xhat = (x2 - mu_2) / std(var_2) * std(var_t) / std(var_b)
  xhat = xhat + (mu_t - mu_b) / std(var_b)
  want = xhat * variables["params"]["scale"] + variables["params"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  at_w = imbsam_jax.flax.linen_apply_with_clean_stats(
    layer.apply, variables, stats, x[tail], tail_mask=jnp.ones(3, bool)
  )
  np.testing.assert_allclose(at_w, y[tail], rtol=1e-5, atol=1e-5)


# --- the ImbSAM step ----------------------------------------------------------------


def test_network_without_batchnorm_gets_the_exact_step():
  """GroupNorm: the helpers change nothing, the fast path is the exact step."""
  graphdef, params, rest = init_params(norm="group")
  exact = imbsam_jax.imbsam(optax.sgd(0.1, momentum=0.9), 0.1, MASK_FN)
  fast = imbsam_jax.imbsam(
    optax.sgd(0.1, momentum=0.9), 0.1, MASK_FN, tail_capacity="auto"
  )
  want, _, _ = run_pure(graphdef, params, rest, exact, BATCHES, anchored=False)
  got, _, _ = run_pure(graphdef, params, rest, fast, BATCHES, anchored=True)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


def test_rho_zero_is_the_base_step():
  """rho = 0 on a BatchNorm network: the two tail passes cancel bit for bit, so
  ImbSAM hands the base optimizer the clean gradient itself; over several steps
  the trajectory is the base optimizer's (up to the rounding of a differently
  fused program)."""
  graphdef, params, rest = init_params()
  probe = imbsam_jax.imbsam(optax.sgd(1.0), 0.0, MASK_FN, tail_capacity="auto")

  @jax.jit
  def clean_and_imbsam_grads(params, batch):
    clean = imbsam_jax.flax.nnx_loss_fn(
      graphdef, per_example_loss, rest, tail_mask=tail_mask, with_clean_stats=True
    )
    (_, stats), grads = jax.value_and_grad(
      lambda p: (lambda out: (out[0].mean(), out[1]))(clean(p, batch)), has_aux=True
    )(params)
    loss_fn = imbsam_jax.flax.nnx_loss_fn(
      graphdef, per_example_loss, rest, tail_mask=tail_mask, clean_stats=stats
    )
    updates, _ = probe.update(
      grads, probe.init(params), params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    return grads, jax.tree.map(jnp.negative, updates)

  for batch in BATCHES:
    grads, imbsam_grads = clean_and_imbsam_grads(params, batch)
    chex.assert_trees_all_equal(imbsam_grads, grads)

  base = optax.sgd(0.1, momentum=0.9)
  tx = imbsam_jax.imbsam(base, 0.0, MASK_FN, tail_capacity="auto")
  got, got_rest, _ = run_pure(graphdef, params, rest, tx, BATCHES)

  @jax.jit
  def base_step(params, rest, opt_state, batch):
    def mean_loss(p):
      model = nnx.merge(graphdef, p, rest, copy=True)
      losses = per_example_loss(model, batch)
      return jnp.mean(losses), as_pure(nnx.state(model, nnx.Not(nnx.Param)))

    (_, rest), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    updates, opt_state = base.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state

  want, want_rest, opt_state = params, rest, base.init(params)
  for batch in BATCHES:
    want, want_rest, opt_state = base_step(want, want_rest, opt_state, batch)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(got_rest, want_rest, atol=1e-6)


def test_gathered_tail_passes_equal_full_batch_passes():
  """tail_capacity="auto" (k = 8) gives the full-batch anchored passes' step,
  also for a batch without tail examples. A batch of 11 tail examples needs two
  chunks, each anchored on its own tail rows: close to the one-chunk result.
  Both stay closer to the exact (training-mode) trajectory than SGD does."""
  graphdef, params, rest = init_params()
  kwargs = {"base_tx": optax.sgd(0.1, momentum=0.9), "rho": 0.1}
  full = imbsam_jax.imbsam(tail_mask_fn=MASK_FN, **kwargs)
  fast = imbsam_jax.imbsam(tail_mask_fn=MASK_FN, tail_capacity="auto", **kwargs)
  # One compiled step per optimizer for both checks: BATCHES, then the batch
  # of 11 tail examples (same shapes).
  batches = [*BATCHES, make_batch(9, num_tail=11)]
  full_steps = [p for p, _ in trajectory(graphdef, params, rest, full, batches)[0]]
  fast_steps = [p for p, _ in trajectory(graphdef, params, rest, fast, batches)[0]]
  n = len(BATCHES)  # after BATCHES
  chex.assert_trees_all_close(
    fast_steps[n - 1], full_steps[n - 1], atol=1e-5, rtol=1e-5
  )

  whole, got = full_steps[-1], fast_steps[-1]  # after the batch of 11 too
  exact, _, _ = run_pure(graphdef, params, rest, full, batches, anchored=False)
  chex.assert_tree_all_finite(got)
  assert distance(got, whole) < 0.1 * distance(whole, params)
  sgd = imbsam_jax.imbsam(tail_mask_fn=MASK_FN, **{**kwargs, "rho": 0.0})
  plain, _, _ = run_pure(graphdef, params, rest, sgd, batches, anchored=False)
  assert distance(got, exact) < distance(plain, exact)


def test_no_recompilation_across_batches():
  traces = []
  graphdef, params, rest = init_params()
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, MASK_FN, tail_capacity="auto")
  inner = make_pure_step(graphdef, tx, jit=False)

  @jax.jit
  def step(*args):
    traces.append(1)
    return inner(*args)

  opt_state = tx.init(params)
  for seed, num_tail in enumerate([0, 3, 12, 1, 16]):
    batch = make_batch(seed, num_tail)
    params, rest, opt_state, _ = step(params, rest, opt_state, batch)
  assert len(traces) == 1 and step._cache_size() == 1
  chex.assert_tree_all_finite(params)


def imbsam_gradients(graphdef, params, rest, batch, rho):
  """(clean, exact, anchored, fixed-statistics) ImbSAM gradients of one batch."""
  clean = imbsam_jax.flax.nnx_loss_fn(
    graphdef, per_example_loss, rest, tail_mask=tail_mask, with_clean_stats=True
  )
  (_, stats), grads = jax.value_and_grad(
    lambda p: (lambda out: (out[0].mean(), out[1]))(clean(p, batch)), has_aux=True
  )(params)
  exact = imbsam_jax.flax.nnx_loss_fn(graphdef, per_example_loss, rest)
  anchored = imbsam_jax.flax.nnx_loss_fn(
    graphdef, per_example_loss, rest, tail_mask=tail_mask, clean_stats=stats
  )

  def fixed(p, b):  # BatchNorm in evaluation mode on the clean batch statistics
    model = nnx.merge(graphdef, p, rest, copy=True)
    for path, layer in nnx.iter_graph(model):
      if isinstance(layer, nnx.BatchNorm):
        entry = stats["/".join(map(str, path))]
        layer.mean[...] = entry["mean"]
        layer.var[...] = entry["var"]
        layer.use_running_average = True
    return per_example_loss(model, b)

  out = [grads]
  for loss_fn, capacity in ((exact, None), (anchored, "auto"), (fixed, "auto")):
    tx = imbsam_jax.imbsam(optax.sgd(1.0), rho, MASK_FN, tail_capacity=capacity)
    updates, _ = tx.update(
      grads, tx.init(params), params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    out.append(jax.tree.map(jnp.negative, updates))
  return out


@pytest.mark.slow  # ~40 s; the default run keeps the weaker check of
# test_gathered_tail_passes_equal_full_batch_passes (closer to exact than SGD)
def test_fidelity_to_the_exact_step(capsys):
  """Cosine of the approximate and the exact ImbSAM gradient on a small BatchNorm
  ResNet, at initialisation and after 60 SGD steps (printed)."""
  graphdef, params, rest = init_params(width=8)
  batches = [make_batch(100 + s, num_tail=3, size=32, side=8) for s in range(3)]
  grads_fn = jax.jit(imbsam_gradients, static_argnums=(0, 4))
  sgd = optax.sgd(0.05, momentum=0.9)
  opt_state = sgd.init(params)

  @jax.jit
  def sgd_step(params, rest, opt_state, batch):  # plain SGD, to train a little
    def mean_loss(p):
      model = nnx.merge(graphdef, p, rest, copy=True)
      losses = per_example_loss(model, batch)
      return jnp.mean(losses), as_pure(nnx.state(model, nnx.Not(nnx.Param)))

    (_, new_rest), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    updates, opt_state = sgd.update(grads, opt_state)
    return optax.apply_updates(params, updates), new_rest, opt_state

  report = {}
  for stage in ("init", "trained"):
    if stage == "trained":
      for s in range(60):
        batch = make_batch(s, num_tail=1, size=32, side=8)
        params, rest, opt_state = sgd_step(params, rest, opt_state, batch)
    rows = []
    for batch in batches:
      clean, exact, anchored, fixed = grads_fn(graphdef, params, rest, batch, 0.05)
      rows.append([cosine(anchored, exact), cosine(fixed, exact), cosine(clean, exact)])
    report[stage] = np.mean(rows, axis=0)
  with capsys.disabled():
    for stage, (anchored, fixed, clean) in report.items():
      print(
        f"\nImbSAM gradient cosine to exact, {stage}: anchored {anchored:.4f},"
        f" fixed clean statistics {fixed:.4f}, plain gradient {clean:.4f}"
      )
  assert report["init"][0] >= 0.99
  assert report["trained"][0] >= 0.97
  assert report["trained"][0] > report["trained"][1]  # better than fixed statistics


# --- NNX: nnx.Optimizer under nnx.jit ----------------------------------------


@nnx.jit
def nnx_train_step(model, optimizer, batch):
  """The pattern of nnx_value_and_grad_with_clean_stats's docstring."""
  loss, grads, stats = imbsam_jax.flax.nnx_value_and_grad_with_clean_stats(
    per_example_loss, model, batch, tail_mask=tail_mask
  )
  loss_fn = imbsam_jax.flax.nnx_loss_fn(
    model, per_example_loss, tail_mask=tail_mask, clean_stats=stats
  )
  optimizer.update(model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
  return loss


def test_nnx_optimizer_matches_the_pure_step():
  tx = imbsam_jax.imbsam(
    optax.sgd(0.1, momentum=0.9), 0.1, MASK_FN, tail_capacity="auto"
  )
  model = TinyResNet()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params, rest = init_params()
  step = make_pure_step(graphdef, tx)
  opt_state = tx.init(params)
  for batch in BATCHES:
    got_loss = nnx_train_step(model, optimizer, batch)
    params, rest, opt_state, loss = step(params, rest, opt_state, batch)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
  chex.assert_trees_all_close(
    as_pure(nnx.state(model, nnx.Param)), params, atol=1e-6, rtol=1e-6
  )
  chex.assert_trees_all_close(
    as_pure(nnx.state(model, nnx.BatchStat)),
    as_pure(nnx.state(nnx.merge(graphdef, params, rest), nnx.BatchStat)),
    atol=1e-6,
  )
  assert int(optimizer.step[...]) == len(BATCHES)


def test_nnx_with_aux_and_evaluation_mode_layer():
  """has_aux; a BatchNorm in evaluation mode keeps its running averages, and the
  tail passes use them (as the clean pass did)."""
  model = TinyResNet()
  model.block2.norm2.use_running_average = True  # frozen

  def loss_and_accuracy(model, batch):
    logits = model(batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return losses, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

  frozen = jax.tree.map(jnp.copy, as_pure(nnx.state(model.block2.norm2, nnx.BatchStat)))
  (loss, aux), grads, stats = imbsam_jax.flax.nnx_value_and_grad_with_clean_stats(
    loss_and_accuracy, model, BATCHES[0], tail_mask=tail_mask, has_aux=True
  )
  assert 0 <= float(aux["accuracy"]) <= 1 and np.isfinite(float(loss))
  assert set(stats["block2/norm2"]) == {"mean", "var"}
  assert set(stats["block1/norm1"]) == {"mean", "var", "tail_mean", "tail_var"}
  chex.assert_trees_all_equal(
    as_pure(nnx.state(model.block2.norm2, nnx.BatchStat)), frozen
  )
  np.testing.assert_array_equal(stats["block2/norm2"]["mean"], frozen["mean"])
  loss_fn = imbsam_jax.flax.nnx_loss_fn(
    model, loss_and_accuracy, tail_mask=tail_mask, clean_stats=stats, has_aux=True
  )
  losses, _ = loss_fn(nnx.state(model, nnx.Param), BATCHES[0])
  assert losses.shape == (BATCH,)
  chex.assert_tree_all_finite((losses, grads))


def test_nnx_bad_arguments():
  model = TinyResNet()
  batch = BATCHES[0]
  _, _, stats = imbsam_jax.flax.nnx_value_and_grad_with_clean_stats(
    per_example_loss, TinyResNet(), batch, tail_mask=tail_mask
  )
  with pytest.raises(ValueError, match="tail_mask"):
    imbsam_jax.flax.nnx_loss_fn(model, per_example_loss, clean_stats=stats)
  with pytest.raises(ValueError, match="one of them"):
    imbsam_jax.flax.nnx_loss_fn(
      model,
      per_example_loss,
      tail_mask=tail_mask,
      with_clean_stats=True,
      clean_stats=stats,
    )
  params = nnx.state(model, nnx.Param)
  partial = {k: v for k, v in stats.items() if k != "block1/norm2"}
  with pytest.raises(ValueError, match="block1/norm2"):
    imbsam_jax.flax.nnx_loss_fn(
      model, per_example_loss, tail_mask=tail_mask, clean_stats=partial
    )(params, batch)
  with pytest.raises(ValueError, match="one tail weight per row"):
    imbsam_jax.flax.nnx_loss_fn(
      model, per_example_loss, tail_mask=lambda b: tail_mask(b)[:-1], clean_stats=stats
    )(params, batch)

  class CallTimeTraining(TinyResNet):
    def __call__(self, x):
      x = nnx.relu(self.stem_norm(self.stem(x), use_running_average=False))
      return self.head(self.block2(self.block1(x)).mean((1, 2)))

  with pytest.raises(RuntimeError, match="stem_norm"):
    imbsam_jax.flax.nnx_loss_fn(
      CallTimeTraining(), per_example_loss, tail_mask=tail_mask, clean_stats=stats
    )(params, batch)


# --- Linen: a TrainState step --------------------------------------------------------


class LinenNet(nn.Module):
  """Conv-BN-Conv-BN-pool-Dense; the second BatchNorm takes its mode at call time."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(momentum=0.8)(x, use_running_average=not train))
    return nn.Dense(NUM_CLASSES)(x.mean((1, 2)))


class TrainState(imbsam_jax.flax.TrainState):
  batch_stats: Any


def linen_step(anchored):
  @jax.jit
  def step(state, batch):
    def mean_loss(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      logits, mutated, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
        state.apply_fn, variables, batch["x"], train=True, tail_mask=tail_mask(batch)
      )
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return losses.mean(), (mutated["batch_stats"], stats)

    (loss, (running, stats)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
      state.params
    )

    def loss_fn(params, b):  # the tail passes
      variables = {"params": params, "batch_stats": state.batch_stats}
      if anchored:
        logits = imbsam_jax.flax.linen_apply_with_clean_stats(
          state.apply_fn, variables, stats, b["x"], train=True, tail_mask=tail_mask(b)
        )
      else:
        logits, _ = state.apply_fn(
          variables, b["x"], train=True, mutable=["batch_stats"]
        )
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

    state = state.apply_gradients(
      grads=grads, batch_stats=running, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    return state, loss

  return step


def linen_state(tx):
  net = LinenNet()
  variables = net.init(jax.random.key(0), BATCHES[0]["x"], train=False)
  return TrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables["batch_stats"],
  )


def run_linen(tx, anchored=True, batches=BATCHES):
  state, step = linen_state(tx), linen_step(anchored)
  for batch in batches:
    state, _ = step(state, batch)
  return state


def test_linen_train_state_step():
  """rho = 0: the base step and the running averages of plain training; the
  gathered passes equal the full-batch ones; at w the tail rows are the clean
  pass's (BatchNorm's mode set by constructor and by call argument)."""
  zero = run_linen(
    imbsam_jax.imbsam(optax.sgd(0.1), 0.0, MASK_FN, tail_capacity="auto")
  )

  @jax.jit
  def base_step(state, batch):
    def mean_loss(params):
      logits, mutated = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        batch["x"],
        train=True,
        mutable=["batch_stats"],
      )
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return losses.mean(), mutated["batch_stats"]

    (_, running), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=running)

  base = linen_state(optax.sgd(0.1))
  for batch in BATCHES:
    base = base_step(base, batch)
  chex.assert_trees_all_close(zero.params, base.params, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(zero.batch_stats, base.batch_stats, atol=1e-6)

  kwargs = {"base_tx": optax.sgd(0.1, momentum=0.9), "rho": 0.1}
  full = run_linen(imbsam_jax.imbsam(tail_mask_fn=MASK_FN, **kwargs))
  fast = run_linen(
    imbsam_jax.imbsam(tail_mask_fn=MASK_FN, tail_capacity="auto", **kwargs)
  )
  chex.assert_trees_all_close(fast.params, full.params, atol=1e-5, rtol=1e-5)
  assert int(fast.step) == len(BATCHES)

  net, batch = LinenNet(), BATCHES[0]
  variables = {"params": fast.params, "batch_stats": fast.batch_stats}
  y, _, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
    net.apply, variables, batch["x"], train=True, tail_mask=tail_mask(batch)
  )
  rows = np.asarray(tail_mask(batch))
  y_tail, mutated = imbsam_jax.flax.linen_apply_with_clean_stats(
    net.apply,
    variables,
    stats,
    batch["x"][rows],
    train=True,
    tail_mask=jnp.ones(rows.sum(), bool),
    mutable=["batch_stats"],
  )
  np.testing.assert_allclose(y_tail, y[rows], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(mutated["batch_stats"], fast.batch_stats)


def test_linen_bad_arguments():
  net, batch = LinenNet(), BATCHES[0]
  variables = net.init(jax.random.key(0), batch["x"], train=False)
  _, _, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
    net.apply, variables, batch["x"], train=True, tail_mask=tail_mask(batch)
  )
  partial = {k: v for k, v in stats.items() if k != "BatchNorm_1"}
  with pytest.raises(ValueError, match="BatchNorm_1"):
    imbsam_jax.flax.linen_apply_with_clean_stats(
      net.apply, variables, partial, batch["x"], train=True, tail_mask=tail_mask(batch)
    )
  with pytest.raises(ValueError, match="one tail weight per row"):
    imbsam_jax.flax.linen_apply_recording_clean_stats(
      net.apply, variables, batch["x"], train=True, tail_mask=jnp.ones(3)
    )


def test_nnx_batchnorm_subclass_keeps_its_behaviour():
  """A subclass of nnx.BatchNorm runs its own __call__ in both passes."""

  class HalfBatchNorm(nnx.BatchNorm):
    def __call__(self, x, use_running_average=None, *, mask=None):
      return 0.5 * super().__call__(x, use_running_average, mask=mask)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.norm = HalfBatchNorm(4, rngs=rngs)
      self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.norm(self.conv(x))).mean((1, 2)))

  model = Net(nnx.Rngs(0))
  batch = BATCHES[0]
  want = per_example_loss(nnx.clone(model), batch)
  loss, _, stats = imbsam_jax.flax.nnx_value_and_grad_with_clean_stats(
    per_example_loss, model, batch, tail_mask=tail_mask
  )
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  assert type(model.norm) is HalfBatchNorm
  tail_loss = imbsam_jax.flax.nnx_loss_fn(
    model, per_example_loss, tail_mask=tail_mask, clean_stats=stats
  )
  rows = np.asarray(tail_mask(batch))
  np.testing.assert_allclose(
    tail_loss(nnx.state(model, nnx.Param), batch)[rows], want[rows], rtol=1e-5
  )


# --- dropout on the anchored path -------------------------------------------


class DropoutConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.norm(self.conv(x))))
    return self.head(x.mean((1, 2)))


class LinenDropoutConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x.mean((1, 2)))


def test_anchored_tail_pass_at_w_replays_the_clean_dropout():
  """With dropout on, the anchored tail pass at w still gives the tail rows'
  clean losses: NNX from the model (after its clean pass), Linen with the
  step's key passed to both passes."""
  batch = BATCHES[0]
  rows = np.asarray(tail_mask(batch))
  model = DropoutConvNet(nnx.Rngs(0))

  @nnx.jit
  def nnx_check(model, batch):
    plain = imbsam_jax.flax.nnx_loss_fn(model, per_example_loss, with_state=True)
    clean_losses, _ = plain(nnx.state(model, nnx.Param), batch)  # pure: no draw
    _, _, stats = imbsam_jax.flax.nnx_value_and_grad_with_clean_stats(
      per_example_loss, model, batch, tail_mask=tail_mask
    )
    tail_loss = imbsam_jax.flax.nnx_loss_fn(
      model, per_example_loss, tail_mask=tail_mask, clean_stats=stats
    )
    return clean_losses, tail_loss(nnx.state(model, nnx.Param), batch)

  clean_losses, tail_losses = nnx_check(model, batch)
  np.testing.assert_allclose(tail_losses[rows], clean_losses[rows], rtol=1e-5)
  again, _ = nnx_check(model, batch)  # the next step draws other masks
  assert float(jnp.max(jnp.abs(again - clean_losses))) > 1e-3

  net = LinenDropoutConvNet()
  variables = net.init(jax.random.key(0), batch["x"], train=False)
  rngs = {"dropout": jax.random.key(3)}
  logits, _, stats = imbsam_jax.flax.linen_apply_recording_clean_stats(
    net.apply, variables, batch["x"], train=True, rngs=rngs, tail_mask=rows
  )
  tail_logits = imbsam_jax.flax.linen_apply_with_clean_stats(
    net.apply, variables, stats, batch["x"], train=True, rngs=rngs, tail_mask=rows
  )
  np.testing.assert_allclose(tail_logits[rows], logits[rows], rtol=1e-5, atol=1e-6)


def test_fast_path_refuses_a_plain_loss_fn_with_batch_statistics():
  """tail_capacity with nnx_loss_fn of a training-mode BatchNorm model (model or
  graphdef form) is an error; in evaluation mode, or anchored, it runs."""
  graphdef, params, rest = init_params()
  batch = BATCHES[0]
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, MASK_FN, tail_capacity="auto")
  grads = jax.grad(
    lambda p: per_example_loss(nnx.merge(graphdef, p, rest), batch).mean()
  )(params)

  def update(loss_fn):
    return jax.jit(
      lambda: tx.update(
        grads, tx.init(params), params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
      )
    )()

  model = nnx.merge(graphdef, params, rest)
  for loss_fn in (
    imbsam_jax.flax.nnx_loss_fn(model, per_example_loss),
    imbsam_jax.flax.nnx_loss_fn(graphdef, per_example_loss, rest),
  ):
    with pytest.raises(ValueError, match=r"per_example = False.*clean_stats"):
      update(loss_fn)
  _, _, stats = clean_pass(graphdef, params, rest, batch)
  update(
    imbsam_jax.flax.nnx_loss_fn(
      graphdef, per_example_loss, rest, tail_mask=tail_mask, clean_stats=stats
    )
  )
  model.eval()
  update(imbsam_jax.flax.nnx_loss_fn(model, per_example_loss))
