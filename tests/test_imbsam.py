"""Tests of the imbsam transform against a plain reference computation."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import imbsam_jax

BATCH = 16
NUM_CLASSES = 4
# Class 3 (and 2 with eta=30) are tail.
COUNTS = np.array([400, 120, 25, 5])


def init_params(key=0, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(key))
  return {
    "hidden": {
      "w": (0.5 * jax.random.normal(k1, (5, 8))).astype(dtype),
      "b": jnp.zeros((8,), dtype),
    },
    "out": {"w": (0.5 * jax.random.normal(k2, (8, NUM_CLASSES))).astype(dtype)},
  }


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
  logits = h @ params["out"]["w"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def make_batch(seed, num_tail=3, dtype=jnp.float32):
  """A batch whose first ``num_tail`` examples are from class 3."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, size=BATCH)
  y[:num_tail] = 3
  rng.shuffle(y)
  x = rng.normal(size=(BATCH, 5))
  return {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, jnp.int32)}


HARD_MASK = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)
SOFT_MASK = imbsam_jax.soft_tail_mask_from_counts(COUNTS, eta=30, temperature=0.7)


def clean_grads(params, batch):
  return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)


def reference_imbsam_grads(
  params, batch, t, rho, *, scale=1.0, eps=1e-12, adaptive=False
):
  """The ImbSAM gradient, written out step by step as in the paper (norm in numpy)."""
  t = np.asarray(t, np.float64)
  size = t.shape[0]

  def tail_loss(p):
    return jnp.sum(t * loss_fn(p, batch)) / size

  def head_loss(p):
    return jnp.sum((1.0 - t) * loss_fn(p, batch)) / size

  g_tail = jax.grad(tail_loss)(params)
  if adaptive:
    scaled = jax.tree.map(lambda g, w: g * jnp.abs(w), g_tail, params)
  else:
    scaled = g_tail
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(scaled)))
  if adaptive:
    e = jax.tree.map(lambda g, w: rho * g * w**2 / (norm + eps), g_tail, params)
  else:
    e = jax.tree.map(lambda g: rho * g / (norm + eps), g_tail)
  g_adv = jax.grad(tail_loss)(jax.tree.map(jnp.add, params, e))
  g_head = jax.grad(head_loss)(params)
  return jax.tree.map(lambda h, a: h + scale * a, g_head, g_adv)


def run_imbsam(tx, params, batches, *, jit, **update_kwargs):
  state = tx.init(params)

  def step(params, state, batch):
    grads = clean_grads(params, batch)
    updates, state = tx.update(
      grads,
      state,
      params,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
      **update_kwargs,
    )
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


def run_reference(base_tx, params, batches, mask_fn, rho, **kwargs):
  state = base_tx.init(params)
  for i, batch in enumerate(batches):
    rho_t = rho(i) if callable(rho) else rho
    g = reference_imbsam_grads(params, batch, mask_fn(batch["y"]), rho_t, **kwargs)
    updates, state = base_tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


BASE_OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.3),
  "momentum_nesterov": lambda: optax.sgd(0.2, momentum=0.9, nesterov=True),
  "adam": lambda: optax.adam(0.05),
  "adamw": lambda: optax.adamw(0.05, weight_decay=1e-2),
  "clipped_sgd_wd": lambda: optax.chain(
    optax.clip_by_global_norm(0.5),
    optax.add_decayed_weights(1e-3),
    optax.sgd(optax.cosine_decay_schedule(0.5, 10)),
  ),
}
BATCHES = [make_batch(s, num_tail=n) for s, n in [(0, 3), (1, 1), (2, 5), (3, 2)]]


@pytest.mark.parametrize("opt_name", list(BASE_OPTIMIZERS))
@pytest.mark.parametrize("mask", ["hard", "soft"])
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_matches_reference(opt_name, mask, rho):
  _check_against_reference(opt_name, mask, rho, jit=True)


@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_matches_reference_unjitted(mask):
  _check_against_reference("momentum_nesterov", mask, 0.1, jit=False)


def _check_against_reference(opt_name, mask, rho, jit):
  mask_fn = {"hard": HARD_MASK, "soft": SOFT_MASK}[mask]
  base = BASE_OPTIMIZERS[opt_name]
  params = init_params()
  tx = imbsam_jax.imbsam(base(), rho, mask_fn)
  got, state = run_imbsam(tx, params, BATCHES, jit=jit)
  want = run_reference(base(), params, BATCHES, mask_fn, rho)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert int(state.count) == len(BATCHES)
  assert float(state.tail_grad_norm) > 0


