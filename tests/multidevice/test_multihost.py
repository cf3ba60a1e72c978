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
import signal
import socket
import subprocess
import sys
import time
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


def launch(args, out, env):
  """Two processes of ``examples/train_long_tailed.py`` joined by a coordinator."""
  distributed = [f"--coordinator=127.0.0.1:{free_port()}", "--num-processes=2"]
  return [
    subprocess.Popen(
      [
        sys.executable,
        "examples/train_long_tailed.py",
        *args,
        *distributed,
        f"--process-id={i}",
        f"--out={out}",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in (0, 1)
  ]


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
  processes = launch(common, tmp_path / "two", env)
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


@pytest.mark.slow  # about 40 s; run: XLA_FLAGS=...=8 pytest -m slow tests/multidevice
@pytest.mark.multidevice
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM to process 1 alone: both processes agree on the step (they
  compare flags every 10 steps), checkpoint it, exit with 143; resumed on two
  processes the run ends as one uninterrupted process of 8 devices does."""
  root = write_lt_dataset(tmp_path / "data")
  common = [
    f"--dataset=list:{root},ImageNet_LT_train.txt,ImageNet_LT_test.txt",
    "--model=small_cnn",
    "--image-size=16",
    "--batch-size=16",
    "--epochs=20",  # 40 steps
    "--optimizer=imbsam",
    "--log-every-steps=1",
    "--no-progress",
  ]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  processes = launch(common, tmp_path / "two", env)
  steps_log = tmp_path / "two" / "metrics" / "imbsam_rho0.05_eta20_seed0.steps.csv"
  try:
    deadline = time.monotonic() + 300
    while not steps_log.is_file():  # process 0 has logged a step
      assert time.monotonic() < deadline and processes[0].poll() is None
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=300)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert [p.returncode for p in processes] == [143, 143], logs[1][-3000:]
  stops = {
    int(line.split("after step ")[1].split()[0])
    for log in logs
    for line in log.splitlines()
    if "SIGTERM: stopped" in line
  }
  (stopped,) = stops  # one step, for both
  assert stopped % 10 == 0 and stopped < 40

  resumed = launch([*common, "--resume"], tmp_path / "two", env)
  logs = [p.communicate(timeout=600)[0] for p in resumed]
  assert [p.returncode for p in resumed] == [0, 0], logs[0][-3000:]
  two = json.loads((tmp_path / "two" / "results.json").read_text())["runs"][0]
  assert two["resumed_from_step"] == stopped
  one = long_tailed.main([*common, f"--out={tmp_path / 'one'}"])["runs"][0]
  np.testing.assert_allclose(one["per_class"], two["per_class"], rtol=1e-5)
  np.testing.assert_allclose(
    one["history"]["train_loss"], two["history"]["train_loss"], rtol=1e-4
  )
