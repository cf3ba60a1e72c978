"""Tests of examples/anomaly/ and examples/train_anomaly.py (Deep SAD)."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sklearn.metrics
from flax import nnx

import imbsam_jax
from anomaly import train as deep_sad
from anomaly.config import Config
from shared import data, models, training

# A small encoder so that every compile is quick.
FEATURES = (4,)
REP_DIM = 8


def encoder(seed: int = 0, norm: str = "batch") -> models.DeepSADEncoder:
  return models.DeepSADEncoder(
    REP_DIM, input_shape=(8, 8, 1), features=FEATURES, norm=norm, rngs=nnx.Rngs(seed)
  )


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
  return data.load_dataset("digits")


@pytest.fixture(scope="module")
def train_data(digits) -> deep_sad.SemiSupervisedData:
  return deep_sad.make_semi_supervised(
    digits.x_train,
    digits.y_train,
    normal_class=0,
    known_anomaly_classes=[1],
    labeled_anomaly_ratio=0.1,
    pollution=0.1,
    seed=0,
  )


# -------------------------------------------------------------------- loss


def test_loss_hand_computed():
  sq_dist = jnp.array([4.0, 4.0, 0.5, 0.0, 2.0])
  labels = jnp.array([0, 1, -1, -1, 0])
  eps = 1e-6
  losses = deep_sad.deep_sad_loss(sq_dist, labels, eta=2.0, eps=eps)
  expected = [4.0, 2.0 * (4.0 + eps), 2.0 / (0.5 + eps), 2.0 / eps, 2.0]
  np.testing.assert_allclose(losses, expected, rtol=1e-6)
  # eta = 1 (default): unlabeled and labeled-normal examples cost d (+ eps).
  losses = deep_sad.deep_sad_loss(sq_dist, labels)
  np.testing.assert_allclose(losses[:2], [4.0, 4.0], rtol=1e-6)


def test_loss_gradient_hand_computed():
  grad = jax.grad(lambda d: deep_sad.deep_sad_loss(d, jnp.array([0, 1, -1])).sum())
  g = grad(jnp.array([3.0, 3.0, 0.5]))
  np.testing.assert_allclose(g, [1.0, 1.0, -1.0 / (0.5 + 1e-6) ** 2], rtol=1e-5)
  assert np.all(np.isfinite(grad(jnp.zeros(3))))


def test_per_example_loss_is_distance_to_center(train_data):
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  center = jnp.linspace(-1.0, 1.0, REP_DIM)
  model.center[...] = center
  model.eval()
  batch = {"image": train_data.x[-6:], "label": jnp.asarray(train_data.labels[-6:])}
  losses, _ = deep_sad.per_example_loss(model, batch, eta=3.0)
  phi = model.encoder(data.to_float(train_data.x[-6:]))
  sq_dist = np.sum((np.asarray(phi) - np.asarray(center)) ** 2, axis=1)
  labels = train_data.labels[-6:]
  expected = np.where(
    labels == 0, sq_dist, np.where(labels == -1, 3.0 / (sq_dist + 1e-6), 3 * sq_dist)
  )
  assert (labels == -1).all()  # the last examples are the labeled anomalies
  np.testing.assert_allclose(losses, expected, rtol=1e-5)


# ------------------------------------------------------------------ centre


def test_per_example_loss_splits_the_mean_into_head_and_tail(train_data):
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  model.center[...] = jnp.linspace(-1.0, 1.0, REP_DIM)
  model.eval()
  labels = jnp.array([0, 0, -1, 1, -1, 0])
  batch = {"image": train_data.x[:6], "label": labels}
  losses, parts = deep_sad.per_example_loss(model, batch, eta=2.0, eps=0.1)
  d = model(data.to_float(train_data.x[:6]))
  np.testing.assert_allclose(
    losses, deep_sad.deep_sad_loss(d, labels, eta=2.0, eps=0.1), rtol=1e-6
  )
  tail = np.asarray(labels) == -1
  np.testing.assert_allclose(parts["tail_loss"], losses[tail].sum() / 6, rtol=1e-6)
  np.testing.assert_allclose(parts["head_loss"], losses[~tail].sum() / 6, rtol=1e-6)
  np.testing.assert_allclose(
    parts["head_loss"] + parts["tail_loss"], losses.mean(), rtol=1e-6
  )


def test_center_from_features_hand_computed():
  features = jnp.array([[1.0, 0.02, -0.1, 0.0, 0.3], [3.0, 0.0, 0.0, 0.0, -0.5]])
  c = deep_sad.center_from_features(features, eps=0.1)
  # means 2, 0.01, -0.05, 0, -0.1: small coordinates pushed to +-eps, 0 to +eps.
  np.testing.assert_allclose(c, [2.0, 0.1, -0.1, 0.1, -0.1], rtol=1e-6)
  assert c.dtype == jnp.float32


def test_compute_center_is_eval_mode_mean(train_data):
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  # batch 64 < 130 examples: padding of the last batch must not count.
  c = deep_sad.compute_center(model, train_data.x, batch_size=64, eps=0.05)
  model.eval()
  phi = np.asarray(model.encoder(data.to_float(train_data.x)))
  mean = phi.mean(axis=0)
  expected = np.where(np.abs(mean) < 0.05, np.where(mean < 0, -0.05, 0.05), mean)
  np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-6)
  model.center[...] = c
  scores = deep_sad.anomaly_scores(model, train_data.x, batch_size=64)
  np.testing.assert_allclose(
    scores, ((phi - np.asarray(c)) ** 2).sum(axis=1), rtol=1e-5, atol=1e-6
  )


# -------------------------------------------------------------------- data


def test_semi_supervised_counts_hand_computed():
  # N = 119, gamma_l 0.05, gamma_p 0.1: T = 119 / (0.9 * 0.95) = 139.18.
  c = deep_sad.semi_supervised_counts(119, 0.05, 0.1)
  assert c == (0, 119, 13, 7) and c.total == 139
  # With labeled normals: T = 100 / (0.2 + 0.8 * 0.7) = 131.58; 0.2 * 0.7 * T = 18.4.
  c = deep_sad.semi_supervised_counts(100, 0.1, 0.2, labeled_normal_ratio=0.2)
  assert c == (26, 74, 18, 13)
  assert deep_sad.semi_supervised_counts(50, 0.0, 0.0) == (0, 50, 0, 0)
  with pytest.raises(ValueError, match="pollution"):
    deep_sad.semi_supervised_counts(50, 0.1, 1.0)
  with pytest.raises(ValueError, match="below 1"):
    deep_sad.semi_supervised_counts(50, 0.6, 0.1, labeled_normal_ratio=0.4)


def test_make_semi_supervised(digits):
  kwargs = dict(
    normal_class=3,
    known_anomaly_classes=[5, 7],
    labeled_anomaly_ratio=0.2,
    pollution=0.3,
    labeled_normal_ratio=0.1,
    seed=4,
  )
  d = deep_sad.make_semi_supervised(digits.x_train, digits.y_train, **kwargs)
  labels, classes = d.labels, d.classes
  n_normal = int((digits.y_train == 3).sum())
  assert d.counts.labeled_normal + d.counts.unlabeled_normal == n_normal
  assert len(d.x) == len(labels) == len(classes) == d.counts.total
  assert (labels == -1).sum() == d.counts.labeled_anomaly
  assert (labels == 1).sum() == d.counts.labeled_normal
  assert set(classes[labels == -1].tolist()) <= {5, 7}
  assert (classes[labels == 1] == 3).all()
  assert (classes == 3).sum() == n_normal  # every normal image is used
  pollution = (labels == 0) & (classes != 3)
  assert pollution.sum() == d.counts.unlabeled_anomaly
  assert abs(pollution.mean() / (labels == 0).mean() - 0.3) < 0.01
  assert d.known_anomaly_classes == (5, 7)
  again = deep_sad.make_semi_supervised(digits.x_train, digits.y_train, **kwargs)
  np.testing.assert_array_equal(again.x, d.x)
  other = deep_sad.make_semi_supervised(
    digits.x_train, digits.y_train, **{**kwargs, "seed": 5}
  )
  assert not np.array_equal(other.x, d.x)


def test_make_semi_supervised_indices_are_distinct():
  y = np.repeat(np.arange(3), 20)
  x = np.arange(60)  # the image is its own index
  d = deep_sad.make_semi_supervised(
    x,
    y,
    normal_class=0,
    known_anomaly_classes=[1, 2],
    labeled_anomaly_ratio=0.3,
    pollution=0.4,
    seed=0,
  )
  assert len(np.unique(d.x)) == len(d.x)
  np.testing.assert_array_equal(y[d.x], d.classes)
  with pytest.raises(ValueError, match="labeled anomalies needed"):
    deep_sad.make_semi_supervised(
      x,
      y,
      normal_class=0,
      known_anomaly_classes=[1],
      labeled_anomaly_ratio=0.6,
      pollution=0.0,
      seed=0,
    )
  with pytest.raises(ValueError, match="normal class"):
    deep_sad.make_semi_supervised(
      x,
      y,
      normal_class=0,
      known_anomaly_classes=[0],
      labeled_anomaly_ratio=0.1,
      pollution=0.0,
      seed=0,
    )


# ---------------------------------------------------------------- tail


def test_labeled_anomaly_mask_on_deep_sad_labels(train_data):
  labels = jnp.asarray(train_data.labels)
  mask = jax.jit(imbsam_jax.labeled_anomaly_mask)(labels)
  np.testing.assert_array_equal(mask, train_data.labels == deep_sad.LABELED_ANOMALY)
  assert int(mask.sum()) == train_data.counts.labeled_anomaly > 0
  with pytest.raises(TypeError, match="integer"):
    imbsam_jax.labeled_anomaly_mask(labels.astype(jnp.float32))


# ----------------------------------------------------------------- training


@pytest.mark.parametrize("rho, low, high", [(0.01, 1.0, 1.1), (0.4, 50.0, 1e4)])
def test_imbsam_perturbation_steers_a_labeled_anomaly_toward_the_pole(rho, low, high):
  """The failure the MNIST defaults avoid, in two dimensions: Deep SAD's labeled
  term eta / d has a pole at the centre, ImbSAM's perturbation follows the tail
  gradient toward it, and once rho reaches the pole the tail gradient at w + e
  (perturbed_tail_grad_norm) is far steeper than at w (tail_grad_norm).

  phi(x) = W x, c = 0: the anomaly x = (1, 0) sits at d = 0.25; rho 0.4 moves W
  so that d = 0.01, and |grad| ~ sqrt(d) / d^2 grows by 125.
  """
  params = {"w": jnp.diag(jnp.array([0.5, 1.0]))}
  batch = {
    "x": jnp.array([[1.0, 0.0], [0.0, 0.3], [0.2, 0.1]]),
    "label": jnp.array([deep_sad.LABELED_ANOMALY, 0, 0]),
  }

  def loss_fn(p, b):
    sq_dist = jnp.sum(jnp.square(b["x"] @ p["w"].T), axis=-1)
    return deep_sad.deep_sad_loss(sq_dist, b["label"])

  tx = imbsam_jax.imbsam(optax.sgd(0.1), rho, imbsam_jax.labeled_anomaly_mask)
  grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
  _, state = tx.update(
    grads, tx.init(params), params, loss_fn=loss_fn, batch=batch, labels=batch["label"]
  )
  ratio = float(state.perturbed_tail_grad_norm / state.tail_grad_norm)
  assert low < ratio < high


def test_imbsam_step_sees_labeled_anomalies_as_tail(train_data):
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, step = deep_sad._train_step(
    graphdef, Config(), "deep_sad", "imbsam", 0.01, "exact", 0.1
  )
  state = training.TrainState(jnp.zeros([], jnp.int32), params, rest, tx.init(params))
  labels = train_data.labels[-32:].copy()
  labels[:28] = 0  # 4 labeled anomalies in a batch of 32
  batch = {"image": jnp.asarray(train_data.x[-32:]), "label": jnp.asarray(labels)}
  state, step_metrics = step(state, batch, jax.random.key(0))
  assert float(step_metrics["tail_fraction"]) == 4 / 32
  assert float(step_metrics["tail_grad_norm"]) > 0
  assert np.isfinite(float(step_metrics["loss"]))


def test_train_rho_zero_imbsam_equals_base(train_data):
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  model.center[...] = deep_sad.compute_center(model, train_data.x)
  model.eval()
  before = jax.tree.map(np.array, nnx.state(model))
  args = (model, train_data.x, train_data.labels, Config(batch_size=32))
  plain, history = deep_sad.fit(*args, epochs=2, seed=1, method="base")
  imbsam, _ = deep_sad.fit(*args, epochs=2, seed=1, method="imbsam", rho=0.0)
  chex.assert_trees_all_close(
    nnx.state(plain, nnx.Param), nnx.state(imbsam, nnx.Param), rtol=1e-5, atol=1e-6
  )
  assert len(history) == 2 and all(np.isfinite(history))
  # The input model is untouched (its buffers are not donated, its mode kept).
  chex.assert_trees_all_equal(jax.tree.map(np.array, nnx.state(model)), before)
  assert model.encoder.norms[0].use_running_average
  np.testing.assert_array_equal(plain.center[...], model.center[...])


def test_lr_decay_multiplies_the_learning_rate_by_a_tenth():
  config = Config(
    base_optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, lr_decay=(0.4, 0.6)
  )
  schedule = deep_sad.learning_rate(config, steps_per_epoch=3, epochs=5)
  tx = deep_sad.base_optimizer(config)
  params = jnp.zeros(())
  state, steps = tx.init(params), []
  for i in range(15):
    state = deep_sad.with_learning_rate(state, schedule(i))
    update, state = tx.update(jnp.ones(()), state, params)
    steps.append(float(update))
  # Epochs 1-2 at lr 1, epoch 3 at 0.1, epochs 4-5 at 0.01.
  np.testing.assert_allclose(steps, [-1.0] * 6 + [-0.1] * 3 + [-0.01] * 6, rtol=1e-6)


@pytest.mark.parametrize("clip_norm, want", [(None, [-3.0, -4.0]), (1.0, [-0.6, -0.8])])
def test_clip_norm_bounds_the_gradient_the_base_optimizer_gets(clip_norm, want):
  """Global-norm clipping before the coupled L2 and the base optimizer."""
  config = Config(
    base_optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, clip_norm=clip_norm
  )
  tx = deep_sad.base_optimizer(config)
  params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose([updates["a"][0], updates["b"][0]], want, rtol=1e-6)
  state = deep_sad.with_learning_rate(state, 0.5)  # the lr still found and set
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose([updates["a"][0], updates["b"][0]], np.multiply(want, 0.5))


def test_fit_compiles_each_method_once_whatever_the_data_size_and_epochs(train_data):
  """The learning rate lives in the optimizer state: the decay, another
  epoch count or another training-set size (another normal class) reuse the
  compiled step, and the update uses the state's rate (a step at lr 0 is none)."""
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  model.center[...] = deep_sad.compute_center(model, train_data.x)
  config = Config(batch_size=16, lr_decay=(0.5,))
  deep_sad._train_step.cache_clear()
  for size, epochs in [(64, 2), (80, 3)]:
    x, labels = train_data.x[:size], train_data.labels[:size]
    deep_sad.fit(model, x, labels, config, epochs=epochs, seed=0, method="base")
  assert deep_sad._train_step.cache_info().currsize == 1
  training_mode = nnx.clone(model)
  training_mode.train()
  graphdef = nnx.split(training_mode, nnx.Param, ...)[0]
  args = (graphdef, config, "deep_sad", "base", 0.0, "exact", 0.0)
  _, step = deep_sad._train_step(*args)
  assert step._cache_size() == 1
  frozen = dataclasses.replace(config, lr=0.0, weight_decay=0.0)
  trained, _ = deep_sad.fit(model, x, labels, frozen, epochs=1, seed=0, method="base")
  params = lambda m: nnx.state(m, nnx.Param)
  chex.assert_trees_all_equal(params(trained), params(model))