@pytest.mark.parametrize("capacity", [None, 2])
def test_state_norms_are_the_tail_gradients_at_w_and_at_w_plus_e(capacity):
  """tail_grad_norm = ||g_T(w)||, perturbed_tail_grad_norm = ||g_T(w + e)||,
  both written out as in the reference."""
  params, batch, rho = init_params(), BATCHES[2], 0.5
  t = np.asarray(HARD_MASK(batch["y"]), np.float64)
  tail_loss = lambda p: jnp.sum(t * loss_fn(p, batch)) / BATCH
  norm = lambda tree: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))
  g_tail = jax.grad(tail_loss)(params)
  e = jax.tree.map(lambda g: rho * g / norm(g_tail), g_tail)
  g_adv = jax.grad(tail_loss)(jax.tree.map(jnp.add, params, e))
  tx = imbsam_jax.imbsam(optax.sgd(0.3), rho, HARD_MASK, tail_capacity=capacity)
  _, state = run_imbsam(tx, params, [batch], jit=True)
  np.testing.assert_allclose(state.tail_grad_norm, norm(g_tail), rtol=1e-5)
  np.testing.assert_allclose(state.perturbed_tail_grad_norm, norm(g_adv), rtol=1e-5)
  assert float(state.perturbed_tail_grad_norm) != float(state.tail_grad_norm)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"tail_loss_scale": 2.0},
    {"adaptive": True},
    {"eps": 1e-3},
  ],
  ids=["scale2", "adaptive", "eps"],
)
def test_options_match_reference(kwargs):
  params = init_params()
  tx = imbsam_jax.imbsam(optax.sgd(0.3), 0.1, HARD_MASK, **kwargs)
  got, _ = run_imbsam(tx, params, BATCHES, jit=True)
  ref_kwargs = {
    "scale": kwargs.get("tail_loss_scale", 1.0),
    "adaptive": kwargs.get("adaptive", False),
    "eps": kwargs.get("eps", 1e-12),
  }
  want = run_reference(optax.sgd(0.3), params, BATCHES, HARD_MASK, 0.1, **ref_kwargs)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_rho_schedule():
  schedule = optax.linear_schedule(0.0, 0.4, transition_steps=3)
  params = init_params()
  tx = imbsam_jax.imbsam(optax.sgd(0.3), schedule, HARD_MASK)
  got, _ = run_imbsam(tx, params, BATCHES, jit=True)
  want = run_reference(optax.sgd(0.3), params, BATCHES, HARD_MASK, schedule)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity", [1, 2, 3, 8, 16, 64])
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_tail_capacity_matches_exact(capacity, mask):
  """The gathered fast path equals the full path, also when the tail overflows."""
  mask_fn = {"hard": HARD_MASK, "soft": SOFT_MASK}[mask]
  params = init_params()
  exact = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, mask_fn)
  fast = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, mask_fn, tail_capacity=capacity)
  want, want_state = run_imbsam(exact, params, BATCHES, jit=True)
  got, got_state = run_imbsam(fast, params, BATCHES, jit=True)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(
    got_state.tail_grad_norm, want_state.tail_grad_norm, rtol=1e-5
  )


def test_tail_capacity_all_tail_batch():
  """Every example tail: several chunks cover the whole batch."""
  params = init_params()
  batch = make_batch(7, num_tail=BATCH)
  exact = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, HARD_MASK)
  fast = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, HARD_MASK, tail_capacity=3)
  want, _ = run_imbsam(exact, params, [batch], jit=True)
  got, _ = run_imbsam(fast, params, [batch], jit=True)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def tail_grads_step(tx, mask_fn):
  """The jitted step that hands ``tx`` the tail gradient of value_and_tail_grads:
  ``(params, state, batch) -> (params, state, loss)``."""

  @jax.jit
  def step(params, state, batch):
    loss, grads, tail_grads = imbsam_jax.value_and_tail_grads(
      loss_fn, params, batch, mask_fn(batch["y"])
    )
    updates, state = tx.update(
      grads,
      state,
      params,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
      tail_grads=tail_grads,
    )
    return optax.apply_updates(params, updates), state, loss

  return step


@pytest.mark.parametrize("capacity", [None, 4])
def test_handed_in_tail_grads(capacity):
  """value_and_tail_grads + tail_grads= gives the same step with fewer passes."""
  params = init_params()
  tx = imbsam_jax.imbsam(optax.adam(0.05), 0.1, SOFT_MASK, tail_capacity=capacity)
  want, _ = run_imbsam(tx, params, BATCHES, jit=True)

  step = tail_grads_step(tx, SOFT_MASK)
  params_got, state = params, tx.init(params)
  for batch in BATCHES:
    params_got, state, loss = step(params_got, state, batch)
    np.testing.assert_allclose(loss, jnp.mean(loss_fn(params_got, batch)), rtol=0.5)
  chex.assert_trees_all_close(params_got, want, atol=1e-5, rtol=1e-5)


