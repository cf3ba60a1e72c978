"""ImbSAM's successors as options of the one transform, against their authors' rules.

Each reference is written from its authors' PyTorch step (the order of passes and
the sums over the batch as there), in plain JAX, for a few steps of SGD:
Focal-SAM (scongl/Focal-SAM, ``train_step.focal_sam_step``) and SSE-SAM
(Zemdalk/SSE-SAM, ``ssesam.py``).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_imbsam import (
  BATCHES,
  COUNTS,
  clean_grads,
  init_params,
  loss_fn,
  run_checked,
  run_imbsam,
  run_sam,
  tail_grads_step,
)

import imbsam_jax

TOL = {"atol": 1e-6, "rtol": 1e-6}


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def ascend(params, grads, rho, eps):
  """``w + rho g / (||g|| + eps)``, as SAM's ``first_step``."""
  scale = rho / (global_norm(grads) + eps)
  return jax.tree.map(lambda w, g: w + scale * g, params, grads)


def focal_sam_reference(params, batch, counts, *, rho, gamma, lam):
  """Focal-SAM's gradient: one forward, a backward of ``sum (1 - c_y) l / B``
  (kept), one of ``sum c_y l / B`` (the ascent), a backward at ``w + e`` added."""
  c = lam * (1 - jnp.asarray(counts) / np.sum(counts)) ** gamma
  coefficient = c[batch["y"]]
  size = batch["y"].shape[0]
  rest = lambda p: jnp.sum((1 - coefficient) * loss_fn(p, batch)) / size
  focal = lambda p: jnp.sum(coefficient * loss_fn(p, batch)) / size
  kept = jax.grad(rest)(params)
  perturbed = ascend(params, jax.grad(focal)(params), rho, 1e-12)
  return jax.tree.map(jnp.add, kept, jax.grad(focal)(perturbed))


def sse_sam_reference(params, batch, counts, *, eta, rho_head, rho_tail):
  """SSE-SAM's gradient: head and tail losses (sums over their examples / B),
  each ascended along its own gradient, the two perturbed gradients summed."""
  tail = jnp.asarray(counts)[batch["y"]] < eta
  size = batch["y"].shape[0]
  head_loss = lambda p: jnp.sum(jnp.where(tail, 0.0, loss_fn(p, batch))) / size
  tail_loss = lambda p: jnp.sum(jnp.where(tail, loss_fn(p, batch), 0.0)) / size
  grads = []
  for loss, rho in ((head_loss, rho_head), (tail_loss, rho_tail)):
    perturbed = ascend(params, jax.grad(loss)(params), rho, 1e-16)
    grads.append(jax.grad(loss)(perturbed))
  return jax.tree.map(jnp.add, *grads)


def run_reference_sgd(reference, params, batches, lr=0.3, **kwargs):
  for batch in batches:
    g = reference(params, batch, COUNTS, **kwargs)
    params = jax.tree.map(lambda w, d: w - lr * d, params, g)
  return params


@pytest.mark.parametrize("gamma, lam", [(3.2, 0.8), (1.0, 0.5), (0.0, 1.0)])
def test_focal_sam_matches_reference(gamma, lam):
  params = init_params()
  mask_fn = imbsam_jax.focal_tail_mask_from_counts(COUNTS, gamma, lam=lam)
  tx = imbsam_jax.imbsam(optax.sgd(0.3), 0.3, mask_fn)
  got, state = run_imbsam(tx, params, BATCHES, jit=True)
  want = run_reference_sgd(
    focal_sam_reference, params, BATCHES, rho=0.3, gamma=gamma, lam=lam
  )
  chex.assert_trees_all_close(got, want, **TOL)
  weights = np.asarray(mask_fn(BATCHES[-1]["y"]))
  np.testing.assert_allclose(state.tail_fraction, weights.mean(), rtol=1e-6)


def test_focal_sam_with_all_weights_one_is_sam():
  """gamma = 0, lam = 1: every example's whole loss is perturbed, SAM."""
  params = init_params()
  mask_fn = imbsam_jax.focal_tail_mask_from_counts(COUNTS, 0.0, lam=1.0)
  got, _ = run_imbsam(
    imbsam_jax.imbsam(optax.sgd(0.3), 0.1, mask_fn), params, BATCHES, jit=True
  )
  chex.assert_trees_all_close(got, run_sam(params, BATCHES, 0.1), **TOL)


def test_focal_weights():
  w = imbsam_jax.focal_tail_weights(COUNTS, 2.0, lam=0.5)
  prior = COUNTS / COUNTS.sum()
  np.testing.assert_allclose(w, 0.5 * (1 - prior) ** 2, rtol=1e-6)
  assert imbsam_jax.focal_tail_mask_from_counts(COUNTS, 2.0).tail_fraction == 1.0
  with pytest.raises(ValueError, match="lam must be in"):
    imbsam_jax.focal_tail_weights(COUNTS, 2.0, lam=1.5)
  with pytest.raises(ValueError, match="gamma must be"):
    imbsam_jax.focal_tail_weights(COUNTS, -1.0)
  with pytest.raises(ValueError, match="not all be zero"):
    imbsam_jax.focal_tail_weights([0, 0], 1.0)