def test_fit_logs_steps_and_epoch_snapshots(train_data, digits):
  """Step rows every N steps (the last one at the end), epoch rows with the
  snapshot every eval_every epochs; the last snapshot is the returned model's."""
  model = deep_sad.DeepSAD(encoder(), rep_dim=REP_DIM)
  model.center[...] = deep_sad.compute_center(model, train_data.x)
  config = Config(batch_size=16)
  steps_per_epoch = len(train_data.x) // 16
  epochs, every = 4, 3
  rows, step_rows = [], []
  is_anomaly = digits.y_test != 0
  snap = functools.partial(
    deep_sad.snapshot,
    train=train_data,
    normal_class=0,
    test_x=digits.x_test,
    test_is_anomaly=is_anomaly,
  )
  trained, history = deep_sad.fit(
    model,
    train_data.x,
    train_data.labels,
    config,
    epochs=epochs,
    seed=0,
    method="imbsam",
    rho=0.05,
    tail_fraction=0.1,
    log=rows.append,
    evaluate=snap,
    eval_every=2,
    step_log=lambda step, row: step_rows.append((step, row)),
    log_every_steps=every,
  )
  total = epochs * steps_per_epoch
  want = [*range(every, total + 1, every)]
  want += [total] if total % every else []
  assert [step for step, _ in step_rows] == want
  for _, row in step_rows:
    assert set(row) == {
      "loss",
      "head_loss",
      "tail_loss",
      "tail_fraction",
      "tail_grad_norm",
      "perturbed_tail_grad_norm",
      "lr",
    }
  assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
  # The default recipe: Adam at 1e-3, a tenth of it after 70% of the epochs.
  np.testing.assert_allclose([row["lr"] for row in rows], [1e-3] * 3 + [1e-4])
  assert [row["loss"] for row in rows] == history
  evaluated = [row for row in rows if "test_auroc" in row]
  assert [row["epoch"] for row in evaluated] == [2, 4]
  scores = deep_sad.anomaly_scores(trained, digits.x_test)
  np.testing.assert_allclose(
    evaluated[-1]["test_auroc"], sklearn.metrics.roc_auc_score(is_anomaly, scores)
  )
  dist = deep_sad.anomaly_scores(trained, train_data.x)
  labeled = train_data.labels == -1
  np.testing.assert_allclose(
    evaluated[-1]["labeled_anomaly_dist_min"], dist[labeled].min(), rtol=1e-6
  )
  np.testing.assert_allclose(
    evaluated[-1]["normal_dist"], np.median(dist[train_data.classes == 0]), rtol=1e-6
  )
  pollution = (train_data.classes != 0) & ~labeled
  assert pollution.any()
  np.testing.assert_allclose(
    evaluated[-1]["pollution_dist"], np.median(dist[pollution]), rtol=1e-6
  )


