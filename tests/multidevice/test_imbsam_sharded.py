"""ImbSAM on 8 devices equals ImbSAM on one (jit + sharding, shard_map, pmap).

Run through tests/test_multidevice.py, which sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax starts.
"""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imbsam_jax

NUM_DEVICES = 8
BATCH = 32  # global; 4 examples per device
COUNTS = np.array([400, 120, 25, 5])
MASKS = {
  "hard": imbsam_jax.tail_mask_from_counts(COUNTS, eta=20),
  "soft": imbsam_jax.soft_tail_mask_from_counts(COUNTS, eta=30, temperature=0.7),
}
RHO = 0.2

pytestmark = pytest.mark.skipif(
  jax.device_count() != NUM_DEVICES, reason="needs 8 (simulated) devices"
)


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "hidden": {"w": 0.5 * jax.random.normal(k1, (5, 8)), "b": jnp.zeros(8)},
    "out": {"w": 0.5 * jax.random.normal(k2, (8, 4))},
  }


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
  logits = h @ params["out"]["w"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def make_batch(seed):
  """Tail examples (class 3) spread unevenly: some devices get none, one gets 3."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, size=BATCH)
  y[[1, 5, 6, 7, 20]] = 3
  return {
    "x": jnp.asarray(rng.normal(size=(BATCH, 5)), jnp.float32),
    "y": jnp.asarray(y, jnp.int32),
  }


BATCHES = [make_batch(s) for s in range(3)]
MESH = jax.make_mesh((NUM_DEVICES,), ("data",))


def make_tx(mask, **kwargs):
  return imbsam_jax.imbsam(optax.sgd(0.3, momentum=0.9), RHO, MASKS[mask], **kwargs)


def plain_step(tx, params, state, batch, tail_mask_fn=None):
  """With tail_mask_fn, grads and tail_grads come from value_and_tail_grads."""
  extra = {}
  if tail_mask_fn is not None:
    _, grads, extra["tail_grads"] = imbsam_jax.value_and_tail_grads(
      loss_fn, params, batch, tail_mask_fn(batch["y"])
    )
  else:
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
  updates, state = tx.update(
    grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"], **extra
  )
  return optax.apply_updates(params, updates), state


def run(step, params, state, batches):
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


def run_without_recompiles(step, params, state, batches):
  """Runs jitted ``step``; after the first two calls its cache must not grow.

  Inputs placed by hand (single-device arrays, or P() under Explicit axes) and
  the outputs jax returns (mesh-replicated, P(None, ...)) are different cache
  keys, so a second call may compile once more; plain optax.sgd does the same.
  """
  params, state = run(step, params, state, batches[:2])
  steady = step._cache_size()
  params, state = run(step, params, state, batches[2:])
  assert steady <= 2 and step._cache_size() == steady
  return params, state


@functools.cache
def single_device(mask):
  """The 1-device result every multi-device variant must reproduce."""
  tx = make_tx(mask)
  step = jax.jit(functools.partial(plain_step, tx))
  params = init_params()
  return run(step, params, tx.init(params), BATCHES)


def assert_matches_single_device(params, state, mask):
  want_params, want_state = single_device(mask)
  chex.assert_trees_all_close(params, want_params, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(state.tail_grad_norm, want_state.tail_grad_norm, rtol=1e-5)
  np.testing.assert_allclose(state.tail_fraction, want_state.tail_fraction, rtol=1e-6)


AUTO_MESH = jax.make_mesh(
  (NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
)


def slow_unless(default, *values, id):
  """A parametrize case: in the default run if ``default``, else under ``-m slow``."""
  return pytest.param(*values, id=id, marks=() if default else pytest.mark.slow)


NAMED_SHARDING_CASES = (  # (mask, capacity, grads_from)
  # handed-in tail_grads skip the pass at w: two suffice
  [("hard", c, "grad") for c in (None, 4, 2, "auto")]
  + [("hard", c, "value_and_tail_grads") for c in (None, "auto")]
  # Soft weights meet the sharding only through the batch: the exact and gathered
  # paths suffice.
  + [("soft", c, "grad") for c in (None, 2)]
)


def named_sharding_params():
  """Every case x axis type x with/without jax.set_mesh (32). The default run
  takes a pairwise cover (16): each case under both axis types, with set_mesh
  under one of them and without it under the other, so every case meets both
  axis types and both set_mesh settings, and each (axis type, set_mesh) pair
  meets 4 cases, all four of them with a gathered (capacity) path. The other
  half runs under ``-m slow``."""
  params = []
  for set_mesh in (True, False):
    for j, axis_type in enumerate(("auto", "explicit")):
      for i, (mask, capacity, grads_from) in enumerate(NAMED_SHARDING_CASES):
        default = set_mesh == ((i + j) % 2 == 0)
        name = "set_mesh" if set_mesh else "no_set_mesh"
        params.append(
          slow_unless(
            default,
            mask,
            capacity,
            axis_type,
            set_mesh,
            grads_from,
            id=f"{name}-{axis_type}-{mask}-{capacity}-{grads_from}",
          )
        )
  return params


@pytest.mark.parametrize(
  "mask, capacity, axis_type, set_mesh, grads_from", named_sharding_params()
)
def test_jit_with_named_sharding(mask, capacity, axis_type, set_mesh, grads_from):
  """GSPMD (Auto axes) and sharding in types (Explicit axes, jax.make_mesh's
  default), with and without jax.set_mesh: nothing to configure."""
  mesh = AUTO_MESH if axis_type == "auto" else MESH
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    tx = make_tx(mask, tail_capacity=capacity)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(init_params(), replicated)
    state = jax.device_put(tx.init(params), replicated)
    batches = [jax.device_put(b, batch_sharding) for b in BATCHES]
    assert len(batches[0]["x"].sharding.device_set) == NUM_DEVICES
    tail_mask_fn = MASKS[mask] if grads_from == "value_and_tail_grads" else None
    step = jax.jit(functools.partial(plain_step, tx, tail_mask_fn=tail_mask_fn))
    params, state = run_without_recompiles(step, params, state, batches)
  assert_matches_single_device(params, state, mask)


def shard_map_step(tx, mask, grads_from, params, state, batch):
  """Per-device code: batch is this device's 4 examples."""
  extra = {}
  if grads_from == "value_and_tail_grads":
    _, grads, extra["tail_grads"] = imbsam_jax.value_and_tail_grads(
      loss_fn, params, batch, MASKS[mask](batch["y"]), axis_name="data"
    )
  else:  # the gradient of the global mean loss
    grads = jax.grad(lambda p: jax.lax.pmean(jnp.mean(loss_fn(p, batch)), "data"))(
      params
    )
  updates, state = tx.update(
    grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"], **extra
  )
  return optax.apply_updates(params, updates), state


def sharded(step):
  return jax.jit(
    jax.shard_map(step, mesh=MESH, in_specs=(P(), P(), P("data")), out_specs=(P(), P()))
  )


#: (mask, capacity, grads_from) of the default run: a pairwise cover of the 12
#: (each mask with each capacity, each capacity and each mask with both gradient
#: sources); the other 6 run under ``-m slow``.
SHARD_MAP_DEFAULT = {
  ("hard", None, "value_and_tail_grads"),
  ("soft", None, "pmean_loss"),
  ("hard", 2, "pmean_loss"),
  ("soft", 2, "value_and_tail_grads"),
  ("hard", 1, "value_and_tail_grads"),
  ("soft", 1, "pmean_loss"),
}


@pytest.mark.parametrize(
  "mask, capacity, grads_from",
  [
    slow_unless(
      (mask, capacity, grads_from) in SHARD_MAP_DEFAULT,
      mask,
      capacity,
      grads_from,
      id=f"{grads_from}-{capacity}-{mask}",
    )
    for grads_from in ("value_and_tail_grads", "pmean_loss")
    for capacity in (None, 2, 1)
    for mask in ("hard", "soft")
  ],
)
def test_shard_map_with_axis_name(mask, capacity, grads_from):
  tx = make_tx(mask, axis_name="data", tail_capacity=capacity)
  step = sharded(functools.partial(shard_map_step, tx, mask, grads_from))
  params = init_params()
  batches = [jax.device_put(b, NamedSharding(MESH, P("data"))) for b in BATCHES]
  params, state = run_without_recompiles(step, params, tx.init(params), batches)
  assert_matches_single_device(params, state, mask)


def pmap_step(tx, params, state, batch):
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)  # per device
  updates, state = tx.update(
    grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
  )
  return optax.apply_updates(params, updates), state


