"""Tests of the long-tailed application (examples/long_tailed/, its script).

Every dataset path (digits, mock TFDS, folder:, npz:, a streamed list of JPEGs)
runs end to end on tiny data for one or two epochs with the small CNN; the runs
also check the results.json schema, determinism, resume from an epoch's end and
from a step mid-epoch (exact), the compile count, a rho x eta sweep and its
figure; every preset builds its config and runs one step of its own method on
tiny inputs (the ResNet-50 / ResNeXt-50, ResNet-34, ResNet-32 and ratio ones
under ``-m slow``; their values and model dtypes in the default run); ImbSAM's
successors run their stages (SSE-SAM's head perturbation, DRW) with a step each;
bfloat16 activations keep float32 state; bad options fail before anything is
loaded, with one line naming the flag.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from data_fake_lt import TRAIN_COUNTS as LIST_COUNTS
from data_fake_lt import write_lt_dataset
from flax import nnx
from PIL import Image

from long_tailed import train as long_tailed
from long_tailed.config import PRESETS, Config
from shared import data, metrics, models, options, report, runner, training

TRAIN_COUNTS = [20, 10, 6, 4]  # 40 training images, 4 classes
TEST_PER_CLASS = 5
SMALL = ["--model", "small_cnn", "--batch-size", "8", "--no-progress"]


def tiny_arrays(seed: int = 0, shape=(8, 8, 1)):
  """Learnable tiny images: class c lights up row block c, plus noise."""
  rng = np.random.default_rng(seed)

  def make(counts):
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    x = rng.integers(0, 60, size=(len(y), *shape))
    for i, c in enumerate(y):
      x[i, 2 * c : 2 * c + 2] += 180
    return x.astype(np.uint8), y

  x_train, y_train = make(TRAIN_COUNTS)
  x_test, y_test = make([TEST_PER_CLASS] * len(TRAIN_COUNTS))
  return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("npz") / "tiny.npz"
  x_train, y_train, x_test, y_test = tiny_arrays()
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


def npz_args(npz_file, out, *extra):
  return [f"--dataset=npz:{npz_file}", "--out", str(out), *SMALL, *extra]


def comparable(results):
  """The numbers of a results dict, without timings and output paths."""
  runs = []
  for r in results["runs"]:
    r = {k: v for k, v in r.items() if k not in ("train_time_s", "config")}
    runs.append(r)
  return runs


# ------------------------------------------------------------ pure parts


def test_logit_adjusted_cross_entropy_by_hand():
  logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  labels = jnp.array([0, 2])
  prior = np.array([0.7, 0.2, 0.1])
  for tau in (0.0, 0.5, 1.0):
    adjusted = np.asarray(logits) + tau * np.log(prior)
    log_softmax = adjusted - np.log(np.exp(adjusted).sum(-1, keepdims=True))
    want = -log_softmax[[0, 1], [0, 2]]
    got = long_tailed.logit_adjusted_cross_entropy(logits, labels, jnp.log(prior), tau)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(
    long_tailed.logit_adjusted_cross_entropy(logits, labels, jnp.log(prior), 0.0),
    plain,
    rtol=1e-6,
  )
  taus = {
    "ce": 0.0,
    "logit-adjust": 0.3,
    "balanced-softmax": 1.0,
  }
  for loss, tau in taus.items():
    assert Config(loss=loss, tau=0.3).effective_tau == tau


def test_log_class_prior():
  np.testing.assert_allclose(
    long_tailed.log_class_prior([6, 3, 1, 0]),
    np.log([0.6, 0.3, 0.1, 0.1]),
    rtol=1e-6,
  )


def test_learning_rate_schedules():
  cosine = long_tailed.learning_rate_schedule(0.1, "cosine", 100, warmup_steps=10)
  assert float(cosine(0)) == 0.0
  assert float(cosine(5)) == pytest.approx(0.05)
  assert float(cosine(10)) == pytest.approx(0.1)
  assert float(cosine(55)) == pytest.approx(0.05)
  assert float(cosine(100)) == pytest.approx(0.0, abs=1e-9)
  step = long_tailed.learning_rate_schedule(0.2, "step", 50)
  values = [float(step(s)) for s in (0, 39, 40, 44, 45, 49)]
  np.testing.assert_allclose(values, [0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    long_tailed.learning_rate_schedule(0.1, "linear", 10)


def test_classification_report_by_hand():
  # 4 classes with 150, 60, 10, 3 training images: Many {0}, Medium {1},
  # Few {2, 3}; class 3 has no test example.
  # Right on 3 of 4 test images of class 0, 1 of 2 of class 1, 1 of 3 of class 2.
  correct, total = [3, 1, 1, 0], [4, 2, 3, 0]
  report = metrics.classification_report(correct, total, [150, 60, 10, 3])
  assert report["overall"] == pytest.approx(5 / 9)
  assert report["per_class"][:3] == pytest.approx([0.75, 0.5, 1 / 3])
  assert report["per_class"][3] is None
  assert report["many"] == pytest.approx(0.75)
  assert report["medium"] == pytest.approx(0.5)
  assert report["few"] == pytest.approx(1 / 3)  # class 3 (no test images) left out
  assert report["test_counts"] == [4, 2, 3, 0]
  assert report["split_classes"] == {"many": [0], "medium": [1], "few": [2, 3]}
  # Custom thresholds, and an empty split is None.
  report = metrics.classification_report(
    correct, total, [150, 60, 10, 3], many_threshold=5, few_threshold=2
  )
  assert report["many"] == pytest.approx((0.75 + 0.5 + 1 / 3) / 3)
  assert report["medium"] is None and report["few"] is None


def test_summary_and_table():
  def run(opt, seed, few, overall):
    return {
      "optimizer": opt,
      "method": runner.method_name(opt),
      "seed": seed,
      "rho": None if opt == "sgd" else 0.05,
      "eta": None if opt == "sgd" else 20.0,
      "overall": overall,
      "many": 0.9,
      "medium": None,
      "few": few,
      "per_class": [0.9, few],
      "split_classes": {"many": [0], "medium": [], "few": [1]},
      "config": {
        "dataset_name": "toy",
        "num_train": 10,
        "num_test": 4,
        "num_classes": 2,
        "many_threshold": 5,
        "few_threshold": 2,
      },
    }

  runs = [run("sgd", 0, 0.2, 0.5), run("sgd", 1, 0.4, 0.7), run("imbsam", 0, 0.6, 0.8)]
  summary = report.summarize(
    runs, ["overall", "many", "medium", "few"], ["rho", "eta"], vectors=["per_class"]
  )
  assert summary["sgd"]["few"] == pytest.approx({"mean": 0.3, "std": 0.1, "n": 2})
  assert summary["sgd"]["medium"] is None
  assert summary["sgd"]["per_class_mean"] == pytest.approx([0.9, 0.3])
  assert summary["imbsam rho=0.05 eta=20"]["overall"]["mean"] == 0.8
  table = long_tailed.format_table({"runs": runs})
  assert "Many (1)" in table and "Medium (0)" in table and "Few (1)" in table
  assert "30.0 ± 10.0" in table  # sgd's few over two seeds
  lines = table.splitlines()
  assert any(line.split()[:4] == ["imbsam", "seed", "0", "90.0"] for line in lines)


def test_options_defaults_presets_and_aliases():
  config = options.parse(
    Config, [], presets=PRESETS, implied_preset=long_tailed.implied_preset
  )
  assert config.preset == "digits-lt" and config.dataset == "digits-lt"
  assert config.method == ("base", "sam", "imbsam") and config.seed == (0,)
  assert (config.model, config.many_threshold, config.eta) == ("small_cnn", 50, (20.0,))
  parse = lambda *argv: options.parse(
    Config, argv, presets=PRESETS, implied_preset=long_tailed.implied_preset
  )
  cifar = parse("--dataset", "cifar100-lt")  # the dataset implies its preset
  assert cifar.preset == "cifar100-lt" and cifar.imbalance_ratio == 100
  assert (cifar.model, cifar.epochs, cifar.many_threshold) == ("resnet32", 200, 100)
  reference = parse("--preset", "cifar100-lt-reference", "--epochs", "3")
  assert (reference.model, reference.batch_size, reference.lr) == (
    "resnet34_cifar",
    64,
    0.01,
  )
  assert reference.tail_loss_scale == 2.0 and reference.epochs == 3  # flag wins
  assert parse("--preset", "cifar10-lt-ir10").imbalance_ratio == 10
  own = parse("--dataset", "digits")  # no preset of that name: the defaults
  assert own.preset is None and own.model == "small_cnn"
  swept = parse("--seeds", "0,1", "--optimizer", "sgd,imbsam", "--rho", "0.01,0.1")
  assert swept.seed == (0, 1) and swept.method == ("base", "imbsam")
  assert options.sweep_values(swept) == {"rho": (0.01, 0.1), "eta": (20.0,)}
  assert options.from_json(Config, options.to_json(swept)) == swept
  # A checkpoint's fingerprint: what trains, not where, how or which run.
  moved = parse("--out", "elsewhere", "--workers", "4", "--seeds", "3", "--rho", "0.1")
  assert options.fingerprint(moved) == options.fingerprint(config)
  assert "out" not in options.fingerprint(config)
  assert options.fingerprint(parse("--lr", "0.2")) != options.fingerprint(config)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--eta", "-5"], "--eta: must be > 0, got -5.0"),
    (["--rho", "-1"], "--rho: must be >= 0"),
    (["--epochs", "0"], "--epochs: must be > 0"),
    (["--optimizer", "adam"], "--method/--optimizer: 'adam' is not one of"),
    (["--model", "vgg"], "--model: 'vgg' is not one of"),
    (["--dataset", "svhn"], "--dataset: unknown dataset 'svhn'"),
    (["--dataset", "npz:missing.npz"], "--dataset: npz: missing.npz is not an"),
    (
      ["--tail-capacity", "fast"],
      "--tail-capacity: expected an int or auto, got 'fast'",
    ),
    (["--tail-capacity", "0"], "--tail-capacity: must be a positive int or auto"),
    (["--few-threshold", "60"], "--few-threshold: 60 exceeds --many-threshold"),
    (["--preset", "imagenet"], "--preset: unknown preset 'imagenet'"),
    (["--rho", "0.1,0.1"], "--rho: repeated value"),
    (["--rho", "0.1,,0.2"], "--rho: expected a comma-separated list, got '0.1,,0.2'"),
    (["--seed", "0,"], "--seed/--seeds: expected a comma-separated list, got '0,'"),
    (["--batch-size", "7", "--devices", "2"], "--devices: there are only 1"),
    (["--norm", "batch", "--tail-capacity", "8"], "--tail-capacity: a BatchNorm"),
    (["--tail-bn", "fixed"], "--tail-bn: 'fixed' is not one of exact, anchored"),
    (["--dtype", "float16"], "--dtype: 'float16' is not one of float32, bfloat16"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints: must be > 0"),
    (["--checkpoint-every-steps", "-1"], "--checkpoint-every-steps: must be >= 0"),
    (
      ["--dataset", "imagenet-lt:/x", "--imbalance-ratio", "10"],
      "--imbalance-ratio: streamed data are used as their lists are",
    ),
    (["--dataset", "places-lt:/x", "--augment", "none"], "--augment: streamed data"),
    (["--dataset", "list:a,b"], "streamed: imagenet-lt:ROOT, places-lt:ROOT, list:"),
    (["--coordinator", "host"], "--coordinator: expected HOST:PORT or auto"),
    (["--coordinator", "h:1"], "--coordinator: HOST:PORT needs --num-processes"),
    (["--process-id", "0"], "--num-processes/--process-id: only with --coordinator"),
    (
      ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
      "--process-id: 2 is not below --num-processes 2",
    ),
    (["--coordinator", "auto", "--devices", "1"], "--devices: only in one process"),
  ],
)
def test_bad_options_one_line_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    long_tailed.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err


def test_bad_option_from_the_command_line(tmp_path):
  """The script itself: exit status 2, one line, nothing loaded or written."""
  import subprocess
  import sys

  script = "examples/train_long_tailed.py"
  completed = subprocess.run(
    [sys.executable, script, "--eta", "-5", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert completed.returncode == 2
  assert (
    completed.stderr == "train_long_tailed.py: error: --eta: must be > 0, got -5.0\n"
  )
  assert not list(tmp_path.iterdir())


def test_data_dependent_errors(npz_file, tmp_path):
  with pytest.raises(ValueError, match="--batch-size: 64 exceeds the 40 training"):
    long_tailed.main(npz_args(npz_file, tmp_path, "--batch-size", "64"))
  with pytest.raises(ValueError, match="--eta: no class has fewer than 2 training"):
    long_tailed.main(npz_args(npz_file, tmp_path, "--eta", "2"))
  with pytest.raises(FileNotFoundError, match=r"ImageNet_LT_train\.txt does not exist"):
    long_tailed.main(["--dataset", f"imagenet-lt:{tmp_path}", "--out", str(tmp_path)])


def test_offline_tfds_fails_fast_with_instructions(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
  with pytest.raises(RuntimeError, match="tfds build cifar100"):
    long_tailed.main(
      [
        "--dataset",
        "cifar100-lt",
        "--data-dir",
        str(tmp_path / "tfds"),
        "--out",
        str(tmp_path),
      ]
    )
  monkeypatch.setattr(
    "sys.argv", ["x", "--dataset", "cifar100-lt", "--data-dir", str(tmp_path / "tfds")]
  )
  with pytest.raises(SystemExit) as exit_info:
    options.cli(long_tailed.main, "train_long_tailed.py")
  assert exit_info.value.code == 1


# --------------------------------------------------------- end to end


# The reference run: all three optimizers, 2 epochs, balanced softmax.
REFERENCE = ["--epochs", "2", "--loss", "balanced-softmax", "--imbalance-ratio", "1"]


@pytest.fixture(scope="module")
def reference(npz_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  return out, long_tailed.main(npz_args(npz_file, out, *REFERENCE))


def test_npz_all_optimizers_schema_compiles_and_plot(reference, capsys):
  out, results = reference
  assert json.loads((out / "results.json").read_text()) == results
  assert (out / "per_class_accuracy.png").stat().st_size > 1000
  assert [r["optimizer"] for r in results["runs"]] == ["sgd", "sam", "imbsam"]
  for run in results["runs"]:
    assert run["seed"] == 0
    for key in ("overall", "medium", "few"):
      assert 0.0 <= run[key] <= 1.0
    assert run["many"] is None  # no class has more than 100 training images
    assert len(run["per_class"]) == 4
    assert run["train_counts"] == TRAIN_COUNTS
    # One train-step and one eval compile for the 10 steps and the eval batch.
    assert run["compiles"] == {"train_step": 1, "predict": 1}
    assert len(run["history"]["train_loss"]) == 2
    config = run["config"]
    assert config["num_train"] == 40 and config["steps_per_epoch"] == 5
    assert config["augment_used"] == "none" and config["method"] == [
      "base",
      "sam",
      "imbsam",
    ]
    assert config["many_threshold"] == 50 and config["few_threshold"] == 20
    assert config["tau_used"] == 1.0 and config["loss"] == "balanced-softmax"
  names = ["base_seed0", "sam_rho0.05_seed0", "imbsam_rho0.05_eta20_seed0"]
  for name in names:
    assert (out / "checkpoints" / name).is_dir()
    log = (out / "metrics" / f"{name}.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch,step,accuracy,loss")
  imbsam = results["runs"][2]
  assert imbsam["tail_classes"] == [1, 2, 3] and imbsam["tail_path"] == "gathered"
  assert imbsam["tail_capacity"] == 8  # small_cnn: the fast path, exact
  assert (imbsam["rho"], imbsam["eta"]) == (0.05, 20.0)
  assert results["runs"][0]["rho"] is None and results["runs"][0]["method"] == "base"
  assert "tail_fraction,tail_grad_norm,lr" in log[0]
  assert set(results["summary"]) == {"sgd", "sam", "imbsam"}
  assert results["config"]["rho"] == [0.05] and results["config"]["preset"] is None
  assert "train_tail_fraction" in imbsam["history"]


def test_table_is_printed(npz_file, tmp_path, capsys):
  long_tailed.main(
    npz_args(
      npz_file, tmp_path, "--epochs", "1", "--optimizer", "sgd", "--checkpoint-every=0"
    )
  )
  printed = capsys.readouterr().out
  assert "Many (0)  Medium (1)  Few (3)  Overall" in printed
  assert "per_class_accuracy.png" in printed


def test_same_seed_same_numbers(reference, npz_file, tmp_path):
  _, results = reference
  again = long_tailed.main(
    npz_args(npz_file, tmp_path / "a", *REFERENCE, "--optimizer", "sgd")
  )
  assert comparable(again) == comparable(results)[:1]
  other = long_tailed.main(
    npz_args(npz_file, tmp_path / "b", *REFERENCE, "--optimizer", "sgd", "--seed", "1")
  )
  assert comparable(other)[0]["history"] != comparable(results)[0]["history"]


class Killed(Exception):
  """Stands for a killed training process."""


def run_killed(monkeypatch, args, *, at_step: int) -> None:
  """``long_tailed.main(args)``, killed when a stretch of training would start
  at step ``at_step`` or later (after the checkpoints before it)."""
  train_steps = long_tailed.training.train_steps

  def stop(*a, first_step, **kwargs):
    if first_step >= at_step:
      raise Killed
    return train_steps(*a, first_step=first_step, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(long_tailed.training, "train_steps", stop)
    with pytest.raises(Killed):
      long_tailed.main(args)


def assert_same_as_uninterrupted(resumed, reference):
  """The resumed ImbSAM run equals the reference's (accuracies, per-class,
  history: bit for bit), but for where it resumed from."""
  want, got = comparable(reference)[2], comparable(resumed)[0]
  for key in ("resumed_from_epoch", "resumed_from_step", "epochs_trained_now"):
    want.pop(key), got.pop(key)
  assert got == want


def test_resume_matches_uninterrupted_run(reference, npz_file, tmp_path, monkeypatch):
  _, full = reference
  args = npz_args(npz_file, tmp_path, *REFERENCE, "--optimizer", "imbsam")

  run_killed(monkeypatch, args, at_step=1)  # in the second epoch
  ckpt = tmp_path / "checkpoints" / "imbsam_rho0.05_eta20_seed0"
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["5"]  # steps

  resumed = long_tailed.main([*args, "--resume"])
  run = resumed["runs"][0]
  assert run["resumed_from_epoch"] == 1 and run["epochs_trained_now"] == 1
  assert_same_as_uninterrupted(resumed, full)
  # A finished run resumes to an evaluation only, with the same numbers.
  again = long_tailed.main([*args, "--resume"])["runs"][0]
  assert again["epochs_trained_now"] == 0 and again["compiles"]["train_step"] == 0
  assert again["per_class"] == full["runs"][2]["per_class"]
  # Another configuration is refused.
  with pytest.raises(ValueError, match=r"made with other lr"):
    long_tailed.main([*args, "--resume", "--lr", "0.5"])


def test_fast_path_matches_exact_path(reference, npz_file, tmp_path):
  _, fast = reference
  exact = long_tailed.main(
    npz_args(
      npz_file,
      tmp_path,
      *(*REFERENCE, "--optimizer", "imbsam"),
      *("--tail-capacity", "none", "--checkpoint-every", "0"),
    )
  )
  exact, fast = exact["runs"][0], fast["runs"][2]  # the reference is the fast one
  assert exact["tail_capacity"] is None and exact["tail_path"] == "exact"
  for key in ("train_loss", "train_tail_grad_norm"):  # small_cnn: no BatchNorm
    np.testing.assert_allclose(fast["history"][key], exact["history"][key], rtol=1e-4)


def test_batch_norm_anchored_fast_path(npz_file, tmp_path, capsys):
  """BatchNorm: the exact path by default, the anchored fast path on request."""
  args = [*SMALL, "--norm", "batch", "--optimizer", "imbsam", "--epochs", "1"]
  args += ["--checkpoint-every", "0", "--dataset", f"npz:{npz_file}"]
  exact = long_tailed.main([*args, "--out", str(tmp_path / "a")])["runs"][0]
  assert exact["tail_path"] == "exact" and exact["tail_capacity"] is None
  run = long_tailed.main([*args, "--tail-bn", "anchored", "--out", str(tmp_path / "b")])
  run = run["runs"][0]
  assert run["tail_path"] == "anchored" and run["tail_capacity"] == 8
  assert run["tail_capacities"] and run["tail_capacities"][0] >= 8
  assert run["compiles"]["train_step"] == len(run["tail_capacities"])
  printed = capsys.readouterr().out
  assert "fast path, anchored BatchNorm (tail_capacity 8, 2x" in printed
  np.testing.assert_allclose(
    run["history"]["train_loss"], exact["history"]["train_loss"], rtol=0.05
  )


def test_digits_default_dataset(tmp_path):
  results = long_tailed.main(
    [
      "--epochs",
      "1",
      "--optimizer",
      "sgd",
      "--out",
      str(tmp_path),
      "--checkpoint-every",
      "0",
    ]
  )
  run = results["runs"][0]
  assert run["train_counts"] == [119, 71, 42, 25, 15, 9, 5, 3, 1, 1]
  assert len(run["per_class"]) == 10 and sum(run["test_counts"]) == 599
  assert run["split_classes"] == {
    "many": [0, 1],
    "medium": [2, 3],
    "few": [4, 5, 6, 7, 8, 9],
  }
  config = run["config"]
  assert config["dataset"] == "digits-lt" and config["model"] == "small_cnn"
  assert config["eval_batch_size"] == 500  # 2 padded eval batches
  assert run["compiles"] == {"train_step": 1, "predict": 1}
  assert not (tmp_path / "checkpoints" / "base_seed0").exists()


def test_folder_dataset(tmp_path):
  x_train, y_train, x_test, y_test = tiny_arrays(1, shape=(8, 8, 3))
  root = tmp_path / "images"
  for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
      path = root / split / f"class{y}" / f"{i:03d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(x).save(path)
  results = long_tailed.main(
    [
      f"--dataset=folder:{root}",
      *("--out", str(tmp_path / "out"), *SMALL, "--epochs", "1"),
      *("--optimizer", "sgd", "--imbalance-ratio", "4"),
      *("--many-threshold", "10", "--few-threshold", "6", "--eta", "6"),
    ]
  )
  run = results["runs"][0]
  assert run["train_counts"] == [20, 10, 6, 4]  # profile 20, 12, 7, 5 clipped
  assert run["split_classes"] == {"many": [0], "medium": [1, 2], "few": [3]}
  assert run["config"]["class_names"] == ["class0", "class1", "class2", "class3"]
  assert run["tail_classes"] is None  # sgd does not use eta
  assert run["config"]["image_shape"] == [8, 8, 3]


def test_mock_tfds_cifar10_lt(mock_data, tmp_path, monkeypatch):
  # As in test_data.py: mock_data makes the data "not prepared", so pretend it
  # can be prepared (download_and_prepare is a no-op under mock_data).
  monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
  monkeypatch.setattr(data, "_host_reachable", lambda *a: True)
  with mock_data(num_examples=48):
    results = long_tailed.main(
      [
        *("--dataset", "cifar10-lt", "--imbalance-ratio", "2"),
        *("--out", str(tmp_path), *SMALL, "--epochs", "1", "--optimizer", "sgd"),
      ]
    )
  run = results["runs"][0]
  config = run["config"]
  assert config["image_shape"] == [32, 32, 3] and config["num_classes"] == 10
  assert config["augment_used"] == "crop-flip"  # 32x32 images
  assert config["imbalance_ratio"] == 2.0 and sum(run["test_counts"]) == 48
  assert run["compiles"] == {"train_step": 1, "predict": 1}


# ------------------------------------------------------------ streamed data


@pytest.fixture(scope="module")
def list_spec(tmp_path_factory) -> str:
  """45 training JPEGs in 5 classes (20 to 2 each), 10 test ones: a split list."""
  root = write_lt_dataset(tmp_path_factory.mktemp("list"))
  return f"list:{root},ImageNet_LT_train.txt,ImageNet_LT_test.txt"


# 2 epochs of 5 steps; checkpoints after steps 3, 5, 6, 9 and 10, the last 2 kept.
STREAMED = ["--image-size", "16", "--epochs", "2", "--optimizer", "imbsam"]
STREAMED += ["--checkpoint-every-steps", "3", "--keep-checkpoints", "2"]


def streamed_args(spec, out, *extra):
  return [f"--dataset={spec}", "--out", str(out), *SMALL, *STREAMED, *extra]


@pytest.fixture(scope="module")
def streamed(list_spec, tmp_path_factory):
  out = tmp_path_factory.mktemp("streamed")
  return out, long_tailed.main(streamed_args(list_spec, out))


def test_streamed_list_dataset(streamed):
  """Decoded and augmented by grain, normalized and evaluated on device."""
  out, results = streamed
  (run,) = results["runs"]
  config = run["config"]
  assert (config["num_train"], config["num_test"], config["steps_per_epoch"]) == (
    45,
    10,
    5,
  )
  assert config["image_shape"] == [16, 16, 3] and config["num_classes"] == 5
  assert config["augment_used"] == "random-resized-crop-flip"
  assert config["imbalance_ratio_used"] == 10.0 and config["process_count"] == 1
  assert run["train_counts"] == list(LIST_COUNTS) and run["test_counts"] == [2] * 5
  assert run["tail_classes"] == [1, 2, 3, 4] and run["tail_path"] == "gathered"
  assert run["compiles"] == {"train_step": 1, "predict": 1}
  assert len(run["history"]["train_loss"]) == 2 and 0 <= run["overall"] <= 1
  ckpt = out / "checkpoints" / "imbsam_rho0.05_eta20_seed0"
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [9, 10]


def test_sharpness_study_refuses_streamed_runs(streamed):
  """The study measures training sets held in memory: one clear error."""
  from sharpness_study import study

  out, _ = streamed
  with pytest.raises(ValueError, match="streamed; the study measures in-memory"):
    study.main(["--runs", str(out), "--no-progress"])


def test_step_checkpoint_resume_mid_epoch_is_exact(
  streamed, list_spec, tmp_path, monkeypatch
):
  """Killed in epoch 2 after the checkpoint of step 6, resumed: the same params,
  history, metrics log and per-class accuracy as the uninterrupted run."""
  full_out, full = streamed
  args = streamed_args(list_spec, tmp_path)

  run_killed(monkeypatch, args, at_step=6)
  name = "imbsam_rho0.05_eta20_seed0"
  ckpt = tmp_path / "checkpoints" / name
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [5, 6]

  resumed = long_tailed.main([*args, "--resume"])
  run = resumed["runs"][0]
  assert (run["resumed_from_step"], run["resumed_from_epoch"]) == (6, 1)
  assert run["epochs_trained_now"] == 1  # the second, from its second step
  want, got = comparable(full)[0], comparable(resumed)[0]
  for key in ("resumed_from_epoch", "resumed_from_step", "epochs_trained_now"):
    want.pop(key), got.pop(key)
  assert got == want  # per-class accuracy, history: bit for bit
  log = f"metrics/{name}.csv"
  assert (tmp_path / log).read_text() == (full_out / log).read_text()
  states = [long_tailed.restore(full["runs"][0], full_out).state]
  states.append(long_tailed.restore(run, tmp_path).state)
  assert int(states[1].step) == 10
  jax.tree.map(np.testing.assert_array_equal, *states)


def test_resumed_metrics_log_drops_later_rows(tmp_path):
  """Rows written after the checkpoint a run resumes from are written again."""
  path = tmp_path / "run.csv"
  log = runner.MetricsLog(path)
  for epoch in (1, 2, 3):
    log.write({"epoch": epoch, "step": 5 * epoch, "loss": 1.0 / epoch})
  long_tailed.metrics_log(path, 12).write({"epoch": 3, "step": 15, "loss": 0.25})
  rows = path.read_text().splitlines()
  assert rows == ["epoch,step,loss", "1,5,1", "2,10,0.5", "3,15,0.25"]


def test_bfloat16_activations_keep_float32_state(npz_file):
  """--dtype bfloat16: the model computes in bfloat16; parameters, BatchNorm
  statistics, optimizer state, loss and metrics stay float32."""
  config = options.parse(
    Config,
    [f"--dataset=npz:{npz_file}", *SMALL, "--norm=batch", "--dtype=bfloat16"],
  )
  exp = long_tailed.prepare(config)
  steps = long_tailed.build_run(exp, runner.Cell("imbsam", 0, {"rho": 0.05, "eta": 20}))
  ds = exp.dataset
  batch = {"image": ds.x_train[:8], "label": ds.y_train[-8:]}
  state, step_metrics = steps.train_step(steps.state, batch, jax.random.key(0))
  floats = [
    x.dtype
    for x in jax.tree.leaves((state.params, state.model_state, state.opt_state))
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  assert set(floats) == {jnp.dtype("float32")}
  assert {v.dtype for v in step_metrics.values()} == {jnp.dtype("float32")}
  assert np.isfinite(float(step_metrics["loss"]))
  model = nnx.merge(steps.eval_graphdef, state.params, state.model_state)
  assert model(data.to_float(ds.x_test[:2])).dtype == jnp.bfloat16
  counts = steps.predict(state, {**batch, "valid": np.ones(8, bool)})
  assert counts.dtype == jnp.int32 and counts[1].sum() == 8


# ------------------------------------------------------------- sweeps, presets


def test_rho_eta_sweep_on_digits(tmp_path, capsys):
  """A 2x2 rho x eta grid, one seed (not 0): every cell once, the ablation figure.

  (Means over seeds: tests of report.summarize and format_table above.)"""
  results = long_tailed.main(
    [
      *("--epochs", "1", "--seed", "1", "--rho", "0.02,0.1", "--eta", "10,20"),
      *("--out", str(tmp_path), "--checkpoint-every", "0", "--no-progress"),
    ]
  )
  runs = results["runs"]
  cells = [(r["optimizer"], r["rho"], r["eta"], r["seed"]) for r in runs]
  want = [
    (o, rho, eta, 1)
    for o, rho, eta in [
      ("sgd", None, None),
      *(("sam", rho, None) for rho in (0.02, 0.1)),
      *(("imbsam", rho, eta) for rho in (0.02, 0.1) for eta in (10.0, 20.0)),
    ]
  ]
  assert cells == want  # base once, sam once per rho
  assert list(results["summary"]) == [
    "sgd",
    "sam rho=0.02",
    "sam rho=0.1",
    "imbsam rho=0.02 eta=10",
    "imbsam rho=0.02 eta=20",
    "imbsam rho=0.1 eta=10",
    "imbsam rho=0.1 eta=20",
  ]
  entry = results["summary"]["imbsam rho=0.1 eta=10"]
  assert entry["seeds"] == [1] and entry["few"]["n"] == 1
  assert {r["config"]["eta"] for r in runs if r["optimizer"] == "imbsam"} == {
    10.0,
    20.0,
  }
  tail = {r["eta"]: r["tail_classes"] for r in runs if r["optimizer"] == "imbsam"}
  assert tail[10.0] == [5, 6, 7, 8, 9] and tail[20.0] == [4, 5, 6, 7, 8, 9]
  import matplotlib.image

  image = matplotlib.image.imread(tmp_path / "ablation.png")
  assert image.shape[0] > 500 and image.shape[1] > 1000  # 2 rows x 4 panels
  assert "imbsam rho=0.1 eta=10 seed 1" in capsys.readouterr().out


def tiny_dataset(num_classes: int, size: int = 32) -> data.Dataset:
  """Two images per class of ``size`` x ``size`` x 3 (class 0: four)."""
  rng = np.random.default_rng(0)
  y = np.concatenate([[0, 0], np.repeat(np.arange(num_classes), 2)]).astype(np.int32)
  x = rng.integers(0, 255, size=(len(y), size, size, 3), dtype=np.uint8)
  return data.Dataset(
    x,
    y,
    x[:num_classes],
    y[:num_classes],
    num_classes,
    tuple(map(str, range(num_classes))),
    "tiny",
  )


# Each -ir50 / -ir10 preset differs from its imbalance-100 one only in the ratio
# (checked below), which the step program does not depend on: their steps are
# slow-marked (about 10 s of tracing and compiling each on 2 CPU cores), as are the
# ResNet-50 / ResNeXt-50 presets' (about 40 s each; their values are checked below).
IR_VARIANTS = [n for n in PRESETS if n.endswith(("-ir50", "-ir10"))]
LARGE_SCALE = ["imagenet-lt", "inat2018", "places-lt"]
#: ResNet-50s, the ratio variants, the ResNet-34s (half a minute a step) and the
#: ResNet-32 ones (cifar100-lt, cifar10-lt: about 40 s a step) run slow; digits-lt
#: runs a preset's step in the default run (the ResNet-32's gradient under jit:
#: tests/test_models.py).
SLOW_PRESETS = [
  *IR_VARIANTS,
  *LARGE_SCALE,
  "cifar100-lt",
  "cifar10-lt",
  "cifar100-lt-reference",
  "cifar100-lt-sse-sam",
  # Their losses are tested on their own (DRW, LDAM, focal) and their SAM
  # variants in tests/test_sam_family.py.
  "cifar100-lt-focal-sam",
  "cifar100-lt-ldam-drw-sam",
]
#: What each large-scale preset's description must name: its data's source.
SOURCES = {
  "imagenet-lt": "Liu et al. 2019",
  "inat2018": "iNaturalist 2018",
  "places-lt": "Liu et al. 2019",
}


def test_imbalance_variants_differ_only_in_the_ratio():
  for name in IR_VARIANTS:
    base = PRESETS[name.rsplit("-", 1)[0]].values
    values = PRESETS[name].values
    assert {k: v for k, v in values.items() if k != "imbalance_ratio"} == {
      k: v for k, v in base.items() if k != "imbalance_ratio"
    }
    assert values["imbalance_ratio"] == float(name[-2:])


@pytest.mark.parametrize(
  "name",
  [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PRESETS else n for n in PRESETS
  ],
)
def test_preset_builds_and_runs_one_step(name, tmp_path):
  """Each preset's config, model and optimizer, one ImbSAM step on tiny inputs."""
  config = long_tailed.options.parse(
    Config,
    ["--preset", name, "--batch-size", "4", "--out", str(tmp_path)],
    presets=PRESETS,
  )
  assert config.preset == name
  for key, value in PRESETS[name].values.items():
    if key != "batch_size":
      assert getattr(config, key) == value, key
  num_classes = 100 if "cifar100" in config.dataset else 10
  shape = 8 if name == "digits-lt" else 32
  exp = long_tailed.prepare(config, tiny_dataset(num_classes, shape))
  assert exp.augment == ("crop-flip" if shape == 32 else "none")
  method = config.method[-1]  # imbsam, or the preset's own method
  setting = {"rho": config.rho[0], "eta": 3.0}
  cell = runner.Cell(method, 0, {k: setting[k] for k in long_tailed.USES[method]})
  steps = long_tailed.build_run(exp, cell)
  batch = {"image": exp.dataset.x_train[:4], "label": exp.dataset.y_train[-4:]}
  step = steps.train_step
  if isinstance(step, (training.CapacitySteps, training.StagedSteps)):
    step = step.select(batch, 0)
  state, step_metrics = step(steps.state, batch, jax.random.key(0))
  assert int(state.step) == 1 and np.isfinite(float(step_metrics["loss"]))
  if method in ("imbsam", "sse-sam"):  # every class has 2 < 3 images
    assert float(step_metrics["tail_fraction"]) == 1.0