def test_value_and_tail_grads_matches_two_grads():
  params = init_params()
  batch = BATCHES[0]
  t = SOFT_MASK(batch["y"])
  loss, grads, tail = imbsam_jax.value_and_tail_grads(loss_fn, params, batch, t)
  np.testing.assert_allclose(loss, jnp.mean(loss_fn(params, batch)), rtol=1e-6)
  chex.assert_trees_all_close(grads, clean_grads(params, batch), rtol=1e-5, atol=1e-7)
  want_tail = jax.grad(lambda p: jnp.sum(t * loss_fn(p, batch)) / BATCH)(params)
  chex.assert_trees_all_close(tail, want_tail, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("capacity", [None, 4])
@pytest.mark.parametrize("jit", [False, True])
def test_no_tail_is_exactly_base_step(capacity, jit):
  """An all-head batch: e = 0, no NaN, and bit-for-bit the base optimizer."""
  params = init_params()
  batches = [make_batch(s, num_tail=0) for s in range(3)]
  tx = imbsam_jax.imbsam(
    optax.adam(0.05), 0.05, HARD_MASK, tail_capacity=capacity, eps=0.0
  )
  got, state = run_imbsam(tx, params, batches, jit=jit)
  base = optax.adam(0.05)

  def base_step(params, state, batch):
    updates, state = base.update(clean_grads(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    base_step = jax.jit(base_step)
  want, base_state = params, base.init(params)
  for batch in batches:
    want, base_state = base_step(want, base_state, batch)
  chex.assert_tree_all_finite(got)
  if jit:  # XLA may fuse the larger program differently: last-bit rounding.
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  else:
    chex.assert_trees_all_equal(got, want)
  assert float(state.tail_grad_norm) == 0.0
  assert float(state.perturbed_tail_grad_norm) == 0.0
  assert float(state.tail_fraction) == 0.0


@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_rho_zero_is_base_step(mask):
  mask_fn = {"hard": HARD_MASK, "soft": SOFT_MASK}[mask]
  params = init_params()
  got, _ = run_imbsam(
    imbsam_jax.imbsam(optax.sgd(0.3), 0.0, mask_fn), params, BATCHES, jit=True
  )
  base = optax.sgd(0.3)
  want, state = params, base.init(params)
  for batch in BATCHES:
    updates, state = base.update(clean_grads(want, batch), state, want)
    want = optax.apply_updates(want, updates)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


def test_all_tail_is_sam():
  """With every example in the tail, ImbSAM is SAM (optax.contrib.sam, opaque)."""
  params = init_params()
  all_tail = lambda labels: jnp.ones(labels.shape, bool)
  got, _ = run_imbsam(
    imbsam_jax.imbsam(optax.sgd(0.3), 0.1, all_tail), params, BATCHES, jit=True
  )

  chex.assert_trees_all_close(got, run_sam(params, BATCHES, 0.1), atol=1e-5, rtol=1e-5)


def run_sam(params, batches, rho, lr=0.3):
  """SGD inside ``optax.contrib.sam`` (opaque mode), perturbation rho g / ||g||."""
  sam = optax.contrib.sam(
    optax.sgd(lr),
    optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
    opaque_mode=True,
  )
  state = sam.init(params)
  for batch in batches:
    grad_fn = lambda p, _, b=batch: clean_grads(p, b)
    updates, state = sam.update(
      clean_grads(params, batch), state, params, grad_fn=grad_fn
    )
    params = optax.apply_updates(params, updates)
  return params


def run_counting_traces(tx: optax.GradientTransformation):
  """Five jitted steps over batches with 0..16 tail examples; (params, traces)."""
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    grads = clean_grads(params, batch)
    updates, state = tx.update(
      grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    return optax.apply_updates(params, updates), state

  params = init_params()
  state = tx.init(params)
  for seed, num_tail in enumerate([0, 3, 9, 1, 16]):
    params, state = step(params, state, make_batch(seed, num_tail=num_tail))
  assert step._cache_size() == 1
  return params, len(traces)


def test_no_recompilation_across_steps():
  tx = imbsam_jax.imbsam(optax.adam(0.05), 0.05, HARD_MASK, tail_capacity=4)
  assert run_counting_traces(tx)[1] == 1


def test_inject_hyperparams_rho_and_learning_rate_under_jit():
  """rho and the base learning rate live in the state: tree_set changes them."""
  tx = optax.inject_hyperparams(imbsam_jax.imbsam, static_args=("tail_mask_fn",))(
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.3),
    rho=0.05,
    tail_mask_fn=HARD_MASK,
    tail_loss_scale=2.0,
  )
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    grads = clean_grads(params, batch)
    updates, state = tx.update(
      grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )
    return optax.apply_updates(params, updates), state

  schedule = [(0.05, 0.3), (0.4, 0.1), (0.0, 0.2), (0.2, 0.05)]  # (rho, lr)
  params = want = init_params()
  state = tx.init(params)
  for (rho, lr), batch in zip(schedule, BATCHES, strict=True):
    state = optax.tree_utils.tree_set(
      state, rho=jnp.asarray(rho), learning_rate=jnp.asarray(lr)
    )
    params, state = step(params, state, batch)
    g = reference_imbsam_grads(want, batch, HARD_MASK(batch["y"]), rho, scale=2.0)
    want = jax.tree.map(lambda w, g, lr=lr: w - lr * g, want, g)
    chex.assert_trees_all_close(params, want, atol=1e-5, rtol=1e-5)
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert float(optax.tree_utils.tree_get(state, "rho")) == pytest.approx(0.2)


def test_array_hyperparameters():
  """Scalar arrays for rho, tail_loss_scale and eps, also traced ones."""
  params = init_params()
  want = run_reference(
    optax.sgd(0.3), params, BATCHES, HARD_MASK, 0.1, scale=2.0, eps=1e-3
  )

  @jax.jit
  def run(rho, scale, eps):
    tx = imbsam_jax.imbsam(
      optax.sgd(0.3), rho, HARD_MASK, tail_loss_scale=scale, eps=eps
    )
    return run_imbsam(tx, params, BATCHES, jit=False)[0]

  got = run(jnp.asarray(0.1), jnp.asarray(2.0), jnp.asarray(1e-3))
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(run(0.1, np.float32(2.0), 1e-3), want, atol=1e-5)


def test_extra_args_inside_chain_and_forwarded():
  """Unknown kwargs are ignored by imbsam and reach the base optimizer."""
  base = optax.chain(
    optax.sgd(0.3), optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
  )
  tx = optax.chain(
    optax.clip_by_global_norm(10.0),
    imbsam_jax.imbsam(base, 0.05, HARD_MASK),
  )
  params = init_params()
  state = tx.init(params)
  for batch in BATCHES:
    grads = clean_grads(params, batch)
    updates, state = tx.update(
      grads,
      state,
      params,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
      value=jnp.asarray(10.0),  # reduce_on_plateau's extra arg: never improves
      unrelated_argument="ignored",
    )
    params = optax.apply_updates(params, updates)
  plateau_state = state[1].base_state[1]
  assert float(plateau_state.scale) < 1.0  # saw `value`, so it reduced the lr


def test_multisteps_inside_imbsam():
  """imbsam(MultiSteps(sgd, k)): ImbSAM per micro-batch, averaged every k."""
  params = init_params()
  tx = imbsam_jax.imbsam(
    optax.MultiSteps(optax.sgd(0.3), every_k_schedule=2), 0.1, HARD_MASK
  )
  got, _ = run_imbsam(tx, params, BATCHES, jit=True)
  want = params
  for first, second in zip(BATCHES[::2], BATCHES[1::2], strict=True):
    g1 = reference_imbsam_grads(want, first, HARD_MASK(first["y"]), 0.1)
    g2 = reference_imbsam_grads(want, second, HARD_MASK(second["y"]), 0.1)
    want = jax.tree.map(lambda p, a, b: p - 0.3 * (a + b) / 2, want, g1, g2)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity", [None, 4])
def test_bfloat16_params_keep_dtype(capacity):
  params = init_params(dtype=jnp.bfloat16)
  batches = [make_batch(s, num_tail=3, dtype=jnp.bfloat16) for s in range(3)]
  tx = imbsam_jax.imbsam(optax.sgd(0.3), 0.05, HARD_MASK, tail_capacity=capacity)
  got, state = run_imbsam(tx, params, batches, jit=True)
  chex.assert_trees_all_equal_dtypes(got, params)
  chex.assert_tree_all_finite(got)
  assert state.tail_grad_norm.dtype == jnp.float32
  # Close to the float32 computation from the same (rounded) start.
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  batches32 = [
    jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, b)
    for b in batches
  ]
  want, _ = run_imbsam(
    imbsam_jax.imbsam(optax.sgd(0.3), 0.05, HARD_MASK), params32, batches32, jit=True
  )
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), got), want, atol=5e-2
  )


