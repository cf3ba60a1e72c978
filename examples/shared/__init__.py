"""The toolbox the example applications share (not part of the ``imbsam_jax`` library).

``options`` (one typed config per application: command line, presets, sweeps),
``runner`` (seeds x methods x settings, progress, metrics logs), ``report``
(results.json, summaries, tables), ``data``, ``models``, ``training``,
``metrics``, ``plots``, ``checkpoints``. Install their dependencies with
``pip install -e ".[examples]"``; the scripts in ``examples/`` put this folder on
the import path themselves (tests: ``pythonpath`` in ``pyproject.toml``).
"""