@pytest.mark.parametrize(
  "name, spec, model, batch_size, lr, weight_decay",
  [
    ("imagenet-lt", "imagenet-lt:/d/ImageNet_LT", "resnext50_32x4d", 256, 0.1, 5e-4),
    ("imagenet-lt", "imagenet2012-lt:/d/lists", "resnext50_32x4d", 256, 0.1, 5e-4),
    ("inat2018", "i_naturalist2018", "resnet50", 512, 0.2, 1e-4),
    ("places-lt", "places-lt:/d/Places_LT", "resnet50", 256, 0.1, 5e-4),
  ],
)
def test_large_scale_presets(name, spec, model, batch_size, lr, weight_decay):
  """The streamed benchmark implied by its dataset spec: the published recipe,
  bfloat16 activations over float32 parameters."""
  config = options.parse(
    Config,
    ["--dataset", spec],
    presets=PRESETS,
    implied_preset=long_tailed.implied_preset,
  )
  assert (config.preset, config.dataset, config.streamed) == (name, spec, True)
  assert (config.model, config.batch_size, config.lr) == (model, batch_size, lr)
  assert (config.weight_decay, config.epochs, config.schedule) == (
    weight_decay,
    90,
    "cosine",
  )
  assert (config.momentum, config.eta, config.dtype) == (0.9, (20.0,), "bfloat16")
  assert (config.many_threshold, config.few_threshold, config.image_size) == (
    100,
    20,
    224,
  )
  assert config.tail_path() == "exact"  # BatchNorm: the reference step by default
  assert SOURCES[name] in PRESETS[name].description
  make = lambda: models.create_model(
    config.model,
    num_classes=1000,
    input_shape=(64, 64, 3),
    rngs=nnx.Rngs(0),
    dtype=config.activation_dtype,
  )
  state = nnx.state(nnx.eval_shape(make), nnx.Param, nnx.BatchStat)
  assert {p.dtype for p in jax.tree.leaves(state)} == {jnp.dtype("float32")}
  logits = jax.eval_shape(lambda: make()(jnp.zeros((1, 64, 64, 3))))
  assert logits.dtype == jnp.bfloat16


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
  """The scalars TensorBoard shows for a run's event files: read in name order,
  a START session log at step s drops the events at steps >= s before it."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):  # records: length, its CRC, the event, its CRC
      (size,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + size])
      i += 12 + size + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        events = [e for e in events if e.step < event.step]
      events.append(event)
  scalars: dict[str, list[tuple[int, float]]] = {}
  for event in events:
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_step_metrics_survive_an_interruption(npz_file, tmp_path, monkeypatch):
  """--log-every-steps: CSV rows and TensorBoard scalars every 2 steps; killed
  after step 8 (last checkpoint at 6) and resumed, both hold each step once,
  with the values of an uninterrupted run (images/s aside)."""
  extra = ["--optimizer", "imbsam", "--log-every-steps", "2"]
  extra += ["--checkpoint-every-steps", "3"]
  whole = npz_args(npz_file, tmp_path / "whole", *REFERENCE, *extra)
  long_tailed.main(whole)
  args = npz_args(npz_file, tmp_path / "cut", *REFERENCE, *extra)
  run_killed(monkeypatch, args, at_step=7)
  name = "imbsam_rho0.05_eta20_seed0"
  assert (tmp_path / "cut" / "metrics" / f"{name}.steps.csv").read_text().count(
    "\n8,"
  ) == 1  # written before the interruption
  long_tailed.main([*args, "--resume"])

  def rows(out):
    text = (out / "metrics" / f"{name}.steps.csv").read_text().splitlines()
    header = text[0].split(",")
    assert header[:3] == ["step", "epoch", "accuracy"] and "images_per_s" in header
    assert {"tail_fraction", "tail_grad_norm", "lr", "rho"} <= set(header)
    keep = [i for i, h in enumerate(header) if h != "images_per_s"]
    return [[line.split(",")[i] for i in keep] for line in text[1:]]

  want, got = rows(tmp_path / "whole"), rows(tmp_path / "cut")
  assert [r[0] for r in got] == ["2", "4", "6", "8", "10"] and got == want
  scalars = tensorboard_scalars(tmp_path / "cut" / "tensorboard" / name)
  reference = tensorboard_scalars(tmp_path / "whole" / "tensorboard" / name)
  steps = lambda tag: sorted(step for step, _ in scalars[tag])  # each once
  assert steps("train/loss") == [2, 4, 6, 8, 10] and steps("epoch/loss") == [5, 10]
  for tag in ("train/loss", "train/tail_grad_norm", "train/lr", "epoch/accuracy"):
    got, want = (np.array(sorted(tb[tag])) for tb in (scalars, reference))
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=tag)
  assert all(v > 0 for _, v in scalars["train/images_per_s"])


def test_sigterm_checkpoints_exits_and_resumes_exactly(tmp_path):
  """A real SIGTERM mid-run: the step in progress finishes, a checkpoint is
  written, the process exits with 143 and one line; --resume then ends with
  the per-class accuracy of an uninterrupted run."""
  common = ["--optimizer", "imbsam", "--epochs", "10", "--checkpoint-every", "5"]
  common += ["--log-every-steps", "1", "--no-progress"]
  cut = tmp_path / "cut"
  process = subprocess.Popen(
    [sys.executable, "examples/train_long_tailed.py", *common, "--out", str(cut)],
    cwd=Path(__file__).resolve().parents[1],
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  steps_log = cut / "metrics" / "imbsam_rho0.05_eta20_seed0.steps.csv"
  deadline = time.monotonic() + 300
  while not steps_log.is_file() and process.poll() is None:  # training has begun
    assert time.monotonic() < deadline
    time.sleep(0.02)
  sent = time.monotonic()
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=60)
  assert time.monotonic() - sent < 30
  assert process.returncode == 143, err[-3000:]
  (line,) = [x for x in err.splitlines() if "SIGTERM" in x]
  assert "stopped run imbsam_rho0.05_eta20_seed0 after step" in line
  assert "rerun with --resume" in line
  stopped = int(line.split("after step ")[1].split()[0])
  assert 0 < stopped < 10 * 9

  resumed = long_tailed.main([*common, "--out", str(cut), "--resume"])["runs"][0]
  assert resumed["resumed_from_step"] == stopped
  whole = long_tailed.main([*common, "--out", str(tmp_path / "whole")])["runs"][0]
  assert resumed["per_class"] == whole["per_class"]
  assert resumed["history"] == whole["history"]
  rows = steps_log.read_text().splitlines()[1:]
  assert [int(r.split(",")[0]) for r in rows] == list(range(1, 10 * 9 + 1))


def test_missing_list_file_fails_before_training(tmp_path):
  root = write_lt_dataset(tmp_path / "data")
  train_list = (root / "ImageNet_LT_train.txt").read_text().splitlines()
  (root / train_list[3].split()[0]).unlink()
  spec = f"list:{root},ImageNet_LT_train.txt,ImageNet_LT_test.txt"
  args = [f"--dataset={spec}", "--model=small_cnn", "--image-size=16", "--epochs=1"]
  with pytest.raises(FileNotFoundError, match=r"1 of the \d+ files .* line 4: "):
    long_tailed.main([*args, "--no-progress", "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_skip_unreadable_counts_survive_a_resume(tmp_path, monkeypatch):
  """Without --skip-unreadable a broken image stops the run naming it; with it,
  the run goes on and results.json counts the skips (a killed and resumed run
  too: the count before the kill is in the checkpoint)."""
  root = write_lt_dataset(tmp_path / "data")
  train_list = (root / "ImageNet_LT_train.txt").read_text().splitlines()
  test_list = (root / "ImageNet_LT_test.txt").read_text().splitlines()
  for line in (train_list[7], test_list[2]):
    (root / line.split()[0]).write_bytes(b"truncated")
  spec = f"list:{root},ImageNet_LT_train.txt,ImageNet_LT_test.txt"
  args = streamed_args(spec, tmp_path / "out")
  with pytest.raises(ValueError, match=r"train\.txt line 8: .* cannot decode"):
    long_tailed.main(args)
  # Record 7 is read in the epochs whose first 40 (of 45) shuffled records hold it.
  epochs = sum(
    7 in np.random.default_rng((0, e)).permutation(len(train_list))[:40]
    for e in range(2)
  )
  (full,) = long_tailed.main([*args, "--skip-unreadable"])["runs"]
  assert full["skipped_unreadable"] == {"train": epochs, "test": 1}
  assert sum(full["test_counts"]) == len(test_list) - 1
  run_killed(monkeypatch, [*args, "--skip-unreadable"], at_step=6)  # mid-epoch 2
  (resumed,) = long_tailed.main([*args, "--skip-unreadable", "--resume"])["runs"]
  assert resumed["resumed_from_step"] == 6
  assert resumed["skipped_unreadable"] == full["skipped_unreadable"]
  assert resumed["per_class"] == full["per_class"]


def test_failed_checkpoint_write_stops_the_run_and_resume_continues(
  reference, npz_file, tmp_path, monkeypatch, limit_file_size, capsys
):
  """The write of the last checkpoint fails (as on a full disk): the run stops
  with one error naming the intact checkpoint; --resume continues from it, drops
  the unfinished write and ends equal to an uninterrupted run."""
  from shared import checkpoints

  _, full = reference
  args = npz_args(npz_file, tmp_path, *REFERENCE, "--optimizer", "imbsam")
  save = checkpoints.Checkpointer.save

  def failing_save(self, step, *a, **kw):
    if step == 10:  # the last step; step 5's checkpoint is written whole
      self._manager.wait_until_finished()
      limit_file_size(4096)
    save(self, step, *a, **kw)

  with monkeypatch.context() as patch:
    patch.setattr(checkpoints.Checkpointer, "save", failing_save)
    error = checkpoints.CheckpointWriteError
    with pytest.raises(error, match="checkpoint 10 could not be written"):
      long_tailed.main(args)
  limit_file_size(None)
  capsys.readouterr()
  resumed = long_tailed.main([*args, "--resume"])
  assert "removed the unfinished write of 10.orbax" in capsys.readouterr().err
  run = resumed["runs"][0]
  assert run["resumed_from_step"] == 5
  assert_same_as_uninterrupted(resumed, full)


# ------------------------------------------------------------ the SAM family


def test_sse_sam_stages_and_focal_sam_run(npz_file, tmp_path):
  """SSE-SAM perturbs the head for the first --head-share of the epochs, then
  takes ImbSAM's step: a step per stage, each compiled once; --head-share 0 is
  ImbSAM's exact path, bit for bit."""
  common = ["--epochs", "2", "--eta", "8", "--tail-capacity", "none"]
  methods = ["--optimizer", "imbsam,sse-sam,focal-sam", "--head-share", "0.5"]
  staged = long_tailed.main(npz_args(npz_file, tmp_path / "a", *common, *methods))
  runs = {r["method"]: r for r in staged["runs"]}
  assert runs["sse-sam"]["compiles"]["train_step"] == 2
  assert runs["imbsam"]["compiles"]["train_step"] == 1
  sse, imbsam = runs["sse-sam"]["history"], runs["imbsam"]["history"]
  assert sse["train_loss"][0] != imbsam["train_loss"][0]  # the head perturbed
  assert runs["focal-sam"]["tail_path"] == runs["sse-sam"]["tail_path"] == "exact"
  assert 0 < runs["focal-sam"]["history"]["train_tail_fraction"][0] < 0.8
  no_head = ["--optimizer", "sse-sam", "--head-share", "0"]
  without = long_tailed.main(npz_args(npz_file, tmp_path / "b", *common, *no_head))
  assert without["runs"][0]["history"] == imbsam
  assert without["runs"][0]["per_class"] == runs["imbsam"]["per_class"]