def test_deterministic():
  tx = imbsam_jax.imbsam(optax.adam(0.05), 0.05, SOFT_MASK, tail_capacity=2)
  first, _ = run_imbsam(tx, init_params(), BATCHES, jit=True)
  second, _ = run_imbsam(tx, init_params(), BATCHES, jit=True)
  chex.assert_trees_all_equal(first, second)


def test_state_diagnostics():
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  params = init_params()
  batch = make_batch(0, num_tail=4)
  _, state = run_imbsam(tx, params, [batch], jit=True)
  assert float(state.tail_fraction) == pytest.approx(4 / BATCH)
  t = HARD_MASK(batch["y"]).astype(jnp.float32)
  g_tail = jax.grad(lambda p: jnp.sum(t * loss_fn(p, batch)) / BATCH)(params)
  assert float(state.tail_grad_norm) == pytest.approx(
    float(optax.tree.norm(g_tail)), rel=1e-5
  )


# --- bad input ---------------------------------------------------------------


def _update(tx, **kwargs):
  """One update on BATCHES[0] (or ``batch=``); other keywords replace the extra
  arguments."""
  params = init_params()
  batch = kwargs.get("batch") or BATCHES[0]
  defaults = {"loss_fn": loss_fn, "batch": batch, "labels": batch["y"]}
  defaults.update(kwargs)
  return tx.update(clean_grads(params, batch), tx.init(params), params, **defaults)


@pytest.mark.parametrize("missing", ["loss_fn", "batch", "labels"])
def test_missing_extra_args(missing):
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  with pytest.raises(ValueError, match=missing):
    _update(tx, **{missing: None})


