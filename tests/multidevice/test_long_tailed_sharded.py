"""The long-tailed example gives the same run on 8 data-parallel devices as on 1.

Runs inside the 8-simulated-device subprocess (tests/test_multidevice.py). The
global batch is split over the devices, so the training losses of every epoch and
the per-class test accuracies must match the single-device run (float32
reduction order aside).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from long_tailed import train as long_tailed

TRAIN_COUNTS = [24, 12, 6, 6]  # classes 1..3 are tail (< eta = 20)


def tiny_npz(path):
  rng = np.random.default_rng(0)

  def make(counts):
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    x = rng.integers(0, 60, size=(len(y), 8, 8, 1))
    for i, c in enumerate(y):
      x[i, 2 * c : 2 * c + 2] += 180
    return x.astype(np.uint8), y

  x_train, y_train = make(TRAIN_COUNTS)
  x_test, y_test = make([6] * len(TRAIN_COUNTS))
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.mark.parametrize(
  "extra",
  [["--optimizer=sgd,sam,imbsam"], ["--optimizer=imbsam", "--tail-capacity=none"]],
)
def test_eight_devices_match_one(tmp_path, extra):
  assert jax.device_count() == 8
  tiny_npz(tmp_path / "tiny.npz")
  common = [
    f"--dataset=npz:{tmp_path / 'tiny.npz'}",
    "--model=small_cnn",
    "--batch-size=16",
    "--epochs=3",
    "--lr=0.05",
    "--no-progress",
    "--checkpoint-every=0",
    *extra,
  ]
  one = long_tailed.main([*common, "--devices=1", f"--out={tmp_path / 'one'}"])
  eight = long_tailed.main([*common, f"--out={tmp_path / 'eight'}"])
  assert {r["config"]["num_devices"] for r in eight["runs"]} == {8}
  for a, b in zip(one["runs"], eight["runs"], strict=True):
    assert a["optimizer"] == b["optimizer"]
    np.testing.assert_allclose(
      a["history"]["train_loss"], b["history"]["train_loss"], rtol=1e-5, atol=1e-6
    )
    assert a["per_class"] == b["per_class"]
    assert b["compiles"] == {"train_step": 1, "predict": 1}
