"""Per-class sharpness of SGD, SAM and ImbSAM runs: are the tail classes sharper?

Restores the final checkpoint of every run of ``examples/train_long_tailed.py``
and measures, for each class and for the head and tail groups, the top Hessian
eigenvalue (power iteration) and the Hessian trace (Hutchinson) of the training
loss restricted to those examples. Prints a table (mean over seeds) and writes
``OUT/sharpness.json`` and ``OUT/sharpness.png``::

  python examples/train_long_tailed.py --seed 0,1,2 --out runs/digits3
  python examples/sharpness.py --runs runs/digits3
  python examples/sharpness.py --runs runs/digits3 --optimizer sgd,imbsam
  python examples/sharpness.py --runs runs/c100 --max-examples-per-class 100 \\
      --batch-size 256 --num-probes 50

``--help`` lists every option with its default. The logic lives in
``sharpness_study/``.
"""

from shared.options import cli
from sharpness_study.study import main

if __name__ == "__main__":
  cli(main, "sharpness.py")