def test_missing_params():
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  params = init_params()
  with pytest.raises(ValueError, match="params"):
    tx.update(
      params,
      tx.init(params),
      None,
      loss_fn=loss_fn,
      batch=BATCHES[0],
      labels=BATCHES[0]["y"],
    )


@pytest.mark.parametrize(
  "bad_loss_fn, match",
  [
    (lambda p, b: jnp.mean(loss_fn(p, b)), "per-example"),
    (lambda p, b: loss_fn(p, b)[:-1], "per-example"),
    (lambda p, b: loss_fn(p, b)[:, None], "per-example"),
  ],
  ids=["scalar", "short", "2d"],
)
def test_bad_loss_fn(bad_loss_fn, match):
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  with pytest.raises(ValueError, match=match):
    _update(tx, loss_fn=bad_loss_fn)


@pytest.mark.parametrize(
  "mask_fn, error",
  [
    (lambda y: jnp.ones((BATCH + 1,), bool), ValueError),
    (lambda y: jnp.ones((BATCH, 1), bool), ValueError),
    (lambda y: jnp.ones((), bool), ValueError),
    (lambda y: (y == 3).astype(jnp.int32), TypeError),
    (lambda y: 1.25 * (y == 3), ValueError),
    (lambda y: -0.25 * (y == 3), ValueError),
    (lambda y: jnp.where(y == 3, jnp.nan, 0.0), ValueError),
  ],
  ids=["long", "2d", "scalar", "int", "above_one", "negative", "nan"],
)
def test_bad_tail_mask(mask_fn, error):
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, mask_fn)
  with pytest.raises(error, match="tail_mask_fn"):
    _update(tx)


def test_inject_hyperparams_without_static_args_says_what_to_write():
  """inject_hyperparams calls tail_mask_fn as a schedule of the step count."""
  tx = optax.inject_hyperparams(imbsam_jax.imbsam)(optax.sgd(0.1), 0.05, HARD_MASK)
  with pytest.raises(TypeError, match=r"static_args=\('tail_mask_fn',\)"):
    tx.init(init_params())


def test_inconsistent_batch():
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  batch = {"x": BATCHES[0]["x"], "y": BATCHES[0]["y"][:-1]}
  params = init_params()
  with pytest.raises(ValueError, match="leading axis"):
    tx.update(
      clean_grads(params, BATCHES[0]),
      tx.init(params),
      params,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
    )


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"rho": -0.1}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": "big"}, TypeError, "rho"),
    ({"rho": True}, TypeError, "rho"),
    ({"rho": jnp.ones(2)}, TypeError, "rho"),
    ({"rho": np.float32(-0.1)}, ValueError, "rho"),
    ({"tail_loss_scale": jnp.array(1, bool)}, TypeError, "tail_loss_scale"),
    ({"tail_loss_scale": float("inf")}, ValueError, "tail_loss_scale"),
    ({"tail_capacity": 0}, ValueError, "tail_capacity"),
    ({"tail_capacity": 2.5}, ValueError, "tail_capacity"),
    ({"tail_capacity": jnp.asarray(4)}, ValueError, "static_args"),
    ({"tail_capacity": "fast"}, ValueError, "'auto'"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"tail_loss_scale": -1.0}, ValueError, "tail_loss_scale"),
    ({"base_tx": optax.sgd}, TypeError, "base_tx"),
    ({"tail_mask_fn": np.ones(3)}, TypeError, "tail_mask_fn"),
    ({"tail_mask_fn": jnp.ones(3)}, TypeError, "static_args"),
    ({"rho": jnp.array(-0.1)}, ValueError, "rho"),
    ({"rho": optax.linear_schedule(-0.1, 0.1, 10)}, ValueError, r"rho\(0\) = -0.1"),
  ],
)
def test_bad_construction(kwargs, error, match):
  args = {"base_tx": optax.sgd(0.1), "rho": 0.05, "tail_mask_fn": HARD_MASK}
  args.update(kwargs)
  with pytest.raises(error, match=match):
    imbsam_jax.imbsam(**args)


# --- tail_capacity="auto" ------------------------------------------------------


def traced_batch_sizes(mask_fn, batch_size, **imbsam_kwargs):
  """The leading sizes of the batches loss_fn is traced with, in one step."""
  sizes = []

  def recording_loss_fn(params, batch):
    sizes.append(batch["x"].shape[0])
    return loss_fn(params, batch)

  tx = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, mask_fn, **imbsam_kwargs)
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(batch_size, 5)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, NUM_CLASSES, size=batch_size), jnp.int32),
  }
  params = init_params()

  def step(params, state, batch):
    updates, state = tx.update(
      clean_grads(params, batch),
      state,
      params,
      loss_fn=recording_loss_fn,
      batch=batch,
      labels=batch["y"],
    )
    return optax.apply_updates(params, updates), state

  jax.jit(step).lower(params, tx.init(params), batch)
  return sizes


