"""Toolbox shared by the example applications (not imported by ``imbsam_jax``).

Modules, each imported on its own so that a script pays only for what it uses:

* ``data``: one loader per data source (scikit-learn digits, TFDS, ``folder:``,
  ``npz:``), long-tail subsampling and deterministic batch iterators.
* ``metrics``: per-class and Many/Medium/Few accuracy, AUROC and ROC curves.
* ``models``, ``training``, ``plots``, ``checkpoints``, ``arguments``: Flax
  models, the jitted SGD/SAM/ImbSAM train step, figures, Orbax checkpoints,
  command-line types.
* ``long_tailed``, ``deep_sad``, ``sharpness_study``: the applications (long-tailed
  classification, anomaly detection, per-class curvature), driven by ``examples/``.

These need the ``examples`` extra: ``pip install 'imbsam_jax[examples]'``.
"""
