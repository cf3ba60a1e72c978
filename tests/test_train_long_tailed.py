"""Tests of the long-tailed application (recipes/long_tailed.py, its example).

Every dataset path (digits, mock TFDS, folder:, npz:) runs end to end on tiny data
for one or two epochs with the small CNN; the runs also check the results.json
schema, determinism, resume and the compile count.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from imbsam_jax.recipes import data, long_tailed

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
    assert long_tailed.Config(loss=loss, tau=0.3).effective_tau == tau


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
  labels = [0, 0, 0, 0, 1, 1, 2, 2, 2]
  preds = [0, 0, 0, 1, 1, 0, 2, 3, 3]
  report = long_tailed.classification_report(preds, labels, [150, 60, 10, 3])
  assert report["overall"] == pytest.approx(5 / 9)
  assert report["per_class"][:3] == pytest.approx([0.75, 0.5, 1 / 3])
  assert report["per_class"][3] is None
  assert report["many"] == pytest.approx(0.75)
  assert report["medium"] == pytest.approx(0.5)
  assert report["few"] == pytest.approx(1 / 3)  # class 3 (no test images) left out
  assert report["test_counts"] == [4, 2, 3, 0]
  assert report["split_classes"] == {"many": [0], "medium": [1], "few": [2, 3]}
  # Custom thresholds, and an empty split is None.
  report = long_tailed.classification_report(
    preds, labels, [150, 60, 10, 3], many_threshold=5, few_threshold=2
  )
  assert report["many"] == pytest.approx((0.75 + 0.5 + 1 / 3) / 3)
  assert report["medium"] is None and report["few"] is None


def test_summary_and_table():
  def run(opt, seed, few, overall):
    return {
      "optimizer": opt,
      "seed": seed,
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
  summary = long_tailed.summarize(runs)
  assert summary["sgd"]["few"] == pytest.approx({"mean": 0.3, "std": 0.1})
  assert summary["sgd"]["medium"] is None
  assert summary["sgd"]["per_class_mean"] == pytest.approx([0.9, 0.3])
  assert summary["imbsam"]["overall"] == {"mean": 0.8, "std": 0.0}
  table = long_tailed.format_table(runs)
  assert "Many (1)" in table and "Medium (0)" in table and "Few (1)" in table
  assert "30.0 ± 10.0" in table  # sgd's few over two seeds
  lines = table.splitlines()
  assert any(line.split()[:3] == ["imbsam", "0", "90.0"] for line in lines)


def test_check_batch_size():
  long_tailed.check_batch_size(16, 8, 40)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    long_tailed.check_batch_size(12, 8, 40)
  with pytest.raises(ValueError, match="exceeds the 40 training images"):
    long_tailed.check_batch_size(64, 1, 40)


def test_parser_defaults_and_seeds():
  parser = long_tailed.build_parser()
  config = long_tailed.config_from_args(parser.parse_args([]))
  assert config.dataset == "digits-lt" and config.optimizers == ("sgd", "sam", "imbsam")
  assert config.seeds == (0,) and config.progress
  resolved = config.resolved()
  assert resolved.model == "small_cnn" and resolved.many_threshold == 50
  assert resolved.few_threshold == 20 and resolved.eta == 20
  cifar = long_tailed.Config(dataset="cifar100-lt").resolved()
  assert (cifar.model, cifar.epochs, cifar.many_threshold) == ("resnet32", 200, 100)
  args = parser.parse_args(["--seeds", "0,1", "--seed", "5", "--optimizer", "sam"])
  config = long_tailed.config_from_args(args)
  assert config.seeds == (0, 1, 5) and config.optimizers == ("sam",)
  assert "digits(-lt)" in parser.format_help()
  with pytest.raises(ValueError, match="Unknown optimizer"):
    long_tailed.Config(optimizers=("adam",)).resolved()


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
  with pytest.raises(SystemExit, match="error: TFDS dataset 'cifar100'"):
    long_tailed.cli()


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
    assert run["compiles"] == {"train_step": 1, "eval_step": 1}
    assert len(run["history"]["train_loss"]) == 2
    config = run["config"]
    assert config["tail_classes"] == [1, 2, 3] and config["num_train"] == 40
    assert config["augment_used"] == "none" and config["steps_per_epoch"] == 5
    assert config["many_threshold"] == 100 and config["few_threshold"] == 20
    assert config["tau_used"] == 1.0 and config["loss"] == "balanced-softmax"
    assert (out / "checkpoints" / f"{run['optimizer']}_seed0").is_dir()
  assert set(results["summary"]) == {"sgd", "sam", "imbsam"}
  assert "train_tail_fraction" in results["runs"][2]["history"]


def test_table_is_printed(npz_file, tmp_path, capsys):
  long_tailed.main(
    npz_args(
      npz_file, tmp_path, "--epochs", "1", "--optimizer", "sgd", "--checkpoint-every=0"
    )
  )
  printed = capsys.readouterr().out
  assert "Many (0)   Medium (1)      Few (3)      Overall" in printed
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


def test_resume_matches_uninterrupted_run(reference, npz_file, tmp_path):
  _, full = reference
  args = npz_args(npz_file, tmp_path, *REFERENCE, "--optimizer", "imbsam")

  class Interrupt(Exception):
    pass

  def stop_after_first_epoch(optimizer, seed, epoch, metrics):
    if epoch == 1:
      raise Interrupt

  config = long_tailed.config_from_args(long_tailed.build_parser().parse_args(args))
  with pytest.raises(Interrupt):
    long_tailed.run_experiment(config, on_epoch_end=stop_after_first_epoch, log=None)
  ckpt = tmp_path / "checkpoints" / "imbsam_seed0"
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["1"]

  resumed = long_tailed.main([*args, "--resume"])
  run = resumed["runs"][0]
  assert run["resumed_from_epoch"] == 1 and run["epochs_trained_now"] == 1
  want, got = comparable(full)[2], comparable(resumed)[0]
  for key in ("resumed_from_epoch", "epochs_trained_now"):
    want.pop(key), got.pop(key)
  assert got == want  # accuracies, per-class, history: bit for bit
  # A finished run resumes to an evaluation only, with the same numbers.
  again = long_tailed.main([*args, "--resume"])["runs"][0]
  assert again["epochs_trained_now"] == 0 and again["compiles"]["train_step"] == 0
  assert again["per_class"] == full["runs"][2]["per_class"]
  # Another configuration is refused.
  with pytest.raises(ValueError, match=r"different configuration.*lr"):
    long_tailed.main([*args, "--resume", "--lr", "0.5"])


def test_tail_capacity_fast_path_matches_exact_path(reference, npz_file, tmp_path):
  _, exact = reference
  fast = long_tailed.main(
    npz_args(
      npz_file,
      tmp_path,
      *(*REFERENCE, "--optimizer", "imbsam"),
      *("--tail-capacity", "auto", "--checkpoint-every", "0"),
    )
  )
  capacity = fast["runs"][0]["config"]["tail_capacity_used"]
  assert isinstance(capacity, int) and 1 <= capacity <= 8
  assert exact["runs"][2]["config"]["tail_capacity_used"] is None
  for key in ("train_loss", "train_tail_grad_norm"):  # small_cnn: no BatchNorm
    np.testing.assert_allclose(
      fast["runs"][0]["history"][key], exact["runs"][2]["history"][key], rtol=1e-4
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
  assert config["eval_batch_size_used"] == 500  # 2 padded eval batches
  assert run["compiles"] == {"train_step": 1, "eval_step": 1}
  assert not (tmp_path / "checkpoints" / "sgd_seed0").exists()


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
  assert run["config"]["tail_classes"] == [3]
  assert run["config"]["image_shape"] == [8, 8, 3]


def test_mock_tfds_cifar10_lt(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # As in test_data.py: mock_data makes the data "not prepared", so pretend it
  # can be prepared (download_and_prepare is a no-op under mock_data).
  monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
  monkeypatch.setattr(data, "_host_reachable", lambda *a: True)
  with tfds.testing.mock_data(num_examples=48):
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
  assert run["compiles"] == {"train_step": 1, "eval_step": 1}
