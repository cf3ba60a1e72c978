"""Tests of examples/shared/plots.py: each figure is written and readable."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from shared import plots


def _check_png(path, expected):
  assert path == expected and path.is_file()
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
  assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_per_class_accuracy_runs_nan_and_empty_classes(tmp_path):
  counts = [120, 70, 40, 20, 20, 5, 1, 0]
  per_class = {
    "sgd": [0.9, 0.8, 0.7, 0.5, 0.4, 0.2, 0.0, np.nan],  # one run
    "imbsam": [  # two runs; the class without test images is NaN in one
      [0.88, 0.82, 0.7, 0.6, 0.5, 0.4, 0.0, 0.1],
      [0.86, 0.8, 0.72, 0.55, 0.5, np.nan, 1.0, 0.2],
    ],
  }
  out = tmp_path / "sub" / "acc.png"  # parent directories are created
  with np.errstate(all="raise"):
    path = plots.plot_per_class_accuracy(
      counts, per_class, out, thresholds={"Few < 20": 20}, title="t"
    )
  _check_png(path, out)


@pytest.mark.parametrize(
  "counts, per_class, match",
  [
    ([10, 5], {"sgd": [0.1, 0.2, 0.3]}, "expected 2 points"),
    ([10, 5], {"sgd": np.zeros((2, 2, 2))}, "shape"),
    ([10, 5], {}, "empty"),
    ([[10, 5]], {"sgd": [0.1, 0.2]}, "1-D"),
  ],
)
def test_per_class_accuracy_errors(tmp_path, counts, per_class, match):
  with pytest.raises(ValueError, match=match):
    plots.plot_per_class_accuracy(counts, per_class, tmp_path / "x.png")


def test_ablation_and_roc(tmp_path):
  runs = [
    {"optimizer": o, "seed": seed, "rho": rho, "eta": eta, "acc": a and a + seed / 100}
    for seed in (0, 1)
    for o, rho, eta, a in [
      ("sgd", None, None, 0.5),
      ("sam", 0.01, None, 0.55),
      ("sam", 0.1, None, 0.45),
      ("imbsam", 0.01, 10, 0.6),
      ("imbsam", 0.1, 10, 0.62),
      ("imbsam", 0.01, 20, None),  # a run without the metric is left out
      ("imbsam", 0.1, 20, 0.58),
    ]
  ]
  path = plots.plot_ablation(
    runs, ["rho", "eta"], {"acc": "accuracy"}, tmp_path / "ablation.png", title="t"
  )
  _check_png(path, tmp_path / "ablation.png")
  with pytest.raises(ValueError, match="needs runs"):
    plots.plot_ablation([], ["rho"], {"acc": "a"}, tmp_path / "bad.png")
  curves = {
    "adam": [([0, 0.2, 1], [0, 0.7, 1])],
    "imbsam": [([0, 0.1, 1], [0, 0.8, 1])],
  }
  path = plots.plot_roc_grid({"class 0": curves}, tmp_path / "roc.png", title="ROC")
  _check_png(path, tmp_path / "roc.png")
  with pytest.raises(ValueError, match="one length"):
    plots.plot_roc_grid({"c": {"a": [([0, 1], [0, 0.5, 1])]}}, tmp_path / "bad.png")


def test_no_pyplot_state(tmp_path):
  """Figures are not registered with pyplot (no leak across many calls)."""
  import matplotlib.pyplot as plt

  before = plt.get_fignums()
  plots.plot_per_class_accuracy([10, 1], {"a": [1.0, 0.5]}, tmp_path / "h.png")
  assert plt.get_fignums() == before