@pytest.mark.parametrize("batch_size", [16, 64, 128, 200])
def test_auto_capacity_is_the_suggested_one(batch_size):
  """ "auto" traces exactly the passes of the explicit suggest_tail_capacity k."""
  k = imbsam_jax.suggest_tail_capacity(COUNTS, 20, batch_size)
  assert k == imbsam_jax.capacity_from_tail_fraction(
    HARD_MASK.tail_fraction, batch_size
  )
  auto = traced_batch_sizes(HARD_MASK, batch_size, tail_capacity="auto")
  explicit = traced_batch_sizes(HARD_MASK, batch_size, tail_capacity=k)
  assert auto == explicit
  assert k in auto and k < batch_size  # the gathered passes ran on k examples


def test_auto_capacity_soft_mask_keeps_full_batch_passes():
  """Every example has soft weight > 0: k = B, the full-batch passes."""
  assert SOFT_MASK.tail_fraction == 1.0
  sizes = traced_batch_sizes(SOFT_MASK, BATCH, tail_capacity="auto")
  assert set(sizes) == {BATCH}
  assert sizes == traced_batch_sizes(SOFT_MASK, BATCH)


@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_auto_capacity_matches_exact(mask):
  mask_fn = {"hard": HARD_MASK, "soft": SOFT_MASK}[mask]
  params = init_params()
  batches = [make_batch(s, num_tail=n) for s, n in [(0, 3), (1, 0), (2, 12)]]
  want, _ = run_imbsam(
    imbsam_jax.imbsam(optax.sgd(0.3), 0.2, mask_fn), params, batches, jit=True
  )
  got, _ = run_imbsam(
    imbsam_jax.imbsam(optax.sgd(0.3), 0.2, mask_fn, tail_capacity="auto"),
    params,
    batches,
    jit=True,
  )
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_capacity_own_mask_function():
  """A function of one's own opts in by carrying tail_fraction."""

  def mask_fn(labels):
    return labels == 3

  with pytest.raises(ValueError, match=r"tail_fraction.*integer tail_capacity"):
    imbsam_jax.imbsam(optax.sgd(0.1), 0.05, mask_fn, tail_capacity="auto")
  with pytest.raises(ValueError, match="tail_fraction"):
    imbsam_jax.imbsam(
      optax.sgd(0.1), 0.05, imbsam_jax.labeled_anomaly_mask, tail_capacity="auto"
    )
  mask_fn.tail_fraction = 0.01
  assert 8 in traced_batch_sizes(mask_fn, 64, tail_capacity="auto")
  mask_fn.tail_fraction = 1.5
  with pytest.raises(ValueError, match="tail_fraction"):
    imbsam_jax.imbsam(optax.sgd(0.1), 0.05, mask_fn, tail_capacity="auto")
  mask_fn.tail_fraction = "a lot"
  with pytest.raises(TypeError, match="tail_fraction"):
    imbsam_jax.imbsam(optax.sgd(0.1), 0.05, mask_fn, tail_capacity="auto")


def test_auto_capacity_no_recompilation_and_inject_hyperparams():
  """ "auto" is static: one trace over batches with 0..16 tail examples."""
  tx = optax.inject_hyperparams(imbsam_jax.imbsam, static_args=("tail_mask_fn",))(
    optax.adam(0.05), rho=0.05, tail_mask_fn=HARD_MASK, tail_capacity="auto"
  )
  params, num_traces = run_counting_traces(tx)
  assert num_traces == 1
  chex.assert_tree_all_finite(params)


# --- freezing parameters ---------------------------------------------------------

TRAIN_OUT = {"hidden": False, "out": True}  # a prefix of params: fine-tune the head


def frozen_reference(base_tx, params, batches, rho):
  """ImbSAM on params["out"] alone, params["hidden"] a constant."""
  hidden = params["hidden"]
  out_loss = lambda out, batch: loss_fn({"hidden": hidden, "out": out}, batch)
  out, state = params["out"], base_tx.init(params["out"])
  for batch in batches:
    t = HARD_MASK(batch["y"]).astype(jnp.float32)
    tail = lambda o, b=batch, t=t: jnp.sum(t * out_loss(o, b)) / BATCH
    head = lambda o, b=batch, t=t: jnp.sum((1 - t) * out_loss(o, b)) / BATCH
    g_tail = jax.grad(tail)(out)
    e = optax.tree.scale(rho / optax.tree.norm(g_tail), g_tail)
    g = jax.tree.map(
      jnp.add, jax.grad(head)(out), jax.grad(tail)(jax.tree.map(jnp.add, out, e))
    )
    updates, state = base_tx.update(g, state, out)
    out = optax.apply_updates(out, updates)
  return {"hidden": hidden, "out": out}


def adam_wd():
  return optax.chain(optax.add_decayed_weights(1e-2), optax.adam(0.05))


