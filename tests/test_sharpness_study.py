"""Tests of the per-class sharpness study (examples/sharpness_study/).

A tiny long-tailed run (BatchNorm) trained through ``long_tailed.main`` is
measured end to end (schema, finite values, table, plot, restored model,
errors); on a model small enough for ``jax.hessian``, the per-class and group
values match the exact Hessian's top eigenvalue and trace, deterministically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from long_tailed import train as long_tailed
from shared import data
from sharpness_study import study as sharpness_study

TRAIN_COUNTS = [20, 10, 6, 4]  # eta 20: head {0}, tail {1, 2, 3}
ENTRY_KEYS = {
  "num_examples",
  "loss",
  "top_eigenvalue",
  "eigen_converged",
  "eigen_iterations",
  "trace",
  "trace_stderr",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-epoch imbsam run on tiny 8x8 images (BatchNorm), checkpointed."""
  rng = np.random.default_rng(0)

  def make(counts):
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    x = rng.integers(0, 60, size=(len(y), 8, 8, 1))
    for i, c in enumerate(y):
      x[i, 2 * c : 2 * c + 2] += 180  # class c lights up row block c
    return x.astype(np.uint8), y

  root = tmp_path_factory.mktemp("study")
  (x_train, y_train), (x_test, y_test) = make(TRAIN_COUNTS), make([5] * 4)
  npz = root / "tiny.npz"
  np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  out = root / "runs"
  results = long_tailed.main(
    [
      *(f"--dataset=npz:{npz}", "--out", str(out), "--epochs", "1"),
      *("--model", "small_cnn", "--norm", "batch", "--batch-size", "8"),
      *("--optimizer", "imbsam", "--many-threshold", "100", "--no-progress"),
    ]
  )
  return out, results


STUDY = ["--max-iterations", "4", "--num-probes", "3", "--no-progress"]


@pytest.fixture(scope="module")
def study(trained, tmp_path_factory):
  """The study's results, its output directory and what it printed."""
  runs, _ = trained
  out = tmp_path_factory.mktemp("sharpness")
  args = ["--runs", str(runs), "--out", str(out), "--optimizer", "imbsam", *STUDY]
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    results = sharpness_study.main(args)
  return results, out, printed.getvalue()


def test_study_schema_values_and_plot(study):
  study, out, printed = study
  assert json.loads((out / "sharpness.json").read_text()) == study
  assert (out / "sharpness.png").stat().st_size > 1000
  assert "tail group" in printed and str(out / "sharpness.png") in printed
  assert study["config"]["num_probes"] == 3 and study["config"]["probe_seed"] == 0
  (run,) = study["runs"]
  assert (run["optimizer"], run["seed"]) == ("imbsam", 0)
  assert run["train_counts"] == TRAIN_COUNTS
  assert run["config"]["eta"] == 20 and run["config"]["norm"] == "batch"
  assert run["tail_eta"] == 20 and (run["rho"], run["eta"]) == (0.05, 20)
  assert [e["class"] for e in run["per_class"]] == [0, 1, 2, 3]
  for entry in [*run["per_class"], *run["groups"].values()]:
    assert set(entry) >= ENTRY_KEYS
    for key in ("loss", "top_eigenvalue", "trace", "trace_stderr"):
      assert math.isfinite(entry[key]), (key, entry)
    assert entry["loss"] > 0 and entry["trace_stderr"] > 0
    assert 1 <= entry["eigen_iterations"] <= 4
  for entry, count in zip(run["per_class"], TRAIN_COUNTS, strict=True):
    assert entry["train_count"] == entry["num_examples"] == count
  head, tail = run["groups"]["head"], run["groups"]["tail"]
  assert head["classes"] == [0] and tail["classes"] == [1, 2, 3]
  assert head["num_examples"] == tail["num_examples"] == 20
  # The head group is class 0 alone: the same loss.
  assert head["loss"] == pytest.approx(run["per_class"][0]["loss"], rel=1e-5)


def test_table_means_over_seeds(study):
  run = copy.deepcopy(study[0]["runs"][0])
  for entry in run["per_class"]:
    entry["eigen_converged"] = True
  other_seed = copy.deepcopy(run)
  other_seed["seed"] = 1
  for entry in other_seed["per_class"]:
    entry["top_eigenvalue"] *= 3
  other_seed["per_class"][3]["eigen_converged"] = False
  sgd = {**copy.deepcopy(run), "optimizer": "sgd"}
  lines = sharpness_study.format_table([sgd, run, other_seed]).splitlines()
  assert "seeds 0,1" in lines[0]
  assert "top eigenvalue" in lines[0]
  header = ["class", "images", "eig", "sgd", "eig", "imbsam", "trace", "sgd"]
  assert lines[1].split() == [*header, "trace", "imbsam"]
  eigen = [e["top_eigenvalue"] for e in run["per_class"]]
  trace = [e["trace"] for e in run["per_class"]]
  for c in range(4):  # imbsam: the mean of x and 3x
    want = [str(TRAIN_COUNTS[c]), f"{eigen[c]:.4g}", f"{2 * eigen[c]:.4g}"]
    want += [f"{trace[c]:.4g}"] * 2
    if c == 3:
      want[2] += "*"  # not converged in seed 1
    assert lines[2 + c].split() == [str(c), *want]
  # Thresholds of the run: Many > 100 (none), Medium {0}, Few {1, 2, 3}.
  assert lines[6].split() == ["Many", "(0)", ">100", "-", "-", "-", "-"]
  assert lines[7].split()[:4] == ["Medium", "(1)", "20-100", f"{eigen[0]:.4g}"]
  few = lines[8].split()
  assert few[:3] == ["Few", "(3)", "<20"] and few[4] == f"{2 * np.mean(eigen[1:]):.4g}*"
  assert lines[9].startswith("head group") and lines[10].startswith("tail group")


