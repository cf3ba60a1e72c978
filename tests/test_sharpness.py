"""Tests for imbsam_jax.sharpness against dense Hessians of tiny models."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from imbsam_jax import sharpness

# A 3-4-2 MLP with softmax cross-entropy: 26 parameters. Test data is made with
# NumPy, so that setting up a test compiles nothing.


def _mlp_params(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 2), "b2": (2,)}
  return {
    name: jnp.asarray(rng.normal(size=shape), jnp.float32)
    for name, shape in shapes.items()
  }


def _mlp_loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]


def _data(num_examples: int = 24, seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "x": rng.normal(size=(num_examples, 3)).astype(np.float32),
    "y": (np.arange(num_examples) % 5 < 2).astype(np.int32),  # 40% ones.
  }


def _split(data, weights, num_batches: int):
  """``num_batches`` equal ``(batch, weights)`` pairs."""
  batches = [
    jax.tree.map(lambda x, i=i: np.split(x, num_batches)[i], data)
    for i in range(num_batches)
  ]
  return list(zip(batches, np.split(np.asarray(weights), num_batches), strict=True))


def _flat(tree) -> np.ndarray:
  """Concatenated leaves, in ``ravel_pytree`` order."""
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian_jit(loss_fn, params, batch, weights):
  flat, unravel = ravel_pytree(params)

  def subset_loss(flat_params):
    losses = loss_fn(unravel(flat_params), batch)
    return jnp.sum(weights * losses) / jnp.sum(weights)

  return jax.hessian(subset_loss)(flat)


def _dense_hessian(loss_fn, params, batch, weights) -> np.ndarray:
  """Reference: jax.hessian of the flattened weighted-mean loss."""
  weights = np.asarray(weights, np.float32)
  return np.asarray(_dense_hessian_jit(loss_fn, params, batch, weights), np.float64)


def _top_by_magnitude(hessian: np.ndarray) -> tuple[float, np.ndarray]:
  eigenvalues, eigenvectors = np.linalg.eigh(hessian)
  top = np.argmax(np.abs(eigenvalues))
  return float(eigenvalues[top]), eigenvectors[:, top]


def _random_vector(params, seed: int = 2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
  )


# A quadratic with a chosen Hessian: l_i(theta) = 0.5 theta^T A_i theta, with
# params {"a": (3,), "b": (2, 2)} (7 numbers) and mean_i A_i = Q diag(s) Q^T.


def _quadratic_loss(params, batch):
  flat = jnp.concatenate([params["a"], params["b"].reshape(-1)])
  return 0.5 * jnp.einsum("i,bij,j->b", flat, batch, flat)


def _quadratic_params():
  return {"a": np.ones(3, np.float32), "b": np.ones((2, 2), np.float32)}


def _quadratic_batches(spectrum, *, num_examples=4, num_batches=2, diagonal=False):
  rng = np.random.default_rng(0)
  dim = len(spectrum)
  q = np.eye(dim) if diagonal else np.linalg.qr(rng.normal(size=(dim, dim)))[0]
  target = q @ np.diag(spectrum) @ q.T
  noise = rng.normal(size=(num_examples, dim, dim))
  noise = noise + noise.transpose(0, 2, 1)
  noise -= noise.mean(axis=0)
  if diagonal:
    noise = np.zeros_like(noise)
  matrices = (target + noise).astype(np.float32)
  weights = np.ones(num_examples, np.float32)
  batches = list(
    zip(np.split(matrices, num_batches), np.split(weights, num_batches), strict=True)
  )
  return batches, target


# Hessian-vector products.


def test_hvp_matches_dense_hessian():
  params, data = _mlp_params(), _data(8)
  weights = np.linspace(0.1, 2.0, 8)
  vector = _random_vector(params)
  expected = _dense_hessian(_mlp_loss, params, data, weights) @ _flat(vector)

  result = sharpness.hvp(_mlp_loss, params, data, weights, vector)

  chex.assert_trees_all_equal_structs(result, params)
  chex.assert_trees_all_equal_dtypes(result, params)
  np.testing.assert_allclose(_flat(result), expected, rtol=1e-5, atol=1e-5)


def test_hvp_jitted_equals_eager():
  params, data = _mlp_params(), _data(8)
  weights = data["y"] == 1
  vector = _random_vector(params)
  eager = sharpness.hvp(_mlp_loss, params, data, weights, vector)
  jitted = jax.jit(sharpness.hvp, static_argnums=0)(
    _mlp_loss, params, data, weights, vector
  )
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_subset_hvp_over_batches_matches_dense_hessian():
  params, data = _mlp_params(), _data(24)
  weights = data["y"] == 1
  vector = _random_vector(params)
  expected = _dense_hessian(_mlp_loss, params, data, weights) @ _flat(vector)
  batches = _split(data, weights, 3)

  result = sharpness.subset_hvp(_mlp_loss, params, batches, vector)

  np.testing.assert_allclose(_flat(result), expected, rtol=1e-5, atol=1e-5)


def test_subset_weights_equal_selected_examples_only():
  params, data = _mlp_params(), _data(24)
  selected = np.asarray(data["y"]) == 1
  assert 0 < selected.sum() < 24
  vector = _random_vector(params)
  masked = sharpness.hvp(_mlp_loss, params, data, selected, vector)
  subset = jax.tree.map(lambda x: x[selected], data)
  manual = sharpness.hvp(
    _mlp_loss, params, subset, np.ones(int(selected.sum())), vector
  )
  # Float weights are normalized: scaling them changes nothing.
  scaled = sharpness.hvp(
    _mlp_loss, params, data, 3.0 * selected.astype(np.float32), vector
  )
  chex.assert_trees_all_close(masked, manual, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(scaled, manual, rtol=1e-5, atol=1e-6)


def test_accumulation_over_batches_equals_one_big_batch():
  params, data = _mlp_params(), _data(24)
  weights = np.linspace(0.0, 1.0, 24)
  vector = _random_vector(params)
  one_batch = sharpness.subset_hvp(_mlp_loss, params, [(data, weights)], vector)
  four_batches = sharpness.subset_hvp(
    _mlp_loss,
    params,
    _split(data, weights, 4),
    vector,
  )
  chex.assert_trees_all_close(four_batches, one_batch, rtol=1e-5, atol=1e-6)


def test_no_recompile_across_batches_or_calls():
  num_traces = 0

  def counting_loss(params, batch):
    nonlocal num_traces
    num_traces += 1  # Runs only while tracing.
    return _mlp_loss(params, batch)

  params, data = _mlp_params(), _data(24)
  batches = _split(data, data["y"] == 1, 4)
  vector = _random_vector(params)
  first = sharpness.subset_hvp(counting_loss, params, batches, vector)
  # Bool and float weights share one compilation.
  float_batches = [(batch, weights.astype(np.float32)) for batch, weights in batches]
  second = sharpness.subset_hvp(counting_loss, params, float_batches, vector)
  sharpness.top_hessian_eigenvalue(
    counting_loss, params, batches, key=jax.random.key(0), max_iters=3
  )
  sharpness.hessian_trace(
    counting_loss, params, batches, key=jax.random.key(0), num_probes=3
  )
  assert num_traces == 1
  chex.assert_trees_all_equal(first, second)


def test_callable_batches_and_one_shot_iterators():
  params, data = _mlp_params(), _data(24)
  batch_list = _split(data, data["y"] == 0, 3)
  vector = _random_vector(params)
  from_list = sharpness.subset_hvp(_mlp_loss, params, batch_list, vector)
  from_callable = sharpness.subset_hvp(
    _mlp_loss, params, lambda: (pair for pair in batch_list), vector
  )
  chex.assert_trees_all_equal(from_callable, from_list)
  with pytest.raises(TypeError, match="one-shot iterator"):
    sharpness.subset_hvp(_mlp_loss, params, iter(batch_list), vector)


def test_bfloat16_params_accumulate_in_float32():
  params, data = _mlp_params(), _data(24)
  weights = data["y"] == 1
  batches = _split(data, weights, 3)
  vector = _random_vector(params)
  params_bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  result = sharpness.subset_hvp(_mlp_loss, params_bf16, batches, vector)
  reference = sharpness.subset_hvp(_mlp_loss, params, batches, vector)
  for leaf in jax.tree.leaves(result):
    assert leaf.dtype == jnp.float32
  scale = float(np.max(np.abs(_flat(reference))))
  chex.assert_trees_all_close(result, reference, atol=0.05 * scale)


# Top eigenvalue.


def test_top_eigenvalue_matches_eigh():
  params, data = _mlp_params(), _data(24)
  weights = data["y"] == 1
  batches = _split(data, weights, 3)
  expected_value, expected_vector = _top_by_magnitude(
    _dense_hessian(_mlp_loss, params, data, weights)
  )

  result = sharpness.top_hessian_eigenvalue(
    _mlp_loss, params, batches, key=jax.random.key(0), max_iters=1000, tol=1e-6
  )

  assert result.converged
  assert result.num_iters < 1000
  np.testing.assert_allclose(result.eigenvalue, expected_value, rtol=1e-3)
  flat_vector = _flat(result.eigenvector)
  np.testing.assert_allclose(np.linalg.norm(flat_vector), 1.0, rtol=1e-5)
  np.testing.assert_allclose(abs(flat_vector @ expected_vector), 1.0, atol=1e-3)
  chex.assert_trees_all_equal_structs(result.eigenvector, params)


def test_top_eigenvalue_is_largest_magnitude_even_if_negative():
  batches, target = _quadratic_batches([-6.0, 3.0, 2.0, 1.0, 0.5, -0.5, 0.1])
  result = sharpness.top_hessian_eigenvalue(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(3),
    tol=1e-6,
  )
  expected_value, expected_vector = _top_by_magnitude(target)
  np.testing.assert_allclose(expected_value, -6.0, rtol=1e-9)
  assert result.converged
  np.testing.assert_allclose(result.eigenvalue, -6.0, rtol=1e-4)
  flat_vector = _flat(result.eigenvector)
  np.testing.assert_allclose(abs(flat_vector @ expected_vector), 1.0, atol=1e-3)


def test_top_eigenvalue_is_deterministic_given_key():
  batches, _ = _quadratic_batches([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1])
  run = lambda seed: sharpness.top_hessian_eigenvalue(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(seed),
    max_iters=5,
    tol=0.0,
  )
  first, second, other = run(7), run(7), run(8)
  assert first.eigenvalue == second.eigenvalue
  chex.assert_trees_all_equal(first.eigenvector, second.eigenvector)
  assert first.eigenvalue != other.eigenvalue


def test_max_iters_bounds_power_iteration():
  # lambda_2 / lambda_1 = 0.99: slow convergence.
  batches, _ = _quadratic_batches([10.0, 9.9, 1.0, 1.0, 1.0, 1.0, 1.0])
  slow = sharpness.top_hessian_eigenvalue(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(0),
    max_iters=3,
    tol=1e-7,
  )
  assert (slow.num_iters, slow.converged) == (3, False)
  # A wide gap converges long before max_iters.
  batches, _ = _quadratic_batches([10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  fast = sharpness.top_hessian_eigenvalue(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(0),
    max_iters=100,
    tol=1e-4,
  )
  assert fast.converged
  assert fast.num_iters < 20
  np.testing.assert_allclose(fast.eigenvalue, 10.0, rtol=1e-4)


def test_flat_loss_has_zero_curvature():
  linear_loss = lambda params, x: x @ params
  batches = [(jnp.ones((4, 3)), jnp.ones(4))]
  params = jnp.zeros(3)
  eig = sharpness.top_hessian_eigenvalue(
    linear_loss, params, batches, key=jax.random.key(0)
  )
  assert (eig.eigenvalue, eig.num_iters, eig.converged) == (0.0, 1, True)
  trace = sharpness.hessian_trace(
    linear_loss, params, batches, key=jax.random.key(0), num_probes=2
  )
  assert (trace.trace, trace.stderr) == (0.0, 0.0)


# Hutchinson trace.


def test_trace_matches_dense_hessian():
  params, data = _mlp_params(), _data(24)
  weights = data["y"] == 1
  batches = _split(data, weights, 3)
  expected = float(np.trace(_dense_hessian(_mlp_loss, params, data, weights)))

  result = sharpness.hessian_trace(
    _mlp_loss, params, batches, key=jax.random.key(0), num_probes=100
  )

  assert result.num_probes == 100
  assert result.stderr > 0
  assert abs(result.trace - expected) <= 4 * result.stderr


def test_trace_converges_with_many_probes():
  spectrum = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1]
  batches, target = _quadratic_batches(spectrum)
  result = sharpness.hessian_trace(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(0),
    num_probes=1000,
  )
  # Hutchinson's variance with Rademacher probes: 2 sum_{i != j} H_ij^2.
  off_diagonal = target - np.diag(np.diag(target))
  expected_stderr = np.sqrt(2 * np.sum(off_diagonal**2) / 1000)
  np.testing.assert_allclose(result.stderr, expected_stderr, rtol=0.2)
  assert abs(result.trace - sum(spectrum)) <= 4 * expected_stderr
  np.testing.assert_allclose(result.trace, sum(spectrum), rtol=0.03)


def test_trace_is_exact_for_a_diagonal_hessian():
  spectrum = [5.0, 4.0, -3.0, 2.0, 1.0, 0.5, 0.25]
  batches, _ = _quadratic_batches(spectrum, diagonal=True)
  result = sharpness.hessian_trace(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(0),
    num_probes=4,
  )
  np.testing.assert_allclose(result.trace, sum(spectrum), rtol=1e-6)
  assert result.stderr == 0.0


def test_trace_is_deterministic_given_key():
  batches, _ = _quadratic_batches([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1])
  run = lambda seed, num_probes: sharpness.hessian_trace(
    _quadratic_loss,
    _quadratic_params(),
    batches,
    key=jax.random.key(seed),
    num_probes=num_probes,
  )
  assert run(0, 8) == run(0, 8)
  assert run(0, 8) != run(1, 8)
  single = run(0, 1)
  assert single.num_probes == 1 and np.isnan(single.stderr)


# Flax NNX model in eval mode: the module knows nothing about Flax.


def test_nnx_model_in_eval_mode():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.linear1 = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)
      self.linear2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.linear2(jnp.tanh(self.norm(self.linear1(x))))

  model = Model(nnx.Rngs(0))
  running_mean = jnp.array([0.1, -0.2, 0.3, 0.0])
  model.norm.mean[...] = running_mean
  model.norm.var[...] = jnp.array([0.5, 2.0, 1.0, 1.5])
  model.eval()  # BatchNorm uses (and keeps) its running statistics.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)
    log_probs = jax.nn.log_softmax(model(batch["x"]))
    return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]

  data = _data(24)
  weights = data["y"] == 1
  batches = _split(data, weights, 3)
  vector = _random_vector(params)
  hessian = _dense_hessian(loss_fn, params, data, weights)

  result = sharpness.subset_hvp(loss_fn, params, batches, vector)
  eig = sharpness.top_hessian_eigenvalue(
    loss_fn, params, batches, key=jax.random.key(0), max_iters=1000, tol=1e-6
  )

  chex.assert_trees_all_equal_structs(result, params)
  np.testing.assert_allclose(
    _flat(result),
    hessian @ _flat(vector),
    rtol=1e-5,
    atol=1e-5,
  )
  assert eig.converged
  np.testing.assert_allclose(eig.eigenvalue, _top_by_magnitude(hessian)[0], rtol=1e-3)
  np.testing.assert_array_equal(rest["norm"]["mean"][...], running_mean)


# Data parallelism: a batch sharded across (simulated) devices.

_SHARDED_SCRIPT = textwrap.dedent(
  """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from imbsam_jax import sharpness

    assert jax.device_count() == 4, jax.devices()
    loss_fn = lambda w, b: jnp.tanh(b["x"] @ w) ** 2 + 0.1 * (b["x"] @ w) ** 4
    kx, kw, kv = jax.random.split(jax.random.key(0), 3)
    data = {"x": jax.random.normal(kx, (16, 5))}
    weights = jnp.arange(16) % 3 == 0
    params = jax.random.normal(kw, (5,))
    vector = jax.random.normal(kv, (5,))
    batches = [(jax.tree.map(lambda x: x[i:i + 8], data), weights[i:i + 8])
               for i in (0, 8)]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded = [(jax.tree.map(shard, b), shard(w)) for b, w in batches]
    assert len(sharded[0][1].sharding.device_set) == 4
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    expected = sharpness.subset_hvp(loss_fn, params, batches, vector)
    result = sharpness.subset_hvp(loss_fn, replicated, sharded, vector)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    key = jax.random.key(0)
    eig = sharpness.top_hessian_eigenvalue(loss_fn, params, batches, key=key)
    eig_sharded = sharpness.top_hessian_eigenvalue(
        loss_fn, replicated, sharded, key=key)
    np.testing.assert_allclose(eig_sharded.eigenvalue, eig.eigenvalue, rtol=1e-4)
    trace = sharpness.hessian_trace(loss_fn, params, batches, key=key)
    trace_sharded = sharpness.hessian_trace(loss_fn, replicated, sharded, key=key)
    np.testing.assert_allclose(trace_sharded.trace, trace.trace, rtol=1e-4)
    print("OK")
    """
)


@pytest.mark.multidevice
def test_sharded_batches_match_unsharded():
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
  completed = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    cwd=root,
    timeout=120,
    check=False,
  )
  assert completed.returncode == 0, completed.stderr
  assert completed.stdout.strip().endswith("OK")


# Input validation.


def test_bad_inputs_raise_clear_errors():
  params, data = _mlp_params(), _data(8)
  vector = _random_vector(params)
  weights = jnp.ones(8)

  with pytest.raises(ValueError, match="shape \\(B,\\)"):
    sharpness.hvp(_mlp_loss, params, data, jnp.ones((8, 1)), vector)
  with pytest.raises(ValueError, match="leading axis"):
    sharpness.hvp(_mlp_loss, params, data, jnp.ones(7), vector)
  with pytest.raises(TypeError, match="bool or float"):
    sharpness.hvp(_mlp_loss, params, data, jnp.ones(8, jnp.int32), vector)
  with pytest.raises(ValueError, match="total weight 0"):
    sharpness.hvp(_mlp_loss, params, data, jnp.zeros(8, bool), vector)
  with pytest.raises(ValueError, match="total weight 0"):
    sharpness.subset_hvp(_mlp_loss, params, [], vector)
  with pytest.raises(ValueError, match="same tree structure"):
    sharpness.hvp(_mlp_loss, params, data, weights, {"w1": vector["w1"]})
  with pytest.raises(ValueError, match="same leaf shapes"):
    sharpness.hvp(_mlp_loss, params, data, weights, {**vector, "b2": jnp.ones(3)})
  with pytest.raises(ValueError, match="one loss per example"):
    sharpness.hvp(lambda p, b: jnp.mean(_mlp_loss(p, b)), params, data, weights, vector)
  with pytest.raises(ValueError, match="\\(batch, weights\\) pair"):
    sharpness.subset_hvp(_mlp_loss, params, [data], vector)
  with pytest.raises(TypeError, match="float array"):
    sharpness.hvp(
      _mlp_loss,
      {**params, "step": jnp.zeros((), jnp.int32)},
      data,
      weights,
      {**vector, "step": jnp.zeros((), jnp.int32)},
    )

  batches = [(data, weights)]
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_probes"):
    sharpness.hessian_trace(_mlp_loss, params, batches, key=key, num_probes=0)
  with pytest.raises(ValueError, match="max_iters"):
    sharpness.top_hessian_eigenvalue(_mlp_loss, params, batches, key=key, max_iters=0)
  with pytest.raises(ValueError, match="tol"):
    sharpness.top_hessian_eigenvalue(_mlp_loss, params, batches, key=key, tol=-1.0)
  with pytest.raises(TypeError, match="one-shot iterator"):
    sharpness.hessian_trace(_mlp_loss, params, iter(batches), key=key, num_probes=2)