@pytest.mark.parametrize(
  "trainable",
  [TRAIN_OUT, lambda p: {"hidden": False, "out": {"w": True}}],
  ids=["prefix", "callable"],
)
@pytest.mark.parametrize("capacity", [None, 4])
def test_trainable_freezes_the_rest(trainable, capacity):
  """Frozen: neither perturbed nor updated, out of the norm, no base state."""
  params = init_params()
  tx = imbsam_jax.imbsam(
    adam_wd(), 0.2, HARD_MASK, trainable=trainable, tail_capacity=capacity
  )
  got, state = run_imbsam(tx, params, BATCHES, jit=True)
  want = frozen_reference(adam_wd(), params, BATCHES, 0.2)
  chex.assert_trees_all_equal(got["hidden"], params["hidden"])
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  # Adam's moments exist for the trainable leaves only.
  mu = state.base_state.inner_state[1][0].mu
  assert all(isinstance(m, optax.MaskedNode) for m in mu["hidden"].values())
  assert mu["out"]["w"].shape == (8, 4)


def test_trainable_with_multi_transform_base():
  """The optax idiom for freezing works as base_tx; trainable keeps e off the
  frozen leaves (without it, e would move them)."""
  labels = {"hidden": "frozen", "out": "train"}
  base = optax.multi_transform(
    {"train": adam_wd(), "frozen": optax.set_to_zero()}, labels
  )
  params = init_params()
  tx = imbsam_jax.imbsam(base, 0.2, HARD_MASK, trainable=TRAIN_OUT)
  got, _ = run_imbsam(tx, params, BATCHES, jit=True)
  want = frozen_reference(adam_wd(), params, BATCHES, 0.2)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  untrained, _ = run_imbsam(
    imbsam_jax.imbsam(base, 0.2, HARD_MASK), params, BATCHES, jit=True
  )
  assert float(optax.tree.norm(optax.tree.sub(untrained["out"], want["out"]))) > 1e-4


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_imbsam_inside_masked_says_what_to_write(wrapper):
  inner = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  if wrapper == "masked":
    tx = optax.masked(inner, TRAIN_OUT)
  else:
    tx = optax.multi_transform(
      {"train": inner, "frozen": optax.set_to_zero()},
      {"hidden": "frozen", "out": "train"},
    )
  with pytest.raises(TypeError, match="trainable=mask"):
    jax.jit(lambda: _update(tx))()


@pytest.mark.parametrize(
  "trainable, error",
  [({"hidden": False}, ValueError), ({"hidden": 0, "out": 1}, TypeError)],
)
def test_bad_trainable(trainable, error):
  tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK, trainable=trainable)
  with pytest.raises(error, match="trainable"):
    tx.init(init_params())


# --- composition: what goes inside ----------------------------------------------


def test_clipping_inside_bounds_the_update():
  """imbsam(chain(clip, ...)) clips the ImbSAM gradient; chain(clip, imbsam)
  clips only the clean gradient, so its update is not bounded."""
  clip = optax.clip_by_global_norm(0.01)
  inside = imbsam_jax.imbsam(optax.chain(clip, optax.sgd(1.0)), 0.5, HARD_MASK)
  outside = optax.chain(clip, imbsam_jax.imbsam(optax.sgd(1.0), 0.5, HARD_MASK))
  for batch in BATCHES:
    kwargs = {"batch": batch, "labels": batch["y"]}
    assert float(optax.tree.norm(_update(inside, **kwargs)[0])) <= 0.01 * (1 + 1e-6)
  assert float(optax.tree.norm(_update(outside)[0])) > 0.0101


# --- debug_checks: values known only inside jit ----------------------------------


def update_step(tx, grads_scale=1.0):
  """``(params, state, batch) -> tx.update(...)`` on the clean gradient (times
  ``grads_scale``)."""

  def step(params, state, batch):
    grads = jax.tree.map(lambda g: grads_scale * g, clean_grads(params, batch))
    return tx.update(
      grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
    )

  return step


def checked_step(tx, grads_scale=1.0):
  return checkify.checkify(jax.jit(update_step(tx, grads_scale)))


def run_checked(tx, batch=BATCHES[0], steps=1, rho=None, **kwargs):
  params = init_params()
  state = tx.init(params)
  if rho is not None:  # inject_hyperparams: rho is traced in the step
    state = optax.tree_utils.tree_set(state, rho=rho)
  step = checked_step(tx, **kwargs)
  for _ in range(steps):
    err, (_, state) = step(params, state, batch)
    err.throw()
  return state


