"""Runs tests/multidevice/ on 8 simulated CPU devices in a separate process."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.multidevice
def test_multidevice_suite():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["IMBSAM_MULTIDEVICE"] = "1"
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      "tests/multidevice",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=900,
    check=False,
  )
  print(completed.stdout[-5000:])
  assert completed.returncode == 0, completed.stdout[-8000:] + completed.stderr[-4000:]
  assert " passed" in completed.stdout