def test_grid_names_and_aliases():
  config = Config(method=("base", "sam", "imbsam"), rho=(0.01, 0.05), seed=(0,))
  config = deep_sad.dataclasses.replace(config, normal_class=(3,))
  sweeps = deep_sad.options.sweep_values(config)
  cells = deep_sad.runner.grid(config.method, config.seed, sweeps, uses=deep_sad.USES)
  assert [(c.method, c.setting.get("rho")) for c in cells] == [
    ("base", None),
    ("sam", 0.01),
    ("sam", 0.05),
    ("imbsam", 0.01),
    ("imbsam", 0.05),
  ]
  assert {c.setting["normal_class"] for c in cells} == {3}
  parsed = deep_sad.options.parse(Config, ["--optimizer", "adam,sam"])
  assert parsed.method == ("base", "sam")


@pytest.mark.parametrize(
  "argv, flag",
  [
    (["--epochs", "0"], "--epochs: must be > 0"),
    (["--rho", "-1"], "--rho: must be >= 0"),
    (["--clip-norm", "0"], "--clip-norm: must be > 0"),
    (["--labeled-anomaly-ratio", "0.6", "--labeled-normal-ratio", "0.5"], "below 1"),
    (["--base-optimizer", "lion"], "--base-optimizer: 'lion' is not one of"),
    (["--known-anomaly-classes", "x"], "--known-anomaly-classes: expected"),
    (["--known-anomaly-classes", "1,,2"], "--known-anomaly-classes: expected"),
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
  ],
)
def test_bad_options_fail_before_training(argv, flag, tmp_path, capsys, monkeypatch):
  """One line naming the flag, exit status 2, nothing written."""
  monkeypatch.setattr("sys.argv", ["train_anomaly.py", *argv, "--out", str(tmp_path)])
  with pytest.raises(SystemExit) as exit_info:
    deep_sad.options.cli(deep_sad.main, "train_anomaly.py")
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert flag in err and len(err.splitlines()) == 1, err
  assert not list(tmp_path.iterdir())