def per_device(batch):
  return jax.tree.map(lambda x: x.reshape(NUM_DEVICES, -1, *x.shape[1:]), batch)


def unreplicate(tree):
  leaves = jax.tree.leaves(tree)
  for leaf in leaves:  # every replica holds the same values
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  return jax.tree.map(lambda x: x[0], tree)


@pytest.mark.parametrize(
  "mask, capacity",  # the default run: each mask and each capacity once
  [
    slow_unless(default, mask, capacity, id=f"{capacity}-{mask}")
    for capacity, mask, default in [
      (None, "hard", False),
      (None, "soft", True),
      (2, "hard", True),
      (2, "soft", False),
    ]
  ],
)
def test_pmap_with_axis_name(mask, capacity):
  tx = make_tx(mask, axis_name="data", tail_capacity=capacity)
  step = jax.pmap(functools.partial(pmap_step, tx), axis_name="data")
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), tree)
  params = replicate(init_params())
  state = replicate(tx.init(init_params()))
  params, state = run(step, params, state, [per_device(b) for b in BATCHES])
  assert_matches_single_device(unreplicate(params), unreplicate(state), mask)


@functools.partial(jax.jit, static_argnums=0)
def m_sharpness_piece(mask, params, local):
  """One device's gradient: the head's at w plus the tail's at w + e (own e)."""
  t = MASKS[mask](local["y"]).astype(jnp.float32)
  tail = lambda p: jnp.sum(t * loss_fn(p, local)) / 4
  head = lambda p: jnp.sum((1 - t) * loss_fn(p, local)) / 4
  g_tail = jax.grad(tail)(params)
  norm = optax.tree.norm(g_tail)
  scale = jnp.where(norm > 0, RHO / (norm + 1e-12), 0.0)
  e = jax.tree.map(lambda g: scale * g, g_tail)
  g_adv = jax.grad(tail)(jax.tree.map(jnp.add, params, e))
  return jax.tree.map(jnp.add, jax.grad(head)(params), g_adv)


