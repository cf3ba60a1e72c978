"""Test-suite configuration.

``tests/multidevice/`` needs 8 (simulated) devices, which must be configured before
jax is imported: ``tests/test_multidevice.py`` runs it in a separate pytest process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import gc
import os
import resource
import signal

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


@pytest.fixture
def limit_file_size():
  """``limit(n)``: from then on, writing a file past ``n`` bytes fails with EFBIG
  ("File too large"), as writes fail on a full disk; ``limit(None)`` and the
  test's end lift it."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.getsignal(signal.SIGXFSZ)

  def limit(size: int | None) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if size else handler)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size or soft, hard))

  yield limit
  limit(None)
