"""Long-tailed classification: SGD vs SAM vs ImbSAM, Many/Medium/Few accuracy.

Trains the same model on the same long-tailed data with each method, seed and
(rho, eta) setting, prints a Many/Medium/Few/Overall table and writes
``OUT/results.json``, ``OUT/per_class_accuracy.png`` (and ``OUT/ablation.png``
for a sweep), ``OUT/metrics/*.csv`` and Orbax checkpoints. Without options it
runs the embedded ``digits-lt`` preset (offline, about a minute on 2 CPU cores)::

  python examples/train_long_tailed.py --out runs/digits
  python examples/train_long_tailed.py --seed 0,1,2 --rho 0.02,0.05,0.1 --eta 10,20
  python examples/train_long_tailed.py --preset cifar100-lt-reference --out runs/c100
  python examples/train_long_tailed.py --dataset npz:my.npz --imbalance-ratio 1

``--help`` lists every option with its default, and the presets. The logic lives
in ``long_tailed/`` (options in ``config.py``, training in ``train.py``).
"""

from long_tailed.train import main
from shared.options import cli

if __name__ == "__main__":
  cli(main, "train_long_tailed.py")
