"""Two JAX processes of 4 CPU devices each train and evaluate as one of 8 devices.

Runs inside the 8-simulated-device subprocess (tests/test_multidevice.py), which
makes the 8-device run, while two subprocesses of 4 devices each run
examples/train_long_tailed.py with ``--coordinator`` on a local port (gloo
collectives between the CPUs), each reading its half of every global batch of a
streamed list of JPEGs and writing one set of checkpoints. The training losses,
the per-class test accuracy (counts summed over both processes' shards) and the
final parameters must agree, float32 reduction order aside.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from data_fake_lt import TEST_PER_CLASS, TRAIN_COUNTS, write_lt_dataset

from long_tailed import train as long_tailed

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multidevice
def test_two_processes_match_one_of_eight_devices(tmp_path):
  assert jax.device_count() == 8 and jax.process_count() == 1
  root = write_lt_dataset(tmp_path / "data")
  common = [
    f"--dataset=list:{root},ImageNet_LT_train.txt,ImageNet_LT_test.txt",
    "--model=small_cnn",
    "--image-size=16",
    "--batch-size=16",  # 2 steps per epoch, 2 images per device
    "--epochs=2",
    "--optimizer=imbsam",
    "--lr=0.1",
    "--checkpoint-every-steps=3",
    "--log-every-steps=2",
    "--no-progress",
  ]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  distributed = [f"--coordinator=127.0.0.1:{free_port()}", "--num-processes=2"]
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        "examples/train_long_tailed.py",
        *common,
        *distributed,
        f"--process-id={i}",
        f"--out={tmp_path / 'two'}",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in (0, 1)
  ]
  try:
    one = long_tailed.main([*common, f"--out={tmp_path / 'one'}"])
    logs = [p.communicate(timeout=600)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, log in zip(processes, logs, strict=True):
    assert p.returncode == 0, log[-6000:]
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  a, b = one["runs"][0], two["runs"][0]
  assert (a["config"]["process_count"], b["config"]["process_count"]) == (1, 2)
  assert a["config"]["num_devices"] == b["config"]["num_devices"] == 8
  assert a["test_counts"] == b["test_counts"] == [TEST_PER_CLASS] * len(TRAIN_COUNTS)
  np.testing.assert_allclose(a["per_class"], b["per_class"], rtol=1e-5)
  # The fast path: each batch's capacity from the tail count over both processes.
  assert a["tail_path"] == "gathered" and a["tail_capacities"]
  assert a["tail_capacities"] == b["tail_capacities"]
  # Process 0 alone writes the step log and the TensorBoard events.
  (events,) = (tmp_path / "two" / "tensorboard").glob("*/events.out.tfevents.*")
  steps = (tmp_path / "two" / "metrics").glob("*.steps.csv")
  assert [len(p.read_text().splitlines()) for p in steps] == [3]  # header, 2, 4
  assert events.stat().st_size > 0
  for key in ("train_loss", "train_tail_grad_norm"):
    np.testing.assert_allclose(a["history"][key], b["history"][key], rtol=1e-5)
  params = [
    long_tailed.restore(run, tmp_path / out).state.params
    for run, out in ((a, "one"), (b, "two"))
  ]
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), *params
  )