def test_restored_model_is_the_evaluated_one(trained):
  out, results = trained
  run = results["runs"][0]
  restored = long_tailed.restore(run, out)
  exp, state = restored.experiment, restored.state
  graphdef = long_tailed.build_run(exp, long_tailed.runner.Cell("base", 0, {}))[3]
  model = nnx.merge(graphdef, state.params, state.model_state)
  ds = exp.dataset
  batch = {"image": restored.inputs[:6], "label": ds.y_train[:6]}
  losses = restored.loss_fn(state.params, batch)
  logits = model(restored.inputs[:6])
  want = -jax.nn.log_softmax(logits)[np.arange(6), ds.y_train[:6]]
  np.testing.assert_allclose(losses, want, rtol=1e-5)  # eval-mode training loss
  predictions = jnp.argmax(model(data.to_float(ds.x_test, exp.mean, exp.std)), -1)
  assert float(jnp.mean(predictions == ds.y_test)) == pytest.approx(run["overall"])
  predictions = jnp.argmax(model(data.to_float(ds.x_test, exp.mean, exp.std)), -1)
  assert float(jnp.mean(predictions == ds.y_test)) == pytest.approx(run["overall"])


def test_missing_runs_fail_with_instructions(trained, tmp_path):
  completed = subprocess.run(
    [sys.executable, "examples/sharpness.py", "--runs", str(tmp_path)],
    capture_output=True, text=True, timeout=120, check=False,
  )  # fmt: skip
  assert completed.returncode == 1
  assert (
    "No results.json" in completed.stderr and "train_long_tailed.py" in completed.stderr
  )
  out, _ = trained
  shutil.copy(out / "results.json", tmp_path / "results.json")
  with pytest.raises(FileNotFoundError, match=r"checkpoints.*train_long_tailed.py"):
    sharpness_study.main(["--runs", str(tmp_path), *STUDY])
  with pytest.raises(ValueError, match="--optimizer: no run of sam"):
    sharpness_study.main(["--runs", str(out), "--optimizer", "sam", *STUDY])


# ------------------------------------------------------------ exact Hessian


class TinyMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 5, rngs=rngs)
    self.out = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_per_class_values_match_exact_hessian():
  counts = np.array([12, 6, 3])  # eta 5: head {0, 1}, tail {2}
  rng = np.random.default_rng(1)
  labels = rng.permutation(np.repeat(np.arange(3), counts)).astype(np.int32)
  inputs = rng.normal(size=(len(labels), 4)).astype(np.float32)
  inputs[np.arange(len(labels)), labels] += 2.0
  model = nnx.jit(lambda: TinyMLP(nnx.Rngs(0)))()  # one compile, not one per op
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  log_prior = long_tailed.log_class_prior(counts)

  def loss_fn(params, batch):  # the balanced-softmax loss of a training run
    logits = nnx.merge(graphdef, params, rest, copy=True)(batch["image"])
    return long_tailed.logit_adjusted_cross_entropy(
      logits, batch["label"], log_prior, 1.0
    )

  config = sharpness_study.Config(
    max_iterations=300, tolerance=1e-6, num_probes=60, batch_size=8
  )  # padded batches for every subset
  measure = lambda: sharpness_study.measure_classes(
    loss_fn,
    params,
    inputs,
    labels,
    counts,
    config,
    eta=5,
    mesh=long_tailed.training.data_parallel_mesh(),
  )
  per_class, groups = measure()
  assert measure() == (per_class, groups)  # deterministic given the key
  flat, unravel = ravel_pytree(params)
  everything = {"image": inputs, "label": labels}

  @jax.jit
  def exact(weights):  # the weighted mean loss and its Hessian (flat parameters)
    mean_loss = lambda f: jnp.sum(weights * loss_fn(unravel(f), everything))
    return mean_loss(flat) / weights.sum(), jax.hessian(mean_loss)(flat) / weights.sum()

  subsets = {
    **{c: labels == c for c in range(3)},
    "head": labels < 2,
    "tail": labels == 2,
  }
  measured = {**dict(enumerate(per_class)), **groups}
  assert groups["head"]["classes"] == [0, 1] and groups["tail"]["classes"] == [2]
  for name, mask in subsets.items():
    entry = measured[name]
    loss, hessian = exact(mask.astype(np.float32))
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    top = eigenvalues[np.argmax(np.abs(eigenvalues))]
    assert entry["num_examples"] == mask.sum()
    assert entry["eigen_converged"], name
    assert entry["top_eigenvalue"] == pytest.approx(top, rel=2e-3), name
    trace = np.trace(np.asarray(hessian, np.float64))
    assert abs(entry["trace"] - trace) <= 4 * entry["trace_stderr"], name
    assert entry["loss"] == pytest.approx(float(loss), rel=1e-5), name