@functools.cache
def m_sharpness_reference(mask):
  """Each device perturbs along its own tail gradient; gradients are averaged."""
  params = init_params()
  base = optax.sgd(0.3, momentum=0.9)
  state = base.init(params)
  for batch in BATCHES:
    pieces = []
    for d in range(NUM_DEVICES):
      local = jax.tree.map(lambda x, d=d: x[4 * d : 4 * d + 4], batch)
      pieces.append(m_sharpness_piece(mask, params, local))
    g = jax.tree.map(lambda *xs: sum(xs) / NUM_DEVICES, *pieces)
    updates, state = base.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_per_device_perturbation_is_m_sharpness(mask):
  tx = make_tx(mask, axis_name="data", per_device_perturbation=True)
  step = sharded(functools.partial(shard_map_step, tx, mask, "value_and_tail_grads"))
  params = init_params()
  batches = [jax.device_put(b, NamedSharding(MESH, P("data"))) for b in BATCHES]
  params, _ = run(step, params, tx.init(params), batches)
  chex.assert_trees_all_close(params, m_sharpness_reference(mask), atol=1e-5, rtol=1e-5)
  # ... and it is a different method from the global perturbation.
  global_params, _ = single_device(mask)
  diff = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), params, global_params
  )
  assert max(jax.tree.leaves(diff)) > 1e-3


def test_pmap_without_axis_name_is_per_device():
  """axis_name=None under pmap: no collectives; averaging left to base_tx."""
  average = optax.stateless(lambda g, _: jax.lax.pmean(g, "data"))
  tx = imbsam_jax.imbsam(
    optax.chain(average, optax.sgd(0.3, momentum=0.9)), RHO, MASKS["hard"]
  )
  step = jax.pmap(functools.partial(pmap_step, tx), axis_name="data")
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), tree)
  params, _ = run(
    step,
    replicate(init_params()),
    replicate(tx.init(init_params())),
    [per_device(b) for b in BATCHES],
  )
  chex.assert_trees_all_close(
    unreplicate(params), m_sharpness_reference("hard"), atol=1e-5, rtol=1e-5
  )