def test_drw_is_a_weighted_mean_over_the_batch_and_ldam_a_cosine_head(
  npz_file, tmp_path
):
  """From --drw-epoch the step's loss is PyTorch's weighted mean, sum w_y l /
  sum w_y (w: DRW's class weights), before it the plain mean; LDAM's margins
  on the cosines of a normalised classifier."""
  args = npz_args(npz_file, tmp_path, "--epochs", "2", "--drw-epoch", "1")
  args += ["--loss", "ldam", "--optimizer", "sgd"]
  config = options.parse(Config, args, presets=PRESETS)
  exp = long_tailed.prepare(config)
  run = long_tailed.build_run(exp, runner.Cell("base", 0, {}))
  assert isinstance(run.train_step, training.StagedSteps)
  model = nnx.merge(run.eval_graphdef, run.state.params, run.state.model_state)
  assert isinstance(model.head, models.CosineLinear)
  batch = {"image": exp.dataset.x_train[::5], "label": exp.dataset.y_train[::5]}
  images = (data.to_float(batch["image"]) - exp.mean) / exp.std
  counts = exp.train_counts
  losses = long_tailed.ldam_cross_entropy(
    model(jnp.asarray(images)), batch["label"], long_tailed.ldam_margins(counts)
  )
  weights = long_tailed.drw_class_weights(counts)[batch["label"]]
  for position, want in [
    (0, jnp.mean(losses)),
    (exp.steps_per_epoch, jnp.sum(weights * losses) / jnp.sum(weights)),
  ]:
    step = run.train_step.select(batch, position)
    _, step_metrics = step(run.state, batch, jax.random.key(0))
    np.testing.assert_allclose(step_metrics["loss"], want, rtol=1e-5)
  assert len(set(batch["label"].tolist())) > 1 and weights.std() > 0
