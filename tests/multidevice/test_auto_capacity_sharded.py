"""tail_capacity="auto" on 8 devices: sized from the batch each update sees.

Under ``jax.jit`` with a sharded batch the update sees the global batch; inside
``shard_map`` (``axis_name``) the per-device one. Run through
tests/test_multidevice.py (8 simulated CPU devices).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imbsam_jax

NUM_DEVICES = 8
BATCH = 256  # global; 32 per device
MASK_FN = imbsam_jax.tail_mask_from_counts([400, 120, 25, 5], eta=20)

pytestmark = pytest.mark.skipif(
  jax.device_count() != NUM_DEVICES, reason="needs 8 (simulated) devices"
)
MESH = jax.make_mesh(
  (NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
)


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": 0.5 * jax.random.normal(k1, (5, 8)), "v": jax.random.normal(k2, (8, 4))}


def make_batch(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, size=BATCH)
  y[rng.choice(BATCH, size=5, replace=False)] = 3
  x = jnp.asarray(rng.normal(size=(BATCH, 5)), jnp.float32)
  return {"x": x, "y": jnp.asarray(y, jnp.int32)}


def recording_loss_fn(sizes):
  def loss_fn(params, batch):
    sizes.append(batch["x"].shape[0])
    logits = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  return loss_fn


def step(tx, loss_fn, axis_name, params, state, batch):
  def mean_loss(p):  # the global mean (a per-device one would be summed)
    loss = jnp.mean(loss_fn(p, batch))
    return loss if axis_name is None else jax.lax.pmean(loss, axis_name)

  grads = jax.grad(mean_loss)(params)
  updates, state = tx.update(
    grads, state, params, loss_fn=loss_fn, batch=batch, labels=batch["y"]
  )
  return optax.apply_updates(params, updates), state


def test_auto_capacity_per_device_and_global():
  params, batch = init_params(), make_batch(0)
  k_local = imbsam_jax.capacity_from_tail_fraction(
    MASK_FN.tail_fraction, BATCH // NUM_DEVICES
  )
  k_global = imbsam_jax.capacity_from_tail_fraction(MASK_FN.tail_fraction, BATCH)
  assert k_local < BATCH // NUM_DEVICES and k_global < BATCH

  local_sizes = []
  tx = imbsam_jax.imbsam(
    optax.sgd(0.3), 0.2, MASK_FN, axis_name="data", tail_capacity="auto"
  )
  local = jax.jit(
    jax.shard_map(
      functools.partial(step, tx, recording_loss_fn(local_sizes), "data"),
      mesh=MESH,
      in_specs=(P(), P(), P("data")),
      out_specs=(P(), P()),
    )
  )
  sharded = jax.device_put(batch, NamedSharding(MESH, P("data")))
  got, _ = local(params, tx.init(params), sharded)
  assert k_local in local_sizes and BATCH not in local_sizes

  global_sizes = []
  tx_global = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, MASK_FN, tail_capacity="auto")
  run = jax.jit(
    functools.partial(step, tx_global, recording_loss_fn(global_sizes), None)
  )
  want, _ = run(params, tx_global.init(params), sharded)
  assert k_global in global_sizes and BATCH // NUM_DEVICES not in global_sizes

  exact = imbsam_jax.imbsam(optax.sgd(0.3), 0.2, MASK_FN)
  loss_fn = recording_loss_fn([])
  reference, _ = jax.jit(functools.partial(step, exact, loss_fn, None))(
    params, exact.init(params), batch
  )
  chex.assert_trees_all_close(got, reference, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(want, reference, atol=1e-5, rtol=1e-5)