def test_multisteps_sharded():
  """Gradient accumulation composes: imbsam(MultiSteps(...)) under sharding."""
  tx = imbsam_jax.imbsam(
    optax.MultiSteps(optax.sgd(0.3), every_k_schedule=3), RHO, MASKS["hard"]
  )
  step = jax.jit(functools.partial(plain_step, tx))
  params = init_params()
  want, _ = run(step, params, tx.init(params), BATCHES)
  sharding = NamedSharding(MESH, P("data"))
  got, _ = run(
    step,
    jax.device_put(params, NamedSharding(MESH, P())),
    tx.init(params),
    [jax.device_put(b, sharding) for b in BATCHES],
  )
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  # One update after 3 micro-batches: parameters moved.
  assert (
    max(
      jax.tree.leaves(
        jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, params)
      )
    )
    > 0
  )


def test_bfloat16_sharded_keeps_dtype():
  tx = make_tx("hard", axis_name="data")
  step = sharded(functools.partial(shard_map_step, tx, "hard", "value_and_tail_grads"))
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params())
  batches = [
    jax.device_put(
      {"x": b["x"].astype(jnp.bfloat16), "y": b["y"]}, NamedSharding(MESH, P("data"))
    )
    for b in BATCHES
  ]
  params_out, state = run(step, params, tx.init(params), batches)
  chex.assert_trees_all_equal_dtypes(params_out, params)
  chex.assert_tree_all_finite(params_out)
  assert state.tail_grad_norm.dtype == jnp.float32


@pytest.mark.parametrize("grads_from", ["pmean_loss", "device_loss"])
def test_debug_checks_catch_summed_grads_under_shard_map(grads_from):
  """The mean-gradient check holds for the global mean; a per-device loss
  differentiated w.r.t. replicated params is the sum over devices: caught."""
  tx = make_tx("hard", axis_name="data", debug_checks=True)

  def step(params, state, batch):
    mean = lambda p: jnp.mean(loss_fn(p, batch))
    loss = (
      mean
      if grads_from == "device_loss"
      else (lambda p: jax.lax.pmean(mean(p), "data"))
    )
    updates, state = tx.update(
      jax.grad(loss)(params),
      state,
      params,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
    )
    return optax.apply_updates(params, updates), state

  # Auto axes: checkify's err.throw() itself sorts the per-device errors, which
  # jax 0.10 refuses on Explicit axes (not ours to fix).
  specs = {"in_specs": (P(), P(), P("data")), "out_specs": (P(), P())}
  checked = checkify.checkify(jax.jit(jax.shard_map(step, mesh=AUTO_MESH, **specs)))
  params = init_params()
  batch = jax.device_put(BATCHES[0], NamedSharding(AUTO_MESH, P("data")))
  err, _ = checked(params, tx.init(params), batch)
  if grads_from == "pmean_loss":
    err.throw()
  else:
    with pytest.raises(checkify.JaxRuntimeError, match="gradient of mean"):
      err.throw()


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_overflow_nan_sharded(axis_type):
  """overflow='nan' on 8 devices: the single-device result while the global
  tail (5 examples here) fits in k, a NaN update when it does not."""
  mesh = AUTO_MESH if axis_type == "auto" else MESH
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  batches = [jax.device_put(b, rows) for b in BATCHES]
  params = jax.device_put(init_params(), replicated)
  tx = make_tx("hard", tail_capacity=8, overflow="nan")
  step = jax.jit(functools.partial(plain_step, tx))
  got, state = run(step, params, jax.device_put(tx.init(params), replicated), batches)
  assert_matches_single_device(got, state, "hard")
  small = make_tx("hard", tail_capacity=4, overflow="nan")
  updated, _ = jax.jit(functools.partial(plain_step, small))(
    params, small.init(params), batches[0]
  )
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(updated))


def test_overflow_nan_under_shard_map():
  """Per-device capacity (axis_name): k = 4 holds every device's tail (3 at
  most here) and equals one device; with k = 2 one device overflows, and every
  replica gets the NaN update (the flag is averaged over the axis)."""
  params = init_params()
  batches = [jax.device_put(b, NamedSharding(MESH, P("data"))) for b in BATCHES]
  fits = make_tx("hard", axis_name="data", tail_capacity=4, overflow="nan")
  step = sharded(functools.partial(shard_map_step, fits, "hard", "pmean_loss"))
  got, state = run(step, params, fits.init(params), batches)
  assert_matches_single_device(got, state, "hard")
  small = make_tx("hard", axis_name="data", tail_capacity=2, overflow="nan")
  step = sharded(functools.partial(shard_map_step, small, "hard", "pmean_loss"))
  updated, _ = step(params, small.init(params), batches[0])
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(updated))
