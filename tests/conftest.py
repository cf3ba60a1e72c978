"""Test-suite configuration.

``tests/multidevice/`` needs 8 (simulated) devices, which must be configured before
jax is imported: ``tests/test_multidevice.py`` runs it in a separate pytest process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import gc
import os

import pytest

collect_ignore_glob = [] if os.environ.get("IMBSAM_MULTIDEVICE") else ["multidevice/*"]


@pytest.fixture
def mock_data():
  """``tfds.testing.mock_data``, imported and entered with no garbage left.

  TFDS imports its modules lazily (etils' lazy imports), which breaks
  finalizers that import: a multiprocessing semaphore left by an earlier test's
  grain workers, collected during such an import, raises an unraisable exception
  that fails the test. So collect first, then import.
  """
  gc.collect()
  tfds = pytest.importorskip("tensorflow_datasets")
  return tfds.testing.mock_data
