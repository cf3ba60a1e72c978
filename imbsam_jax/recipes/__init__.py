"""Toolbox shared by the example applications (not imported by ``imbsam_jax``).

Modules, each imported on its own so that a script pays only for what it uses:

* ``data``: one loader per data source (scikit-learn digits, TFDS, ``folder:``,
  ``npz:``), long-tail subsampling and deterministic batch iterators.
* ``metrics``: per-class and Many/Medium/Few accuracy, AUROC and ROC curves.
* ``models``, ``training``, ``plots``, ``checkpoints``: Flax models, the jitted
  SGD/SAM/ImbSAM train step, figures, Orbax checkpoints.
* ``long_tailed``, ``deep_sad``: the two applications of the paper (long-tailed
  classification; semi-supervised anomaly detection), driven by ``examples/``.

These need the ``examples`` extra: ``pip install 'imbsam_jax[examples]'``.
"""