def sse_sam(rho_head, rho_tail=0.1, eta=20, eps=1e-16, **kwargs):
  """SSE-SAM (its reference's eps) on SGD."""
  mask_fn = imbsam_jax.tail_mask_from_counts(COUNTS, eta=eta)
  return imbsam_jax.imbsam(
    optax.sgd(0.3), rho_tail, mask_fn, head_rho=rho_head, eps=eps, **kwargs
  )


@pytest.mark.parametrize("rho_head, rho_tail, eta", [(0.05, 0.1, 20), (0.3, 0.05, 30)])
def test_sse_sam_matches_reference(rho_head, rho_tail, eta):
  params = init_params()
  got, _ = run_imbsam(sse_sam(rho_head, rho_tail, eta), params, BATCHES, jit=True)
  want = run_reference_sgd(
    sse_sam_reference, params, BATCHES, eta=eta, rho_head=rho_head, rho_tail=rho_tail
  )
  chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize("capacity", [None, 2])
def test_sse_sam_fast_path_and_handed_in_tail_grads(capacity):
  """Gathered tail passes (also overflowing: capacity 2 < 5 tail examples) and
  tail_grads from value_and_tail_grads give the same step."""
  params = init_params()
  want, _ = run_imbsam(sse_sam(0.05), params, BATCHES, jit=True)
  tx = sse_sam(0.05, tail_capacity=capacity)
  step = tail_grads_step(tx, imbsam_jax.tail_mask_from_counts(COUNTS, eta=20))
  got, state = params, tx.init(params)
  for batch in BATCHES:
    got, state, _ = step(got, state, batch)
  chex.assert_trees_all_close(got, want, **TOL)


def test_sse_sam_head_rho_zero_is_imbsam():
  params = init_params()
  mask_fn = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)
  imbsam = imbsam_jax.imbsam(optax.sgd(0.3), 0.1, mask_fn)
  want, want_state = run_imbsam(imbsam, params, BATCHES, jit=True)
  got, got_state = run_imbsam(sse_sam(0.0, eps=1e-12), params, BATCHES, jit=True)
  chex.assert_trees_all_close(got, want, **TOL)
  # Same state structure: a run switches from SSE-SAM to ImbSAM mid-training.
  chex.assert_trees_all_equal_structs(got_state, want_state)


def test_sse_sam_switch_to_imbsam_keeps_the_state():
  """SSE-SAM's stage 2: the state of the head-perturbing transform carries on in
  ImbSAM's (momentum and count), as if one transform's head_rho dropped to 0."""
  params = init_params()
  mask_fn = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)
  base = lambda: optax.sgd(0.3, momentum=0.9)
  stage1 = imbsam_jax.imbsam(base(), 0.1, mask_fn, head_rho=0.05)
  stage2 = imbsam_jax.imbsam(base(), 0.1, mask_fn)
  p, state = run_imbsam(stage1, params, BATCHES[:2], jit=True)
  got = p
  for batch in BATCHES[2:]:
    updates, state = stage2.update(
      clean_grads(got, batch),
      state,
      got,
      loss_fn=loss_fn,
      batch=batch,
      labels=batch["y"],
    )
    got = optax.apply_updates(got, updates)
  schedule = lambda count: jnp.where(count < 2, 0.05, 0.0)
  scheduled = imbsam_jax.imbsam(base(), 0.1, mask_fn, head_rho=schedule)
  want, want_state = run_imbsam(scheduled, params, BATCHES, jit=True)
  chex.assert_trees_all_close(got, want, **TOL)
  assert int(state.count) == int(want_state.count) == len(BATCHES)


def test_sse_sam_frozen_parameters_stay():
  params = init_params()
  trainable = {"hidden": False, "out": True}
  got, _ = run_imbsam(sse_sam(0.2, trainable=trainable), params, BATCHES, jit=True)
  chex.assert_trees_all_equal(got["hidden"], params["hidden"])
  assert not np.allclose(got["out"]["w"], params["out"]["w"])


def test_head_rho_is_checked():
  mask_fn = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)
  with pytest.raises(ValueError, match="head_rho must be finite"):
    imbsam_jax.imbsam(optax.sgd(0.1), 0.1, mask_fn, head_rho=-0.1)
  with pytest.raises(ValueError, match="head_rho's schedule"):
    imbsam_jax.imbsam(optax.sgd(0.1), 0.1, mask_fn, head_rho=lambda c: -1.0 + 0 * c)


def test_debug_checks_catch_a_head_rho_schedule_going_negative():
  mask_fn = imbsam_jax.tail_mask_from_counts(COUNTS, eta=20)
  schedule = lambda count: 0.05 - 0.1 * count  # checked at 0 only when built
  tx = imbsam_jax.imbsam(
    optax.sgd(0.1), 0.1, mask_fn, head_rho=schedule, debug_checks=True
  )
  run_checked(tx, steps=1)
  with pytest.raises(Exception, match="head_rho must be finite and >= 0"):
    run_checked(tx, steps=2)
