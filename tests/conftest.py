"""Test-suite configuration.

``tests/multidevice/`` needs 8 (simulated) devices, which must be configured before
jax is imported: ``tests/test_multidevice.py`` runs it in a separate pytest process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os

collect_ignore_glob = [] if os.environ.get("IMBSAM_MULTIDEVICE") else ["multidevice/*"]