@pytest.mark.parametrize(
  "case, match",
  [
    ("negative_rho", "rho must be finite and >= 0"),
    ("schedule_goes_negative", "rho must be finite and >= 0"),
    ("weights_above_one", r"weights in \[0, 1\], got values from 0.0 to 1.25"),
    ("labels_out_of_range", r"class indices in \[0, 4\).* 0 to 7"),
    ("summed_loss_grads", "gradient of mean"),
  ],
)
def test_debug_checks(case, match):
  kwargs, steps, batch = {}, 1, BATCHES[0]
  if case == "negative_rho":  # traced: inject_hyperparams
    tx = optax.inject_hyperparams(imbsam_jax.imbsam, static_args=("tail_mask_fn",))(
      optax.sgd(0.1), 0.05, HARD_MASK, debug_checks=True
    )
    kwargs["rho"] = jnp.float32(-0.05)
  elif case == "schedule_goes_negative":
    rho = optax.linear_schedule(0.1, -0.1, transition_steps=2)
    tx, steps = imbsam_jax.imbsam(optax.sgd(0.1), rho, HARD_MASK, debug_checks=True), 3
  elif case == "weights_above_one":
    mask_fn = lambda y: 1.25 * (y == 3)
    tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, mask_fn, debug_checks=True)
  elif case == "labels_out_of_range":
    tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK, debug_checks=True)
    batch = dict(batch, y=batch["y"].at[0].set(7))
  else:
    tx = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK, debug_checks=True)
    kwargs["grads_scale"] = BATCH  # the gradient of the sum, not the mean
  with pytest.raises(checkify.JaxRuntimeError, match=match):
    run_checked(tx, batch, steps, **kwargs)


def test_debug_checks_pass_and_change_nothing():
  params, batch = init_params(), BATCHES[0]
  checked = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK, debug_checks=True)
  plain = imbsam_jax.imbsam(optax.sgd(0.1), 0.05, HARD_MASK)
  err, (got, _) = checked_step(checked)(params, checked.init(params), batch)
  err.throw()
  want, _ = _update(plain)
  chex.assert_trees_all_close(got, want, atol=1e-7, rtol=1e-6)
  with pytest.raises(
    checkify.JaxRuntimeError, match="gradient of mean"
  ):  # eager: at once
    checked.update(
      jax.tree.map(lambda g: BATCH * g, clean_grads(params, batch)),
      checked.init(params),
      params,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
    )


# --- overflow="nan": a fast path without control flow -------------------------


def control_flow_ops(compiled_text):
  return len(re.findall(r"\b(?:while|conditional)\(", compiled_text))


def test_overflow_nan_is_exact_up_to_capacity_and_nan_beyond():
  """Every tail count 0..B: equal to the exact step while it fits in k, a NaN
  update beyond (never a silently wrong one); the compiled step has no while
  and no conditional, the default ("chunks") has a while."""
  capacity, params = 8, init_params()
  exact = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, HARD_MASK)
  fast = imbsam_jax.imbsam(
    optax.sgd(0.3), 0.2, HARD_MASK, tail_capacity=capacity, overflow="nan"
  )

  stepper = lambda tx: jax.jit(update_step(tx))
  exact_step, fast_step = stepper(exact), stepper(fast)
  for num_tail in range(BATCH + 1):
    batch = make_batch(num_tail, num_tail)
    want, _ = exact_step(params, exact.init(params), batch)
    got, _ = fast_step(params, fast.init(params), batch)
    if num_tail <= capacity:
      chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)
    else:
      assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(got))
  assert fast_step._cache_size() == 1
  args = (params, fast.init(params), BATCHES[0])
  assert control_flow_ops(fast_step.lower(*args).compile().as_text()) == 0
  chunked = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, HARD_MASK, tail_capacity=capacity)
  assert control_flow_ops(stepper(chunked).lower(*args).compile().as_text()) >= 1


def test_overflow_nan_with_inject_hyperparams_and_debug_checks():
  tx = optax.inject_hyperparams(
    imbsam_jax.imbsam, static_args=("tail_mask_fn", "tail_capacity", "overflow")
  )(optax.sgd(0.3), 0.2, HARD_MASK, tail_capacity=4, overflow="nan", debug_checks=True)
  fits, overflows = make_batch(0, num_tail=4), make_batch(1, num_tail=5)
  exact = imbsam_jax.imbsam(optax.sgd(0.3), 0.1, HARD_MASK)
  state = optax.tree_utils.tree_set(tx.init(init_params()), rho=0.1)
  step = checked_step(tx)
  err, (got, _) = step(init_params(), state, fits)
  err.throw()
  want, _ = _update(exact, batch=fits)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)
  err, _ = step(init_params(), state, overflows)
  with pytest.raises(checkify.JaxRuntimeError, match="5 tail examples, more than"):
    err.throw()


def test_overflow_nan_with_a_soft_mask():
  """A soft mask puts every example in the tail: any k < B overflows (NaN);
  bucket_capacity then picks B, the full-batch path, which is exact."""
  batch = BATCHES[0]
  num_tail = int(jnp.sum(SOFT_MASK(batch["y"]) > 0))
  assert num_tail == BATCH
  small = imbsam_jax.imbsam(
    optax.sgd(0.3), 0.2, SOFT_MASK, tail_capacity=8, overflow="nan"
  )
  assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(_update(small)[0]))
  k = imbsam_jax.bucket_capacity(num_tail, 8, BATCH)
  picked = imbsam_jax.imbsam(
    optax.sgd(0.3), 0.2, SOFT_MASK, tail_capacity=k, overflow="nan"
  )
  exact = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, SOFT_MASK)
  chex.assert_trees_all_close(_update(picked)[0], _update(exact)[0], atol=1e-7)