def test_bad_option_from_the_command_line(tmp_path):
  """The script itself: exit status 2, one line, nothing written."""
  completed = subprocess.run(
    [sys.executable, "examples/train_anomaly.py", "--rho=-1", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert completed.returncode == 2
  assert completed.stderr.startswith("train_anomaly.py: error: --rho: must be >= 0")
  assert len(completed.stderr.strip().splitlines()) == 1
  assert not list(tmp_path.iterdir())


# -------------------------------------------------------------- end to end


def test_main_smoke(tmp_path, capsys):
  argv = [
    "--normal-class", "0,4",
    "--seeds", "0",
    "--optimizer", "sgd,sam,imbsam",
    "--epochs", "1",
    "--features", ",".join(map(str, FEATURES)),
    "--rep-dim", str(REP_DIM),
    "--out", str(tmp_path),
    "--no-progress",
  ]  # fmt: skip
  results = deep_sad.main(argv)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved == results
  runs = results["runs"]
  assert [(r["normal_class"], r["optimizer"]) for r in runs] == [
    (c, o) for c in (0, 4) for o in ("adam", "sam", "imbsam")
  ]
  for run in runs:
    assert 0.0 <= run["auroc"] <= 1.0 and run["seed"] == 0
    config = run["config"]
    assert config["base_optimizer"] == "adam" and config["epochs"] == 1
    assert config["rho"] == (None if run["optimizer"] == "adam" else 0.05)
    assert config["lr"] == 1e-3 and config["lr_decay"] == [0.7]
    info = run["data"]
    assert len(info["known_anomaly_classes"]) == 1
    assert run["normal_class"] not in info["known_anomaly_classes"]
    assert info["num_test"] == 599
  assert (tmp_path / "roc.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "imbsam" in out and "mean" in out
  # The encoder has BatchNorm: ImbSAM takes the exact path, and says so.
  assert [r["tail_path"] for r in runs] == [None, None, "exact"] * 2
  assert "ImbSAM (tail: the labeled anomalies): exact path" in out
  log = (tmp_path / "metrics" / "imbsam_normal_class0_labeled_anomaly_ratio0.05"
         "_pollution0.1_rho0.05_seed0.csv").read_text().splitlines()  # fmt: skip
  assert log[0] == (
    "epoch,head_loss,loss,perturbed_tail_grad_norm,tail_fraction,tail_grad_norm,"
    "tail_loss,lr"
  )
  assert len(log) == 2


def test_experiment_is_deterministic_and_pretrains(tmp_path):
  argv = [
    "--normal-class", "2",
    "--seed", "0",
    "--optimizer", "base",
    "--known-anomaly-classes", "all",
    "--epochs", "1",
    "--pretrain-epochs", "1",
    "--features", ",".join(map(str, FEATURES)),
    "--rep-dim", str(REP_DIM),
    "--no-progress",
  ]  # fmt: skip
  first = deep_sad.main([*argv, "--out", str(tmp_path / "a")])
  second = deep_sad.main([*argv, "--out", str(tmp_path / "b")])
  assert first["runs"][0]["auroc"] == second["runs"][0]["auroc"]
  assert first["runs"][0]["data"]["known_anomaly_classes"] == [
    c for c in range(10) if c != 2
  ]
  assert first["config"]["pretrain_epochs"] == 1


def test_diverged_run_is_recorded_not_fatal(tmp_path, capsys):
  """Non-finite scores and loss: the run's auroc and final_loss are null in
  results.json (strict JSON) and the table says the run failed."""
  argv = [
    "--normal-class", "0",
    "--seed", "0",
    "--optimizer", "base",
    "--base-optimizer", "sgd",
    "--lr", "1e8",
    "--clip-norm", "none",
    "--epochs", "1",
    "--features", ",".join(map(str, FEATURES)),
    "--rep-dim", str(REP_DIM),
    "--no-progress",
    "--out", str(tmp_path),
  ]  # fmt: skip
  (run,) = deep_sad.main(argv)["runs"]
  assert run["auroc"] is None and run["final_loss"] is None
  saved = json.loads((tmp_path / "results.json").read_text())["runs"][0]
  assert saved["auroc"] is None and saved["final_loss"] is None
  assert "(1 failed)" in capsys.readouterr().out
