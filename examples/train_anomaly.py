"""Semi-supervised anomaly detection (Deep SAD): Adam/SGD vs SAM vs ImbSAM.

One class of the dataset is normal, every other class anomalous. The training set
holds all normal training images, a few *labeled* anomalies (ImbSAM's tail) and
some unlabeled anomalies (pollution); the test set is the whole test split. Each
method trains the same initial encoder on the same batches; the script prints
test AUROC per normal class (mean ± std over seeds) and writes
``OUT/results.json``, ``OUT/roc.png`` and ``OUT/metrics/*.csv``. Without options
it runs the embedded scikit-learn digits (offline, about a minute)::

  python examples/train_anomaly.py --out runs/anomaly
  python examples/train_anomaly.py --rho 0.01,0.05,0.1 --optimizer sam,imbsam
  python examples/train_anomaly.py --labeled-anomaly-ratio 0.01,0.05,0.1,0.2
  python examples/train_anomaly.py --dataset npz:MNIST.npz --normal-class 0 \\
      --epochs 10 --seeds 0,1,2,3,4,5,6,7,8,9 --eval-every 1

``--help`` lists every option with its default. The logic lives in ``anomaly/``.
"""

from anomaly.train import main
from shared.options import cli

if __name__ == "__main__":
  cli(main, "train_anomaly.py")
